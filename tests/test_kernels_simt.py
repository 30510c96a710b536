"""`kernels.triton_simt` (register-tiled Pallas Triton kernels) against float64.

Same structure as tests/test_kernels.py: `SimtKernelTestBase` holds the
checks, `TestSimtKernelInterpret` runs them in Pallas interpret mode on the
CPU, `TestSimtKernelCompiled` compiled on a GPU (skipped without one), and the
lowering tests build the Triton kernels for an abstract H100 without a device.
Interpret-mode cost grows with grid steps and unrolled ops: the cases are
small and the default interpret tiles cover a layer in one or two programs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from addernet_jax.kernels import layout, triton_simt
from test_kernels import Case, np_forward, np_input_grad, rel_err

simt = triton_simt
BS = simt.BlockSizes

# Odd spatial sizes, channels not multiples of any tile, 1x1 / 3x3 / 5x5,
# stride 1 and 2 with odd padded sizes, bfloat16 and float16 inputs.
CASES = [
    Case(2, 7, 9, 3, 5, 3, 1),
    Case(2, 9, 8, 4, 6, 3, 2),
    Case(1, 6, 5, 3, 7, 1, 2),
    Case(1, 9, 8, 2, 3, 5, 1),
    Case(2, 8, 7, 3, 4, 3, 1, "bfloat16"),
    Case(1, 7, 8, 5, 3, 3, 2, "float16"),
]


def pytest_generate_tests(metafunc):
  if "case" in metafunc.fixturenames:
    cases = metafunc.cls.CASES
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


# Inputs are exact in float64 (bf16/f16 values are exactly representable), so
# the only error is float32 rounding: far under 1e-5 relative.
TOL = 2e-6


class SimtKernelTestBase:
  """Checks for one way of running the kernels; subclasses set these."""
  interpret = True
  CASES = CASES
  # Tiles with several programs along pixels and channels, ragged edges.
  SMALL = BS(pix_per_thread=1, ch_per_thread=2, warps_pix=1, warps_ch=2,
             unroll=1)
  # A GPU-like register tile: R=2 rows, C=8 channels in G=2 vector groups.
  TILED = BS(pix_per_thread=2, ch_per_thread=8, warps_pix=1, warps_ch=1,
             unroll=1)

  def forward(self, xp, w, strides, bs=None):
    return simt.forward(xp, w, strides, block_sizes=bs,
                        interpret=self.interpret)

  def input_grad(self, xp, w, g, strides, bs=None, **window):
    return simt.input_grad(xp, w, g, strides, block_sizes=bs,
                           interpret=self.interpret, **window)

  def test_forward(self, case):
    xp, w, _ = case.arrays(0)
    s = (case.s, case.s)
    y = self.forward(xp, w, s)
    assert y.dtype == jnp.float32
    want = np_forward(xp, w, s)
    assert y.shape == want.shape and np.all(np.isfinite(np.asarray(y)))
    assert rel_err(y, want) < TOL, case

  def test_input_grad(self, case):
    xp, w, g = case.arrays(1)
    s = (case.s, case.s)
    dxp = self.input_grad(xp, w, g, s)
    assert dxp.dtype == jnp.float32
    want = np_input_grad(xp, w, g, s)
    assert dxp.shape == want.shape
    assert rel_err(dxp, want) < TOL, case

  def test_many_grid_steps(self):
    """32-pixel, 2-channel tiles: 6 pixel tiles x 4 channel tiles (forward),
    ragged in both; strided input gradient with 4 phases."""
    case = Case(1, 13, 18, 5, 7, 3, 1)
    xp, w, g = case.arrays(2)
    y = self.forward(xp, w, (1, 1), self.SMALL)
    assert rel_err(y, np_forward(xp, w, (1, 1))) < TOL
    case = Case(1, 15, 14, 5, 7, 3, 2)
    xp, w, g = case.arrays(3)
    dxp = self.input_grad(xp, w, g, (2, 2), self.SMALL)
    assert rel_err(dxp, np_input_grad(xp, w, g, (2, 2))) < TOL

  def test_register_tiles(self):
    """R x C = 2 x 8 register tiles (two filter vectors per channel step)."""
    case = Case(2, 10, 9, 6, 13, 3, 2)
    xp, w, g = case.arrays(4)
    y = self.forward(xp, w, (2, 2), self.TILED)
    dxp = self.input_grad(xp, w, g, (2, 2), self.TILED)
    assert rel_err(y, np_forward(xp, w, (2, 2))) < TOL
    assert rel_err(dxp, np_input_grad(xp, w, g, (2, 2))) < TOL


class TestSimtKernelInterpret(SimtKernelTestBase):
  """Pallas interpret mode on the host (the jnp twins of the inline PTX)."""


def _has_gpu():
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs a GPU (compiled Triton kernels)")
class TestSimtKernelCompiled(SimtKernelTestBase):
  """Compiled for the GPU (inline PTX abs and min.xorsign.abs; sm_86+)."""
  interpret = False
  CASES = CASES + [Case(8, 34, 34, 16, 16, 3, 1), Case(8, 34, 34, 16, 32, 3, 2),
                   Case(8, 10, 10, 64, 64, 3, 1), Case(8, 16, 16, 16, 32, 1, 2)]
  SMALL = BS(pix_per_thread=1, ch_per_thread=2, warps_pix=1, warps_ch=2)
  TILED = BS(pix_per_thread=2, ch_per_thread=8, warps_pix=2, warps_ch=2)

  def test_gpu_heuristic_tiles(self):
    """The GPU tiles of every ResNet-20 layer shape (batch 8) are exact."""
    for layer in _resnet20().RESNET20_LAYERS:
      sh = _resnet20().layer_shapes(8, layer)
      rng = np.random.default_rng(0)
      xp = jnp.asarray(rng.standard_normal(sh["xp"]), jnp.float32)
      w = jnp.asarray(rng.standard_normal(sh["w"]), jnp.float32)
      g = jnp.asarray(rng.standard_normal(sh["y"]), jnp.float32)
      assert rel_err(self.forward(xp, w, sh["strides"]),
                     np_forward(xp, w, sh["strides"])) < TOL
      assert rel_err(self.input_grad(xp, w, g, sh["strides"]),
                     np_input_grad(xp, w, g, sh["strides"])) < TOL


# ------------------------------------------------- options and windows --

@pytest.mark.parametrize("accumulate,chunk,unroll,clip", [
    ("kahan", 4, 2, "xorsign"),   # 3 chunks per tap (a chunk loop)
    ("kahan", 8, 4, "xorsign"),   # one chunk of 8 and the last 4
    ("tap", 64, 2, "minmax"),
    ("flat", 64, 4, "minmax"),
])
def test_options_interpret(accumulate, chunk, unroll, clip):
  """Accumulation modes, chunked partial sums, unrolled channel loops (cin
  12, cout 6: padded to a multiple of `unroll`) and both clips."""
  case = Case(1, 6, 7, 12, 6, 3, 1)
  xp, w, g = case.arrays(5)
  bs = BS(pix_per_thread=1, ch_per_thread=4, warps_pix=1, warps_ch=2,
          unroll=unroll, chunk=chunk, accumulate=accumulate, clip=clip)
  y = simt.forward(xp, w, (1, 1), block_sizes=bs, interpret=True)
  assert rel_err(y, np_forward(xp, w, (1, 1))) < TOL
  if accumulate != "kahan" or chunk == 8:  # the input gradient ignores both
    dxp = simt.input_grad(xp, w, g, (1, 1), block_sizes=bs, interpret=True)
    assert rel_err(dxp, np_input_grad(xp, w, g, (1, 1))) < TOL


@pytest.mark.parametrize("x_shape,k,strides,pads", [
    ((2, 8, 7, 3), 3, (1, 1), ((1, 1), (1, 1))),   # SAME, symmetric
    ((1, 8, 8, 4), 3, (2, 2), ((0, 1), (0, 1))),   # SAME stride 2: asymmetric
    ((1, 9, 10, 3), 5, (2, 2), ((1, 2), (2, 1))),  # explicit, uneven
    ((1, 7, 9, 2), 3, (2, 1), ((2, 0), (0, 2))),   # one-sided, unequal strides
    ((1, 8, 8, 5), 1, (2, 2), ((0, 0), (0, 0))),   # VALID 1x1 shortcut
])
def test_padding_and_window_interpret(x_shape, k, strides, pads):
  """As `ops.adder_conv` calls the kernels: pad, forward, and the input
  gradient of only the unpadded (rows, cols) window, which is exact there."""
  rng = np.random.default_rng(9)
  x = rng.standard_normal(x_shape)
  xp = jnp.asarray(np.pad(x, ((0, 0), *pads, (0, 0))), jnp.float32)
  w = jnp.asarray(0.7 * rng.standard_normal((k, k, x_shape[3], 6)),
                  jnp.float32)
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  g = jnp.asarray(rng.standard_normal((x_shape[0], ho, wo, 6)), jnp.float32)
  y = simt.forward(xp, w, strides, interpret=True)
  assert rel_err(y, np_forward(xp, w, strides)) < TOL
  (top, _), (left, _) = pads
  rows, cols = (top, top + x_shape[1]), (left, left + x_shape[2])
  got = simt.input_grad(xp, w, g, strides, interpret=True, rows=rows,
                        cols=cols)
  want = np_input_grad(xp, w, g, strides)
  assert got.shape == want.shape
  window = (slice(None), slice(*rows), slice(*cols))
  assert rel_err(got[window], want[window]) < TOL
  # Outside the window: zeros, or exact values the tiles computed anyway.
  outside = np.ones(got.shape, bool)
  outside[window] = False
  got, want = np.asarray(got)[outside], want[outside]
  assert np.all((got == 0) | (np.abs(got - want) <= 1e-5 * (1 + np.abs(want))))
  with pytest.raises(ValueError, match=r"rows \(5, 5\)"):
    simt.input_grad(xp, w, g, strides, interpret=True, rows=(5, 5))


# ------------------------------------------------------------- precision --

def _centred_rel_err(y, want):
  """Relative L2 error of the per-channel-centred outputs (what BatchNorm
  keeps): the channel means over (n, h, w) are removed from both."""
  y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
  axes = (0, 1, 2)
  return rel_err(y - y.mean(axes), want - want.mean(axes))


def _pairwise_f32_forward(xp, w, strides):
  """The forward summed by NumPy in float32 over all taps and channels at
  once (pairwise summation, as a blocked GPU reduction would)."""
  xp, w = np.asarray(xp, np.float32), np.asarray(w, np.float32)
  kh, kw, _, _ = w.shape
  sh, sw = strides
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  views = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
           for i in range(kh) for j in range(kw)]
  patches = np.stack(views, axis=3)      # [n, ho, wo, taps, cin]
  diff = np.abs(patches[..., None] - w.reshape(kh * kw, -1, w.shape[3]))
  n = xp.shape[0]
  # NumPy sums pairwise only along a contiguous last axis.
  diff = np.ascontiguousarray(np.moveaxis(
      diff.reshape(n, ho, wo, -1, w.shape[3]), 3, -1))
  return -diff.sum(axis=-1, dtype=np.float32)


def test_forward_precision_real_magnitude_interpret():
  """Outputs of -600 with a per-channel spread of ~20 (64 channels, 3x3,
  N(0, 1) inputs and filters, as in ResNet-20's last stage): the per-tap
  partial sums with a Kahan-compensated total keep the centred output as
  close to float64 as a pairwise float32 sum; one sequential accumulator
  ("flat", the first kernels) loses several times more."""
  rng = np.random.default_rng(0)
  xp = jnp.asarray(rng.standard_normal((2, 18, 18, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 64, 8)), jnp.float32)
  want = np_forward(xp, w, (1, 1))
  assert -800 < want.mean() < -500
  errors = {}
  for accumulate in ("kahan", "tap", "flat"):
    bs = dataclasses.replace(
        simt.get_block_sizes("forward", xp.shape, w.shape, (1, 1), "cpu"),
        accumulate=accumulate)
    errors[accumulate] = _centred_rel_err(
        simt.forward(xp, w, (1, 1), block_sizes=bs, interpret=True), want)
  pairwise = _centred_rel_err(_pairwise_f32_forward(xp, w, (1, 1)), want)
  assert errors["kahan"] <= 1e-5
  assert errors["kahan"] <= 2 * pairwise, (errors, pairwise)
  assert errors["tap"] <= 3 * pairwise, (errors, pairwise)
  assert errors["flat"] >= 2 * errors["kahan"], (errors, pairwise)



def test_kahan_total_over_49_taps_is_within_one_ulp_interpret():
  """The compensation itself: 7x7 taps of one channel, inputs near 1000 (each
  tap's partial is one |x - w|, rounded at 1000's scale, so the per-tap
  partials are nearly exact and the total over taps decides the error). The
  compensated total stays within one ulp of the output everywhere (0.53-0.59
  measured over four seeds); the plain sum of the per-tap partials is several
  ulps off (2.9-4.2), which this data must show for the first claim to mean
  anything."""
  rng = np.random.default_rng(0)
  xp = jnp.asarray(1000 + rng.uniform(0, 50, (1, 10, 10, 1)), jnp.float32)
  w = jnp.asarray(rng.uniform(-1, 1, (7, 7, 1, 4)), jnp.float32)
  want = np.asarray(np_forward(xp, w, (1, 1)), np.float64)
  ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
  errors = {}
  for accumulate in ("kahan", "tap"):
    bs = dataclasses.replace(
        simt.get_block_sizes("forward", xp.shape, w.shape, (1, 1), "cpu"),
        accumulate=accumulate)
    y = simt.forward(xp, w, (1, 1), block_sizes=bs, interpret=True)
    errors[accumulate] = np.abs(np.asarray(y, np.float64) - want) / ulp
  assert errors["kahan"].max() <= 1.0, errors["kahan"].max()
  assert errors["kahan"].mean() <= 0.35, errors["kahan"].mean()
  assert errors["tap"].max() >= 2.0, errors["tap"].max()

# ------------------------------------------------------------ heuristics --

def _resnet20():
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "resnet20_layers.py"
  spec = importlib.util.spec_from_file_location("resnet20_layers", path)
  table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(table)
  return table


def test_gpu_tiles_fill_an_h100_on_resnet20():
  """At batch 256 every ResNet-20 adder layer, forward and input gradient
  (each launch), gets >= 4 blocks and >= 8 warps per SM on 132 SMs,
  registers (by the estimate) for that many resident blocks, at most 1/8
  more pixels x channels than 32-pixel tiles would compute, and a register
  tile of at least 8 accumulators per thread (<= 0.375 loads per MAC)."""
  from addernet_jax.kernels import gpu
  table = _resnet20()
  for layer in table.RESNET20_LAYERS:
    _, _, h, w_in, _, _, _, s, pad = layer
    sh = table.layer_shapes(256, layer)
    window = {"rows": (pad, pad + h), "cols": (pad, pad + w_in)}
    for kind in ("forward", "input_grad"):
      kwargs = window if kind == "input_grad" else {}
      bs = simt.get_block_sizes(kind, sh["xp"], sh["w"], (s, s), "gpu",
                                num_sms=132, **kwargs)
      grid = simt.grid_blocks(kind, sh["xp"], sh["w"], (s, s), bs, **kwargs)
      blocks = min(grid["blocks"] // 132, simt.blocks_per_sm(kind, bs))
      assert blocks >= 4 and blocks * bs.num_warps >= 8, (layer, kind, bs)
      least = (gpu.pixel_tiles(grid["rows"], grid["cols"], grid["pitch"],
                               32)["positions"]
               * layout.round_up(grid["channels"], 4))
      assert grid["positions"] * grid["computed_channels"] <= 1.125 * least
      assert bs.pix_per_thread * bs.ch_per_thread >= 8, (layer, kind, bs)
      assert simt.loads_per_mac(bs) <= 0.375, (layer, kind, bs)


def test_block_sizes_validate():
  for bad in ({"pix_per_thread": 3}, {"ch_per_thread": 6}, {"warps_pix": 0},
              {"unroll": 0}, {"chunk": 6, "unroll": 4}):
    with pytest.raises(ValueError, match="BlockSizes"):
      BS(**{"pix_per_thread": 2, "ch_per_thread": 4, **bad})
  with pytest.raises(ValueError, match="accumulate"):
    BS(2, 4, accumulate="pairwise")
  with pytest.raises(ValueError, match="clip"):
    BS(2, 4, clip="fast")
  bs = BS(pix_per_thread=4, ch_per_thread=8, warps_pix=2, warps_ch=2)
  assert (bs.block_pix, bs.block_ch, bs.num_warps) == (256, 16, 4)
  assert (bs.vec, bs.groups, bs.tensor_shape) == (4, 2, (4, 2, 64))
  assert simt.loads_per_mac(bs) == (4 + 2) / 32
  with pytest.raises(ValueError, match="kind"):
    simt.get_block_sizes("dw", (1, 5, 5, 3), (3, 3, 3, 2), (1, 1))


def test_bad_shapes_raise():
  xp = jnp.ones((1, 5, 5, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"input channels differ"):
    simt.forward(xp, jnp.ones((3, 3, 4, 2), jnp.float32), (1, 1),
                 interpret=True)
  with pytest.raises(ValueError, match=r"output gradient has shape"):
    simt.input_grad(xp, jnp.ones((3, 3, 3, 2), jnp.float32),
                    jnp.ones((1, 4, 4, 2), jnp.float32), (1, 1),
                    interpret=True)


def test_entry_points_match_the_gpu_family():
  """What `kernels.dispatch` calls on a family: forward(xp, w, strides, *,
  interpret), input_grad(xp, w, g, strides, *, interpret, rows, cols),
  INPUT_GRAD_TAKES_WINDOW, get_block_sizes(kind, xp_shape, w_shape,
  strides, platform)."""
  from addernet_jax.kernels import gpu
  import inspect
  for name in ("forward", "input_grad"):
    mine = inspect.signature(getattr(simt, name)).parameters
    theirs = inspect.signature(getattr(gpu, name)).parameters
    assert list(mine) == list(theirs), name
  assert simt.INPUT_GRAD_TAKES_WINDOW is True
  params = list(inspect.signature(simt.get_block_sizes).parameters)
  assert params[:5] == ["kind", "xp_shape", "w_shape", "strides", "platform"]


# --------------------------------------------- cross-platform lowering --

LOWER_SHAPES = [((256, 34, 34, 16), (3, 3, 16, 16), (1, 1)),
                ((256, 10, 10, 64), (3, 3, 64, 64), (1, 1)),
                ((64, 18, 18, 16), (3, 3, 16, 32), (2, 2)),
                ((64, 16, 16, 32), (1, 1, 32, 64), (2, 2)),
                ((2, 9, 11, 3), (5, 5, 3, 7), (1, 1))]


def _target_device():
  """An abstract H100 for Triton lowering on a host without a GPU (JAX >=
  0.12 asks it for the compute capability; JAX 0.10 does not)."""
  if jax.default_backend() == "gpu":
    return contextlib.nullcontext()
  try:
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
  except (AttributeError, TypeError):  # older JAX: no abstract devices
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("xp_shape,w_shape,strides", LOWER_SHAPES)
def test_lowers_for_h100(xp_shape, w_shape, strides, dtype):
  """Triton lowering with the GPU heuristic's tiles (no device needed)."""
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  xp = jax.ShapeDtypeStruct(xp_shape, jnp.dtype(dtype))
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
  g = jax.ShapeDtypeStruct((xp_shape[0], ho, wo, w_shape[3]), jnp.float32)
  with _target_device():
    fwd = jax.jit(lambda a, b: simt.forward(a, b, strides)).trace(
        xp, w).lower(lowering_platforms=("cuda",)).as_text()
    dx = jax.jit(lambda a, b, c: simt.input_grad(a, b, c, strides)).trace(
        xp, w, g).lower(lowering_platforms=("cuda",)).as_text()
  assert "__gpu$xla.gpu.triton" in fwd and "__gpu$xla.gpu.triton" in dx
  assert "adder_forward_simt" in fwd and "adder_input_grad_simt" in dx


def test_unrolled_channels_and_vector_groups_across_warps_interpret():
  """What a GPU tile does and no interpret test did: input channels (5) and
  output channels (11) not multiples of `unroll` (4; padded to it), and a
  register tile of G=2 filter vectors with 2 warps along channels (warp wc
  owns channels wc*C + g*V + v: the C-stride of the warps only shows when
  G > 1 and WC > 1). Interpret mode's own tiles have G = 1, unroll = 1."""
  case = Case(1, 6, 7, 5, 11, 3, 1)
  xp, w, g = case.arrays(6)
  bs = BS(pix_per_thread=1, ch_per_thread=8, warps_pix=1, warps_ch=2,
          unroll=4, chunk=4)
  y = simt.forward(xp, w, (1, 1), block_sizes=bs, interpret=True)
  assert rel_err(y, np_forward(xp, w, (1, 1))) < TOL
  dxp = simt.input_grad(xp, w, g, (1, 1), block_sizes=bs, interpret=True)
  assert rel_err(dxp, np_input_grad(xp, w, g, (1, 1))) < TOL
