"""AdderSR (super-resolution): metrics against scikit-image, the two adder
fixes, model shapes and sizes, the data pipeline, bad data, operation counts
one tiny end-to-end train + eval on scikit-image's sample images, and (extended)
short runs that beat bicubic interpolation."""

import contextlib
import functools
import io
import itertools
import json
import os
from pathlib import Path
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from addernet_jax import checkpoint as ckpt_lib
from addernet_jax import models
from addernet_jax import opcount
from addernet_jax import parallel
from addernet_jax import train_lib
from addernet_jax.models import sr as sr_models
from addernet_jax.sr import data as sr_data
from addernet_jax.sr import metrics
from addernet_jax.sr import train as sr_train

skimage = pytest.importorskip("skimage")
from skimage import data as skdata  # pylint: disable=g-import-not-at-top
from skimage import metrics as skmetrics  # pylint: disable=g-import-not-at-top

ROOT = Path(__file__).resolve().parents[1]
SK_SSIM = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
               data_range=255)


# ------------------------------------------------------------- metrics --


def test_psnr_ssim_match_scikit_image_on_random_images():
  rng = np.random.default_rng(0)
  for shape, noise in (((40, 50), 10.0), ((23, 64), 40.0), ((11, 11), 3.0)):
    a = rng.uniform(0, 255, shape)
    b = np.clip(a + rng.normal(0, noise, shape), 0, 255)
    assert metrics.psnr(a, b) == pytest.approx(
        skmetrics.peak_signal_noise_ratio(a, b, data_range=255), abs=1e-10)
    assert metrics.ssim(a, b) == pytest.approx(
        skmetrics.structural_similarity(a, b, **SK_SSIM), abs=1e-10)
  assert metrics.psnr(a, a) == float("inf")
  assert metrics.ssim(a, a) == pytest.approx(1.0)


def test_psnr_ssim_match_scikit_image_on_real_images():
  rng = np.random.default_rng(1)
  for image in (skdata.astronaut(), skdata.chelsea()):
    y = metrics.rgb_to_y(image)
    noisy = metrics.rgb_to_y(
        np.clip(image + rng.normal(0, 6, image.shape), 0, 255).round())
    assert metrics.psnr(noisy, y) == pytest.approx(
        skmetrics.peak_signal_noise_ratio(y, noisy, data_range=255),
        abs=1e-10)
    assert metrics.ssim(noisy, y) == pytest.approx(
        skmetrics.structural_similarity(y, noisy, **SK_SSIM), abs=1e-10)


def test_rgb_to_y_is_bt601_in_float64():
  rng = np.random.default_rng(2)
  rgb = rng.integers(0, 256, (7, 9, 3)).astype(np.uint8)
  r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
  expected = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0
  y = metrics.rgb_to_y(rgb)
  assert y.dtype == np.float64
  np.testing.assert_allclose(y, expected, rtol=0, atol=1e-12)
  # MATLAB's rgb2ycbcr on doubles in [0, 1], as scikit-image implements it.
  from skimage import color  # pylint: disable=g-import-not-at-top
  np.testing.assert_allclose(y, color.rgb2ycbcr(rgb / 255.0)[..., 0],
                             atol=1e-10)
  assert metrics.rgb_to_y(np.zeros((1, 1, 3)))[0, 0] == 16.0
  assert metrics.rgb_to_y(np.full((1, 1, 3), 255.0))[0, 0] == pytest.approx(
      235.0)
  with pytest.raises(ValueError, match="3 channels"):
    metrics.rgb_to_y(np.zeros((4, 4, 4)))


def test_y_psnr_ssim_crops_the_border():
  rng = np.random.default_rng(3)
  hr = rng.integers(0, 256, (30, 34, 3)).astype(np.float64)
  out = hr.copy()
  out[:2] = 0  # damage only the border that scale 2 crops
  out[:, -2:] = 255
  psnr, ssim = metrics.y_psnr_ssim(out, hr, border=2)
  assert psnr == float("inf") and ssim == pytest.approx(1.0)
  assert metrics.y_psnr_ssim(out, hr, border=1)[0] < 40
  np.testing.assert_array_equal(metrics.quantize(np.array([-0.1, 0.5, 1.2])),
                                [0.0, 128.0, 255.0])


# ------------------------------------------------- the AdderSR fixes --


def test_power_activation_identity_and_alpha_gradient():
  layer = sr_models.PowerActivation()
  x = jnp.array([-2.0, -0.5, 0.0, 0.25, 3.0])
  params = layer.init(jax.random.key(0), x)
  assert float(params["params"]["alpha"]) == 1.0
  np.testing.assert_allclose(layer.apply(params, x), x)
  alpha = 1.7
  p = {"params": {"alpha": jnp.float32(alpha)}}
  np.testing.assert_allclose(layer.apply(p, x),
                             np.sign(x) * np.abs(x) ** alpha, rtol=1e-6)
  g = jnp.array([0.3, -1.0, 2.0, 0.7, 0.1])
  grad = jax.grad(lambda q: jnp.sum(layer.apply(q, x) * g))(p)
  ax = np.abs(np.asarray(x, np.float64))
  safe = np.where(ax > 0, ax, 1.0)
  expected = np.sum(np.asarray(g) * np.sign(x) * np.where(
      ax > 0, safe ** alpha * np.log(safe), 0.0))
  assert float(grad["params"]["alpha"]) == pytest.approx(expected, rel=1e-5)
  # Finite gradients at x = 0, for the input and alpha, even with alpha < 1.
  p_small = {"params": {"alpha": jnp.float32(0.5)}}
  gx = jax.grad(lambda v: jnp.sum(layer.apply(p_small, v)))(x)
  ga = jax.grad(lambda q: jnp.sum(layer.apply(q, x)))(p_small)
  assert np.all(np.isfinite(gx)) and np.isfinite(ga["params"]["alpha"])


def _unit(self_shortcut=True, power=True, identity_init=False):
  conv = models.common.conv_factory("adder")
  return sr_models.AdderUnit(8, conv, adder=True, self_shortcut=self_shortcut,
                             power_activation=power,
                             identity_init=identity_init)


def test_identity_init_starts_every_adder_unit_as_the_identity():
  x = jax.random.normal(jax.random.key(5), (2, 5, 4, 8))
  unit = _unit(identity_init=True)
  variables = jax.jit(functools.partial(unit.init, train=False))(
      jax.random.key(6, impl="rbg"), x)
  np.testing.assert_array_equal(variables["params"]["bn"]["scale"],
                                np.zeros(8, np.float32))
  y, _ = jax.jit(lambda v, x: unit.apply(v, x, train=True,
                                         mutable=["batch_stats"]))(variables, x)
  np.testing.assert_array_equal(y, x)
  # ...and it learns: the BatchNorm scale gets a gradient at once (the
  # filters from the next step on, once the scale is no longer 0).
  def loss(params):
    out, _ = unit.apply({**variables, "params": params}, x, train=True,
                        mutable=["batch_stats"])
    return jnp.mean(jnp.abs(out - 0.3 * x))
  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert float(jnp.linalg.norm(grads["bn"]["scale"])) > 0
  # An untrained VDSR is then its head and tail convolutions around an
  # identity body: it differs from the same network with identity_init=False.
  lr = jax.random.uniform(jax.random.key(7), (1, 6, 5, 1))
  outs = []
  for init in (True, False):
    net = models.get_sr_model("vdsr", scale=2, depth=4, features=8,
                              identity_init=init)
    key = jax.random.key(8, impl="rbg")  # compiles faster than threefry
    outs.append(jax.jit(lambda lr, net=net: net.apply(
        net.init(key, lr, train=False), lr, train=False))(lr))
  assert not np.allclose(outs[0], outs[1])


def test_identity_init_starts_the_edsr_body_as_the_identity():
  """Each block's branch (two identity units around a ReLU) would be relu(h):
  16 blocks would scale the positive features by 2**16. The gate from 0
  makes the untrained adder EDSR its network without blocks, and it learns."""
  lr = jax.random.uniform(jax.random.key(9), (1, 5, 4, 3))
  net = models.get_sr_model("edsr_baseline", scale=2, num_blocks=2,
                            features=4)
  variables = jax.jit(functools.partial(net.init, train=False))(
      jax.random.key(10, impl="rbg"), lr)
  params, stats = variables["params"], variables["batch_stats"]
  assert [float(params[f"block{b}_gate"]) for b in range(2)] == [0.0, 0.0]
  bare = models.get_sr_model("edsr_baseline", scale=2, num_blocks=0,
                             features=4)
  kept = {k: v for k, v in params.items() if not k.startswith("block")}

  @jax.jit
  def outputs_and_gate_grads(params):
    def loss(p):
      y, _ = net.apply({"params": p, "batch_stats": stats}, lr, train=True,
                       mutable=["batch_stats"])
      return jnp.mean(jnp.abs(y - 0.5))
    grads = jax.grad(loss)(params)
    return (net.apply({"params": params, "batch_stats": stats}, lr,
                      train=False),
            bare.apply({"params": kept, "batch_stats": bare_stats}, lr,
                       train=False),
            [grads[f"block{b}_gate"] for b in range(2)])
  bare_stats = {k: v for k, v in stats.items() if not k.startswith("block")}
  out, out_bare, gate_grads = outputs_and_gate_grads(params)
  # (to rounding: one jitted program, fused differently)
  np.testing.assert_allclose(out, out_bare, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(out).mean()) < 10
  assert all(float(jnp.abs(g)) > 0 for g in gate_grads)
  # The CNN twin and the ablation keep EDSR's plain blocks.
  for kwargs in ({"conv": "mult"}, {"identity_init": False}):
    twin = models.get_sr_model("edsr_baseline", scale=2, num_blocks=2,
                               features=4, **kwargs)
    shapes = jax.eval_shape(functools.partial(twin.init, train=False),
                            jax.random.key(10), lr)["params"]
    assert not [k for k in shapes if k.endswith("_gate")], kwargs


