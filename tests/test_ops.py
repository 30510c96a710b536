"""Tests of the adder convolution (`addernet_jax.ops`, pure-jnp `reference`).

Every result is compared with an independent float64 numpy reference written
here: explicit `np.pad`, a loop over filter taps, and the input gradient
accumulated tap by tap on the padded input and then cropped.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

from addernet_jax import ops, reference
from conftest import all_equations

# ---------------------------------------------------------------------------
# float64 numpy reference


def np_pads(in_hw, kernel_hw, strides, padding):
  """Explicit ((top, bottom), (left, right)) pads, SAME computed as JAX does."""
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if padding == "SAME":
    pads = []
    for size, k, s in zip(in_hw, kernel_hw, strides):
      total = max((math.ceil(size / s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  return tuple(tuple(p) for p in padding)


def _windows(xp, kh, kw, strides):
  """Yields (i, j, index) with xp[index] the [n, ho, wo, c] view of tap (i, j)."""
  sh, sw = strides
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  for i in range(kh):
    for j in range(kw):
      yield i, j, (slice(None), slice(i, i + sh * (ho - 1) + 1, sh),
                   slice(j, j + sw * (wo - 1) + 1, sw), slice(None))


def np_adder(x, w, strides, padding):
  """Forward and (the AdderNet) backward in float64, as a tuple of functions."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  pads = np_pads(x.shape[1:3], w.shape[:2], strides, padding)
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  kh, kw = w.shape[:2]

  def forward():
    y = 0.0
    for i, j, idx in _windows(xp, kh, kw, strides):
      y = y - np.abs(xp[idx][..., :, None] - w[i, j]).sum(axis=-2)
    return y

  def backward(g):
    g = np.asarray(g, np.float64)
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    for i, j, idx in _windows(xp, kh, kw, strides):
      view = xp[idx]
      dxp[idx] += (np.clip(w[i, j] - view[..., :, None], -1, 1)
                   * g[..., None, :]).sum(axis=-1)
      dw[i, j] = (np.einsum("nhwc,nhwo->co", view, g)
                  - w[i, j] * g.sum(axis=(0, 1, 2)))
    h, wd = x.shape[1:3]
    dx = dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + wd]
    return dx, dw

  return forward, backward


def _rand(rng, shape, scale=1.0):
  return (rng.standard_normal(shape) * scale).astype(np.float32)


def _check(x, w, strides, padding, *, rtol=2e-5):
  """adder_conv and its VJP against the float64 reference."""
  fwd, bwd = np_adder(x, w, strides, padding)
  y_ref = fwd()
  g = _rand(np.random.default_rng(x.size), y_ref.shape)
  dx_ref, dw_ref = bwd(g)

  @jax.jit
  def run(x, w, g):
    y, vjp = jax.vjp(lambda a, b: ops.adder_conv(
        a, b, strides=strides, padding=padding, implementation="xla"), x, w)
    return (y, *vjp(g))

  y, dx, dw = run(x, w, g)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  for name, got, want in (("y", y, y_ref), ("dx", dx, dx_ref),
                          ("dw", dw, dw_ref)):
    scale = np.abs(want).max() + 1e-30
    err = np.abs(np.asarray(got, np.float64) - want).max() / scale
    assert err < rtol, f"{name}: max relative error {err:.2e}"


# ---------------------------------------------------------------------------
# Forward and custom VJP on many shapes

CASES = [
    # (x shape NHWC, w shape HWIO, strides, padding)
    ((2, 7, 9, 3), (3, 3, 3, 5), (1, 1), "SAME"),            # odd sizes
    ((2, 9, 8, 4), (3, 3, 4, 6), (2, 2), "SAME"),            # asymmetric SAME
    ((1, 8, 8, 5), (3, 3, 5, 3), (2, 2), "SAME"),            # batch 1, s2
    ((2, 7, 7, 6), (1, 1, 6, 4), (2, 2), "VALID"),           # 1x1 shortcut
    ((2, 6, 6, 3), (1, 1, 3, 7), (1, 1), "SAME"),
    ((2, 11, 10, 3), (5, 5, 3, 2), (1, 1), "SAME"),          # 5x5
    ((2, 11, 9, 2), (5, 5, 2, 3), (2, 1), "VALID"),          # 5x5 VALID, s2x1
    ((2, 8, 7, 3), (3, 2, 3, 4), (1, 2), ((2, 0), (1, 3))),  # asym. explicit
    ((1, 5, 5, 2), (3, 3, 2, 2), (3, 3), ((1, 1), (1, 1))),  # stride 3
    ((2, 6, 6, 37), (3, 3, 37, 19), (1, 1), "SAME"),         # channel blocks
]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CASES)
def test_forward_and_vjp_match_float64(x_shape, w_shape, strides, padding):
  rng = np.random.default_rng(sum(x_shape) + sum(w_shape))
  _check(_rand(rng, x_shape), _rand(rng, w_shape), strides, padding)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 2), h=st.integers(1, 7), w=st.integers(1, 7),
       cin=st.integers(1, 5), cout=st.integers(1, 5), k=st.sampled_from([1, 2, 3]),
       s=st.integers(1, 2), padding=st.sampled_from(["SAME", "VALID"]),
       seed=st.integers(0, 2**16))
