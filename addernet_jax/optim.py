"""The paper's optimiser as Optax transforms.

AdderNet's adaptive learning rate (paper eq. 12-13; official `adder.py`
divides by 5, i.e. eta = 0.2) rescales the gradient of every adder layer `l`
to a fixed norm:

    update_l = grad_l * eta * sqrt(k_l) / max(||grad_l||_2, 1e-12)

with `k_l` the number of elements of the filter. The official code folds this
into the adder backward pass; here it is `scale_by_adaptive_lr`, applied only
to the adder filters (`adder_mask`: leaves named "adder_kernel") and followed,
as in the official `torch.optim.SGD(lr, momentum=0.9, weight_decay=5e-4)`, by
weight decay on every parameter, heavy-ball momentum and the per-epoch cosine
learning rate (`make_optimizer`).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

ADDER_KERNEL = "adder_kernel"  # == addernet_jax.layers.ADDER_KERNEL
NORM_FLOOR = 1e-12             # the official clamp(min=1e-12)


logger = logging.getLogger(__name__)


class ScaleByAdaptiveLRState(NamedTuple):
  """`scale_by_adaptive_lr` keeps no state."""


# Which axes of a leaf index stacked layers (`flax.linen.scan`/`vmap` over
# layers stacks their filters in one leaf): None (the leaf is one layer), an
# axis or axes for every leaf, or a function of (key path, leaf) giving them.
LayerAxes = Union[None, int, Sequence[int],
                  Callable[[Any, Any], Union[None, int, Sequence[int]]]]


def _is_axis(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_layer_axes(layer_axes: LayerAxes) -> None:
  """TypeError unless `layer_axes` is None, an int, a sequence of ints or a
  function (checked when the transform is made, not at its first update)."""
  if layer_axes is None or callable(layer_axes) or _is_axis(layer_axes):
    return
  if (isinstance(layer_axes, Sequence) and not isinstance(layer_axes, str)
      and all(_is_axis(a) for a in layer_axes)):
    return
  raise TypeError(
      f"scale_by_adaptive_lr: layer_axes must be None, an int, a sequence of "
      f"ints or a function (key_path, leaf) -> axes, got {layer_axes!r}"
      + (" (through optax.inject_hyperparams, pass static_args="
         "('layer_axes',))" if isinstance(layer_axes, jax.Array) else ""))


def _normalized_axes(axes: None | int | Sequence[int], leaf: Any,
                     path: Any) -> tuple[int, ...]:
  """`axes` of `leaf` as sorted non-negative ints (ValueError naming the
  leaf when one is out of range or all of them are taken)."""
  if axes is None:
    return ()
  given = axes
  axes = (axes,) if isinstance(axes, numbers.Integral) else tuple(axes)
  where = jax.tree_util.keystr(path) if path is not None else "a leaf"
  ndim = np.ndim(leaf)
  out = set()
  for a in axes:
    if not _is_axis(a) or not -ndim <= a < ndim:
      raise ValueError(f"scale_by_adaptive_lr: layer_axes {given!r} does not "
                       f"fit {where} of shape {np.shape(leaf)}")
    out.add(int(a) % ndim)
  if len(out) == ndim:
    raise ValueError(f"scale_by_adaptive_lr: layer_axes {given!r} leaves no "
                     f"filter axis of {where} of shape {np.shape(leaf)}")
  return tuple(sorted(out))


def scale_by_adaptive_lr(eta: float = 0.2, *, layer_axes: LayerAxes = None
                         ) -> optax.GradientTransformation:
  """Rescales each layer's filter gradient to L2 norm `eta * sqrt(k)`, `k`
  its number of elements (AdderNet eq. 13).

  A layer is a leaf, or with `layer_axes` one index along the leaf's
  stacked-layer axes: layers stacked by `flax.linen.scan` (or `nn.vmap`)
  share one leaf of shape `(num_layers, kh, kw, cin, cout)`, and one norm
  over it would give each layer an update proportional to its own gradient
  instead (`layer_axes=0` takes one norm per layer).

  A layer with a zero gradient stays exactly zero (no NaN). A NaN gradient
  entry makes the norm, hence that whole layer's update, NaN (an infinite
  one: NaN there and 0 elsewhere) as in the official code; wrap the
  optimiser in `optax.apply_if_finite` to skip such steps. The norm is
  taken in float32 whatever the gradient's dtype; the update keeps the
  dtype. Apply it to adder filters only (`optax.masked(..., adder_mask)`),
  as `make_optimizer` does.

  Args:
    eta: the paper's eta (0.2 in the official release), a non-negative
      number, or a scalar array (e.g. through `optax.inject_hyperparams`,
      to schedule it).
    layer_axes: None (each leaf is one layer), an axis or a sequence of axes
      that index stacked layers in every leaf, or a function `(key_path,
      leaf) -> axes or None` choosing them per leaf.

  Returns:
    An `optax.GradientTransformation`.
  """
  _check_layer_axes(layer_axes)
  if callable(eta):
    raise TypeError("scale_by_adaptive_lr: eta must be a number or a scalar "
                    "array, got a callable; to schedule eta use "
                    "optax.inject_hyperparams(scale_by_adaptive_lr)("
                    "eta=schedule)")
  if not isinstance(eta, jax.core.Tracer):  # a number or a concrete array
    if np.ndim(eta) != 0:
      raise ValueError(f"scale_by_adaptive_lr: eta must be a scalar, got "
                       f"{eta!r}")
    eta = float(eta)
    if not 0 <= eta < math.inf:
      raise ValueError(f"scale_by_adaptive_lr: eta must be a finite number "
                       f">= 0, got {eta!r}")

  def init_fn(params: optax.Params) -> ScaleByAdaptiveLRState:
    del params
    return ScaleByAdaptiveLRState()

  def scale(path: Any, g: jax.Array) -> jax.Array:
    axes = layer_axes(path, g) if callable(layer_axes) else layer_axes
    stacked = _normalized_axes(axes, g, path)
    g = jnp.asarray(g)
    reduced = tuple(i for i in range(g.ndim) if i not in stacked)
    k = math.prod(g.shape[i] for i in reduced)
    g32 = g.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(g32), axis=reduced, keepdims=True))
    if isinstance(eta, float):
      factor = eta * math.sqrt(k) / jnp.maximum(norm, NORM_FLOOR)
    else:  # traced (e.g. under jax.jit by optax.inject_hyperparams)
      factor = (jnp.asarray(eta, jnp.float32) * math.sqrt(k)
                / jnp.maximum(norm, NORM_FLOOR))
    return (g32 * factor).astype(g.dtype)

  def update_fn(updates: optax.Updates, state: ScaleByAdaptiveLRState,
                params: optax.Params | None = None):
    del params
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def _warn_stacked_filters(params: Any) -> None:
  """Warns about adder filters that look like stacked layers (rank not 4 or
  2): one norm over them is not the paper's per-layer rate."""
  stacked = [
      (jax.tree_util.keystr(path), tuple(np.shape(leaf)))
      for path, leaf in jax.tree_util.tree_leaves_with_path(params)
      if _is_adder_path(path) and np.ndim(leaf) not in (2, 4)]
  if stacked:
    names = ", ".join(f"{name} {shape}" for name, shape in stacked[:3])
    more = f" and {len(stacked) - 3} more" if len(stacked) > 3 else ""
    logger.warning(
        "adder filter(s) %s%s are neither convolution (rank 4) nor dense "
        "(rank 2) filters: layers stacked by nn.scan or nn.vmap? The adaptive "
        "learning rate would take one norm over all of them; pass "
        "make_optimizer(..., layer_axes=0) (the stacking axes) for one norm "
        "per layer", names, more)


