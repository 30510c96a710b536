"""PyTorch checkpoint conversion: parity with the official model, safety of
the torch-free reader against malicious pickles, both file formats."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import traverse_util
import numpy as np
import pytest

from addernet_jax import convert, torch_pickle
from addernet_jax.models import get_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OFFICIAL = SHARED / "official-resnet20"
CIFAR_MEAN = np.array((0.4914, 0.4822, 0.4465))
CIFAR_STD = np.array((0.2023, 0.1994, 0.2010))


def _official(name: str) -> Path:
  path = OFFICIAL / name
  if not path.is_file():
    pytest.skip(f"{path} is absent (the shared real-data folder sits beside "
                f"a developer checkout, not in a user's clone)")
  return path


@pytest.fixture(scope="module")
def official_variables():
  return convert.load_torch_checkpoint(_official("ResNet20-AdderNet.pth"),
                                       "resnet20")


@pytest.fixture(scope="module")
def official_state_dict():
  return torch_pickle.load(_official("ResNet20-AdderNet.pth"))


def _normalise(images_uint8: np.ndarray) -> np.ndarray:
  return ((images_uint8 / 255.0 - CIFAR_MEAN) / CIFAR_STD).astype(np.float32)


# ---------------------------------------------------------------- parity --

def test_official_checkpoint_layout(official_state_dict, official_variables):
  assert len(official_state_dict) == 132
  assert all(k.startswith("module.") for k in official_state_dict)
  assert convert.infer_model_kwargs(official_variables) == {
      "num_classes": 10, "conv": "adder"}
  params = official_variables["params"]
  w = official_state_dict["module.layer2.0.conv1.adder"]  # OIHW (32,16,3,3)
  # HWIO[i, j, c, o] == OIHW[o, c, i, j], checked element by element.
  got = np.asarray(params["layer2_0"]["conv1"]["adder_kernel"])
  assert got.shape == (3, 3, 16, 32)
  assert got[2, 0, 5, 31] == w[31, 5, 2, 0]
  assert got[1, 2, 15, 3] == w[3, 15, 1, 2]
  fc = official_state_dict["module.fc.weight"]
  np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"])[0, 0],
                                fc[:, :, 0, 0].T)
  np.testing.assert_array_equal(
      np.asarray(official_variables["batch_stats"]["bn2"]["var"]),
      official_state_dict["module.bn2.running_var"])


def test_official_golden_activations(official_variables):
  """Stage by stage against the official float64 activations (8 images):
  padding, stride and layout conventions all show up here."""
  golden = np.load(_official("golden_activations_first8.npz"))
  x = _normalise(golden["input_uint8_nhwc"])
  np.testing.assert_allclose(
      x, np.transpose(golden["input_normalized_nchw"], (0, 2, 3, 1)),
      atol=1e-6)
  model = get_model("resnet20", num_classes=10)

  @jax.jit
  def run(variables, x):
    logits, state = model.apply(variables, x, train=False,
                                capture_intermediates=True,
                                mutable=["intermediates"])
    inter = state["intermediates"]
    layer3 = inter["layer3_2"]["__call__"][0]
    return {
        "stem": jax.nn.relu(inter["bn1"]["__call__"][0]),
        "layer1.0.conv1_adder_raw": inter["layer1_0"]["conv1"]["__call__"][0],
        "layer1": inter["layer1_2"]["__call__"][0],
        "layer2": inter["layer2_2"]["__call__"][0],
        "layer3": layer3,
        "avgpool": layer3.mean(axis=(1, 2), keepdims=True),
        "logits": logits,
    }

  ours = run(official_variables, x)
  for stage, got in ours.items():
    want = golden[stage]
    if want.ndim == 4:
      want = np.transpose(want, (0, 2, 3, 1))  # NCHW -> NHWC
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, stage
    scale = max(np.abs(want).max(), 1.0)
    rel_l2 = np.linalg.norm(got - want) / np.linalg.norm(want)
    print(f"{stage}: max abs diff {np.abs(got - want).max():.3g} "
          f"(scale {scale:.3g}), relative L2 {rel_l2:.3g}")
    # float32 against float64 through up to 19 layers (measured: relative
    # L2 <= 4e-4, max abs <= 3e-4 * scale; the official float32
    # logits are themselves 3e-3 from float64); a padding, stride or layout
    # slip gives differences of order one.
    assert rel_l2 < 1e-3, stage
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale,
                               err_msg=stage)
  assert np.abs(np.asarray(ours["logits"]) - golden["logits"]).max() < 5e-3


@pytest.mark.slow
def test_official_logits_297(official_variables):
  """The converted model reproduces the official PyTorch logits on 297 real
  lossless CIFAR-10 test images (about 40 s on a 2-core CPU)."""
  data = np.load(_official("cifar10_test_lossless_297.npz"))
  model = get_model("resnet20", num_classes=10)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = _normalise(data["images"])
  logits = np.concatenate([np.asarray(apply(official_variables, x[i:i + 99]))
                           for i in range(0, len(x), 99)])
  official = data["official_logits"]
  assert logits.shape == official.shape == (297, 10)
  np.testing.assert_array_equal(logits.argmax(1), official.argmax(1))
  # The official logits are float32 GPU results ~3e-3 from float64 themselves.
  assert np.abs(logits - official).max() < 1e-2
  assert int((logits.argmax(1) == data["labels"]).sum()) == 269


def test_bfloat16_model_keeps_the_official_top_class(official_variables):
  """dtype=bfloat16 applies to the multiplication layers, BatchNorm outputs
  and activations; adder layers stay float32 (in bfloat16 their outputs,
  in the thousands, lose the spread BatchNorm keeps: on 1,000 CIFAR-10 test
  images top-1 fell from 79.5% to 49.5%)."""
  data = np.load(_official("cifar10_test_lossless_297.npz"))
  model = get_model("resnet20", num_classes=10, dtype=jnp.bfloat16)
  x = _normalise(data["images"][:99])
  logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      official_variables, x), np.float32)
  agree = (logits.argmax(1) == data["official_logits"][:99].argmax(1)).mean()
  assert agree >= 0.95, agree


# --------------------------------------------------- a torch-free writer --
# Emits exactly what torch.save emits (the same globals and persistent ids),
# so both containers are tested where torch is not installed.

class _Global:
  """Pickled as GLOBAL `module name` (no import needed to write it)."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # save_reduce insists on a callable
    raise AssertionError("never called")


