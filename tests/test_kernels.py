"""Pallas adder kernels against float64 NumPy, in interpret mode on the CPU.

Structure (tokamax/JAX style): `KernelTestBase` holds the checks; each
subclass names a kernel family and how to run it (Pallas GPU interpret mode,
Pallas TPU interpret mode, or compiled on a real GPU). The custom VJP through
`addernet_jax.ops.adder_conv(..., implementation="pallas")` is checked
against `implementation="xla"`. Cross-platform lowering tests check that the
kernels lower to Triton (CUDA) and Mosaic (TPU) without a device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from addernet_jax import ops, reference
from addernet_jax.kernels import (dispatch, gpu, layout, mosaic_gpu, tpu,
                                  tpu_batch)
from addernet_jax.kernels import triton_simt as simt
from conftest import all_equations


# ------------------------------------------------------ float64 reference --

def np_forward(xp, w, strides):
  """float64: y = -sum |xp_patch - w| (direct per-tap loop)."""
  xp, w = np.asarray(xp, np.float64), np.asarray(w, np.float64)
  kh, kw, _, cout = w.shape
  (sh, sw) = strides
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  y = np.zeros((xp.shape[0], ho, wo, cout))
  for i in range(kh):
    for j in range(kw):
      v = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
      y -= np.abs(v[..., :, None] - w[i, j]).sum(axis=-2)
  return y


def np_input_grad(xp, w, g, strides):
  """float64: dxp[.., p*s+i, q*s+j, c] += sum_o clip(w - xp, -1, 1) g."""
  xp, w, g = (np.asarray(a, np.float64) for a in (xp, w, g))
  kh, kw, _, _ = w.shape
  (sh, sw) = strides
  ho, wo = g.shape[1:3]
  dxp = np.zeros_like(xp)
  for i in range(kh):
    for j in range(kw):
      sl = (slice(None), slice(i, i + sh * (ho - 1) + 1, sh),
            slice(j, j + sw * (wo - 1) + 1, sw), slice(None))
      clipped = np.clip(w[i, j] - xp[sl][..., :, None], -1, 1)
      dxp[sl] += (clipped * g[..., None, :]).sum(-1)
  return dxp


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel problem: padded input [n,hp,wp,cin], filters k x k, strides."""
  n: int
  hp: int
  wp: int
  cin: int
  cout: int
  k: int
  s: int
  dtype: str = "float32"

  @property
  def id(self):
    return (f"n{self.n}_{self.hp}x{self.wp}x{self.cin}_k{self.k}_co{self.cout}"
            f"_s{self.s}_{self.dtype}")

  def arrays(self, seed):
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(self.dtype)
    xp = jnp.asarray(rng.standard_normal((self.n, self.hp, self.wp, self.cin)),
                     dt)
    # Filters near the inputs' scale so clip(w - x) is sometimes saturated,
    # sometimes not (both branches of HardTanh exercised).
    w = jnp.asarray(0.7 * rng.standard_normal((self.k, self.k, self.cin,
                                               self.cout)), dt)
    ho, wo = layout.output_hw(xp.shape, w.shape, (self.s, self.s))
    g = jnp.asarray(rng.standard_normal((self.n, ho, wo, self.cout)), dt)
    return xp, w, g


# Awkward sizes: odd spatial sizes, channels not multiples of any block, 1x1,
# 5x5, stride 2 with odd padded sizes, bfloat16.
FAST_CASES = [
    Case(2, 7, 9, 3, 5, 3, 1),
    Case(2, 9, 8, 4, 6, 3, 2),
    Case(1, 6, 5, 3, 7, 1, 2),
    Case(1, 9, 8, 2, 3, 5, 1),
    Case(2, 8, 7, 3, 4, 3, 1, "bfloat16"),
]
TPU_CASES = [
    Case(2, 7, 9, 3, 5, 3, 1),
    Case(1, 9, 8, 4, 6, 3, 2, "bfloat16"),
]
# Batch on the lanes: two lane blocks (130 images), 1x1 stride 2 (rows no
# tap reaches), 5x5, bfloat16 (3x3 stride 1 and more than GROUP output
# channels: the TPU-tile test).
TPU_BATCH_CASES = TPU_CASES[1:] + [
    Case(130, 5, 6, 3, 4, 3, 2),
    Case(1, 6, 5, 3, 7, 1, 2),
    Case(1, 7, 8, 2, 3, 5, 1),
]


# Real-magnitude problems (post-ReLU inputs, filters ~3x larger): outputs
# -700 to -1400 with a per-channel spread of 4-7. The centred output of one
# running float32 sum over every (tap, channel) was 3.4e-5 and 6.4e-5 from
# float64 here, the offset block partials 4.5e-6 and 5.6e-6 (XLA and every
# kernel family alike); on the official ResNet-20 the official float32 code
# is at 3e-6..4e-5.
PRECISION_CASES = [Case(2, 12, 12, 32, 8, 3, 1), Case(2, 12, 12, 64, 8, 3, 1),
                   Case(2, 11, 11, 40, 6, 3, 2)]
PRECISION_BOUND = 1.5e-5


def _real_magnitude_arrays(case):
  rng = np.random.default_rng(case.cin)
  x = np.maximum(rng.standard_normal((case.n, case.hp - 2, case.wp - 2,
                                      case.cin)), 0.0) * 0.5
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  w = 3.0 * rng.standard_normal((case.k, case.k, case.cin, case.cout))
  return jnp.asarray(xp, jnp.float32), jnp.asarray(w, jnp.float32)


def _check_precision(y, want):
  want_c = want - want.mean(axis=(0, 1, 2))
  got = np.asarray(y, np.float64)
  got_c = got - got.mean(axis=(0, 1, 2))
  assert np.abs(want).min() > 500 and want.std(axis=(0, 1, 2)).max() < 10
  assert rel_err(got_c, want_c) < PRECISION_BOUND
  assert rel_err(got, want) < 1e-7


@pytest.mark.parametrize("precision_case", PRECISION_CASES,
                         ids=[c.id for c in PRECISION_CASES])
def test_xla_forward_precision_at_real_magnitudes(precision_case):
  """The XLA path (`reference.forward`) on the kernels' precision problems."""
  case = precision_case
  xp, w = _real_magnitude_arrays(case)
  y = jax.jit(reference.forward, static_argnums=2)(xp, w, (case.s, case.s))
  _check_precision(y, np_forward(xp, w, (case.s, case.s)))


