"""Pure-jnp adder convolution: the XLA fallback and the reference kernels are tested against.

All functions take the input already zero-padded (`xp`, NHWC) and filters HWIO,
and accumulate in float32. None of them builds the `(cout, k, n*h*w)`
difference tensor of the official release.

Formulation (measured fastest on CPU, see benchmarks/RESULTS.md): the output is
accumulated one (filter tap, channel) pair at a time, each pair an element-wise
update of the whole accumulator, e.g. for the forward

    acc[n, p, q, :] += |xp[n, p*s+i, q*s+j, c] - w[i, j, c, :]|

XLA fuses a block of `TERMS_PER_STEP` such updates (one tap, a block of
channels) into one vectorised loop over the accumulator; a `lax.fori_loop` over
(tap, channel block) keeps the program, and the compile time, small. Reducing
over channels inside each tap instead was 3-10x slower.

Accumulation (float32 fidelity; see benchmarks/RESULTS.md): adder outputs are
large (-700 to -2400 on the official ResNet-20) while what the following
BatchNorm keeps is their per-channel spread (2-12), i.e. the last bits of the
sum. Folding every term into one running accumulator loses them (measured 3-4x
further from float64 than the official float32 code). So:

- forward: each (tap, channel block) is summed into a fresh block partial, and
  the accumulator receives `partial - m_k`, where `m_k[o] = sum_c |w[c, o]|`
  over the block: `|x - w| - |w|` is at most `|x|`, so the accumulator stays
  at the scale of the inputs instead of the outputs and its rounding errors
  shrink accordingly. The total `sum_k m_k` is added back once at the end,
  summed with error-free transformations (`exact_sum`), so the result is
  rounded once at the output's scale. Same accuracy as Kahan-compensating the
  block partials (measured), without a second loop carry, which doubled the
  forward's time on the CPU (XLA materialises both carries every step).
- input gradient (signed terms, no large offset): two-level partial sums, a
  fresh block partial per (tap, output-channel block) added into a fresh
  per-tap partial, added into the accumulator once per tap.

The input gradient is computed in gather form: every padded-input position sums
the contributions of the taps that see it, read from shifted views of the
output gradient, so nothing is scattered or padded-and-added. Strided layers
are split into `sh * sw` phases of the input (positions with the same
remainder modulo the stride), each of which sees a fixed subset of the taps.
"""

from __future__ import annotations

import operator
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from addernet_jax.kernels.layout import block_offsets

Strides = tuple[int, int]

# (tap, channel) pairs fused into one loop step. On a 2-core AVX2 CPU, 16 ran
# as fast as 32-72 on ResNet-20 layers (8 was 2-5x slower) and compiles in
# about a third of the time of 72: XLA's CPU compile time grows with the
# number of fused terms, about 7 ms each.
TERMS_PER_STEP = 16


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


def _check(fn: str, xp: jax.Array, w: jax.Array, strides,
           g: jax.Array | None = None) -> Strides:
  """Trace-time shape checks shared by the three functions (a clear error
  instead of an empty result, a failure deep inside `lax`, or a silently
  wrong gradient from a cotangent of the wrong shape). Returns the strides
  as a pair (an int means the same stride on both axes)."""
  try:
    pair = ((operator.index(strides),) * 2 if not hasattr(strides, "__len__")
            else tuple(operator.index(s) for s in strides))
  except TypeError:
    pair = ()
  if len(pair) != 2 or min(pair) < 1:
    raise ValueError(f"reference.{fn}: strides must be a positive int or a "
                     f"pair of positive ints, got {strides!r}")
  strides = pair
  if xp.ndim != 4 or w.ndim != 4:
    raise ValueError(f"reference.{fn}: xp must be NHWC and w HWIO (rank 4), "
                     f"got shapes {tuple(xp.shape)} and {tuple(w.shape)}")
  if xp.shape[3] != w.shape[2] or 0 in w.shape[:3]:
    raise ValueError(f"reference.{fn}: xp {tuple(xp.shape)} (NHWC) and w "
                     f"{tuple(w.shape)} (HWIO) need the same, non-zero number "
                     f"of input channels and a non-empty window")
  if xp.shape[1] < w.shape[0] or xp.shape[2] < w.shape[1]:
    raise ValueError(f"reference.{fn}: filters {tuple(w.shape[:2])} are "
                     f"larger than the padded input {tuple(xp.shape[1:3])}")
  if g is not None:
    want = (xp.shape[0], *_out_hw(xp, w, strides), w.shape[3])
    if tuple(g.shape) != want:
      raise ValueError(f"reference.{fn}: g must have the output's shape "
                       f"{want} (NHWC) for xp {tuple(xp.shape)}, w "
                       f"{tuple(w.shape)}, strides {strides}, got "
                       f"{tuple(g.shape)}")
  return strides  # type: ignore[return-value]


