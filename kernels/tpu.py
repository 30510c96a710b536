"""Pallas Mosaic TPU kernels for the adder forward and input gradient.

Layout: the transposed patches matrix `P^T [K, M]` (K = kh*kw*cin rows in
(tap, channel) order, M = n*ho*wo pixels), stored as `[K, M/128, 128]` so that
each row is a stack of full (8, 128) vregs; filters go to SMEM as scalars.

forward:    Y^T[o, m] = -sum_k |P^T[k, m] - W[k, o]|. Program (pixel tile,
            cout tile, K chunk); for each k one vreg-tile load of P^T[k] and,
            per output channel o, a scalar-broadcast subtract, abs and add into
            o's accumulator. No lane broadcasts, no transposes.
input_grad: dP^T[k, m] = sum_o clip(W[k, o] - P^T[k, m], -1, 1) * G^T[o, m],
            then the patches are folded back with pad-and-add in XLA.

Every block's last two dims are (8k, 128): (8, 128)-aligned for float32.
bfloat16 inputs are widened to float32 when the patches are built.
The pure reference these kernels must match is `addernet_jax.reference`.
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

Strides = tuple[int, int]
LANES = 128
SUBLANES = 8
# The patches matrix lives in HBM: calls that would need more are refused.
MAX_PATCHES_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of one TPU kernel launch.

  Attributes:
    block_m8: pixel tile in rows of 128 lanes (a multiple of 8); the tile
      covers `block_m8 * 128` pixels.
    block_k: patch rows (tap, channel) per grid step.
    block_n: output channels per grid step (each a set of accumulator vregs).
  """
  block_m8: int
  block_k: int
  block_n: int

  def __post_init__(self):
    if not isinstance(self.block_m8, int) or self.block_m8 < SUBLANES or (
        self.block_m8 % SUBLANES):
      raise ValueError(f"BlockSizes.block_m8 must be a positive multiple of "
                       f"{SUBLANES}, got {self.block_m8!r}")
    for name in ("block_k", "block_n"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"BlockSizes.{name} must be a positive int, got "
                         f"{value!r}")


def get_block_sizes(kind: str, xp_shape, w_shape, strides: Strides,
                    platform: str | None = None) -> BlockSizes:
  """Heuristic tiles for `kind` ("forward" or "input_grad").

  On "tpu": 1024-pixel tiles (8 vregs per row), up to 16 output channels
  (16 x 1 vreg accumulators of the 64 vregs), K chunks of up to 256 rows. On
  other platforms (interpret mode) as few grid steps as possible.
  """
  if kind not in ("forward", "input_grad"):
    raise ValueError(f"get_block_sizes: kind must be 'forward' or "
                     f"'input_grad', got {kind!r}")
  platform = platform or jax.default_backend()
  kh, kw, cin, cout = w_shape
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  m_rows = layout.cdiv(xp_shape[0] * ho * wo, LANES)
  k = kh * kw * cin
  if platform != "tpu":
    return BlockSizes(block_m8=layout.round_up(m_rows, SUBLANES),
                      block_k=k, block_n=cout)
  return BlockSizes(block_m8=SUBLANES, block_k=min(k, 256),
                    block_n=min(cout, 16))


def unsupported_reason(xp_shape, w_shape, strides) -> str | None:
  """Why these kernels do not take the call, or None."""
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  k = w_shape[0] * w_shape[1] * w_shape[2]
  patches = 4 * k * xp_shape[0] * ho * wo
  if patches > MAX_PATCHES_BYTES:
    return (f"TPU patches matrix would take {patches} bytes "
            f"(> {MAX_PATCHES_BYTES})")
  return None


