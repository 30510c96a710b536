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
  restoring; a step that fails to restore (truncated or garbled files, missing
  metadata, checksum mismatch) is reported with a warning, moved aside to
  `<directory>.corrupted/` and the previous step is used instead;
- structure check: a checkpoint of another architecture is refused before any
  array is read, with a ValueError naming the first mismatching parameter and
  both shapes;
- errors while saving (disk full, permission denied, ...) raise
  `CheckpointError` naming the directory, the step and the cause.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

STATE, META, CHECKSUMS = "state", "meta", "checksums"
_METADATA_FILE = "_CHECKPOINT_METADATA"
_ERRNO_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.EFBIG: "the file size limit was reached",
}


class CheckpointError(RuntimeError):
  """A checkpoint could not be written or no valid checkpoint could be read."""


class CheckpointStructureError(ValueError):
  """A checkpoint's tree does not match the model it is restored into."""


# --------------------------------------------------------------------------
# Helpers.


def _describe_cause(exc: BaseException) -> str:
  """`Type: message` of `exc`, with a hint for the OSError behind it, if any."""
  seen, cur, os_error = set(), exc, None
  while cur is not None and id(cur) not in seen:
    seen.add(id(cur))
    if isinstance(cur, OSError) and cur.errno in _ERRNO_HINTS:
      os_error = cur
      break
    cur = cur.__cause__ or cur.__context__
  text = f"{type(exc).__name__}: {exc}"
  if os_error is not None:
    text = f"{_ERRNO_HINTS[os_error.errno]} ({text})"
  else:
    low = str(exc).lower()
    for key, hint in (("no space left", "the disk is full"),
                      ("permission denied", "permission denied"),
                      ("read-only file system", "the file system is read-only")):
      if key in low:
        text = f"{hint} ({text})"
        break
  return text


