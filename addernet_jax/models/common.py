"""Pieces shared by the model definitions: the conv/dense factories and BN."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from addernet_jax import layers, ops

ModuleDef = Any
CONV_KINDS = ("adder", "mult")
# What the models' adder layers compute in, whatever the model's dtype (see
# conv_factory).
ADDER_DTYPE = jnp.float32


def _first_sample(x: jax.Array, num_axes: int) -> jax.Array:
  """`x[0, ..., 0]` over the first `num_axes` axes. Under sharding in types
  (Explicit mesh axes) slicing one element of a sharded batch has no rule:
  that slice runs with the axes Auto (a small gather), elsewhere unchanged."""
  take = lambda a: a[(0,) * num_axes]
  layout = ops.explicit_layout(x)
  if layout is None:
    return take(x)
  mesh, spec = layout
  out = jax.sharding.NamedSharding(mesh,
                                   jax.sharding.PartitionSpec(*spec[num_axes:]))
  return jax.sharding.auto_axes(take, out_sharding=out)(x)


def check_dtype(dtype: Any) -> None:
  """ValueError unless `dtype` names a floating-point type (a typo such as
  "float31" otherwise surfaced as NumPy's TypeError at the first call)."""
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"dtype must be a floating-point type such as "
                     f"jnp.float32, jnp.bfloat16 or 'float16', got {dtype!r}")
  if jnp.dtype(dtype) == jnp.float64:
    # Without x64 JAX computes it in float32, with a warning per array; the
    # adder layers refuse float64 either way.
    raise ValueError("dtype float64 is not supported (adder layers compute in "
                     "float32, bfloat16 or float16; without jax_enable_x64 "
                     "JAX would silently compute in float32)")


def conv_factory(conv: str, *, dtype: Any = jnp.float32,
                 implementation: str | None = None) -> Callable[..., nn.Module]:
  """The layer every non-stem, non-classifier convolution of a model uses.

  `conv="adder"` gives `layers.AdderConv` (N(0, 1) filters), `conv="mult"` the
  identical multiplication layer (`nn.Conv`, PyTorch's default init). Neither
  has a bias: a BatchNorm always follows.

  Adder layers compute and return float32 whatever `dtype` is (it applies to
  the multiplication layers, BatchNorm outputs and activations): their
  outputs are in the thousands while the following BatchNorm keeps only
  their spread of a few units, below bfloat16's resolution there (4-8). The
  official ResNet-20 with all layers in bfloat16 scored 49.5% top-1 on 1,000
  CIFAR-10 test images where float32 scores 79.5%; with float32 adder layers
  79.6%.
  """
  if conv == "adder":
    ops.check_options(implementation, owner="get_model")
    return functools.partial(layers.AdderConv, use_bias=False,
                             dtype=ADDER_DTYPE, implementation=implementation)
  if conv == "mult":
    return functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                             kernel_init=torch_default_init)
  raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


def dense_factory(conv: str, *, dtype: Any = jnp.float32,
                  implementation: str | None = None) -> Callable[..., nn.Module]:
  """Fully connected twin of `conv_factory` (used by LeNet-5-BN)."""
  if conv == "adder":
    return functools.partial(layers.AdderDense, use_bias=False,
                             dtype=ADDER_DTYPE, implementation=implementation)
  if conv == "mult":
    return functools.partial(nn.Dense, use_bias=False, dtype=dtype,
                             kernel_init=torch_default_init)
  raise ValueError(f"conv must be one of {CONV_KINDS}, got {conv!r}")


