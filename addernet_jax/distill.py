"""PKKD: kernel based progressive distillation for adder networks.

Xu et al., "Kernel Based Progressive Distillation for Adder Neural Networks",
NeurIPS 2020 (arXiv 2009.13044). A CNN of the same architecture (the
teacher, `conv="mult"`) is initialised and trained together with the adder
network (the student): every step updates both, so the student always learns
from a teacher at the same stage of training ("progressive"), never from a
pre-trained one. The student's loss combines

  * the cross-entropy with the ground truth,
  * the distillation of the teacher's outputs (softened softmax, KL), and
  * a kernel based feature distillation: the output of each adder layer,
    `-||x - f||_1` for every input patch `x` and filter `f`, is mapped by a
    Laplace kernel `exp(-||x - f||_1 / sigma_a)`, the output of the teacher's
    layer at the same place by a Gaussian kernel
    `exp(-||x - f||_2^2 / (2 sigma_c^2))` (computed from the convolution and
    the norms of the patches and filters), the teacher's map goes through a
    learned linear transformation (a 1x1 convolution, identity at the
    start), and the two maps are compared with a squared error.

docs/pkkd.md has the paper's description, how to run it, and every choice
made where the paper leaves room (marked "choice" below).

Layout: pure functions (kernels, distances, bandwidths, losses, schedule),
then the capture of layer inputs and outputs (`apply_with_taps`, a Flax
method interceptor: the models are unchanged), then the training state that
holds both networks and the per-device PKKD step that `train_lib` runs in
its `shard_map`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, Mapping

import flax
import flax.linen as nn
from flax import struct
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import optax

from addernet_jax import layers

DISTILL_KINDS = ("none", "pkkd")
# Exponents of `normalized_kernel` are clipped above at this value (exp(10)
# = 2.2e4) so that no input can overflow float32 (`kernel_map` centres at
# the minimum distance, where its exponents are <= 0).
MAX_EXPONENT = 10.0
VARIANCE_FLOOR = 1e-12


def _float(x: jax.Array) -> jax.Array:
  """`x` in at least float32 (float64 stays float64, for tests)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------- kernels --


