"""Model zoo: parameter counts against hand-derived (PyTorch) figures, shapes,
adder/mult twins, and the layer that the `conv` switch replaces."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import traverse_util

from addernet_jax import layers
from addernet_jax.models import MODEL_NAMES, common, get_model
from addernet_jax.models.resnet_imagenet import (BasicBlock, Bottleneck,
                                                 ImageNetResNet)


def _resnet20_count(num_classes):
  conv = lambda k, cin, cout: k * k * cin * cout
  bn = lambda c: 2 * c
  total = conv(3, 3, 16) + bn(16)
  cin = 16
  for planes in (16, 32, 64):
    for block in range(3):
      total += conv(3, cin, planes) + conv(3, planes, planes) + 2 * bn(planes)
      if cin != planes:
        total += conv(1, cin, planes) + bn(planes)
      cin = planes
  return total + 64 * num_classes + bn(num_classes)


# torchvision's counts for 1000 classes plus the BatchNorm over the logits.
EXPECTED = {
    ("resnet20", 10): _resnet20_count(10),
    ("resnet20", 100): _resnet20_count(100),
    ("resnet18", 1000): 11_689_512 + 2_000,
    ("resnet34", 1000): 21_797_672 + 2_000,
    ("resnet50", 1000): 25_557_032 + 2_000,
    # LeNet-5-BN: 150+2400+48000+10080+840 weights, BN on 6+16+120+84+10.
    ("lenet5_bn", 10): 150 + 2400 + 48000 + 10080 + 840 + 2 * (6 + 16 + 120 + 84 + 10),
}
INPUTS = {"resnet18": (1, 64, 64, 3), "resnet34": (1, 64, 64, 3),
          "resnet50": (1, 64, 64, 3), "lenet5_bn": (2, 28, 28, 1)}


def _deepest_extended(names):
  """The deepest models in the extended step (.ci/run runs them): each
  takes 8-14 s to trace, the same blocks as the shallower ones."""
  return [pytest.param(n, marks=pytest.mark.extended)
          if n in ("resnet44", "resnet56", "resnet50") else n for n in names]


def _abstract_variables(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones(shape), train=False))


@pytest.mark.parametrize("name,num_classes", sorted(EXPECTED))
@pytest.mark.parametrize("conv", ["adder", "mult"])
def test_parameter_count(name, num_classes, conv):
  model = get_model(name, num_classes=num_classes, conv=conv)
  variables = _abstract_variables(model, INPUTS.get(name, (2, 32, 32, 3)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))
  assert count == EXPECTED[(name, num_classes)]


@pytest.mark.parametrize("name", _deepest_extended(MODEL_NAMES))
def test_output_shape_and_collections(name):
  model = get_model(name, num_classes=7)
  shape = INPUTS.get(name, (2, 32, 32, 3))
  variables = _abstract_variables(model, shape)
  assert set(variables) == {"params", "batch_stats"}
  out = jax.eval_shape(
      lambda v: model.apply(v, jnp.ones(shape), train=True,
                            mutable=["batch_stats"]), variables)
  logits, updates = out
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
  assert set(updates) == {"batch_stats"}


def _kernel_names(params):
  return {jax.tree_util.keystr(path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


@pytest.mark.parametrize("name", _deepest_extended(
    ["resnet20", "vgg_small", "lenet5_bn", "resnet50"]))
def test_adder_and_mult_are_twins(name):
  shape = INPUTS.get(name, (2, 32, 32, 3))
  adder = _kernel_names(_abstract_variables(get_model(name, num_classes=10), shape)["params"])
  mult = _kernel_names(_abstract_variables(get_model(name, num_classes=10, conv="mult"), shape)["params"])
  assert sorted(adder.values()) == sorted(mult.values())
  assert {k.replace("adder_kernel", "kernel"): v for k, v in adder.items()} == mult
  n_adder = sum("adder_kernel" in k for k in adder)
  assert n_adder > 0 and not any("adder_kernel" in k for k in mult)


def test_resnet20_layer_kinds():
  params = _abstract_variables(get_model("resnet20", num_classes=10), (1, 32, 32, 3))["params"]
  names = _kernel_names(params)
  # stem and classifier multiply; 18 3x3 adders and 2 1x1 adder shortcuts.
  assert "['conv1']['kernel']" in names and "['fc']['kernel']" in names
  adders = {k: v for k, v in names.items() if "adder_kernel" in k}
  assert len(adders) == 20
  assert sum(v[:2] == (1, 1) for v in adders.values()) == 2
  assert names["['layer2_0']['downsample_conv']['adder_kernel']"] == (1, 1, 16, 32)


def test_lenet_is_all_adders():
  params = _abstract_variables(get_model("lenet5_bn", num_classes=10), (1, 28, 28, 1))["params"]
  kernels = [k for k in _kernel_names(params) if "kernel" in k]
  assert len(kernels) == 5 and all("adder_kernel" in k for k in kernels)


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_forward_values_finite_and_train_differs_from_eval():
  model = get_model("resnet20", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
  eval_logits, train_logits = jax.jit(lambda v, x: (
      model.apply(v, x, train=False),
      model.apply(v, x, train=True, mutable=["batch_stats"])[0]))(variables, x)
  assert np.all(np.isfinite(eval_logits)) and np.all(np.isfinite(train_logits))
  assert not np.allclose(eval_logits, train_logits)


def test_unknown_model_and_conv():
  with pytest.raises(ValueError, match="unknown model 'resnet21'"):
    get_model("resnet21", num_classes=10)
  with pytest.raises(ValueError, match="conv must be one of"):
    get_model("resnet20", num_classes=10, conv="xor")
  with pytest.raises(ValueError, match="num_classes"):
    get_model("resnet20", num_classes=0)


@pytest.mark.parametrize("dtype", ["float31", "int8", jnp.int32, 3])
def test_a_dtype_that_is_not_floating_is_named(dtype):
  """'float31' used to pass get_model and fail at init inside NumPy."""
  for build in (lambda: get_model("resnet20", num_classes=10, dtype=dtype),
                lambda: get_model("vdsr", scale=2, dtype=dtype)):
    with pytest.raises(ValueError, match=f"dtype must be a floating-point "
                       f"type .*got {re.escape(repr(dtype))}"):
      build()
  for dtype in ("bfloat16", jnp.float16, np.float32):
    get_model("resnet20", num_classes=10, dtype=dtype)


def test_float64_is_refused_by_name():
  """Was accepted and silently computed in float32 (without x64), with a
  warning per array."""
  for dtype in (jnp.float64, "float64", np.float64):
    with pytest.raises(ValueError, match="dtype float64 is not supported"):
      get_model("resnet20", num_classes=10, dtype=dtype)


def test_adder_conv_layer_init_is_standard_normal():
  layer = layers.AdderConv(64, (3, 3))
  params = layer.init(jax.random.key(0), jnp.ones((1, 8, 8, 32)))["params"]
  w = np.asarray(params["adder_kernel"])
  assert w.shape == (3, 3, 32, 64)
  assert abs(w.mean()) < 0.05 and abs(w.std() - 1.0) < 0.05


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "vgg_small",
                                  "lenet5_bn"])
@pytest.mark.parametrize("conv", ["adder", "mult"])
def test_non_nhwc_batch_raises_clear_error(name, conv):
  """An unbatched image went into the stem (Flax convs accept it) and failed
  in a later layer (adder), or, with conv="mult", ran through."""
  model = get_model(name, num_classes=10, conv=conv)
  with pytest.raises(ValueError, match=r"input must be a batch of NHWC "
                     r"images \(rank 4\), got shape \(32, 32, 3\)"):
    _abstract_variables(model, (32, 32, 3))


def test_vgg_small_too_small_input_raises_clear_error():
  """Below 8x8 its three max-pools leave no pixel: a ZeroDivisionError from
  the classifier's initialiser."""
  with pytest.raises(ValueError, match=r"VGGSmall: input images must be at "
                     r"least 8x8 \(NHWC\), got shape \(2, 4, 4, 3\)"):
    _abstract_variables(get_model("vgg_small", num_classes=10), (2, 4, 4, 3))
  assert jax.tree.leaves(_abstract_variables(
      get_model("vgg_small", num_classes=10), (1, 8, 8, 3)))


