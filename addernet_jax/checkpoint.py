"""Checkpoints that survive preemption, crashes, corruption and full disks.

A thin layer over `orbax.checkpoint.CheckpointManager` (one directory per
step, `<directory>/<step>/{state,meta,checksums}`) that adds what a long,
preemptible training run needs:

- retention: the last `max_to_keep` checkpoints plus the best one by
  `best_metric` (Orbax preservation policies; the metric is stored with the
  step so the best survives restarts);
- atomicity: Orbax writes each step into a temporary directory and renames it
  when complete, so a process killed mid-save leaves a `*.orbax-checkpoint-tmp*`
  directory that is ignored (and cleaned up), never a half-written step; old
  checkpoints are deleted only after a new one has been committed;
- integrity: a CRC32 of every array is saved beside the state and checked after
  restoring. A step that is clearly damaged (a CRC32 mismatch, truncated,
  garbled or missing files, unparseable JSON) is reported with a warning naming
  the step, the file or array and the kind of damage; when an older step
  restores, the damaged ones are moved aside to `<directory>.corrupted/` and
  the run resumes from the older step. Any other error while reading (out of
  memory, an I/O error, a library version mismatch) raises `CheckpointError`
  and touches nothing;
- no silent fresh start: when every step is damaged, or none is left but
  `<directory>.corrupted/` holds steps moved there earlier, `restore` raises
  `CheckpointError` (what is damaged, where it is, what to do) instead of
  returning None;
- structure check: a checkpoint of another architecture is refused before any
  array is read, with a ValueError naming the first mismatching parameter and
  both shapes;
- errors while saving (disk full, permission denied, ...) raise
  `CheckpointError` naming the directory, the step and the cause;
- local paths only: a URL (`gs://bucket/x`) is refused with a clear error
  rather than becoming a local folder `./gs:/bucket/x` (mount the bucket).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple

try:
  import fcntl
except ImportError:  # Windows
  fcntl = None

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

STATE, META, CHECKSUMS = "state", "meta", "checksums"
JSON_ITEM_FILE = "metadata"  # the file of an Orbax JSON item in its folder
_METADATA_FILE = "_CHECKPOINT_METADATA"
_PYTREE_METADATA_FILE = "_METADATA"  # Orbax's tree metadata, in `state/`
CORRUPTED_SUFFIX = ".corrupted"
_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file size limit was reached (ulimit -f, or the file "
                 "system's largest file)",
}


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no valid checkpoint could be read."""


class CheckpointCorruptedError(CheckpointError):
  """A checkpoint step is damaged: what is wrong is in the message.

  Attributes:
    step: the damaged step.
    damage: which file or array is damaged, and how.
  """

  def __init__(self, step: int, directory: str | os.PathLike, damage: str):
    self.step, self.damage = step, damage
    super().__init__(f"checkpoint step {step} in {str(directory)!r} is "
                     f"damaged: {damage}")


class CheckpointStructureError(ValueError):
  """A checkpoint's tree does not match the model it is restored into.

  `missing_parameter`: the path of the model's leaf the checkpoint lacks,
  `extra_parameter`: of the checkpoint's leaf the model lacks, when that is
  the mismatch (else None)."""

  def __init__(self, message: str, *, missing_parameter: str | None = None,
               extra_parameter: str | None = None):
    super().__init__(message)
    self.missing_parameter = missing_parameter
    self.extra_parameter = extra_parameter


# --------------------------------------------------------------------------
# Helpers.


def _short(text: str, limit: int = 400) -> str:
  """`text` on one line, without TensorStore's spec dumps, at most `limit`
  characters."""
  for marker in (" [tensorstore_spec=", " See full TensorStore details"):
    text = text.split(marker, 1)[0]
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _describe_cause(exc: BaseException) -> str:
  """`Type: message` of `exc`, with a hint for the OSError behind it, if any."""
  seen, cur, os_error = set(), exc, None
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, OSError) and cur.errno in _ERRNO_HINTS:
      os_error = cur
      break
    cur = cur.__cause__ or cur.__context__
  text = f"{type(exc).__name__}: {_short(str(exc))}"
  # TensorStore's own errors carry the OS error as text.
  code = re.search(r"os_error_code='(\d+)'", str(exc))
  if os_error is not None:
    text = f"{_ERRNO_HINTS[os_error.errno]} ({text})"
  elif code and int(code.group(1)) in _ERRNO_HINTS:
    failed = re.search(r"(Failed to [^:]+: [^\[]+)", str(exc))
    detail = failed.group(1).strip() if failed else _short(str(exc), 200)
    text = f"{_ERRNO_HINTS[int(code.group(1))]} ({detail})"
  else:
    low = str(exc).lower()
    for key, hint in (("no space left", "the disk is full"),
                      ("permission denied", "permission denied"),
                      ("read-only file system", "the file system is read-only")):
      if key in low:
        text = f"{hint} ({text})"
        break
  return text


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def require_local_path(path: str | os.PathLike, what: str = "directory"
                       ) -> Path:
  """`path` as a local `Path`; an empty string or a URL such as
  `gs://bucket/x` is refused.

  `pathlib` would quietly turn `gs://bucket/x` into the local folder
  `gs:/bucket/x`. Checkpoints, metrics and TensorBoard logs are written with
  local file operations here, so an object store has to be mounted (e.g.
  gcsfuse) and its mount point given instead.

  Raises:
    CheckpointError: naming the path and what to do.
  """
  text = os.fspath(path)
  if not text.strip():
    # Path("") is the current directory: an unset shell variable in
    # `--workdir $RUN` would otherwise train into (or read) the cwd.
    raise CheckpointError(f"{what} is an empty string ({text!r}); give a "
                          f"path")
  match = _URL.match(text)
  if match:
    raise CheckpointError(
        f"{what} {text!r} is a {match.group(1)}:// URL, which is not "
        f"supported: checkpoints and logs are written to local or mounted "
        f"file systems only; mount the bucket (e.g. with gcsfuse) and pass "
        f"the mount point")
  return Path(text).expanduser()


def file_in_the_way(path: str | os.PathLike) -> Path | None:
  """The regular file among `path`'s existing ancestors that keeps `path`
  from being created (its nearest existing ancestor, if that is not a
  directory), else None."""
  for parent in Path(path).parents:
    if parent.exists():
      return None if parent.is_dir() else parent
  return None


