"""Pallas Mosaic TPU kernels with the batch on the lanes: no patches matrix.

Layout. Images on the 128 lanes, columns on the 8 sublanes: one (8, 128)
vreg holds 8 columns of one row and channel for 128 images,

    X[b, row, phase, c, col, lane] = xp[b*128 + lane, row, col*sw + phase, c]

(columns split by the column stride `sw` into `phase`s). A filter tap (i, j)
then reads input row `p*sh + i` (which block the grid fetches) and sublanes
`q0 + j // sw` of phase `j % sw` (a static shift): never a lane shift, and no
`[kh*kw*cin, n*ho*wo]` patches matrix in HBM (`kernels.tpu` writes and reads
one, 6-29x the input's bytes on ResNet-20's 3x3 layers; this forward reads
the input 2-4x). The XLA side only transposes the input, the
output gradient and the results to and from this layout.

forward:    Y[b, p, o, q, lane] = -sum_{i,j,c} |X[.., p*sh+i, j%sw, c, q+j//sw, ..]
            - w[i,j,c,o]|. Program (image block, output row, cout tile, cin
            chunk); the kernel walks 8-column blocks, holding one accumulator
            vreg per output channel of the tile; each loaded input vreg serves
            the whole tile (a scalar-broadcast subtract, abs and add each).
input_grad: DX[b, r, ph, c, cq, lane] = sum over the taps that reach input row
            r and column cq*sw + ph, and over o, of clip(w - X, -1, 1) * G,
            where G is the output gradient in the same layout, zero-padded so
            that every tap's row and column exist. Program (image block,
            input row, cin chunk, cout tile); the row's stride phase selects
            its taps (a static branch per phase); each loaded gradient vreg
            serves 8 input channels.

Accumulation: the forward's offset block partials of every other family
(`layout.block_offsets`): per tap, channels are summed in groups of at most
GROUP into fresh partials and the accumulator receives `partial - m`; the
wrapper adds the exact total of the offsets back. The input gradient sums
GROUP output channels per partial.

When it pays: a lane holds an image, so a batch under 128 leaves lanes idle;
`unsupported_reason` refuses batches under MIN_BATCH (then `kernels.tpu`, the
next family of the TPU chain, runs). Nothing here has run on a TPU: verified in
Pallas' TPU interpret mode and by lowering for TPU on the host. The pure
reference these kernels must match is `addernet_jax.reference`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import layout
# The TPU layout constants, the accumulation group and the interpret-mode
# switch are those of the patches family.
from .tpu import GROUP, LANES, SUBLANES, Strides, _groups, _interpret_arg
from .tpu import INTERPRET_MAX_DEVICES  # noqa: F401  (read by dispatch)

# Fewer images than this would leave over half of the lanes idle.
MIN_BATCH = 64
# Filter scalars per SMEM block: 128 KiB, double-buffered a quarter of the
# 1 MiB SMEM per core of TPU v4 and newer (JAX's `pltpu` TpuInfo table), so
# that the ResNet layers need one input-channel chunk (each chunk re-reads the
# input per output tile). The VMEM the double-buffered blocks of one program
# may take: under the 16 MiB of the smallest current TPUs.
SMEM_SCALARS = 32768
VMEM_BUDGET = 12 << 20


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of one launch.

  Attributes:
    block_c: input channels per grid step (the forward's reduction chunk, the
      input gradient's output tile).
    block_n: output channels per grid step (the forward's accumulator vregs
      per 8-column block, the input gradient's reduction chunk).
  """
  block_c: int
  block_n: int

  def __post_init__(self):
    for name in ("block_c", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got "
                         f"{value!r}")


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """The padded sizes of one call (all static)."""
  n_blocks: int     # images / 128, rounded up
  ho: int
  wo: int
  out_cols: int     # wo rounded up to 8 (forward output sublanes)
  in_cols: int      # input columns per phase in the forward layout
  dx_cols: int      # input columns per phase in the input-gradient layout
  dx_rows: int      # input rows rounded up to a multiple of sh
  row_taps: int     # A = cdiv(kh, sh): taps per input row, at most
  col_taps: int     # B = cdiv(kw, sw)
  g_rows: int
  g_cols: int