def test_num_classes_numpy_int():
  model = get_model("resnet20", num_classes=np.int64(7))
  assert model.num_classes == 7 and type(model.num_classes) is int
  with pytest.raises(ValueError, match="num_classes"):
    get_model("resnet20", num_classes=True)


@pytest.mark.parametrize("conv", ["adder", "mult"])
def test_imagenet_resnet_init_is_the_official_one(conv):
  """The official ImageNet ResNet runs kaiming_normal_(mode="fan_out") over
  every nn.Conv2d: the stem, the 1x1 classifier (whose bias keeps PyTorch's
  default U(+-1/sqrt(fan_in))) and, in the CNN twin (torchvision's ResNet),
  every layer; adder filters are N(0, 1). One block per stage and the rbg
  generator: the same layers, a quarter of the time of ResNet-18 with the
  default one (14.7 s in CI)."""
  model = get_model("resnet18", num_classes=1000, conv=conv).clone(
      stage_sizes=(1, 1, 1, 1))
  params = jax.jit(lambda x: model.init(
      jax.random.key(1, impl="rbg"), x, train=False))(jnp.ones(
          (1, 32, 32, 3)))["params"]
  fc = params["fc"]
  assert abs(np.std(fc["kernel"]) / np.sqrt(2 / 1000) - 1) < 0.03
  assert abs(np.mean(fc["kernel"])) < 0.01 * np.sqrt(2 / 1000)
  bound = 1 / np.sqrt(512)
  assert np.max(np.abs(fc["bias"])) <= bound
  assert abs(np.std(fc["bias"]) / (bound / np.sqrt(3)) - 1) < 0.1
  stem = params["conv1"]["kernel"]
  assert abs(np.std(stem) / np.sqrt(2 / (7 * 7 * 64)) - 1) < 0.05
  inner = params["layer3_0"]["conv2"]
  if conv == "mult":
    assert abs(np.std(inner["kernel"]) / np.sqrt(2 / (3 * 3 * 256)) - 1) < 0.03
  else:
    assert abs(np.std(inner["adder_kernel"]) - 1) < 0.03