def check_writable(path: str | os.PathLike) -> Path:
  """Creates `path` if needed and checks a file can be written in it.

  Call at startup, before any training, so that an unwritable workdir is a
  one-line error instead of a failure hours later at the first checkpoint.

  Returns:
    The path, resolved.

  Raises:
    CheckpointError: naming the path and the cause (a URL instead of a local
      path, permission denied, read-only file system, a file in the way,
      disk full, ...).
  """
  path = require_local_path(path)
  in_the_way = (path if path.exists() and not path.is_dir()
                else file_in_the_way(path))
  if in_the_way is not None:
    raise CheckpointError(
        f"directory {str(path)!r} cannot be created: {str(in_the_way)!r} is "
        f"a file, not a directory; choose another --workdir")
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
    try:
      os.write(fd, b"addernet-jax write test\n")
      os.fsync(fd)
    finally:
      os.close(fd)
      os.unlink(probe)
  except OSError as e:
    raise CheckpointError(
        f"directory {str(path)!r} is not writable: {_describe_cause(e)}; "
        f"choose another --workdir or fix its permissions") from e
  return path.resolve()


def workdir_of_step(path: str | os.PathLike) -> Path | None:
  """The training workdir of `path` when `path` is one committed checkpoint
  step (`<workdir>/checkpoints/<step>`); None when it is not a step."""
  path = Path(path)
  if not (path / _METADATA_FILE).is_file():
    return None
  return _workdir_of(path.absolute().parent)


def check_workdir(path: str | os.PathLike) -> Path:
  """`check_writable` for a training workdir, which must not be a
  checkpoint step or a checkpoints folder itself (a run there would start
  over inside it); CheckpointError naming the workdir to give instead."""
  local = require_local_path(path, "workdir")
  step_of = workdir_of_step(local)
  if step_of is not None:
    raise CheckpointError(
        f"workdir {str(path)!r} is one checkpoint step, not a workdir: give "
        f"the run's workdir {str(step_of)!r} to resume it")
  if local.is_dir() and any((step / _METADATA_FILE).is_file()
                            for step in local.iterdir() if step.is_dir()):
    raise CheckpointError(
        f"workdir {str(path)!r} holds checkpoint steps itself: it is a "
        f"checkpoints folder; give the run's workdir "
        f"{str(_workdir_of(local.absolute()))!r} (which holds checkpoints/) "
        f"to resume it")
  return check_writable(local)


def missing_directories(path: str | os.PathLike) -> list[Path]:
  """`path` and those of its parents that do not exist yet, deepest first
  (what `check_writable` will create; see `remove_if_empty`)."""
  out = []
  path = Path(path).expanduser().absolute()
  while not path.exists() and path != path.parent:
    out.append(path)
    path = path.parent
  return out


def remove_if_empty(directories: list[Path]) -> None:
  """Removes each of `directories` (deepest first) if it holds no file: a
  run that fails before writing anything leaves no empty workdir behind.
  Never removes a file; a folder holding one stays."""
  for directory in directories:
    if not directory.is_dir():
      continue
    for root, _, _ in os.walk(directory, topdown=False):  # deepest first
      try:
        os.rmdir(root)
      except OSError:
        pass


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(_key_name(k) for k in path)


def _flatten(tree: Any) -> dict[str, Any]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_str(p): leaf for p, leaf in leaves}


def _shape_of(leaf: Any) -> tuple[int, ...] | None:
  shape = getattr(leaf, "shape", None)
  if shape is None:
    return () if isinstance(leaf, (int, float, np.number, bool)) else None
  return tuple(int(d) for d in shape)


def _sort_key(path: str) -> tuple[int, str]:
  # Report parameters first: they are what a user recognises.
  order = ("params", "batch_stats")
  head = path.split("/", 1)[0]
  return (order.index(head) if head in order else len(order), "")


def check_structure(saved_metadata: Any, abstract_state: Any, *,
                    where: str = "checkpoint", allow_extra: bool = False
                    ) -> None:
  """Raises CheckpointStructureError if the trees differ in paths or shapes.

  Args:
    saved_metadata: the tree of the checkpoint (Orbax array metadata or
      arrays; anything whose leaves have `.shape`).
    abstract_state: the tree the caller wants to restore into.
    where: how to name the checkpoint in the message.
    allow_extra: accept the checkpoint's top-level entries absent from
      `abstract_state` (restoring only a part, e.g. the parameters for
      evaluation); inside an entry it restores, a leaf the model lacks is
      still a mismatch (dropping it would evaluate another network).
  """
  saved = {k: _shape_of(v) for k, v in _flatten(saved_metadata).items()}
  wanted = {k: _shape_of(v) for k, v in _flatten(abstract_state).items()}
  wanted_order = list(wanted)
  wanted_order.sort(key=_sort_key)  # stable: keeps tree order within groups
  for path in wanted_order:
    if path not in saved:
      raise CheckpointStructureError(
          f"{where} does not match the model: parameter {path!r} "
          f"(shape {wanted[path]}) is missing from the checkpoint; was it "
          f"written by another architecture or configuration?",
          missing_parameter=path)
    if (saved[path] is not None and wanted[path] is not None
        and saved[path] != wanted[path]):
      raise CheckpointStructureError(
          f"{where} does not match the model: first mismatching parameter "
          f"{path!r} has shape {saved[path]} in the checkpoint but "
          f"{wanted[path]} in the model (another architecture, width or "
          f"number of classes?)")
  restored_heads = {path.split("/", 1)[0] for path in wanted}
  extra = sorted((p for p in saved if p not in wanted and (
      not allow_extra or p.split("/", 1)[0] in restored_heads)),
                 key=_sort_key)
  if extra:
    raise CheckpointStructureError(
        f"{where} does not match the model: the checkpoint has parameter "
        f"{extra[0]!r} (shape {saved[extra[0]]}) that the model lacks "
        f"({len(extra)} such entries)", extra_parameter=extra[0])


def _host_bytes(leaf: Any) -> bytes | None:
  """The bytes of a leaf as seen by this process, or None if not local."""
  if isinstance(leaf, jax.Array):
    if leaf.is_fully_addressable:
      arr = np.asarray(leaf)
    elif leaf.is_fully_replicated:
      arr = np.asarray(leaf.addressable_data(0))
    else:
      return None  # sharded across processes: no process sees it whole
  else:
    arr = np.asarray(leaf)
  arr = np.ascontiguousarray(arr)
  return f"{arr.dtype.str}{arr.shape}".encode() + arr.tobytes()


def tree_checksums(tree: Any) -> dict[str, int]:
  """CRC32 of every leaf of `tree` that this process holds entirely."""
  sums = {}
  for path, leaf in _flatten(tree).items():
    data = _host_bytes(leaf)
    if data is not None:
      sums[path] = zlib.crc32(data)
  return sums


def _with_default_sharding(tree: Any) -> Any:
  """Gives abstract leaves without a sharding this process's first device."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def fix(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
      return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device)
    return leaf
  return jax.tree.map(fix, tree)


def _jsonable(x: Any) -> Any:
  """Converts numpy/JAX scalars and arrays in `x` to JSON types."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def _resolve_dir(path: str | os.PathLike) -> Path:
  """`<path>/checkpoints` if it exists (a workdir was given), else `path`."""
  path = require_local_path(path, "checkpoint directory")
  sub = path / "checkpoints"
  return sub if sub.is_dir() else path


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def non_finite_leaves(tree: Any) -> dict[str, int]:
  """The floating-point leaves of `tree` that hold NaN or Inf.

  Returns:
    `{path: number of non-finite values}` (empty if all are finite), paths
    as in the checksums ("params/conv1/kernel").
  """
  flat = {path: leaf for path, leaf in _flatten(tree).items()
          if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact)}
  counts = jax.device_get(_count_non_finite(list(flat.values())))
  return {path: int(n) for path, n in zip(flat, counts) if n}


