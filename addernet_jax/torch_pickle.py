"""A safe, torch-free reader for PyTorch checkpoint files.

`load(path)` reads what `torch.save` wrote, in either container:

* the legacy format (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`):
  a pickled magic number, protocol version and system-info record, then the
  main pickle whose storages are persistent ids
  `('storage', storage_type, key, location, numel, view_metadata)`, then a
  pickled list of storage keys, then each storage's raw bytes (an int64
  element count followed by the data) in that order;
* the zip format (PyTorch >= 1.6): `<prefix>/data.pkl` with persistent ids
  `('storage', storage_type, key, location, numel)` and the raw bytes of each
  storage in `<prefix>/data/<key>` (byte order in `<prefix>/byteorder`).

Tensors come back as numpy arrays (bfloat16 through `ml_dtypes`), containers
as the dicts/lists/tuples they were. A checkpoint is untrusted input: the
unpickler only resolves the globals in `ALLOWED_GLOBALS` (tensor rebuilding,
storage types and `collections.OrderedDict`) to harmless local stand-ins;
any other global (`os.system`, `builtins.eval`, a pickled `nn.Module` class...)
raises `UnsafePickleError` before anything is called. Storage offsets, sizes
and strides are bounds-checked before any strided view is taken.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
_ZIP_LOCAL_HEADER = b"PK\x03\x04"
# A tensor may view its storage with zero strides (an expanded tensor), but
# not blow it up by more than this factor (a memory bomb otherwise).
MAX_EXPANSION = 64

# torch.<name> storage classes and the numpy dtype of their elements.
STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "UntypedStorage": np.dtype(np.uint8),
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle asks for something outside the allowlist; nothing was run."""


class _Sealed:
  """Refuses the pickle BUILD opcode, which would otherwise set attributes
  (e.g. a tensor's stride) after they were validated."""

  __slots__ = ()

  def __setstate__(self, state):
    raise UnsafePickleError(
        f"refusing to set the state of a {type(self).__name__.lstrip('_')} "
        f"(pickle BUILD); not a plain checkpoint")


class _StorageType(_Sealed):
  """Stand-in for a `torch.<X>Storage` class: only carries the dtype."""

  __slots__ = ("name", "dtype")

  def __init__(self, name: str):
    self.name = name
    self.dtype = STORAGE_DTYPES[name]

  def __repr__(self) -> str:
    return f"torch.{self.name}"


class _Storage(_Sealed):
  """A storage named by a persistent id; `array` is filled in when read."""

  __slots__ = ("key", "dtype", "numel", "array")

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key = key
    self.dtype = dtype
    self.numel = numel
    self.array: np.ndarray | None = None


class _TensorRef(_Sealed):
  """A tensor awaiting its storage (legacy files store data after the pickle)."""

  __slots__ = ("storage", "offset", "size", "stride")

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, (_Storage, _StorageView)):
      raise pickle.UnpicklingError(
          f"tensor rebuild got {type(storage).__name__} instead of a storage")
    if not _is_int(offset) or offset < 0:
      raise pickle.UnpicklingError(f"bad tensor storage offset {offset!r}")
    if not isinstance(size, tuple) or not all(
        _is_int(s) and s >= 0 for s in size):
      raise pickle.UnpicklingError(f"bad tensor size {size!r}")
    if not isinstance(stride, tuple) or len(stride) != len(size) or not all(
        _is_int(s) and s >= 0 for s in stride):
      raise pickle.UnpicklingError(
          f"bad tensor stride {stride!r} for size {size!r}")
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(map(int, size)), tuple(map(int, stride))

  def materialize(self) -> np.ndarray:
    flat = self.storage.materialize()
    count = math.prod(self.size)
    if count > max(flat.size, 1) * MAX_EXPANSION:
      raise pickle.UnpicklingError(
          f"tensor of size {self.size} would expand a storage of {flat.size} "
          f"elements more than {MAX_EXPANSION}-fold; refusing")
    if count == 0:
      return np.zeros(self.size, flat.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if last >= flat.size:
      raise pickle.UnpicklingError(
          f"tensor of size {self.size}, stride {self.stride} and offset "
          f"{self.offset} reads element {last} of a storage of {flat.size}")
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[self.offset:], shape=self.size,
        strides=tuple(s * item for s in self.stride), writeable=False)
    return np.array(view, copy=True)


class _StorageView(_Sealed):
  """A slice of a storage (very old legacy files: `view_metadata`)."""

  __slots__ = ("root", "offset", "numel")

  def __init__(self, root: _Storage, offset: int, numel: int):
    self.root, self.offset, self.numel = root, offset, numel

  def materialize(self) -> np.ndarray:
    flat = self.root.materialize()
    if self.offset + self.numel > flat.size:
      raise pickle.UnpicklingError("storage view outside its storage")
    return flat[self.offset:self.offset + self.numel]