# PyTorch's default conv/linear init (kaiming_uniform with a=sqrt(5)), which
# the official CNN baselines use: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform")
# `nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")`: N(0,
# 2 / fan_out), not truncated. The official ImageNet ResNet applies it to
# every `nn.Conv2d` (stem, 1x1 classifier; all layers of the CNN twin).
kaiming_normal_fan_out = nn.initializers.variance_scaling(
    2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int) -> Callable[..., jax.Array]:
  """PyTorch's default conv/linear bias init, U(-1/sqrt(fan_in),
  1/sqrt(fan_in)) (Flax's bias initialisers do not see `fan_in`)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key: jax.Array, shape: tuple[int, ...],
           dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BatchNorm(nn.Module):
  """PyTorch's `BatchNorm2d`/`BatchNorm1d` in Linen (channels last).

  Training: normalises with the biased batch variance (two passes,
  `E[(x - E[x])^2]`, as PyTorch) and updates the running variance with the
  unbiased one, `var * n / (n - 1)`, `n` the number of elements per channel
  over the whole batch: over every device when `axis_name` is set (the count
  is `lax.psum`-ed; the statistics are `lax.pmean`-ed, which assumes equal
  per-device batches, as data parallelism here has). Flax's `nn.BatchNorm`
  keeps the biased variance; on the BatchNorm over the logits (`n` = the
  batch) that changed one step's running-variance update by 7% against
  PyTorch. Evaluation: the running statistics.

  The running averages follow Flax's convention, `ra = momentum * ra + (1 -
  momentum) * batch` (PyTorch's momentum 0.1 is 0.9 here); they are not
  updated while the module is initialising. Variables as `nn.BatchNorm`:
  `scale`, `bias` (params), `mean`, `var` (batch_stats), so checkpoints and
  the converter are unchanged. Statistics in float32 (at least); `n = 1`
  leaves the running variance the biased (zero) estimate, where PyTorch
  raises.
  """
  use_running_average: bool | None = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  scale_init: Callable[..., Any] = nn.initializers.ones
  bias_init: Callable[..., Any] = nn.initializers.zeros
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array,
               use_running_average: bool | None = None) -> jax.Array:
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = (x.shape[-1],)
    axes = tuple(range(x.ndim - 1))
    ra_mean = self.variable("batch_stats", "mean",
                            lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable("batch_stats", "var",
                           lambda: jnp.ones(features, jnp.float32))
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      # As nn.BatchNorm: statistics in at least float32; no cross-device
      # reduction while initialising (the axis need not exist then).
      x32 = x.astype(jnp.promote_types(self.dtype or x.dtype, jnp.float32))
      axis_name = None if self.is_initializing() else self.axis_name
      count = int(np.prod([x.shape[a] for a in axes]))
      # The mean of values in the thousands with a spread of a few units
      # (adder outputs): summed after subtracting one sample per channel, so
      # the float32 sum runs at the spread's scale (XLA's plain reduction was
      # 2x further from float64 than PyTorch's; the shifted one matches it).
      shift = lax.stop_gradient(_first_sample(x32, len(axes)))
      mean = shift + jnp.mean(x32 - shift, axis=axes)
      if axis_name is not None:
        mean = lax.pmean(mean, axis_name)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if axis_name is None:
        correction = count / max(count - 1, 1)
      else:
        var = lax.pmean(var, axis_name)
        count = lax.psum(jnp.asarray(count, x32.dtype), axis_name)
        correction = count / jnp.maximum(count - 1, 1)
      if not self.is_initializing():
        unbiased = var * correction
        ra_mean.value = (self.momentum * ra_mean.value
                         + (1 - self.momentum) * mean)
        ra_var.value = (self.momentum * ra_var.value
                        + (1 - self.momentum) * unbiased)
    y = x - mean
    mul = lax.rsqrt(var + self.epsilon)
    args = [x]
    if self.use_scale:
      scale = self.param("scale", self.scale_init, features, self.param_dtype)
      mul = mul * scale
      args.append(scale)
    y = y * mul
    if self.use_bias:
      bias = self.param("bias", self.bias_init, features, self.param_dtype)
      y = y + bias
      args.append(bias)
    dtype = self.dtype or jnp.result_type(*args)
    return jnp.asarray(y, dtype)


def batch_norm(train: bool, *, dtype: Any, axis_name: str | None,
               name: str,
               scale_init: Callable[..., Any] = nn.initializers.ones
               ) -> BatchNorm:
  """BatchNorm with the official constants: eps 1e-5, PyTorch momentum 0.1,
  PyTorch's statistics (`BatchNorm`: two-pass variance, unbiased running
  variance).

  Two passes, E[(x - E[x])^2], as PyTorch does: adder outputs have means in
  the hundreds, and the one-pass E[x^2] - E[x]^2 loses most of its float32
  precision there (measured: 10-100x larger differences between 8-device and
  1-device training). `scale_init`: the initial scale (gamma), 1 as PyTorch.
  """
  return BatchNorm(use_running_average=not train, momentum=0.9,
                   epsilon=1e-5, dtype=dtype, axis_name=axis_name, name=name,
                   scale_init=scale_init)


def check_images(x: jax.Array, model: str, min_size: int = 1, *,
                 module: nn.Module | None = None, stem: str = "conv1") -> None:
  """Trace-time check that `x` is a batch of NHWC images of at least
  `min_size` x `min_size` pixels and, when `module` already has parameters,
  with the channels its first layer `stem` was initialised for: one clear
  error instead of a failure deep inside a layer."""
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) != 4:
    raise ValueError(f"{model}: input must be a batch of NHWC images (rank "
                     f"4), got shape {shape}")
  if shape[0] == 0:  # the reshape before the classifier cannot infer -1
    raise ValueError(f"{model}: the batch is empty, got shape {shape}")
  channels = _stem_channels(module, stem) if module is not None else None
  if channels is not None and shape[3] != channels:
    hint = ("; it looks like NCHW: transpose it to NHWC with "
            "x.transpose(0, 2, 3, 1)" if shape[1] == channels else "")
    raise ValueError(f"{model}: input has {shape[3]} channels (last axis of "
                     f"an NHWC batch) but the model's parameters are for "
                     f"{channels}, got shape {shape}{hint}")
  if shape[1] < min_size or shape[2] < min_size:
    raise ValueError(f"{model}: input images must be at least {min_size}x"
                     f"{min_size} (NHWC), got shape {shape}")


def _stem_channels(module: nn.Module, stem: str) -> int | None:
  """Input channels of `module`'s existing first-layer filters (HWIO or
  (in, out)), or None while it is being initialised."""
  if module.is_initializing() or "params" not in module.variables:
    return None
  layer = module.variables["params"].get(stem, {})
  for name in ("kernel", layers.ADDER_KERNEL):
    if name in layer:
      return int(layer[name].shape[-2])
  return None


def pad_same_as_torch(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """PyTorch's symmetric `padding=kernel // 2` (not JAX's asymmetric SAME)."""
  p = kernel // 2
  return ((p, p), (p, p))
