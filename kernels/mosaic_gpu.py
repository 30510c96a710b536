"""Pallas Mosaic GPU (Hopper) forward kernel for the adder convolution.

The measured alternative to the Triton forward of `kernels.gpu` (JAX
deprecated Pallas' Triton lowering in 0.11 in favour of Mosaic GPU). Same
algorithm, warpgroup programming model:

- the padded input is split into stride phases and stored channel-major per
  image, `[n, phases, cin, L]`, so each channel's run of pixels is contiguous;
- a block (image b, pixel tile f, cout tile o), one warpgroup, copies with TMA
  the pixel slab its taps read, `[phases, cin, block_pix + max tap offset]`,
  and its filters `[taps, cin, block_ch]` into shared memory;
- the float32 accumulator `[block_pix, block_ch]` lives in registers in the
  WGMMA layout; for every tap (unrolled) and block of input channels (a
  loop) a fresh partial sums `|x[tap offset : + block_pix] - w[tap, c, :]|`
  over the block's channels (a loop), the pixel vector loaded in the row
  layout and the filter row in the column layout, both broadcast, and the
  accumulator receives the partial minus the block's sum of |w| (the
  accumulation of `kernels.gpu.forward`, see `layout.block_offsets`);
- the accumulator goes back to HBM through shared memory with TMA, and
  `forward` adds back the exact total of the offsets.

The input gradient is `kernels.gpu.input_grad` (Triton): `ADDERNET_GPU_KERNELS=
mosaic` selects this forward with it. Verified in Mosaic GPU interpret mode on
the CPU and by lowering for an abstract H100 (tests/test_kernels.py); its speed
against the Triton forward is what `benchmarks/ops.py` measures on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl  # noqa: F401  (pl.ds in kernels)
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import gpu, layout

Strides = tuple[int, int]

# TMA boxes hold at most 256 elements per dimension.
MAX_TMA_BOX = 256
# Shared memory per SM on H100/H200: 228 KiB, at most 227 KiB for one block.
SMEM_BUDGET_BYTES = 224 * 1024
# plgpu.load required a positional index before JAX 0.11 (optional and
# deprecated in 0.11, gone in 0.12).
_LOAD_IDX = inspect.signature(plgpu.load).parameters.get("idx")
_LOAD_NEEDS_INDEX = (_LOAD_IDX is not None
                     and _LOAD_IDX.default is inspect.Parameter.empty)


def _load(ref, layout_):
  if _LOAD_NEEDS_INDEX:
    return plgpu.load(ref, (), layout=layout_)
  return plgpu.load(ref, layout=layout_)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of one Mosaic GPU forward launch.

  Attributes:
    block_pix: output pixels per block; a multiple of 64 (WGMMA layout rows).
    block_ch: output channels per block; a multiple of 8 (WGMMA columns).
  """
  block_pix: int
  block_ch: int

  def __post_init__(self):
    if not isinstance(self.block_pix, int) or self.block_pix % 64 or \
        self.block_pix < 64:
      raise ValueError(f"BlockSizes.block_pix must be a positive multiple of "
                       f"64, got {self.block_pix!r}")
    if not isinstance(self.block_ch, int) or self.block_ch % 8 or \
        self.block_ch < 8:
      raise ValueError(f"BlockSizes.block_ch must be a positive multiple of 8, "
                       f"got {self.block_ch!r}")


