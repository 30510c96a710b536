"""Pallas Triton adder kernels shaped like a SIMT SGEMM (register tiles).

The second GPU kernel family beside `kernels.gpu` (same entry points and
contracts; `kernels.gpu` stays as the other choice so both can be measured).
The adder forward is an "L1 matmul" of (pixels x taps*cin) by (taps*cin x
cout) with `acc += |x - w|` in place of the FMA; the input gradient is one of
(input pixels x taps*cout) by (taps*cout x cin) with
`acc += clip(w - x, -1, 1) * g`. Both are written the way SIMT GEMMs reach
most of the FP32 peak:

- Coalesced, channel-major operands. The padded input is split into stride
  phases and stored `[n, phases, cin, L]` (a channel's pixels contiguous), the
  output gradient `[n, cout, L]`, so the 32 lanes of a warp read 32
  consecutive pixels of one channel (one to two 128-byte lines; the old
  kernels read pixels `cin` floats apart).
- Per-thread register tiles. A program's accumulators are R*G tensors of
  shape `[V, WC, 32 * WP]` (V = min(C, 4), G = C / V): lanes (and WP warps)
  along pixels, WC warps along channels, so each thread holds an R-pixel x
  C-channel tile. Per reduction channel a thread loads R pixel values
  (coalesced across the warp) and G 128-bit filter vectors (the same for the
  whole warp) for R*C MACs: (R + G) / (R*C) loads per MAC. Separate tensors
  rather than one `[C, R, ...]` tensor because Triton then keeps its default
  layout (one element per thread per tensor) for loads and arithmetic
  alike; with one big tensor its coalescing pass picked other layouts for
  the loads (replicated loads, spills), seen in the generated SASS.
- Static taps, unrolled channels. Taps are a Python loop (their offsets are
  immediates); the channel loop is a `fori_loop` over groups of `unroll`
  channels unrolled in its body. The pixel tile plus its halo is read by every
  tap from L1 (Pallas Triton has no explicit shared memory).
- Precise accumulation (forward). Each tap's channel sum (at most `chunk`
  channels) goes into a fresh register accumulator and is then added into a
  Kahan-compensated running total ("kahan", the default): 4 FADDs per tap per
  output, i.e. 4/cin per MAC. "tap" adds the per-tap sums plainly (1 FADD per
  tap per output), "flat" is one sequential accumulator (the old kernels).
- Two FP32 instructions per forward MAC: `|x - w|` goes through inline PTX
  `abs.f32` (Pallas' `jnp.abs` becomes `abs.ftz.f32`, which ptxas does not
  fold into the non-flushing FADD: 3 FADDs per MAC in the first kernels).
- Exact clip in one instruction (input gradient): `clip(d, -1, 1)` is PTX
  `min.xorsign.abs.f32 d, d, 1.0` (sign of d, magnitude min(|d|, 1); sm_86+;
  one `FMNMX.XORSIGN` in SASS) through `elementwise_inline_asm`, with
  `jnp.clip` as its twin in interpret mode; `clip="minmax"` keeps `jnp.clip`
  (two FMNMX). 3 FP32 instructions per input-gradient MAC (FADD, FMNMX,
  FFMA) instead of 4.

Instruction counts above are from the SASS of these kernels built for sm_90
by Triton 3.9 (static analysis), not from a GPU run.

The pure reference these kernels must match is `addernet_jax.reference`.
Tiles and options live in `BlockSizes`; `get_block_sizes` sizes grids for at
least `MIN_BLOCKS_PER_SM` blocks and `MIN_WARPS_PER_SM` warps per SM where
the layer has that much work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from . import gpu, layout

try:  # Triton compiler params and inline asm: jax.experimental.pallas.triton.
  from jax.experimental.pallas import triton as _pltriton
  _TritonParams = _pltriton.CompilerParams
  _inline_asm = getattr(_pltriton, "elementwise_inline_asm", None)
except (ImportError, AttributeError):  # pragma: no cover - removed backend.
  _TritonParams = None
  _inline_asm = None

Strides = tuple[int, int]

LANES = 32
# H100 SXM / H200: 132 SMs. Used when no GPU is attached (lowering, tests).
DEFAULT_NUM_SMS = 132
# Fill the chip: at least 4 blocks and 8 warps (2 per scheduler) per SM, in
# the grid and resident at once (registers permitting). The register tiles
# give each warp R*C independent accumulators, and the loop's loads are
# software-pipelined: 2 warps per scheduler is the least, more is for the
# tune sweep to find.
MIN_BLOCKS_PER_SM = 4
MIN_WARPS_PER_SM = 8
ACCUMULATE = ("kahan", "tap", "flat")
CLIP = ("xorsign", "minmax")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles and options of one launch.

  A program computes `block_pix = pix_per_thread * 32 * warps_pix` pixels by
  `block_ch = ch_per_thread * warps_ch` channels (cout for the forward, cin
  for the input gradient) with `warps_pix * warps_ch` warps.

  Attributes:
    pix_per_thread: R, pixels of a thread's register tile (power of two).
    ch_per_thread: C, channels of a thread's register tile (power of two).
    warps_pix: warps along pixels (power of two).
    warps_ch: warps along channels (power of two).
    unroll: reduction channels per loop iteration, unrolled (>= 1).
    chunk: most channels summed into one fresh partial accumulator per tap
      (forward; a multiple of `unroll`).
    accumulate: forward accumulation, one of `ACCUMULATE`.
    clip: input-gradient clip, one of `CLIP`.
    num_stages: Triton software-pipelining depth.
  """
  pix_per_thread: int
  ch_per_thread: int
  warps_pix: int = 2
  warps_ch: int = 2
  unroll: int = 4
  chunk: int = 64
  accumulate: str = "kahan"
  clip: str = "xorsign"
  num_stages: int = 2

  def __post_init__(self):
    for name in ("pix_per_thread", "ch_per_thread", "warps_pix", "warps_ch"):
      value = getattr(self, name)
      if not isinstance(value, int) or not layout.is_pow2(value):
        raise ValueError(f"BlockSizes.{name} must be a power of two, got "
                         f"{value!r}")
    for name in ("unroll", "chunk", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got "
                         f"{value!r}")
    if self.chunk % self.unroll:
      raise ValueError(f"BlockSizes.chunk ({self.chunk}) must be a multiple "
                       f"of unroll ({self.unroll})")
    if self.accumulate not in ACCUMULATE:
      raise ValueError(f"BlockSizes.accumulate must be one of {ACCUMULATE}, "
                       f"got {self.accumulate!r}")
    if self.clip not in CLIP:
      raise ValueError(f"BlockSizes.clip must be one of {CLIP}, got "
                       f"{self.clip!r}")

  @property
  def vec(self) -> int:
    """V: channels per filter load (one 128-bit load of 4 floats at most)."""
    return min(self.ch_per_thread, 4)

  @property
  def groups(self) -> int:
    """G: channel groups of V in a thread's tile."""
    return self.ch_per_thread // self.vec

  @property
  def lanes(self) -> int:
    """P: pixels of one register-tile row across the program's threads."""
    return LANES * self.warps_pix

  @property
  def tensor_shape(self) -> tuple[int, int, int]:
    """Shape `[V, WC, P]` of each of the R*G accumulator tensors."""
    return (self.vec, self.warps_ch, self.lanes)

  @property
  def block_pix(self) -> int:
    return self.pix_per_thread * self.lanes

  @property
  def block_ch(self) -> int:
    return self.ch_per_thread * self.warps_ch

  @property
  def num_warps(self) -> int:
    return self.warps_pix * self.warps_ch