def channel_statistics(distance: jax.Array, axis_name: str | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Minimum and standard deviation of `distance` per output channel
  (last axis), over every other axis and, with `axis_name`, over every
  device (those of the global batch; the moments as BatchNorm computes
  them).

  They are differentiated, as BatchNorm differentiates its batch moments:
  a kernel map built on them depends only on the standardised distances,
  so its gradient has no component along a uniform shift or scaling of a
  filter's distances (which the following BatchNorm ignores). Held
  constant, they made the feature loss push every filter's distances up or
  down as a whole at every step (docs/pkkd.md, choice 3).
  """
  d = _float(distance)
  axes = tuple(range(d.ndim - 1))
  mean = jnp.mean(d, axis=axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(d - mean), axis=axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  # The minimum as the mean of the distances equal to it, so that its
  # gradient reaches the global batch's argmin (split over ties) on any
  # number of devices, as jnp.min's does on one (pmin has no derivative).
  fixed = jnp.min(lax.stop_gradient(d), axis=axes)
  if axis_name is not None:
    fixed = lax.pmin(fixed, axis_name)
  at_min = (lax.stop_gradient(d) == fixed).astype(d.dtype)
  total, count = jnp.sum(d * at_min, axis=axes), jnp.sum(at_min, axis=axes)
  if axis_name is not None:
    total, count = lax.pmean((total, count), axis_name)
  low = total / count
  return low, jnp.sqrt(jnp.maximum(var, VARIANCE_FLOOR))


def normalized_kernel(distance: jax.Array, bandwidth: jax.Array,
                      center: jax.Array) -> jax.Array:
  """`exp(-(distance - center) / bandwidth)`: a kernel `exp(-distance /
  bandwidth)` divided by its value at `center` (per channel, last axis).

  With `distance` an L1 distance this is the Laplace kernel with bandwidth
  `sigma_a = bandwidth`; with a squared L2 distance the Gaussian kernel with
  `2 sigma_c^2 = bandwidth`. Dividing by the constant `exp(-center /
  bandwidth)` keeps the values in float32 range (adder outputs are in the
  thousands: `exp(-1000 / sigma)` is 0 in float32 for any useful sigma) and
  does not change which inputs the kernel finds close. The exponent is
  clipped above at MAX_EXPONENT.
  """
  z = (center - _float(distance)) / bandwidth
  return jnp.exp(jnp.minimum(z, MAX_EXPONENT))


def kernel_map(distance: jax.Array, sigma_scale: float,
               axis_name: str | None = None) -> jax.Array:
  """The kernel map of a layer's distances (PKKD's `g` or `h`).

  The bandwidth of each filter (output channel) is `sigma_scale` times the
  standard deviation of its distances over the (global) batch, and the map
  is normalised at their minimum (see `normalized_kernel`), so its values
  lie in (0, 1] like those of the kernel itself, 1 for the closest
  patch-filter pair of the batch; both are statistics of the batch,
  differentiated like BatchNorm's (`channel_statistics`), so the map is a
  function of the standardised distances only (choice: the paper's sigma_a,
  sigma_c are not published; a bandwidth at the scale of the data is the
  usual rule, and the spread, not the mean, is the scale of adder outputs,
  see docs/pkkd.md).

  Args:
    distance: [..., C] non-negative distances (L1 for an adder layer,
      squared L2 for a CNN layer).
    sigma_scale: > 0; larger is a wider, flatter kernel.
    axis_name: the data-parallel mesh axis (None: this batch only).

  Returns:
    float32 [..., C] in (0, 1]: 1 at the channel's smallest distance,
    smaller for farther pairs.
  """
  low, std = channel_statistics(distance, axis_name)
  return normalized_kernel(distance, sigma_scale * std, low)


def window_sum_of_squares(x: jax.Array, kernel_shape: tuple[int, ...], *,
                          strides: Any, padding: Any) -> jax.Array:
  """`||xp_patch||_2^2` at every output position of a convolution with
  filters of `kernel_shape` (HWIO), strides and padding (zero padding counts
  as zeros, as in the convolution itself): [N, H', W', 1]."""
  kh, kw = kernel_shape[0], kernel_shape[1]
  sq = jnp.sum(jnp.square(_float(x)), axis=-1, keepdims=True)
  ones = jnp.ones((kh, kw, 1, 1), sq.dtype)
  return lax.conv_general_dilated(
      sq, ones, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)


def squared_l2_distance(x: jax.Array, kernel: jax.Array, dot: jax.Array, *,
                        strides: Any = (1, 1), padding: Any = "VALID"
                        ) -> jax.Array:
  """`||x_patch - f||_2^2 = ||x_patch||^2 - 2 x_patch . f + ||f||^2` for a
  multiplication layer, from its output `dot` (the convolution or matmul,
  without bias), its input `x` and its filters `kernel`.

  `kernel` of rank 4 (HWIO) is a convolution with `strides` and `padding`
  (as `lax.conv_general_dilated` takes them); of rank 2 (in, out) a dense
  layer. Clamped at 0 (rounding can make the expansion slightly negative).
  """
  kernel = _float(kernel)
  dot = _float(dot)
  if kernel.ndim == 4:
    x_sq = window_sum_of_squares(x, kernel.shape, strides=strides,
                                 padding=padding)
    f_sq = jnp.sum(jnp.square(kernel), axis=(0, 1, 2))
  elif kernel.ndim == 2:
    x_sq = jnp.sum(jnp.square(_float(x)), axis=-1, keepdims=True)
    f_sq = jnp.sum(jnp.square(kernel), axis=0)
  else:
    raise ValueError(f"kernel must be HWIO (rank 4) or (in, out) (rank 2), "
                     f"got shape {kernel.shape}")
  return jnp.maximum(x_sq - 2.0 * dot + f_sq, 0.0)


def linear_transform(h: jax.Array, matrix: jax.Array) -> jax.Array:
  """The teacher side's linear transformation: a 1x1 convolution (a matmul
  over the channel axis) of the kernel map `h` [..., C] with `matrix`
  [C, C]."""
  return jnp.einsum("...c,cd->...d", h, matrix.astype(h.dtype),
                    precision=lax.Precision.HIGHEST)


# -------------------------------------------------------------- losses --


def feature_loss(student_maps: Mapping[str, jax.Array],
                 teacher_maps: Mapping[str, jax.Array]) -> jax.Array:
  """Mean over layers of the mean squared difference of the maps (choice:
  mean, so the weight does not grow with depth)."""
  if set(student_maps) != set(teacher_maps) or not student_maps:
    raise ValueError(f"feature maps of different layers: "
                     f"{sorted(student_maps)} vs {sorted(teacher_maps)}")
  losses = [jnp.mean(jnp.square(student_maps[k] - teacher_maps[k]))
            for k in sorted(student_maps)]
  return jnp.mean(jnp.stack(losses))


def soft_distillation_loss(student_logits: jax.Array,
                           teacher_logits: jax.Array,
                           temperature: float) -> jax.Array:
  """`T^2 * KL(softmax(t / T) || softmax(s / T))`, averaged over the batch
  (Hinton et al.'s output distillation; `T^2` keeps its gradient's scale
  independent of T)."""
  t = float(temperature)
  s_log = jax.nn.log_softmax(_float(student_logits) / t, -1)
  t_log = jax.nn.log_softmax(_float(teacher_logits) / t, -1)
  kl = jnp.sum(jnp.exp(t_log) * (t_log - s_log), axis=-1)
  return t * t * jnp.mean(kl)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer labels (at least float32)."""
  log_p = jax.nn.log_softmax(_float(logits), -1)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], -1))