@jax.jit
def _count_non_finite(leaves: list[jax.Array]) -> list[jax.Array]:
  return [jnp.sum(~jnp.isfinite(leaf)) for leaf in leaves]


# --------------------------------------------------------------------------
# Telling a damaged step from other errors while reading one.

# TensorStore raises ValueError("<STATUS_CODE>: <message>").
_TS_STATUS = re.compile(r"^([A-Z][A-Z_]+): ")
# TensorStore errors without a status code (e.g. a b-tree node that fails to
# decompress) still carry the spec of the store they came from.
_TS_SPEC_MARK = "[tensorstore_spec="
# Status codes that always mean the bytes on disk are wrong.
_TS_DAMAGE = {"DATA_LOSS": "garbled", "OUT_OF_RANGE": "truncated",
              "NOT_FOUND": "missing"}
# Codes that also mean a usage or version problem: damage only when the
# message says that decoding the stored bytes failed.
_TS_DAMAGE_IF_DECODING = ("FAILED_PRECONDITION", "INVALID_ARGUMENT")
_DECODING_WORDS = ("decompress", "zstd", "invalid json", "error decoding",
                   "error parsing json", "truncated", "checksum",
                   # valid JSON of the wrong shape, e.g. `null` in _sharding
                   "json pointer")
# Python errors that say the file system is missing something, not that it
# failed (those are OSErrors too).
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _chain(exc: BaseException):
  """`exc`, its cause, the cause's cause, ..."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    yield exc
    exc = exc.__cause__ if exc.__cause__ is not None else exc.__context__


def _relative(path: str, step_dir: Path) -> str:
  try:
    return str(Path(path).relative_to(step_dir)) + ("/" if path.endswith("/")
                                                   else "")
  except ValueError:
    return path


def _unparseable_json_files(step_dir: Path) -> list[tuple[str, str]]:
  """`(file, error)` for each metadata file of a step that is not valid JSON
  (Orbax's metadata files are JSON; array data under `d/` and the OCDBT
  manifests are binary)."""
  bad = []
  for f in sorted(step_dir.rglob("*")):
    rel = f.relative_to(step_dir)
    if not f.is_file() or "d" in rel.parts[:-1] or f.suffix in (".txt",
                                                                ".ocdbt"):
      continue
    try:
      json.loads(f.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
      bad.append((str(rel), str(e)))
    except OSError:
      continue
  return bad


def _tensorstore_damage(message: str, step_dir: Path) -> str | None:
  """What a TensorStore error says is damaged, or None if it is not damage."""
  status = _TS_STATUS.match(message)
  code, text = status.group(1) if status else "", _short(message, limit=10_000)
  if code in _TS_DAMAGE:
    kind = _TS_DAMAGE[code]
  elif (code in _TS_DAMAGE_IF_DECODING and
        any(w in text.lower() for w in _DECODING_WORDS)):
    kind = "undecodable"
  elif (not code and _TS_SPEC_MARK in message and
        "error decoding" in text.lower()):
    kind = "garbled"  # seen with b-tree nodes that fail to decompress
  else:
    return None
  files = re.findall(r'local file "([^"]+)"', text)
  key = re.search(r'Error reading "([^"]+)" in OCDBT', text)
  if files and not files[-1].endswith("/"):
    where = f"file {_relative(files[-1], step_dir)!r}"
  elif key:
    array, _, chunk = key.group(1).rpartition("/")
    where = (f"the metadata ({chunk}) of array {array!r}" if
             chunk.startswith(".") else
             f"chunk {chunk} of array {array!r}")
    if files:
      where += f" in {_relative(files[-1], step_dir)!r}"
  else:
    where = "a file"
  if kind == "missing" and (where == "a file" or where.endswith("/'")):
    where = _missing_ocdbt_manifest(step_dir) or where
  detail = text.rsplit(f'local file "{files[-1]}"', 1)[-1] if files else text
  detail = detail.lstrip(": ") or text
  if code and not detail.startswith(code):
    detail = f"{code}: {detail}"
  return f"{where} is {kind} ({_short(detail, limit=300)})"


def _missing_ocdbt_manifest(step_dir: Path) -> str | None:
  """The first OCDBT database of `step_dir` (a folder of array data under
  `d/` or `ocdbt.process_*/`) without its `manifest.ocdbt`, as "file
  'state/manifest.ocdbt'"; None if none lacks it. TensorStore's error for a
  missing manifest says only "does not exist"."""
  try:
    items = sorted(p for p in step_dir.iterdir() if p.is_dir())
  except OSError:
    return None
  for item in items:
    if (((item / "d").is_dir() or any(item.glob("ocdbt.process_*")))
        and not (item / "manifest.ocdbt").is_file()):
      return f"file {str((item / 'manifest.ocdbt').relative_to(step_dir))!r}"
  return None


def _missing_json_items(step_dir: Path, names: Iterable[str]) -> str | None:
  """The first of the JSON items `names` (e.g. "meta") whose folder or file
  is missing from `step_dir`, as "folder 'meta'" or "file 'meta/metadata'";
  None if all are there."""
  for name in names:
    if not (step_dir / name).is_dir():
      return f"folder {name!r}"
    if not (step_dir / name / JSON_ITEM_FILE).is_file():
      return f"file {name + '/' + JSON_ITEM_FILE!r}"
  return None


def _damage_of(exc: BaseException, step_dir: Path) -> str | None:
  """How a step is damaged according to the error of reading it, or None when
  the error does not show damage (memory, I/O, permissions, versions, ...):
  only then may the caller move the step aside."""
  chain = list(_chain(exc))
  for link in chain:
    if isinstance(link, MemoryError):
      return None
    if isinstance(link, OSError) and not isinstance(link, _MISSING):
      return None
    status = _TS_STATUS.match(str(link))
    if (isinstance(link, ValueError) and status and
        _tensorstore_damage(str(link), step_dir) is None):
      return None
  for link in chain:
    if isinstance(link, CheckpointCorruptedError):
      return link.damage
    if isinstance(link, (json.JSONDecodeError, UnicodeDecodeError)):
      bad = _unparseable_json_files(step_dir)
      if not bad:
        return f"a metadata file is not valid JSON ({_short(str(link))})"
      if len(bad) == 1:
        return (f"file {bad[0][0]!r} is not valid JSON, truncated or garbled "
                f"({_short(bad[0][1], 120)})")
      names = ", ".join(repr(f) for f, _ in bad[:4])
      more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
      return (f"{len(bad)} files are not valid JSON, truncated or garbled: "
              f"{names}{more} (first: {_short(bad[0][1], 120)})")
    if isinstance(link, _MISSING) and link.filename:
      return f"file {_relative(str(link.filename), step_dir)!r} is missing"
    if isinstance(link, ValueError):
      damage = _tensorstore_damage(str(link), step_dir)
      if damage is not None:
        return damage
  return None


def _is_orphaned_read_error(exc: BaseException | None) -> bool:
  """Whether `exc` is the aftermath of a failed Orbax read (see
  `_install_error_aftermath_filters`)."""
  for link in _chain(exc) if exc is not None else ():
    text = str(link)
    if isinstance(link, RuntimeError) and text == "Event loop is closed":
      return True
    if text.startswith("Encountered error while reading array index"):
      return True
    if isinstance(link, ValueError) and (_TS_STATUS.match(text) or
                                         _TS_SPEC_MARK in text):
      return True
  return False


_filters_installed = False
_ORBAX_STEP_METADATA_ERRORS = ("Failed to read Metadata file: ",
                               "Failed to json parse Metadata file: ")


def _install_error_aftermath_filters() -> None:
  """Hides the aftermath of a failed read or write that this module reports
  itself (one line: `restore` names the damage, a failed save its cause).

  When one TensorStore read or write of a step fails, Orbax's
  `asyncio.gather` raises at once and its event loop closes while the
  sibling operations are in flight: they then print "RuntimeError: Event
  loop is closed" (through `sys.unraisablehook`, from TensorStore's threads,
  at any later time) and asyncio logs "... exception was never retrieved"
  with a traceback; Orbax's save threads log the same error with its
  traceback three times. A disk full at a save printed 400 lines around the
  one that says so. These say nothing new: the unraisable errors and asyncio
  logs go to DEBUG level, Orbax's error logs keep one shortened line without
  the traceback, and the warning that a read it never started "was never
  awaited" is hidden. Orbax's errors for a damaged `_CHECKPOINT_METADATA`
  become one warning. Any other unraisable error or log is kept whole.
  """
  global _filters_installed
  if _filters_installed:
    return
  _filters_installed = True
  previous_hook = sys.unraisablehook

  def unraisable_hook(unraisable):
    if _is_orphaned_read_error(unraisable.exc_value):
      logger.debug("after a failed checkpoint read: %s",
                   _short(str(unraisable.exc_value)))
      return
    previous_hook(unraisable)

  sys.unraisablehook = unraisable_hook

  class _AsyncioFilter(logging.Filter):

    def filter(self, record: logging.LogRecord) -> bool:
      if ("exception was never retrieved" in str(record.msg) and
          record.exc_info and _is_orphaned_read_error(record.exc_info[1])):
        logger.debug("after a failed checkpoint read: %s",
                     _short(str(record.exc_info[1])))
        return False
      return True

  logging.getLogger("asyncio").addFilter(_AsyncioFilter())

  class _OrbaxTracebackFilter(logging.Filter):

    def filter(self, record: logging.LogRecord) -> bool:
      if (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname
          and _is_orphaned_read_error(record.exc_info[1])):
        record.msg = _short(record.getMessage(), limit=300) + (
            " (traceback left out: the error is reported below)")
        record.args, record.exc_info, record.exc_text = None, None, None
      return True

  class _OrbaxStepMetadataFilter(logging.Filter):
    """Orbax logs a damaged `_CHECKPOINT_METADATA` as an ERROR holding the
    whole file, at each of its reads; the file holds only the step's handler
    names and times, which restoring does without. One warning per file."""

    def __init__(self):
      super().__init__()
      self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
      if not (isinstance(record.msg, str) and record.args and
              record.msg.startswith(_ORBAX_STEP_METADATA_ERRORS)):
        return True
      path = str(record.args[0])
      if path in self._seen:
        return False
      self._seen.add(path)
      record.msg = ("Orbax's step metadata file %s is damaged (%s); it holds "
                    "only the step's handler names and times, which "
                    "restoring does without")
      record.args = (path, _short(str(record.args[-1]), limit=200))
      record.levelno, record.levelname = logging.WARNING, "WARNING"
      return True

  metadata_filter = _OrbaxStepMetadataFilter()
  for name in ("absl", "orbax"):
    logging.getLogger(name).addFilter(_OrbaxTracebackFilter())
    logging.getLogger(name).addFilter(metadata_filter)
  # The reads that Orbax's failed gather never started.
  warnings.filterwarnings(
      "ignore", message="coroutine '_read_array_index_and_device_put' was "
      "never awaited", category=RuntimeWarning)


class _OrbaxCheckpointManager(ocp.CheckpointManager):
  """Orbax's manager, except that a step whose metrics file is damaged is
  listed without metrics (and is not ranked as the best) instead of making
  the whole directory unusable: Orbax reads the metrics of every step when
  it starts and lets a JSON error through."""

  def metrics(self, step: int) -> Any:
    try:
      return super().metrics(step)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      logger.warning("checkpoint step %d in %s: the metrics file is damaged "
                     "(%s); the step is not ranked as the best", step,
                     self.directory, _short(str(e)))
      return None

  def await_cleanup(self) -> None:
    """Waits for the removal of earlier runs' unfinished temporary folders.

    Orbax starts it in a thread when the manager is made and waits for it only
    in `save`: a program that ends before (after a failed save, or having only
    looked at the directory) stopped that thread mid-way, with a traceback
    ("cannot schedule new futures after shutdown") at exit.
    """
    wait = getattr(self, "_maybe_await_cleanup_tmp_directory", None)
    if wait is not None:
      wait()


# --------------------------------------------------------------------------
# The manager.


def _cleanup_race(error: BaseException) -> bool:
  """Whether `error` or one of its causes is an OSError ENOTEMPTY or ENOENT:
  what removing a folder raises while files still appear in it or vanish
  from it (a failed save's last writes and lock files)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOTEMPTY,
                                                      errno.ENOENT):
      return True
    error = error.__cause__ or error.__context__
  return False