# ------------------------------------------------------------ heuristics --


def _num_sms(platform: str) -> int:
  if platform == "gpu":
    try:
      count = getattr(jax.devices("gpu")[0], "core_count", None)
      if count:
        return int(count)
    except RuntimeError:
      pass
  return DEFAULT_NUM_SMS


def _has_xorsign(platform: str) -> bool:
  """`min.xorsign.abs.f32` needs sm_86 or newer; True where no GPU says."""
  if platform == "gpu":
    try:
      capability = getattr(jax.devices("gpu")[0], "compute_capability", None)
      if capability:
        return float(capability) >= 8.6
    except (RuntimeError, ValueError):
      pass
  return True


def problem(kind: str, xp_shape, w_shape, strides: Strides,
            rows=None, cols=None) -> dict:
  """The pixel grid (rows, cols, pitch), the channels a program tiles, the
  reduction channels and the taps per launch of one kernel call."""
  kh, kw, cin, cout = w_shape
  if kind == "forward":
    ho, wo = layout.output_hw(xp_shape, w_shape, strides)
    return {"rows": ho, "cols": wo, "pitch": layout.cdiv(xp_shape[2],
                                                         strides[1]),
            "channels": cout, "reduce": cin, "launch_taps": [kh * kw]}
  plan = gpu.input_grad_plan(xp_shape, w_shape, strides, rows, cols)
  return {"rows": plan["hi"] - plan["lo"], "cols": plan["chi"] - plan["clo"],
          "pitch": plan["pitch"], "channels": cin, "reduce": cout,
          "launch_taps": [len(p) for p in plan["phases"] if p]}


