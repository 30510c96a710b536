"""Pallas GPU kernels (Triton lowering) for the adder forward and input gradient.

Both are tiled "L1 matmuls" on CUDA cores with implicit im2col: no patches
matrix is built. Inputs are laid out flat per image (`layout.phase_split`), so
every filter tap reads a contiguous run of pixel rows at a constant offset.

forward:    program (image b, pixel tile f, cout tile o) keeps
            acc[block_pix, block_ch] and, for each tap and input channel c,
            adds |x[f + offset, c] - w[tap, c, o]| (rank-1 update, 2 FP32
            instructions per MAC). Strides become phases (space-to-depth).
input_grad: one launch per stride phase of the input (`input_grad_plan`);
            program (image b, input pixel tile, cin tile) keeps
            acc[block_pix, block_ch] and, for each of the phase's taps and
            each output channel o, adds
            clip(w[tap, c, o] - x, -1, 1) * g[f + offset, o] (a stride-1
            gather from the shifted output gradient; every tap is issued in
            exactly one phase, so strided layers do no multiply-by-zero work).

The pure reference these kernels must match is `addernet_jax.reference`.
Block sizes live in `BlockSizes` and come from `get_block_sizes`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels import layout

try:  # Triton compiler params: jax.experimental.pallas.triton (0.10, 0.11).
  from jax.experimental.pallas import triton as _pltriton
  _TritonParams = _pltriton.CompilerParams
except (ImportError, AttributeError):  # pragma: no cover - removed backend.
  _TritonParams = None

Strides = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of one GPU kernel launch.

  Attributes:
    block_pix: pixels per program (output pixels for the forward, input pixels
      for the input gradient); a power of two (Triton tensor sizes).
    block_ch: channels per program (cout for the forward, cin for the input
      gradient); a power of two.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the channel loop.
  """
  block_pix: int
  block_ch: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_pix", "block_ch", "num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not layout.is_pow2(value):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got "
                         f"{value!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages must be >= 1, got "
                       f"{self.num_stages!r}")


def _pick_pix(positions: int, cap: int, floor: int = 16,
              program_cost: int = 4) -> int:
  """Power-of-two pixel tile in [floor, cap] minimising padded work plus a
  per-program charge of `program_cost` pixels (ties go to the larger tile)."""
  cap = max(1, min(cap, layout.next_pow2(positions)))
  best, best_cost = cap, None
  b = cap
  while b >= min(floor, cap):
    tiles = layout.cdiv(positions, b)
    cost = tiles * b + tiles * program_cost
    if best_cost is None or cost < best_cost:
      best, best_cost = b, cost
    b //= 2
  return best