_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage",
                  np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage",
                  np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
                  np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage",
                  np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


class _FakeStorage:
  def __init__(self, key: str, flat: np.ndarray):
    self.key, self.flat = key, flat


class _FakeTensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, tuple(size), tuple(stride))

  def __reduce__(self):
    return (_Global("torch._utils", "_rebuild_tensor_v2"),
            self.args + (False, collections.OrderedDict()))


class _TorchLikePickler(pickle._Pickler):  # pure-Python pickler: hookable
  dispatch = pickle._Pickler.dispatch.copy()

  def __init__(self, file, legacy: bool):
    super().__init__(file, protocol=2)
    self.legacy = legacy

  def _save_fake_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  dispatch[_Global] = _save_fake_global

  def persistent_id(self, obj):
    if not isinstance(obj, _FakeStorage):
      return None
    storage_type = _Global("torch", _STORAGE_NAMES[obj.flat.dtype])
    pid = ("storage", storage_type, obj.key, "cpu", int(obj.flat.size))
    return pid + (None,) if self.legacy else pid


def _fake_tensors(state: dict, storages: list) -> dict:
  """Numpy arrays -> fake tensors, each with its own contiguous storage."""
  out = collections.OrderedDict()
  for name, value in state.items():
    if isinstance(value, dict):
      out[name] = _fake_tensors(value, storages)
      continue
    value = np.array(value, order="C")
    flat = value.reshape(-1)
    storage = _FakeStorage(str(len(storages)), flat)
    storages.append(storage)
    strides = [int(s) // max(value.itemsize, 1)
               for s in value.strides]
    out[name] = _FakeTensor(storage, 0, value.shape, strides)
  return out