def grid_blocks(kind: str, xp_shape, w_shape, strides: Strides,
                bs: BlockSizes, rows=None, cols=None) -> dict:
  """Blocks per launch and the pixels and channels the programs compute."""
  prob = problem(kind, xp_shape, w_shape, strides, rows, cols)
  tiling = gpu.pixel_tiles(prob["rows"], prob["cols"], prob["pitch"],
                           bs.block_pix)
  ch_tiles = layout.cdiv(prob["channels"], bs.block_ch)
  return {**prob, "blocks": xp_shape[0] * tiling["tiles"] * ch_tiles,
          "positions": tiling["positions"], "ch_tiles": ch_tiles,
          "computed_channels": ch_tiles * bs.block_ch}


def estimated_registers(kind: str, bs: BlockSizes) -> int:
  """Registers per thread, an upper estimate checked against ptxas (sm_90,
  Triton 3.9) on a few tiles (ptxas decides): what the loop keeps per
  element (accumulator; forward "tap" adds the per-tap partial, "kahan" also
  the compensation; the input gradient keeps the thread's inputs), the
  operands of `unroll` channels (double-buffered by the forward's software
  pipelining), and addresses and loop state. Forward 2x8 "kahan": 192
  estimated, 168 by ptxas; 4x8 "kahan": 256 estimated, 255 and spills by
  ptxas. Input gradient 2x8: 112 estimated, 66 by ptxas."""
  tile = bs.pix_per_thread * bs.ch_per_thread
  operands = bs.unroll * (bs.pix_per_thread + bs.ch_per_thread)
  if kind == "forward":
    per_element = {"kahan": 3, "tap": 2, "flat": 1}[bs.accumulate]
    return per_element * tile + 2 * operands + 64
  return 2 * tile + operands + 40


MAX_REGISTERS = 255