def _geometry(xp_shape, w_shape, strides) -> _Geometry:
  n, hp, wp, _ = xp_shape
  kh, kw = w_shape[:2]
  sh, sw = strides
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  out_cols = layout.round_up(wo, SUBLANES)
  row_taps, col_taps = layout.cdiv(kh, sh), layout.cdiv(kw, sw)
  dx_rows = layout.round_up(hp, sh)
  dx_cols = layout.round_up(layout.cdiv(wp, sw), SUBLANES)
  return _Geometry(
      n_blocks=layout.cdiv(n, LANES), ho=ho, wo=wo, out_cols=out_cols,
      in_cols=layout.round_up(out_cols + (kw - 1) // sw, SUBLANES),
      dx_cols=dx_cols, dx_rows=dx_rows, row_taps=row_taps, col_taps=col_taps,
      g_rows=dx_rows // sh + row_taps - 1,
      g_cols=layout.round_up(dx_cols + col_taps - 1, SUBLANES))


def _vmem_parts(kind: str, geo: _Geometry, w_shape, strides,
                bs: BlockSizes) -> tuple[int, int]:
  """Double-buffered VMEM of one program's blocks: (the blocks that scale
  with block_c, those that scale with block_n)."""
  kh, sw = w_shape[0], strides[1]
  if kind == "forward":
    parts = (kh * sw * bs.block_c * geo.in_cols,
             bs.block_n * geo.out_cols)
  else:
    parts = (2 * sw * bs.block_c * geo.dx_cols,
             geo.row_taps * bs.block_n * geo.g_cols)
  return tuple(2 * p * LANES * 4 for p in parts)


def _vmem_bytes(kind: str, geo: _Geometry, w_shape, strides,
                bs: BlockSizes) -> int:
  """Double-buffered VMEM of one program's blocks."""
  return sum(_vmem_parts(kind, geo, w_shape, strides, bs))


def _chunk(channels: int, limit: int, align: int) -> int:
  """Channels per grid step: at most `limit`; a multiple of `align` where
  `limit` allows, preferring one that divides `channels` rounded up to
  `align` (no padded channels beyond that); else a divisor of `channels`."""
  if channels <= limit:
    return channels
  if limit < align:  # then the largest divisor of `channels` that fits
    return max(d for d in range(1, max(1, limit) + 1) if channels % d == 0)
  total = layout.round_up(channels, align)
  fits = [d for d in range(align, limit + 1, align) if total % d == 0]
  return max(fits) if fits else limit // align * align


def get_block_sizes(kind: str, xp_shape, w_shape, strides: Strides,
                    platform: str | None = None) -> BlockSizes:
  """Heuristic tiles for `kind` ("forward" or "input_grad").

  On "tpu": output tiles of 16 channels for the forward (16 accumulator and
  16 partial vregs of the 64) and 32 for the input gradient (its reduction
  chunk; the registers hold 8 input channels), input-channel chunks as large
  as the SMEM filter block (`SMEM_SCALARS`) and `VMEM_BUDGET` allow, in
  multiples of GROUP (forward) or 8 (input gradient). Elsewhere (interpret
  mode): whole channel ranges.
  """
  if kind not in ("forward", "input_grad"):
    raise ValueError(f"get_block_sizes: kind must be 'forward' or "
                     f"'input_grad', got {kind!r}")
  platform = platform or jax.default_backend()
  kh, kw, cin, cout = w_shape
  if platform != "tpu":
    return BlockSizes(block_c=cin, block_n=cout)
  block_n = min(cout, GROUP if kind == "forward" else 2 * GROUP)
  align = GROUP if kind == "forward" else SUBLANES
  limit = SMEM_SCALARS // (kh * kw * block_n)
  geo = _geometry(xp_shape, w_shape, strides)
  block_c = _chunk(cin, limit, align)
  # Over the VMEM budget (wide images): fewer channels on the larger side.
  while True:
    by_c, by_n = _vmem_parts(kind, geo, w_shape, strides,
                             BlockSizes(block_c, block_n))
    if by_c + by_n <= VMEM_BUDGET or block_c == block_n == 1:
      break
    if block_c > 1 and (by_c >= by_n or block_n == 1):
      block_c = _chunk(cin, block_c - 1, align)
    else:
      block_n = (block_n + 1) // 2
  return BlockSizes(block_c=block_c, block_n=block_n)


def unsupported_reason(xp_shape, w_shape, strides) -> str | None:
  """Why these kernels do not take the call, or None."""
  if xp_shape[0] < MIN_BATCH:
    return (f"batch {xp_shape[0]} < {MIN_BATCH}: images sit on the 128 "
            f"lanes, most would idle")
  geo = _geometry(xp_shape, w_shape, strides)
  for kind in ("forward", "input_grad"):
    bs = get_block_sizes(kind, xp_shape, w_shape, strides, "tpu")
    need = _vmem_bytes(kind, geo, w_shape, strides, bs)
    if need > VMEM_BUDGET:
      return (f"{kind} blocks need {need} bytes of VMEM even with "
              f"{bs.block_c} input channel(s) per step (> {VMEM_BUDGET}) "
              f"for xp {tuple(xp_shape)}, w {tuple(w_shape)}")
  return None


def _channel_tile(block_c: int) -> int:
  """Input channels per register tile of the input gradient (divides
  block_c)."""
  return next(t for t in (8, 4, 2, 1) if block_c % t == 0)


# --------------------------------------------------------------- layouts --


def _to_lanes(x: jax.Array, rows: int, cols: int, sw: int, channels: int,
              n_blocks: int) -> jax.Array:
  """`[n, h, w, c]` -> `[n_blocks, rows, sw, channels, cols, 128]` float32
  (zero-padded, or cropped where `h`/`w` exceed `rows`/`cols * sw`)."""
  x = x.astype(jnp.float32)[:, :rows, :cols * sw, :]
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, n_blocks * LANES - n), (0, rows - h),
                  (0, cols * sw - w), (0, channels - c)))
  x = x.reshape(n_blocks, LANES, rows, cols, sw, channels)
  return x.transpose(0, 2, 4, 5, 3, 1)