def get_block_sizes(kind: str, xp_shape, w_shape, strides: Strides,
                    platform: str | None = None) -> BlockSizes:
  """Heuristic tiles for `kind` ("forward" or "input_grad") on `platform`.

  On "gpu": about 4096 float32 accumulators per program (32 per thread with 4
  warps), the channel tile covering up to 64 channels, the pixel tile the
  power of two that wastes least. On "cpu" (interpret mode) the tiles are as
  large as possible: interpret cost grows with the number of grid steps.
  """
  if kind not in ("forward", "input_grad"):
    raise ValueError(f"get_block_sizes: kind must be 'forward' or "
                     f"'input_grad', got {kind!r}")
  platform = platform or jax.default_backend()
  kh, kw, cin, cout = w_shape
  sh, sw = strides
  if kind == "forward":
    ho, _ = layout.output_hw(xp_shape, w_shape, strides)
    positions = ho * layout.cdiv(xp_shape[2], sw)
    channels = cout
  else:
    positions = input_grad_plan(xp_shape, w_shape, strides)["positions"]
    channels = cin
  if platform != "gpu":
    return BlockSizes(block_pix=_pick_pix(positions, 1024, floor=64),
                      block_ch=min(layout.next_pow2(channels), 256))
  block_ch = min(layout.next_pow2(channels), 64)
  block_pix = _pick_pix(positions, max(16, 4096 // block_ch))
  num_warps = 8 if block_pix * block_ch >= 8192 else 4
  return BlockSizes(block_pix=block_pix, block_ch=block_ch,
                    num_warps=num_warps, num_stages=2)


def _compiler_params(bs: BlockSizes, interpret: bool):
  if interpret or _TritonParams is None:
    return None
  return _TritonParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


# ----------------------------------------------------------------- forward --


def _forward_kernel(x_ref, w_ref, o_ref, *, kw: int, strides: Strides,
                    wq: int, num_taps: int, cin: int, block_pix: int):
  sh, sw = strides
  f0 = pl.program_id(1) * block_pix

  def tap_body(t, acc):
    # lax.div / lax.rem (C semantics, fine for non-negative ints) lower to
    # plain integer ops in Triton; Python's // and % add sign fix-ups.
    i, j = lax.div(t, kw), lax.rem(t, kw)
    phase = lax.rem(i, sh) * sw + lax.rem(j, sw)
    start = f0 + lax.div(i, sh) * wq + lax.div(j, sw)

    def channel_body(c, acc):
      xv = x_ref[phase, pl.ds(start, block_pix), c].astype(jnp.float32)
      wv = w_ref[t, c, :].astype(jnp.float32)
      return acc + jnp.abs(xv[:, None] - wv[None, :])
    return lax.fori_loop(0, cin, channel_body, acc)

  acc = lax.fori_loop(0, num_taps, tap_body,
                      jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = -acc


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def forward(xp: jax.Array, w: jax.Array, strides: Strides, *,
            block_sizes: BlockSizes | None = None,
            interpret: bool = False) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]|, float32.

  Args:
    xp: zero-padded input `[n, hp, wp, cin]` (float32 or bfloat16).
    w: filters `[kh, kw, cin, cout]`.
    strides: `(sh, sw)`.
    block_sizes: tiles; default `get_block_sizes("forward", ...)`.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    `[n, ho, wo, cout]` float32.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("gpu.forward", xp.shape, w.shape, strides)
  kh, kw, cin, cout = w.shape
  n = xp.shape[0]
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  bs = block_sizes or get_block_sizes(
      "forward", xp.shape, w.shape, strides,
      platform="cpu" if interpret else "gpu")
  xs, wq, taps = layout.phase_split(xp, strides, kh, kw)
  positions = ho * wq
  pos_pad = layout.round_up(positions, bs.block_pix)
  max_off = max(off for _, off in taps)
  xs = layout.pad_axis(xs, 2, pos_pad + max_off)
  cout_pad = layout.round_up(cout, bs.block_ch)
  wt = layout.pad_axis(w.reshape(kh * kw, cin, cout), 2, cout_pad)
  nph, length = xs.shape[1], xs.shape[2]
  grid = (n, pos_pad // bs.block_pix, cout_pad // bs.block_ch)
  y = pl.pallas_call(
      functools.partial(_forward_kernel, kw=kw, strides=strides, wq=wq,
                        num_taps=kh * kw, cin=cin, block_pix=bs.block_pix),
      out_shape=jax.ShapeDtypeStruct((n, pos_pad, cout_pad), jnp.float32),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, nph, length, cin), lambda b, f, o: (b, 0, 0, 0)),
          pl.BlockSpec((kh * kw, cin, bs.block_ch), lambda b, f, o: (0, 0, o)),
      ],
      out_specs=pl.BlockSpec((None, bs.block_pix, bs.block_ch),
                             lambda b, f, o: (b, f, o)),
      compiler_params=_compiler_params(bs, interpret),
      interpret=interpret,
      name="adder_forward_gpu",
  )(xs, wt)
  y = y[:, :positions].reshape(n, ho, wq, cout_pad)
  return y[:, :, :wo, :cout]


