"""Pure-jnp adder convolution: the reference every kernel is tested against.

All functions take the input already zero-padded (`xp`, NHWC) and filters HWIO,
and accumulate in float32. They never build the `(cout, k, n*h*w)` difference
tensor of the official release: every function loops over the `kh * kw` filter
taps and lets XLA fuse the broadcast-abs-reduce of each tap.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Strides = tuple[int, int]


def output_size(padded: int, kernel: int, stride: int) -> int:
  """Output length of a VALID window of `kernel` over `padded` with `stride`."""
  return (padded - kernel) // stride + 1


def tap_view(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int],
             strides: Strides) -> jax.Array:
  """The `[n, ho, wo, c]` slice of `xp` that filter tap `(i, j)` meets."""
  (sh, sw), (ho, wo) = strides, out_hw
  return lax.slice(
      xp, (0, i, j, 0),
      (xp.shape[0], i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, xp.shape[3]),
      (1, sh, sw, 1))


def _out_hw(xp: jax.Array, w: jax.Array, strides: Strides) -> tuple[int, int]:
  return (output_size(xp.shape[1], w.shape[0], strides[0]),
          output_size(xp.shape[2], w.shape[1], strides[1]))


def forward(xp: jax.Array, w: jax.Array, strides: Strides) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n, p*s+i, q*s+j, c] - w[i,j,c,o]| (float32)."""
  xp = xp.astype(jnp.float32)
  w = w.astype(jnp.float32)
  kh, kw, _, _ = w.shape
  out_hw = _out_hw(xp, w, strides)
  acc = None
  for i in range(kh):
    for j in range(kw):
      view = tap_view(xp, i, j, out_hw, strides)
      term = jnp.sum(jnp.abs(view[..., :, None] - w[i, j]), axis=-2)
      acc = term if acc is None else acc + term
  return -acc


def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
               strides: Strides) -> jax.Array:
  """dxp[n, p*s+i, q*s+j, c] += sum_o clip(w[i,j,c,o] - xp[...], -1, 1) g[n,p,q,o].

  Returns the gradient with respect to the padded input, float32. Each tap's
  contribution is placed with `lax.pad` (interior padding for strides), never
  with a scatter.
  """
  xp = xp.astype(jnp.float32)
  w = w.astype(jnp.float32)
  g = g.astype(jnp.float32)
  kh, kw, _, _ = w.shape
  (sh, sw) = strides
  n, hp, wp, c = xp.shape
  ho, wo = g.shape[1], g.shape[2]
  dxp = jnp.zeros((n, hp, wp, c), jnp.float32)
  for i in range(kh):
    for j in range(kw):
      view = tap_view(xp, i, j, (ho, wo), strides)
      clipped = jnp.clip(w[i, j] - view[..., :, None], -1.0, 1.0)
      d_view = jnp.sum(clipped * g[..., None, :], axis=-1)
      dxp = dxp + lax.pad(
          d_view, jnp.float32(0),
          ((0, 0, 0),
           (i, hp - i - (sh * (ho - 1) + 1), sh - 1),
           (j, wp - j - (sw * (wo - 1) + 1), sw - 1),
           (0, 0, 0)))
  return dxp


def filter_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
                strides: Strides) -> jax.Array:
  """dw[i,j,c,o] = sum_{n,p,q} (xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]) g[n,p,q,o].

  Uses the identity dw = conv_weight_grad(xp, g) - w * sum(g): the first term
  is an ordinary convolution weight gradient (BLAS / tensor cores), computed at
  full float32 precision.
  """
  xp = xp.astype(jnp.float32)
  w = w.astype(jnp.float32)
  g = g.astype(jnp.float32)

  def conv(kernel):
    return lax.conv_general_dilated(
        xp, kernel, strides, "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST)

  _, conv_vjp = jax.vjp(conv, w)
  (correlation,) = conv_vjp(g)
  return correlation - w * jnp.sum(g, axis=(0, 1, 2))