def test_self_shortcut_makes_the_identity_expressible():
  x = jax.random.normal(jax.random.key(1), (1, 3, 4, 8))
  unit = _unit()
  variables = unit.init(jax.random.key(2), x, train=False)
  assert set(variables["params"]) == {"conv", "bn", "power"}
  # BatchNorm scale and bias 0: the adder branch vanishes, alpha 1: y = x.
  zero = jax.tree.map(jnp.zeros_like, variables["params"]["bn"])
  params = {**variables["params"], "bn": zero}
  for train in (False, True):
    apply = jax.jit(lambda v, x, train=train: unit.apply(
        v, x, train=train, mutable=["batch_stats"])[0])
    np.testing.assert_array_equal(apply({**variables, "params": params}, x),
                                  x)
  # Without the self-shortcut the same parameters give zeros, not x: a bare
  # adder layer (+ BN) cannot pass its input through.
  bare = _unit(self_shortcut=False)
  y = jax.jit(bare.apply, static_argnames="train")(
      {**variables, "params": params}, x, train=False)
  np.testing.assert_array_equal(y, np.zeros_like(x))


def test_adder_unit_gradients_reach_alpha_and_the_filters():
  x = jax.random.normal(jax.random.key(3), (2, 3, 3, 8))
  unit = _unit()
  variables = unit.init(jax.random.key(4), x, train=False)

  def loss(params):
    y, _ = unit.apply({**variables, "params": params}, x, train=True,
                      mutable=["batch_stats"])
    return jnp.mean(jnp.abs(y - 0.3 * x))

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert float(jnp.abs(grads["power"]["alpha"])) > 0
  assert float(jnp.linalg.norm(grads["conv"]["adder_kernel"])) > 0


# -------------------------------------------------------------- models --


@pytest.mark.parametrize("name,conv", [("edsr_baseline", "mult"),
                                       ("edsr_baseline", "adder"),
                                       ("vdsr", "mult")])
def test_multiplication_convolutions_start_as_documented(name, conv):
  """Every multiplication convolution (head, tail, upsampler, the CNN
  twin's units): kernels U(+-1/sqrt(fan_in)) as PyTorch's, biases 0 (PyTorch's
  bias draw, made for 0-255 images, is 255 times larger relative to our
  [0, 1] images: measured worse, docs/addersr.md choice 15)."""
  size = {"num_blocks": 1} if name == "edsr_baseline" else {"depth": 3}
  model = models.get_sr_model(name, scale=2, conv=conv, features=64, **size)
  colors = 3 if name == "edsr_baseline" else 1
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, colors)),
                         train=False)
  checked = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]):
    if jax.tree_util.keystr(path[-1:]) != "['kernel']":
      continue
    layer = variables["params"]
    for key in path[:-1]:
      layer = layer[key.key]
    kh, kw, cin, _ = leaf.shape
    bound = 1 / np.sqrt(kh * kw * cin)
    kernel = np.asarray(leaf)
    assert np.all(np.abs(kernel) <= bound), jax.tree_util.keystr(path)
    assert 0.8 < kernel.std() / (bound / np.sqrt(3)) < 1.2, (
        jax.tree_util.keystr(path), kernel.std(), bound)
    np.testing.assert_array_equal(np.asarray(layer["bias"]), 0)
    checked += 1
  assert checked == {("edsr_baseline", "mult"): 6,
                     ("edsr_baseline", "adder"): 3,
                     ("vdsr", "mult"): 3}[(name, conv)]


def test_pixel_shuffle_is_torch_order():
  rng = np.random.default_rng(4)
  for r in (2, 3):
    x = rng.normal(size=(2, 3, 4, 5 * r * r)).astype(np.float32)
    y = np.asarray(sr_models.pixel_shuffle(jnp.asarray(x), r))
    assert y.shape == (2, 3 * r, 4 * r, 5)
    for h in range(3):
      for w in range(4):
        for i in range(r):
          for j in range(r):
            np.testing.assert_array_equal(
                y[:, h * r + i, w * r + j, :], x[:, h, w, i * r + j::r * r])
  with pytest.raises(ValueError, match="divide"):
    sr_models.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


@pytest.mark.parametrize("scale,steps", [(2, 1), (3, 1), (4, 2)])
def test_upsampler(scale, steps):
  up = sr_models.Upsampler(scale, 4)
  x = jnp.ones((1, 5, 6, 4))
  variables = up.init(jax.random.key(0), x)
  assert len(variables["params"]) == steps
  assert up.apply(variables, x).shape == (1, 5 * scale, 6 * scale, 4)


def _shape_and_count(model, lr_shape):
  def f():
    v = model.init(jax.random.key(0), jnp.zeros(lr_shape), train=False)
    return v, model.apply(v, jnp.zeros(lr_shape), train=False)
  variables, out = jax.eval_shape(f)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      variables["params"]))
  return out.shape, count, variables


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name,colors", [("edsr_baseline", 3), ("vdsr", 1)])
@pytest.mark.parametrize("conv", ["adder", "mult"])
def test_sr_output_shapes(name, colors, conv, scale):
  # Shallow versions (the published depths are traced in the count test).
  size = {"num_blocks": 1} if name == "edsr_baseline" else {"depth": 4}
  model = models.get_sr_model(name, scale=scale, conv=conv, **size)
  assert model.colors == colors
  shape, _, variables = _shape_and_count(model, (2, 7, 9, colors))
  assert shape == (2, 7 * scale, 9 * scale, colors)
  has_bn = bool(jax.tree.leaves(variables.get("batch_stats", {})))
  assert has_bn == (conv == "adder")


def test_sr_parameter_counts_are_the_published_sizes():
  conv = lambda k, cin, cout: k * k * cin * cout + cout  # with bias
  edsr_x2 = (conv(3, 3, 64) + 33 * conv(3, 64, 64) + conv(3, 64, 256)
             + conv(3, 64, 3))
  vdsr = conv(3, 1, 64) + 18 * conv(3, 64, 64) + conv(3, 64, 1)
  assert edsr_x2 == 1_369_859 and vdsr == 665_921  # EDSR 1.37M, VDSR 665K
  _, count, _ = _shape_and_count(
      models.get_model("edsr_baseline", scale=2, conv="mult"), (1, 8, 8, 3))
  assert count == edsr_x2
  _, count, _ = _shape_and_count(
      models.get_model("vdsr", scale=2, conv="mult"), (1, 8, 8, 1))
  assert count == vdsr
  # AdderSR: adder filters have no bias; each unit adds BN scale/bias and
  # one alpha: 33 units in EDSR, 18 in VDSR; each EDSR block one gate.
  _, count, variables = _shape_and_count(
      models.get_model("edsr_baseline", scale=2), (1, 8, 8, 3))
  assert count == edsr_x2 - 33 * 64 + 33 * (2 * 64 + 1) + 16
  kinds = {"/".join(str(k.key) for k in path)
           for path, _ in jax.tree_util.tree_flatten_with_path(
               variables["params"])[0]}
  assert "head/kernel" in kinds and "tail/kernel" in kinds
  assert "upsampler/conv0/kernel" in kinds
  assert "block0_unit1/conv/adder_kernel" in kinds
  assert "body_end/power/alpha" in kinds


def test_get_model_sr_arguments():
  with pytest.raises(ValueError, match="scale"):
    models.get_model("edsr_baseline")
  with pytest.raises(ValueError, match="num_classes"):
    models.get_model("vdsr", scale=2, num_classes=10)
  with pytest.raises(ValueError, match="scale must be one of"):
    models.get_model("vdsr", scale=5)
  with pytest.raises(ValueError, match="scale="):
    models.get_model("resnet20", num_classes=10, scale=2)
  with pytest.raises(ValueError, match="unknown super-resolution model"):
    models.get_sr_model("srcnn", scale=2)
  assert "edsr_baseline" not in models.MODEL_NAMES  # classification names
  with pytest.raises(ValueError, match="scale must be one of.*got 2.0"):
    models.get_sr_model("vdsr", scale=2.0)
  with pytest.raises(ValueError, match="features must be an int >= 1, got "
                     "-1"):
    models.get_sr_model("vdsr", scale=2, features=-1)