class WorkdirLock:
  """An exclusive lock on `path`, e.g. `<workdir>/checkpoints.lock` for the
  checkpoints in `<workdir>/checkpoints` (created; it records who holds it),
  for as long as this process lives or until `release`: a second training
  run on the same checkpoints would interleave its saves and metrics with
  the first's. The operating system drops the lock when the process dies, so a
  killed run leaves nothing stale. A file system without locks (some network
  mounts) is warned about, not refused."""

  def __init__(self, path: Path):
    self.path, self._fd = path, None
    if fcntl is None:  # Windows: no flock
      return
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise CheckpointError(f"cannot create the lock file {str(path)!r}: "
                            f"{e.strerror or e}") from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode("utf-8", "replace").strip()
      os.close(fd)
      raise CheckpointError(
          f"another run is writing checkpoints to "
          f"{str(path.with_suffix(''))!r} ({holder or 'holder unknown'}; "
          f"lock file {path.name!r}): two runs in one workdir would "
          f"mix their checkpoints and metrics; wait for it to end or give "
          f"another --workdir") from None
    except OSError as e:
      os.close(fd)
      logger.warning("cannot lock %s (%s): nothing stops a second run from "
                     "using this workdir at the same time", path,
                     e.strerror or e)
      return
    self._fd = fd
    os.ftruncate(fd, 0)
    os.write(fd, (f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n").encode())

  def release(self) -> None:
    """Unlocks (the file stays; its content says who held it last)."""
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


class CheckpointManager:
  """Saves and restores `(state, meta)` pairs under `directory/<step>`.

  `state` is any pytree of arrays (typically a flax TrainState), `meta` a
  JSON-serialisable dict (epoch, data position, config, ...). In a
  multi-process run every process must call `save`, `restore` and `close`
  (they synchronise); only the primary process writes shared files.

  Args:
    directory: where the step directories live (created if missing).
    max_to_keep: how many of the most recent checkpoints to keep.
    best_metric: key of the `metrics` dict given to `save` that selects the
      best checkpoint, kept in addition to the last `max_to_keep`; None keeps
      only the most recent ones.
    best_mode: "max" (accuracy) or "min" (loss).
    async_save: write in a background thread (errors then surface at the
      next `save`, `wait_until_finished` or `close`).
    verify_checksums: store CRC32s of the arrays and check them on restore.
    read_only: never write, create, clean up or move anything (evaluation).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               best_metric: str | None = "eval_top1", best_mode: str = "max",
               async_save: bool = True, verify_checksums: bool = True,
               read_only: bool = False):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep must be a positive int, got "
                       f"{max_to_keep!r}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = require_local_path(directory,
                                        "checkpoint directory").absolute()
    self._lock = None
    if not read_only:
      check_writable(self.directory)
      if jax.process_index() == 0:
        self._lock = WorkdirLock(self.directory.with_name(
            self.directory.name + ".lock"))
    elif not self.directory.is_dir():
      raise CheckpointError(f"checkpoint directory {str(self.directory)!r} "
                            f"does not exist")
    self.max_to_keep = max_to_keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    self.verify_checksums = verify_checksums
    _install_error_aftermath_filters()
    self._async = async_save
    self._pending_step: int | None = None
    try:
      self._mgr = self._make_manager()
    except BaseException:
      self._release_lock()
      raise

  def _release_lock(self) -> None:
    if self._lock is not None:
      self._lock.release()
      self._lock = None

  # -- construction --------------------------------------------------------

  def _metric(self, metrics: Mapping[str, Any]) -> float:
    worst = -math.inf if self.best_mode == "max" else math.inf
    try:
      value = float(metrics[self.best_metric])
    except (KeyError, TypeError, ValueError):
      return worst
    return worst if math.isnan(value) else value

  def _make_manager(self, strict: bool = True) -> ocp.CheckpointManager:
    """Orbax's manager of the directory; CheckpointError if removing earlier
    unfinished folders fails (`strict`; else a warning)."""
    pp = ocp.checkpoint_managers
    policies = [pp.LatestN(self.max_to_keep)]
    best_fn = None
    if self.best_metric is not None:
      best_fn = self._metric
      policies.append(pp.BestN(get_metric_fn=self._metric,
                               reverse=self.best_mode == "min", n=1,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        best_fn=best_fn, best_mode=self.best_mode,
        preservation_policy=pp.AnyPreservationPolicy(policies),
        cleanup_tmp_directories=not self.read_only,
        enable_async_checkpointing=self._async,
        read_only=self.read_only, create=not self.read_only)
    handlers = {STATE: ocp.StandardCheckpointHandler(),
                META: ocp.JsonCheckpointHandler(),
                CHECKSUMS: ocp.JsonCheckpointHandler()}
    manager = _OrbaxCheckpointManager(self.directory, options=options,
                                      item_handlers=handlers)
    try:
      manager.await_cleanup()
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises it again from every save: say it now, not after an
      # epoch of training.
      message = (f"removing unfinished checkpoint folders in "
                 f"{str(self.directory)!r} failed: {_describe_cause(e)}")
      if not strict:
        logger.warning("%s", message)
        return manager
      try:
        manager.close()
      except Exception:  # pylint: disable=broad-except
        pass
      raise CheckpointError(message) from e
    return manager

  # -- queries -------------------------------------------------------------

  def _is_finalized(self, step: int) -> bool:
    return (self.directory / str(step) / _METADATA_FILE).exists()

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (unfinished step directories excluded)."""
    return sorted(s for s in self._mgr.all_steps() if self._is_finalized(s))

  def unfinished_steps(self) -> list[int]:
    """Step directories without their commit file, ascending."""
    return sorted(set(self._mgr.all_steps()) - set(self.all_steps()))

  def latest_step(self) -> int | None:
    """The newest committed step, or None (not yet checked for corruption)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The committed step with the best `best_metric`, or None."""
    if self.best_metric is None:
      return None
    scored = []
    for step in self.all_steps():
      metrics = self._mgr.metrics(step)
      if metrics and self.best_metric in metrics:
        scored.append((self._metric(metrics), step))
    if not scored:
      return None
    pick = max if self.best_mode == "max" else min
    return pick(scored)[1]

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with `step` (None if none)."""
    return self._mgr.metrics(step)

  def meta(self, step: int) -> dict[str, Any]:
    """The meta saved with `step` ({} if it is not a mapping); read errors
    propagate."""
    meta = self._mgr.restore(
        step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
    return dict(meta) if isinstance(meta, Mapping) else {}

  @property
  def corrupted_directory(self) -> Path:
    """Where damaged steps are moved: `<directory>.corrupted`."""
    return self.directory.parent / (self.directory.name + CORRUPTED_SUFFIX)

  def quarantined_steps(self) -> list[int]:
    """Steps moved to `corrupted_directory` as damaged, ascending (unfinished
    step directories moved there are not counted: they never held a
    checkpoint)."""
    root = self.corrupted_directory
    if not root.is_dir():
      return []
    names = (re.fullmatch(r"(\d+)-\d{8}-\d{6}(-\d+)?", p.name)
             for p in root.iterdir())
    return sorted({int(m.group(1)) for m in names if m})

  # -- saving --------------------------------------------------------------

  def _earlier_steps_note(self, step: int) -> str:
    """What a failed save of `step` leaves: the steps committed before it."""
    try:
      earlier = [s for s in self.all_steps() if s < step]
    except Exception:  # pylint: disable=broad-except
      return "the previous checkpoints are intact"
    if not earlier:
      return "no checkpoint was written before it"
    return f"the previous checkpoints are intact (latest: step {earlier[-1]})"

  def _raise_pending_errors(self) -> None:
    """Waits for the background save and turns its failure into an error."""
    step, self._pending_step = self._pending_step, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._reset_manager()
      raise CheckpointError(
          f"saving checkpoint step {step} to {str(self.directory)!r} failed: "
          f"{_describe_cause(e)}; {self._earlier_steps_note(step)}") from e

  def _reset_manager(self) -> None:
    """Replaces the Orbax manager after a failed save.

    Orbax keeps the exception of a failed background save and raises it again
    from every later call; a fresh manager re-reads the directory (and cleans
    up the failed save's temporary directory).
    """
    try:
      self._mgr.close()
    except Exception:  # pylint: disable=broad-except
      pass
    # A failed save is being reported: a cleanup failure is only a warning.
    self._mgr = self._make_manager(strict=False)

  def _reload(self) -> None:
    try:
      self._mgr.reload()
    except Exception:  # pylint: disable=broad-except
      logger.exception("reloading the checkpoint manager failed")

  def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False
           ) -> bool:
    """Saves `state` and `meta` as step `step`.

    Args:
      step: the training step (a new, larger number than any saved one).
      state: pytree of arrays.
      meta: JSON-serialisable dict returned again by `restore`.
      metrics: scalars of this step; `metrics[best_metric]` ranks it.
      force: also wait until the checkpoint is committed to disk before
        returning (use it for the last save before exiting).

    Returns:
      True if a checkpoint was written, False if `step` already exists.

    Raises:
      CheckpointError: the write failed (this save, or the previous
        asynchronous one), naming the directory and the cause. The previous
        checkpoints are left intact.
    """
    if self.read_only:
      raise CheckpointError(f"{str(self.directory)!r} was opened read-only")
    self._raise_pending_errors()
    step = int(step)
    if step in self._mgr.all_steps():
      logger.info("checkpoint step %d already exists in %s; not saving again",
                  step, self.directory)
      return False
    items = {STATE: ocp.args.StandardSave(state),
             META: ocp.args.JsonSave(_jsonable(dict(meta or {})))}
    if self.verify_checksums:
      items[CHECKSUMS] = ocp.args.JsonSave(tree_checksums(state))
    metrics = None if metrics is None else _jsonable(dict(metrics))
    try:
      try:
        self._mgr.save(step, args=ocp.args.Composite(**items),
                       metrics=metrics, force=True)
      except Exception as e:  # pylint: disable=broad-except
        if not _cleanup_race(e):
          raise
        # Orbax removes the temporary folder an earlier failed save left
        # behind while that save's last writes (and TensorStore's lock files)
        # may still land in it or leave it: wait for them, then try once
        # more.
        logger.warning("retrying the save of step %d: %s", step, e)
        self._reset_manager()
        time.sleep(1.0)
        self._mgr.save(step, args=ocp.args.Composite(**items),
                       metrics=metrics, force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._reset_manager()
      raise CheckpointError(
          f"saving checkpoint step {step} to {str(self.directory)!r} failed: "
          f"{_describe_cause(e)}; {self._earlier_steps_note(step)}") from e
    self._pending_step = step
    if force or not self._async:
      self._raise_pending_errors()
    return True

  def wait_until_finished(self) -> None:
    """Blocks until the last save is committed; raises CheckpointError."""
    self._raise_pending_errors()

  def close(self) -> None:
    """Waits for pending saves (raising their errors) and releases threads."""
    try:
      if not self.read_only:
        self._raise_pending_errors()
    finally:
      try:
        self._mgr.close()
      finally:
        self._release_lock()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- restoring -----------------------------------------------------------

  def _read_metadata(self, step: int) -> Any:
    metadata = self._mgr.item_metadata(step)
    tree = metadata[STATE] if STATE in metadata else None
    if tree is None:
      if not (self.directory / str(step) / STATE /
              _PYTREE_METADATA_FILE).exists():
        raise CheckpointCorruptedError(
            step, self.directory,
            f"file '{STATE}/{_PYTREE_METADATA_FILE}' is missing")
      raise CheckpointError(f"checkpoint step {step} in "
                            f"{str(self.directory)!r}: Orbax found no "
                            f"'{STATE}' item metadata")
    return tree

  def restore_step(self, step: int, abstract_state: Any, *,
                   partial: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores exactly `step`; raises on any problem (no fallback).

    Args:
      step: a committed step.
      abstract_state: the tree to restore into (see `restore`).
      partial: `abstract_state` may be a part of the saved state (e.g. only
        the parameters and batch statistics, for an evaluation).

    Returns:
      `(state, meta)`.

    Raises:
      CheckpointStructureError (a ValueError): another architecture.
      CheckpointCorruptedError: the step is damaged (a CRC32 mismatch,
        truncated, garbled, missing or unparseable files); the message names
        the file or array and the kind of damage.
      CheckpointError: reading failed for another reason (out of memory, an
        I/O error, a library version mismatch, ...): nothing says the step is
        damaged.
    """
    try:
      return self._restore_step(step, abstract_state, partial)
    except (CheckpointStructureError, CheckpointCorruptedError):
      raise
    except Exception as e:  # pylint: disable=broad-except
      damage = _damage_of(e, self.directory / str(step))
      if damage is not None:
        raise CheckpointCorruptedError(step, self.directory, damage) from e
      step_dir = self.directory / str(step)
      raise CheckpointError(
          f"reading checkpoint step {step} in {str(self.directory)!r} "
          f"failed: {_describe_cause(e)}; this does not show damage to the "
          f"checkpoint, so nothing was moved: fix the cause (memory, file "
          f"system, library versions) and rerun; if the step is damaged "
          f"after all, move {str(step_dir)!r} elsewhere to resume from the "
          f"previous one") from e

  def _restore_step(self, step: int, abstract_state: Any, partial: bool
                    ) -> tuple[Any, dict[str, Any]]:
    where = f"checkpoint step {step} in {str(self.directory)!r}"
    check_structure(self._read_metadata(step), abstract_state, where=where,
                    allow_extra=partial)
    items = {META: ocp.args.JsonRestore()}
    has_sums = (self.directory / str(step) / CHECKSUMS).exists()
    if self.verify_checksums and has_sums:
      items[CHECKSUMS] = ocp.args.JsonRestore()
    elif self.verify_checksums:
      logger.warning("%s has no checksums; its arrays are not verified",
                     where)
    # Orbax reports a missing JSON item as a FileNotFoundError without a
    # file name or a KeyError: say which file, as damage.
    missing = _missing_json_items(self.directory / str(step), items)
    if missing:
      raise CheckpointCorruptedError(step, self.directory,
                                     f"{missing} is missing")
    if partial:
      # Only the leaves of `abstract_state` (e.g. params and batch_stats for
      # an evaluation): Orbax's partial PyTree restore of the state item.
      target = _with_default_sharding(abstract_state)
      state = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
          self.directory / str(step) / STATE,
          args=ocp.args.PyTreeRestore(
              item=target, partial_restore=True,
              restore_args=ocp.checkpoint_utils.construct_restore_args(
                  target)))
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
    else:
      items[STATE] = ocp.args.StandardRestore(abstract_state)
      restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
      state = restored[STATE]
    for name in items:
      if name != STATE and not isinstance(restored[name], dict):
        kind = ("null" if restored[name] is None
                else type(restored[name]).__name__)
        raise CheckpointCorruptedError(
            step, self.directory,
            f"file {name + '/' + JSON_ITEM_FILE!r} holds a JSON {kind}, not "
            f"an object")
    if CHECKSUMS in items:
      saved = restored[CHECKSUMS]
      not_crc = [p for p, crc in saved.items()
                 if not isinstance(crc, int) or isinstance(crc, bool)]
      if not_crc:
        raise CheckpointCorruptedError(
            step, self.directory,
            f"file {CHECKSUMS + '/' + JSON_ITEM_FILE!r} holds "
            f"{saved[not_crc[0]]!r} as the CRC32 of {not_crc[0]!r}, not an "
            f"integer")
      now = tree_checksums(state)
      if now and not saved:  # every save writes one CRC32 per array
        raise CheckpointCorruptedError(
            step, self.directory,
            f"file {CHECKSUMS + '/' + JSON_ITEM_FILE!r} holds no CRC32 (an "
            f"empty object): its arrays cannot be verified")
      unverified = [p for p in now if p not in saved]
      if unverified:  # e.g. saved sharded across hosts, now read whole
        logger.warning("%s: %d array(s) have no saved CRC32 and are not "
                       "verified (first: %r)", where, len(unverified),
                       unverified[0])
      bad = [p for p, crc in now.items() if p in saved and saved[p] != crc]
      if bad:
        more = f"; {len(bad) - 1} more array(s) differ too" if bad[1:] else ""
        raise CheckpointCorruptedError(
            step, self.directory,
            f"array {bad[0]!r} does not match its CRC32 (saved "
            f"0x{saved[bad[0]]:08x}, read 0x{now[bad[0]]:08x}): its stored "
            f"bytes changed after it was written{more}")
    return state, dict(restored[META] or {})

  def _quarantine(self, step: int, unfinished: bool = False) -> None:
    """Moves a step out of the way so later saves can reuse its number."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      src = self.directory / str(step)
      tag = "unfinished-" if unfinished else ""
      name = f"{step}-{tag}{time.strftime('%Y%m%d-%H%M%S')}"
      dst, n = self.corrupted_directory / name, 1
      while dst.exists():
        dst, n = self.corrupted_directory / f"{name}-{n}", n + 1
      try:
        self.corrupted_directory.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        logger.warning("moved the %s checkpoint %s to %s",
                       "unfinished" if unfinished else "damaged", src, dst)
      except OSError as e:
        logger.warning("could not move the %s checkpoint %s aside (%s)",
                       "unfinished" if unfinished else "damaged", src,
                       _describe_cause(e))
    _barrier(f"addernet_quarantine_{step}")
    self._reload()

  def _finish_deleting(self, step: int) -> None:
    """Removes what is left of a step the rotation was deleting."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      path = self.directory / str(step)
      try:
        shutil.rmtree(path)
        logger.info("removed the rest of checkpoint step %d (%s), which was "
                    "being deleted as an old checkpoint when the last run "
                    "stopped", step, path)
      except OSError as e:
        logger.warning("could not remove the rest of the old checkpoint %s, "
                       "which was being deleted when the last run stopped "
                       "(%s)", path, _describe_cause(e))
    _barrier(f"addernet_finish_deleting_{step}")
    self._reload()

  def _refuse_fresh_start(self) -> None:
    """Raises if damaged steps were moved aside earlier (see `restore`)."""
    quarantined = self.quarantined_steps()
    if quarantined:
      moved = str(self.corrupted_directory)
      raise CheckpointError(
          f"no checkpoint is left in {str(self.directory)!r} to resume from, "
          f"but {moved!r} holds damaged step(s) "
          f"{', '.join(map(str, quarantined))} moved there earlier; refusing "
          f"to start over from step 0 silently. To start over, move or "
          f"delete that folder (e.g. mv {moved} {moved}.old) and rerun; to "
          f"resume from one of those steps, repair it and move it back to "
          f"{str(self.directory)}/<step>")

  def restore(self, abstract_state: Any
              ) -> tuple[Any, dict[str, Any]] | None:
    """The latest valid checkpoint as `(state, meta)`, or None if none exist.

    Unfinished step directories are moved aside. A damaged step (see
    `restore_step`) is reported with a warning naming the step, the file or
    array and the damage, and the previous step is tried; once one restores,
    the damaged newer steps are moved to `<directory>.corrupted/` (so the run
    can write those step numbers again) and a warning says so. Nothing is
    moved when no step restores.

    Args:
      abstract_state: the tree to restore into, e.g.
        `jax.eval_shape(create_state, ...)` or a tree of
        `jax.ShapeDtypeStruct` carrying the target shardings.

    Returns:
      `(state, meta)`, or None when there is no checkpoint and none was ever
      moved aside (a fresh start).

    Raises:
      CheckpointStructureError (ValueError): the checkpoint belongs to another
        architecture (first mismatching parameter and both shapes named).
      CheckpointError: every step is damaged (each named, nothing moved); or
        no step is left but damaged ones were moved aside earlier (rather
        than starting over from step 0 silently); or a step could not be
        read for a reason other than damage (nothing moved).
    """
    if not self.read_only:
      self._raise_pending_errors()
    committed = self.all_steps()
    for step in self.unfinished_steps():
      if committed and step < committed[0]:
        # Older than every committed step: not a save cut short (saves are
        # of newer steps) but one being deleted by the rotation
        # (max_to_keep) when the process was killed.
        self._finish_deleting(step)
        continue
      logger.warning("ignoring unfinished checkpoint directory %s (no %s)",
                     self.directory / str(step), _METADATA_FILE)
      self._quarantine(step, unfinished=True)
    steps = self.all_steps()[::-1]
    damaged: list[CheckpointCorruptedError] = []
    for step in steps:
      try:
        state, meta = self.restore_step(step, abstract_state)
      except CheckpointCorruptedError as e:
        damaged.append(e)
        logger.warning("%s; trying the previous checkpoint", e)
        continue
      for bad in damaged:
        self._quarantine(bad.step)
      if damaged:
        logger.warning(
            "resuming from checkpoint step %d instead of step %d: the damaged "
            "step(s) %s were moved to %s", step, steps[0],
            ", ".join(str(e.step) for e in damaged), self.corrupted_directory)
      newer = [s for s in self.quarantined_steps()
               if s > step and s not in {e.step for e in damaged}]
      if newer:
        logger.warning("resuming from checkpoint step %d although %s holds "
                       "damaged newer step(s) %s", step,
                       self.corrupted_directory, ", ".join(map(str, newer)))
      return state, meta
    if damaged:
      raise CheckpointError(
          f"every checkpoint in {str(self.directory)!r} is damaged, so there "
          f"is nothing to resume from: "
          + "; ".join(f"step {e.step}: {e.damage}" for e in damaged)
          + f". Nothing was moved or deleted; refusing to start over from "
          f"step 0 silently. To start over, move the folder aside (e.g. mv "
          f"{self.directory} {self.directory}.damaged) and rerun; to resume, "
          f"restore the damaged files from a copy")
    self._refuse_fresh_start()
    return None


def latest_meta(workdir_or_checkpoints_dir: str | os.PathLike
                ) -> dict[str, Any]:
  """The meta saved with the newest committed step ({} when there is none
  or it cannot be read): what explains a structure mismatch, e.g. a
  checkpoint of another model. Read-only."""
  directory = _resolve_dir(workdir_or_checkpoints_dir)
  if not directory.is_dir():
    return {}
  mgr = CheckpointManager(directory, read_only=True, async_save=False)
  try:
    step = mgr.latest_step()
    return {} if step is None else mgr.meta(step)
  except Exception:  # pylint: disable=broad-except
    return {}
  finally:
    mgr.close()


class EvalRestore(NamedTuple):
  """What `restore_for_eval(..., with_meta=True)` returns."""
  state: Any  # the restored tree
  meta: dict[str, Any]  # the step's meta (empty if it has none)
  which: str  # "best" or "latest": the one restored (no best: the latest)


def _workdir_of(checkpoints_dir: Path) -> Path:
  """The training workdir of a checkpoint directory (its parent when the
  directory is the standard `<workdir>/checkpoints`)."""
  return (checkpoints_dir.parent if checkpoints_dir.name == "checkpoints"
          else checkpoints_dir)


class _StepRemovedWhileReading(CheckpointError):
  """The step being read was deleted meanwhile (a training run in the same
  workdir keeps only its newest checkpoints)."""

  def __init__(self, step: int):
    super().__init__(f"checkpoint step {step} was removed while being read")
    self.step = step


# How often evaluation re-reads after a training run deleted the step it read.
_EVAL_READ_ATTEMPTS = 5


def restore_for_eval(workdir_or_checkpoints_dir: str | os.PathLike,
                     abstract_state: Any, which: str = "latest", *,
                     with_meta: bool = False,
                     best_metric: str = "eval_top1") -> Any:
  """Restores a state for evaluation, read-only (nothing is ever moved).

  Args:
    workdir_or_checkpoints_dir: a training workdir (its `checkpoints/` is
      used) or a checkpoint directory.
    abstract_state: the tree to restore into; it may be a part of the saved
      state (e.g. only `params` and `batch_stats`).
    which: "latest" (the newest readable step; falls back past damaged
      ones with a warning naming the damage) or "best" (by `best_metric`,
      saved with each step, higher is better; the latest if no step has it).
    best_metric: what training ranked its steps by ("eval_psnr" for SR).

  Returns:
    The restored tree.

  Raises:
    CheckpointError: no checkpoint, every one damaged (each named), the
      "best" one damaged, or a step unreadable for another reason.
    CheckpointStructureError (ValueError): another architecture.

  With `with_meta=True` it returns an `EvalRestore` (state, meta, which).

  A training run may save into the same workdir meanwhile: a step it
  deletes while this reads it (it keeps the newest few) is not damage; the
  steps are listed and read again.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  for _ in range(_EVAL_READ_ATTEMPTS):
    try:
      return _restore_for_eval_once(workdir_or_checkpoints_dir,
                                    abstract_state, which, with_meta,
                                    best_metric)
    except _StepRemovedWhileReading as e:
      logger.warning(
          "%s (a training run saving to %s keeps only its newest "
          "checkpoints): reading the newest again", e,
          _resolve_dir(workdir_or_checkpoints_dir))
  raise CheckpointError(
      f"the checkpoints in {str(_resolve_dir(workdir_or_checkpoints_dir))!r} "
      f"were removed while being read {_EVAL_READ_ATTEMPTS} times: a "
      f"training run is saving there; evaluate after it, or a copy")


def _restore_for_eval_once(workdir_or_checkpoints_dir: str | os.PathLike,
                           abstract_state: Any, which: str, with_meta: bool,
                           best_metric: str) -> Any:
  """One attempt of `restore_for_eval`."""
  directory = _resolve_dir(workdir_or_checkpoints_dir)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint directory at {str(directory)!r}")
  mgr = CheckpointManager(directory, read_only=True, async_save=False,
                          best_metric=best_metric)
  try:
    steps = mgr.all_steps()[::-1]
    step_of = None if steps else workdir_of_step(directory)
    if step_of is not None:
      raise CheckpointError(
          f"{str(directory)!r} is one checkpoint step, not a workdir: pass "
          f"the workdir {str(step_of)!r} (--which "
          f"chooses "
          f"the latest or the best step)")
    if not steps:
      moved = mgr.quarantined_steps()
      raise CheckpointError(
          f"no checkpoint found in {str(directory)!r}" +
          (f" (damaged step(s) {', '.join(map(str, moved))} were moved to "
           f"{str(mgr.corrupted_directory)!r})" if moved else
           " (training saves its first one at the end of the first epoch, "
           "or every --config.checkpoint_every_steps steps, and when "
           "stopped by SIGTERM or Ctrl-C)"))
    unfinished = mgr.unfinished_steps()
    if unfinished and unfinished[-1] > steps[0]:
      # Training moves these aside when it resumes; evaluation only reads.
      logger.warning(
          "ignoring checkpoint step(s) %s in %s: no %s (unfinished, or the "
          "file was lost); the newest complete step is %d",
          ", ".join(map(str, unfinished)), directory, _METADATA_FILE,
          steps[0])

    def restored(step: int, kind: str) -> Any:
      try:
        state, meta = mgr.restore_step(step, abstract_state, partial=True)
      except CheckpointError as e:
        if not (directory / str(step) / _METADATA_FILE).exists():
          raise _StepRemovedWhileReading(step) from e
        raise
      if not with_meta:
        return state
      return EvalRestore(state, meta if isinstance(meta, dict) else {}, kind)

    if which == "best":
      best = mgr.best_step()
      if best is None:
        logger.warning("no checkpoint in %s has a %r metric; using the latest",
                       directory, mgr.best_metric)
      else:
        return restored(best, "best")
    damaged = []
    for step in steps:
      try:
        return restored(step, "latest")
      except CheckpointCorruptedError as e:
        damaged.append(e)
        logger.warning("%s; trying the previous checkpoint", e)
    raise CheckpointError(
        f"every checkpoint in {str(directory)!r} is damaged: "
        + "; ".join(f"step {e.step}: {e.damage}" for e in damaged))
  finally:
    mgr.close()
