"""Adder layers (Linen and NNX) against a float64 NumPy reference."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from addernet_jax import layers, ops


def _np_adder_dense(x, w):
  return -np.abs(x.astype(np.float64)[:, :, None] - w.astype(np.float64)[None]).sum(1)


def _np_adder_conv_valid(xp, w):
  kh, kw, _, cout = w.shape
  n, hp, wp, _ = xp.shape
  y = np.zeros((n, hp - kh + 1, wp - kw + 1, cout))
  for i in range(kh):
    for j in range(kw):
      view = xp[:, i:i + y.shape[1], j:j + y.shape[2], :].astype(np.float64)
      y -= np.abs(view[..., :, None] - w[i, j].astype(np.float64)).sum(-2)
  return y


def test_adder_dense_matches_float64():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 13)).astype(np.float32)
  layer = layers.AdderDense(7)
  variables = layer.init(jax.random.key(0), x)
  w = np.asarray(variables["params"]["adder_kernel"])
  assert w.shape == (13, 7)
  np.testing.assert_allclose(layer.apply(variables, x), _np_adder_dense(x, w),
                             rtol=1e-5, atol=1e-4)


def test_adder_conv_int_padding_and_bias():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 7, 6, 3)).astype(np.float32)
  layer = layers.AdderConv(4, (3, 3), padding=1, use_bias=True,
                           bias_init=nn.initializers.normal(1.0))
  variables = layer.init(jax.random.key(0), x)
  w = np.asarray(variables["params"]["adder_kernel"])
  b = np.asarray(variables["params"]["bias"])
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  np.testing.assert_allclose(layer.apply(variables, x),
                             _np_adder_conv_valid(xp, w) + b, rtol=1e-5, atol=1e-4)


def test_adder_conv_bias_starts_as_the_official_one():
  """The official adder2d(bias=True) draws its bias from U(0, 1); ours
  started at 0."""
  x = jnp.ones((1, 5, 5, 3))
  for bias in (
      layers.AdderConv(64, use_bias=True).init(jax.random.key(0), x)[
          "params"]["bias"],
      layers.AdderConvNNX(3, 64, use_bias=True, rngs=nnx.Rngs(0)).bias[...]):
    b = np.asarray(bias)
    assert b.shape == (64,) and b.min() >= 0 and b.max() < 1
    assert 0.3 < b.mean() < 0.7 and b.std() > 0.2


def test_adder_conv_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    layers.AdderConv(4).init(jax.random.key(0), jnp.ones((3, 5, 5)))


def test_nnx_twins_match_linen():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 9, 8, 3)).astype(np.float32)
  conv = layers.AdderConvNNX(3, 5, 3, strides=2, padding=1, rngs=nnx.Rngs(0))
  linen = layers.AdderConv(5, (3, 3), strides=2, padding=1)
  y_linen = linen.apply({"params": {"adder_kernel": conv.adder_kernel[...]}}, x)
  np.testing.assert_allclose(conv(x), y_linen, rtol=1e-6)
  assert conv.adder_kernel[...].shape == (3, 3, 3, 5)

  x2 = rng.normal(size=(4, 11)).astype(np.float32)
  dense = layers.AdderDenseNNX(11, 6, use_bias=True, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(
      dense(x2), _np_adder_dense(x2, np.asarray(dense.adder_kernel[...])),
      rtol=1e-5, atol=1e-4)


def test_nnx_conv_with_adder_conv_general_dilated():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 6, 7, 4)).astype(np.float32)
  conv = nnx.Conv(4, 3, kernel_size=(3, 3), padding="VALID", use_bias=False,
                  conv_general_dilated=ops.adder_conv_general_dilated,
                  rngs=nnx.Rngs(0))
  w = np.asarray(conv.kernel[...])
  np.testing.assert_allclose(conv(x), _np_adder_conv_valid(x, w),
                             rtol=1e-5, atol=1e-4)


def test_nnx_layer_gradients_use_adder_vjp():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)).astype(np.float32))
  layer = layers.AdderConvNNX(3, 2, 3, rngs=nnx.Rngs(0))
  kernel = layer.adder_kernel[...]
  grad_nnx = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer).adder_kernel[...]
  grad_ref = jax.grad(lambda w: jnp.sum(ops.adder_conv(x, w) ** 2))(kernel)
  np.testing.assert_allclose(grad_nnx, grad_ref, rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda padding: layers.AdderConv(4, (3, 3), padding=padding),
    lambda padding: layers.AdderConvNNX(3, 4, 3, padding=padding,
                                        rngs=nnx.Rngs(0)),
])
def test_flax_style_per_dimension_int_padding(make):
  """`padding=(1, 2)` means 1 row and 2 columns on both sides, as in
  `flax.linen.Conv`; it was rejected."""
  x = np.random.default_rng(3).normal(size=(2, 7, 5, 3)).astype(np.float32)
  layer = make((1, 2))
  # The same given as NumPy arrays.
  for same in (np.array([1, 2]), np.array([[1, 1], [2, 2]])):
    array_layer = make(same)
    if isinstance(array_layer, nn.Module):
      out = array_layer.apply(array_layer.init(jax.random.key(0), x), x)
    else:
      out = array_layer(x)
    assert out.shape == (2, 7, 7, 4)
  if isinstance(layer, nn.Module):
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    w = np.asarray(variables["params"]["adder_kernel"])
  else:
    y, w = layer(x), np.asarray(layer.adder_kernel[...])
  xp = np.pad(x, ((0, 0), (1, 1), (2, 2), (0, 0)))
  assert y.shape == (2, 7, 7, 4)
  np.testing.assert_allclose(y, _np_adder_conv_valid(xp, w), rtol=1e-5,
                             atol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kernel_size=(3,)), r"kernel_size must be .* got \(3,\)"),
    (dict(kernel_size=(3, 3, 3)), r"kernel_size must be .* got \(3, 3, 3\)"),
    (dict(kernel_size=0), "kernel_size must be"),
    (dict(strides=(2,)), r"strides must be .* got \(2,\)"),
    # Was accepted by AdderConvNNX until its first call, then named
    # adder_conv and its forms only.
    (dict(padding="FOO"), r"padding must be 'SAME', 'VALID', a non-negative "
     r"int, or one entry per spatial dimension .* got 'FOO'"),
    (dict(padding=-1), r"padding must be .* got -1"),
    (dict(padding=((1, 1), (1,))), r"padding must be .* got \(\(1, 1\), "
     r"\(1,\)\)"),
])
def test_bad_kernel_size_or_strides_raise_clear_error(kwargs, match):
  with pytest.raises(ValueError, match="AdderConv: " + match):
    layers.AdderConv(4, **kwargs).init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
  with pytest.raises(ValueError, match="AdderConvNNX: " + match):
    layers.AdderConvNNX(2, 4, **kwargs, rngs=nnx.Rngs(0))


def test_layers_name_features_and_channel_mismatches():
  """Found by using the layers: a negative width failed in MLIR, the NNX
  layers' channel errors spoke of reshaped arrays (x (2, 1, 1, 3)) or
  guessed NCHW/OIHW wrongly, never naming in_features."""
  key = jax.random.key(0)
  for layer in (layers.AdderConv(-1), layers.AdderDense(0)):
    with pytest.raises(ValueError, match=r"features must be a positive int, "
                       r"got (-1|0)"):
      layer.init(key, jnp.ones((1, 5, 5, 3)))
  with pytest.raises(ValueError, match="AdderDenseNNX: out_features must be"):
    layers.AdderDenseNNX(3, -2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="AdderConvNNX: in_features must be"):
    layers.AdderConvNNX(2.5, 4, rngs=nnx.Rngs(0))
  dense = layers.AdderDenseNNX(4, 5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"^AdderDenseNNX: input has 3 "
                     r"features \(last axis, shape \(2, 3\)\) but the layer "
                     r"expects 4 \(in_features\)$"):
    dense(jnp.ones((2, 3)))
  conv = layers.AdderConvNNX(5, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError) as err:
    conv(jnp.ones((2, 5, 6, 3)))
  assert str(err.value) == (
      "AdderConvNNX: input has 3 channels (last axis, shape (2, 5, 6, 3)) but "
      "the layer expects 5 (in_features); if x is NCHW, transpose it to NHWC "
      "with x.transpose(0, 2, 3, 1)")
  with pytest.raises(ValueError, match=r"AdderConvNNX: input must be NHWC "
                     r"\(rank 4\)"):
    conv(jnp.ones((5, 6, 5)))
  # Options are checked when the layer or model is built, not at first use.
  with pytest.raises(ValueError, match="AdderConvNNX: implementation must be "
                     "None, 'xla' or 'pallas', got 'cuda'"):
    layers.AdderConvNNX(2, 3, implementation="cuda", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="AdderDenseNNX: gradient must be"):
    layers.AdderDenseNNX(2, 3, gradient="exactly", rngs=nnx.Rngs(0))
  from addernet_jax import models  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="get_model: implementation must be"):
    models.get_model("resnet20", num_classes=10, implementation="foo")
  # A 3x3 HWIO filter on RGB input is not "OIHW" (w.shape[1] == 3 alone).
  with pytest.raises(ValueError) as err:
    ops.adder_conv(jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 2, 4)))
  assert "OIHW" not in str(err.value) and "NCHW" not in str(err.value)


def test_numpy_int_kernel_size_and_strides():
  """Sizes read from NumPy arrays/configs raised "'numpy.int64' object is
  not iterable"."""
  x = jnp.ones((1, 7, 5, 2))
  layer = layers.AdderConv(4, kernel_size=np.int64(3), strides=np.int64(2))
  variables = layer.init(jax.random.key(0), x)
  assert variables["params"]["adder_kernel"].shape == (3, 3, 2, 4)
  assert layer.apply(variables, x).shape == (1, 4, 3, 4)
  conv = layers.AdderConvNNX(2, 4, np.int64(3), strides=np.int64(2),
                             rngs=nnx.Rngs(0))
  assert conv(x).shape == (1, 4, 3, 4)