def distill_ramp(step: jax.Array, warmup_steps: int) -> jax.Array:
  """Weight of the distillation terms at optimizer step `step` (0-based): a
  linear ramp from 1 / warmup_steps to 1 over the first `warmup_steps`
  steps, 1 after (and always 1 with `warmup_steps <= 0`, the default)."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, (jnp.asarray(step).astype(jnp.float32) + 1.0)
                     / float(warmup_steps))


def pkkd_student_loss(logits: jax.Array, teacher_logits: jax.Array,
                      labels: jax.Array,
                      student_maps: Mapping[str, jax.Array],
                      teacher_maps: Mapping[str, jax.Array], *,
                      ce_weight: float, kd_weight: float,
                      feature_weight: float, temperature: float,
                      ramp: jax.Array | float = 1.0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The student's PKKD loss:

      ce_weight * CE(logits, labels)
      + ramp * (kd_weight * T^2 KL(teacher || student at temperature T)
                + feature_weight * feature_loss(g, r(h)))

  `teacher_logits` and the teacher side of `teacher_maps` should already be
  `stop_gradient`-ed where the teacher must not learn from it. Returns the
  total and its parts ("ce", "kd", "feature").
  """
  ce = cross_entropy(logits, labels)
  kd = soft_distillation_loss(logits, teacher_logits, temperature)
  feat = feature_loss(student_maps, teacher_maps)
  total = ce_weight * ce + ramp * (kd_weight * kd + feature_weight * feat)
  return total, {"ce": ce, "kd": kd, "feature": feat}


# ---------------------------------------------------------- settings --


@dataclasses.dataclass(frozen=True)
class PKKDSettings:
  """The `config.pkkd` fields, checked (see configs/default.py)."""
  ce_weight: float = 1.0
  kd_weight: float = 1.0
  feature_weight: float = 1.0
  temperature: float = 1.0
  sigma_scale: float = 1.0
  layers: tuple[str, ...] = ("*",)
  warmup_steps: int = 0


def distill_kind(config: ml_collections.ConfigDict) -> str:
  """`config.distill` ("none" when absent), checked."""
  kind = config.get("distill", "none")
  if kind is None:
    kind = "none"
  if kind not in DISTILL_KINDS:
    raise ValueError(f"config.distill must be one of {DISTILL_KINDS}, got "
                     f"{kind!r}")
  return kind


