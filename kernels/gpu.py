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

from . import layout

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
  cin, cout = w_shape[2:]
  if kind == "forward":
    ho, wo = layout.output_hw(xp_shape, w_shape, strides)
    positions = ho * layout.next_pow2(wo)
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


def pixel_tiles(rows: int, cols: int, pitch: int, block_pix: int) -> dict:
  """Pixel tiles of `block_pix` pixels over a `rows` x `cols` window of a grid
  stored flat with row `pitch` (>= cols); whichever computes fewer pixels of:

  - 2-D tiles of `tile_rows` x `tile_cols` pixels (powers of two): when
    `cols` is a power of two no program computes a pixel that is dropped;
  - flat tiles: `block_pix` consecutive positions of the flat grid, which
    include the `pitch - cols` columns past the window in every row (better
    for odd widths, e.g. the 17-wide stride phases of a 34-wide input).
  """
  flat = layout.round_up(rows * pitch, block_pix)
  best = {"flat": True, "tiles": flat // block_pix, "positions": flat,
          "block_pix": block_pix}
  tile_cols = min(layout.next_pow2(cols), block_pix)
  while tile_cols >= 1:
    tile_rows = block_pix // tile_cols
    col_tiles, row_tiles = layout.cdiv(cols, tile_cols), layout.cdiv(rows,
                                                                     tile_rows)
    positions = row_tiles * tile_rows * col_tiles * tile_cols
    if positions < best["positions"]:
      best = {"flat": False, "tile_rows": tile_rows, "tile_cols": tile_cols,
              "col_tiles": col_tiles, "row_tiles": row_tiles,
              "tiles": row_tiles * col_tiles, "positions": positions,
              "block_pix": block_pix}
    tile_cols //= 2
  return best


def _tile_offsets(tiling: dict, pitch: int):
  """Flat grid offsets of this program's pixels."""
  tile = pl.program_id(1)
  p = lax.broadcasted_iota(jnp.int32, (tiling["block_pix"],), 0)
  if tiling["flat"]:
    return tile * tiling["block_pix"] + p
  row0 = lax.div(tile, tiling["col_tiles"]) * tiling["tile_rows"]
  col0 = lax.rem(tile, tiling["col_tiles"]) * tiling["tile_cols"]
  return ((row0 + lax.div(p, tiling["tile_cols"])) * pitch + col0
          + lax.rem(p, tiling["tile_cols"]))


def _tiles_reach(tiling: dict, pitch: int) -> int:
  """One past the largest offset `_tile_offsets` produces."""
  if tiling["flat"]:
    return tiling["positions"]
  return ((tiling["row_tiles"] * tiling["tile_rows"] - 1) * pitch
          + tiling["col_tiles"] * tiling["tile_cols"])


def _untile(y: jax.Array, tiling: dict, rows: int, cols: int,
            pitch: int) -> jax.Array:
  """[n, tiles, block_pix, ch] -> [n, rows, cols, ch]."""
  n, ch = y.shape[0], y.shape[-1]
  if tiling["flat"]:
    y = y.reshape(n, tiling["positions"], ch)[:, :rows * pitch]
    return y.reshape(n, rows, pitch, ch)[:, :, :cols]
  y = y.reshape(n, tiling["row_tiles"], tiling["col_tiles"],
                tiling["tile_rows"], tiling["tile_cols"], ch)
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(
      n, tiling["row_tiles"] * tiling["tile_rows"],
      tiling["col_tiles"] * tiling["tile_cols"], ch)
  return y[:, :rows, :cols]


# Accumulation (float32 fidelity, the scheme of `addernet_jax.reference`; see
# `layout.block_offsets`): the (tap, channel) terms are summed in blocks of at
# most FORWARD_BLOCK channels of one tap into a fresh partial, and the
# accumulator receives `partial - m[block]`, m = the block's sum of |w| per
# output channel, so it stays at the inputs' scale instead of the outputs'
# (thousands) and keeps the last bits BatchNorm needs. The kernel returns the
# accumulator; `forward` adds back the exact total of the offsets,
# `-(hi + (acc + lo))`. One extra subtraction per block and one register tile
# (the partial); measured 3-4x closer to float64 than one running sum on the
# official ResNet-20.
FORWARD_BLOCK = 16