# ---------------------------------------------------------- input gradient --


def input_grad_plan(xp_shape, w_shape, strides: Strides,
                    rows: tuple[int, int] | None = None) -> dict:
  """How `input_grad` splits the padded input into stride phases.

  Input pixel (a, b) = (s*a' + r, s*b' + t) receives gradient only from the
  taps i = r + s*m, j = t + s*m' (m, m' >= 0), through output (a' - m, b' - m').
  So each phase (r, t) is a stride-1 gather over its own taps, on a grid of
  `rows` x `pitch` positions (pitch = phase width + the widest tap shift):
  no multiply by the zeros a strided gradient would be spread with.
  Returns rows, pitch, the top/left shifts (mh, mw), per phase the static
  list of (tap index i*kw + j, offset into the shifted gradient), and the
  window of phase rows [lo, hi) that covers the padded-input `rows` wanted
  (all by default) with its `positions` = (hi - lo) * pitch.
  """
  _, hp, wp, _ = xp_shape
  kh, kw = w_shape[:2]
  sh, sw = strides
  n_rows, width = layout.cdiv(hp, sh), layout.cdiv(wp, sw)
  mh, mw = (kh - 1) // sh, (kw - 1) // sw
  pitch = width + mw
  phases = []
  for r in range(sh):
    for t in range(sw):
      taps = tuple((i * kw + j, (mh - (i - r) // sh) * pitch
                    + (mw - (j - t) // sw))
                   for i in range(r, kh, sh) for j in range(t, kw, sw))
      phases.append(taps)
  start, stop = (0, hp) if rows is None else rows
  if not 0 <= start < stop <= hp:
    raise ValueError(f"gpu.input_grad: rows {rows} must satisfy 0 <= start < "
                     f"stop <= {hp} (padded height of xp {tuple(xp_shape)})")
  lo, hi = start // sh, layout.cdiv(stop, sh)
  return {"rows": n_rows, "width": width, "pitch": pitch, "lo": lo, "hi": hi,
          "positions": (hi - lo) * pitch, "mh": mh, "mw": mw,
          "phases": phases}


def _input_grad_kernel(x_ref, g_ref, w_ref, o_ref, *, taps, cout: int,
                       block_pix: int):
  f0 = pl.program_id(1) * block_pix
  x = x_ref[...].astype(jnp.float32)
  acc = jnp.zeros(o_ref.shape, jnp.float32)
  for tap, offset in taps:  # static: at most kh*kw taps
    start = f0 + offset

    def channel_body(o, acc, tap=tap, start=start):
      gv = g_ref[pl.ds(start, block_pix), o].astype(jnp.float32)
      wv = w_ref[tap, :, o].astype(jnp.float32)
      return acc + jnp.clip(wv[None, :] - x, -1.0, 1.0) * gv[:, None]
    acc = lax.fori_loop(0, cout, channel_body, acc)
  o_ref[...] = acc


# Backends that take `rows=` in input_grad (see addernet_jax.ops.Backend).
INPUT_GRAD_TAKES_ROWS = True


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret", "rows"))
def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides, *,
               block_sizes: BlockSizes | None = None,
               interpret: bool = False,
               rows: tuple[int, int] | None = None) -> jax.Array:
  """dxp[n,a,b,c] = sum over (tap, o) of clip(w - xp[n,a,b,c], -1, 1) * g.

  Same contract as `addernet_jax.reference.input_grad`: the gradient with
  respect to the padded input `[n, hp, wp, cin]`, float32. Strided layers run
  one launch per stride phase (`input_grad_plan`); phases no tap reaches
  (e.g. odd rows of a 1x1 stride-2 layer) are zeros without a launch.
  With `rows=(start, stop)` only the padded-input rows in [start, stop) are
  computed (the caller crops the padding away); the others are zeros. For a
  3x3 layer on 8x8 maps that skips 2 of 10 rows.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("gpu.input_grad", xp.shape, w.shape, strides, g.shape)
  kh, kw, cin, cout = w.shape
  n, hp, wp, _ = xp.shape
  sh, sw = strides
  plan = input_grad_plan(xp.shape, w.shape, strides, rows)
  rows_all, width, pitch = plan["rows"], plan["width"], plan["pitch"]
  lo, hi, positions = plan["lo"], plan["hi"], plan["positions"]
  bs = block_sizes or get_block_sizes(
      "input_grad", xp.shape, w.shape, strides,
      platform="cpu" if interpret else "gpu")
  pos_pad = layout.round_up(positions, bs.block_pix)
  cin_pad = layout.round_up(cin, bs.block_ch)
  # Phases of x, each [hi - lo, pitch] flat: [n, sh*sw, pos_pad, cin_pad].
  xq = jnp.pad(xp, ((0, 0), (0, rows_all * sh - hp), (0, width * sw - wp),
                    (0, cin_pad - cin)))
  xq = xq.reshape(n, rows_all, sh, width, sw, cin_pad)[:, lo:hi]
  xq = xq.transpose(0, 2, 4, 1, 3, 5)
  xq = jnp.pad(xq, ((0, 0),) * 4 + ((0, pitch - width), (0, 0)))
  xq = layout.pad_axis(xq.reshape(n, sh * sw, positions, cin_pad), 2, pos_pad)
  # The output gradient shifted by (mh, mw), flat with the same pitch; phase
  # row lo of the computed window reads it lo rows further down.
  ho, wo = g.shape[1:3]
  g_rows = max(rows_all, ho) + plan["mh"]
  gd = jnp.pad(g, ((0, 0), (plan["mh"], g_rows - plan["mh"] - ho),
                   (plan["mw"], pitch - plan["mw"] - wo), (0, 0)))
  gd = gd.reshape(n, g_rows * pitch, cout)
  gd = layout.pad_axis(gd, 1, lo * pitch + pos_pad + plan["mh"] * pitch
                       + plan["mw"])
  wt = layout.pad_axis(w.reshape(kh * kw, cin, cout), 1, cin_pad)
  glen = gd.shape[1]
  grid = (n, pos_pad // bs.block_pix, cin_pad // bs.block_ch)
  phases = []
  for phase, taps in enumerate(plan["phases"]):
    if not taps:
      phases.append(jnp.zeros((n, pos_pad, cin_pad), jnp.float32))
      continue
    taps = tuple((tap, offset + lo * pitch) for tap, offset in taps)
    phases.append(pl.pallas_call(
        functools.partial(_input_grad_kernel, taps=taps, cout=cout,
                          block_pix=bs.block_pix),
        out_shape=jax.ShapeDtypeStruct((n, pos_pad, cin_pad), jnp.float32),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, bs.block_pix, bs.block_ch),
                         lambda b, f, c, phase=phase: (b, phase, f, c)),
            pl.BlockSpec((None, glen, cout), lambda b, f, c: (b, 0, 0)),
            pl.BlockSpec((kh * kw, bs.block_ch, cout),
                         lambda b, f, c: (0, c, 0)),
        ],
        out_specs=pl.BlockSpec((None, bs.block_pix, bs.block_ch),
                               lambda b, f, c: (b, f, c)),
        compiler_params=_compiler_params(bs, interpret),
        interpret=interpret,
        name="adder_input_grad_gpu",
    )(xq, gd, wt))
  dx = jnp.stack(phases, axis=1)[:, :, :positions]
  dx = dx.reshape(n, sh, sw, hi - lo, pitch, cin_pad)[..., :width, :]
  dx = jnp.pad(dx, ((0, 0),) * 3 + ((lo, rows_all - hi), (0, 0), (0, 0)))
  dx = dx.transpose(0, 3, 1, 4, 2, 5).reshape(n, rows_all * sh, width * sw,
                                              cin_pad)
  return dx[:, :hp, :wp, :cin]
