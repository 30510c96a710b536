"""Official (PyTorch) AdderNet checkpoints -> Flax variables.

`load_torch_checkpoint(path, model_name)` reads a `state_dict` saved by the
official code (or any checkpoint with the official module names) with the safe
torch-free reader `addernet_jax.torch_pickle`, maps every key onto the Flax
model of `addernet_jax.models.get_model` and checks the result against the
model's abstract variables.

Name mapping (the models mirror the official names with '.' -> '_'):
`layer2.0.conv1.adder` -> `params/layer2_0/conv1/adder_kernel`,
`layer2.0.downsample.0.adder` -> `params/layer2_0/downsample_conv/adder_kernel`,
`layer2.0.downsample.1.*` -> `.../downsample_bn`, `conv1.weight` -> `conv1/kernel`,
`fc.weight`/`fc.bias` -> `fc/kernel`/`fc/bias`, BatchNorm `weight`/`bias` ->
`scale`/`bias` (params) and `running_mean`/`running_var` -> `mean`/`var`
(batch_stats); `num_batches_tracked` is dropped.
Layouts: convolution and adder filters OIHW -> HWIO (the 1x1 `fc` conv
included), linear weights (O, I) -> (I, O). The first linear layer after a
flattened feature map (LeNet-5-BN's `fc1`, VGG-small's `fc`) also has its
inputs reordered: PyTorch flattens an NCHW map channel first, (C, H, W), the
Flax models flatten NHWC maps as (H, W, C).
"""

from __future__ import annotations

import functools
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from addernet_jax import layers, torch_pickle
from addernet_jax import models as models_lib

# Spatial size used to trace each model (parameter shapes do not depend on it
# for the ResNets; LeNet-5-BN and VGG-small's classifier do).
_TRACE_HW = {"lenet5_bn": 28, "vgg_small": 32, "resnet18": 64, "resnet34": 64,
             "resnet50": 64, **{n: 32 for n in models_lib.CIFAR_RESNET_DEPTHS}}
_CLASSIFIER = {"lenet5_bn": "fc3"}  # default "fc"
_STEM = {"lenet5_bn": "conv1", "vgg_small": "conv0"}  # default "conv1"
# The linear layer that takes a flattened feature map, and the convolution
# that makes the map (its output channels are the map's).
_FLATTENED_INPUT = {"lenet5_bn": ("fc1", "conv2"), "vgg_small": ("fc", "conv5")}
SUPPORTED_MODELS = tuple(models_lib.MODEL_NAMES)


def _flax_module_path(torch_module: list[str]) -> tuple[str, ...]:
  """['layer2', '0', 'downsample', '1'] -> ('layer2_0', 'downsample_bn')."""
  out, i = [], 0
  while i < len(torch_module):
    part = torch_module[i]
    if i + 1 < len(torch_module) and torch_module[i + 1].isdigit():
      index = torch_module[i + 1]
      if part == "downsample" and index in ("0", "1"):
        out.append("downsample_conv" if index == "0" else "downsample_bn")
      else:
        out.append(f"{part}_{index}")
      i += 2
    else:
      out.append(part)
      i += 1
  return tuple(out)


def torch_key_to_flax(key: str, value: np.ndarray
                      ) -> tuple[str, tuple[str, ...], np.ndarray] | None:
  """Maps one state_dict entry to (collection, Flax path, array in JAX layout).

  Returns None for entries that have no Flax counterpart
  (`num_batches_tracked`). Raises ValueError for unknown attribute names.
  """
  *module, attr = key.split(".")
  path = _flax_module_path(module)
  if attr == "num_batches_tracked":
    return None
  if attr in ("adder", "weight") and value.ndim == 4:
    name = layers.ADDER_KERNEL if attr == "adder" else "kernel"
    return "params", path + (name,), np.transpose(value, (2, 3, 1, 0))
  if attr in ("adder", "weight") and value.ndim == 2:
    name = layers.ADDER_KERNEL if attr == "adder" else "kernel"
    return "params", path + (name,), np.transpose(value)
  if attr == "weight" and value.ndim == 1:
    return "params", path + ("scale",), value
  if attr in ("bias", "b") and value.ndim == 1:
    return "params", path + ("bias",), value
  if attr == "running_mean":
    return "batch_stats", path + ("mean",), value
  if attr == "running_var":
    return "batch_stats", path + ("var",), value
  raise ValueError(
      f"checkpoint entry {key!r} (shape {value.shape}) has no counterpart in "
      f"the Flax models (unknown attribute {attr!r} for its rank)")


