"""Super-resolution networks of AdderSR (Song et al., CVPR 2021): EDSR and VDSR.

AdderSR ("AdderSR: Towards Energy Efficient Image Super-Resolution",
arXiv 2009.08891) replaces the inner convolutions of SR networks with adder
layers and adds two fixes, both here:

* the self-shortcut (paper eq. 7): an adder layer whose input and output
  have the same width outputs `x + A(x)`, so that the identity mapping,
  which a bare adder layer cannot express (its output is a negative L1
  distance), is the case `A(x) = 0`;
* the learnable power activation (paper eq. 11): `sign(y) * |y|^alpha` with a
  learnable exponent `alpha`, which sharpens (alpha > 1) or flattens
  (alpha < 1) the feature distribution and so restores some of the
  high-pass behaviour adder filters lack.

One adder unit (`AdderUnit`) is `P_alpha(x + BN(A(x)))`: adder 3x3, BatchNorm
(adder outputs are large negative numbers; BatchNorm brings them to the scale
of `x`, as every AdderNet does, and makes the identity reachable exactly,
BN scale = bias = 0), the self-shortcut, the power activation. The paper does
not spell out the position of the BatchNorm nor of the power activation; the
choices are documented in docs/addersr.md.

The first and the last convolutions and the upsampler's convolutions stay
multiplication-based (they see 3 or 1 colour channels, or produce the
sub-pixel channels). With `conv="mult"` every unit is the original network's
plain convolution with bias, no BatchNorm, no self-shortcut and no power
activation: the CNN baselines of the paper (EDSR baseline, VDSR).

Images are floats in [0, 1] (NHWC). `EDSR` maps an LR image to the HR image
(`scale` times larger) with an upsampler (convolution + pixel shuffle) at the
end; `VDSR` first interpolates the LR image to the HR size (bicubic,
`jax.image.resize`) and learns the residual, as the original VDSR does with a
bicubic-interpolated input.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common

SR_SCALES = (2, 3, 4)
# Mean RGB of DIV2K in [0, 1] (EDSR's MeanShift), subtracted before the first
# convolution and added back after the last.
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """PyTorch's `PixelShuffle(r)` in NHWC: (n, h, w, c*r*r) -> (n, h*r, w*r, c).

  Output pixel (h*r + i, w*r + j) of channel c is input channel
  `c*r*r + i*r + j` at (h, w), the channel order of `torch.nn.PixelShuffle`.
  """
  n, h, w, crr = x.shape
  if crr % (r * r):
    raise ValueError(f"pixel_shuffle: {crr} channels do not divide by "
                     f"r*r = {r * r}")
  c = crr // (r * r)
  x = x.reshape(n, h, w, c, r, r)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * r, w * r, c)


class PowerActivation(nn.Module):
  """Learnable power activation, `sign(x) * |x|^alpha` (AdderSR eq. 11).

  `alpha` is one learnable scalar per layer (parameter "alpha"), initialised
  to `alpha_init` (1: the identity at initialisation). Computed in float32;
  `x = 0` maps to 0 with finite gradients (the `|x|^alpha` branch is masked
  there, so d/dalpha stays finite instead of `0 * log 0`).
  """
  alpha_init: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init),
                       (), jnp.float32)
    x32 = x.astype(jnp.float32)
    mag = jnp.abs(x32)
    nonzero = mag > 0
    safe = jnp.where(nonzero, mag, 1.0)
    y = jnp.where(nonzero, jnp.sign(x32) * jnp.power(safe, alpha), 0.0)
    return y.astype(x.dtype)


class AdderUnit(nn.Module):
  """One inner 3x3 layer of an SR network.

  `conv="adder"` (`adder=True`): `P_alpha(x + BN(A(x)))`, each part switchable
  (`self_shortcut`, `power_activation`) for ablations; the shortcut needs
  `features == x.shape[-1]`. `identity_init` (with the self-shortcut):
  BatchNorm's scale starts at 0, so that with alpha = 1 the unit starts as
  the identity (docs/addersr.md, choice 15). `adder=False`: the CNN
  baseline's convolution with bias, nothing else.
  """
  features: int
  conv: common.ModuleDef
  adder: bool
  self_shortcut: bool = True
  power_activation: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    pad = common.pad_same_as_torch(3)
    if not self.adder:
      return self.conv(self.features, (3, 3), padding=pad, name="conv")(x)
    y = self.conv(self.features, (3, 3), padding=pad, name="conv")(x)
    scale_init = (nn.initializers.zeros
                  if self.identity_init and self.self_shortcut
                  else nn.initializers.ones)
    y = common.batch_norm(train, dtype=self.dtype, axis_name=self.bn_axis_name,
                          name="bn", scale_init=scale_init)(y)
    if self.self_shortcut:
      if x.shape[-1] != self.features:
        raise ValueError(f"self-shortcut needs equal input and output widths, "
                         f"got {x.shape[-1]} -> {self.features}")
      y = y + x
    if self.power_activation:
      y = PowerActivation(name="power")(y)
    return y


def _mult_conv(features: int, kernel: int, dtype: Any, name: str) -> nn.Conv:
  """A multiplication convolution with bias, as the first, last and
  upsampling layers of EDSR and VDSR: PyTorch's default kernel init, biases
  at zero. EDSR-PyTorch draws biases from U(+-1/sqrt(fan_in)) on images in
  0-255, where they are at most a third of a grey level; on our [0, 1]
  images the same draw would be 255 times larger relative to the signal
  (docs/addersr.md, choice 15)."""
  return nn.Conv(features, (kernel, kernel),
                 padding=common.pad_same_as_torch(kernel), use_bias=True,
                 dtype=dtype, kernel_init=common.torch_default_init,
                 name=name)


class Upsampler(nn.Module):
  """EDSR's upsampler: (mult conv3x3 to r*r times the width, pixel shuffle r)
  once for x3, log2(scale) times with r = 2 for x2 and x4."""
  scale: int
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.scale == 3:
      steps = [3]
    elif self.scale >= 2 and self.scale & (self.scale - 1) == 0:
      steps = [2] * int(math.log2(self.scale))
    else:
      raise ValueError(f"scale must be a power of 2 or 3, got {self.scale}")
    for i, r in enumerate(steps):
      x = _mult_conv(r * r * self.features, 3, self.dtype, f"conv{i}")(x)
      x = pixel_shuffle(x, r)
    return x


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_sr_args(scale: int, colors: int, **sizes: int) -> None:
  """ValueError naming a bad scale, colors or size (num_blocks, ...)."""
  if not _is_int(scale) or scale not in SR_SCALES:
    raise ValueError(f"scale must be one of {SR_SCALES}, got {scale!r}")
  if not _is_int(colors) or colors not in (1, 3):
    raise ValueError(f"colors must be 1 (Y channel) or 3 (RGB), got "
                     f"{colors!r}")
  for name, value in sizes.items():
    if not _is_int(value) or value < (0 if name == "num_blocks" else 1):
      raise ValueError(f"{name} must be an int >= "
                       f"{0 if name == 'num_blocks' else 1}, got {value!r}")


def _check_sr_input(x: jax.Array, model: str, colors: int) -> None:
  """Trace-time check: NHWC images with the model's `colors` channels (the
  mean subtraction and the residual broadcast other channel counts into
  wrong outputs instead of failing)."""
  shape = tuple(getattr(x, "shape", ()))
  if len(shape) != 4:
    raise ValueError(f"{model}: input must be a batch of NHWC images (rank "
                     f"4), got shape {shape}")
  if shape[3] != colors:
    hint = ("; it looks like NCHW: transpose it to NHWC with "
            "x.transpose(0, 2, 3, 1)" if shape[1] == colors else "")
    raise ValueError(f"{model}: input has {shape[3]} channels (last axis of "
                     f"an NHWC batch) but the model has colors={colors}, got "
                     f"shape {shape}{hint}")


class EDSR(nn.Module):
  """EDSR (Lim et al., 2017); the baseline size is 16 blocks of 64 channels.

  sub-mean -> conv3x3 (mult) -> `num_blocks` residual blocks
  [unit -> ReLU -> unit, times `res_scale`, + input] -> unit, + the head's
  output -> upsampler (mult) -> conv3x3 (mult) -> add-mean. A unit is an
  `AdderUnit` (adder: self-shortcut, BatchNorm, power activation; mult: a
  convolution with bias). With adder units, `identity_init` and the
  self-shortcut, each block's branch is also multiplied by a learnt scalar
  `block{b}_gate` that starts at 0, so that the untrained body is the
  identity (each unit alone starts as the identity, which would make the
  branch relu(h) and double the positive features in every block).
  """
  scale: int
  conv: common.ModuleDef
  adder: bool
  num_blocks: int = 16
  features: int = 64
  colors: int = 3
  res_scale: float = 1.0
  self_shortcut: bool = True
  power_activation: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_sr_args(self.scale, self.colors, num_blocks=self.num_blocks,
                   features=self.features)
    _check_sr_input(x, "EDSR", self.colors)
    unit = lambda name: AdderUnit(
        self.features, self.conv, self.adder, self.self_shortcut,
        self.power_activation, self.dtype, self.bn_axis_name,
        self.identity_init, name=name)
    mean = jnp.asarray(DIV2K_RGB_MEAN if self.colors == 3 else (0.5,),
                       jnp.float32)
    x = x.astype(jnp.float32) - mean
    head = _mult_conv(self.features, 3, self.dtype, "head")(x)
    h = head
    for b in range(self.num_blocks):
      y = nn.relu(unit(f"block{b}_unit1")(h, train))
      y = unit(f"block{b}_unit2")(y, train)
      if self.adder and self.identity_init and self.self_shortcut:
        # Two identity units make the branch relu(h), not 0: a learnt gate
        # from 0 starts every block as the identity (docs/addersr.md, 15).
        y = y * self.param(f"block{b}_gate", nn.initializers.zeros, ())
      h = h + self.res_scale * y
    h = unit("body_end")(h, train) + head
    h = Upsampler(self.scale, self.features, self.dtype, name="upsampler")(h)
    out = _mult_conv(self.colors, 3, self.dtype, "tail")(h)
    return out.astype(jnp.float32) + mean


class VDSR(nn.Module):
  """VDSR (Kim et al., 2016): 20 layers of 3x3, 64 channels, global residual.

  bicubic x`scale` (`jax.image.resize`) -> conv (mult) + ReLU -> `depth - 2`
  units each followed by ReLU -> conv (mult), + the interpolated input. The
  original works on the Y channel (`colors=1`).
  """
  scale: int
  conv: common.ModuleDef
  adder: bool
  depth: int = 20
  features: int = 64
  colors: int = 1
  self_shortcut: bool = True
  power_activation: bool = True
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  identity_init: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_sr_args(self.scale, self.colors, depth=self.depth,
                   features=self.features)
    if self.depth < 3:
      raise ValueError(f"VDSR depth must be >= 3, got {self.depth}")
    _check_sr_input(x, "VDSR", self.colors)
    n, h, w, c = x.shape
    up = bicubic_resize(x.astype(jnp.float32), (h * self.scale, w * self.scale))
    y = nn.relu(_mult_conv(self.features, 3, self.dtype, "head")(up))
    for i in range(self.depth - 2):
      y = nn.relu(AdderUnit(self.features, self.conv, self.adder,
                            self.self_shortcut, self.power_activation,
                            self.dtype, self.bn_axis_name, self.identity_init,
                            name=f"unit{i}")(y, train))
    y = _mult_conv(self.colors, 3, self.dtype, "tail")(y)
    return y.astype(jnp.float32) + up


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC bicubic resize to `size` = (height, width) with
  `jax.image.resize(method="bicubic")` (Keys' kernel, a = -0.5, as MATLAB's
  imresize and PIL; antialiased when shrinking; edge weights renormalised
  instead of MATLAB's symmetric padding)."""
  n, _, _, c = x.shape
  return jax.image.resize(x, (n, size[0], size[1], c), method="bicubic",
                          antialias=True)