def test_sr_models_refuse_images_with_other_channels():
  """The mean subtraction (EDSR) and the residual (VDSR) broadcast: a grey
  image through an RGB EDSR returned RGB, an RGB one through a Y-channel
  VDSR returned 3 channels, without an error."""
  def init(model, x):  # shapes only: the checks run while tracing
    return model.init(jax.random.key(0), x, train=False)

  edsr = models.get_sr_model("edsr_baseline", scale=2, num_blocks=1,
                             features=4)
  with pytest.raises(ValueError, match=r"EDSR: input has 1 channels .* "
                     r"colors=3, got shape \(1, 6, 6, 1\)"):
    jax.eval_shape(functools.partial(init, edsr), jnp.ones((1, 6, 6, 1)))
  variables = jax.eval_shape(functools.partial(init, edsr),
                             jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match="it looks like NCHW"):
    jax.eval_shape(functools.partial(edsr.apply, train=False), variables,
                   jnp.ones((1, 3, 6, 6)))
  vdsr = models.get_sr_model("vdsr", scale=2, depth=3, features=4)
  with pytest.raises(ValueError, match="VDSR: input has 3 channels"):
    jax.eval_shape(functools.partial(init, vdsr), jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match=r"rank 4\), got shape \(6, 6, 1\)"):
    jax.eval_shape(functools.partial(init, vdsr), jnp.ones((6, 6, 1)))


# ---------------------------------------------------------------- data --


def _write_png(path, array):
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def test_bicubic_lr_is_pil_bicubic_of_the_modcropped_hr(tmp_path):
  rng = np.random.default_rng(5)
  _write_png(tmp_path / "a.png", rng.integers(0, 256, (37, 50, 3)))
  ds = sr_data.ImageFolderSR(tmp_path, 3)
  assert ds.hr[0].shape == (36, 48, 3) and ds.lr[0].shape == (12, 16, 3)
  expected = Image.fromarray(ds.hr[0]).resize((16, 12), Image.BICUBIC)
  np.testing.assert_array_equal(ds.lr[0], np.asarray(expected))
  flat = sr_data.bicubic_downscale(np.full((8, 8, 3), 77, np.uint8), 2)
  assert np.all(flat == 77)


def _find(patch, image):
  """Top-left corners where `patch` occurs in `image`."""
  p = patch.shape[0]
  windows = np.lib.stride_tricks.sliding_window_view(image, (p, p, 3))[:, :, 0]
  return list(zip(*np.nonzero(np.all(windows == patch, axis=(2, 3, 4)))))


@pytest.mark.parametrize("augment", [False, True])
def test_patches_are_aligned_and_augmented_together(tmp_path, augment):
  rng = np.random.default_rng(6)
  for name, shape in (("a.png", (40, 44, 3)), ("b.png", (34, 30, 3))):
    _write_png(tmp_path / name, rng.integers(0, 256, shape))
  s, p = 2, 5
  ds = sr_data.ImageFolderSR(tmp_path, s, min_lr_size=p)
  lr, hr = sr_data.sample_batch(ds, 12, p, seed=0, step=3, augment=augment)
  assert lr.shape == (12, p, p, 3) and hr.shape == (12, s * p, s * p, 3)
  seen = set()
  for i in range(12):
    matches = []
    for flags in itertools.product((False, True), repeat=3):
      lr_patch, hr_patch = _undo(lr[i], flags), _undo(hr[i], flags)
      for lr_img, hr_img in zip(ds.lr, ds.hr):
        for y, x in _find(lr_patch, lr_img):
          if np.array_equal(hr_patch,
                            hr_img[s * y:s * (y + p), s * x:s * (x + p)]):
            matches.append(flags)
    assert len(matches) == 1, f"example {i}: {matches}"
    seen.update(matches)
  if not augment:
    assert seen == {(False, False, False)}
  else:
    assert len(seen) > 2
  # The same (seed, step) gives the same batch; another step another one.
  again = sr_data.sample_batch(ds, 12, p, seed=0, step=3, augment=augment)
  np.testing.assert_array_equal(again[0], lr)
  other = sr_data.sample_batch(ds, 12, p, seed=0, step=4, augment=augment)
  assert not np.array_equal(other[0], lr)


def _undo(x, flags):
  """The inverse of `augment_pair`'s (hflip, vflip, transpose)."""
  h, v, t = flags
  if t:
    x = x.transpose(1, 0, 2)
  if v:
    x = x[::-1, :]
  if h:
    x = x[:, ::-1]
  return x


def test_bad_data_folders_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    sr_data.ImageFolderSR(tmp_path / "nowhere", 2)
  (tmp_path / "file.png").write_bytes(b"not a png")
  with pytest.raises(NotADirectoryError, match="not a directory"):
    sr_data.ImageFolderSR(tmp_path / "file.png", 2)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("no images here")
  with pytest.raises(ValueError, match="holds no image"):
    sr_data.ImageFolderSR(empty, 2)
  with pytest.raises(ValueError, match="cannot read image.*file.png"):
    sr_data.ImageFolderSR(tmp_path, 2)
  small = tmp_path / "small"
  small.mkdir()
  _write_png(small / "tiny.png", np.zeros((10, 12, 3)))
  with pytest.raises(ValueError, match="tiny.png.*too small"):
    sr_data.ImageFolderSR(small, 2, min_lr_size=8)


# ------------------------------------------------------------- opcount --


def test_sr_op_counts_at_720p():
  hw = 720 * 1280
  # VDSR runs at the output size: first and last conv (1 <-> 64 channels)
  # multiply, 18 layers of 64x64x3x3 are adder layers.
  vdsr = opcount.count_ops("vdsr", opcount.sr_input_shape("vdsr", 2),
                           conv="adder", scale=2)["total"]
  assert vdsr["mul"] == 2 * hw * 9 * 64
  assert vdsr["add"] == vdsr["mul"] + 2 * 18 * hw * 9 * 64 * 64
  cnn = opcount.count_ops("vdsr", opcount.sr_input_shape("vdsr", 2),
                          conv="mult", scale=2)["total"]
  assert cnn["mul"] == cnn["add"] == 20 * 0 + hw * 9 * 64 * (2 + 18 * 64)
  # EDSR x2 runs at 640x360: head, upsampler (64 -> 256) and tail multiply.
  lr = 360 * 640
  edsr = opcount.count_ops("edsr_baseline", (360, 640, 3), conv="adder",
                           scale=2)["total"]
  mult_macs = lr * 9 * (3 * 64 + 64 * 256) + hw * 9 * 64 * 3
  assert edsr["mul"] == mult_macs
  assert edsr["add"] == mult_macs + 2 * 33 * lr * 9 * 64 * 64
  assert opcount.sr_input_shape("edsr_baseline", 3) == (240, 427, 3)
  with pytest.raises(ValueError, match="scale="):
    opcount.count_ops("vdsr", (8, 8, 1))


# ---------------------------------------------------------- end to end --


@pytest.fixture(scope="module")
def skimage_folders(tmp_path_factory):
  """Small copies of scikit-image's bundled sample images: 3 to train on,
  2 to test on."""
  root = tmp_path_factory.mktemp("sr_images")
  split = {"train": ("astronaut", "coffee", "rocket"),
           "test": ("chelsea", "camera")}
  for name, images in split.items():
    (root / name).mkdir()
    for image_name in images:
      image = Image.fromarray(getattr(skdata, image_name)()).convert("RGB")
      image.resize((64, 48), Image.BICUBIC).save(root / name /
                                                 f"{image_name}.png")
  return root / "train", root / "test"