def test_random_shapes_match_float64(n, h, w, cin, cout, k, s, padding, seed):
  if padding == "VALID" and (h < k or w < k):
    h, w = max(h, k), max(w, k)
  rng = np.random.default_rng(seed)
  _check(_rand(rng, (n, h, w, cin)), _rand(rng, (k, k, cin, cout)), (s, s),
         padding)


def test_padded_taps_contribute_minus_abs_w():
  """A zero input padded with SAME: each output is -sum of |w| over the taps
  inside the padded image, which includes the padded (zero) taps."""
  x = jnp.zeros((1, 3, 3, 1), jnp.float32)
  w = jnp.arange(1.0, 10.0, dtype=jnp.float32).reshape(3, 3, 1, 1)
  y = ops.adder_conv(x, w, padding="SAME", implementation="xla")
  np.testing.assert_allclose(np.asarray(y).ravel(), np.full(9, -45.0))


def test_bfloat16_inputs_accumulate_in_float32():
  rng = np.random.default_rng(0)
  x = jnp.asarray(_rand(rng, (2, 6, 5, 24)), jnp.bfloat16)
  w = jnp.asarray(_rand(rng, (3, 3, 24, 4)), jnp.bfloat16)
  fwd, bwd = np_adder(np.asarray(x, np.float64), np.asarray(w, np.float64),
                      (1, 1), "SAME")
  y_ref = fwd()
  g = jnp.asarray(_rand(rng, y_ref.shape), jnp.bfloat16)
  dx_ref, dw_ref = bwd(np.asarray(g, np.float64))
  y, vjp = jax.vjp(lambda a, b: ops.adder_conv(a, b, implementation="xla"),
                   x, w)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  # Float32 accumulation: the only error is the final rounding to bfloat16
  # (relative 2**-8), not a 216-term bfloat16 sum.
  for got, want in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=1e-6 * abs(want).max())