def test_block_offsets_total_is_exact():
  """`layout.exact_sum` keeps the total of the offsets to float32 rounding
  (hi) plus what that rounding dropped (lo): a plain float32 sum is ~1e-4
  off at these magnitudes."""
  rng = np.random.default_rng(0)
  w = jnp.asarray(3.0 * rng.standard_normal((36, 16, 8)), jnp.float32)
  m, (hi, lo) = jax.jit(layout.block_offsets)(w)
  want = np.abs(np.asarray(w, np.float64)).sum(axis=1)
  assert np.max(np.abs(np.asarray(m, np.float64) - want)) < 1e-4
  total = np.asarray(m, np.float64).sum(axis=0)
  np.testing.assert_allclose(np.asarray(hi, np.float64)
                             + np.asarray(lo, np.float64), total, rtol=1e-12)
  assert np.all(np.abs(np.asarray(hi, np.float64) - total)
                <= np.spacing(np.float32(total)))


def pytest_generate_tests(metafunc):
  for name, attr in (("case", "CASES"), ("precision_case", "PRECISION_CASES")):
    if name in metafunc.fixturenames and metafunc.cls is not None:
      cases = getattr(metafunc.cls, attr)
      metafunc.parametrize(name, cases, ids=[c.id for c in cases])


def _tolerance(case):
  # Inputs are exact in float64 (bf16 values are exactly representable), so
  # the only error is float32 accumulation: far under 1e-5 relative.
  return 2e-6