def test_cifar_resnet_init_is_the_official_one():
  """The official CIFAR ResNet-20 keeps PyTorch's default init of its stem
  and its bias-free 1x1 classifier: U(+-1/sqrt(fan_in))."""
  model = get_model("resnet20", num_classes=100)
  params = jax.jit(lambda x: model.init(  # rbg: compiles in half the time
      jax.random.key(1, impl="rbg"), x, train=False))(jnp.ones(
          (1, 32, 32, 3)))["params"]
  bound = 1 / np.sqrt(64)
  fc = np.asarray(params["fc"]["kernel"])
  assert "bias" not in params["fc"]
  assert np.max(np.abs(fc)) <= bound and np.max(np.abs(fc)) > 0.95 * bound
  assert abs(np.std(fc) / (bound / np.sqrt(3)) - 1) < 0.05


def test_lenet_pads_each_side_towards_32():
  """Height and width are padded separately: a 28x24 image meets the same
  5x5x16 features as a 28x28 one (the width was padded by the height's 2)."""
  model = get_model("lenet5_bn", num_classes=10)
  for shape in ((2, 28, 28, 1), (2, 28, 24, 1), (2, 24, 28, 1), (2, 8, 8, 1)):
    variables = _abstract_variables(model, shape)
    assert variables["params"]["fc1"]["adder_kernel"].shape == (400, 120), shape
  # An odd side s gets (32 - s) // 2 zeros on each side: 27 and 29 become 31
  # (4x4 features before fc1, as 31 itself), not 33 (5x5).
  for shape, features in (((2, 27, 29, 1), 4 * 4 * 16),
                          ((2, 31, 28, 1), 4 * 5 * 16)):
    variables = _abstract_variables(model, shape)
    assert variables["params"]["fc1"]["adder_kernel"].shape == (
        features, 120), shape


def _random_variables(model, shape, rng) -> dict:
  """Flat float64 variables of `model` for inputs of `shape`: kernels
  N(0, 1 / fan_in), BatchNorm statistics random, scales of both signs and
  biases random (at init they are 0/1/1/0, where many structural mistakes
  cancel out)."""
  flat = {}
  for path, leaf in traverse_util.flatten_dict(
      _abstract_variables(model, shape)).items():
    if path[-1] == "scale":
      value = rng.uniform(0.5, 1.5, leaf.shape) * rng.choice((-1, 1),
                                                              leaf.shape)
    elif path[-1] in ("bias", "mean"):
      value = rng.normal(0, 0.2, leaf.shape)
    elif path[-1] == "var":
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])),
                         leaf.shape)
    flat[path] = value
  return flat