def _smoke_config(train_dir, test_dir):
  sys.path.insert(0, str(ROOT))
  from configs import sr_smoke  # pylint: disable=g-import-not-at-top
  config = sr_smoke.get_config()
  config.data_dir, config.eval_data_dir = str(train_dir), str(test_dir)
  return config


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_train_and_eval_end_to_end(skimage_folders, tmp_path):
  config = _smoke_config(*skimage_folders)
  workdir = tmp_path / "run"
  summary = train_lib.train_and_evaluate(config, workdir)
  assert summary["step"] == 4 and summary["epoch"] == 2.0
  for key in ("train_loss", "eval_psnr", "eval_ssim", "eval_bicubic_psnr"):
    assert np.isfinite(summary[key]), key
  assert summary["eval_num_images"] == 2
  records = [json.loads(l) for l in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train_loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in records if "eval_psnr" in r] == [2, 4]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["2", "4"]

  # --which=best: the step with the best evaluation PSNR (not the latest by
  # default for want of the classifiers' eval_top1).
  evals = [r for r in records if "eval_psnr" in r]
  best = max(evals, key=lambda r: r["eval_psnr"])
  result = train_lib.evaluate_checkpoint(config, workdir, which="best")
  assert result["which"] == "best" and result["step"] == best["step"]
  assert result["psnr"] == pytest.approx(best["eval_psnr"], abs=1e-6)

  # Rerunning the same command resumes: nothing left to train.
  again = train_lib.train_and_evaluate(config, workdir)
  assert again["step"] == 4
  assert again["eval_psnr"] == pytest.approx(summary["eval_psnr"], abs=1e-9)
  # ... but not with another batch size: that would mix two runs.
  changed = _smoke_config(*skimage_folders)
  changed.batch_size *= 2
  with pytest.raises(ValueError, match="batch_size .* in the checkpoint"):
    train_lib.train_and_evaluate(changed, workdir)
  # Another scale is another upsampler: named as such, not as a shape.
  changed = _smoke_config(*skimage_folders)
  changed.scale = 3
  for run in (train_lib.train_and_evaluate, train_lib.evaluate_checkpoint):
    with pytest.raises(ValueError, match="scale 2 in the checkpoint, 3 in "
                       "the config"):
      run(changed, workdir)
  # The self-shortcut adds no parameter: only the meta tells a checkpoint
  # without it (evaluated with it, the PSNR was silently wrong). Widths and
  # depths are named as fields, not as a parameter's shape.
  for field, value, saved in (("self_shortcut", False, True),
                              ("features", 16, 8), ("num_blocks", 2, 1)):
    changed = _smoke_config(*skimage_folders)
    changed[field] = value
    for run in (train_lib.train_and_evaluate, train_lib.evaluate_checkpoint):
      with pytest.raises(ValueError, match=f"{field} {saved} in the "
                         f"checkpoint, {value} in the config"):
        run(changed, workdir)
  # A checkpoint without the EDSR blocks' gates (as before they existed; the
  # identity_init=False network has none): the error says how to restore it.
  gateless = _smoke_config(*skimage_folders)
  gateless.identity_init = False
  gateless.num_train_steps = 2
  train_lib.train_and_evaluate(gateless, tmp_path / "gateless")
  for run in (train_lib.train_and_evaluate, train_lib.evaluate_checkpoint):
    with pytest.raises(ValueError, match="block0_gate.*missing.*"
                       "--config.identity_init=false restores it"):
      run(_smoke_config(*skimage_folders), tmp_path / "gateless")
  assert train_lib.evaluate_checkpoint(gateless,
                                       tmp_path / "gateless")["step"] == 2
  # The gated checkpoint into the gateless network: refused (evaluating it
  # without its gates would be another network), with the remedy.
  with pytest.raises(ValueError, match="block0_gate.*the model lacks.*leave "
                     "out --config.identity_init=false"):
    train_lib.evaluate_checkpoint(gateless, workdir)

  # eval.py: the same checkpoint, the same figures, one JSON line.
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "eval.py", "--config", "configs/sr_smoke.py",
       f"--checkpoint={workdir}",
       f"--config.eval_data_dir={skimage_folders[1]}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["num_images"] == 2 and line["step"] == 4
  assert line["psnr"] == pytest.approx(summary["eval_psnr"], abs=1e-6)
  assert line["ssim"] == pytest.approx(summary["eval_ssim"], abs=1e-6)
  assert line["bicubic_psnr"] == pytest.approx(summary["eval_bicubic_psnr"])