def settings_from_config(config: ml_collections.ConfigDict,
                         steps_per_epoch: int = 1) -> PKKDSettings:
  """Checks `config` for PKKD and returns its settings (ValueError naming
  the bad field)."""
  if config.get("conv") != "adder":
    raise ValueError(
        f"config.distill='pkkd' trains an adder network (the student) from a "
        f"CNN teacher: config.conv must be 'adder', got {config.get('conv')!r}")
  p = config.get("pkkd")
  if p is None:
    raise ValueError("config.distill='pkkd' needs the config.pkkd fields "
                     "(see configs/default.py)")
  values = {}
  for name in ("ce_weight", "kd_weight", "feature_weight"):
    value = p.get(name)
    if not isinstance(value, (int, float)) or value < 0 or \
        not math.isfinite(value):
      raise ValueError(f"config.pkkd.{name} must be a finite number >= 0, "
                       f"got {value!r}")
    values[name] = float(value)
  if not any(values.values()):
    raise ValueError("config.pkkd.ce_weight, kd_weight and feature_weight "
                     "are all 0: the student would learn nothing")
  for name in ("temperature", "sigma_scale"):
    value = p.get(name)
    if not isinstance(value, (int, float)) or not value > 0 or \
        not math.isfinite(value):
      raise ValueError(f"config.pkkd.{name} must be a finite number > 0, "
                       f"got {value!r}")
    values[name] = float(value)
  patterns = p.get("layers")
  if not isinstance(patterns, str) or not patterns.strip():
    raise ValueError(f"config.pkkd.layers must be a non-empty string of "
                     f"comma-separated layer patterns, got {patterns!r}")
  warmup = p.get("warmup_epochs", 0.0) or 0.0
  if (not isinstance(warmup, (int, float)) or warmup < 0
      or not math.isfinite(warmup)):
    raise ValueError(f"config.pkkd.warmup_epochs must be a finite number >= "
                     f"0, got {warmup!r}")
  for name, least in (("teacher_learning_rate", "> 0"),
                      ("teacher_weight_decay", ">= 0")):
    value = p.get(name)
    if value is not None and (
        not isinstance(value, (int, float)) or not math.isfinite(value)
        or value < 0 or (least == "> 0" and value == 0)):
      raise ValueError(f"config.pkkd.{name} must be None (the student's) or "
                       f"a finite number {least}, got {value!r}")
  return PKKDSettings(
      layers=tuple(s.strip() for s in patterns.split(",") if s.strip()),
      warmup_steps=int(round(warmup * steps_per_epoch)), **values)


def teacher_config(config: ml_collections.ConfigDict
                   ) -> ml_collections.ConfigDict:
  """The teacher's config: the student's with `conv="mult"`, no adaptive
  learning rate (plain SGD of the same recipe) and the optional
  `pkkd.teacher_learning_rate` / `pkkd.teacher_weight_decay`."""
  t = ml_collections.ConfigDict(config.to_dict())
  t.conv = "mult"
  t.adaptive_lr = False
  t.distill = "none"
  if config.pkkd.get("teacher_learning_rate") is not None:
    t.learning_rate = float(config.pkkd.teacher_learning_rate)
  if config.pkkd.get("teacher_weight_decay") is not None:
    t.weight_decay = float(config.pkkd.teacher_weight_decay)
  return t


# --------------------------------------------------- capturing layers --

ADDER_LAYERS = (layers.AdderConv, layers.AdderDense)
MULT_LAYERS = (nn.Conv, nn.Dense)


def layer_key(path: tuple[str, ...]) -> str:
  """'layer1_0/conv1' for the module path ('layer1_0', 'conv1')."""
  return "/".join(path)


def matches(key: str, patterns: tuple[str, ...]) -> bool:
  """Whether a layer key matches one of the fnmatch `patterns`."""
  return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def apply_with_taps(apply_fn: Callable[..., Any], variables: Any,
                    x: jax.Array, *, train: bool,
                    select: Callable[[str, nn.Module], bool],
                    mutable: Any = ("batch_stats",)
                    ) -> tuple[Any, Any, dict[str, dict[str, Any]]]:
  """`apply_fn(variables, x, train=..., mutable=...)` that also returns, for
  every layer call that `select(key, module)` accepts, its input, filters,
  output, strides and padding.

  A Flax method interceptor records them while the model runs, so the
  models need no feature outputs. Returns `(output, updates, taps)` with
  `taps[key] = {"input", "kernel", "output", "strides", "padding",
  "module"}`.
  """
  taps: dict[str, dict[str, Any]] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
      return out
    if not isinstance(module, ADDER_LAYERS + MULT_LAYERS):
      return out
    key = layer_key(tuple(module.path))
    if not select(key, module):
      return out
    params = module.variables.get("params", {})
    kernel = params.get(layers.ADDER_KERNEL, params.get("kernel"))
    if getattr(module, "use_bias", False):
      raise ValueError(f"PKKD cannot distil layer {key!r}: it has a bias "
                       "(the kernel distance needs the bias-free output)")
    strides = getattr(module, "strides", None)
    taps[key] = {"input": args[0], "kernel": kernel, "output": out,
                 "strides": strides, "padding": getattr(module, "padding",
                                                        None),
                 "module": type(module).__name__}
    return out

  with nn.intercept_methods(interceptor):
    out, updates = apply_fn(variables, x, train=train, mutable=list(mutable))
  return out, updates, taps