def forward_blocks(cin: int) -> tuple[int, int]:
  """(blocks, channels per block) of one tap: FORWARD_BLOCK at most, as even
  as possible (the last block may be shorter)."""
  num = layout.cdiv(cin, FORWARD_BLOCK)
  return num, layout.cdiv(cin, num)


def _forward_kernel(x_ref, w_ref, m_ref, o_ref, *, kw: int,
                    strides: Strides, wq: int, num_taps: int, cin: int,
                    tiling: dict):
  sh, sw = strides
  pixels = _tile_offsets(tiling, wq)
  nb, cb = forward_blocks(cin)
  last = cin - (nb - 1) * cb  # channels of the last block (static)

  def tap_body(t, acc):
    # lax.div / lax.rem (C semantics, fine for non-negative ints) lower to
    # plain integer ops in Triton; Python's // and % add sign fix-ups.
    i, j = lax.div(t, kw), lax.rem(t, kw)
    phase = lax.rem(i, sh) * sw + lax.rem(j, sw)
    index = pixels + (lax.div(i, sh) * wq + lax.div(j, sw))

    def add_block(b, size, acc):
      c0 = b * cb

      def channel_body(c, part):
        xv = x_ref[phase, index, c0 + c].astype(jnp.float32)
        wv = w_ref[t, c0 + c, :].astype(jnp.float32)
        return part + jnp.abs(xv[:, None] - wv[None, :])
      part = lax.fori_loop(0, size, channel_body,
                           jnp.zeros(o_ref.shape, jnp.float32))
      return acc + (part - m_ref[t * nb + b, :][None, :])

    if nb > 1:
      acc = lax.fori_loop(0, nb - 1, lambda b, a: add_block(b, cb, a), acc)
    return add_block(nb - 1, last, acc)

  o_ref[...] = lax.fori_loop(0, num_taps, tap_body,
                             jnp.zeros(o_ref.shape, jnp.float32))


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
  tiling = pixel_tiles(ho, wo, wq, bs.block_pix)
  max_off = max(off for _, off in taps)
  xs = layout.pad_axis(xs, 2, _tiles_reach(tiling, wq) + max_off)
  cout_pad = layout.round_up(cout, bs.block_ch)
  wt = layout.pad_axis(w.reshape(kh * kw, cin, cout), 2, cout_pad)
  nb, cb = forward_blocks(cin)
  offsets, (hi, lo) = layout.block_offsets(
      layout.pad_axis(wt, 1, nb * cb).reshape(kh * kw * nb, cb, cout_pad))
  nph, length = xs.shape[1], xs.shape[2]
  grid = (n, tiling["tiles"], cout_pad // bs.block_ch)
  y = pl.pallas_call(
      functools.partial(_forward_kernel, kw=kw, strides=strides, wq=wq,
                        num_taps=kh * kw, cin=cin, tiling=tiling),
      out_shape=layout.out_struct(
          (n, tiling["tiles"], bs.block_pix, cout_pad), jnp.float32, xp, w),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, nph, length, cin), lambda b, f, o: (b, 0, 0, 0)),
          pl.BlockSpec((kh * kw, cin, bs.block_ch), lambda b, f, o: (0, 0, o)),
          pl.BlockSpec((kh * kw * nb, bs.block_ch), lambda b, f, o: (0, o)),
      ],
      out_specs=pl.BlockSpec((None, None, bs.block_pix, bs.block_ch),
                             lambda b, f, o: (b, f, 0, o)),
      compiler_params=_compiler_params(bs, interpret),
      interpret=interpret,
      name="adder_forward_gpu",
  )(xs, wt, offsets)
  acc = _untile(y, tiling, ho, wo, wq)[..., :cout]
  return -(hi[:cout] + (acc + lo[:cout]))


# ---------------------------------------------------------- input gradient --