def _from_lanes(x: jax.Array, shape) -> jax.Array:
  """Inverse of `_to_lanes`, cropped to `shape` `[n, h, w, c]`."""
  n_blocks, rows, sw, channels, cols, _ = x.shape
  x = x.transpose(0, 5, 1, 4, 2, 3).reshape(n_blocks * LANES, rows, cols * sw,
                                            channels)
  n, h, w, c = shape
  return x[:n, :h, :w, :c]


def _filters(w: jax.Array, bs: BlockSizes) -> jax.Array:
  """`[kh, kw, cin, cout]` -> SMEM blocks `[n tiles, c chunks, 1, kh*kw *
  block_c * block_n]`, each row-major (tap, channel, output channel)."""
  kh, kw, cin, cout = w.shape
  c_pad = layout.round_up(cin, bs.block_c)
  n_pad = layout.round_up(cout, bs.block_n)
  w = jnp.pad(w.astype(jnp.float32),
              ((0, 0), (0, 0), (0, c_pad - cin), (0, n_pad - cout)))
  w = w.reshape(kh * kw, c_pad // bs.block_c, bs.block_c,
                n_pad // bs.block_n, bs.block_n).transpose(3, 1, 0, 2, 4)
  return w.reshape(n_pad // bs.block_n, c_pad // bs.block_c, 1, -1)


def _forward_offsets(w: jax.Array, bs: BlockSizes):
  """Offsets of the forward's groups as SMEM blocks `[n tiles, c chunks, 1,
  kh*kw * groups * block_n]` (row-major (tap, group, o)), and their exact
  total `(hi, lo)` per output channel (padded)."""
  kh, kw, cin, cout = w.shape
  chunks = layout.cdiv(cin, bs.block_c)
  n_pad = layout.round_up(cout, bs.block_n)
  groups, _ = _groups(bs.block_c)
  w = jnp.pad(w.astype(jnp.float32),
              ((0, 0), (0, 0), (0, chunks * bs.block_c - cin),
               (0, n_pad - cout)))
  w = w.reshape(kh * kw, chunks, bs.block_c, n_pad)
  w = layout.pad_axis(w, 2, groups * GROUP)
  w = w.reshape(kh * kw, chunks, groups, GROUP, n_pad).transpose(1, 0, 2, 3, 4)
  offsets, total = layout.block_offsets(w.reshape(-1, GROUP, n_pad))
  offsets = offsets.reshape(chunks, kh * kw * groups, n_pad // bs.block_n,
                            bs.block_n).transpose(2, 0, 1, 3)
  return offsets.reshape(n_pad // bs.block_n, chunks, 1, -1), total


def _plan(kind: str, xp_shape, w_shape, strides, block_sizes, interpret):
  """(tiles, geometry, padded input channels, padded output channels)."""
  bs = block_sizes or get_block_sizes(kind, xp_shape, w_shape, strides,
                                      platform="cpu" if interpret else "tpu")
  return (bs, _geometry(xp_shape, w_shape, strides),
          layout.round_up(w_shape[2], bs.block_c),
          layout.round_up(w_shape[3], bs.block_n))


def _smem_spec(size: int, index_map):
  return pl.BlockSpec((None, None, None, size), index_map,
                      memory_space=pltpu.SMEM)


# ----------------------------------------------------------------- forward --


def _forward_kernel(w_ref, m_ref, *refs, kh: int, kw: int, sw: int,
                    block_c: int, block_n: int, col_blocks: int):
  x_refs, o_ref = refs[:kh], refs[kh]

  @pl.when(pl.program_id(3) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  groups, last = _groups(block_c)

  def tap_group(g, rows, accs, *, tap, x_ref, phase, shift, q0):
    def terms(c):
      xv = x_ref[phase, c, pl.ds(q0 + shift, SUBLANES), :]
      return [jnp.abs(xv - w_ref[(tap * block_c + c) * block_n + o])
              for o in range(block_n)]

    c0 = g * GROUP
    parts = tuple(terms(c0))  # the group's channels, in order
    if rows > 1:  # static trip count
      parts = lax.fori_loop(
          1, rows,
          lambda r, ps: tuple(p + t for p, t in zip(ps, terms(c0 + r))), parts)
    return tuple(acc + (part - m_ref[(tap * groups + g) * block_n + o])
                 for o, (acc, part) in enumerate(zip(accs, parts)))

  def col_block(qb, carry):
    q0 = pl.multiple_of(qb * SUBLANES, SUBLANES)
    accs = tuple(o_ref[o, pl.ds(q0, SUBLANES), :] for o in range(block_n))
    for i in range(kh):
      for j in range(kw):
        step = functools.partial(tap_group, tap=i * kw + j, x_ref=x_refs[i],
                                 phase=j % sw, shift=j // sw, q0=q0)
        if groups > 1:
          accs = lax.fori_loop(0, groups - 1,
                               lambda g, a, step=step: step(g, GROUP, a), accs)
        accs = step(groups - 1, last, accs)
    for o in range(block_n):
      o_ref[o, pl.ds(q0, SUBLANES), :] = accs[o]
    return carry

  lax.fori_loop(0, col_blocks, col_block, 0)


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def forward(xp: jax.Array, w: jax.Array, strides: Strides, *,
            block_sizes: BlockSizes | None = None,
            interpret: bool = False) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]|, float32.

  Same contract as `addernet_jax.reference.forward`. `interpret=True` runs the
  kernel in Pallas' TPU interpret mode (`pltpu.InterpretParams`) on any host.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("tpu_batch.forward", xp.shape, w.shape, strides)
  bs, geo, c_pad, n_pad = _plan("forward", xp.shape, w.shape, strides,
                                block_sizes, interpret)
  kh, kw, _, cout = w.shape
  sh, sw = strides
  xt = _to_lanes(xp, xp.shape[1], geo.in_cols, sw, c_pad, geo.n_blocks)
  offsets, (hi, lo) = _forward_offsets(w, bs)
  groups, _ = _groups(bs.block_c)
  x_specs = [pl.BlockSpec((None, None, sw, bs.block_c, geo.in_cols, LANES),
                          lambda b, p, o, c, i=i: (b, p * sh + i, 0, c, 0, 0))
             for i in range(kh)]
  acc = pl.pallas_call(
      functools.partial(_forward_kernel, kh=kh, kw=kw, sw=sw,
                        block_c=bs.block_c, block_n=bs.block_n,
                        col_blocks=geo.out_cols // SUBLANES),
      out_shape=layout.out_struct(
          (geo.n_blocks, geo.ho, n_pad, geo.out_cols, LANES), jnp.float32,
          xp, w),
      grid=(geo.n_blocks, geo.ho, n_pad // bs.block_n, c_pad // bs.block_c),
      in_specs=[
          _smem_spec(kh * kw * bs.block_c * bs.block_n,
                     lambda b, p, o, c: (o, c, 0, 0)),
          _smem_spec(kh * kw * groups * bs.block_n,
                     lambda b, p, o, c: (o, c, 0, 0)),
      ] + x_specs,
      out_specs=pl.BlockSpec((None, None, bs.block_n, geo.out_cols, LANES),
                             lambda b, p, o, c: (b, p, o, 0, 0)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="adder_forward_tpu_batch",
  )(_filters(w, bs), offsets, *([xt] * kh))
  acc = acc.transpose(0, 4, 1, 3, 2).reshape(
      geo.n_blocks * LANES, geo.ho, geo.out_cols, n_pad)
  acc = acc[:xp.shape[0], :, :geo.wo, :cout]
  return -(hi[:cout] + (acc + lo[:cout]))


# ---------------------------------------------------------- input gradient --


def _input_grad_kernel(w_ref, x_ref, *refs, kh: int, kw: int, sh: int,
                       sw: int, block_c: int, block_n: int, col_blocks: int,
                       row_taps: int, col_taps: int):
  g_refs, o_ref = refs[:row_taps], refs[row_taps]

  @pl.when(pl.program_id(3) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  tile = _channel_tile(block_c)
  o_groups, o_last = _groups(block_n)

  def out_group(og, rows, accs, *, xs, c0, tap, g_ref, shift, q0):
    def terms(o):
      gv = g_ref[o, pl.ds(q0 + shift, SUBLANES), :]
      return [jnp.clip(w_ref[(tap * block_c + c0 + u) * block_n + o] - xs[u],
                       -1.0, 1.0) * gv for u in range(tile)]

    o0 = og * GROUP
    parts = tuple(terms(o0))  # the group's output channels, in order
    if rows > 1:  # static trip count
      parts = lax.fori_loop(
          1, rows,
          lambda r, ps: tuple(p + t for p, t in zip(ps, terms(o0 + r))), parts)
    return tuple(acc + part for acc, part in zip(accs, parts))

  def phase_rows(row_phase: int):
    """The input rows `r = rr*sh + row_phase`: taps i = row_phase + a*sh read
    output row rr - a (G's block a)."""
    for col_phase in range(sw):
      taps = [(a, row_phase + a * sh, b, col_phase + b * sw)
              for a in range(row_taps) if row_phase + a * sh < kh
              for b in range(col_taps) if col_phase + b * sw < kw]
      if not taps:
        continue

      def col_block(qb, carry, col_phase=col_phase, taps=taps):
        q0 = pl.multiple_of(qb * SUBLANES, SUBLANES)

        def channel_tile(ct, carry):
          c0 = ct * tile
          cols = pl.ds(q0, SUBLANES)
          xs = [x_ref[col_phase, c0 + u, cols, :] for u in range(tile)]
          accs = tuple(o_ref[col_phase, c0 + u, cols, :] for u in range(tile))
          for a, i, b, j in taps:
            step = functools.partial(out_group, xs=xs, c0=c0, tap=i * kw + j,
                                     g_ref=g_refs[a], shift=col_taps - 1 - b,
                                     q0=q0)
            if o_groups > 1:
              accs = lax.fori_loop(
                  0, o_groups - 1,
                  lambda og, acc, step=step: step(og, GROUP, acc), accs)
            accs = step(o_groups - 1, o_last, accs)
          for u in range(tile):
            o_ref[col_phase, c0 + u, cols, :] = accs[u]
          return carry

        return lax.fori_loop(0, block_c // tile, channel_tile, carry)

      lax.fori_loop(0, col_blocks, col_block, 0)

  if sh == 1:
    phase_rows(0)
  else:
    row_phase = lax.rem(pl.program_id(1), sh)
    for phase in range(sh):
      if phase < kh:  # rows of a phase no tap reaches keep their zeros
        pl.when(row_phase == phase)(functools.partial(phase_rows, phase))


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides, *,
               block_sizes: BlockSizes | None = None,
               interpret: bool = False) -> jax.Array:
  """dxp = sum over taps/cout of clip(w - xp, -1, 1) * g, float32 `[n,hp,wp,cin]`.

  Same contract as `addernet_jax.reference.input_grad`.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("tpu_batch.input_grad", xp.shape, w.shape, strides,
                      g.shape)
  bs, geo, c_pad, n_pad = _plan("input_grad", xp.shape, w.shape, strides,
                                block_sizes, interpret)
  kh, kw, _, cout = w.shape
  sh, sw = strides
  xt = _to_lanes(xp, geo.dx_rows, geo.dx_cols, sw, c_pad, geo.n_blocks)
  # G row rr + A - 1 holds output row rr, column q + B - 1 output column q;
  # every other row and column is zero, so taps off the output add nothing.
  top, left = geo.row_taps - 1, geo.col_taps - 1
  gt = jnp.pad(g.astype(jnp.float32),
               ((0, geo.n_blocks * LANES - g.shape[0]),
                (top, geo.g_rows - top - geo.ho),
                (left, geo.g_cols - left - geo.wo), (0, n_pad - cout)))
  gt = gt.reshape(geo.n_blocks, LANES, geo.g_rows, geo.g_cols, n_pad)
  gt = gt.transpose(0, 2, 4, 3, 1)
  g_specs = [pl.BlockSpec((None, None, bs.block_n, geo.g_cols, LANES),
                          lambda b, r, c, o, a=a: (b, lax.div(r, sh) - a + top,
                                                   o, 0, 0))
             for a in range(geo.row_taps)]
  lanes_spec = pl.BlockSpec((None, None, sw, bs.block_c, geo.dx_cols, LANES),
                            lambda b, r, c, o: (b, r, 0, c, 0, 0))
  dxt = pl.pallas_call(
      functools.partial(_input_grad_kernel, kh=kh, kw=kw, sh=sh, sw=sw,
                        block_c=bs.block_c, block_n=bs.block_n,
                        col_blocks=geo.dx_cols // SUBLANES,
                        row_taps=geo.row_taps, col_taps=geo.col_taps),
      out_shape=layout.out_struct(xt.shape, jnp.float32, xp, w, g),
      grid=(geo.n_blocks, geo.dx_rows, c_pad // bs.block_c,
            n_pad // bs.block_n),
      in_specs=[_smem_spec(kh * kw * bs.block_c * bs.block_n,
                           lambda b, r, c, o: (o, c, 0, 0)),
                lanes_spec] + g_specs,
      out_specs=lanes_spec,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel",
                               "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="adder_input_grad_tpu_batch",
  )(_filters(w, bs), xt, *([gt] * geo.row_taps))
  return _from_lanes(dxt, xp.shape)