def test_every_adder_layer_starts_from_the_official_normal_filters():
  """adder2d's filters are N(0, 1) (`torch.randn`), as are ours in every
  layer, Linen and NNX (LeNet-5-BN's fully connected layers too); Flax's
  defaults (lecun_normal: std 1/sqrt(fan_in)) would be 16-64x smaller."""
  rngs = lambda: nnx.Rngs(0)
  x4, x2 = jnp.ones((1, 8, 8, 64)), jnp.ones((1, 256))
  filters = {
      "AdderConv": layers.AdderConv(96, (3, 3)).init(
          jax.random.key(0), x4)["params"][layers.ADDER_KERNEL],
      "AdderDense": layers.AdderDense(96).init(
          jax.random.key(0), x2)["params"][layers.ADDER_KERNEL],
      "AdderConvNNX": layers.AdderConvNNX(64, 96, 3,
                                          rngs=rngs()).adder_kernel[...],
      "AdderDenseNNX": layers.AdderDenseNNX(256, 96,
                                            rngs=rngs()).adder_kernel[...],
  }
  for name, w in filters.items():
    w = np.asarray(w, np.float64)
    assert w.size >= 24_000, name
    assert abs(w.mean()) < 0.03 and abs(w.std() - 1.0) < 0.03, (
        name, w.mean(), w.std())