class KernelTestBase:
  """Checks shared by every kernel family; subclasses set the class attributes."""
  module = None            # kernels.gpu or kernels.tpu
  interpret = True
  CASES = FAST_CASES
  PRECISION_CASES = PRECISION_CASES
  # Tiles that force several grid steps along every axis, with ragged edges.
  SMALL_BLOCKS: dict = {}

  def forward(self, xp, w, s, block_sizes=None):
    return self.module.forward(xp, w, (s, s), block_sizes=block_sizes,
                               interpret=self.interpret)

  def input_grad(self, xp, w, g, s, block_sizes=None):
    return self.module.input_grad(xp, w, g, (s, s), block_sizes=block_sizes,
                                  interpret=self.interpret)

  def test_forward(self, case):
    xp, w, _ = case.arrays(0)
    y = self.forward(xp, w, case.s)
    assert y.dtype == jnp.float32
    want = np_forward(xp, w, (case.s, case.s))
    assert y.shape == want.shape
    assert np.all(np.isfinite(np.asarray(y)))
    assert rel_err(y, want) < _tolerance(case), case

  def test_input_grad(self, case):
    xp, w, g = case.arrays(1)
    dxp = self.input_grad(xp, w, g, case.s)
    assert dxp.dtype == jnp.float32
    want = np_input_grad(xp, w, g, (case.s, case.s))
    assert dxp.shape == want.shape
    assert rel_err(dxp, want) < _tolerance(case), case

  def test_many_grid_steps(self):
    """Small tiles: several programs per axis, padded (ragged) edges."""
    if not self.SMALL_BLOCKS:
      pytest.skip("no small-tile configuration for this family")
    case = Case(2, 9, 10, 5, 7, 3, 2)
    xp, w, g = case.arrays(2)
    y = self.forward(xp, w, case.s, self.SMALL_BLOCKS["forward"])
    dxp = self.input_grad(xp, w, g, case.s, self.SMALL_BLOCKS["input_grad"])
    assert rel_err(y, np_forward(xp, w, (2, 2))) < 2e-6
    assert rel_err(dxp, np_input_grad(xp, w, g, (2, 2))) < 2e-6

  def test_forward_precision_at_real_magnitudes(self, precision_case):
    """Adder outputs in the thousands with a per-channel spread of a few units
    (as on the official ResNet-20): the output centred per channel, what
    BatchNorm keeps, within the bound the XLA path meets (offset block
    partials, `layout.block_offsets`)."""
    case = precision_case
    xp, w = _real_magnitude_arrays(case)
    y = self.forward(xp, w, case.s)
    _check_precision(y, np_forward(xp, w, (case.s, case.s)))

  def test_bad_shapes_raise(self):
    xp = jnp.ones((1, 5, 5, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"input channels differ"):
      self.forward(xp, jnp.ones((3, 3, 4, 2), jnp.float32), 1)
    with pytest.raises(ValueError, match=r"output gradient has shape"):
      self.input_grad(xp, jnp.ones((3, 3, 3, 2), jnp.float32),
                      jnp.ones((1, 4, 4, 2), jnp.float32), 1)


class TestGpuKernelInterpret(KernelTestBase):
  """`kernels.gpu` (Triton source) in Pallas interpret mode on the host."""
  module = gpu
  SMALL_BLOCKS = {"forward": gpu.BlockSizes(block_pix=8, block_ch=4),
                  "input_grad": gpu.BlockSizes(block_pix=16, block_ch=2)}


@pytest.mark.slow
@pytest.mark.parametrize("xp_shape,k,strides", [
    ((2, 11, 10, 3), (3, 3), (3, 3)),   # stride 3: phases with 1 tap each
    ((1, 9, 12, 4), (2, 2), (2, 2)),    # even filter: every phase one tap
    ((2, 10, 9, 3), (3, 2), (2, 1)),    # unequal strides and filter sides
    ((1, 8, 8, 5), (1, 1), (2, 2)),     # 3 of 4 phases receive no gradient
])
def test_gpu_input_grad_stride_phases(xp_shape, k, strides):
  rng = np.random.default_rng(7)
  xp = jnp.asarray(rng.standard_normal(xp_shape), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((*k, xp_shape[3], 6)), jnp.float32)
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  g = jnp.asarray(rng.standard_normal((xp_shape[0], ho, wo, 6)), jnp.float32)
  dxp = gpu.input_grad(xp, w, g, strides, interpret=True,
                       block_sizes=gpu.BlockSizes(block_pix=16, block_ch=4))
  assert rel_err(dxp, np_input_grad(xp, w, g, strides)) < 2e-6


@pytest.mark.parametrize("xp_shape,k,strides,rows", [
    ((2, 10, 9, 3), 3, (1, 1), (1, 9)),     # 3x3 SAME on 8x7: skip pad rows
    ((1, 11, 11, 4), 3, (2, 2), (1, 10)),
    ((1, 13, 12, 3), 5, (3, 3), (2, 11)),
    ((1, 9, 8, 2), 3, (2, 2), (3, 4)),      # a single row
])
def test_gpu_input_grad_rows_window(xp_shape, k, strides, rows):
  """`rows=` computes only the rows the caller keeps, exactly."""
  rng = np.random.default_rng(11)
  xp = jnp.asarray(rng.standard_normal(xp_shape), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((k, k, xp_shape[3], 5)),
                  jnp.float32)
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  g = jnp.asarray(rng.standard_normal((xp_shape[0], ho, wo, 5)), jnp.float32)
  cols = (1, xp_shape[2] - 1)
  got = gpu.input_grad(xp, w, g, strides, interpret=True, rows=rows,
                       cols=cols,
                       block_sizes=gpu.BlockSizes(block_pix=16, block_ch=4))
  want = np_input_grad(xp, w, g, strides)
  assert got.shape == want.shape
  window = (slice(None), slice(*rows), slice(*cols))
  assert rel_err(got[window], want[window]) < 2e-6
  with pytest.raises(ValueError, match=r"rows \(5, 5\)"):
    gpu.input_grad(xp, w, g, strides, interpret=True, rows=(5, 5))


@pytest.mark.parametrize("xp_shape,k,strides,block_pix", [
    ((2, 5, 40, 3), 3, (1, 1), 16),   # 38 columns: 3 column tiles, ragged
    ((1, 12, 7, 2), 3, (1, 1), 16),   # 5 columns in tiles of 8, 4 rows each
    ((1, 9, 21, 4), 3, (2, 2), 8),    # strided: 10 columns, tiles of 8
])
def test_gpu_forward_2d_tiles(xp_shape, k, strides, block_pix):
  rng = np.random.default_rng(5)
  xp = jnp.asarray(rng.standard_normal(xp_shape), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((k, k, xp_shape[3], 6)),
                  jnp.float32)
  y = gpu.forward(xp, w, strides, interpret=True,
                  block_sizes=gpu.BlockSizes(block_pix=block_pix, block_ch=4))
  assert rel_err(y, np_forward(xp, w, strides)) < 2e-6


def test_gpu_forward_tiles_issue_no_cropped_pixels_on_resnet20():
  """With power-of-two output widths every computed pixel is kept."""
  for ho, wo in ((32, 32), (16, 16), (8, 8)):
    for block_pix in (16, 64, 128, 256):
      bs = gpu.get_block_sizes("forward", (256, ho + 2, wo + 2, 16),
                               (3, 3, 16, 16), (1, 1), "gpu")
      for pix in (block_pix, bs.block_pix):
        if pix <= ho * wo:
          assert gpu.pixel_tiles(ho, wo, wo + 2, pix)["positions"] == ho * wo
  # Odd widths: flat tiles over the pitch beat power-of-two columns.
  tiling = gpu.pixel_tiles(17, 17, 18, 64)
  assert tiling["flat"] and tiling["positions"] == 320


def test_gpu_input_grad_work_on_resnet20():
  """Counted MACs the kernels issue for ResNet-20 at batch 64 (dx with the
  window `ops` passes) against the true MACs: dx was 1.71x with the gradient
  spread by the strides and flat tiles, the forward 1.14x."""
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "resnet20_layers.py"
  spec = importlib.util.spec_from_file_location("resnet20_layers", path)
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  layer_shapes = table.layer_shapes
  issued = true = forward = 0
  for layer in table.RESNET20_LAYERS:
    _, count, h, w_in, cin, cout, k, s, pad = layer
    sh = layer_shapes(64, layer)
    plan = gpu.input_grad_plan(sh["xp"], sh["w"], (s, s), rows=(pad, pad + h),
                               cols=(pad, pad + w_in))
    bs = gpu.get_block_sizes("input_grad", sh["xp"], sh["w"], (s, s), "gpu")
    tiling = gpu.pixel_tiles(plan["hi"] - plan["lo"], plan["chi"] - plan["clo"],
                             plan["pitch"], bs.block_pix)
    for taps in plan["phases"]:
      issued += count * len(taps) * tiling["positions"] * 64 * cin * cout
    bs = gpu.get_block_sizes("forward", sh["xp"], sh["w"], (s, s), "gpu")
    ho, wo = sh["y"][1:3]
    tiling = gpu.pixel_tiles(ho, wo, -(-sh["xp"][2] // s), bs.block_pix)
    forward += count * tiling["positions"] * 64 * k * k * cin * cout
    true += count * sh["macs"]
  assert 1.0 <= issued / true < 1.05
  assert 1.0 <= forward / true < 1.01


@pytest.mark.parametrize("hp,wp,k,s", [(34, 34, 3, 2), (18, 18, 3, 2),
                                       (32, 32, 1, 2), (34, 34, 3, 1),
                                       (13, 11, 5, 3)])
def test_gpu_input_grad_plan_issues_each_tap_once(hp, wp, k, s):
  """Every tap belongs to exactly one stride phase, so a strided layer's dx
  does about kh*kw MACs per input pixel, not s*s times that."""
  plan = gpu.input_grad_plan((1, hp, wp, 8), (k, k, 8, 8), (s, s))
  taps = sorted(t for phase in plan["phases"] for t, _ in phase)
  assert taps == list(range(k * k))
  assert all(offset >= 0 for phase in plan["phases"] for _, offset in phase)
  issued = sum(len(phase) for phase in plan["phases"]) * plan["positions"]
  padded_pixels = plan["rows"] * s * plan["width"] * s
  assert issued <= k * k * padded_pixels * plan["pitch"] / plan["width"]


@pytest.mark.skipif(not mosaic_gpu.interpret_supported(),
                    reason=f"Mosaic GPU interpret mode needs JAX >= 0.11, this "
                    f"is {jax.__version__} (its lowering is still tested)")
class TestMosaicGpuKernelInterpret(KernelTestBase):
  """`kernels.mosaic_gpu` forward in Mosaic GPU interpret mode on the host."""
  module = mosaic_gpu
  CASES = FAST_CASES + [Case(2, 12, 12, 4, 20, 3, 1)]
  SMALL_BLOCKS = {"forward": mosaic_gpu.BlockSizes(block_pix=64, block_ch=8),
                  "input_grad": gpu.BlockSizes(block_pix=16, block_ch=4)}


def test_mosaic_gpu_block_sizes_fit_shared_memory():
  for xp_shape, w_shape, strides in [((256, 34, 34, 16), (3, 3, 16, 16), (1, 1)),
                                     ((256, 18, 18, 32), (3, 3, 32, 64), (2, 2)),
                                     ((256, 10, 10, 64), (3, 3, 64, 64), (1, 1)),
                                     ((64, 58, 58, 64), (3, 3, 64, 64), (1, 1))]:
    bs = mosaic_gpu.get_block_sizes(xp_shape, w_shape, strides)
    assert mosaic_gpu.unsupported_reason(xp_shape, w_shape, strides, bs) is None
  with pytest.raises(ValueError, match="multiple of 64"):
    mosaic_gpu.BlockSizes(block_pix=96, block_ch=8)
  # A filter whose reach exceeds a TMA box is refused with the values.
  reason = mosaic_gpu.unsupported_reason((1, 300, 300, 3), (7, 7, 3, 8), (1, 1))
  assert reason is not None and "TMA box" in reason
  with pytest.raises(ValueError, match=r"xp \(1, 300, 300, 3\)"):
    mosaic_gpu.forward(jnp.ones((1, 300, 300, 3)), jnp.ones((7, 7, 3, 8)),
                       (1, 1))


# The TPU families' interpret-mode tests take about 150 s of the suite's work
# (TPU interpret mode runs a host callback per memory access): `extended`,
# which `.ci/run` runs in its second environment.
@pytest.mark.extended
class TestTpuKernelInterpret(KernelTestBase):
  """`kernels.tpu` (Mosaic TPU) in TPU interpret mode (`pltpu.InterpretParams`)."""
  module = tpu
  CASES = TPU_CASES
  SMALL_BLOCKS = {"forward": tpu.BlockSizes(block_m8=8, block_k=16, block_n=3),
                  "input_grad": tpu.BlockSizes(block_m8=8, block_k=16,
                                               block_n=3)}


@pytest.mark.extended
class TestTpuBatchKernelInterpret(KernelTestBase):
  """`kernels.tpu_batch` (Mosaic TPU, batch on the lanes) in TPU interpret
  mode. Its interpretation runs a grid step per output row, so only the
  strided precision problem (groups of GROUP channels and a ragged last
  group: 40 channels)."""
  module = tpu_batch
  CASES = TPU_BATCH_CASES
  PRECISION_CASES = PRECISION_CASES[2:]
  SMALL_BLOCKS = {"forward": tpu_batch.BlockSizes(block_c=2, block_n=3),
                  "input_grad": tpu_batch.BlockSizes(block_c=2, block_n=3)}

  def test_tpu_heuristic_tiles(self):
    """The tiles a TPU would run (ragged 16-channel output tiles, two
    output-channel groups in the input gradient's chunk, 2-channel register
    tiles), interpreted."""
    case = Case(2, 4, 5, 10, 18, 3, 1)
    xp, w, g = case.arrays(4)
    tiles = {kind: tpu_batch.get_block_sizes(kind, xp.shape, w.shape, (1, 1),
                                             "tpu")
             for kind in ("forward", "input_grad")}
    assert tiles["forward"] == tpu_batch.BlockSizes(block_c=10, block_n=16)
    assert tiles["input_grad"] == tpu_batch.BlockSizes(block_c=10, block_n=18)
    y = self.forward(xp, w, 1, tiles["forward"])
    dxp = self.input_grad(xp, w, g, 1, tiles["input_grad"])
    assert rel_err(y, np_forward(xp, w, (1, 1))) < 2e-6
    assert rel_err(dxp, np_input_grad(xp, w, g, (1, 1))) < 2e-6


def _has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (compiled Triton kernels)")
class TestGpuKernelCompiled(KernelTestBase):
  """`kernels.gpu` compiled for the GPU (tf32-free: pure CUDA-core FP32)."""
  module = gpu
  interpret = False
  CASES = FAST_CASES + [Case(8, 34, 34, 16, 16, 3, 1), Case(8, 34, 34, 16, 32, 3, 2),
                        Case(8, 10, 10, 64, 64, 3, 1), Case(8, 16, 16, 16, 32, 1, 2)]
  SMALL_BLOCKS = TestGpuKernelInterpret.SMALL_BLOCKS


def _has_hopper():
  if not _has_gpu():
    return False
  capability = getattr(jax.devices("gpu")[0], "compute_capability", "0")
  return float(capability) >= 9.0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_hopper(), reason="needs a Hopper or newer GPU "
                    "(compiled Mosaic GPU kernels)")
class TestMosaicGpuKernelCompiled(KernelTestBase):
  """`kernels.mosaic_gpu` forward compiled for the GPU."""
  module = mosaic_gpu
  interpret = False
  CASES = TestGpuKernelCompiled.CASES
  SMALL_BLOCKS = TestMosaicGpuKernelInterpret.SMALL_BLOCKS


def _data_parallel_grads(x, w, implementation, check_vma):
  """(dx, dw) of a data-parallel loss through `ops.adder_conv` (stride 2):
  shard_map over a one-device mesh, input sharded, filters replicated."""
  mesh = jax.make_mesh((1,), ("batch",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def loss(x, w):
    y = ops.adder_conv(x, w, strides=(2, 2), implementation=implementation)
    return jax.lax.pmean(jnp.sum(jnp.sin(y / 3.0)), "batch")
  step = jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh,
                       in_specs=(P("batch"), P()),
                       out_specs=(P("batch"), P()), check_vma=check_vma)
  return jax.jit(step)(x, w)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (compiled kernels)")
@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("chain,family", [("triton", "triton"),
                                          ("simt", "triton_simt"),
                                          ("mosaic", "mosaic_gpu")])
def test_compiled_kernels_inside_shard_map(monkeypatch, chain, family,
                                           check_vma):
  """A data-parallel step over one GPU (input sharded, filters replicated)
  in both check_vma modes: the family passes its check, runs, and matches
  XLA through the custom VJP."""
  if family == "mosaic_gpu" and not _has_hopper():
    pytest.skip("Mosaic GPU needs a Hopper or newer GPU")
  dispatch.reset()
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", chain)
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE", "1")
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((8, 16, 16, 16)), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((3, 3, 16, 32)), jnp.float32)
  with ops.record_backends() as record:
    got = _data_parallel_grads(x, w, "pallas", check_vma)
  assert family in {r["implementation"] for r in record}, record
  for a, b in zip(got, _data_parallel_grads(x, w, "xla", check_vma)):
    assert rel_err(a, b) < 1e-5
  dispatch.reset()


# -------------------------------------------------------- block heuristics --

@pytest.mark.parametrize("platform", ["gpu", "cpu"])
@pytest.mark.parametrize("shapes", [((256, 34, 34, 16), (3, 3, 16, 16), (1, 1)),
                                    ((256, 34, 34, 16), (3, 3, 16, 32), (2, 2)),
                                    ((256, 10, 10, 64), (3, 3, 64, 64), (1, 1)),
                                    ((3, 7, 5, 3), (1, 1, 3, 1000), (2, 2))])
def test_gpu_block_sizes_are_valid(platform, shapes):
  xp_shape, w_shape, strides = shapes
  for kind in ("forward", "input_grad"):
    bs = gpu.get_block_sizes(kind, xp_shape, w_shape, strides, platform)
    assert layout.is_pow2(bs.block_pix) and layout.is_pow2(bs.block_ch)
    if platform == "gpu":  # register budget: <= 64 accumulators per thread
      assert bs.block_pix * bs.block_ch <= 64 * 32 * bs.num_warps


def test_tpu_block_sizes_are_aligned():
  bs = tpu.get_block_sizes("forward", (256, 34, 34, 16), (3, 3, 16, 16),
                           (1, 1), "tpu")
  assert bs.block_m8 % 8 == 0 and bs.block_n <= 16
  with pytest.raises(ValueError, match="block_m8"):
    tpu.BlockSizes(block_m8=12, block_k=8, block_n=8)
  with pytest.raises(ValueError, match="power of two"):
    gpu.BlockSizes(block_pix=24, block_ch=8)


@pytest.mark.parametrize("shapes", [((256, 34, 34, 16), (3, 3, 16, 16), (1, 1)),
                                    ((256, 34, 34, 16), (3, 3, 16, 32), (2, 2)),
                                    ((256, 10, 10, 64), (3, 3, 64, 64), (1, 1)),
                                    ((256, 16, 16, 32), (1, 1, 32, 64), (2, 2)),
                                    ((128, 58, 58, 64), (3, 3, 64, 64), (1, 1)),
                                    ((128, 56, 56, 256), (1, 1, 256, 64), (1, 1)),
                                    ((64, 230, 230, 3), (7, 7, 3, 64), (2, 2))])
def test_tpu_batch_block_sizes_fit(shapes):
  """TPU tiles: the filter block fits its SMEM budget, the double-buffered
  blocks the VMEM budget; the forward's chunks are whole groups."""
  xp_shape, w_shape, strides = shapes
  kh, kw, cin, _ = w_shape
  geo = tpu_batch._geometry(xp_shape, w_shape, strides)
  for kind in ("forward", "input_grad"):
    bs = tpu_batch.get_block_sizes(kind, xp_shape, w_shape, strides, "tpu")
    assert kh * kw * bs.block_c * bs.block_n <= tpu_batch.SMEM_SCALARS
    assert tpu_batch._vmem_bytes(kind, geo, w_shape, strides,
                                 bs) <= tpu_batch.VMEM_BUDGET
    align = tpu_batch.GROUP if kind == "forward" else 8
    assert bs.block_c in (cin, 1) or bs.block_c % align == 0
    if kind == "forward":  # accumulators and partials: 32 of 64 vregs
      assert bs.block_n <= tpu_batch.GROUP
  # ResNet-20 (32x32 images, cin <= 64): one input-channel chunk, the input
  # read once per output row and tap row.
  if xp_shape[1] <= 34:
    assert tpu_batch.get_block_sizes("forward", xp_shape, w_shape, strides,
                                     "tpu").block_c == cin
  assert tpu_batch.unsupported_reason(xp_shape, w_shape, strides) is None


def test_tpu_batch_refuses_small_batches():
  reason = tpu_batch.unsupported_reason((32, 34, 34, 16), (3, 3, 16, 16),
                                        (1, 1))
  assert reason is not None and "batch 32" in reason
  with pytest.raises(ValueError, match="block_c"):
    tpu_batch.BlockSizes(block_c=0, block_n=8)


# --------------------------------------------- cross-platform lowering --

LOWER_SHAPES = [((256, 34, 34, 16), (3, 3, 16, 16), (1, 1)),
                ((64, 18, 18, 16), (3, 3, 16, 32), (2, 2)),
                ((64, 16, 16, 32), (1, 1, 32, 64), (2, 2)),
                ((2, 9, 11, 3), (5, 5, 3, 7), (1, 1))]


def _abstract_h100(axis: str = "x"):
  """A one-device abstract mesh of an H100, or None (older JAX: no abstract
  devices; there Triton lowering does not need one)."""
  try:
    return jax.sharding.AbstractMesh(
        (1,), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
        abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
  except (AttributeError, TypeError):
    return None


def _target_device(platform, mesh=None):
  """An abstract H100 for Triton lowering on a machine without a GPU.

  JAX >= 0.12 asks the default device (or the abstract mesh) for the GPU's
  compute capability while lowering Pallas Triton; JAX 0.10 does not.
  """
  if platform != "cuda" or jax.default_backend() == "gpu":
    return contextlib.nullcontext()
  mesh = mesh or _abstract_h100()
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


def _lower(fn, platform, *avals, mesh=None):
  with _target_device(platform, mesh):
    return jax.jit(fn).trace(*avals).lower(
        lowering_platforms=(platform,)).as_text()


TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("xp_shape,w_shape,strides", LOWER_SHAPES)
@pytest.mark.parametrize("family,platform,markers",
                         [(gpu, "cuda", (TRITON_CALL, TRITON_CALL)),
                          (mosaic_gpu, "cuda", ("mosaic_gpu", TRITON_CALL)),
                          (tpu, "tpu", ("tpu_custom_call",) * 2),
                          (tpu_batch, "tpu", ("tpu_custom_call",) * 2)])
def test_kernels_lower_for_device(family, platform, markers, xp_shape, w_shape,
                                  strides):
  """Triton / Mosaic lowering runs on the host (no device compile or run)."""
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  xp = jax.ShapeDtypeStruct(xp_shape, jnp.bfloat16)
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
  g = jax.ShapeDtypeStruct((xp_shape[0], ho, wo, w_shape[3]), jnp.float32)
  fwd = _lower(lambda a, b: family.forward(a, b, strides), platform, xp, w)
  dx = _lower(lambda a, b, c: family.input_grad(a, b, c, strides), platform,
              xp, w, g)
  assert markers[0] in fwd and markers[1] in dx


# ---------------------------------------------------- dispatch and the VJP --

@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="checks the CPU (interpret-mode) dispatch")
def test_dispatch_on_cpu_interprets_gpu_kernels():
  dispatch.reset()
  backend = dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert isinstance(backend, dispatch.Kernels)
  assert backend.name == "triton" and backend.interpret
  assert backend.forward.func is gpu.forward
  assert backend.forward.keywords == {"interpret": True}
  assert dispatch.backend_for((2, 7, 9, 3), (3, 3, 4, 5), (1, 1)) is None
  assert dispatch.backend_for((2, 2, 2, 3), (3, 3, 3, 5), (1, 1)) is None
  # ops wraps it in its own Backend, named after the family that runs.
  wrapped = ops._pallas_backend((2, 7, 9, 3), (3, 3, 3, 5), (1, 1), "float32")
  assert isinstance(wrapped, ops.Backend) and wrapped.name == "triton"


def test_dispatch_switches(monkeypatch):
  # No GPU/TPU here to build the kernels on: the check on first use is
  # tested in tests/test_dispatch.py with injected failures.
  monkeypatch.setattr(dispatch, "kernel_failure", lambda *a, **k: None)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "tpu")
  backend = dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert backend.input_grad.func is tpu.input_grad
  assert backend.input_grad.keywords == {"interpret": True}
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  backend = dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert backend.forward.func is tpu.forward and backend.name == "tpu"
  # Batch on the lanes first; under 64 images the patches kernels, whose
  # patches matrix over the cap is refused (XLA fallback), not run.
  backend = dispatch.backend_for((64, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert backend.forward.func is tpu_batch.forward
  assert backend.name == "tpu_batch"
  assert dispatch.backend_for((4096, 226, 226, 64), (3, 3, 64, 64),
                              (1, 1)).name == "tpu_batch"
  assert dispatch.backend_for((32, 1026, 1026, 64), (3, 3, 64, 64),
                              (1, 1)) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "xla")
  assert dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1)) is None
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "triton")
  backend = dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert backend.forward.func is gpu.forward and backend.name == "triton"
  assert backend.forward.keywords == {"interpret": False}
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "mosaic")
  backend = dispatch.backend_for((2, 7, 9, 3), (3, 3, 3, 5), (1, 1))
  assert backend.forward.func is mosaic_gpu.forward
  assert backend.name == "mosaic_gpu"
  # Shapes the Mosaic GPU forward does not take run the Triton pair.
  backend = dispatch.backend_for((1, 300, 300, 3), (7, 7, 3, 8), (1, 1))
  assert backend.forward.func is gpu.forward and backend.name == "triton"
  assert dispatch.mac_count((2, 7, 9, 3), (3, 3, 3, 5), (1, 1)) == (
      2 * 5 * 7 * 3 * 3 * 3 * 5)