def _key_name(entry: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_adder_path(path: tuple[Any, ...]) -> bool:
  # An NNX `State` (`nnx.state`, `nnx.split`, `nnx.grad`) keeps each array
  # in a Variable, whose pytree path adds the attribute `.value` after the
  # parameter's name.
  if (len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name == "value"):
    path = path[:-1]
  if not path:
    return False
  last = path[-1]
  key = getattr(last, "key", None)
  if isinstance(key, tuple) and key:  # flax.traverse_util.flatten_dict
    return str(key[-1]) == ADDER_KERNEL
  # flatten_dict(..., sep="/") and other joined names
  return _key_name(last).rsplit("/", 1)[-1] == ADDER_KERNEL


def adder_mask(params: Any) -> Any:
  """A pytree of bools, True exactly where the leaf's path ends in
  "adder_kernel" (the adder filters of `addernet_jax.layers`, Linen
  parameter dicts and NNX `State`s alike, also flattened by
  `flax.traverse_util.flatten_dict`, with tuple or "/"-joined keys).

  Only those names are selected: the filters of a `flax.linen.Conv` (or
  `nnx.Conv`) made an adder layer with
  `conv_general_dilated=ops.adder_conv_general_dilated` are called "kernel",
  like every multiplication layer's, and need a mask of your own."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_adder_path(path), params)


def _get(config: Any, key: str, default: Any = None) -> Any:
  if isinstance(config, Mapping):
    return config.get(key, default)
  if hasattr(config, "get"):  # ml_collections.ConfigDict
    return config.get(key, default)
  return getattr(config, key, default)


def config_number(config: Any, key: str, *, low: float = 0.0,
            low_included: bool = True, high: float = math.inf,
            default: float | None = None, official: str = "") -> float:
  """config[key] as a float in the range; ValueError naming it otherwise
  (the check every optimiser field of a config goes through).

  Absent (or None): `default`, or an error when there is none (`official`
  says what to set). A string, a bool or a callable is refused, not
  converted (bool("false") is True; a schedule is not a number)."""
  value = _get(config, key)
  if value is None:
    if default is not None:
      return default
    raise ValueError(f"config has no {key!r}; the optimiser needs it"
                     f"{f' ({official})' if official else ''}")
  bound = (f"{'>=' if low_included else '>'} {low:g}"
           + (f" and < {high:g}" if math.isfinite(high) else " (finite)"))
  number = None
  if not isinstance(value, (str, bytes, bool)) and not callable(value):
    try:
      number = float(value)  # Python, NumPy and concrete JAX scalars
    except (TypeError, ValueError):
      pass
  if number is None or not (number >= low if low_included else number > low
                            ) or not number < high:
    extra = (": learning_rate is the peak of the official per-epoch cosine; "
             "for another schedule build the optax chain yourself"
             if callable(value) and key == "learning_rate" else "")
    raise ValueError(f"config.{key}={value!r} must be a number {bound}{extra}")
  return number


def _integer(config: Any, key: str, default: int | None = None) -> int:
  """config[key] as an int (an integral float such as 2.0 too)."""
  number = config_number(config, key, low=-math.inf, default=default)
  if number != int(number):
    raise ValueError(f"config.{key}={_get(config, key)!r} must be a whole "
                     f"number")
  return int(number)


def _learning_rate(config: Any) -> float:
  """The schedule's peak `config.learning_rate`, checked (> 0, finite)."""
  return config_number(config, "learning_rate", low_included=False,
                 official="the official value is 0.1")


def _hyperparameters(config: Any) -> tuple[float, float, float]:
  """(eta, weight_decay, momentum) of `config`, checked; eta is 0 when the
  adaptive rate is off (`adaptive_lr` False)."""
  # NaN or < 0 would switch the adaptive rate off silently.
  eta = config_number(config, "eta", default=0.2)
  adaptive_lr = _get(config, "adaptive_lr", True)
  if not isinstance(adaptive_lr, (bool, np.bool_)):
    raise ValueError(f"config.adaptive_lr={adaptive_lr!r} must be True or "
                     f"False")
  # Required, not defaulted: a config lacking them silently trained without
  # the official momentum 0.9 / weight decay 5e-4 (0 switches either off).
  weight_decay = config_number(config, "weight_decay", official=(
      "the official value is 5e-4; 0 switches it off"))
  momentum = config_number(config, "momentum", high=1.0, official=(
      "the official value is 0.9; 0 switches it off"))
  return (eta if adaptive_lr else 0.0), weight_decay, momentum


def check_config(config: Any) -> None:
  """ValueError naming the first optimiser field of `config` that
  `make_optimizer` would refuse (`learning_rate`, `eta`, `adaptive_lr`,
  `weight_decay`, `momentum`), before any data is loaded."""
  _learning_rate(config)
  _hyperparameters(config)


def schedule_epochs(config: Any, steps_per_epoch: int) -> float:
  """Length, in epochs, of the cosine: the run's epochs plus one.

  A run of `N` epochs (`num_epochs`, or `ceil(num_train_steps /
  steps_per_epoch)` when `num_train_steps` > 0) follows epochs 1..N of an
  (N+1)-epoch cosine, exactly as the official loop follows epochs 1..399 of
  its 400-epoch cosine: every epoch of the run trains at a non-zero rate (a
  1-epoch run at `learning_rate / 2`), and `num_epochs=399` is the official
  CIFAR recipe to the step.
  """
  num_train_steps = _integer(config, "num_train_steps", default=0)
  if num_train_steps > 0:
    return float(math.ceil(num_train_steps / steps_per_epoch) + 1)
  num_epochs = _integer(config, "num_epochs")
  if num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive, got {num_epochs!r}")
  return float(num_epochs + 1)


def learning_rate_schedule(config: Any, steps_per_epoch: int
                           ) -> optax.Schedule:
  """The official per-epoch cosine, constant within each epoch.

  Official `main.py`: `for e in range(1, 400): lr = 0.05 * (1 + cos(pi * e /
  400))` with 0.05 = lr0 / 2 (lr0 = 0.1): 399 epochs. Our optimiser step `s`
  (0-based, Optax's count) lies in our 0-based epoch `i = s // steps_per_epoch`,
  which is the official epoch `e = i + 1`:

      lr(s) = learning_rate / 2 * (1 + cos(pi * (i + 1) / E))
            = learning_rate * cos(pi * (i + 1) / (2 E))**2

  (the second form, used here, keeps float32 precision near the end) with
  `E = schedule_epochs(config, steps_per_epoch)`, the run's `N` epochs plus
  one. The last epoch of the run, `i + 1 = N = E - 1`, still trains at a
  non-zero rate; the epoch index is clamped at `N` for steps past the end.

  Args:
    config: with `learning_rate`, `num_epochs` and `num_train_steps`.
    steps_per_epoch: optimiser steps per epoch (> 0).

  Returns:
    An `optax.Schedule` (step count -> float32 learning rate).
  """
  if (isinstance(steps_per_epoch, bool) or
      not isinstance(steps_per_epoch, numbers.Integral) or
      steps_per_epoch <= 0):
    raise ValueError(
        f"steps_per_epoch must be a positive int, got {steps_per_epoch!r}")
  steps_per_epoch = int(steps_per_epoch)
  base = _learning_rate(config)
  total = schedule_epochs(config, steps_per_epoch)

  def schedule(count: chex.Numeric) -> jax.Array:
    epoch = jnp.asarray(count) // steps_per_epoch + 1  # the official epoch
    epoch = jnp.minimum(epoch.astype(jnp.float32), total - 1)
    return base * jnp.square(jnp.cos(jnp.pi * epoch / (2 * total)))

  return schedule


def make_optimizer(config: Any, params: Any,
                   steps_per_epoch: int | None = None, *,
                   layer_axes: LayerAxes = None
                   ) -> optax.GradientTransformation:
  """The official optimiser, in the official order.

  1. adaptive learning rate (`scale_by_adaptive_lr(config.eta)`) on the adder
     filters only (`adder_mask`); skipped when `eta <= 0` or
     `config.adaptive_lr` is False;
  2. weight decay `config.weight_decay` on every parameter (PyTorch's SGD
     adds `wd * p` to the gradient before momentum);
  3. heavy-ball momentum `config.momentum` (PyTorch's buffer, no dampening,
     no Nesterov);
  4. `-learning_rate_schedule(config, steps_per_epoch)`.

  Args:
    config: `learning_rate`, `momentum` (in [0, 1)), `weight_decay` (>= 0;
      all three required: 0 switches momentum or decay off), `num_epochs`,
      `num_train_steps`, optionally `eta` (0.2 when absent), `optimizer`
      ("sgd"), `adaptive_lr`, and `steps_per_epoch` (used when the argument
      is None).
    params: the parameters the optimiser will update (or their shapes):
      an adder filter whose rank is neither 4 (a convolution) nor 2 (a
      dense layer), i.e. layers stacked by `nn.scan`/`nn.vmap`, draws a
      warning unless `layer_axes` is given. Parameters without any adder
      filter (a CNN) are fine: step 1 then does nothing.
    steps_per_epoch: optimiser steps per epoch.
    layer_axes: the axes of stacked layers (e.g. 0 for `nn.scan(...,
      variable_axes={"params": 0})`), so that each layer gets its own norm.
      An int or a sequence applies to the stacked filters only, those of
      rank other than 4 and 2 (a model may mix scanned and plain layers); a
      function `(key_path, leaf) -> axes or None` chooses per filter.

  Returns:
    An `optax.GradientTransformation`.
  """
  name = _get(config, "optimizer", "sgd") or "sgd"
  if name != "sgd":
    raise ValueError(f"optimizer must be 'sgd' (the paper's), got {name!r}")
  if steps_per_epoch is None:
    steps_per_epoch = _get(config, "steps_per_epoch")
    if steps_per_epoch is None:
      raise ValueError("make_optimizer needs steps_per_epoch (argument or "
                       "config.steps_per_epoch)")
  if (isinstance(steps_per_epoch, bool) or
      not isinstance(steps_per_epoch, numbers.Integral)):
    raise ValueError(f"steps_per_epoch must be a positive int, got "
                     f"{steps_per_epoch!r}")
  steps_per_epoch = int(steps_per_epoch)
  jax.tree.structure(params)  # a pytree, or a clear error here
  eta, weight_decay, momentum = _hyperparameters(config)
  chain = []
  if eta > 0:
    if layer_axes is None:
      _warn_stacked_filters(params)
    elif not callable(layer_axes):
      _check_layer_axes(layer_axes)
      stacked_axes = layer_axes
      layer_axes = lambda _, leaf: (stacked_axes if np.ndim(leaf) not in (2, 4)
                                    else None)
    chain.append(optax.masked(scale_by_adaptive_lr(eta, layer_axes=layer_axes),
                              adder_mask))
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay))
  if momentum:
    chain.append(optax.trace(decay=momentum, nesterov=False))
  chain.append(optax.scale_by_learning_rate(
      learning_rate_schedule(config, steps_per_epoch)))
  return optax.chain(*chain)