def _torch_imagenet_resnet(torch, flat, x, stage_sizes, bottleneck):
  """The official ImageNet ResNet (torchvision's layout, the stride on the
  bottleneck's 3x3, a 1x1 convolution as classifier and a BatchNorm over the
  logits) in float64 PyTorch, eval mode, NCHW, from the Flax names."""
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))

  def conv(x, name, stride=1, padding=0):
    kernel = t(flat[("params", *name, "kernel")].transpose(3, 2, 0, 1))
    return F.conv2d(x, kernel, stride=stride, padding=padding)

  def bn(x, *name):
    get = lambda collection, leaf: t(flat[(collection, *name, leaf)])
    return F.batch_norm(x, get("batch_stats", "mean"),
                        get("batch_stats", "var"), get("params", "scale"),
                        get("params", "bias"), False, 0.0, 1e-5)

  x = F.max_pool2d(F.relu(bn(conv(x, ("conv1",), 2, 3), "bn1")), 3, 2, 1)
  for stage, blocks in enumerate(stage_sizes):
    for block in range(blocks):
      name = f"layer{stage + 1}_{block}"
      stride = 2 if stage > 0 and block == 0 else 1
      if bottleneck:
        y = F.relu(bn(conv(x, (name, "conv1")), name, "bn1"))
        y = F.relu(bn(conv(y, (name, "conv2"), stride, 1), name, "bn2"))
        y = bn(conv(y, (name, "conv3")), name, "bn3")
      else:
        y = F.relu(bn(conv(x, (name, "conv1"), stride, 1), name, "bn1"))
        y = bn(conv(y, (name, "conv2"), 1, 1), name, "bn2")
      if ("params", name, "downsample_conv", "kernel") in flat:
        x = bn(conv(x, (name, "downsample_conv"), stride), name,
               "downsample_bn")
      x = F.relu(y + x)
  x = conv(x.mean(dim=(2, 3), keepdim=True), ("fc",))
  x = x + t(flat[("params", "fc", "bias")])[None, :, None, None]
  return bn(x, "bn2").flatten(1)


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck],
                         ids=["basic", "bottleneck"])
def test_imagenet_resnet_matches_a_pytorch_reimplementation(block):
  """The stem (7x7 stride 2 padding 3, max-pool 3/2/1), the stride on the
  bottleneck's 3x3, the ReLUs and the shortcuts of the ImageNet ResNets (CNN
  twin; one block per stage), with random BatchNorm statistics, against
  float64 PyTorch on a 38x43 image (even and odd sides: the padding shows).
  Parameter counts and output shapes see none of these."""
  torch = pytest.importorskip("torch", reason="torch is not installed (CI "
                              "installs it)")
  stages = (1, 1, 1, 1)
  model = ImageNetResNet(stages, block, num_classes=5,
                         conv=common.conv_factory("mult"))
  rng = np.random.default_rng(3)
  images = rng.normal(size=(2, 38, 43, 3))
  flat = _random_variables(model, (1, 38, 43, 3), rng)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32)
                                    for k, v in flat.items()}),
      jnp.asarray(images, jnp.float32))
  with torch.no_grad():
    want = _torch_imagenet_resnet(
        torch, flat, torch.from_numpy(images.transpose(0, 3, 1, 2)), stages,
        block is Bottleneck).numpy()
  assert got.shape == want.shape == (2, 5)
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("name,size,channels",
                         [("resnet20", 32, 3), ("resnet18", 32, 3),
                          ("vgg_small", 32, 3), ("lenet5_bn", 28, 1)])
@pytest.mark.parametrize("conv", ["adder", "mult"])
def test_nchw_batch_is_named(name, size, channels, conv):
  """A PyTorch-layout batch met the first layer's filters as a Flax
  ScopeParamShapeError about a kernel shape."""
  model = get_model(name, num_classes=10, conv=conv)
  variables = _abstract_variables(model, (1, size, size, channels))
  apply = lambda shape: jax.eval_shape(
      lambda v: model.apply(v, jnp.ones(shape), train=False), variables)
  assert apply((2, size, size, channels)).shape == (2, 10)
  with pytest.raises(ValueError, match=(
      rf"input has {size} channels .* parameters are for {channels}, got "
      rf"shape \(2, {channels}, {size}, {size}\); it looks like NCHW: "
      r"transpose it to NHWC with x.transpose\(0, 2, 3, 1\)")):
    apply((2, channels, size, size))
  with pytest.raises(ValueError, match=rf"input has {channels + 1} channels "
                     rf".* are for {channels}, got shape \(2, {size}, {size}, "
                     rf"{channels + 1}\)") as error:
    apply((2, size, size, channels + 1))
  assert "NCHW" not in str(error.value)
  # An empty batch: ZeroDivisionError or IndexError from a reshape before.
  with pytest.raises(ValueError, match=r"the batch is empty, got shape "
                     rf"\(0, {size}, {size}, {channels}\)"):
    apply((0, size, size, channels))