def test_kernels_that_fail_to_build_fall_back_with_a_log_line(monkeypatch,
                                                              caplog):
  """On a "GPU" (this CPU), the real Triton kernels cannot be built: the
  check on first use says so, and ops runs XLA with no error."""
  dispatch.reset()
  shapes = ((2, 7, 9, 3), (3, 3, 3, 5), (1, 1), "float32")
  reason = dispatch.kernel_failure("triton", gpu, *shapes,
                                   reference=ops._REFERENCE)
  assert reason is not None and reason.startswith("does not build"), reason
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "triton")
  with caplog.at_level("WARNING", logger="addernet_jax.kernels.dispatch"):
    assert dispatch.backend_for(*shapes[:3], reference=ops._REFERENCE) is None
  assert "triton kernels rejected" in caplog.text
  assert "using the XLA implementation" in caplog.text
  # Through the custom VJP the fallback gives the XLA result, with no error.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
  with ops.record_backends() as record:
    got = ops.adder_conv(x, w, padding="SAME", implementation="pallas")
  assert [r["implementation"] for r in record] == ["xla"]
  want = ops.adder_conv(x, w, padding="SAME", implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-6)
  dispatch.reset()


@pytest.mark.extended
def test_tpu_chain_through_the_custom_vjp(monkeypatch):
  """The TPU chain on the CPU (interpret mode) with the check on first use,
  which runs the kernels while `jit` traces the step (in a thread of its
  own: nothing of the trace may leak into it): 64 images run the
  batch-on-lanes kernels, 2 fall back to the patches kernels; both pass the
  check and match XLA through `ops.adder_conv`'s custom VJP."""
  dispatch.reset()
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "tpu_batch,tpu")
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE", "1")
  rng = np.random.default_rng(5)
  w = jnp.asarray(0.7 * rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  for n, family in ((64, "tpu_batch"), (2, "tpu")):
    x = jnp.asarray(rng.standard_normal((n, 4, 5, 3)), jnp.float32)
    with ops.record_backends() as record:
      _, y_p, (dx_p, dw_p) = _loss_and_grads(x, w, (2, 2), "SAME", "pallas")
    assert {r["implementation"] for r in record} == {family}, record
    _, y_x, (dx_x, dw_x) = _loss_and_grads(x, w, (2, 2), "SAME", "xla")
    assert rel_err(y_p, y_x) < 2e-6
    assert rel_err(dx_p, dx_x) < 2e-6
    assert rel_err(dw_p, dw_x) < 2e-6
  dispatch.reset()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret mode: the CPU's kernel chain")
@pytest.mark.parametrize("check_vma", [False, True])
@pytest.mark.parametrize("chain,family,probe", [
    pytest.param("tpu", "tpu", "1", marks=pytest.mark.extended),
    ("gpu", "triton", "1"), ("gpu", "triton", None)])
def test_interpret_kernels_inside_shard_map(monkeypatch, chain, family,
                                            probe, check_vma):
  """A data-parallel step (shard_map over a one-device mesh, input sharded,
  filters replicated) with the check on first use: the TPU patches kernels
  pass the check and run in both check_vma modes (the check once failed
  them, reading the caller's axis names); Triton in interpret mode runs with
  check_vma=False, and with check_vma=True, where Pallas' HLO interpreter
  cannot run (JAX 0.10-0.11), is rejected by the check, which runs there
  even when not asked for (`probe` None), and XLA runs. Every result matches
  XLA."""
  dispatch.reset()
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", chain)
  if probe is None:
    monkeypatch.delenv("ADDERNET_KERNEL_PROBE", raising=False)
  else:
    monkeypatch.setenv("ADDERNET_KERNEL_PROBE", probe)
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 4, 5, 3)), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((3, 3, 3, 4)), jnp.float32)
  with ops.record_backends() as record:
    got = _data_parallel_grads(x, w, "pallas", check_vma)
  ran = {r["implementation"] for r in record}
  if family == "tpu" or not check_vma:
    assert ran == {family}, record
  else:
    assert ran <= {family, "xla"}, record
  for a, b in zip(got, _data_parallel_grads(x, w, "xla", check_vma)):
    assert rel_err(a, b) < 2e-6
  dispatch.reset()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret mode: the CPU's kernel chain")