def _write_fake(path: Path, obj, storages: list[_FakeStorage], legacy: bool,
                byteorder: str = "little"):
  """A torch.save-format file of `obj` (fake tensors) in either container,
  as saved on a machine of the given byte order."""
  main = io.BytesIO()
  _TorchLikePickler(main, legacy).dump(obj)
  order = "<" if byteorder == "little" else ">"
  if legacy:
    with open(path, "wb") as f:
      for header in (torch_pickle.LEGACY_MAGIC_NUMBER,
                     torch_pickle.LEGACY_PROTOCOL_VERSION,
                     {"protocol_version": 1001,
                      "little_endian": byteorder == "little",
                      "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(header, f, protocol=2)
      f.write(main.getvalue())
      pickle.dump([s.key for s in storages], f, protocol=2)
      for s in storages:
        f.write(struct.pack(order + "q", s.flat.size))
        f.write(s.flat.astype(s.flat.dtype.newbyteorder(order)).tobytes())
  else:
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", main.getvalue())
      z.writestr("archive/byteorder", byteorder)
      z.writestr("archive/version", "3\n")
      for s in storages:
        z.writestr(f"archive/data/{s.key}",
                   s.flat.astype(s.flat.dtype.newbyteorder(order)).tobytes())


def _assert_tree_equal(got, want):
  assert type(got) is type(want) or (isinstance(got, dict)
                                     and isinstance(want, dict))
  if isinstance(want, dict):
    assert list(got) == list(want)
    for key in want:
      _assert_tree_equal(got[key], want[key])
  else:
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


def _random_state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return collections.OrderedDict(
      w=rng.normal(size=(5, 3, 3, 2)).astype(np.float32),
      d=rng.normal(size=(7,)),
      h=rng.normal(size=(2, 3)).astype(np.float16),
      b=rng.normal(size=(3, 1)).astype(ml_dtypes.bfloat16),
      n=np.array(rng.integers(-9, 9)),
      i=rng.integers(0, 255, size=(4, 5)).astype(np.uint8),
      m=rng.random((3, 2)) > 0.5,
      e=np.zeros((0, 3), np.float32),
  )


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_reader_round_trip_without_torch(tmp_path, legacy):
  state = _random_state(1)
  storages: list = []
  path = tmp_path / "fake.pth"
  _write_fake(path, _fake_tensors(state, storages), storages, legacy)
  assert zipfile.is_zipfile(path) != legacy
  _assert_tree_equal(torch_pickle.load(path), state)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_strided_and_shared_storage_views(tmp_path, legacy):
  """A transposed view and an offset slice of one storage, as torch writes
  for non-contiguous tensors that share memory."""
  flat = np.arange(3 * 5, dtype=np.float32) * 0.5 - 2
  storage = _FakeStorage("0", flat)
  obj = collections.OrderedDict(
      t=_FakeTensor(storage, 0, (5, 3), (1, 5)),   # (3,5) transposed
      s=_FakeTensor(storage, 7, (2, 2), (5, 1)),   # a window at offset 7
  )
  path = tmp_path / "views.pth"
  _write_fake(path, obj, [storage], legacy)
  got = torch_pickle.load(path)
  np.testing.assert_array_equal(got["t"], flat.reshape(3, 5).T)
  np.testing.assert_array_equal(got["s"], flat[7:].reshape(-1)[[0, 1, 5, 6]]
                                .reshape(2, 2))
  # A stride that reads past the storage is refused, not read.
  bad = collections.OrderedDict(t=_FakeTensor(storage, 5, (5, 3), (1, 5)))
  _write_fake(path, bad, [storage], legacy)
  with pytest.raises(pickle.UnpicklingError, match="reads element"):
    torch_pickle.load(path)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_a_tensor_ending_one_past_its_storage_is_refused(tmp_path, legacy):
  """The bounds check is exact: a tensor whose last element is one past
  its storage was read (the test above reaches five elements past)."""
  flat = np.arange(15, dtype=np.float32)
  storage = _FakeStorage("0", flat)
  path = tmp_path / "edge.pth"
  ok = collections.OrderedDict(t=_FakeTensor(storage, 0, (5, 3), (1, 5)))
  _write_fake(path, ok, [storage], legacy)
  np.testing.assert_array_equal(torch_pickle.load(path)["t"],
                                flat.reshape(3, 5).T)
  bad = collections.OrderedDict(t=_FakeTensor(storage, 1, (5, 3), (1, 5)))
  _write_fake(path, bad, [storage], legacy)  # last element index 15 of 15
  with pytest.raises(pickle.UnpicklingError, match="reads element 15"):
    torch_pickle.load(path)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_big_endian_checkpoints(tmp_path, legacy):
  """A checkpoint saved on a big-endian machine (byteorder 'big' in a zip,
  little_endian False in a legacy file) reads as the same numbers: only
  little-endian files were tested, so ignoring the byte order passed."""
  values = collections.OrderedDict(
      w=np.linspace(-2, 3, 12, dtype=np.float32).reshape(3, 4),
      n=np.arange(5, dtype=np.int64) - 2)
  storages: list = []
  path = tmp_path / "be.pth"
  _write_fake(path, _fake_tensors(values, storages), storages, legacy,
              byteorder="big")
  got = torch_pickle.load(path)
  for k, v in values.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)


def test_legacy_storage_views(tmp_path):
  """Very old legacy files name a slice of a storage with view_metadata
  (key, offset, numel): a tensor on the view reads the slice, and a view
  reaching past its storage is refused. No test wrote a view."""
  flat = np.arange(10, dtype=np.float32)

  def write(view_offset, view_numel):
    class ViewPickler(_TorchLikePickler):
      def persistent_id(self, obj):
        if not isinstance(obj, _FakeStorage):
          return None
        return ("storage", _Global("torch", "FloatStorage"), "0", "cpu", 10,
                ("v", view_offset, view_numel))

    main = io.BytesIO()
    ViewPickler(main, True).dump(collections.OrderedDict(
        t=_FakeTensor(_FakeStorage("0", flat), 1, (2, 2), (2, 1))))
    path = tmp_path / "view.pth"
    with open(path, "wb") as f:
      for header in (torch_pickle.LEGACY_MAGIC_NUMBER,
                     torch_pickle.LEGACY_PROTOCOL_VERSION,
                     {"little_endian": True}):
        pickle.dump(header, f, protocol=2)
      f.write(main.getvalue())
      pickle.dump(["0"], f, protocol=2)
      f.write(struct.pack("<q", 10) + flat.tobytes())
    return path

  got = torch_pickle.load(write(4, 5))["t"]
  np.testing.assert_array_equal(got, flat[4:9][1:5].reshape(2, 2))
  with pytest.raises(pickle.UnpicklingError,
                     match="storage view outside its storage"):
    torch_pickle.load(write(6, 5))


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_int8_and_int16_storages(tmp_path, legacy, monkeypatch):
  """Char (int8) and Short (int16) storages, the two dtypes of the reader's
  table that no test wrote: reading them as unsigned passed."""
  monkeypatch.setitem(_STORAGE_NAMES, np.dtype(np.int8), "CharStorage")
  monkeypatch.setitem(_STORAGE_NAMES, np.dtype(np.int16), "ShortStorage")
  values = collections.OrderedDict(
      c=np.array([-128, -1, 0, 127], np.int8),
      s=np.array([-32768, -2, 5, 32767], np.int16))
  storages: list = []
  path = tmp_path / "ints.pth"
  _write_fake(path, _fake_tensors(values, storages), storages, legacy)
  got = torch_pickle.load(path)
  for k, v in values.items():
    assert got[k].dtype == v.dtype
    np.testing.assert_array_equal(got[k], v)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_module_prefix_and_wrapper(tmp_path, legacy, official_state_dict,
                                   official_variables):
  """{'state_dict': ...} without 'module.' converts to the same variables."""
  plain = collections.OrderedDict(
      (k[len("module."):], v) for k, v in official_state_dict.items())
  storages: list = []
  path = tmp_path / "wrapped.pth"
  _write_fake(path, {"state_dict": _fake_tensors(plain, storages),
                     "epoch": 399}, storages, legacy)
  variables = convert.load_torch_checkpoint(path, "resnet20")
  jax.tree.map(np.testing.assert_array_equal, variables, official_variables)


# ------------------------------------------------------------------ safety --

class _Payload:
  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


def _malicious_pickles(marker: Path) -> dict[str, bytes]:
  command = f"touch {marker}"
  code = f"open({str(marker)!r}, 'w').write('pwned')"
  return {
      "os.system": pickle.dumps(_Payload(os.system, command), protocol=2),
      "builtins.eval": pickle.dumps(_Payload(eval, code), protocol=2),
      "builtins.exec": pickle.dumps(
          collections.OrderedDict(w=_Payload(exec, code)), protocol=4),
      # A harmless-looking but unlisted global (e.g. a pickled model class).
      "unlisted": pickle.dumps(collections.OrderedDict(
          w=_Payload(collections.Counter, "abc")), protocol=2),
  }


@pytest.mark.parametrize("container", ["legacy", "legacy-first", "zip"])
def test_malicious_pickles_are_refused(tmp_path, container):
  marker = tmp_path / "pwned"
  for label, payload in _malicious_pickles(marker).items():
    path = tmp_path / f"{label}.pth"
    if container == "zip":
      with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
    elif container == "legacy-first":  # payload in place of the magic number
      path.write_bytes(payload)
    else:
      with open(path, "wb") as f:
        pickle.dump(torch_pickle.LEGACY_MAGIC_NUMBER, f, protocol=2)
        pickle.dump(torch_pickle.LEGACY_PROTOCOL_VERSION, f, protocol=2)
        pickle.dump({"little_endian": True}, f, protocol=2)
        f.write(payload)
        pickle.dump([], f, protocol=2)
    with pytest.raises(torch_pickle.UnsafePickleError,
                       match=r"refusing to load .* global"):
      torch_pickle.load(path)
    with pytest.raises(torch_pickle.UnsafePickleError):
      convert.load_torch_checkpoint(path, "resnet20")
    assert not marker.exists(), f"{label} payload ran ({container})"


class _TamperedTensor(_FakeTensor):
  """Rebuilds a valid tensor, then BUILDs a new stride into it."""

  def __reduce__(self):
    func, args = super().__reduce__()
    return func, args, (None, {"stride": (10**9, 1)})


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
def test_state_tampering_and_memory_bombs_are_refused(tmp_path, legacy):
  storage = _FakeStorage("0", np.arange(6, dtype=np.float32))
  path = tmp_path / "tampered.pth"
  _write_fake(path, collections.OrderedDict(
      t=_TamperedTensor(storage, 0, (2, 3), (3, 1))), [storage], legacy)
  with pytest.raises(torch_pickle.UnsafePickleError, match="BUILD"):
    torch_pickle.load(path)
  _write_fake(path, collections.OrderedDict(
      t=_FakeTensor(storage, 0, (10**6, 10**6), (0, 0))), [storage], legacy)
  with pytest.raises(pickle.UnpicklingError, match="expand"):
    torch_pickle.load(path)


def test_refusal_names_the_global(tmp_path):
  path = tmp_path / "evil.pth"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl",
               pickle.dumps(_Payload(os.system, "true"), protocol=2))
  with pytest.raises(torch_pickle.UnsafePickleError) as info:
    torch_pickle.load(path)
  assert f"global {os.system.__module__}.system" in str(info.value)


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "junk.pth"
  path.write_bytes(b"definitely not a pickle")
  with pytest.raises(pickle.UnpicklingError, match="neither"):
    torch_pickle.load(path)
  with pytest.raises(FileNotFoundError):
    torch_pickle.load(tmp_path / "missing.pth")