def _state_dict(obj: Any, path: str) -> dict[str, np.ndarray]:
  """Unwraps {'state_dict': ...}, strips 'module.', checks every value."""
  if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(
      obj["state_dict"], Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
  state = {}
  for key, value in obj.items():
    if not isinstance(key, str):
      raise ValueError(f"{path}: key {key!r} is a {type(key).__name__}, not "
                       f"a parameter name; not a plain state_dict")
    if isinstance(value, jax.Array):
      value = np.asarray(value)  # a JAX user's arrays: as good as NumPy's
    if not isinstance(value, np.ndarray):
      kind = type(value)
      name = (kind.__qualname__ if kind.__module__ == "builtins"
              else f"{kind.__module__}.{kind.__qualname__}")
      raise ValueError(
          f"{path}: entry {key!r} is a {name}, not a numpy array; the values "
          f"must be numpy arrays (for torch tensors: "
          f"{{k: v.numpy() for k, v in state_dict.items()}})")
    # jnp's dtype tree: bfloat16 (ml_dtypes) is not under np.floating.
    if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(
        value).all():
      raise ValueError(
          f"{path}: entry {key!r} holds {int((~np.isfinite(value)).sum())} "
          f"NaN/Inf value(s) of {value.size}; the checkpoint is not usable")
    name = key[len("module."):] if key.startswith("module.") else key
    if name in state:
      raise ValueError(f"{path}: duplicate entry {name!r} after stripping "
                       f"'module.'")
    state[name] = value
  if not state:
    raise ValueError(f"{path} holds an empty state_dict")
  return state


@functools.lru_cache(maxsize=16)
def _abstract_variables(model_name: str, num_classes: int, conv: str,
                        in_channels: int) -> dict[str, Any]:
  model = models_lib.get_model(model_name, num_classes=num_classes, conv=conv)
  hw = _TRACE_HW.get(model_name, 32)
  shape = (1, hw, hw, in_channels)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model_name: str,
                       source: str = "state_dict", *,
                       in_channels: int | None = None) -> dict[str, Any]:
  """Converts an official-layout state_dict (numpy values) to Flax variables.

  Args:
    state_dict: PyTorch names (with or without 'module.') to numpy arrays.
    model_name: one of `SUPPORTED_MODELS`.
    source: how to name the input in error messages.
    in_channels: the channels of the images the model is for (the dataset's,
      e.g. 3 for CIFAR-10); a stem filter for another number is refused with
      both shapes. None: read from the checkpoint's own stem filter.

  Returns:
    `{"params": ..., "batch_stats": ...}` of float32 jax arrays.

  Raises:
    ValueError: unknown model, or a checkpoint that is not `model_name`
      (missing or unexpected entries, shape mismatches; the first mismatching
      parameter is named with both shapes).
  """
  if model_name not in SUPPORTED_MODELS:
    raise ValueError(f"unknown model {model_name!r}; choose one of "
                     f"{SUPPORTED_MODELS}")
  if in_channels is not None and (not isinstance(in_channels,
                                                 numbers.Integral)
                                  or isinstance(in_channels, bool)
                                  or in_channels < 1):
    raise ValueError(f"in_channels must be a positive int or None, got "
                     f"{in_channels!r}")
  if in_channels is not None:
    in_channels = int(in_channels)  # a NumPy int from a dataset's shape
  state = _state_dict(state_dict, source)
  classifier = _CLASSIFIER.get(model_name, "fc")
  stem = _STEM.get(model_name, "conv1")
  conv = "adder" if any(k.endswith(".adder") for k in state) else "mult"
  head = state.get(f"{classifier}.weight", state.get(f"{classifier}.adder"))
  if head is None or head.ndim < 2:
    raise ValueError(
        f"{source} is not a {model_name}: it has no classifier weight "
        f"'{classifier}.weight' to infer the number of classes from")
  num_classes = int(head.shape[0])
  if in_channels is None:
    stem_weight = state.get(f"{stem}.weight", state.get(f"{stem}.adder"))
    in_channels = (int(stem_weight.shape[1]) if stem_weight is not None
                   and stem_weight.ndim == 4 else
                   (1 if model_name == "lenet5_bn" else 3))
  abstract = _abstract_variables(model_name, num_classes, conv, in_channels)
  expected = {c: traverse_util.flatten_dict(abstract.get(c, {}))
              for c in ("params", "batch_stats")}

  converted: dict[str, dict[tuple[str, ...], np.ndarray]] = {
      "params": {}, "batch_stats": {}}
  flattened, map_conv = _FLATTENED_INPUT.get(model_name, (None, None))
  map_channels = next((int(leaf.shape[-1]) for path, leaf
                       in expected["params"].items()
                       if path[0] == map_conv and len(leaf.shape) == 4), None)
  torch_names: dict[tuple[str, tuple[str, ...]], str] = {}
  for key, value in state.items():
    try:
      mapped = torch_key_to_flax(key, value)
    except ValueError as e:
      raise ValueError(f"{source} is not a {model_name}: {e}") from None
    if mapped is None:
      continue
    collection, path, array = mapped
    if path[0] == flattened and array.ndim == 2:
      array = _channels_last_rows(array, map_channels)
    torch_names[(collection, path)] = key
    where = "/".join(path)
    if path not in expected[collection]:
      raise ValueError(
          f"{source} is not a {model_name} ({conv}): checkpoint entry {key!r} "
          f"({collection}/{where}, shape {tuple(value.shape)}) has no "
          f"counterpart in the model")
    want = tuple(expected[collection][path].shape)
    if tuple(array.shape) != want:
      hint = ""
      if (path[0] == stem and array.ndim == 4 and len(want) == 4
          and array.shape[2] != want[2]):
        hint = (f"; this stem filter takes {array.shape[2]}-channel images, "
                f"the model's input has {want[2]} channels")
      raise ValueError(
          f"{source} is not a {model_name}: {key} has shape "
          f"{tuple(value.shape)} (as {collection}/{where}: "
          f"{tuple(array.shape)}) but the model expects {want}{hint}")
    converted[collection][path] = array
  for collection, wanted in expected.items():
    for path in wanted:
      if path not in converted[collection]:
        raise ValueError(
            f"{source} is not a {model_name} ({conv}): the model needs "
            f"{collection}/{'/'.join(path)} (shape "
            f"{tuple(wanted[path].shape)}), which the checkpoint lacks")
  return {
      collection: traverse_util.unflatten_dict({
          path: jnp.asarray(np.asarray(array, np.float32),
                            dtype=expected[collection][path].dtype)
          for path, array in arrays.items()})
      for collection, arrays in converted.items()}