def _conv_geometry(tap: Mapping[str, Any]) -> tuple[tuple[int, int], Any]:
  """strides and lax padding of a captured `nn.Conv` call."""
  strides = tap["strides"]
  if strides is None:
    strides = 1
  if isinstance(strides, int):
    strides = (strides, strides)
  padding = tap["padding"]
  if isinstance(padding, str):
    return tuple(strides), padding
  padding = flax.linen.linear.canonicalize_padding(padding, 2)
  return tuple(strides), padding


def student_distances(taps: Mapping[str, Mapping[str, Any]]
                      ) -> dict[str, jax.Array]:
  """L1 distances of the student's adder layers: minus their outputs."""
  return {k: -_float(t["output"]) for k, t in taps.items()}


def teacher_distances(taps: Mapping[str, Mapping[str, Any]]
                      ) -> dict[str, jax.Array]:
  """Squared L2 distances of the teacher's layers (`squared_l2_distance`)."""
  out = {}
  for key, tap in taps.items():
    if tap["kernel"].ndim == 4:
      strides, padding = _conv_geometry(tap)
      out[key] = squared_l2_distance(tap["input"], tap["kernel"],
                                     tap["output"], strides=strides,
                                     padding=padding)
    else:
      out[key] = squared_l2_distance(tap["input"], tap["kernel"],
                                     tap["output"])
  return out


def distilled_layers(apply_fn: Callable[..., Any], variables: Any,
                     x: jax.Array, patterns: tuple[str, ...]
                     ) -> dict[str, int]:
  """{layer key: output channels} of the student's adder layers that match
  `patterns` (abstractly evaluated; ValueError if none does)."""
  found: dict[str, int] = {}
  every: list[str] = []

  def run(v, inputs):
    _, _, taps = apply_with_taps(
        apply_fn, v, inputs, train=False, mutable=(),
        select=lambda key, m: isinstance(m, ADDER_LAYERS))
    return {k: t["output"] for k, t in taps.items()}

  outputs = jax.eval_shape(run, variables, x)
  for key, shape in outputs.items():
    every.append(key)
    if matches(key, patterns):
      found[key] = int(shape.shape[-1])
  if not found:
    raise ValueError(f"config.pkkd.layers={','.join(patterns)!r} matches no "
                     f"adder layer of the model; its adder layers are "
                     f"{every}")
  # One pattern that matches nothing (a typo, a BatchNorm's name) among
  # others that do was silently ignored.
  idle = [p for p in patterns if not any(matches(k, (p,)) for k in every)]
  if idle:
    raise ValueError(f"config.pkkd.layers: pattern(s) {idle} match no adder "
                     f"layer of the model; its adder layers are {every}")
  return found


def identity_transforms(channels: Mapping[str, int]) -> dict[str, Any]:
  """The linear transformations' parameters, identity at the start, nested
  like the model's parameters: {'layer1_0': {'conv1': {'kernel': I}}}."""
  flat = {tuple(k.split("/")) + ("kernel",): jnp.eye(c, dtype=jnp.float32)
          for k, c in channels.items()}
  return flax.traverse_util.unflatten_dict(flat)


# ------------------------------------------------- state and the step --


class DistillTrainState(train_state.TrainState):
  """The training state of a PKKD run: the student (the adder network) in
  the usual fields, so evaluation, `restore_variables` and `eval.py` read it
  as any other checkpoint, plus the teacher.

  Attributes (beyond `step`, `params`, `opt_state`, `apply_fn`, `tx`):
    batch_stats: the student's BatchNorm statistics.
    rng: raw uint32[2] augmentation key (as `train_lib.TrainState`).
    teacher_params: {"model": the CNN's parameters, "transform": the linear
      transformations of the distilled layers}.
    teacher_batch_stats: the CNN's BatchNorm statistics.
    teacher_opt_state: state of `teacher_tx`.
    teacher_apply_fn, teacher_tx: the CNN's apply and plain SGD (static).
  """
  batch_stats: Any = None
  rng: jax.Array | None = None
  teacher_params: Any = None
  teacher_batch_stats: Any = None
  teacher_opt_state: Any = None
  teacher_apply_fn: Callable[..., Any] = struct.field(pytree_node=False,
                                                      default=None)
  teacher_tx: optax.GradientTransformation = struct.field(pytree_node=False,
                                                          default=None)