# ------------------------------------------------------------ bad matches --

def test_wrong_model_name_and_architecture(official_state_dict):
  state = dict(official_state_dict)
  with pytest.raises(ValueError, match="unknown model 'resnet21'"):
    convert.convert_state_dict(state, "resnet21")
  with pytest.raises(ValueError, match="not a resnet18"):
    convert.convert_state_dict(state, "resnet18")
  bad = dict(state)
  bad["module.layer3.0.conv1.adder"] = np.zeros((64, 31, 3, 3), np.float32)
  with pytest.raises(ValueError, match=r"layer3\.0\.conv1\.adder has shape "
                     r"\(64, 31, 3, 3\).*expects \(3, 3, 32, 64\)"):
    convert.convert_state_dict(bad, "resnet20")
  extra = dict(state, **{"module.layer4.0.conv1.adder":
                         np.zeros((1, 1, 1, 1), np.float32)})
  with pytest.raises(ValueError, match="layer4.0.conv1.adder.*no counterpart"):
    convert.convert_state_dict(extra, "resnet20")
  missing = {k: v for k, v in state.items() if "bn2.running_var" not in k
           or "layer" in k}
  with pytest.raises(ValueError, match="batch_stats/bn2/var"):
    convert.convert_state_dict(missing, "resnet20")