def check_writable(path: str | os.PathLike) -> Path:
  """Creates `path` if needed and checks a file can be written in it.

  Call at startup, before any training, so that an unwritable workdir is a
  one-line error instead of a failure hours later at the first checkpoint.

  Returns:
    The path, resolved.

  Raises:
    CheckpointError: naming the path and the cause (permission denied,
      read-only file system, a file in the way, disk full, ...).
  """
  path = Path(path).expanduser()
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
    allow_extra: accept leaves of the checkpoint absent from `abstract_state`
      (restoring only a part, e.g. the parameters for evaluation).
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
          f"written by another architecture or configuration?")
    if (saved[path] is not None and wanted[path] is not None
        and saved[path] != wanted[path]):
      raise CheckpointStructureError(
          f"{where} does not match the model: first mismatching parameter "
          f"{path!r} has shape {saved[path]} in the checkpoint but "
          f"{wanted[path]} in the model (another architecture or "
          f"num_classes?)")
  if not allow_extra:
    extra = sorted((p for p in saved if p not in wanted), key=_sort_key)
    if extra:
      raise CheckpointStructureError(
          f"{where} does not match the model: the checkpoint has parameter "
          f"{extra[0]!r} (shape {saved[extra[0]]}) that the model lacks "
          f"({len(extra)} such entries)")


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
  path = Path(path).expanduser()
  sub = path / "checkpoints"
  return sub if sub.is_dir() else path


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------
# The manager.


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
    self.directory = Path(directory).expanduser().absolute()
    if not read_only:
      check_writable(self.directory)
    elif not self.directory.is_dir():
      raise CheckpointError(f"checkpoint directory {str(self.directory)!r} "
                            f"does not exist")
    self.max_to_keep = max_to_keep
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.read_only = read_only
    self.verify_checksums = verify_checksums
    self._async = async_save
    self._pending_step: int | None = None
    self._mgr = self._make_manager()

  # -- construction --------------------------------------------------------

  def _metric(self, metrics: Mapping[str, Any]) -> float:
    worst = -math.inf if self.best_mode == "max" else math.inf
    try:
      value = float(metrics[self.best_metric])
    except (KeyError, TypeError, ValueError):
      return worst
    return worst if math.isnan(value) else value

  def _make_manager(self) -> ocp.CheckpointManager:
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
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_handlers=handlers)

  # -- queries -------------------------------------------------------------

  def _is_finalized(self, step: int) -> bool:
    return (self.directory / str(step) / _METADATA_FILE).exists()

  def all_steps(self) -> list[int]:
    """Committed steps, ascending (unfinished step directories excluded)."""
    return sorted(s for s in self._mgr.all_steps() if self._is_finalized(s))

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

  # -- saving --------------------------------------------------------------

  def _raise_pending_errors(self) -> None:
    """Waits for the background save and turns its failure into an error."""
    step, self._pending_step = self._pending_step, None
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._reset_manager()
      raise CheckpointError(
          f"saving checkpoint step {step} to {str(self.directory)!r} failed: "
          f"{_describe_cause(e)}; the previous checkpoints are intact") from e

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
    self._mgr = self._make_manager()

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
      self._mgr.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                     force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._reset_manager()
      raise CheckpointError(
          f"saving checkpoint step {step} to {str(self.directory)!r} failed: "
          f"{_describe_cause(e)}; the previous checkpoints are intact") from e
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
      self._mgr.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  # -- restoring -----------------------------------------------------------

  def _read_metadata(self, step: int) -> Any:
    metadata = self._mgr.item_metadata(step)
    tree = metadata[STATE] if STATE in metadata else None
    if tree is None:
      raise CheckpointError(f"step {step} has no '{STATE}' item metadata")
    return tree

  def restore_step(self, step: int, abstract_state: Any, *,
                   partial: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores exactly `step`; raises on any problem (no fallback).

    Raises:
      CheckpointStructureError (a ValueError): another architecture.
      Exception: anything unreadable, or CheckpointError on a checksum
        mismatch.
    """
    where = f"checkpoint step {step} in {str(self.directory)!r}"
    check_structure(self._read_metadata(step), abstract_state, where=where,
                    allow_extra=partial)
    items = {META: ocp.args.JsonRestore()}
    has_sums = (self.directory / str(step) / CHECKSUMS).exists()
    if self.verify_checksums and has_sums:
      items[CHECKSUMS] = ocp.args.JsonRestore()
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
    if CHECKSUMS in items:
      saved = restored[CHECKSUMS] or {}
      now = tree_checksums(state)
      bad = [p for p, crc in now.items() if p in saved and saved[p] != crc]
      if bad:
        raise CheckpointError(f"{where}: checksum mismatch in {len(bad)} "
                              f"array(s), first {bad[0]!r}")
    return state, dict(restored[META] or {})

  def _quarantine(self, step: int) -> None:
    """Moves a bad step out of the way so later saves can reuse its number."""
    if self.read_only:
      return
    if jax.process_index() == 0:
      src = self.directory / str(step)
      dst_root = self.directory.parent / (self.directory.name + ".corrupted")
      dst = dst_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
      try:
        dst_root.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
        logger.warning("moved the unreadable checkpoint %s to %s", src, dst)
      except OSError as e:
        logger.warning("could not move the unreadable checkpoint %s aside "
                       "(%s)", src, _describe_cause(e))
    _barrier(f"addernet_quarantine_{step}")
    self._reload()

  def restore(self, abstract_state: Any
              ) -> tuple[Any, dict[str, Any]] | None:
    """The latest valid checkpoint as `(state, meta)`, or None if none exist.

    Unfinished step directories are ignored. A step that cannot be restored
    (corrupted or truncated files, checksum mismatch) is logged as a warning,
    moved aside to `<directory>.corrupted/`, and the previous step is tried.

    Args:
      abstract_state: the tree to restore into, e.g.
        `jax.eval_shape(create_state, ...)` or a tree of
        `jax.ShapeDtypeStruct` carrying the target shardings.

    Raises:
      CheckpointStructureError (ValueError): the checkpoint belongs to another
        architecture (first mismatching parameter and both shapes named).
      CheckpointError: checkpoints exist but none could be restored.
    """
    if not self.read_only:
      self._raise_pending_errors()
    unfinished = sorted(set(self._mgr.all_steps()) - set(self.all_steps()))
    for step in unfinished:
      logger.warning("ignoring unfinished checkpoint directory %s (no %s)",
                     self.directory / str(step), _METADATA_FILE)
      self._quarantine(step)
    steps = self.all_steps()[::-1]
    if not steps:
      return None
    failures = []
    for step in steps:
      try:
        state, meta = self.restore_step(step, abstract_state)
      except CheckpointStructureError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        cause = _describe_cause(e)
        failures.append(f"step {step}: {cause}")
        logger.warning(
            "checkpoint step %d in %s is corrupted or unreadable (%s); "
            "falling back to the previous checkpoint", step, self.directory,
            cause)
        self._quarantine(step)
        continue
      if failures:
        logger.warning("resuming from checkpoint step %d instead of step %d "
                       "(newer checkpoints were unreadable)", step, steps[0])
      return state, meta
    raise CheckpointError(
        f"no checkpoint in {str(self.directory)!r} could be restored: "
        + "; ".join(failures))


def restore_for_eval(workdir_or_checkpoints_dir: str | os.PathLike,
                     abstract_state: Any, which: str = "latest") -> Any:
  """Restores a state for evaluation, read-only.

  Args:
    workdir_or_checkpoints_dir: a training workdir (its `checkpoints/` is
      used) or a checkpoint directory.
    abstract_state: the tree to restore into; it may be a part of the saved
      state (e.g. only `params` and `batch_stats`).
    which: "latest" (the newest readable step; falls back past corrupted
      ones with a warning) or "best" (by the metric saved with each step;
      the latest if no step has metrics).

  Returns:
    The restored tree.

  Raises:
    CheckpointError: no checkpoint, or none readable.
    CheckpointStructureError (ValueError): another architecture.
  """
  if which not in ("latest", "best"):
    raise ValueError(f"which must be 'latest' or 'best', got {which!r}")
  directory = _resolve_dir(workdir_or_checkpoints_dir)
  if not directory.is_dir():
    raise CheckpointError(f"no checkpoint directory at {str(directory)!r}")
  mgr = CheckpointManager(directory, read_only=True, async_save=False)
  try:
    steps = mgr.all_steps()[::-1]
    if not steps:
      raise CheckpointError(f"no checkpoint found in {str(directory)!r}")
    if which == "best":
      best = mgr.best_step()
      if best is None:
        logger.warning("no checkpoint in %s has a %r metric; using the latest",
                       directory, mgr.best_metric)
      else:
        return mgr.restore_step(best, abstract_state, partial=True)[0]
    failures = []
    for step in steps:
      try:
        return mgr.restore_step(step, abstract_state, partial=True)[0]
      except CheckpointStructureError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {_describe_cause(e)}")
        logger.warning("checkpoint step %d in %s is unreadable (%s); trying "
                       "the previous one", step, directory, failures[-1])
    raise CheckpointError(f"no checkpoint in {str(directory)!r} could be "
                          f"restored: " + "; ".join(failures))
  finally:
    mgr.close()