@pytest.mark.parametrize("devices,family", [(1, "tpu"), (2, "xla")])
def test_tpu_interpret_mode_only_in_one_device_shard_maps(monkeypatch, caplog,
                                                          devices, family):
  """Inside a shard_map over several devices TPU interpret mode hangs (its
  device simulation waits at a barrier): dispatch does not use it there and
  says why. Traced over an abstract mesh: no devices, nothing runs."""
  dispatch.reset()
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "tpu")
  mesh = jax.sharding.AbstractMesh((devices,), ("batch",),
                                   axis_types=(jax.sharding.AxisType.Auto,))
  step = jax.shard_map(
      lambda x, w: ops.adder_conv(x, w, implementation="pallas"), mesh=mesh,
      in_specs=(P("batch"), P()), out_specs=P("batch"), check_vma=False)
  with ops.record_backends() as record, caplog.at_level(
      logging.INFO, logger="addernet_jax.kernels.dispatch"):
    jax.jit(step).trace(jax.ShapeDtypeStruct((2 * devices, 6, 6, 3),
                                             jnp.float32),
                        jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32))
  assert {r["implementation"] for r in record} == {family}
  assert ("shard_map of at most 1 device(s), this one has 2"
          in caplog.text) == (devices == 2)
  dispatch.reset()


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="interpret mode: the CPU's kernel chain")
def test_second_derivative_through_the_kernels(monkeypatch):
  """grad of grad (e.g. a gradient penalty) with the Pallas kernels: once a
  bare AssertionError from inside Pallas (kernels have no derivative); now
  the kernels run, and the second derivative equals the XLA path's."""
  dispatch.reset()
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "gpu")
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((3, 3, 3, 4)), jnp.float32)

  def penalty(w, implementation):
    def loss(x):
      y = ops.adder_conv(x, w, strides=(2, 1), padding=((1, 1), (1, 1)),
                         implementation=implementation)
      return jnp.sum(jnp.tanh(y / 10.0))
    return jnp.sum(jax.grad(loss)(x) ** 2)

  with ops.record_backends() as record:
    got = jax.jit(jax.grad(penalty), static_argnums=1)(w, "pallas")
  assert {r["implementation"] for r in record} == {"triton"}, record
  want = jax.jit(jax.grad(penalty), static_argnums=1)(w, "xla")
  assert float(jnp.linalg.norm(want)) > 0
  assert rel_err(got, want) < 1e-5
  dispatch.reset()