def test_sigterm_during_start_up_stops_cleanly(skimage_folders, tmp_path,
                                              monkeypatch):
  """A SIGTERM while the images loaded or the step compiled killed an
  AdderSR run (exit status 143, a failure to a requeue script); it now
  stops before the first step, `preempted`, status 0, nothing saved."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  real_make_train_step = sr_train.make_train_step

  def make_train_step_then_preempted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # during start-up
    time.sleep(0.1)
    return real_make_train_step(*args, **kwargs)

  monkeypatch.setattr(sr_train, "make_train_step",
                      make_train_step_then_preempted)
  before = signal.getsignal(signal.SIGTERM)
  summary = train_lib.train_and_evaluate(_smoke_config(*skimage_folders),
                                         tmp_path)
  assert summary["preempted"] is True and summary["step"] == 0
  assert signal.getsignal(signal.SIGTERM) is before
  checkpoints = tmp_path / "checkpoints"
  assert not checkpoints.exists() or not any(
      p.name.isdigit() for p in checkpoints.iterdir())


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_export_runs_without_the_repo_at_any_size(skimage_folders,
                                                  tmp_path):
  """`python -m addernet_jax.export` of an AdderSR workdir: one file that
  runs with JAX alone at any batch, height and width and gives the
  network's output; classification-only flags are refused by name."""
  from addernet_jax import export  # pylint: disable=g-import-not-at-top
  config = _smoke_config(*skimage_folders)
  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(config, workdir)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "addernet_jax.export", "--config",
          "configs/sr_smoke.py", f"--checkpoint={workdir}"]
  output = tmp_path / "sr.jaxexport"
  result = subprocess.run(base + [f"--output={output}", "--platforms=cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(result.stdout.strip().splitlines()[-1])
  assert line["input_shape"] == ["batch", "height", "width", 3]
  assert line["output_shape"] == ["batch", "2*height", "2*width", 3]

  variables = sr_train.restore_variables(config, workdir)
  model = sr_train.build_model(config, bn_axis_name=None)
  rng = np.random.default_rng(0)
  inputs = [rng.random((1, 13, 17, 3), np.float32),
            rng.random((2, 8, 8, 3), np.float32)]
  script = ("import sys, numpy as np, jax\n"
            "f = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb')"
            ".read()))\n"
            "for i, name in enumerate(sys.argv[2:]):\n"
            "  np.save(f'{name}.out.npy', np.asarray(f.call(np.load(name))))\n"
            "assert not any(m.startswith('addernet_jax') for m in "
            "sys.modules)\n")
  names = []
  for i, x in enumerate(inputs):
    names.append(str(tmp_path / f"x{i}.npy"))
    np.save(names[-1], x)
  clean_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
  ran = subprocess.run([sys.executable, "-c", script, str(output), *names],
                       cwd=tmp_path, env=clean_env, capture_output=True,
                       text=True, timeout=300)
  assert ran.returncode == 0, ran.stderr[-3000:]
  for x, name in zip(inputs, names):
    got = np.load(f"{name}.out.npy")
    want = np.asarray(model.apply(
        {"params": variables["params"],
         "batch_stats": variables["batch_stats"]}, x, train=False))
    assert got.shape == (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  for flag, message in (
      ("--batch_stats=recalibrated", "--batch_stats=recalibrated is for "
       "classification configs"),
      ("--config.features=16", "features 8 in the checkpoint, 16 in the "
       "config")):
    bad = subprocess.run(base + [flag, f"--output={tmp_path / 'x.jaxexport'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert message in bad.stderr.strip().splitlines()[-1], bad.stderr
  with pytest.raises(ValueError, match="loads with load_sr_variables"):
    export.load_variables(config, checkpoint=workdir)


def test_sr_export_lowers_for_the_platforms_asked():
  """export_sr_model must lower for the platforms asked (the command's
  --platforms), not for the default ones; no test looked."""
  from addernet_jax import export  # pylint: disable=g-import-not-at-top
  model = models.get_sr_model("edsr_baseline", scale=2, conv="adder",
                              num_blocks=1, features=4)
  # Zero variables of the right shapes: the values do not matter here, and
  # model.init takes seconds.
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  exported = export.export_sr_model(model, variables, 3, platforms=("cpu",))
  assert exported.platforms == ("cpu",)


def test_sr_config_errors(skimage_folders, tmp_path):
  config = _smoke_config(*skimage_folders)
  config.data_dir = str(tmp_path / "missing_hr")
  with pytest.raises(FileNotFoundError, match="missing_hr"):
    train_lib.train_and_evaluate(config, tmp_path / "w1")
  assert not (tmp_path / "w1").exists()  # nothing written before the data
  config = _smoke_config(*skimage_folders)
  config.scale = 5
  with pytest.raises(ValueError, match="config.scale"):
    train_lib.train_and_evaluate(config, tmp_path / "w2")
  config = _smoke_config(*skimage_folders)
  config.task = "detection"
  with pytest.raises(ValueError, match="config.task"):
    train_lib.train_and_evaluate(config, tmp_path / "w3")
  # A negative rate trained to a loss of 4e14 without a word.
  for field, value, message in (
      ("learning_rate", -1.0, r"learning_rate=-1.0 must be a number > 0"),
      ("lr_decay_factor", 0.0, r"lr_decay_factor=0.0 must be a number > 0"),
      ("lr_decay_factor", 2.0, r"lr_decay_factor=2.0 must be > 0 and <= 1"),
      ("adam_b2", 1.5, r"adam_b2=1.5 must be a number >= 0 and < 1")):
    config = _smoke_config(*skimage_folders)
    config[field] = value
    with pytest.raises(ValueError, match=message):
      train_lib.train_and_evaluate(config, tmp_path / "w5")
    assert not (tmp_path / "w5").exists()
  config = _smoke_config(*skimage_folders)
  config.patch_size = 64  # larger than the 32x24 LR training images
  with pytest.raises(ValueError, match="too small"):
    train_lib.train_and_evaluate(config, tmp_path / "w4")


@pytest.mark.extended
def test_short_runs_beat_bicubic_in_psnr_and_ssim(tmp_path):
  """The CPU-sized check of benchmarks/sr_skimage.py (5 x 16 VDSR, x2, 10
  training images, chelsea and camera to test) shortened to 250 steps:
  AdderSR and its CNN twin both beat bicubic interpolation in PSNR and SSIM
  (measured at 250 steps: AdderSR 33.67 dB / 0.9076, CNN 34.00 / 0.9135,
  bicubic 33.23 / 0.8956)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  import sr_skimage  # pylint: disable=g-import-not-at-top
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    sr_skimage.main(["--workdir", str(tmp_path), "--steps", "250",
                     "--lr_decay_steps", "500"])
  summary = json.loads(out.getvalue().strip().splitlines()[-1])
  for conv in ("adder", "mult"):
    assert summary[f"{conv}_psnr"] > summary["bicubic_psnr"] + 0.2, summary
    assert summary[f"{conv}_ssim"] > summary["bicubic_ssim"], summary


def test_border_shave_crops_every_side_and_matches_float64():
  """`border` pixels go from each of the four sides (damage on any one side
  alone leaves PSNR infinite), and the figures equal a float64 PSNR and
  scikit-image's SSIM (Gaussian window, sigma 1.5) on explicitly cropped Y
  images."""
  from skimage.metrics import structural_similarity  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  hr = rng.integers(0, 256, (30, 34, 3)).astype(np.float64)
  for side in (np.s_[:2], np.s_[-2:], np.s_[:, :2], np.s_[:, -2:]):
    out = hr.copy()
    out[side] = 255 - out[side]
    assert metrics.y_psnr_ssim(out, hr, border=2)[0] == float("inf"), side
  y = lambda im: 16 + im @ np.array([65.481, 128.553, 24.966]) / 255
  out = rng.integers(0, 256, (30, 34, 3)).astype(np.float64)
  a, b = y(out)[3:-3, 3:-3], y(hr)[3:-3, 3:-3]
  psnr, ssim = metrics.y_psnr_ssim(out, hr, border=3)
  assert psnr == pytest.approx(10 * np.log10(255**2 / np.mean((a - b)**2)),
                               abs=1e-9)
  assert ssim == pytest.approx(structural_similarity(
      a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=255), abs=1e-9)


def test_modcrop_keeps_the_top_left_corner(tmp_path):
  """A high-resolution image is cut to a multiple of the scale by dropping
  its last rows and columns (EDSR's modcrop), and the low-resolution image is
  the bicubic reduction of exactly that crop."""
  img = np.random.default_rng(5).integers(0, 256, (37, 50, 3), np.uint8)
  Image.fromarray(img).save(tmp_path / "a.png")
  ds = sr_data.ImageFolderSR(tmp_path, 3)
  np.testing.assert_array_equal(ds.hr[0], img[:36, :48])
  np.testing.assert_array_equal(ds.lr[0], np.asarray(
      Image.fromarray(img[:36, :48]).resize((16, 12), Image.BICUBIC)))


def test_patch_offsets_cover_every_position(tmp_path):
  """Training patches are drawn from every offset of the low-resolution
  image, the last row and column included."""
  Image.fromarray(np.random.default_rng(1).integers(
      0, 256, (14, 16, 3), np.uint8)).save(tmp_path / "a.png")
  ds = sr_data.ImageFolderSR(tmp_path, 2, min_lr_size=4)  # LR 7x8, patch 4
  lr_image = ds.lr[0]
  seen = set()
  for step in range(60):
    lr, _ = sr_data.sample_batch(ds, 8, 4, seed=0, step=step, augment=False)
    for patch in lr:
      seen |= {(y, x) for y in range(4) for x in range(5)
               if np.array_equal(patch, lr_image[y:y + 4, x:x + 4])}
  assert seen == {(y, x) for y in range(4) for x in range(5)}, sorted(seen)


# ------------------------------- what a mutation audit found untested --


def test_quantize_rounds_to_the_nearest_8bit_level():
  """Every 8-bit level v / 255 quantises back to v, and in between to the
  nearest level (not x * 256, not truncation)."""
  levels = np.arange(256.0)
  np.testing.assert_array_equal(metrics.quantize(levels / 255.0), levels)
  np.testing.assert_array_equal(
      metrics.quantize((levels[:-1] + 0.4) / 255.0), levels[:-1])
  np.testing.assert_array_equal(
      metrics.quantize((levels[:-1] + 0.6) / 255.0), levels[1:])


def test_one_channel_images_are_taken_as_y():
  """rgb_to_y's (h, w, 1) input is Y already: returned as (h, w), scored
  as the same 2-D image."""
  rng = np.random.default_rng(7)
  y = rng.uniform(16, 235, (24, 26))
  z = np.clip(y + rng.normal(0, 5, y.shape), 16, 235)
  for image in (y, y[..., None]):
    got = metrics.rgb_to_y(image)
    assert got.shape == (24, 26) and got.dtype == np.float64
    np.testing.assert_array_equal(got, y)
  assert metrics.y_psnr_ssim(y[..., None], z[..., None], 2) == (
      metrics.y_psnr_ssim(y, z, 2))


def test_shave_of_border_zero_and_of_the_smallest_images():
  """Border 0 keeps the image; a side of exactly 2 * border is refused (it
  would leave nothing), one more pixel leaves one row or column."""
  image = np.arange(7 * 9 * 3.0).reshape(7, 9, 3)
  np.testing.assert_array_equal(metrics.shave(image, 0), image)
  np.testing.assert_array_equal(metrics.shave(image, 3), image[3:4, 3:6])
  for shape in ((6, 9, 3), (7, 6, 3)):
    with pytest.raises(ValueError, match="too small"):
      metrics.shave(np.zeros(shape), 3)
  rng = np.random.default_rng(8)
  a, b = rng.uniform(0, 255, (2, 20, 22, 3))
  ya, yb = metrics.rgb_to_y(a), metrics.rgb_to_y(b)
  assert metrics.y_psnr_ssim(a, b, border=0) == (metrics.psnr(ya, yb),
                                                 metrics.ssim(ya, yb))


def test_ssim_refuses_images_of_different_shapes():
  """Two shapes that broadcast ((20, 20) and (20, 1)) gave a number."""
  with pytest.raises(ValueError, match="same shape"):
    metrics.ssim(np.zeros((20, 20)), np.zeros((20, 1)))
  with pytest.raises(ValueError, match="2-D"):
    metrics.ssim(np.zeros((20, 20, 1)), np.zeros((20, 20, 1)))


def test_ssim_matches_scikit_image_at_other_sigmas():
  """The cropped border is the filter's radius, int(3.5 sigma + 0.5), for any
  sigma (sigma 1.0: a 9x9 window, radius 4, not 3)."""
  rng = np.random.default_rng(9)
  a = rng.uniform(0, 255, (32, 36))
  b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
  for sigma in (1.0, 2.0):
    want = skmetrics.structural_similarity(
        a, b, **{**SK_SSIM, "sigma": sigma})
    assert metrics.ssim(a, b, sigma=sigma) == pytest.approx(want, abs=1e-10)


def test_sr_validate_config_refuses_bad_values_and_accepts_edge_ones(
    skimage_folders):
  """validate_config, called directly (no training): each bad field named;
  the documented edges (lr_decay_factor 1, num_epochs 0 with
  num_train_steps > 0) accepted."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  def config_with(**fields):
    # type_safe=False: a string where a bool belongs is what is tested.
    config = ml_collections.ConfigDict(
        _smoke_config(*skimage_folders).to_dict(), type_safe=False)
    config.update(fields)
    return config

  sr_train.validate_config(config_with(), 1)
  sr_train.validate_config(config_with(lr_decay_factor=1.0), 1)
  sr_train.validate_config(config_with(num_epochs=0, num_train_steps=4), 1)
  sr_train.validate_config(config_with(num_epochs=2, num_train_steps=0), 1)
  sr_train.validate_config(config_with(eval_every_steps=-1), 1)
  sr_train.validate_config(config_with(num_blocks=0, features=None), 1)
  for fields, message in (
      # Named "features" without "config.", after the workdir was made.
      ({"features": 0}, r"config.features must be None \(the published "
       r"size\) or an int >= 1, got 0"),
      ({"num_blocks": -1}, r"config.num_blocks must be .* >= 0, got -1"),
      ({"depth": 2}, r"config.depth must be .* >= 3, got 2"),
      ({"features": True}, r"config.features must be .* got True"),
      ({"batch_size": 0}, r"config.batch_size must be a positive int, got 0"),
      ({"steps_per_epoch": 0}, r"config.steps_per_epoch must be a positive"),
      ({"num_epochs": 0, "num_train_steps": 0}, r"num_epochs > 0 or"),
      ({"learning_rate": 0.0}, r"learning_rate=0.0 must be a number > 0"),
      ({"adam_eps": 0.0}, r"adam_eps=0.0 must be a number > 0"),
      ({"adaptive_lr": "false"}, r"adaptive_lr='false' must be True or "
       r"False"),
      ({"colors": 2}, r"config.colors must be 1 or 3, got 2"),
      ({"scale": 5}, r"config.scale must be one of"),
      ({"data_dir": None}, r"config.data_dir must name a folder"),
      ({"eval_every_steps": -2}, r"config.eval_every_steps=-2 must be a "
       r"number of steps > 0, or 0 or -1 \(every epoch\)"),
      ({"eval_every_steps": 1.5}, r"config.eval_every_steps=1.5 must be")):
    with pytest.raises(ValueError, match=message):
      sr_train.validate_config(config_with(**fields), 1)
  with pytest.raises(ValueError, match=r"batch_size=4 must be a multiple of "
                     r"the number of devices \(3\), e.g. "
                     r"--config.batch_size=3 or --config.batch_size=6$"):
    sr_train.validate_config(config_with(batch_size=4), 3)


def test_an_error_building_the_sr_model_leaves_no_empty_workdir(
    skimage_folders, tmp_path, monkeypatch):
  """A model that failed to build left an empty checkpoints/ and
  checkpoints.lock behind: it is now built (abstractly) before the
  checkpoint manager, and the folders this run made are removed."""
  def broken(config, rng):
    raise ValueError("cannot build this model")
  monkeypatch.setattr(sr_train, "create_train_state", broken)
  with pytest.raises(ValueError, match="cannot build this model"):
    sr_train.train_and_evaluate(_smoke_config(*skimage_folders),
                                tmp_path / "runs" / "first")
  assert not (tmp_path / "runs").exists()


def test_sr_learning_rate_schedule_and_optimizer():
  """EDSR's step decay (a staircase, not a continuous decay); Adam with the
  config's b1, b2, eps; the adaptive learning rate on the adder filters
  only (`optim.adder_mask`)."""
  import optax  # pylint: disable=g-import-not-at-top
  config = _smoke_config("unused", "unused")
  config.learning_rate = 1e-3
  config.lr_decay_steps, config.lr_decay_factor = 10, 0.5
  schedule = sr_train.learning_rate_schedule(config)
  assert [float(schedule(s)) for s in (0, 9, 10, 19, 20, 35)] == (
      pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 1.25e-4], rel=1e-6))
  config.lr_decay_steps = 0
  assert float(sr_train.learning_rate_schedule(config)(10**6)) == (
      pytest.approx(1e-3))

  config.adam_b1, config.adam_b2, config.adam_eps = 0.8, 0.95, 1e-6
  rng = np.random.default_rng(10)
  shape = (3, 3, 2, 2)
  params = {"conv": {"adder_kernel": jnp.ones(shape)},
            "head": {"kernel": jnp.ones(shape)}}
  # Gradients of very different sizes: Adam alone is not invariant to that
  # over several steps, the adaptive rate (a fixed norm per step) is.
  grads = [jax.tree.map(lambda _: jnp.asarray(
      rng.normal(size=shape) * size, jnp.float32), params)
           for size in (1.0, 30.0, 0.1)]

  def updates(tx):
    opt_state, out = tx.init(params), []
    for g in grads:
      u, opt_state = tx.update(g, opt_state, params)
      out.append(u)
    return out

  plain = updates(optax.adam(1e-3, b1=0.8, b2=0.95, eps=1e-6))
  for adaptive in (False, True):
    config.adaptive_lr = adaptive
    got = updates(sr_train.make_optimizer(config))
    for u, want in zip(got, plain):
      np.testing.assert_allclose(u["head"]["kernel"], want["head"]["kernel"],
                                 rtol=1e-5, atol=1e-9)
    adder_same = all(np.allclose(u["conv"]["adder_kernel"],
                                 w["conv"]["adder_kernel"], rtol=1e-5,
                                 atol=1e-9) for u, w in zip(got, plain))
    assert adder_same == (not adaptive)


def test_sr_train_step_takes_the_mean_l1_loss_and_keeps_batch_statistics(
    skimage_folders):
  """One step of make_train_step: the loss is mean |out - hr| of the
  training-mode output, and the new state holds that pass's BatchNorm
  statistics (what evaluation then uses)."""
  config = _smoke_config(*skimage_folders)
  state = sr_train.create_train_state(config, jax.random.PRNGKey(0))
  rng = np.random.default_rng(11)
  lr = rng.random((8, 8, 8, 3), np.float32)
  hr = rng.random((8, 16, 16, 3), np.float32)
  mesh = parallel.make_mesh()
  batch = parallel.global_batch_from_local({"lr": lr, "hr": hr}, mesh)
  new_state, m = sr_train.make_train_step(mesh)(state, batch["lr"],
                                                batch["hr"])
  model = sr_train.build_model(config, bn_axis_name=None)
  out, updates = jax.jit(functools.partial(
      model.apply, train=True, mutable=["batch_stats"]))(
          {"params": state.params, "batch_stats": state.batch_stats}, lr)
  assert float(m["loss"]) == pytest.approx(
      float(np.mean(np.abs(np.asarray(out, np.float64) - hr))), rel=1e-5)
  assert int(new_state.step) == 1
  changed = jax.tree.leaves(jax.tree.map(
      lambda a, b: not np.allclose(a, b), new_state.batch_stats,
      state.batch_stats))
  assert changed and all(changed)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               new_state.batch_stats, updates["batch_stats"])


def test_sr_evaluator_scores_quantised_outputs_with_running_statistics(
    tmp_path):
  """Evaluator.evaluate against the metric computed by hand (scale 3,
  border 3): the network in inference mode (running BatchNorm statistics,
  here far from any image's), quantised to 8 bits, Y-channel PSNR and SSIM
  averaged over the images; the bicubic baseline likewise from the LR
  image."""
  rng = np.random.default_rng(12)
  for name, shape in (("a.png", (36, 42, 3)), ("b.png", (39, 33, 3))):
    _write_png(tmp_path / name, rng.integers(0, 256, shape))
  config = _smoke_config(tmp_path, tmp_path)
  config.scale, config.identity_init = 3, False
  images = sr_train.load_eval_images(config)
  model = sr_train.build_model(config, bn_axis_name=None)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)),
                         train=False)
  stats = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 if "mean" in jax.tree_util.keystr(path)
      else x * 4.0, variables["batch_stats"])
  result = sr_train.Evaluator(config, images).evaluate(variables["params"],
                                                       stats)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  resize = jax.jit(lambda x, size: jax.image.resize(
      x, (1, *size, 3), method="bicubic", antialias=True), static_argnums=1)
  weights = np.array([65.481, 128.553, 24.966]) / 255

  def scores(out, hr):  # out in [0, 1], hr uint8
    out8 = np.clip(np.round(np.asarray(out, np.float64) * 255), 0, 255)
    a = (16 + out8 @ weights)[3:-3, 3:-3]
    b = (16 + hr.astype(np.float64) @ weights)[3:-3, 3:-3]
    return (10 * np.log10(255**2 / np.mean((a - b) ** 2)),
            skmetrics.structural_similarity(a, b, **SK_SSIM))

  net, bicubic = [], []
  for lr, hr in zip(images.lr, images.hr):
    x = jnp.asarray(lr[None] / 255.0, jnp.float32)
    net.append(scores(apply({"params": variables["params"],
                             "batch_stats": stats}, x)[0], hr))
    bicubic.append(scores(resize(x, hr.shape[:2])[0], hr))
  assert result["num_images"] == 2
  want = {"psnr": np.mean([s[0] for s in net]),
          "ssim": np.mean([s[1] for s in net]),
          "bicubic_psnr": np.mean([s[0] for s in bicubic]),
          "bicubic_ssim": np.mean([s[1] for s in bicubic])}
  for key, value in want.items():
    assert result[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_sr_loop_cadences_logged_rate_and_an_exact_resume(skimage_folders,
                                                          tmp_path):
  """checkpoint_every_steps, eval_every_steps (-1: every epoch) and
  eval_max_images are obeyed
  (the smoke config's checkpoint_every_steps = steps_per_epoch = 2 hid the
  first two); the logged lr is the one the step used; a run stopped at step
  2 and resumed ends where an uninterrupted one does (resumed steps draw
  their own step's batch); rerunning a finished run still reports its
  training loss; resuming with another seed is refused."""
  def config(**fields):
    c = _smoke_config(*skimage_folders)
    c.num_train_steps, c.steps_per_epoch = 6, 3
    c.checkpoint_every_steps, c.max_checkpoints_to_keep = 2, 10
    c.eval_every_steps, c.eval_max_images = 4, 1
    c.learning_rate, c.lr_decay_steps, c.lr_decay_factor = 1e-3, 2, 0.5
    c.update(fields)
    return c

  straight = train_lib.train_and_evaluate(config(), tmp_path / "a")
  records = [json.loads(l) for l in
             (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert sorted(int(p.name) for p in (tmp_path / "a" / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4, 6]
  evals = [r for r in records if "eval_psnr" in r]
  assert [r["step"] for r in evals] == [4, 6]
  assert [r["eval_num_images"] for r in evals] == [1, 1]
  # Step s (from 1) ran with lr(s - 1): halved after steps 2 and 4.
  assert {r["step"]: r["lr"] for r in records if "lr" in r} == pytest.approx(
      {1: 1e-3, 2: 1e-3, 3: 5e-4, 4: 5e-4, 5: 2.5e-4, 6: 2.5e-4})

  again = train_lib.train_and_evaluate(config(), tmp_path / "a")
  assert again["step"] == 6 and again["train_loss"] == pytest.approx(
      straight["train_loss"])
  with pytest.raises(ValueError, match="seed 0 in the checkpoint, 1 in the "
                     "config"):
    train_lib.train_and_evaluate(config(seed=1), tmp_path / "a")

  # -1 is every epoch, as for checkpoint_every_steps (it evaluated after
  # every step: `s % -1 == 0`).
  train_lib.train_and_evaluate(config(eval_every_steps=-1), tmp_path / "c")
  assert [json.loads(l)["step"] for l in
          (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()
          if "eval_psnr" in json.loads(l)] == [3, 6]

  train_lib.train_and_evaluate(config(num_train_steps=2), tmp_path / "b")
  resumed = train_lib.train_and_evaluate(config(), tmp_path / "b")
  assert resumed["step"] == 6
  assert resumed["eval_psnr"] == pytest.approx(straight["eval_psnr"],
                                               abs=1e-6)
  assert resumed["train_loss"] == pytest.approx(straight["train_loss"],
                                                rel=1e-6)


_SR_STEP_ON_TWO_DEVICES = """
import sys
import jax, numpy as np
from addernet_jax import parallel
from addernet_jax.sr import train as sr_train
from configs import sr_smoke
assert jax.device_count() == 2, jax.devices()
config = sr_smoke.get_config()
config.identity_init = False  # every adder filter gets a gradient
state = sr_train.create_train_state(config, jax.random.PRNGKey(0))
rng = np.random.default_rng(0)
lr = rng.random((8, 8, 8, 3), np.float32)
hr = rng.random((8, 16, 16, 3), np.float32)
runs = []
for devices in (jax.devices()[:1], jax.devices()):
  mesh = parallel.make_mesh(devices)
  s = jax.device_put(state, parallel.replicated_sharding(mesh))
  b = parallel.global_batch_from_local({"lr": lr, "hr": hr}, mesh)
  new, m = sr_train.make_train_step(mesh)(s, b["lr"], b["hr"])
  leaves = jax.tree.leaves(jax.device_get((new.params, new.batch_stats)))
  runs.append((float(m["loss"]), np.concatenate([np.ravel(x) for x in leaves])))
(loss1, p1), (loss2, p2) = runs
# Adam's first step is about lr * sign(gradient): a gradient of one device's
# half batch flips a large share of the entries; reduction-order rounding
# may flip the rare ones near 0.
far = float(np.mean(~np.isclose(p2, p1, rtol=1e-4, atol=1e-6)))
print("RESULT", loss1, loss2, far)
"""


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_sr_train_step_on_two_devices_is_the_one_device_step():
  """The sharded step averages the loss, gradients and BatchNorm statistics
  over the mesh: on 2 devices it takes the 1-device step (the tests ran on
  one device only, where a missing pmean changes nothing)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                 "PYTHONPATH", ""),
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
             + " --xla_force_host_platform_device_count=2")
  result = subprocess.run([sys.executable, "-c", _SR_STEP_ON_TWO_DEVICES],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")][-1]
  loss1, loss2, far = map(float, line.split()[1:])
  assert loss2 == pytest.approx(loss1, rel=1e-5)
  assert far < 0.01, far


def test_sr_image_size_limits_for_training_and_evaluation(
    skimage_folders, tmp_path, monkeypatch):
  """Evaluation images must leave the 11x11 SSIM window after the `scale`
  pixels cropped per border (refused when read, not by SSIM after the
  training); training images need only an LR side of `patch_size`."""
  config = _smoke_config(*skimage_folders)
  for scale, fits, too_small in ((2, 16, 14), (4, 20, 16)):
    config.scale = scale
    for side, ok in ((fits, True), (too_small, False)):
      folder = tmp_path / f"eval_{scale}_{side}"
      folder.mkdir()
      _write_png(folder / "a.png", np.full((side, side, 3), 128))
      config.eval_data_dir = str(folder)
      if ok:
        assert len(sr_train.load_eval_images(config).hr) == 1
      else:
        with pytest.raises(ValueError, match="too small"):
          sr_train.load_eval_images(config)

  # A training image whose LR side is exactly patch_size (8 at x2) is used:
  # the loop gets past loading the data (stopped right after it here).
  train = tmp_path / "train"
  train.mkdir()
  _write_png(train / "a.png", np.random.default_rng(13).integers(
      0, 256, (16, 16, 3)))
  config = _smoke_config(train, skimage_folders[1])

  def stop(*args, **kwargs):
    raise RuntimeError("data loaded")

  monkeypatch.setattr(sr_train, "make_train_step", stop)
  with pytest.raises(RuntimeError, match="data loaded"):
    train_lib.train_and_evaluate(config, tmp_path / "run")


def test_sr_evaluate_checkpoint_validates_the_config_first(tmp_path):
  """evaluate_checkpoint names a bad model key as train.py does, before it
  looks for images or checkpoints."""
  for field, value in (("model", "srcnn"), ("scale", 5), ("colors", 2)):
    bad = _smoke_config(tmp_path / "no_train", tmp_path / "no_eval")
    bad[field] = value
    with pytest.raises(ValueError, match=f"config.{field} must be"):
      train_lib.evaluate_checkpoint(bad, tmp_path / "no_run")


def test_sr_evaluate_checkpoint_reads_the_step_asked_for(skimage_folders,
                                                         tmp_path):
  """--which=best is the step with the highest eval_psnr even when it is not
  the latest (in the end-to-end test the best step may be the latest one,
  and a `which` ignored went unseen)."""
  config = _smoke_config(*skimage_folders)
  state = sr_train.create_train_state(config, jax.random.PRNGKey(0))
  mgr = ckpt_lib.CheckpointManager(tmp_path / "checkpoints", max_to_keep=3,
                                   best_metric=sr_train.BEST_METRIC)
  for step, psnr in ((2, 30.0), (4, 20.0)):
    meta = {"step": step, "epoch": step / 2, "train_loss": 0.1,
            **sr_train.run_identity(config)}
    mgr.save(step, state.replace(step=jnp.int32(step)), meta,
             metrics={"eval_psnr": psnr}, force=True)
  mgr.wait_until_finished()
  mgr.close()
  for which, step in (("best", 2), ("latest", 4)):
    result = train_lib.evaluate_checkpoint(config, tmp_path, which=which)
    assert (result["which"], result["step"]) == (which, step)


# From a mutation audit: the SR data pipeline's options and the models'
# mean shift, skips and checks.


def _png(path, array, mode=None):
  Image.fromarray(np.asarray(array, np.uint8), mode).save(path)


def test_bicubic_downscale_refuses_sides_that_do_not_divide():
  rng = np.random.default_rng(3)
  for shape in ((12, 13, 3), (13, 12, 3)):
    with pytest.raises(ValueError, match=r"does not divide by scale 2"):
      sr_data.bicubic_downscale(rng.integers(0, 256, shape, np.uint8), 2)


def test_image_folder_options_and_file_kinds(tmp_path):
  """max_images keeps the first files by name; upper-case suffixes count;
  a grey or palette image is read as RGB; min_lr_size is inclusive; the
  scale is 2, 3 or 4."""
  rng = np.random.default_rng(4)
  _png(tmp_path / "b.PNG", rng.integers(0, 256, (14, 19, 3)))
  grey = rng.integers(0, 256, (17, 16))
  _png(tmp_path / "a.png", grey, "L")
  (tmp_path / "c.png").mkdir()  # a folder named like an image is skipped
  ds = sr_data.ImageFolderSR(tmp_path, 2)
  assert [p.name for p in ds.paths] == ["a.png", "b.PNG"]
  assert ds.hr[0].shape == (16, 16, 3)
  for channel in range(3):
    np.testing.assert_array_equal(ds.hr[0][..., channel], grey[:16, :16])
  one = sr_data.ImageFolderSR(tmp_path, 2, max_images=1)
  assert [p.name for p in one.paths] == ["a.png"] and len(one) == 1
  assert len(sr_data.ImageFolderSR(tmp_path, 2, min_lr_size=7)) == 2
  with pytest.raises(ValueError, match=r"b\.PNG.*LR image is 7x9, smaller "
                     r"than 8x8"):
    sr_data.ImageFolderSR(tmp_path, 2, min_lr_size=8)
  for scale in (1, 5):
    with pytest.raises(ValueError, match="scale must be 2, 3 or 4"):
      sr_data.ImageFolderSR(tmp_path, scale)


def test_patches_come_from_every_image(tmp_path):
  """Each image of the folder is drawn (told apart by HR values that only
  it has)."""
  rng = np.random.default_rng(5)
  _png(tmp_path / "a.png", rng.integers(0, 100, (18, 22, 3)))
  _png(tmp_path / "b.png", rng.integers(100, 180, (22, 18, 3)))
  _png(tmp_path / "c.png", rng.integers(180, 256, (20, 20, 3)))
  ds = sr_data.ImageFolderSR(tmp_path, 2, min_lr_size=3)
  _, hr = sr_data.sample_batch(ds, 40, 3, seed=1, step=2)
  source = {int(np.digitize(patch.mean(), [100, 180])) for patch in hr}
  assert source == {0, 1, 2}, source


def test_augment_pair_is_the_same_dihedral_transform_of_both():
  """hflip (columns reversed), vflip (rows reversed), then transpose, on
  the LR and HR patch alike: the 8 transforms are all different."""
  rng = np.random.default_rng(14)
  lr = rng.integers(0, 256, (4, 4, 3), np.uint8)
  hr = rng.integers(0, 256, (12, 12, 3), np.uint8)
  seen = set()
  for h, v, t in itertools.product((False, True), repeat=3):
    got_lr, got_hr = sr_data.augment_pair(lr, hr, h, v, t)
    for got, x in ((got_lr, lr), (got_hr, hr)):
      want = x[:, ::-1] if h else x
      want = want[::-1] if v else want
      want = want.transpose(1, 0, 2) if t else want
      np.testing.assert_array_equal(got, want)
    seen.add(got_lr.tobytes())
  assert len(seen) == 8


def test_model_input_scales_rgb_and_y_to_unit_range():
  rng = np.random.default_rng(6)
  rgb = rng.integers(0, 256, (2, 5, 7, 3), np.uint8)
  x = sr_data.to_model_input(rgb, 3)
  assert x.dtype == np.float32 and x.shape == rgb.shape
  np.testing.assert_allclose(x, rgb / 255.0, rtol=1e-6)
  y = sr_data.to_model_input(rgb, 1)
  assert y.dtype == np.float32 and y.shape == (2, 5, 7, 1)
  np.testing.assert_allclose(y[..., 0], metrics.rgb_to_y(rgb) / 255.0,
                             rtol=1e-6)
  assert np.all((y >= 16 / 255 - 1e-6) & (y <= 235 / 255 + 1e-6))
  with pytest.raises(ValueError, match="colors must be 1 or 3"):
    sr_data.to_model_input(rgb, 2)


def _quick_variables(net, x, seed):
  """Variables of `net` for `x` without running its init (seconds of
  eager random-number ops): kernels N(0, 0.3^2), biases 0 as at init."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: net.init(jax.random.key(0), x,
                                             train=False))
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: (jnp.zeros(leaf.shape, leaf.dtype)
                          if path[-1].key == "bias" else jnp.asarray(
                              rng.normal(0, 0.3, leaf.shape), leaf.dtype)),
      abstract)


def test_edsr_subtracts_and_adds_back_the_mean():
  """An image equal to the mean is 0 after the sub-mean, which every
  bias-free-at-init mult convolution keeps at 0: the output is the mean
  (RGB: DIV2K's; one channel: 0.5)."""
  for colors, mean in ((3, sr_models.DIV2K_RGB_MEAN), (1, (0.5,))):
    net = models.get_sr_model("edsr_baseline", scale=3, conv="mult",
                              colors=colors, num_blocks=0, features=3)
    x = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (2, 4, 6, colors))
    v = _quick_variables(net, x, 7)
    out = net.apply(v, x, train=False)
    assert out.shape == (2, 12, 18, colors)
    np.testing.assert_allclose(out, np.broadcast_to(mean, out.shape),
                               atol=1e-6)
    # ...and a random image is not mapped to the mean.
    noisy = x + np.random.default_rng(8).normal(0, 0.1, x.shape).astype(
        np.float32)
    assert float(jnp.ptp(net.apply(v, noisy, train=False),
                         axis=(0, 1, 2)).min()) > 1e-3


def test_edsr_res_scale_and_the_long_skip():
  """res_scale multiplies each block's branch (0: the network without
  blocks); the body's output is added to the head's (with the body's last
  convolution zeroed, the upsampler still sees the head's features)."""
  net = models.get_sr_model("edsr_baseline", scale=2, conv="mult",
                            num_blocks=1, features=4)
  bare = models.get_sr_model("edsr_baseline", scale=2, conv="mult",
                             num_blocks=0, features=4)
  x = np.random.default_rng(9).uniform(size=(2, 5, 3, 3)).astype(np.float32)
  v = _quick_variables(net, x, 10)
  kept = {k: p for k, p in v["params"].items() if not k.startswith("block")}
  want = bare.apply({"params": kept}, x, train=False)
  got = net.clone(res_scale=0.0).apply(v, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert not np.allclose(net.apply(v, x, train=False), want, atol=1e-4)
  zeroed = dict(kept, body_end=jax.tree.map(jnp.zeros_like, kept["body_end"]))
  out = bare.apply({"params": zeroed}, x, train=False)
  # not the constant mean of a lost skip (per channel: the means differ)
  assert float(jnp.ptp(out, axis=(0, 1, 2)).min()) > 1e-3


def _keys_cubic(t, a=-0.5):
  t = np.abs(t)
  return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                  np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a,
                           0.0))