def _channels_last_rows(kernel: np.ndarray, channels: int) -> np.ndarray:
  """(C*H*W, O) rows in PyTorch's channel-first flatten order -> the
  (H*W*C, O) order of a flattened NHWC map. A row count that is no multiple
  of `channels` is left as it is (the shape check names the mismatch)."""
  rows, out = kernel.shape
  if rows % channels:
    return kernel
  return (kernel.reshape(channels, rows // channels, out)
          .transpose(1, 0, 2).reshape(rows, out))


def _check_checkpoint_file(path: str | os.PathLike) -> Path:
  """`path` (with ~ expanded) if it is a file; clear errors otherwise."""
  if not os.fspath(path).strip():  # Path("") is the current directory
    raise ValueError(f"torch checkpoint path is an empty string "
                     f"({os.fspath(path)!r}); give the .pth file")
  file = Path(path).expanduser()
  if file.is_dir():
    hint = ""
    if (file / "checkpoints").is_dir():
      hint = ("; it looks like a training workdir: pass it with --checkpoint "
              "(figures: --workdirs)")
    raise ValueError(f"torch checkpoint {os.fspath(path)!r} is a directory, "
                     f"not a .pth file{hint}")
  if not file.exists():
    raise FileNotFoundError(
        f"torch checkpoint {os.fspath(path)!r}: no such file")
  return file


def load_torch_checkpoint(path: str | os.PathLike, model_name: str, *,
                          in_channels: int | None = None) -> dict[str, Any]:
  """Loads an official-layout PyTorch checkpoint as Flax variables.

  Reads both PyTorch containers (legacy pre-1.6, as the official release, and
  the zip format) without importing torch, through an allowlist unpickler that
  refuses anything but tensors and plain containers
  (`torch_pickle.UnsafePickleError`). The state_dict may carry the
  `module.` prefix of `nn.DataParallel` and may be wrapped in
  `{"state_dict": ...}`. Whether the model is the AdderNet (`conv="adder"`)
  or its CNN twin is read from the keys (`.adder` filters), the number of
  classes from the classifier.

  Args:
    path: the `.pth` file.
    model_name: one of `addernet_jax.models.MODEL_NAMES`, e.g. "resnet20".
    in_channels: the image channels of the dataset the model is for (e.g. 3
      for CIFAR-10); a checkpoint whose stem filter expects another number is
      refused. None: read from the checkpoint's stem.

  Returns:
    `{"params": ..., "batch_stats": ...}` for
    `get_model(model_name, num_classes=..., conv=...)`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: unknown model name, `path` is a directory, or a checkpoint of
      another architecture (the first mismatching parameter is named with
      both shapes).
    pickle.UnpicklingError: not a readable PyTorch checkpoint (damaged,
      truncated, or not one at all); the message names the file.
    torch_pickle.UnsafePickleError: (an `UnpicklingError`) the file asks for
      a disallowed global.
  """
  if model_name not in SUPPORTED_MODELS:
    raise ValueError(f"unknown model {model_name!r}; choose one of "
                     f"{SUPPORTED_MODELS}")
  file = _check_checkpoint_file(path)
  source = os.fspath(path)
  return convert_state_dict(torch_pickle.load(file), model_name,
                            source=source, in_channels=in_channels)


def infer_model_kwargs(variables: Mapping[str, Any]) -> dict[str, Any]:
  """`num_classes` and `conv` of converted variables, for `get_model`.

  `num_classes` is the size of the classifier ('fc', or LeNet's 'fc3');
  `conv` is "adder" when any parameter is an adder filter, else "mult".
  """
  if not isinstance(variables, Mapping) or "params" not in variables:
    keys = sorted(map(str, variables)) if isinstance(variables,
                                                      Mapping) else None
    found = (type(variables).__name__ if keys is None else
             f"keys {', '.join(keys[:4])}{', ...' if keys[4:] else ''}")
    raise ValueError(f"infer_model_kwargs takes a model's variables (a "
                     f"mapping with 'params', as load_torch_checkpoint "
                     f"returns), got {found}")
  leaves = traverse_util.flatten_dict(dict(variables["params"]))
  conv = ("adder" if any(p[-1] == layers.ADDER_KERNEL for p in leaves)
          else "mult")
  for path, leaf in leaves.items():
    if path[0] in ("fc", "fc3") and path[-1] in ("kernel", layers.ADDER_KERNEL):
      return {"num_classes": int(leaf.shape[-1]), "conv": conv}
  raise ValueError("no classifier kernel ('fc' or 'fc3') in the variables")


if __name__ == "__main__":
  print("error: addernet_jax.convert is a library module, not a command; use "
        "the .pth file with `python eval.py --torch_checkpoint FILE`, "
        "`python -m addernet_jax.export --torch_checkpoint FILE`, or in "
        "Python `convert.load_torch_checkpoint(path, model)`",
        file=sys.stderr)
  sys.exit(2)