def _loss_and_grads(x, w, strides, padding, implementation):
  def loss(x, w):
    y = ops.adder_conv(x, w, strides=strides, padding=padding,
                       implementation=implementation)
    return jnp.sum(jnp.sin(y.astype(jnp.float32) / 3.0)), y
  (val, y), grads = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      x, w)
  return val, y, grads


@pytest.mark.parametrize("shape,strides,padding,dtype", [
    ((2, 7, 9, 3, 5, 3), (1, 1), "SAME", "float32"),
    pytest.param((2, 8, 7, 4, 6, 3), (2, 2), "SAME", "bfloat16",
                 marks=pytest.mark.slow),
    pytest.param((1, 6, 5, 3, 4, 1), (2, 2), "VALID", "float32",
                 marks=pytest.mark.slow),
])
def test_custom_vjp_pallas_matches_xla(shape, strides, padding, dtype):
  n, h, w_, cin, cout, k = shape
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((n, h, w_, cin)), dtype)
  w = jnp.asarray(0.7 * rng.standard_normal((k, k, cin, cout)), dtype)
  val_p, y_p, (dx_p, dw_p) = _loss_and_grads(x, w, strides, padding, "pallas")
  val_x, y_x, (dx_x, dw_x) = _loss_and_grads(x, w, strides, padding, "xla")
  assert y_p.dtype == y_x.dtype == jnp.dtype(dtype)
  tol = 2e-6 if dtype == "float32" else 1e-2  # bf16 outputs / gradients
  assert rel_err(y_p, y_x) < tol
  assert rel_err(dx_p, dx_x) < tol
  assert rel_err(dw_p, dw_x) < tol
  # And the input gradient really is the clipped one (not the true derivative).
  if dtype == "float32" and padding == "SAME":
    pads = jax.lax.padtype_to_pads((h, w_), (k, k), strides, "SAME")
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
    g = np.cos(np.asarray(y_x, np.float64) / 3.0) / 3.0
    dxp = np_input_grad(xp, np.asarray(w), g, strides)
    (t, b), (l, r) = pads
    want = dxp[:, t:t + h, l:l + w_, :]
    assert rel_err(dx_p, want) < 1e-5