def test_input_gradient_is_hardtanh_clipped_not_true_derivative():
  rng = np.random.default_rng(1)
  # Filters and inputs close together, so that |w - x| < 1 for many pairs.
  x = _rand(rng, (2, 5, 5, 3), 0.5)
  w = _rand(rng, (3, 3, 3, 4), 0.5)
  r = _rand(rng, (2, 5, 5, 4))
  dx = jax.grad(lambda a: jnp.sum(
      ops.adder_conv(a, w, implementation="xla") * r))(x)
  _, bwd = np_adder(x, w, (1, 1), "SAME")
  clipped, _ = bwd(r)
  np.testing.assert_allclose(dx, clipped, rtol=1e-5, atol=1e-5)
  # The true derivative of -|x - w| w.r.t. x is sign(w - x): different.
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  true = np.zeros_like(xp)
  for i, j, idx in _windows(xp, 3, 3, (1, 1)):
    true[idx] += (np.sign(w[i, j] - xp[idx][..., :, None]) * r[..., None, :]
                  ).sum(-1)
  true = true[:, 1:-1, 1:-1]
  assert np.abs(np.asarray(dx) - true).max() > 0.5
  # ... but HardTanh(w - x) has the sign of w - x (not x - w): the two agree
  # in direction.
  assert np.sum(np.asarray(dx) * true) > 0.5 * np.linalg.norm(dx) * np.linalg.norm(true)
  # And the filter gradient is the full-precision (x - w), not sign(x - w).
  dw = jax.grad(lambda b: jnp.sum(
      ops.adder_conv(x, b, implementation="xla") * r))(w)
  np.testing.assert_allclose(dw, bwd(r)[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Reference internals


@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_filter_grad_methods_agree(strides):
  rng = np.random.default_rng(2)
  xp = _rand(rng, (2, 9, 9, 5))
  w = _rand(rng, (3, 3, 5, 6))
  ho = (9 - 3) // strides[0] + 1
  g = _rand(rng, (2, ho, ho, 6))
  conv = reference.filter_grad(xp, w, g, strides, method="conv")
  taps = reference.filter_grad(xp, w, g, strides, method="taps")
  np.testing.assert_allclose(conv, taps, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="method must be"):
    reference.filter_grad(xp, w, g, strides, method="im2col")


@pytest.mark.parametrize("method", ["conv", "taps"])
def test_filter_grad_precision_bn_style_gradient(shared_data, method):
  """dw in float32 against float64 on real activations (the stem output of the
  official ResNet-20 on CIFAR-10 images) with a BatchNorm-style output gradient
  (zero mean per channel and orthogonal to the normalised output), where the
  terms cancel and dw is ~1e-3 of the sum of their magnitudes."""
  path = shared_data / "official-resnet20" / "golden_activations_first8.npz"
  x = np.load(path)["stem"].transpose(0, 2, 3, 1)            # [8, 32, 32, 16]
  rng = np.random.default_rng(3)
  w = rng.standard_normal((3, 3, 16, 16))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  y = np.asarray(reference.forward(xp.astype(np.float32),
                                   w.astype(np.float32), (1, 1)), np.float64)
  xhat = (y - y.mean((0, 1, 2))) / y.std((0, 1, 2))
  dy = rng.standard_normal(y.shape) * 1e-3
  g = (dy - dy.mean((0, 1, 2)) - xhat * (dy * xhat).mean((0, 1, 2))) / y.std(
      (0, 1, 2))
  want = np.zeros_like(w)
  magnitude = np.zeros_like(w)
  for i, j, idx in _windows(xp, 3, 3, (1, 1)):
    want[i, j] = np.einsum("nhwc,nhwo->co", xp[idx], g) - w[i, j] * g.sum(
        (0, 1, 2))
    magnitude[i, j] = (np.einsum("nhwc,nhwo->co", np.abs(xp[idx]), np.abs(g))
                       + np.abs(w[i, j]) * np.abs(g).sum((0, 1, 2)))
  got = np.asarray(reference.filter_grad(
      xp.astype(np.float32), w.astype(np.float32), g.astype(np.float32),
      (1, 1), method=method), np.float64)
  assert np.linalg.norm(want) < 1e-2 * np.linalg.norm(magnitude)  # cancels
  # Measured: 2e-8 of the magnitudes, 1.2e-6 relative L2 (both methods).
  assert np.max(np.abs(got - want) / magnitude) < 1e-6
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-5


@pytest.mark.parametrize("method", ["conv", "taps"])
def test_filter_grad_precision_of_long_sums(method):
  """One input channel and 200,000 terms per filter entry (LeNet-5's first
  layer on MNIST-like 28x28 images at batch 256, BatchNorm-style output
  gradient): "taps" as one float32 dot per tap was 8.5e-6 from float64 (the
  official float32 code: 2.7-3.0e-7 on real MNIST); in blocks of
  `reference.TAP_CHUNK` terms 3.9e-7, the CPU's default. "conv" here is
  XLA:CPU's convolution gradient, on no default path of the CPU (GPUs and
  TPUs run their own): 5.5e-7 on JAX 0.10.2 and 0.11.2, 1.23e-6 on 0.12.0.1,
  whose order of summation changed; the bound guards against a regression
  to one long sum."""
  rng = np.random.default_rng(0)
  n, h, k, cout = 256, 28, 5, 6
  x = np.full((n, h, h, 1), -0.1307 / 0.3081)  # the background pixel
  strokes = rng.random(x.shape) < 0.2
  x[strokes] = (rng.random(strokes.sum()) - 0.1307) / 0.3081
  xp = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  w = rng.standard_normal((k, k, 1, cout))
  xp, w = xp.astype(np.float32), w.astype(np.float32)
  y = np.asarray(reference.forward(xp, w, (1, 1)), np.float64)
  xhat = (y - y.mean((0, 1, 2))) / y.std((0, 1, 2))
  u = rng.standard_normal(y.shape) / y.size
  g = ((u - u.mean((0, 1, 2)) - xhat * (u * xhat).mean((0, 1, 2)))
       / y.std((0, 1, 2))).astype(np.float32)
  want = np.zeros(w.shape)
  for i, j, idx in _windows(xp, k, k, (1, 1)):
    want[i, j] = (np.einsum("nhwc,nhwo->co", xp[idx].astype(np.float64), g)
                  - w[i, j] * g.astype(np.float64).sum((0, 1, 2)))
  got = np.asarray(reference.filter_grad(xp, w, g, (1, 1), method=method),
                   np.float64)
  bound = {"taps": 8e-7, "conv": 2e-6}[method]
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


def test_no_large_intermediate_is_materialised():
  n, h, cin, cout, k = 16, 16, 32, 32, 3
  x = jnp.zeros((n, h, h, cin), jnp.float32)
  w = jnp.zeros((k, k, cin, cout), jnp.float32)

  def loss(x, w):
    return jnp.sum(ops.adder_conv(x, w, implementation="xla"))

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("memory_analysis unavailable on this backend")
  official = n * h * h * k * k * cin * cout * 4  # the (cout, k, n*h*w) tensor
  activation = n * h * h * max(cin, cout) * 4     # = official / 288
  # A few activation-sized buffers (padded input, accumulators, tap views):
  # 13 measured on CPU.
  assert stats.temp_size_in_bytes < 20 * activation < official / 10


# ---------------------------------------------------------------------------
# adder_conv_general_dilated


def test_flax_conv_with_adder_conv_general_dilated():
  rng = np.random.default_rng(4)
  x = _rand(rng, (2, 7, 6, 3))
  layer = nn.Conv(5, (3, 3), strides=2, padding="SAME", use_bias=False,
                  conv_general_dilated=ops.adder_conv_general_dilated)
  variables = layer.init(jax.random.PRNGKey(0), x)
  kernel = np.asarray(variables["params"]["kernel"])
  y = layer.apply(variables, x)
  fwd, _ = np_adder(x, kernel, (2, 2), "SAME")
  np.testing.assert_allclose(y, fwd(), rtol=2e-5)


def test_general_dilated_nchw_dimension_numbers():
  rng = np.random.default_rng(5)
  x = _rand(rng, (2, 3, 7, 8))       # NCHW
  w = _rand(rng, (4, 3, 3, 3))       # OIHW
  y = ops.adder_conv_general_dilated(
      x, w, (1, 2), ((1, 0), (2, 1)),
      dimension_numbers=("NCHW", "OIHW", "NCHW"), implementation="xla")
  fwd, _ = np_adder(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0), (1, 2),
                    ((1, 0), (2, 1)))
  np.testing.assert_allclose(y, fwd().transpose(0, 3, 1, 2), rtol=2e-5)


def test_general_dilated_gradient_matches_adder_conv():
  rng = np.random.default_rng(6)
  x = _rand(rng, (2, 3, 6, 6))
  w = _rand(rng, (4, 3, 3, 3))
  r = _rand(rng, (2, 4, 6, 6))
  f = lambda a, b: jnp.sum(r * ops.adder_conv_general_dilated(  # noqa: E731
      a, b, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))
  dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
  _, bwd = np_adder(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0), (1, 1),
                    "SAME")
  dx_ref, dw_ref = bwd(r.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(dx, dx_ref.transpose(0, 3, 1, 2), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref.transpose(3, 2, 0, 1), rtol=1e-5,
                             atol=1e-4)


# ---------------------------------------------------------------------------
# Bad input

X = jnp.ones((1, 5, 5, 3), jnp.float32)
W = jnp.ones((3, 3, 3, 4), jnp.float32)


def test_numpy_float64_is_float32_unless_x64():
  """NumPy's default dtype was refused although JAX (and lax.conv, the
  layers, the models) take it as float32 with x64 off; under x64 float64
  stays refused, as documented."""
  rng = np.random.default_rng(5)
  x, w = rng.standard_normal((2, 6, 7, 3)), rng.standard_normal((3, 3, 3, 4))
  got = ops.adder_conv(x, w, padding=((1, 0), (0, 1)))
  want = ops.adder_conv(x.astype(np.float32), w.astype(np.float32),
                        padding=((1, 0), (0, 1)))
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  enable_x64 = getattr(jax, "enable_x64", None)
  if enable_x64 is None:
    from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  with enable_x64(True):
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or "
                       "float16, got float64"):
      ops.adder_conv(x, w)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.adder_conv(X, jnp.ones((3, 3, 2, 4))), ValueError,
     "input channels do not match"),
    (lambda: ops.adder_conv(X[0], W), ValueError, r"x must have rank 4"),
    (lambda: ops.adder_conv(X, W[0]), ValueError, r"w must have rank 4"),
    (lambda: ops.adder_conv(X.astype(jnp.int32), W), TypeError,
     "x must be float32, bfloat16 or float16, got int32"),
    (lambda: ops.adder_conv(X, np.arange(36).reshape(3, 3, 1, 4)), TypeError,
     "w must be float32"),
    (lambda: ops.adder_conv([[1.0]], W), TypeError, "x must be an array"),
    (lambda: ops.adder_conv(X, W, padding="FULL"), ValueError,
     "padding must be 'SAME', 'VALID'.*'FULL'"),
    (lambda: ops.adder_conv(X, W, padding=((1, 1),)), ValueError,
     "padding must be"),
    (lambda: ops.adder_conv(X, W, padding=((1, -1), (0, 0))), ValueError,
     "padding must be"),
    (lambda: ops.adder_conv(X, W, strides=0), ValueError, "strides must be"),
    (lambda: ops.adder_conv(X, W, implementation="cuda"), ValueError,
     "implementation must be None, 'xla' or 'pallas', got 'cuda'"),
    (lambda: ops.adder_conv(X, jnp.ones((7, 7, 3, 4)), padding="VALID"),
     ValueError, "larger than the padded input"),
    (lambda: ops.adder_conv_general_dilated(X, W, (1, 1), "SAME",
                                            rhs_dilation=(2, 2)),
     ValueError, "rhs_dilation=.*not supported"),
    (lambda: ops.adder_conv_general_dilated(X, W, (1, 1), "SAME",
                                            lhs_dilation=(2, 1)),
     ValueError, "lhs_dilation=.*not supported"),
    (lambda: ops.adder_conv_general_dilated(
        X, jnp.ones((3, 3, 1, 3)), (1, 1), "SAME", feature_group_count=3,
        dimension_numbers=("NHWC", "HWIO", "NHWC")),
     ValueError, "feature_group_count=3"),
    (lambda: ops.adder_conv_general_dilated(
        jnp.ones((1, 5, 3)), jnp.ones((3, 3, 4)), (1,), "SAME"),
     ValueError, "only 2-D convolutions"),
    # Plausible layout mistakes get a hint naming the fix.
    (lambda: ops.adder_conv(jnp.ones((1, 3, 5, 6)), W), ValueError,
     r"if x is NCHW, transpose it to NHWC"),
    (lambda: ops.adder_conv(X, jnp.ones((4, 3, 2, 2))), ValueError,
     r"if w is OIHW \(PyTorch\)"),
    (lambda: ops.adder_conv(X[..., :0], W[:, :, :0]), ValueError,
     "non-empty window and at least one input channel"),
    (lambda: ops.adder_conv(X, W, strides=True), ValueError,
     "strides must be"),
    # Fractional padding was truncated to int (1.5 -> 1) silently.
    (lambda: ops.adder_conv(X, W, padding=((1.5, 1), (1, 1))), ValueError,
     "padding must be"),
    # NHWC arrays without dimension_numbers: lax's default layout is NCHW;
    # the error names the caller's shapes, not transposed ones.
    (lambda: ops.adder_conv_general_dilated(X, W, (1, 1), "SAME"),
     ValueError, r"lhs \(1, 5, 5, 3\) has 5, rhs \(3, 3, 3, 4\) expects 3 "
     r"\(dimension_numbers=None, i.e. lax's default"),
    (lambda: ops.adder_conv_general_dilated(
        X, W[0], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
     ValueError, "only 2-D convolutions"),
    # The pure-jnp reference functions check shapes at trace time; a
    # cotangent of the wrong shape gave a silently wrong input gradient.
    (lambda: reference.input_grad(X, W, jnp.ones((1, 5, 5, 4)), (1, 1)),
     ValueError, r"g must have the output's shape \(1, 3, 3, 4\)"),
    (lambda: reference.forward(X, jnp.ones((3, 3, 2, 4)), (1, 1)),
     ValueError, "same, non-zero number of input channels"),
])
def test_bad_input_raises_clear_error(call, error, match):
  with pytest.raises(error, match=match):
    call()