def _blocks(channels: int) -> tuple[int, int]:
  """(number of blocks, block size) covering `channels` in steps of at most
  TERMS_PER_STEP, as evenly as possible (the last block may be zero-padded)."""
  num = -(-channels // TERMS_PER_STEP)
  return num, -(-channels // num)


def _pad_axis(a: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `a` along `axis` to `size`."""
  if a.shape[axis] == size:
    return a
  pads = [(0, 0)] * a.ndim
  pads[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pads)


def _fold(num_steps: int, step: Callable[[jax.Array | int, jax.Array],
                                         jax.Array], acc: jax.Array) -> jax.Array:
  """`step(k, acc)` for k in range(num_steps): a `lax.fori_loop`.

  The first step runs outside the loop, so the loop carry already has the
  step's type: inside `jax.shard_map` (check_vma=True) a zero accumulator is
  replicated while the step's output varies along the sharded axes.
  """
  acc = step(0, acc)
  if num_steps == 1:
    return acc
  return lax.fori_loop(1, num_steps, step, acc)


def forward(xp: jax.Array, w: jax.Array, strides: Strides) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n, p*s+i, q*s+j, c] - w[i,j,c,o]| (float32).

  Accumulates offset block partials (module docstring): the accumulator holds
  `sum_k (partial_k - m_k)`, the result is `-(acc + sum_k m_k)`, with the
  total as an exact pair `hi + lo`.
  """
  strides = _check("forward", xp, w, strides)
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  n = xp.shape[0]
  ho, wo = _out_hw(xp, w, strides)
  nb, cb = _blocks(cin)
  # Zero channels contribute |0 - 0| = 0 (and 0 to the offsets).
  xp = _pad_axis(xp.astype(jnp.float32), 3, nb * cb)
  w = _pad_axis(w.astype(jnp.float32), 2, nb * cb)
  offsets, (hi, lo) = block_offsets(w.reshape(kh * kw * nb, cb, cout))

  def step(k, acc):
    tap, c0 = k // nb, (k % nb) * cb
    i, j = tap // kw, tap % kw
    window = lax.dynamic_slice(
        xp, (0, i, j, c0), (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, cb))
    view = window[:, ::sh, ::sw] if (sh, sw) != (1, 1) else window
    ws = lax.dynamic_slice(w, (i, j, c0, 0), (1, 1, cb, cout))[0, 0]
    partial = jnp.abs(view[..., 0:1] - ws[0])
    for c in range(1, cb):
      partial = partial + jnp.abs(view[..., c:c + 1] - ws[c])
    return acc + (partial - lax.dynamic_index_in_dim(offsets, k, 0, False))

  init = jnp.zeros((n, ho, wo, cout), jnp.float32)
  return -(hi + (_fold(kh * kw * nb, step, init) + lo))


def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
               strides: Strides) -> jax.Array:
  """dxp[n, p*s+i, q*s+j, c] += sum_o clip(w[i,j,c,o] - xp[...], -1, 1) g[n,p,q,o].

  Returns the gradient with respect to the padded input (shape of `xp`),
  float32. Positions no filter tap reaches get zero.
  """
  strides = _check("input_grad", xp, w, strides, g)
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  n, hp, wp, _ = xp.shape
  _, ho, wo, _ = g.shape
  nb, ob = _blocks(cout)
  # Zero output-gradient channels contribute clip(...) * 0 = 0.
  w = _pad_axis(w.astype(jnp.float32), 3, nb * ob)
  g = _pad_axis(g.astype(jnp.float32), 3, nb * ob)
  # Phase (r, t) holds xp[:, r::sh, t::sw]; pad xp so every phase has hq x wq
  # positions. Tap (i, j) = (r + sh*di, t + sw*dj) meets phase position (a, b)
  # through g[:, a - di, b - dj]: g is padded so those shifted views stay in
  # range (reading zeros where no output exists).
  hq, wq = -(-hp // sh), -(-wp // sw)
  xq = jnp.pad(xp.astype(jnp.float32),
               ((0, 0), (0, hq * sh - hp), (0, wq * sw - wp), (0, 0)))
  dh, dw = (kh - 1) // sh, (kw - 1) // sw
  gp = jnp.pad(g, ((0, 0), (dh, max(0, hq - ho)), (dw, max(0, wq - wo)),
                   (0, 0)))

  def phase_grad(r: int, t: int) -> jax.Array:
    x_rt = lax.slice(xq, (0, r, t, 0), xq.shape, (1, sh, sw, 1))
    rows, cols = len(range(r, kh, sh)), len(range(t, kw, sw))

    def block(tap, b):
      """Fresh partial over output channels [b*ob, (b+1)*ob) of one tap."""
      o0 = b * ob
      di, dj = tap // cols, tap % cols
      gv = lax.dynamic_slice(gp, (0, dh - di, dw - dj, o0), (n, hq, wq, ob))
      ws = lax.dynamic_slice(w, (r + sh * di, t + sw * dj, 0, o0),
                             (1, 1, cin, ob))[0, 0]
      partial = jnp.clip(ws[:, 0] - x_rt, -1.0, 1.0) * gv[..., 0:1]
      for o in range(1, ob):
        partial = partial + jnp.clip(ws[:, o] - x_rt, -1.0, 1.0) * gv[
            ..., o:o + 1]
      return partial

    def tap_step(tap, acc):
      # Two-level partial sums: blocks into a fresh per-tap partial.
      partial = block(tap, 0)
      if nb > 1:
        partial = lax.fori_loop(1, nb, lambda b, p: p + block(tap, b),
                                partial)
      return acc + partial

    init = jnp.zeros_like(x_rt)
    return _fold(rows * cols, tap_step, init) if rows * cols else init

  if sh == sw == 1:
    return phase_grad(0, 0)
  # Interleave the phases back: [n, hq, sh, wq, sw, c] -> [n, hq*sh, wq*sw, c].
  d = jnp.stack([jnp.stack([phase_grad(r, t) for t in range(sw)], axis=3)
                 for r in range(sh)], axis=2)
  return d.reshape(n, hq * sh, wq * sw, cin)[:, :hp, :wp]


# "taps": the sum over n*ho*wo runs in blocks of this many terms, whose
# partial sums are then added; one long float32 dot over 200,000 terms (MNIST
# at batch 256) was 30x further from float64 than the official code.
TAP_CHUNK = 256


def filter_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides,
                *, method: str | None = None) -> jax.Array:
  """dw[i,j,c,o] = sum_{n,p,q} (xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]) g[n,p,q,o].

  Uses the identity dw = correlation(xp, g) - w * sum(g), where the first term
  is an ordinary convolution weight gradient, computed at full float32
  precision (`Precision.HIGHEST`: no TF32 / bf16 passes on GPU and TPU).

  Args:
    xp, w, g: padded input (NHWC), filters (HWIO), output gradient (NHWC).
    strides: `(sh, sw)`.
    method: "conv" (the VJP of `lax.conv_general_dilated`: cuDNN / TPU
      convolution units), "taps" (one `[cin, n*ho*wo] @ [n*ho*wo, cout]` matrix
      product per filter tap; on CPU as fast or faster, and 15-30x faster for
      strided 1x1 layers, whose convolution gradient XLA's CPU backend handles
      poorly) or None: "taps" on CPU, "conv" elsewhere.
  """
  strides = _check("filter_grad", xp, w, strides, g)
  if method is None:
    method = "taps" if jax.default_backend() == "cpu" else "conv"
  xp = xp.astype(jnp.float32)
  w = w.astype(jnp.float32)
  g = g.astype(jnp.float32)
  kh, kw, cin, cout = w.shape
  if method == "taps" and not all(
      isinstance(d, int) for d in (*g.shape[:3], *xp.shape[1:3])):
    method = "conv"  # symbolic shapes (jax.export): no static blocks
  if method == "conv":
    def conv(kernel):
      return lax.conv_general_dilated(
          xp, kernel, strides, "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=lax.Precision.HIGHEST)

    _, conv_vjp = jax.vjp(conv, w)
    (correlation,) = conv_vjp(g)
  elif method == "taps":
    out_hw = g.shape[1:3]
    rows = g.shape[0] * out_hw[0] * out_hw[1]
    chunk = min(TAP_CHUNK, rows)
    chunks = -(-rows // chunk)
    pad = chunks * chunk - rows

    def blocks(a: jax.Array) -> jax.Array:  # [n, ho, wo, c] -> [T, C, c]
      a = a.reshape(rows, a.shape[-1])
      if pad:
        a = jnp.pad(a, ((0, pad), (0, 0)))
      return a.reshape(chunks, chunk, a.shape[-1])

    g_blocks = blocks(g)
    contract = (((1,), (1,)), ((0,), (0,)))
    correlation = jnp.stack([
        jnp.sum(lax.dot_general(blocks(tap_view(xp, i, j, out_hw, strides)),
                                g_blocks, contract,
                                precision=lax.Precision.HIGHEST), axis=0)
        for i in range(kh) for j in range(kw)]).reshape(kh, kw, cin, cout)
  else:
    raise ValueError(f"filter_grad: method must be None, 'conv' or 'taps', "
                     f"got {method!r}")
  return correlation - w * jnp.sum(g, axis=(0, 1, 2))