def _interpret_arg(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


# Pallas' TPU interpret mode simulates every device of an enclosing
# `shard_map` and waits at a barrier for all of them; over two CPU devices it
# hung (JAX 0.10.2, 2026-11-30). Dispatch runs these kernels in interpret mode
# inside a `shard_map` of one device only.
INTERPRET_MAX_DEVICES = 1


# Accumulation (float32 fidelity, the scheme of `addernet_jax.reference`; see
# `layout.block_offsets`): patch rows are summed in groups of at most GROUP
# rows into fresh per-output-channel partials; the accumulator receives
# `partial - m[group]` (m = the group's sum of |w|, scalars in SMEM like the
# filters), so it stays at the inputs' scale instead of the outputs'
# (thousands). The kernel returns the accumulator; `forward` adds back the
# exact total of the offsets, `-(hi + (acc + lo))`. The input gradient sums
# each grid step's block of output channels (GROUP at most per partial) into a
# fresh partial before adding it to the accumulated row.
GROUP = 16


def _groups(block_k: int) -> tuple[int, int]:
  """(groups, terms of the last group) of `block_k` terms in groups of
  GROUP."""
  num = layout.cdiv(block_k, GROUP)
  return num, block_k - (num - 1) * GROUP


def _smem_blocks(a, bs: BlockSizes, rows: int):
  """`[k chunks * rows, n_pad]` -> `[o blocks, k chunks, 1, rows * block_n]`:
  SMEM blocks of (rows * block_n) scalars, row-major (row, o); the block's
  last two dims equal the array's, as Mosaic requires of blocks that are not
  (8, 128)."""
  kb, n_pad = a.shape[0] // rows, a.shape[1]
  a = a.reshape(kb, rows, n_pad // bs.block_n, bs.block_n).transpose(2, 0, 1, 3)
  return a.reshape(n_pad // bs.block_n, kb, 1, rows * bs.block_n)


def _prepare(xp, w, strides, bs: BlockSizes):
  kh, kw, cin, cout = w.shape
  n = xp.shape[0]
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  k, m = kh * kw * cin, n * ho * wo
  k_pad = layout.round_up(k, bs.block_k)
  m_pad = layout.round_up(m, bs.block_m8 * LANES)
  n_pad = layout.round_up(cout, bs.block_n)
  pt = layout.patches_t(xp.astype(jnp.float32), kh, kw, strides, (ho, wo))
  pt = jnp.pad(pt, ((0, k_pad - k), (0, m_pad - m)))
  pt = pt.reshape(k_pad, m_pad // LANES, LANES)
  wk = jnp.pad(w.astype(jnp.float32).reshape(k, cout),
               ((0, k_pad - k), (0, n_pad - cout)))
  return pt, wk, (k, m, k_pad, m_pad, n_pad, ho, wo)


def _forward_offsets(wk, bs: BlockSizes):
  """Per (K chunk, group) offsets as SMEM blocks, and their total (hi, lo)."""
  k_pad, n_pad = wk.shape
  groups, _ = _groups(bs.block_k)
  chunks = wk.reshape(k_pad // bs.block_k, bs.block_k, n_pad)
  chunks = layout.pad_axis(chunks, 1, groups * GROUP)
  offsets, total = layout.block_offsets(
      chunks.reshape(k_pad // bs.block_k * groups, GROUP, n_pad))
  return _smem_blocks(offsets, bs, groups), total


# ----------------------------------------------------------------- forward --


def _forward_kernel(w_ref, m_ref, p_ref, o_ref, *, block_k: int,
                    block_n: int):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  groups, last = _groups(block_k)

  def group(g, rows, accs):
    k0 = g * GROUP
    parts = [None] * block_n
    for r in range(rows):  # static: the group's rows, in order
      pk = p_ref[k0 + r]
      for o in range(block_n):
        term = jnp.abs(pk - w_ref[(k0 + r) * block_n + o])
        parts[o] = term if r == 0 else parts[o] + term
    return tuple(acc + (part - m_ref[g * block_n + o])
                 for o, (acc, part) in enumerate(zip(accs, parts)))

  accs = tuple(o_ref[o] for o in range(block_n))
  if groups > 1:
    accs = lax.fori_loop(0, groups - 1,
                         lambda g, a: group(g, GROUP, a), accs)
  accs = group(groups - 1, last, accs)
  for o in range(block_n):
    o_ref[o] = accs[o]


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
  layout.check_shapes("tpu.forward", xp.shape, w.shape, strides)
  bs = block_sizes or get_block_sizes("forward", xp.shape, w.shape, strides,
                                      platform="cpu" if interpret else "tpu")
  cout = w.shape[3]
  pt, wk, (_, m, k_pad, m_pad, n_pad, ho, wo) = _prepare(xp, w, strides, bs)
  wb = _smem_blocks(wk, bs, bs.block_k)
  mb, (hi, lo) = _forward_offsets(wk, bs)
  groups, _ = _groups(bs.block_k)
  grid = (m_pad // (bs.block_m8 * LANES), n_pad // bs.block_n,
          k_pad // bs.block_k)
  acc = pl.pallas_call(
      functools.partial(_forward_kernel, block_k=bs.block_k,
                        block_n=bs.block_n),
      out_shape=layout.out_struct((n_pad, m_pad // LANES, LANES),
                                  jnp.float32, xp, w),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, None, None, bs.block_k * bs.block_n),
                       lambda mi, oi, ki: (oi, ki, 0, 0),
                       memory_space=pltpu.SMEM),
          pl.BlockSpec((None, None, None, groups * bs.block_n),
                       lambda mi, oi, ki: (oi, ki, 0, 0),
                       memory_space=pltpu.SMEM),
          pl.BlockSpec((bs.block_k, bs.block_m8, LANES),
                       lambda mi, oi, ki: (ki, mi, 0)),
      ],
      out_specs=pl.BlockSpec((bs.block_n, bs.block_m8, LANES),
                             lambda mi, oi, ki: (oi, mi, 0)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="adder_forward_tpu",
  )(wb, mb, pt)
  acc = acc.reshape(n_pad, m_pad)[:cout, :m].T
  y = -(hi[:cout] + (acc + lo[:cout]))
  return y.reshape(xp.shape[0], ho, wo, cout)


# ---------------------------------------------------------- input gradient --


def _input_grad_kernel(w_ref, p_ref, g_ref, o_ref, *, block_k: int,
                       block_n: int):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

  gs = [g_ref[o] for o in range(block_n)]

  def body(kk, carry):
    pk = p_ref[kk]
    acc = o_ref[kk]
    for o0 in range(0, block_n, GROUP):  # fresh partials of <= GROUP terms
      part = None
      for o in range(o0, min(o0 + GROUP, block_n)):
        term = jnp.clip(w_ref[kk * block_n + o] - pk, -1.0, 1.0) * gs[o]
        part = term if part is None else part + term
      acc = acc + part
    o_ref[kk] = acc
    return carry

  lax.fori_loop(0, block_k, body, 0)


@functools.partial(jax.jit, static_argnames=("strides", "block_sizes",
                                             "interpret"))
def input_grad(xp: jax.Array, w: jax.Array, g: jax.Array, strides: Strides, *,
               block_sizes: BlockSizes | None = None,
               interpret: bool = False) -> jax.Array:
  """dxp = sum over taps/cout of clip(w - xp, -1, 1) * g, float32 `[n,hp,wp,cin]`.

  Same contract as `addernet_jax.reference.input_grad`.
  """
  strides = tuple(int(s) for s in strides)
  layout.check_shapes("tpu.input_grad", xp.shape, w.shape, strides, g.shape)
  bs = block_sizes or get_block_sizes("input_grad", xp.shape, w.shape,
                                      strides,
                                      platform="cpu" if interpret else "tpu")
  kh, kw, _, cout = w.shape
  pt, wk, (k, m, k_pad, m_pad, n_pad, ho, wo) = _prepare(xp, w, strides, bs)
  wb = _smem_blocks(wk, bs, bs.block_k)
  gt = g.astype(jnp.float32).reshape(m, cout).T
  gt = jnp.pad(gt, ((0, n_pad - cout), (0, m_pad - m)))
  gt = gt.reshape(n_pad, m_pad // LANES, LANES)
  grid = (m_pad // (bs.block_m8 * LANES), k_pad // bs.block_k,
          n_pad // bs.block_n)
  dpt = pl.pallas_call(
      functools.partial(_input_grad_kernel, block_k=bs.block_k,
                        block_n=bs.block_n),
      out_shape=layout.out_struct((k_pad, m_pad // LANES, LANES),
                                  jnp.float32, xp, w, g),
      grid=grid,
      in_specs=[
          pl.BlockSpec((None, None, None, bs.block_k * bs.block_n),
                       lambda mi, ki, oi: (oi, ki, 0, 0),
                       memory_space=pltpu.SMEM),
          pl.BlockSpec((bs.block_k, bs.block_m8, LANES),
                       lambda mi, ki, oi: (ki, mi, 0)),
          pl.BlockSpec((bs.block_n, bs.block_m8, LANES),
                       lambda mi, ki, oi: (oi, mi, 0)),
      ],
      out_specs=pl.BlockSpec((bs.block_k, bs.block_m8, LANES),
                             lambda mi, ki, oi: (ki, mi, 0)),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=_interpret_arg(interpret),
      name="adder_input_grad_tpu",
  )(wb, pt, gt)
  dp = dpt.reshape(k_pad, m_pad)[:k, :m]
  return layout.fold_patches_t(dp, xp.shape, kh, kw, strides, (ho, wo))
