"""XLA-side layout helpers shared by the kernels (no Pallas here).

They turn the padded NHWC input into the flat, block-friendly layouts the
kernels read, and back. None of them builds the `(cout, k, n*h*w)` tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def cdiv(a: int, b: int) -> int:
  """Ceiling division of non-negative ints."""
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  """Smallest multiple of `b` that is >= `a`."""
  return cdiv(a, b) * b


def next_pow2(a: int) -> int:
  """Smallest power of two >= `a` (and >= 1)."""
  return 1 << max(0, int(a) - 1).bit_length()


def is_pow2(a: int) -> bool:
  return a >= 1 and (a & (a - 1)) == 0


def output_hw(xp_shape, w_shape, strides) -> tuple[int, int]:
  """Output height and width of a VALID window over the padded input."""
  return ((xp_shape[1] - w_shape[0]) // strides[0] + 1,
          (xp_shape[2] - w_shape[1]) // strides[1] + 1)


def varying_axes(*arrays: jax.Array) -> frozenset:
  """The `shard_map` mesh axes along which any of `arrays` varies (empty
  outside one, and inside one with `check_vma=False`)."""
  axes = frozenset()
  for x in arrays:
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
    axes |= (frozenset(manual.varying) if manual is not None
             else frozenset(getattr(aval, "vma", frozenset())))
  return axes


def out_struct(shape, dtype, *operands: jax.Array) -> jax.ShapeDtypeStruct:
  """A kernel's `out_shape`: varying along the mesh axes its operands vary
  along, as `shard_map(check_vma=True)` requires of a `pallas_call`."""
  axes = varying_axes(*operands)
  if not axes:
    return jax.ShapeDtypeStruct(shape, dtype)
  if hasattr(jax.sharding, "ManualAxisType"):  # JAX >= 0.10
    return jax.ShapeDtypeStruct(
        shape, dtype,
        manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
  return jax.ShapeDtypeStruct(shape, dtype, vma=axes)


def check_shapes(name: str, xp_shape, w_shape, strides, g_shape=None) -> None:
  """Raises ValueError naming the offending values if shapes do not fit."""
  if len(xp_shape) != 4 or len(w_shape) != 4:
    raise ValueError(f"{name}: expected xp NHWC and w HWIO (rank 4), got xp "
                     f"{tuple(xp_shape)} and w {tuple(w_shape)}")
  if len(strides) != 2 or any(int(s) < 1 for s in strides):
    raise ValueError(f"{name}: strides must be two positive ints, got "
                     f"{tuple(strides)}")
  if xp_shape[3] != w_shape[2]:
    raise ValueError(f"{name}: input channels differ: xp {tuple(xp_shape)} has "
                     f"{xp_shape[3]}, w {tuple(w_shape)} expects {w_shape[2]}")
  if min(xp_shape) < 1 or min(w_shape) < 1:
    raise ValueError(f"{name}: empty operand: xp {tuple(xp_shape)}, w "
                     f"{tuple(w_shape)}")
  if xp_shape[1] < w_shape[0] or xp_shape[2] < w_shape[1]:
    raise ValueError(f"{name}: filters {tuple(w_shape[:2])} larger than the "
                     f"padded input {tuple(xp_shape[1:3])}")
  if g_shape is not None:
    ho, wo = output_hw(xp_shape, w_shape, strides)
    want = (xp_shape[0], ho, wo, w_shape[3])
    if tuple(g_shape) != want:
      raise ValueError(f"{name}: output gradient has shape {tuple(g_shape)}, "
                       f"expected {want} for xp {tuple(xp_shape)}, w "
                       f"{tuple(w_shape)}, strides {tuple(strides)}")


def phase_split(xp: jax.Array, strides, kh: int, kw: int
                ) -> tuple[jax.Array, int, list[tuple[int, int]]]:
  """Space-to-depth by the strides, flattened per image.

  Returns `xs [n, sh*sw, hq*wq, c]`, the row pitch `wq`, and for each filter tap
  `t = i*kw + j` the pair `(phase, offset)` such that the input seen by tap t
  at output position `f = p*wq + q` is `xs[:, phase, f + offset]`. With stride
  1 this is a free reshape; output columns `q >= wo` are garbage to crop.
  """
  n, hp, wp, c = xp.shape
  sh, sw = strides
  hq, wq = cdiv(hp, sh), cdiv(wp, sw)
  if (hq * sh, wq * sw) != (hp, wp):
    xp = jnp.pad(xp, ((0, 0), (0, hq * sh - hp), (0, wq * sw - wp), (0, 0)))
  if sh == sw == 1:
    xs = xp.reshape(n, 1, hq * wq, c)
  else:
    xs = xp.reshape(n, hq, sh, wq, sw, c).transpose(0, 2, 4, 1, 3, 5)
    xs = xs.reshape(n, sh * sw, hq * wq, c)
  taps = [((i % sh) * sw + (j % sw), (i // sh) * wq + (j // sw))
          for i in range(kh) for j in range(kw)]
  return xs, wq, taps


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` at the end of `axis` to `size` (no-op when already there)."""
  if x.shape[axis] >= size:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pads)