def test_vdsr_adds_its_output_to_the_bicubic_upscaled_input():
  """With the tail zeroed VDSR returns the bicubic (Keys, a = -0.5)
  upscaled input: checked against a NumPy interpolation away from the
  borders."""
  s = 3
  net = models.get_sr_model("vdsr", scale=s, conv="mult", depth=3,
                            features=4)
  x = np.random.default_rng(11).uniform(size=(1, 9, 11, 1)).astype(
      np.float32)
  v = _quick_variables(net, x, 12)
  params = dict(v["params"])
  params["tail"] = jax.tree.map(jnp.zeros_like, params["tail"])
  out = np.asarray(net.apply({"params": params}, x, train=False))[0, ..., 0]
  xs = np.asarray(x[0, ..., 0], np.float64)

  def weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for o in range(n_out):
      centre = (o + 0.5) / s - 0.5
      for i in range(int(np.floor(centre)) - 1, int(np.floor(centre)) + 3):
        if 0 <= i < n_in:
          w[o, i] = _keys_cubic(centre - i)
    return w
  want = weights(9, 27) @ xs @ weights(11, 33).T
  inner = np.s_[2 * s:-2 * s, 2 * s:-2 * s]
  np.testing.assert_allclose(out[inner], want[inner], atol=1e-5)
  assert out.shape == (27, 33)


def test_sr_unit_and_depth_checks():
  # (A multiplication layer in the adder unit's slot: the checks are the
  # unit's, and it initialises in a fraction of the adder layer's time.)
  conv = functools.partial(nn.Conv, use_bias=False)
  x = np.random.default_rng(13).normal(size=(1, 4, 5, 6)).astype(np.float32)
  with pytest.raises(ValueError, match=r"self-shortcut needs equal input and "
                     r"output widths, got 6 -> 8"):
    sr_models.AdderUnit(8, conv, adder=True).init(jax.random.key(0), x,
                                                  train=False)
  # identity_init needs the self-shortcut: without it BN starts at scale 1.
  unit = sr_models.AdderUnit(8, conv, adder=True, self_shortcut=False,
                             identity_init=True)
  v = unit.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(v["params"]["bn"]["scale"], np.ones(8))
  with pytest.raises(ValueError, match="VDSR depth must be >= 3, got 2"):
    models.get_sr_model("vdsr", scale=2, depth=2, features=4).init(
        jax.random.key(0), jnp.ones((1, 4, 4, 1)), train=False)