def make_pkkd_core(settings: PKKDSettings, axis_name: str | None
                   ) -> Callable[..., tuple[DistillTrainState,
                                            dict[str, jax.Array]]]:
  """The per-device PKKD step `core(state, images, labels) -> (state,
  metrics)`, run inside `shard_map` over `axis_name` (None: one device, no
  collectives).

  One forward of each network on the same augmented batch; one gradient of
  `student loss + teacher cross-entropy` w.r.t. (student, teacher) — the
  teacher's outputs and kernel maps are `stop_gradient`-ed in the student's
  loss, so the CNN learns only from the labels while the linear
  transformations learn from the feature loss; gradients averaged over the
  axis; the student steps with its optimizer (adaptive learning rate), the
  teacher and the transformations with plain SGD. Metrics: `loss` and
  `top1` are the student's cross-entropy and accuracy (as in plain
  training); `distill_loss` (the student's total), `kd_loss`,
  `feature_loss`, `teacher_loss`, `teacher_top1`.
  """
  patterns = settings.layers

  def pmean(tree):
    return tree if axis_name is None else lax.pmean(tree, axis_name)

  def core(state: DistillTrainState, images: jax.Array, labels: jax.Array):
    ramp = distill_ramp(state.step, settings.warmup_steps)

    def loss_fn(params, teacher_params):
      logits, updates, s_taps = apply_with_taps(
          state.apply_fn, {"params": params,
                           "batch_stats": state.batch_stats}, images,
          train=True, select=lambda key, m: isinstance(m, ADDER_LAYERS)
          and matches(key, patterns))
      keys = frozenset(s_taps)
      t_logits, t_updates, t_taps = apply_with_taps(
          state.teacher_apply_fn,
          {"params": teacher_params["model"],
           "batch_stats": state.teacher_batch_stats}, images, train=True,
          select=lambda key, m: isinstance(m, MULT_LAYERS) and key in keys)
      if set(t_taps) != set(s_taps):
        raise ValueError(f"the teacher's layers {sorted(t_taps)} do not "
                         f"match the student's {sorted(s_taps)}")
      g = {k: kernel_map(d, settings.sigma_scale, axis_name)
           for k, d in student_distances(s_taps).items()}
      transforms = flax.traverse_util.flatten_dict(
          teacher_params["transform"], sep="/")
      h = {k: linear_transform(
          lax.stop_gradient(kernel_map(d, settings.sigma_scale, axis_name)),
          transforms[f"{k}/kernel"])
           for k, d in teacher_distances(t_taps).items()}
      student_total, parts = pkkd_student_loss(
          logits, lax.stop_gradient(t_logits), labels, g, h,
          ce_weight=settings.ce_weight, kd_weight=settings.kd_weight,
          feature_weight=settings.feature_weight,
          temperature=settings.temperature, ramp=ramp)
      teacher_ce = cross_entropy(t_logits, labels)
      aux = (logits, t_logits, updates, t_updates, parts, student_total,
             teacher_ce)
      return student_total + teacher_ce, aux

    (_, aux), (grads, t_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True)(state.params,
                                               state.teacher_params)
    logits, t_logits, updates, t_updates, parts, student_total, t_ce = aux
    grads, t_grads = pmean((grads, t_grads))
    accuracy = lambda z: jnp.mean((jnp.argmax(z, -1) == labels).astype(
        jnp.float32))
    metrics = pmean({
        "loss": parts["ce"], "top1": accuracy(logits),
        "distill_loss": student_total, "kd_loss": parts["kd"],
        "feature_loss": parts["feature"], "teacher_loss": t_ce,
        "teacher_top1": accuracy(t_logits)})
    t_updates_opt, t_opt_state = state.teacher_tx.update(
        t_grads, state.teacher_opt_state, state.teacher_params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates["batch_stats"],
        teacher_params=optax.apply_updates(state.teacher_params,
                                           t_updates_opt),
        teacher_opt_state=t_opt_state,
        teacher_batch_stats=t_updates["batch_stats"])
    return new_state, metrics

  return core