def _random_official_state(model_name: str, num_classes: int, conv: str,
                           image_shape: tuple[int, int, int],
                           seed: int = 0) -> dict[str, np.ndarray]:
  """A random state dict in the official names and layouts (OIHW, (O, I))
  for get_model(model_name, num_classes, conv) on `image_shape` images."""
  rng = np.random.default_rng(seed)
  model = get_model(model_name, num_classes=num_classes, conv=conv)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, *image_shape), np.float32)))
  flat = {}
  for collection, tree in abstract.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      module = ".".join(p.replace("downsample_conv", "downsample.0")
                        .replace("downsample_bn", "downsample.1")
                        .replace("_", ".") for p in path[:-1])
      attr = {"kernel": "weight", "adder_kernel": "adder", "scale": "weight",
              "bias": "bias", "mean": "running_mean",
              "var": "running_var"}[path[-1]]
      shape = leaf.shape
      if len(shape) == 4:
        shape = (shape[3], shape[2], shape[0], shape[1])
      elif len(shape) == 2:
        shape = shape[::-1]
      flat[f"{module}.{attr}"] = rng.normal(size=shape).astype(np.float32)
  return flat


def test_num_classes_inferred_and_mult_twin():
  """A random CIFAR-100 ResNet-20 CNN (conv='mult') state dict in official
  names converts onto get_model(..., num_classes=100, conv='mult')."""
  flat = _random_official_state("resnet20", 100, "mult", (32, 32, 3))
  variables = convert.convert_state_dict(flat, "resnet20")
  assert convert.infer_model_kwargs(variables) == {"num_classes": 100,
                                                   "conv": "mult"}
  with pytest.raises(ValueError, match=r"takes a model's variables .* got "
                     r"keys bn1, bn2, conv1, fc, ...$"):  # the params passed: KeyError before
    convert.infer_model_kwargs(variables["params"])
  np.testing.assert_array_equal(
      np.asarray(variables["params"]["layer2_0"]["downsample_conv"]["kernel"]),
      flat["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))


# ------------------------------------------------------- real torch.save --

@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(tmp_path, zip_format):
  torch = pytest.importorskip("torch", reason="torch is not installed (CI "
                              "installs the CPU wheel)")
  gen = torch.Generator().manual_seed(3)
  base = torch.randn(6, 4, generator=gen)
  state = collections.OrderedDict(
      conv=torch.randn(8, 3, 3, 3, generator=gen),
      transposed=base.t(),                       # non-contiguous
      window=base[2:4, 1:3],                     # shares base's storage
      base=base,
      half=torch.randn(5, generator=gen).half(),
      bf16=torch.randn(2, 3, generator=gen).bfloat16(),
      double=torch.randn(3, generator=gen, dtype=torch.float64),
      count=torch.tensor(17),
      flags=torch.tensor([True, False, True]),
  )
  path = tmp_path / "torch.pth"
  torch.save({"state_dict": state}, path,
             _use_new_zipfile_serialization=zip_format)
  got = torch_pickle.load(path)["state_dict"]
  assert list(got) == list(state)
  for name, tensor in state.items():
    want = (tensor.float().numpy().astype(ml_dtypes.bfloat16)
            if tensor.dtype == torch.bfloat16 else tensor.numpy())
    assert got[name].dtype == want.dtype, name
    np.testing.assert_array_equal(got[name], want, err_msg=name)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_saved_official_checkpoint(tmp_path, zip_format,
                                         official_state_dict,
                                         official_variables):
  torch = pytest.importorskip("torch", reason="torch is not installed")
  state = collections.OrderedDict(
      (k, torch.from_numpy(v.copy())) for k, v in official_state_dict.items())
  path = tmp_path / "resaved.pth"
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  variables = convert.load_torch_checkpoint(path, "resnet20")
  jax.tree.map(np.testing.assert_array_equal, variables, official_variables)


# ------------------------------------------------- damaged files, paths --

def _fake_checkpoint(path: Path, legacy: bool) -> int:
  """A small legacy or zip checkpoint at `path`; returns the length of its
  legacy header and main pickle (where the storage key list starts)."""
  state = _random_state(2)
  storages: list = []
  _write_fake(path, _fake_tensors(state, storages), storages, legacy)
  main = io.BytesIO()
  _TorchLikePickler(main, legacy).dump(_fake_tensors(state, []))
  header = io.BytesIO()
  for obj in (torch_pickle.LEGACY_MAGIC_NUMBER,
              torch_pickle.LEGACY_PROTOCOL_VERSION,
              {"protocol_version": 1001, "little_endian": True,
               "type_sizes": {"short": 2, "int": 4, "long": 4}}):
    pickle.dump(obj, header, protocol=2)
  return len(header.getvalue()) + len(main.getvalue())


def test_damaged_zip_checkpoint_is_an_unpickling_error(tmp_path):
  """A flipped byte in a stored record fails the zip's CRC check; the error
  is an UnpicklingError naming the file, not a raw zipfile.BadZipFile."""
  path = tmp_path / "flip.pth"
  _fake_checkpoint(path, legacy=False)
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    info = z.getinfo("archive/data/0")
  # The record's data follows its 30-byte local header and its name.
  offset = info.header_offset + 30 + len(info.filename.encode())
  raw[offset + 3] ^= 0x10
  path.write_bytes(bytes(raw))
  with pytest.raises(pickle.UnpicklingError,
                     match=r"flip\.pth is a damaged or truncated zip-format "
                     r"PyTorch checkpoint \(BadZipFile: Bad CRC-32"):
    torch_pickle.load(path)
  with pytest.raises(pickle.UnpicklingError, match="flip.pth"):
    convert.load_torch_checkpoint(path, "resnet20")


def test_truncated_checkpoints_are_unpickling_errors(tmp_path):
  zip_path = tmp_path / "cut_zip.pth"
  _fake_checkpoint(zip_path, legacy=False)
  raw = zip_path.read_bytes()
  zip_path.write_bytes(raw[:len(raw) // 2])  # the zip directory is gone
  with pytest.raises(pickle.UnpicklingError,
                     match="cut_zip.pth is a damaged or truncated zip-format"):
    torch_pickle.load(zip_path)
  legacy_path = tmp_path / "cut_legacy.pth"
  end_of_main = _fake_checkpoint(legacy_path, legacy=True)
  raw = legacy_path.read_bytes()
  legacy_path.write_bytes(raw[:end_of_main])  # ends before the key list
  with pytest.raises(pickle.UnpicklingError,
                     match=r"cut_legacy.pth is a damaged or truncated "
                     r"legacy-format PyTorch checkpoint \(EOFError"):
    torch_pickle.load(legacy_path)
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(pickle.UnpicklingError, match=r"empty.pth is empty"):
    torch_pickle.load(empty)


def test_load_torch_checkpoint_checks_the_path(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"torch checkpoint '.*missing.pth': no such file"):
    convert.load_torch_checkpoint(tmp_path / "missing.pth", "resnet20")
  folder = tmp_path / "folder.pth"
  folder.mkdir()
  with pytest.raises(ValueError,
                     match=r"folder.pth' is a directory, not a .pth file$"):
    convert.load_torch_checkpoint(folder, "resnet20")
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="is a directory, not a .pth file; it "
                     "looks like a training workdir: pass it with "
                     "--checkpoint"):
    convert.load_torch_checkpoint(workdir, "resnet20")
  # An unset shell variable: "" is the current directory to pathlib.
  with pytest.raises(ValueError, match="torch checkpoint path is an empty "
                     "string"):
    convert.load_torch_checkpoint("", "resnet20")


def test_in_channels_refuses_a_stem_for_other_images():
  """Given the dataset's channels, a stem for 1-channel or permuted input is
  refused with both shapes (otherwise the stem decides the model's input and
  Flax fails later on real images)."""
  state = _random_official_state("resnet20", 10, "adder", (32, 32, 3))
  gray = dict(state, **{"conv1.weight": state["conv1.weight"][:, :1]})
  assert convert.convert_state_dict(gray, "resnet20")[
      "params"]["conv1"]["kernel"].shape == (3, 3, 1, 16)  # None: inferred
  with pytest.raises(ValueError, match=r"conv1\.weight has shape "
                     r"\(16, 1, 3, 3\) .* expects \(3, 3, 3, 16\); this stem "
                     r"filter takes 1-channel images"):
    convert.convert_state_dict(gray, "resnet20", in_channels=3)
  permuted = dict(state, **{
      "conv1.weight": np.ascontiguousarray(
          state["conv1.weight"].transpose(1, 0, 2, 3))})
  with pytest.raises(ValueError, match=r"\(3, 3, 16, 3\)\) but the model "
                     r"expects \(3, 3, 3, 16\)"):
    convert.convert_state_dict(permuted, "resnet20", in_channels=3)
  variables = convert.convert_state_dict(state, "resnet20", in_channels=3)
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)
  with pytest.raises(ValueError, match="in_channels must be a positive int"):
    convert.convert_state_dict(state, "resnet20", in_channels=0)
  # A dataset's shape gives NumPy ints (refused before).
  variables = convert.convert_state_dict(state, "resnet20",
                                         in_channels=np.int64(3))
  assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 3, 16)


def test_load_torch_checkpoint_in_channels(tmp_path):
  state = _random_official_state("lenet5_bn", 10, "adder", (28, 28, 1))
  storages: list = []
  path = tmp_path / "lenet.pth"
  _write_fake(path, _fake_tensors(state, storages), storages, legacy=False)
  variables = convert.load_torch_checkpoint(path, "lenet5_bn", in_channels=1)
  assert variables["params"]["conv1"]["adder_kernel"].shape == (5, 5, 1, 6)
  with pytest.raises(ValueError, match=r"lenet.pth is not a lenet5_bn: "
                     r"conv1\.adder has shape \(6, 1, 5, 5\)"):
    convert.load_torch_checkpoint(path, "lenet5_bn", in_channels=3)


def test_non_numpy_values_are_named():
  with pytest.raises(ValueError, match=r"entry 'conv1.weight' is a list, not "
                     r"a numpy array; the values must be numpy arrays"):
    convert.convert_state_dict({"conv1.weight": [1.0]}, "resnet20")
  torch = pytest.importorskip("torch", reason="torch is not installed")
  with pytest.raises(ValueError, match=r"entry 'module.conv1.weight' is a "
                     r"torch.Tensor, not a numpy array; .*v\.numpy\(\)"):
    convert.convert_state_dict({"module.conv1.weight": torch.zeros(3)},
                               "resnet20")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_non_finite_weights_are_refused(dtype):
  """bfloat16 (a model saved after `.bfloat16()`) is not under np.floating:
  its NaN passed into the converted variables."""
  state = _random_official_state("resnet20", 10, "adder", (32, 32, 3))
  state = {k: v.astype(dtype) for k, v in state.items()}
  key = next(k for k in state if k.endswith("fc.weight"))
  state[key] = state[key].copy()
  state[key].flat[[0, 3]] = [np.nan, np.inf]
  with pytest.raises(ValueError, match=rf"entry '{key}' holds 2 NaN/Inf "
                     r"value\(s\) of \d+; the checkpoint is not usable"):
    convert.convert_state_dict(state, "resnet20")


def test_running_convert_as_a_command_explains_itself(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
  result = subprocess.run(
      [sys.executable, "-m", "addernet_jax.convert", "in.pth", "out.npz"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  err = result.stderr.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert "library module" in err[0] and "--torch_checkpoint" in err[0]
  assert "load_torch_checkpoint" in err[0]
  assert not (tmp_path / "out.npz").exists()


def test_convert_state_dict_takes_jax_arrays():
  """A JAX user's state dict (refused before: 'not a numpy array')."""
  flat = _random_official_state("resnet20", 10, "adder", (32, 32, 3))
  want = convert.convert_state_dict(flat, "resnet20")
  got = convert.convert_state_dict(
      {k: jnp.asarray(v) for k, v in flat.items()}, "resnet20")
  jax.tree.map(np.testing.assert_array_equal, got, want)


def _torch_flattening_model(torch, model_name: str, num_classes: int):
  """LeNet-5-BN or VGG-small (the CNN twin) written in PyTorch with the
  official names, as a PyTorch user's state_dict comes: NCHW maps flattened
  channel first."""
  nn, F = torch.nn, torch.nn.functional

  class LeNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 6, 5, padding=2, bias=False)
      self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
      self.fc1 = nn.Linear(400, 120, bias=False)
      self.fc2 = nn.Linear(120, 84, bias=False)
      self.fc3 = nn.Linear(84, num_classes, bias=False)
      for i, width in enumerate((6, 16), start=1):
        setattr(self, f"bn{i}", nn.BatchNorm2d(width))
      for i, width in enumerate((120, 84, num_classes), start=3):
        setattr(self, f"bn{i}", nn.BatchNorm1d(width))

    def forward(self, x):
      x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
      x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
      x = F.relu(self.bn3(self.fc1(x.flatten(1))))
      x = F.relu(self.bn4(self.fc2(x)))
      return self.bn5(self.fc3(x))

  class VGGSmall(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv0 = nn.Conv2d(3, 128, 3, padding=1, bias=False)
      self.bn0 = nn.BatchNorm2d(128)
      widths, cin = (128, 256, 256, 512, 512), 128
      for i, width in enumerate(widths, start=1):
        setattr(self, f"conv{i}", nn.Conv2d(cin, width, 3, padding=1,
                                            bias=False))
        setattr(self, f"bn{i}", nn.BatchNorm2d(width))
        cin = width
      self.fc = nn.Linear(512 * 4 * 4, num_classes, bias=False)
      self.bn_fc = nn.BatchNorm1d(num_classes)

    def forward(self, x):
      x = F.relu(self.bn0(self.conv0(x)))
      for i in range(1, 6):
        x = getattr(self, f"conv{i}")(x)
        if i % 2:
          x = F.max_pool2d(x, 2)
        x = F.relu(getattr(self, f"bn{i}")(x))
      return self.bn_fc(self.fc(x.flatten(1)))

  return {"lenet5_bn": LeNet, "vgg_small": VGGSmall}[model_name]()


@pytest.mark.parametrize("model_name,image_shape", [
    ("lenet5_bn", (28, 28, 1)), ("vgg_small", (32, 32, 3))])
def test_flattening_models_match_pytorch(model_name, image_shape):
  """A PyTorch state_dict of the models whose classifier reads a flattened
  feature map gives PyTorch's logits: its first linear layer's inputs are
  reordered from PyTorch's (C, H, W) flatten to the models' (H, W, C) (a
  plain transpose gave logits off by about half their size)."""
  torch = pytest.importorskip("torch", reason="torch is not installed (CI "
                              "installs it)")
  torch.manual_seed(0)
  module = _torch_flattening_model(torch, model_name, 10).double().eval()
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith("running_mean") or name.endswith("bias"):
        tensor.copy_(torch.from_numpy(rng.normal(0, 0.1, tensor.shape)))
      elif name.endswith("running_var"):
        tensor.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tensor.shape)))
      elif name.endswith("weight") and tensor.ndim == 1:
        # Scales of both signs: with positive ones, VGG-small pooling after
        # its BatchNorm-ReLU instead of before gave the same logits.
        tensor.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, tensor.shape) *
                                      rng.choice((-1, 1), tensor.shape)))
  state = {k: v.numpy().astype(np.float32)
           for k, v in module.state_dict().items()}
  variables = convert.convert_state_dict(state, model_name)
  images = rng.normal(size=(3, *image_shape))
  with torch.no_grad():
    want = module(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  got = get_model(model_name, num_classes=10, conv="mult").apply(
      variables, jnp.asarray(images, jnp.float32), train=False)
  np.testing.assert_allclose(np.asarray(got, np.float64), want,
                             atol=2e-4 * np.abs(want).max())
  if model_name == "lenet5_bn":  # every layer of its adder twin is adder
    adder = convert.convert_state_dict(
        {(k[:-len("weight")] + "adder" if k.endswith(".weight")
          and v.ndim in (2, 4) else k): v for k, v in state.items()},
        model_name)
    np.testing.assert_array_equal(
        np.asarray(adder["params"]["fc1"]["adder_kernel"]),
        np.asarray(variables["params"]["fc1"]["kernel"]))


def test_a_state_dict_with_and_without_the_module_prefix_is_refused():
  """`conv1.weight` beside `module.conv1.weight`: once 'module.' is stripped
  one would silently replace the other."""
  weight = np.random.default_rng(12).normal(size=(6, 1, 5, 5))
  state = {"conv1.weight": weight.astype(np.float32),
           "module.conv1.weight": (weight + 1).astype(np.float32)}
  with pytest.raises(ValueError, match="duplicate entry 'conv1.weight'"):
    convert.convert_state_dict(state, "lenet5_bn")


def test_the_official_adder_bias_b_maps_to_the_bias():
  """The official adder2d keeps its optional bias as `b`; a BatchNorm weight
  or a linear layer's bias are the other 1-D entries."""
  rng = np.random.default_rng(13)
  b = rng.normal(size=7).astype(np.float32)
  for key, want in (("layer1.0.conv1.b", ("layer1_0", "conv1", "bias")),
                    ("layer1.0.conv1.bias", ("layer1_0", "conv1", "bias")),
                    ("layer1.0.bn1.weight", ("layer1_0", "bn1", "scale"))):
    collection, path, value = convert.torch_key_to_flax(key, b)
    assert (collection, path) == ("params", want), key
    np.testing.assert_array_equal(value, b)