def patches_t(xp: jax.Array, kh: int, kw: int, strides,
              out_hw: tuple[int, int]) -> jax.Array:
  """Transposed patches `[kh*kw*c, n*ho*wo]`, rows ordered (tap, channel)."""
  n, _, _, c = xp.shape
  (sh, sw), (ho, wo) = strides, out_hw
  views = []
  for i in range(kh):
    for j in range(kw):
      v = lax.slice(xp, (0, i, j, 0),
                    (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1))
      views.append(jnp.transpose(v, (3, 0, 1, 2)).reshape(c, n * ho * wo))
  return jnp.concatenate(views, axis=0)


def fold_patches_t(dp: jax.Array, xp_shape, kh: int, kw: int, strides,
                   out_hw: tuple[int, int]) -> jax.Array:
  """Inverse of `patches_t` for gradients: sums each tap's rows back into
  `[n, hp, wp, c]` with `lax.pad` (interior padding for strides), no scatter."""
  n, hp, wp, c = xp_shape
  (sh, sw), (ho, wo) = strides, out_hw
  out = jnp.zeros((n, hp, wp, c), jnp.float32)
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    d_view = dp[t * c:(t + 1) * c].reshape(c, n, ho, wo).transpose(1, 2, 3, 0)
    out = out + lax.pad(
        d_view, jnp.float32(0),
        ((0, 0, 0),
         (i, hp - i - (sh * (ho - 1) + 1), sh - 1),
         (j, wp - j - (sw * (wo - 1) + 1), sw - 1),
         (0, 0, 0)))
  return out


def exact_sum(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`sum(a, axis=0)` of a float32 array as an unevaluated pair `hi + lo`.

  A pairwise sum whose rounding errors are recovered exactly at every level
  (Knuth's TwoSum) and carried separately: `hi` is the float32 sum rounded
  once, `lo` what that rounding dropped. For the per-channel totals of the
  forward's offsets, which must carry neither the sequential rounding error of
  a sum in the thousands nor, once added to every output, their own final
  rounding (a constant per channel, which averaging over the pixels does not
  remove). Only for small arrays (filter-sized).
  """
  s = a.astype(jnp.float32)
  err = jnp.zeros(s.shape[1:], jnp.float32)
  while s.shape[0] > 1:
    if s.shape[0] % 2:
      s = jnp.concatenate([s, jnp.zeros((1,) + s.shape[1:], s.dtype)])
    x, y = s[0::2], s[1::2]
    t = x + y
    z = t - x
    err = err + jnp.sum((x - (t - z)) + (y - z), axis=0)
    s = t
  hi = s[0] + err
  return hi, err - (hi - s[0])


def block_offsets(w_blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Offsets of the forward's block partials (the accumulation of
  `addernet_jax.reference.forward` and of every forward kernel).

  Each block of (tap, channel) terms is summed into a fresh partial and the
  accumulator receives `partial - m[block]` with `m[block, o] = sum |w|` over
  the block: `|x - w| - |w|` is at most `|x|`, so the accumulator stays at the
  scale of the inputs, not of the outputs (in the thousands; the BatchNorm
  that follows keeps only their per-channel spread), and so do its rounding
  errors. The result is `-(hi + (acc + lo))`, with `hi + lo` the exact total
  of the offsets.

  `m` is summed sequentially over the terms, in the order the block partials
  add theirs (a first term, then the others), so that a pixel whose inputs
  are exact zeros (ReLU outputs, padding) contributes exactly 0 to the
  accumulator, not a rounding difference that is the same at every such pixel
  (a bias of up to 1e-4 on the per-channel mean when XLA reduced `m` in
  another order).

  Args:
    w_blocks: `[blocks, terms, cout]` filters in the kernel's block order
      (zero-padded; zeros add nothing).

  Returns:
    `m` `[blocks, cout]` and `(hi, lo)` `[cout]` each (`exact_sum(m)`).
  """
  a = jnp.abs(w_blocks.astype(jnp.float32))
  m = a[:, 0]
  for c in range(1, a.shape[1]):
    m = m + a[:, c]
  return m, exact_sum(m)