def test_numpy_int_strides_and_padding_are_accepted():
  """np.int64 strides (e.g. from a config array) raised a raw TypeError."""
  rng = np.random.default_rng(7)
  x, w = _rand(rng, (1, 7, 5, 2)), _rand(rng, (3, 3, 2, 3))
  want = ops.adder_conv(x, w, strides=2, padding=((1, 1), (0, 2)))
  got = ops.adder_conv(x, w, strides=np.int64(2),
                       padding=((np.int64(1), 1), (0, np.int32(2))))
  np.testing.assert_array_equal(got, want)
  got = ops.adder_conv_general_dilated(
      x, w, 2, ((1, 1), (0, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(got, want)


def test_forward_is_correctly_rounded_where_the_sum_is_exact():
  """Inputs on a grid of 2^-12 (|w| < 64, |x| < 1): every |x - w| and the
  exact total are representable in float64, and the reference's offset
  block partials (an exact pair hi + lo) round the total once, so the
  float32 result is the float64 one rounded to float32, bit for bit (without
  the low word `lo`, about a quarter of the outputs were off by an ulp)."""
  rng = np.random.default_rng(0)
  n, h, cin, cout = 2, 8, 32, 8
  w = rng.integers(-2**18, 2**18, (3, 3, cin, cout)) / 2**12
  x = rng.integers(-2**12, 2**12, (n, h, h, cin)) / 2**12
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((n, h, h, cout))
  for i in range(3):
    for j in range(3):
      want -= np.abs(xp[:, i:i + h, j:j + h, :, None] - w[i, j]).sum(-2)
  got = np.asarray(reference.forward(jnp.asarray(xp, jnp.float32),
                                     jnp.asarray(w, jnp.float32), (1, 1)))
  np.testing.assert_array_equal(got, want.astype(np.float32))


@pytest.mark.parametrize("method", ["conv", "taps"])
def test_filter_grad_asks_for_full_float32_products(method):
  """Every product of the filter gradient runs at Precision.HIGHEST: on GPUs
  (TF32) and TPUs (bfloat16 passes) the default would lose 10+ bits, which
  no CPU test can see; so check the program."""
  xp = jnp.ones((2, 6, 6, 3))
  w = jnp.ones((3, 3, 3, 4))
  g = jnp.ones((2, 4, 4, 4))
  jaxpr = jax.make_jaxpr(lambda a, b, c: reference.filter_grad(
      a, b, c, (1, 1), method=method))(xp, w, g)
  found = [eqn for eqn in all_equations(jaxpr) if eqn.primitive.name in
           ("dot_general", "conv_general_dilated")]
  assert found, jaxpr
  for eqn in found:
    precision = eqn.params["precision"]
    precisions = precision if isinstance(precision, tuple) else (precision,)
    assert all(p == lax.Precision.HIGHEST for p in precisions), eqn


@pytest.mark.parametrize("fn", ["forward", "input_grad", "filter_grad"])
@pytest.mark.parametrize("xp_shape,strides,match", [
    ((2, 7, 6, 3), 0, "strides must be a positive int"),
    ((2, 7, 6, 3), (2, 0), "strides must be a positive int"),
    ((2, 7, 2, 3), (1, 1), r"filters \(3, 3\) are larger than the padded "
     r"input \(7, 2\)"),
    ((2, 2, 7, 3), (1, 1), r"filters \(3, 3\) are larger than the padded "
     r"input \(2, 7\)"),
])
def test_reference_functions_refuse_bad_strides_and_small_inputs(
    fn, xp_shape, strides, match):
  """The pure-jnp reference is called directly (the kernels' dispatch and
  tests do): a zero stride or an input narrower than the filters on either
  axis is a ValueError naming the problem, not a ZeroDivisionError or an
  empty or garbled result."""
  rng = np.random.default_rng(6)
  xp = jnp.asarray(rng.normal(size=xp_shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  args = (xp, w) if fn == "forward" else (
      xp, w, jnp.asarray(rng.normal(size=(2, 5, 4, 4)), jnp.float32))
  with pytest.raises(ValueError, match=match):
    getattr(reference, fn)(*args, strides)


def test_reference_refuses_a_cotangent_with_another_batch():
  """A cotangent with a larger batch than the input was silently read up to
  the input's batch by the input gradient (a wrong gradient, no error)."""
  rng = np.random.default_rng(8)
  xp = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(3, 5, 4, 4)), jnp.float32)
  for fn in (reference.input_grad, reference.filter_grad):
    with pytest.raises(ValueError, match=r"g must have the output's shape "
                       r"\(2, 5, 4, 4\)"):
      fn(xp, w, g, (1, 1))


@pytest.mark.parametrize("x_dtype,w_dtype", [
    (jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16),
    (jnp.float16, jnp.bfloat16)])
def test_mixed_dtypes_promote_as_jax_does(x_dtype, w_dtype):
  """x and w of different dtypes compute in (and return) their promoted
  dtype, as the docstring says, whichever of the two is the wider: the
  result equals the float64 adder convolution of the promoted inputs."""
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), x_dtype)
  w = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), w_dtype)
  want_dtype = jnp.promote_types(x_dtype, w_dtype)
  y = ops.adder_conv(x, w, padding="VALID", implementation="xla")
  assert y.dtype == want_dtype
  xp = np.asarray(x.astype(want_dtype), np.float64)
  wp = np.asarray(w.astype(want_dtype), np.float64)
  want = np.zeros((2, 4, 4, 4))
  for i in range(2):
    for j in range(3):
      want -= np.abs(xp[:, i:i + 4, j:j + 4, :, None] - wp[i, j]).sum(-2)
  tol = float(jnp.finfo(want_dtype).eps) * np.abs(want).max()
  np.testing.assert_allclose(np.asarray(y, np.float64), want, atol=2 * tol)