@pytest.mark.parametrize("family,platform,marker",
                         [(gpu, "cuda", TRITON_CALL),
                          (simt, "cuda", TRITON_CALL),
                          (mosaic_gpu, "cuda", "mosaic_gpu"),
                          (tpu, "tpu", "tpu_custom_call"),
                          (tpu_batch, "tpu", "tpu_custom_call")])
def test_kernels_lower_inside_shard_map_with_check_vma(family, platform,
                                                       marker):
  """Inside `shard_map(check_vma=True)` (JAX's default), with the input
  varying along the mesh axis and the filters replicated, as a data-parallel
  step calls them: every kernel's output declares its varying axes
  (`layout.out_struct`), else tracing fails."""
  xp_shape, w_shape, strides = (64, 18, 18, 16), (3, 3, 16, 32), (2, 2)
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  abstract = (_abstract_h100("batch") if platform == "cuda"
              and jax.default_backend() != "gpu" else None)
  mesh = abstract or jax.make_mesh((1,), ("batch",),
                                   axis_types=(jax.sharding.AxisType.Auto,))
  avals = (jax.ShapeDtypeStruct(xp_shape, jnp.float32),
           jax.ShapeDtypeStruct(w_shape, jnp.float32),
           jax.ShapeDtypeStruct((xp_shape[0], ho, wo, w_shape[3]),
                                jnp.float32))

  def both(xp, w, g):
    return family.forward(xp, w, strides), family.input_grad(xp, w, g,
                                                             strides)
  step = jax.shard_map(both, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                       out_specs=(P("batch"), P("batch")), check_vma=True)
  text = _lower(step, platform, *avals, mesh=abstract)
  assert marker in text


def test_gpu_input_grad_sums_several_output_channel_blocks():
  """More output channels (37) than FORWARD_BLOCK: the input gradient sums
  three blocks of partials (13, 13 and a shorter last 11). On JAX 0.10 no
  other default test gives `kernels.gpu.input_grad` more than 16 output
  channels (the Mosaic GPU class, whose input gradient this is, has one
  case with 20, and runs from JAX 0.11 only)."""
  case = Case(1, 6, 7, 3, 37, 3, 2)
  xp, w, g = case.arrays(7)
  assert gpu.forward_blocks(case.cout) == (3, 13)
  dxp = gpu.input_grad(xp, w, g, (2, 2), interpret=True)
  assert dxp.dtype == jnp.float32
  assert rel_err(dxp, np_input_grad(xp, w, g, (2, 2))) < 2e-6


def _pallas_operand_shapes(fn, *args) -> list[tuple[int, ...]]:
  """The operand shapes of the first pallas_call `fn` traces to."""
  for eqn in all_equations(jax.make_jaxpr(fn)(*args)):
    if eqn.primitive.name == "pallas_call":
      return [tuple(v.aval.shape) for v in eqn.invars]
  return None