def input_grad_plan(xp_shape, w_shape, strides: Strides,
                    rows: tuple[int, int] | None = None,
                    cols: tuple[int, int] | None = None) -> dict:
  """How `input_grad` splits the padded input into stride phases.

  Input pixel (a, b) = (s*a' + r, s*b' + t) receives gradient only from the
  taps i = r + s*m, j = t + s*m' (m, m' >= 0), through output (a' - m, b' - m').
  So each phase (r, t) is a stride-1 gather over its own taps, on a grid of
  `rows` x `width` positions laid out flat with a row `pitch` of width + the
  widest tap shift: no multiply by the zeros a strided gradient would be
  spread with. Returns those sizes, the top/left shifts (mh, mw), per phase
  the static list of (tap index i*kw + j, offset into the shifted gradient),
  and the phase rows [lo, hi) and columns [clo, chi) that cover the
  padded-input `rows` and `cols` wanted (all by default), with `positions`,
  the pixels computed per phase.
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
  window = []
  for name, span, size, stride in (("rows", rows, hp, sh),
                                   ("cols", cols, wp, sw)):
    start, stop = (0, size) if span is None else span
    if not 0 <= start < stop <= size:
      raise ValueError(f"gpu.input_grad: {name} {span} must satisfy 0 <= "
                       f"start < stop <= {size} (xp {tuple(xp_shape)})")
    window.append((start // stride, layout.cdiv(stop, stride)))
  (lo, hi), (clo, chi) = window
  return {"rows": n_rows, "width": width, "pitch": pitch, "lo": lo, "hi": hi,
          "clo": clo, "chi": chi, "positions": (hi - lo) * (chi - clo),
          "mh": mh, "mw": mw, "phases": phases}


def _input_grad_kernel(x_ref, g_ref, w_ref, o_ref, *, taps, cout: int,
                       tiling: dict, pitch: int, origin: int,
                       block_ch: int):
  # Accumulation (float32 fidelity, as `addernet_jax.reference.input_grad`):
  # two-level partial sums, a fresh partial per block of at most
  # FORWARD_BLOCK output channels added into a fresh per-tap partial, added
  # into the accumulator once per tap (one running sum over all (tap, o) was
  # 2.5-4x further from float64 than the official code on ResNet-20).
  pixels = _tile_offsets(tiling, pitch) + origin
  channels = pl.ds(pl.program_id(2) * block_ch, block_ch)
  x = x_ref[pixels, channels].astype(jnp.float32)
  nb, ob = forward_blocks(cout)
  last = cout - (nb - 1) * ob
  acc = jnp.zeros(o_ref.shape, jnp.float32)
  for tap, offset in taps:  # static: at most kh*kw taps
    index = pixels + offset

    def block(b, size, tap=tap, index=index):
      o0 = b * ob

      def channel_body(o, part):
        gv = g_ref[index, o0 + o].astype(jnp.float32)
        wv = w_ref[tap, :, o0 + o].astype(jnp.float32)
        return part + jnp.clip(wv[None, :] - x, -1.0, 1.0) * gv[:, None]
      return lax.fori_loop(0, size, channel_body,
                           jnp.zeros(o_ref.shape, jnp.float32))

    part = block(nb - 1, last)
    if nb > 1:
      part = lax.fori_loop(0, nb - 1, lambda b, p, block=block: p + block(
          b, ob), part)
    acc = acc + part
  o_ref[...] = acc


# Backends that take `rows=` / `cols=` in input_grad (addernet_jax.ops.Backend).
INPUT_GRAD_TAKES_WINDOW = True


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret", "rows", "cols"))
def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides, *,
               block_sizes: BlockSizes | None = None,
               interpret: bool = False,
               rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> jax.Array:
  """dxp[n,a,b,c] = sum over (tap, o) of clip(w - xp[n,a,b,c], -1, 1) * g.

  Same contract as `addernet_jax.reference.input_grad`: the gradient with
  respect to the padded input `[n, hp, wp, cin]`, float32. Strided layers run
  one launch per stride phase (`input_grad_plan`); phases no tap reaches
  (e.g. odd rows of a 1x1 stride-2 layer) are zeros without a launch.
  With `rows=(start, stop)` / `cols=` only that window of the padded input
  is computed (the caller crops the padding away) and the rest is zeros;
  2-D pixel tiles (`pixel_tiles`) cover the window, so on ResNet-20 no
  program computes a pixel that is dropped.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("gpu.input_grad", xp.shape, w.shape, strides, g.shape)
  kh, kw, cin, cout = w.shape
  n, hp, wp, _ = xp.shape
  sh, sw = strides
  plan = input_grad_plan(xp.shape, w.shape, strides, rows, cols)
  n_rows, width, pitch = plan["rows"], plan["width"], plan["pitch"]
  lo, hi, clo, chi = plan["lo"], plan["hi"], plan["clo"], plan["chi"]
  bs = block_sizes or get_block_sizes(
      "input_grad", xp.shape, w.shape, strides,
      platform="cpu" if interpret else "gpu")
  tiling = pixel_tiles(hi - lo, chi - clo, pitch, bs.block_pix)
  origin = lo * pitch + clo
  reach = origin + _tiles_reach(tiling, pitch)
  cin_pad = layout.round_up(cin, bs.block_ch)
  # Phases of x, each flat [n_rows * pitch]: [n, sh*sw, length, cin_pad].
  xq = jnp.pad(xp, ((0, 0), (0, n_rows * sh - hp), (0, width * sw - wp),
                    (0, cin_pad - cin)))
  xq = xq.reshape(n, n_rows, sh, width, sw, cin_pad).transpose(0, 2, 4, 1, 3, 5)
  xq = jnp.pad(xq, ((0, 0),) * 4 + ((0, pitch - width), (0, 0)))
  xq = layout.pad_axis(xq.reshape(n, sh * sw, n_rows * pitch, cin_pad), 2,
                       reach)
  # The output gradient shifted by (mh, mw), flat with the same pitch.
  ho, wo = g.shape[1:3]
  g_rows = max(n_rows, ho) + plan["mh"]
  gd = jnp.pad(g, ((0, 0), (plan["mh"], g_rows - plan["mh"] - ho),
                   (plan["mw"], pitch - plan["mw"] - wo), (0, 0)))
  gd = gd.reshape(n, g_rows * pitch, cout)
  gd = layout.pad_axis(gd, 1, reach + plan["mh"] * pitch + plan["mw"])
  wt = layout.pad_axis(w.reshape(kh * kw, cin, cout), 1, cin_pad)
  xlen, glen = xq.shape[2], gd.shape[1]
  grid = (n, tiling["tiles"], cin_pad // bs.block_ch)
  phases = []
  for phase, taps in enumerate(plan["phases"]):
    if not taps:
      phases.append(jnp.zeros((n, hi - lo, chi - clo, cin_pad), jnp.float32))
      continue
    out = pl.pallas_call(
        functools.partial(_input_grad_kernel, taps=taps, cout=cout,
                          tiling=tiling, pitch=pitch, origin=origin,
                          block_ch=bs.block_ch),
        out_shape=layout.out_struct(
            (n, tiling["tiles"], bs.block_pix, cin_pad), jnp.float32, xp, w,
            g),
        grid=grid,
        in_specs=[
            pl.BlockSpec((None, None, xlen, cin_pad),
                         lambda b, f, c, phase=phase: (b, phase, 0, 0)),
            pl.BlockSpec((None, glen, cout), lambda b, f, c: (b, 0, 0)),
            pl.BlockSpec((kh * kw, bs.block_ch, cout),
                         lambda b, f, c: (0, c, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, bs.block_pix, bs.block_ch),
                               lambda b, f, c: (b, f, 0, c)),
        compiler_params=_compiler_params(bs, interpret),
        interpret=interpret,
        name="adder_input_grad_gpu",
    )(xq, gd, wt)
    phases.append(_untile(out, tiling, hi - lo, chi - clo, pitch))
  dx = jnp.stack(phases, axis=1).reshape(n, sh, sw, hi - lo, chi - clo,
                                         cin_pad)
  dx = jnp.pad(dx, ((0, 0),) * 3 + ((lo, n_rows - hi), (clo, width - chi),
                                    (0, 0)))
  dx = dx.transpose(0, 3, 1, 4, 2, 5).reshape(n, n_rows * sh, width * sw,
                                              cin_pad)
  return dx[:, :hp, :wp, :cin]