@pytest.mark.parametrize("x_shape,w_shape,strides,pads", [
    ((2, 9, 7, 3), (3, 2, 3, 5), (2, 1), ((1, 0), (0, 1))),
    ((1, 6, 11, 2), (2, 3, 2, 17), (1, 3), ((0, 1), (1, 1))),
])
def test_exact_gradient_with_unequal_strides_and_a_non_square_window(
    x_shape, w_shape, strides, pads):
  """gradient="exact" against the float64 derivative of -sum |x - w|
  (sign(0) = 0) where the two strides, and the window's sides, differ: the
  existing cases are all square with equal strides."""
  rng = np.random.default_rng(10)
  x = rng.normal(size=x_shape).astype(np.float32)
  w = rng.normal(size=w_shape).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b: ops.adder_conv(
      a, b, strides=strides, padding=pads, gradient="exact",
      implementation="xla"), x, w)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = vjp(g)
  xp = np.pad(x.astype(np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
  (kh, kw), (sh, sw), (ho, wo) = w_shape[:2], strides, y.shape[1:3]
  want_dxp, want_dw = np.zeros_like(xp), np.zeros(w_shape)
  for i in range(kh):
    for j in range(kw):
      idx = (slice(None), slice(i, i + sh * (ho - 1) + 1, sh),
             slice(j, j + sw * (wo - 1) + 1, sw))
      s = np.sign(w[i, j].astype(np.float64) - xp[idx][..., None])
      want_dxp[idx] += np.einsum("nhwco,nhwo->nhwc", s, g)
      want_dw[i, j] = -np.einsum("nhwco,nhwo->co", s, g)
  want_dx = want_dxp[:, pads[0][0]:pads[0][0] + x_shape[1],
                     pads[1][0]:pads[1][0] + x_shape[2]]
  tol = 1e-5 * np.abs(g).sum()
  np.testing.assert_allclose(np.asarray(dx, np.float64), want_dx, atol=tol)
  np.testing.assert_allclose(np.asarray(dw, np.float64), want_dw, atol=tol)


def test_general_dilated_honours_preferred_element_type():
  """`adder_conv_general_dilated` stands in for `lax.conv_general_dilated`:
  `preferred_element_type` sets the result's dtype (the values are
  adder_conv's, rounded once to it)."""
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 3, 6, 5)), jnp.float32)  # NCHW
  w = jnp.asarray(rng.normal(size=(4, 3, 3, 2)), jnp.float32)  # OIHW
  want = ops.adder_conv(x.transpose(0, 2, 3, 1), w.transpose(2, 3, 1, 0),
                        strides=(1, 2), padding=((1, 1), (0, 1)),
                        implementation="xla").transpose(0, 3, 1, 2)
  for dtype in (jnp.bfloat16, jnp.float16):
    y = ops.adder_conv_general_dilated(
        x, w, (1, 2), ((1, 1), (0, 1)), preferred_element_type=dtype,
        implementation="xla")
    assert y.dtype == dtype and y.shape == want.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(dtype)))
