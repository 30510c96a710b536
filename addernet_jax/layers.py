"""Adder layers for Flax Linen and NNX.

Every adder filter is stored under the parameter name `ADDER_KERNEL`
("adder_kernel"), so optimisers can select adder filters by parameter path
(`addernet_jax.optim.adder_mask`) whatever the module is called.

Every layer takes `gradient` ("official" or "exact", see `ops.adder_conv`):
which backward the layer's autodiff follows; the forward is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from addernet_jax import ops

ADDER_KERNEL = "adder_kernel"
Dtype = Any


def _pair(value: int | Sequence[int], name: str = "kernel_size",
          layer: str = "AdderConv") -> tuple[int, int]:
  """`value` (an int or a pair of ints, NumPy ints included) as a pair."""
  return ops.positive_int_pair(value, name, layer)


def _padding(padding: Any, layer: str) -> Any:
  """A layer's `padding` in the form `ops.adder_conv` takes.

  As `flax.linen.Conv`: "SAME" or "VALID", an int (the same on every side),
  or one entry per spatial dimension, each an int (the same on both sides)
  or a `(low, high)` pair; so `1`, `(1, 2)` and `((1, 1), (2, 2))` all work.
  Anything else is a ValueError naming `layer`.
  """
  if isinstance(padding, str) and padding.upper() in ("SAME", "VALID"):
    return padding
  if isinstance(padding, (np.ndarray, jax.Array)):
    padding = padding.tolist()  # e.g. np.array([[1, 1], [1, 1]])
  pads = None
  if not isinstance(padding, str):
    if ops.as_int(padding) is not None:
      pads = ((padding, padding), (padding, padding))
    elif isinstance(padding, Sequence) and len(padding) == 2:
      pads = tuple((p, p) if ops.as_int(p) is not None else p
                   for p in padding)
  ok = pads is not None and all(
      isinstance(pair, Sequence) and len(pair) == 2 and
      all(ops.as_int(p) is not None and ops.as_int(p) >= 0 for p in pair)
      for pair in pads)
  if not ok:
    raise ValueError(
        f"{layer}: padding must be 'SAME', 'VALID', a non-negative int, or "
        f"one entry per spatial dimension (an int or a (low, high) pair), "
        f"got {padding!r}")
  return tuple(tuple(int(ops.as_int(p)) for p in pair) for pair in pads)


def _check_features(value: Any, name: str, layer: str) -> int:
  """`value` if it is a positive int (NumPy ints too); ValueError else."""
  number = ops.as_int(value)
  if number is None or number < 1:
    raise ValueError(f"{layer}: {name} must be a positive int, got {value!r}")
  return number


def _check_channels(x: jax.Array, expected: int, layer: str, what: str,
                    rank: int | None = None) -> None:
  """ValueError naming the layer if `x`'s last axis is not `expected`."""
  if rank is not None and x.ndim != rank:
    raise ValueError(f"{layer}: input must be NHWC (rank {rank}), got shape "
                     f"{tuple(x.shape)}")
  if x.ndim < 2 and rank is None:
    raise ValueError(f"{layer}: input must have a batch and a feature axis, "
                     f"got shape {tuple(x.shape)}")
  if x.shape[-1] != expected:
    hint = ("; if x is NCHW, transpose it to NHWC with x.transpose(0, 2, 3, "
            "1)" if rank == 4 and x.shape[1] == expected else "")
    raise ValueError(f"{layer}: input has {x.shape[-1]} {what} (last axis, "
                     f"shape {tuple(x.shape)}) but the layer expects "
                     f"{expected} (in_features){hint}")


def _dense_as_conv(x: jax.Array, kernel: jax.Array,
                   implementation: str | None,
                   gradient: str = "official",
                   layer: str = "AdderDense") -> jax.Array:
  """A 1x1 adder on a 1x1 map: y[n, o] = -sum_c |x[n, c] - kernel[c, o]|."""
  _check_channels(x, kernel.shape[0], layer, "features")
  batch_shape = x.shape[:-1]
  x2 = x.reshape((-1, 1, 1, x.shape[-1]))
  y = ops.adder_conv(x2, kernel[None, None], padding="VALID",
                     implementation=implementation, gradient=gradient)
  return y.reshape(batch_shape + (kernel.shape[-1],))