def _plan(xp_shape, w_shape, strides, bs: BlockSizes) -> dict:
  kh, kw, cin, _ = w_shape
  _, hp, wp, _ = xp_shape
  sh, sw = strides
  ho, _ = layout.output_hw(xp_shape, w_shape, strides)
  wq = layout.cdiv(wp, sw)
  taps = [((i % sh) * sw + (j % sw), (i // sh) * wq + (j // sw))
          for i in range(kh) for j in range(kw)]
  max_off = max(off for _, off in taps)
  # Copies move a multiple of 128 bytes (the warpgroup size): slab rows of 32
  # floats, input channels padded to 4 (zero channels add |0 - 0| = 0).
  slab = layout.round_up(bs.block_pix + max_off, 32)
  cin = layout.round_up(cin, 4)
  phases = sh * sw
  # Offsets of the block partials (gpu.forward_blocks over the padded
  # channels), rows padded to 4 for the copy.
  blocks = gpu.forward_blocks(cin)
  offset_rows = layout.round_up(kh * kw * blocks[0], 4)
  smem = 4 * (phases * cin * slab + kh * kw * cin * bs.block_ch
              + offset_rows * bs.block_ch + bs.block_pix * bs.block_ch)
  return {"taps": taps, "slab": slab, "phases": phases, "wq": wq, "cin": cin,
          "positions": ho * wq, "smem_bytes": smem, "blocks": blocks,
          "offset_rows": offset_rows, "hq": layout.cdiv(hp, sh)}


def unsupported_reason(xp_shape, w_shape, strides,
                       block_sizes: BlockSizes | None = None) -> str | None:
  """Why this kernel does not take these shapes, or None if it does."""
  bs = block_sizes or get_block_sizes(xp_shape, w_shape, strides)
  plan = _plan(xp_shape, w_shape, strides, bs)
  if plan["slab"] > MAX_TMA_BOX:
    return (f"pixel slab {plan['slab']} (block_pix {bs.block_pix} + taps' "
            f"reach) exceeds a TMA box of {MAX_TMA_BOX}")
  if w_shape[2] > MAX_TMA_BOX or w_shape[0] * w_shape[1] > MAX_TMA_BOX:
    return f"filters {tuple(w_shape)} exceed a TMA box of {MAX_TMA_BOX}"
  if plan["offset_rows"] > MAX_TMA_BOX:
    return (f"{plan['offset_rows']} rows of block offsets (filters "
            f"{tuple(w_shape)}) exceed a TMA box of {MAX_TMA_BOX}")
  if plan["smem_bytes"] > SMEM_BUDGET_BYTES:
    return (f"needs {plan['smem_bytes']} bytes of shared memory "
            f"(> {SMEM_BUDGET_BYTES})")
  return None


def get_block_sizes(xp_shape, w_shape, strides) -> BlockSizes:
  """Heuristic tiles: 128 pixels x up to 64 channels, smaller where the
  shared-memory slabs would not leave room for two blocks per SM (else one)."""
  cout = w_shape[3]
  block_ch = min(layout.round_up(cout, 8), 64)
  for budget in (SMEM_BUDGET_BYTES // 2, SMEM_BUDGET_BYTES):
    for block_pix, ch in ((128, block_ch), (128, 32), (64, block_ch), (64, 32),
                          (64, 16), (64, 8)):
      bs = BlockSizes(block_pix=block_pix, block_ch=min(ch, block_ch))
      plan = _plan(xp_shape, w_shape, strides, bs)
      if plan["slab"] <= MAX_TMA_BOX and plan["smem_bytes"] <= budget:
        return bs
  return BlockSizes(block_pix=64, block_ch=8)


def _forward_body(x_gmem, w_gmem, m_gmem, o_gmem, x_smem, w_smem, m_smem,
                  o_smem, barrier, *, taps, cin: int, block_pix: int,
                  block_ch: int):
  # Accumulation (float32 fidelity, the scheme of `kernels.gpu.forward` and
  # `addernet_jax.reference`, see `layout.block_offsets`): per tap, blocks of
  # at most gpu.FORWARD_BLOCK channels summed into a fresh partial; the
  # accumulator receives `partial - m[block]` (m = the block's sum of |w|), so
  # it stays at the inputs' scale; `forward` adds back the exact total.
  b = lax.axis_index("b")
  f0 = lax.axis_index("f") * block_pix
  o0 = lax.axis_index("o") * block_ch
  slab = x_smem.shape[-1]
  plgpu.copy_gmem_to_smem(x_gmem.at[b, :, :, pl.ds(f0, slab)], x_smem,
                          barrier.at[0])
  plgpu.copy_gmem_to_smem(w_gmem.at[:, :, pl.ds(o0, block_ch)], w_smem,
                          barrier.at[0])
  plgpu.copy_gmem_to_smem(m_gmem.at[:, pl.ds(o0, block_ch)], m_smem,
                          barrier.at[0])
  plgpu.barrier_wait(barrier.at[0])
  shape = (block_pix, block_ch)
  nb, cb = gpu.forward_blocks(cin)
  last = cin - (nb - 1) * cb

  def zeros():
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32),
                             plgpu.Layout.WGMMA)

  acc = zeros()
  for t, (phase, offset) in enumerate(taps):   # static: kh*kw taps
    def add_block(blk, size, acc, t=t, phase=phase, offset=offset):
      c0 = blk * cb

      def channel_body(c, part):
        xv = _load(x_smem.at[phase, c0 + c, pl.ds(offset, block_pix)],
                   plgpu.Layout.WGMMA.reduce(1)).astype(jnp.float32)
        wv = _load(w_smem.at[t, c0 + c], plgpu.Layout.WGMMA.reduce(0)
                   ).astype(jnp.float32)
        diff = (lax.broadcast_in_dim(xv, shape, [0])
                - lax.broadcast_in_dim(wv, shape, [1]))
        return part + jnp.abs(diff)
      part = lax.fori_loop(0, size, channel_body, zeros())
      mv = _load(m_smem.at[t * nb + blk], plgpu.Layout.WGMMA.reduce(0))
      return acc + (part - lax.broadcast_in_dim(mv, shape, [1]))

    if nb > 1:
      acc = lax.fori_loop(0, nb - 1,
                          lambda blk, a, f=add_block: f(blk, cb, a), acc)
    acc = add_block(nb - 1, last, acc)
  o_smem[...] = acc
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[b, pl.ds(f0, block_pix),
                                            pl.ds(o0, block_ch)])
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def forward(xp: jax.Array, w: jax.Array, strides: Strides, *,
            block_sizes: BlockSizes | None = None,
            interpret: bool = False) -> jax.Array:
  """y[n,p,q,o] = -sum_{i,j,c} |xp[n,p*s+i,q*s+j,c] - w[i,j,c,o]|, float32.

  Same contract as `kernels.gpu.forward`. Raises ValueError (with the values)
  for shapes `unsupported_reason` refuses; dispatch checks first.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("mosaic_gpu.forward", xp.shape, w.shape, strides)
  bs = block_sizes or get_block_sizes(xp.shape, w.shape, strides)
  reason = unsupported_reason(xp.shape, w.shape, strides, bs)
  if reason is not None:
    raise ValueError(f"mosaic_gpu.forward: xp {tuple(xp.shape)}, w "
                     f"{tuple(w.shape)}, strides {strides}: {reason}")
  kh, kw, cin, cout = w.shape
  n = xp.shape[0]
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  plan = _plan(xp.shape, w.shape, strides, bs)
  xs, wq, _ = layout.phase_split(xp, strides, kh, kw)
  pos_pad = layout.round_up(plan["positions"], bs.block_pix)
  length = pos_pad - bs.block_pix + plan["slab"]
  cin_pad = plan["cin"]
  xs = layout.pad_axis(layout.pad_axis(xs, 2, length)[:, :, :length], 3,
                       cin_pad)
  xs = xs.astype(jnp.float32).transpose(0, 1, 3, 2)   # [n, phases, cin, L]
  cout_pad = layout.round_up(cout, bs.block_ch)
  wt = layout.pad_axis(w.astype(jnp.float32).reshape(kh * kw, cin, cout), 2,
                       cout_pad)
  wt = layout.pad_axis(wt, 1, cin_pad)
  cin = cin_pad
  nb, cb = plan["blocks"]
  offsets, (hi, lo) = layout.block_offsets(
      layout.pad_axis(wt, 1, nb * cb).reshape(kh * kw * nb, cb, cout_pad))
  offsets = layout.pad_axis(offsets, 0, plan["offset_rows"])
  body = functools.partial(_forward_body, taps=tuple(plan["taps"]), cin=cin,
                           block_pix=bs.block_pix, block_ch=bs.block_ch)
  kernel = plgpu.kernel(
      body,
      out_type=layout.out_struct((n, pos_pad, cout_pad), jnp.float32, xp, w),
      scratch_types=[
          plgpu.SMEM((plan["phases"], cin, plan["slab"]), jnp.float32),
          plgpu.SMEM((kh * kw, cin, bs.block_ch), jnp.float32),
          plgpu.SMEM((plan["offset_rows"], bs.block_ch), jnp.float32),
          plgpu.SMEM((bs.block_pix, bs.block_ch), jnp.float32),
          plgpu.Barrier(num_arrivals=3, num_barriers=1),
      ],
      grid=(n, pos_pad // bs.block_pix, cout_pad // bs.block_ch),
      grid_names=("b", "f", "o"),
      **({"interpret": _interpret_params()} if interpret else {}),
  )
  acc = kernel(xs, wt, offsets)
  acc = acc[:, :plan["positions"]].reshape(n, ho, wq, cout_pad)[:, :, :wo]
  return -(hi[:cout] + (acc[..., :cout] + lo[:cout]))


def _interpret_params():
  if not interpret_supported():
    raise NotImplementedError(
        f"Mosaic GPU interpret mode needs JAX >= 0.11 (this is "
        f"{jax.__version__}); use kernels.gpu on the CPU")
  return plgpu.InterpretGPUParams()


def interpret_supported() -> bool:
  """Mosaic GPU interpret mode (on the CPU) exists from JAX 0.11."""
  return hasattr(plgpu, "InterpretGPUParams")


INPUT_GRAD_TAKES_WINDOW = gpu.INPUT_GRAD_TAKES_WINDOW


def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides, *,
               block_sizes: gpu.BlockSizes | None = None,
               interpret: bool = False,
               rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> jax.Array:
  """The Triton input gradient (`kernels.gpu.input_grad`)."""
  return gpu.input_grad(xp, w, g, strides, block_sizes=block_sizes,
                        interpret=interpret, rows=rows, cols=cols)