def test_nnx_layers_pass_strides_dtype_and_gradient_to_the_op():
  """The NNX layers hand their own options to `ops.adder_conv`: unequal
  strides in their order, `dtype`, and `gradient="exact"` (whose input
  gradient differs from the official clipped one); every other test used
  square strides, the default dtype and the official gradient."""
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
  pads = ((1, 1), (1, 1))
  conv = layers.AdderConvNNX(3, 4, 3, strides=(2, 1), padding=1,
                             gradient="exact", rngs=nnx.Rngs(0))
  w = conv.adder_kernel[...]

  def op(x, gradient):
    return ops.adder_conv(x, w, strides=(2, 1), padding=pads,
                          gradient=gradient)
  y = jax.jit(conv)(x)  # (jitted: op by op, the test took 2x longer)
  assert y.shape == (2, 4, 6, 4)
  np.testing.assert_allclose(y, jax.jit(op, static_argnums=1)(x, "exact"),
                             rtol=1e-6)
  loss = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x) / 3.0))))(
      x)
  exact, official = loss(lambda x: op(x, "exact")), loss(
      lambda x: op(x, "official"))
  assert not np.allclose(exact, official, rtol=1e-3)
  np.testing.assert_allclose(loss(conv), exact, rtol=1e-5, atol=1e-6)
  bf16 = layers.AdderConvNNX(3, 4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert jax.eval_shape(bf16, x).dtype == jnp.bfloat16

  x2 = jnp.asarray(rng.normal(size=(4, 11)), jnp.float32)
  dense = layers.AdderDenseNNX(11, 6, gradient="exact", rngs=nnx.Rngs(1))
  k = dense.adder_kernel[...]

  def dense_op(x, gradient):
    y = ops.adder_conv(x.reshape(4, 1, 1, 11), k[None, None],
                       padding="VALID", gradient=gradient)
    return y.reshape(4, 6)
  dense_loss = lambda f: jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x)))))(
      x2)
  exact = dense_loss(lambda x: dense_op(x, "exact"))
  official = dense_loss(lambda x: dense_op(x, "official"))
  assert not np.allclose(exact, official, rtol=1e-3)
  np.testing.assert_allclose(dense_loss(dense), exact, rtol=1e-5, atol=1e-6)