class AdderConv(nn.Module):
  """2-D adder convolution (NHWC in, NHWC out), Linen.

  Attributes:
    features: number of output channels.
    kernel_size: filter height and width.
    strides: an int or a pair.
    padding: "SAME", "VALID", an int (symmetric, as PyTorch's `padding=`),
      one int per spatial dimension `(ph, pw)` (as `flax.linen.Conv`) or
      `((top, bottom), (left, right))`. The default is Flax's "SAME", which
      pads asymmetrically at stride 2 (e.g. (0, 1) for 3x3 on an even
      size); porting the official `adder2d(..., stride, padding=p)` (its
      default p is 0), give `padding=p`.
    use_bias: add a learned bias (the official models have none).
    bias_init: U(0, 1), the official `adder2d`'s (with `bias=True`).
    dtype: computation dtype (None: from the inputs); accumulation is float32.
    param_dtype: dtype of the filters.
    kernel_init: filter initialiser; N(0, 1) as in the official release.
    implementation: None, "xla" or "pallas" (see `ops.adder_conv`).
    gradient: "official" (the AdderNet backward) or "exact" (the true
      derivative of the forward; for attacks), see `ops.adder_conv`.
  """
  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=1.0)
  bias_init: Any = nn.initializers.uniform(scale=1.0)
  implementation: str | None = None
  gradient: str = "official"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4:
      raise ValueError(f"AdderConv: input must be NHWC (rank 4), got shape "
                       f"{tuple(x.shape)}")
    kh, kw = _pair(self.kernel_size)
    strides = _pair(self.strides, "strides")
    features = _check_features(self.features, "features", "AdderConv")
    kernel = self.param(ADDER_KERNEL, self.kernel_init,
                        (kh, kw, x.shape[-1], features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = ops.adder_conv(x.astype(dtype), kernel.astype(dtype),
                       strides=strides,
                       padding=_padding(self.padding, "AdderConv"),
                       implementation=self.implementation,
                       gradient=self.gradient)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class AdderDense(nn.Module):
  """Fully connected adder layer: y[..., o] = -sum_c |x[..., c] - w[c, o]|."""
  features: int
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.normal(stddev=1.0)
  bias_init: Any = nn.initializers.zeros
  implementation: str | None = None
  gradient: str = "official"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = _check_features(self.features, "features", "AdderDense")
    if x.ndim < 2:
      raise ValueError(f"AdderDense: input must have a batch and a feature "
                       f"axis, got shape {tuple(x.shape)}")
    kernel = self.param(ADDER_KERNEL, self.kernel_init,
                        (x.shape[-1], features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = _dense_as_conv(x.astype(dtype), kernel.astype(dtype),
                       self.implementation, self.gradient)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class AdderConvNNX(nnx.Module):
  """NNX twin of `AdderConv`: `AdderConvNNX(in_features, out_features, ...,
  rngs=nnx.Rngs(0))`. The filter lives in `self.adder_kernel`."""

  def __init__(self, in_features: int, out_features: int,
               kernel_size: int | Sequence[int] = 3, *,
               strides: int | Sequence[int] = 1, padding: Any = "SAME",
               use_bias: bool = False, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32,
               kernel_init: Any = nnx.initializers.normal(stddev=1.0),
               implementation: str | None = None,
               gradient: str = "official", rngs: nnx.Rngs):
    kh, kw = _pair(kernel_size, layer="AdderConvNNX")
    in_features = _check_features(in_features, "in_features", "AdderConvNNX")
    out_features = _check_features(out_features, "out_features",
                                   "AdderConvNNX")
    self.adder_kernel = nnx.Param(kernel_init(
        rngs.params(), (kh, kw, in_features, out_features), param_dtype))
    # U(0, 1), as the official adder2d's bias.
    self.bias = (nnx.Param(jax.random.uniform(
        rngs.params(), (out_features,), param_dtype)) if use_bias else None)
    self.strides = _pair(strides, "strides", "AdderConvNNX")
    ops.check_options(implementation, gradient, "AdderConvNNX")
    self.padding = _padding(padding, "AdderConvNNX")
    self.dtype = dtype
    self.implementation = implementation
    self.gradient = gradient

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.adder_kernel[...]
    _check_channels(x, kernel.shape[2], "AdderConvNNX", "channels", rank=4)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = ops.adder_conv(x.astype(dtype), kernel.astype(dtype),
                       strides=self.strides, padding=self.padding,
                       implementation=self.implementation,
                       gradient=self.gradient)
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class AdderDenseNNX(nnx.Module):
  """NNX twin of `AdderDense`."""

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = False, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32,
               kernel_init: Any = nnx.initializers.normal(stddev=1.0),
               implementation: str | None = None,
               gradient: str = "official", rngs: nnx.Rngs):
    in_features = _check_features(in_features, "in_features", "AdderDenseNNX")
    ops.check_options(implementation, gradient, "AdderDenseNNX")
    out_features = _check_features(out_features, "out_features",
                                   "AdderDenseNNX")
    self.adder_kernel = nnx.Param(kernel_init(
        rngs.params(), (in_features, out_features), param_dtype))
    self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype))
                 if use_bias else None)
    self.dtype = dtype
    self.implementation = implementation
    self.gradient = gradient

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.adder_kernel[...]
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = _dense_as_conv(x.astype(dtype), kernel.astype(dtype),
                       self.implementation, self.gradient, "AdderDenseNNX")
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y