def _storage_materialize(self: _Storage) -> np.ndarray:
  if self.array is None:
    raise pickle.UnpicklingError(f"storage {self.key!r} has no data in the file")
  return self.array


_Storage.materialize = _storage_materialize  # type: ignore[attr-defined]


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride,
                       requires_grad=False, backward_hooks=None,
                       metadata=None):
  del requires_grad, backward_hooks, metadata  # irrelevant for numpy
  return _TensorRef(storage, storage_offset, size, stride)


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `ALLOWED_GLOBALS`; storages through `storage_loader`."""

  def __init__(self, file: BinaryIO, source: str, storage_loader=None):
    super().__init__(file, encoding="utf-8")
    self._source = source
    self._storage_loader = storage_loader

  def find_class(self, module: str, name: str) -> Any:
    try:
      return ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      hint = ""
      if not module.startswith(("torch", "collections", "builtins", "os",
                                "posix", "nt", "subprocess")):
        hint = (" (a whole pickled model? save and load `model.state_dict()` "
                "instead)")
      raise UnsafePickleError(
          f"refusing to load {self._source}: the pickle asks for global "
          f"{module}.{name}, which is not on the allowlist; only tensors and "
          f"plain containers are read{hint}") from None

  def persistent_load(self, pid: Any) -> Any:
    if self._storage_loader is None:
      raise UnsafePickleError(
          f"refusing to load {self._source}: unexpected persistent id {pid!r}")
    return self._storage_loader(pid)


def _storage_pid(pid: Any, source: str) -> tuple[_StorageType, str, int, Any]:
  """Checks a ('storage', type, key, location, numel[, view]) persistent id."""
  if (not isinstance(pid, tuple) or not pid or pid[0] != "storage"
      or len(pid) not in (5, 6)):
    kind = pid[0] if isinstance(pid, tuple) and pid else pid
    if kind == "module":
      raise UnsafePickleError(
          f"refusing to load {source}: it is a whole pickled nn.Module (with "
          f"its source code); save and load `model.state_dict()` instead")
    raise UnsafePickleError(
        f"refusing to load {source}: unsupported persistent id {pid!r}")
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, _StorageType):
    raise UnsafePickleError(
        f"refusing to load {source}: storage type {storage_type!r} is not a "
        f"torch storage class")
  if not _is_int(numel) or numel < 0:
    raise pickle.UnpicklingError(f"{source}: bad storage size {numel!r}")
  return storage_type, str(key), int(numel), pid[5] if len(pid) == 6 else None


def _resolve(obj: Any) -> Any:
  """Replaces every `_TensorRef` in nested containers by its numpy array."""
  if isinstance(obj, _TensorRef):
    return obj.materialize()
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for key, value in obj.items():
      out[key] = _resolve(value)
    return out
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  return obj


def _load_legacy(f: BinaryIO, source: str) -> Any:
  def plain_load():
    return _RestrictedUnpickler(f, source).load()

  try:
    magic = plain_load()
  except UnsafePickleError:
    raise
  except Exception as e:
    raise pickle.UnpicklingError(
        f"{source} is neither a zip-format nor a legacy PyTorch checkpoint "
        f"({type(e).__name__}: {e})") from None
  if magic != LEGACY_MAGIC_NUMBER:
    raise pickle.UnpicklingError(
        f"{source} is not a PyTorch checkpoint (bad magic number)")
  try:
    return _load_legacy_body(f, source, plain_load)
  except _PASS_THROUGH:
    raise
  except Exception as e:  # a premature end, garbage opcodes, ...
    raise _damaged(source, "legacy", e) from e


def _load_legacy_body(f: BinaryIO, source: str, plain_load) -> Any:
  """Everything after the magic number of a legacy checkpoint."""
  protocol = plain_load()
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise pickle.UnpicklingError(
        f"{source}: unsupported legacy protocol version {protocol!r}")
  sys_info = plain_load()
  little_endian = not (isinstance(sys_info, dict)
                       and sys_info.get("little_endian") is False)

  storages: dict[str, _Storage] = {}

  def storage_loader(pid):
    storage_type, key, numel, view = _storage_pid(pid, source)
    if key not in storages:
      storages[key] = _Storage(key, storage_type.dtype, numel)
    root = storages[key]
    if view is None:
      return root
    if (not isinstance(view, tuple) or len(view) != 3
        or not all(_is_int(v) and v >= 0 for v in view[1:])):
      raise pickle.UnpicklingError(f"{source}: bad storage view {view!r}")
    return _StorageView(root, view[1], view[2])

  result = _RestrictedUnpickler(f, source, storage_loader).load()
  keys = plain_load()
  if not isinstance(keys, list):
    raise pickle.UnpicklingError(f"{source}: bad storage key list")
  for key in keys:
    key = str(key)
    if key not in storages:
      raise pickle.UnpicklingError(f"{source}: unknown storage key {key!r}")
    storage = storages[key]
    header = f.read(8)
    if len(header) != 8:
      raise pickle.UnpicklingError(f"{source}: truncated at storage {key!r}")
    (numel,) = struct.unpack("<q" if little_endian else ">q", header)
    if numel != storage.numel:
      raise pickle.UnpicklingError(
          f"{source}: storage {key!r} holds {numel} elements, the pickle "
          f"says {storage.numel}")
    nbytes = numel * storage.dtype.itemsize
    data = f.read(nbytes)
    if len(data) != nbytes:
      raise pickle.UnpicklingError(f"{source}: truncated at storage {key!r}")
    dtype = storage.dtype.newbyteorder("<" if little_endian else ">")
    storage.array = np.frombuffer(data, dtype).astype(storage.dtype)
  return _resolve(result)


def _load_zip(path: str | os.PathLike, source: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names
               if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise pickle.UnpicklingError(
          f"{source}: a zip file without exactly one '<name>/data.pkl' "
          f"(found {pickles}); not a PyTorch checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    if byteorder not in ("little", "big"):
      raise pickle.UnpicklingError(f"{source}: bad byteorder {byteorder!r}")
    storages: dict[str, _Storage] = {}

    def storage_loader(pid):
      storage_type, key, numel, view = _storage_pid(pid, source)
      if view is not None:
        raise pickle.UnpicklingError(
            f"{source}: storage views do not occur in zip checkpoints")
      if key in storages:
        return storages[key]
      record = f"{prefix}data/{key}"
      if record not in names:
        raise pickle.UnpicklingError(f"{source}: missing record {record}")
      nbytes = numel * storage_type.dtype.itemsize
      if archive.getinfo(record).file_size < nbytes:
        raise pickle.UnpicklingError(
            f"{source}: record {record} is shorter than {numel} elements of "
            f"{storage_type.dtype}")
      with archive.open(record) as stream:
        data = stream.read(nbytes)
      storage = _Storage(key, storage_type.dtype, numel)
      dtype = storage_type.dtype.newbyteorder(
          "<" if byteorder == "little" else ">")
      storage.array = np.frombuffer(data, dtype).astype(storage_type.dtype)
      storages[key] = storage
      return storage

    with archive.open(pickles[0]) as stream:
      payload = io.BytesIO(stream.read())
    result = _RestrictedUnpickler(payload, source, storage_loader).load()
  return _resolve(result)


# Raised as they are by `load`; any other exception while reading a file
# means the file is damaged and becomes a `pickle.UnpicklingError`.
_PASS_THROUGH = (pickle.UnpicklingError, MemoryError)


def _damaged(source: str, container: str, cause: BaseException
             ) -> pickle.UnpicklingError:
  """The error for a checkpoint that breaks off or fails its checks."""
  return pickle.UnpicklingError(
      f"{source} is a damaged or truncated {container}-format PyTorch "
      f"checkpoint ({type(cause).__name__}: {cause})")


def load(path: str | os.PathLike) -> Any:
  """Reads a `torch.save` file (zip or legacy) without torch, safely.

  Args:
    path: the checkpoint file.

  Returns:
    The saved object with every tensor as a numpy array.

  Raises:
    UnsafePickleError: the pickle references a global outside
      `ALLOWED_GLOBALS` (nothing in it was executed).
    pickle.UnpicklingError: the file is not a readable PyTorch checkpoint
      (not one at all, or damaged or truncated); the message names the file.
    FileNotFoundError: `path` is not a file.
  """
  source = os.fspath(path)
  if not os.path.isfile(source):
    raise FileNotFoundError(f"no checkpoint file at {source}")
  if zipfile.is_zipfile(source):
    try:
      return _load_zip(source, source)
    except _PASS_THROUGH:
      raise
    except Exception as e:  # bad CRC, bad deflate data, a premature end...
      raise _damaged(source, "zip", e) from e
  if os.path.getsize(source) == 0:
    raise pickle.UnpicklingError(
        f"{source} is empty (0 bytes); not a PyTorch checkpoint")
  with open(source, "rb") as f:
    head = f.read(len(_ZIP_LOCAL_HEADER))
  if head == _ZIP_LOCAL_HEADER:  # a zip whose end (central directory) is gone
    raise pickle.UnpicklingError(
        f"{source} is a damaged or truncated zip-format PyTorch checkpoint "
        f"(it starts as a zip file but has no zip directory at its end)")
  if tarfile.is_tarfile(source):
    raise pickle.UnpicklingError(
        f"{source} is a tar-format checkpoint (PyTorch <= 0.3); re-save it "
        f"with a newer PyTorch")
  with open(source, "rb") as f:
    return _load_legacy(f, source)