def blocks_per_sm(kind: str, bs: BlockSizes) -> int:
  """Resident blocks per SM the register file allows (65536 registers,
  allocated in units of 8 per thread; at most 32 blocks); 0 where the
  estimate exceeds MAX_REGISTERS (ptxas would spill)."""
  regs = estimated_registers(kind, bs)
  if regs > MAX_REGISTERS:
    return 0
  regs = layout.round_up(regs, 8)
  return min(65536 // (regs * LANES * bs.num_warps), 32)


def loads_per_mac(bs: BlockSizes) -> float:
  """Load instructions per MAC of a thread: R pixel values and G filter
  vectors per reduction channel for R*C MACs."""
  return ((bs.pix_per_thread + bs.groups)
          / (bs.pix_per_thread * bs.ch_per_thread))


# Register tiles R x C the GPU heuristic considers, fewest loads per MAC first
# (ties: fewer registers).
TILES = ((8, 8), (4, 8), (8, 4), (2, 8), (4, 4), (1, 8), (8, 2), (2, 4),
         (4, 2), (2, 2), (1, 4), (1, 2), (1, 1))
WARPS = ((1, 4), (2, 2), (4, 1), (1, 2), (2, 1))


def get_block_sizes(kind: str, xp_shape, w_shape, strides: Strides,
                    platform: str | None = None, *, num_sms: int | None = None,
                    rows=None, cols=None) -> BlockSizes:
  """Heuristic tiles for `kind` ("forward" or "input_grad") on `platform`.

  On "gpu": the register tile (`TILES`) and warp split (`WARPS`, 4 or 2
  warps) with the fewest loads per MAC such that the grid has at least
  MIN_BLOCKS_PER_SM blocks and MIN_WARPS_PER_SM warps for every SM, the
  estimated registers (`estimated_registers`, at most MAX_REGISTERS) let
  that many reside at once, and the tiles compute at most 1/8 more pixels x channels than the
  finest tiling would; if none fills the chip, the one with the most blocks
  (less waste weighing in). The clip is "xorsign" on sm_86 and newer (or
  with no GPU attached), "minmax" before. On other platforms (interpret
  mode) as few grid steps as possible: one register-tile row of up to 1024
  pixels by up to 256 channels, channels not unrolled.
  """
  if kind not in ("forward", "input_grad"):
    raise ValueError(f"get_block_sizes: kind must be 'forward' or "
                     f"'input_grad', got {kind!r}")
  platform = platform or jax.default_backend()
  prob = problem(kind, xp_shape, w_shape, strides, rows, cols)
  if platform != "gpu":
    positions = prob["rows"] * layout.next_pow2(prob["cols"])
    # unroll=1: interpret cost is mostly XLA compiling the unrolled body.
    return BlockSizes(
        pix_per_thread=1, ch_per_thread=4,
        warps_pix=min(layout.next_pow2(layout.cdiv(positions, LANES)), 32),
        warps_ch=min(layout.next_pow2(layout.cdiv(prob["channels"], 4)), 64),
        unroll=1)
  sms = num_sms or _num_sms(platform)
  clip = "xorsign" if _has_xorsign(platform) else "minmax"
  # Waste against the least any tiling computes: 32-pixel tiles, channels
  # rounded to 4 (a 9 x 9 window in 32-pixel tiles computes 96 pixels).
  least = (gpu.pixel_tiles(prob["rows"], prob["cols"], prob["pitch"],
                           LANES)["positions"]
           * layout.round_up(prob["channels"], 4))
  best, best_key = None, None
  for r, c in TILES:
    if kind == "input_grad" and r * c > 32:
      continue  # an 8x8 input-gradient tile did not finish building in 20 min
    for wp, wc in WARPS:
      bs = BlockSizes(pix_per_thread=r, ch_per_thread=c, warps_pix=wp,
                      warps_ch=wc, clip=clip)
      resident = blocks_per_sm(kind, bs)
      if not resident:
        continue
      grid = grid_blocks(kind, xp_shape, w_shape, strides, bs, rows, cols)
      waste = grid["positions"] * grid["computed_channels"] / least
      fills = (min(grid["blocks"] // sms, resident) >= MIN_BLOCKS_PER_SM
               and min(grid["blocks"] // sms, resident) * bs.num_warps
               >= MIN_WARPS_PER_SM and waste <= 1.125)
      key = ((0, loads_per_mac(bs), waste, -bs.num_warps) if fills else
             (1, -grid["blocks"] / waste, loads_per_mac(bs), 0))
      if best_key is None or key < best_key:
        best, best_key = bs, key
  return best


def _abs(d: jax.Array, interpret: bool) -> jax.Array:
  """|d|. On the GPU PTX `abs.f32` (inline asm): Pallas lowers `jnp.abs` to
  libdevice's `__nv_fabsf`, which Triton emits as `abs.ftz.f32`, and ptxas
  does not fold a flushing abs into a non-flushing FADD (3 FADDs per MAC,
  seen in the SASS); a plain `abs.f32` becomes the FADD's free |.| operand
  (2 per MAC). Interpret mode: `jnp.abs` (the same values)."""
  if interpret or _inline_asm is None:
    return jnp.abs(d)
  [out] = _inline_asm("abs.f32 $0, $1;", args=[d], constraints="=r,r",
                      pack=1, result_shape_dtypes=[
                          jax.ShapeDtypeStruct(d.shape, jnp.float32)])
  return out


def _clip1(d: jax.Array, mode: str, interpret: bool) -> jax.Array:
  """clip(d, -1, 1). "xorsign" on the GPU: PTX `min.xorsign.abs.f32 d, d,
  1.0` = sign(d) * min(|d|, 1), exact for every non-NaN d (-0 stays -0; a
  NaN gives +-1 where clip gives NaN); sm_86 and newer. Otherwise, and in
  interpret mode, `jnp.clip` (the same values)."""
  if mode == "minmax" or interpret or _inline_asm is None:
    return jnp.clip(d, -1.0, 1.0)
  [out] = _inline_asm("min.xorsign.abs.f32 $0, $1, 0f3F800000;", args=[d],
                      constraints="=r,r", pack=1, result_shape_dtypes=[
                          jax.ShapeDtypeStruct(d.shape, jnp.float32)])
  return out


def _compiler_params(bs: BlockSizes, interpret: bool):
  if interpret or _TritonParams is None:
    return None
  return _TritonParams(num_warps=bs.num_warps, num_stages=bs.num_stages)



# ----------------------------------------------------------------- shared --


def _pixel_offsets(tiling: dict, pitch: int, bs: BlockSizes, r: int,
                   origin: int = 0):
  """Flat grid offsets of pixel row `r` of this program's register tiles,
  shape `[1, 1, P]`: tile pixels `r * P + p` (lanes on consecutive pixels)."""
  p_ = bs.lanes
  local = lax.broadcasted_iota(jnp.int32, (1, 1, p_), 2) + r * p_
  tile = pl.program_id(1)
  if tiling["flat"]:
    return tile * tiling["block_pix"] + local + origin
  tc = tiling["tile_cols"]
  row0 = lax.div(tile, tiling["col_tiles"]) * tiling["tile_rows"]
  col0 = lax.rem(tile, tiling["col_tiles"]) * tc
  # tile_cols is a power of two: a shift and a mask.
  shift = tc.bit_length() - 1
  return ((row0 + lax.shift_right_logical(local, jnp.int32(shift))) * pitch
          + col0 + jnp.bitwise_and(local, jnp.int32(tc - 1)) + origin)


def _channel_offsets(bs: BlockSizes, g: int):
  """Block-local channel of each element of group `g`, shape `[V, WC, 1]`:
  warp `wc` owns channels `wc * C + g * V + v`."""
  shape = (bs.vec, bs.warps_ch, 1)
  return (lax.broadcasted_iota(jnp.int32, shape, 1) * bs.ch_per_thread
          + lax.broadcasted_iota(jnp.int32, shape, 0) + g * bs.vec)


def _tiles_reach(tiling: dict, pitch: int) -> int:
  """One past the largest flat offset a tile's pixel can have."""
  if tiling["flat"]:
    return tiling["positions"]
  return ((tiling["row_tiles"] * tiling["tile_rows"] - 1) * pitch
          + tiling["col_tiles"] * tiling["tile_cols"])


def _out_shape(n: int, tiles: int, ch_tiles: int, bs: BlockSizes,
               *operands: jax.Array):
  return layout.out_struct((n, tiles, ch_tiles, bs.pix_per_thread
                            * bs.groups, *bs.tensor_shape), jnp.float32,
                           *operands)


def _out_spec(bs: BlockSizes):
  return pl.BlockSpec((None, None, None, bs.pix_per_thread * bs.groups,
                       *bs.tensor_shape),
                      lambda b, f, o: (b, f, o, 0, 0, 0, 0))


def _untile(y: jax.Array, tiling: dict, bs: BlockSizes, rows: int, cols: int,
            pitch: int) -> jax.Array:
  """`[n, tiles, ch_tiles, R*G, V, WC, P]` -> `[n, rows, cols, channels]`."""
  n, tiles, ch_tiles = y.shape[:3]
  y = y.reshape(n, tiles, ch_tiles, bs.pix_per_thread, bs.groups, bs.vec,
                bs.warps_ch, bs.lanes)
  # pixel = r * P + p; channel = tile * block_ch + wc * C + g * V + v.
  y = y.transpose(0, 1, 3, 7, 2, 6, 4, 5).reshape(
      n, tiles * bs.block_pix, ch_tiles * bs.block_ch)
  ch = y.shape[-1]
  if tiling["flat"]:
    y = y[:, :rows * pitch].reshape(n, rows, pitch, ch)
    return y[:, :, :cols]
  y = y.reshape(n, tiling["row_tiles"], tiling["col_tiles"],
                tiling["tile_rows"], tiling["tile_cols"], ch)
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(
      n, tiling["row_tiles"] * tiling["tile_rows"],
      tiling["col_tiles"] * tiling["tile_cols"], ch)
  return y[:, :rows, :cols]


# ----------------------------------------------------------------- forward --


def _forward_kernel(x_ref, w_ref, o_ref, *, taps, cin: int, tiling: dict,
                    pitch: int, bs: BlockSizes, interpret: bool):
  rr, gg, unroll = bs.pix_per_thread, bs.groups, bs.unroll
  pixels = [_pixel_offsets(tiling, pitch, bs, r) for r in range(rr)]
  chans = [_channel_offsets(bs, g) for g in range(gg)]
  zeros = tuple(jnp.zeros(bs.tensor_shape, jnp.float32)
                for _ in range(rr * gg))
  chunk = min(bs.chunk, cin)
  num_chunks, last = divmod(cin, chunk)

  def channel_sum(t, phase, index, c0, groups, part):
    """part + the sum over `groups * unroll` channels from c0 of |x - w|."""
    def body(gi, part):
      part = list(part)
      c = c0 + gi * unroll
      for u in range(unroll):  # static: unrolled
        xs = [x_ref[phase, c + u, index[r]].astype(jnp.float32)
              for r in range(rr)]
        ws = [w_ref[t, c + u, chans[g]] for g in range(gg)]
        for r in range(rr):
          for g in range(gg):
            part[r * gg + g] = part[r * gg + g] + _abs(xs[r] - ws[g],
                                                       interpret)
      return tuple(part)
    return lax.fori_loop(0, groups, body, part)

  def add(total, part):
    acc, comp = total
    if bs.accumulate == "kahan":  # 4 FADDs per element: per tap, not per MAC
      ys = [p - c for p, c in zip(part, comp)]
      ts = [a + y for a, y in zip(acc, ys)]
      return tuple(ts), tuple((t - a) - y for t, a, y in zip(ts, acc, ys))
    return tuple(a + p for a, p in zip(acc, part)), comp

  total = (zeros, zeros)
  for t, (phase, offset) in enumerate(taps):  # static taps
    index = [p + offset for p in pixels]
    if bs.accumulate == "flat":
      total = (channel_sum(t, phase, index, 0, cin // unroll, total[0]),
               total[1])
      continue
    if num_chunks > 1:
      def chunk_body(k, total, t=t, phase=phase, index=index):
        part = channel_sum(t, phase, index, k * chunk, chunk // unroll, zeros)
        return add(total, part)
      total = lax.fori_loop(0, num_chunks, chunk_body, total)
    else:
      total = add(total, channel_sum(t, phase, index, 0, chunk // unroll,
                                     zeros))
    if last:
      total = add(total, channel_sum(t, phase, index, num_chunks * chunk,
                                     last // unroll, zeros))
  for k, acc in enumerate(total[0]):
    o_ref[k] = -acc


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def forward(xp: jax.Array, w: jax.Array, strides: Strides, *,
            block_sizes: BlockSizes | None = None,
            interpret: bool = False) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]|, float32.

  Same contract as `kernels.gpu.forward`.

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
  layout.check_shapes("triton_simt.forward", xp.shape, w.shape, strides)
  kh, kw, cin, cout = w.shape
  n = xp.shape[0]
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  bs = block_sizes or get_block_sizes(
      "forward", xp.shape, w.shape, strides,
      platform="cpu" if interpret else "gpu")
  xs, wq, taps = layout.phase_split(xp, strides, kh, kw)
  tiling = gpu.pixel_tiles(ho, wo, wq, bs.block_pix)
  reach = _tiles_reach(tiling, wq) + max(off for _, off in taps)
  cin_pad = layout.round_up(cin, bs.unroll)
  # Channel-major phases [n, phases, cin_pad, L]: zero channels add |0 - 0|.
  xs = layout.pad_axis(layout.pad_axis(xs, 2, reach), 3, cin_pad)
  xs = xs.transpose(0, 1, 3, 2)
  ch_tiles = layout.cdiv(cout, bs.block_ch)
  wt = w.astype(jnp.float32).reshape(kh * kw, cin, cout)
  wt = layout.pad_axis(layout.pad_axis(wt, 2, ch_tiles * bs.block_ch), 1,
                       cin_pad)
  nph, length = xs.shape[1], xs.shape[3]
  y = pl.pallas_call(
      functools.partial(_forward_kernel, taps=tuple(taps), cin=cin_pad,
                        tiling=tiling, pitch=wq, bs=bs, interpret=interpret),
      out_shape=_out_shape(n, tiling["tiles"], ch_tiles, bs, xp, w),
      grid=(n, tiling["tiles"], ch_tiles),
      in_specs=[
          pl.BlockSpec((None, nph, cin_pad, length),
                       lambda b, f, o: (b, 0, 0, 0)),
          pl.BlockSpec((kh * kw, cin_pad, bs.block_ch),
                       lambda b, f, o: (0, 0, o)),
      ],
      out_specs=_out_spec(bs),
      compiler_params=_compiler_params(bs, interpret),
      interpret=interpret,
      name="adder_forward_simt",
  )(xs, wt)
  return _untile(y, tiling, bs, ho, wo, wq)[..., :cout]


# ---------------------------------------------------------- input gradient --


def _input_grad_kernel(x_ref, g_ref, w_ref, o_ref, *, taps, cout: int,
                       tiling: dict, pitch: int, origin: int, bs: BlockSizes,
                       interpret: bool):
  rr, gg, unroll = bs.pix_per_thread, bs.groups, bs.unroll
  pixels = [_pixel_offsets(tiling, pitch, bs, r, origin) for r in range(rr)]
  chans = [_channel_offsets(bs, g) for g in range(gg)]
  # This thread's input values, kept in registers for the whole reduction;
  # read once from the pixel-major input: a thread's V channels of a pixel
  # are one vector load, which gives Triton the accumulators' layout.
  xv = [x_ref[pixels[r], chans[g]].astype(jnp.float32)
        for r in range(rr) for g in range(gg)]
  acc = tuple(jnp.zeros(bs.tensor_shape, jnp.float32)
              for _ in range(rr * gg))
  for tap, offset in taps:  # static: at most kh*kw taps
    index = [p + offset for p in pixels]

    def body(oi, acc, tap=tap, index=index):
      acc = list(acc)
      o = oi * unroll
      for u in range(unroll):  # static: unrolled
        gs = [g_ref[o + u, index[r]].astype(jnp.float32) for r in range(rr)]
        ws = [w_ref[tap, o + u, chans[g]] for g in range(gg)]
        for r in range(rr):
          for g in range(gg):
            k = r * gg + g
            acc[k] = acc[k] + _clip1(ws[g] - xv[k], bs.clip,
                                     interpret) * gs[r]
      return tuple(acc)
    acc = lax.fori_loop(0, cout // unroll, body, acc)
  for k, a in enumerate(acc):
    o_ref[k] = a


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

  Same contract as `kernels.gpu.input_grad` (and its `rows=` / `cols=`
  window of the padded input; outside it the result is zeros): the gradient
  with respect to the padded input `[n, hp, wp, cin]`, float32, one launch
  per stride phase that some tap reaches (`gpu.input_grad_plan`).
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("triton_simt.input_grad", xp.shape, w.shape, strides,
                      g.shape)
  kh, kw, cin, cout = w.shape
  n, hp, wp, _ = xp.shape
  sh, sw = strides
  plan = gpu.input_grad_plan(xp.shape, w.shape, strides, rows, cols)
  n_rows, width, pitch = plan["rows"], plan["width"], plan["pitch"]
  lo, hi, clo, chi = plan["lo"], plan["hi"], plan["clo"], plan["chi"]
  bs = block_sizes or get_block_sizes(
      "input_grad", xp.shape, w.shape, strides,
      platform="cpu" if interpret else "gpu", rows=rows, cols=cols)
  tiling = gpu.pixel_tiles(hi - lo, chi - clo, pitch, bs.block_pix)
  origin = lo * pitch + clo
  reach = origin + _tiles_reach(tiling, pitch)
  ch_tiles = layout.cdiv(cin, bs.block_ch)
  cin_pad = ch_tiles * bs.block_ch
  cout_pad = layout.round_up(cout, bs.unroll)
  # Phases of x, flat with the plan's pitch, pixel-major (read once per
  # program): [n, sh*sw, length, cin_pad].
  xq = jnp.pad(xp, ((0, 0), (0, n_rows * sh - hp), (0, width * sw - wp),
                    (0, cin_pad - cin)))
  xq = xq.reshape(n, n_rows, sh, width, sw, cin_pad).transpose(0, 2, 4, 1, 3,
                                                               5)
  xq = jnp.pad(xq, ((0, 0),) * 4 + ((0, pitch - width), (0, 0)))
  xq = layout.pad_axis(xq.reshape(n, sh * sw, n_rows * pitch, cin_pad), 2,
                       reach)
  # The output gradient shifted by (mh, mw), channel-major and flat with the
  # same pitch: [n, cout_pad, glen]; zero channels add clip(..) * 0.
  ho, wo = g.shape[1:3]
  g_rows = max(n_rows, ho) + plan["mh"]
  gd = jnp.pad(g, ((0, 0), (plan["mh"], g_rows - plan["mh"] - ho),
                   (plan["mw"], pitch - plan["mw"] - wo), (0, cout_pad - cout)))
  gd = gd.reshape(n, g_rows * pitch, cout_pad).transpose(0, 2, 1)
  gd = layout.pad_axis(gd, 2, reach + plan["mh"] * pitch + plan["mw"])
  # Filters [taps, cout_pad, cin_pad]: a thread's channels are contiguous.
  wt = w.astype(jnp.float32).reshape(kh * kw, cin, cout).transpose(0, 2, 1)
  wt = layout.pad_axis(layout.pad_axis(wt, 1, cout_pad), 2, cin_pad)
  xlen, glen = xq.shape[2], gd.shape[2]
  phases = []
  for phase, taps in enumerate(plan["phases"]):
    if not taps:
      phases.append(jnp.zeros((n, hi - lo, chi - clo, cin_pad), jnp.float32))
      continue
    out = pl.pallas_call(
        functools.partial(_input_grad_kernel, taps=taps, cout=cout_pad,
                          tiling=tiling, pitch=pitch, origin=origin, bs=bs,
                          interpret=interpret),
        out_shape=_out_shape(n, tiling["tiles"], ch_tiles, bs, xp, w, g),
        grid=(n, tiling["tiles"], ch_tiles),
        in_specs=[
            pl.BlockSpec((None, None, xlen, bs.block_ch),
                         lambda b, f, c, phase=phase: (b, phase, 0, c)),
            pl.BlockSpec((None, cout_pad, glen), lambda b, f, c: (b, 0, 0)),
            pl.BlockSpec((kh * kw, cout_pad, bs.block_ch),
                         lambda b, f, c: (0, 0, c)),
        ],
        out_specs=_out_spec(bs),
        compiler_params=_compiler_params(bs, interpret),
        interpret=interpret,
        name="adder_input_grad_simt",
    )(xq, gd, wt)
    phases.append(_untile(out, tiling, bs, hi - lo, chi - clo, pitch))
  dx = jnp.stack(phases, axis=1).reshape(n, sh, sw, hi - lo, chi - clo,
                                         cin_pad)
  dx = jnp.pad(dx, ((0, 0),) * 3 + ((lo, n_rows - hi), (clo, width - chi),
                                    (0, 0)))
  dx = dx.transpose(0, 3, 1, 4, 2, 5).reshape(n, n_rows * sh, width * sw,
                                              cin_pad)
  return dx[:, :hp, :wp, :cin]