@pytest.mark.parametrize("xp_shape,k,strides,block_pix", [
    ((2, 5, 40, 3), 3, (1, 1), 16),    # 2-D tiles, ragged columns
    ((1, 12, 7, 2), 3, (1, 1), 16),
    ((1, 9, 21, 4), 3, (2, 2), 8),     # strided
    ((1, 19, 19, 2), 3, (1, 1), 64),   # 17-wide: flat tiles
    ((1, 35, 35, 2), 3, (2, 2), 32),   # 17-wide stride phases, flat
    ((1, 8, 11, 2), 1, (2, 2), 8),     # 1x1 strided
])
def test_gpu_forward_reads_stay_inside_the_padded_input(xp_shape, k, strides,
                                                        block_pix):
  """Every (tile pixel + tap) position the forward kernel reads lies inside
  the input it is given. Interpret mode clamps an out-of-bounds index (the
  results of the cropped pixels that read it are dropped), so no numerical
  test shows a short pad; on a GPU those are out-of-bounds loads."""
  xp = jnp.zeros(xp_shape, jnp.float32)
  w = jnp.zeros((k, k, xp_shape[3], 6), jnp.float32)
  ho, wo = layout.output_hw(xp_shape, w.shape, strides)
  _, wq, taps = layout.phase_split(xp, strides, k, k)
  tiling = gpu.pixel_tiles(ho, wo, wq, block_pix)
  p = np.arange(block_pix)
  reads = []
  for tile in range(tiling["tiles"]):
    if tiling["flat"]:
      reads.append(tile * block_pix + p)
    else:
      row0 = tile // tiling["col_tiles"] * tiling["tile_rows"]
      col0 = tile % tiling["col_tiles"] * tiling["tile_cols"]
      reads.append((row0 + p // tiling["tile_cols"]) * wq + col0
                   + p % tiling["tile_cols"])
  last_read = int(np.max(reads)) + max(off for _, off in taps)
  shapes = _pallas_operand_shapes(
      lambda xp, w: gpu.forward(
          xp, w, strides, interpret=True,
          block_sizes=gpu.BlockSizes(block_pix=block_pix, block_ch=4)),
      xp, w)
  length = shapes[0][2]  # [n, phases, flat length, cin]
  assert last_read < length, (last_read, length, tiling)


# From a mutation audit of `layout`: its helpers against their definitions,
# on small arrays (no Pallas; the kernel tests above go through them only
# with the strides and sizes the kernels happen to use).


def test_layout_integer_helpers():
  assert [layout.next_pow2(a) for a in (0, 1, 2, 3, 4, 5, 17)] == [
      1, 1, 2, 4, 4, 8, 32]
  assert [a for a in range(-2, 9) if layout.is_pow2(a)] == [1, 2, 4, 8]
  assert [layout.cdiv(a, 4) for a in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
  assert [layout.round_up(a, 4) for a in (0, 1, 4, 5)] == [0, 4, 4, 8]
  assert layout.output_hw((1, 9, 8, 3), (3, 2, 3, 4), (3, 2)) == (3, 4)
  assert layout.output_hw((1, 9, 8, 3), (3, 2, 3, 4), (2, 3)) == (4, 3)


@pytest.mark.parametrize("xp_shape,w_shape,strides,g_shape,match", [
    ((2, 7, 8, 3), (3, 3, 3, 4), (1, 0), None, "strides must be two positive"),
    ((2, 7, 8, 3), (3, 3, 3, 4), (0, 1), None, "strides must be two positive"),
    ((2, 7, 2, 3), (3, 3, 3, 4), (1, 1), None, r"filters \(3, 3\) larger"),
    ((2, 2, 8, 3), (3, 3, 3, 4), (1, 1), None, r"filters \(3, 3\) larger"),
    ((2, 7, 8, 3), (3, 3, 3, 4), (1, 1), (2, 5, 6, 5), "output gradient"),
    ((2, 7, 8, 3), (3, 3, 3, 4), (2, 1), (2, 5, 6, 4), "output gradient"),
])
def test_check_shapes_refuses_each_misfit(xp_shape, w_shape, strides, g_shape,
                                          match):
  layout.check_shapes("k", (2, 7, 8, 3), (3, 3, 3, 4), (2, 1), (2, 3, 6, 4))
  with pytest.raises(ValueError, match=f"^k: {match}"):
    layout.check_shapes("k", xp_shape, w_shape, strides, g_shape)


@pytest.mark.parametrize("strides", [(2, 1), (3, 1), (2, 3)])
def test_phase_split_and_patches_match_their_definitions(strides):
  """phase_split's taps read, at output (p, q), xp[p*sh + i, q*sw + j];
  patches_t's rows are those values, tap-major; fold_patches_t adds each
  row back where it came from. Interpret mode
  clamps an out-of-range phase index, so a kernel test with strides (2, 1)
  did not see a wrong phase (on a GPU: a read out of bounds)."""
  sh, sw = strides
  kh, kw, n, c = 3, 2, 2, 3
  xp = np.arange(n * 10 * 9 * c, dtype=np.float32).reshape(n, 10, 9, c)
  ho, wo = layout.output_hw(xp.shape, (kh, kw, c, 1), strides)
  xs, wq, taps = layout.phase_split(jnp.asarray(xp), strides, kh, kw)
  xs = np.asarray(xs)
  assert xs.shape[1] == sh * sw and len(taps) == kh * kw
  pt = np.asarray(layout.patches_t(jnp.asarray(xp), kh, kw, strides,
                                   (ho, wo)))
  assert pt.shape == (kh * kw * c, n * ho * wo)
  for i in range(kh):
    for j in range(kw):
      want = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      phase, offset = taps[i * kw + j]
      f = (np.arange(ho)[:, None] * wq + np.arange(wo)[None, :]).ravel()
      got = xs[:, phase, f + offset].reshape(n, ho, wo, c)
      np.testing.assert_array_equal(got, want, err_msg=str((i, j)))
      t = i * kw + j
      np.testing.assert_array_equal(
          pt[t * c:(t + 1) * c], want.transpose(3, 0, 1, 2).reshape(c, -1))
  d = np.random.default_rng(0).integers(-3, 4, pt.shape).astype(np.float32)
  want = np.zeros(xp.shape, np.float32)  # integers: every sum exact
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    want[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += d[
        t * c:(t + 1) * c].reshape(c, n, ho, wo).transpose(1, 2, 3, 0)
  np.testing.assert_array_equal(np.asarray(layout.fold_patches_t(
      jnp.asarray(d), xp.shape, kh, kw, strides, (ho, wo))), want)


def test_block_offsets_are_summed_in_the_partials_order():
  """`m` is the sequential float32 sum over the terms, bit for bit (the
  order the kernels' block partials add |0 - w|, so that a zero input
  contributes exactly 0); XLA's own reduction differs in the last bits."""
  w = 3.0 * np.random.default_rng(1).standard_normal((4, 36, 8))
  w = w.astype(np.float32)
  want = np.abs(w[:, 0])
  for c in range(1, w.shape[1]):
    want = want + np.abs(w[:, c])
  m, _ = layout.block_offsets(jnp.asarray(w))
  np.testing.assert_array_equal(np.asarray(m), want)
