"""Data parallelism over every device of every host.

One 1-D mesh axis, `BATCH_AXIS`, spans all global devices. The global batch
is split along it (each process loads only the rows of its own devices),
parameters are replicated, and the per-device step runs in `shard_map` with
`check_vma=False` and explicit `lax.pmean` of the gradients and BatchNorm
statistics (classic pmap semantics). With `check_vma=True` the gradient of a
per-shard loss w.r.t. replicated parameters is already summed over the axis
and a following `pmean` is a no-op: N devices would step with N times the
gradient (docs/design.md §5). `data_parallel` always passes `check_vma=False`.

Multi-host: call `initialize_distributed` before anything else touches JAX.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from addernet_jax.preemption import PreemptionFlag, install_preemption_handler

logger = logging.getLogger(__name__)

BATCH_AXIS = "batch"

__all__ = ["BATCH_AXIS", "initialize_distributed", "make_mesh",
           "replicated_sharding", "batch_sharding", "process_batch_slice",
           "global_batch_from_local", "data_parallel", "PreemptionFlag",
           "install_preemption_handler", "detect_cluster",
           "CPU_DISPATCH_DEPTH", "dispatch_depth", "DispatchWindow"]


# --------------------------------------------------------------------------
# Multi-host start-up.


def _int_env(name: str) -> int | None:
  try:
    return int(os.environ[name])
  except (KeyError, ValueError):
    return None


def detect_cluster() -> str | None:
  """The multi-process launcher this process runs under, or None.

  Recognises what `jax.distributed.initialize()` can configure by itself:
  SLURM job steps with several tasks (`srun`), Open MPI (`mpirun`), and
  Cloud TPU VMs (a TPU pod slice: every worker runs the same command). A
  single-task SLURM allocation or a plain machine is not a cluster: JAX's
  SLURM detection would otherwise restrict the process to one GPU.
  """
  ntasks = _int_env("SLURM_STEP_NUM_TASKS") or _int_env("SLURM_NTASKS")
  if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
    if ntasks is not None and ntasks > 1:
      return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in os.environ or "PMIX_NAMESPACE" in os.environ:
    size = _int_env("OMPI_COMM_WORLD_SIZE")
    if size is not None and size > 1:
      return "ompi"
  if any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES",
                                   "MEGASCALE_COORDINATOR_ADDRESS")):
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
      return "tpu"
  try:  # Cloud TPU VM (GCE): JAX queries the metadata server itself.
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
    if getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False):
      return "tpu"
  except ImportError:  # pragma: no cover
    pass
  return None


def _enable_cpu_collectives() -> None:
  """Cross-process collectives on the CPU backend (Gloo over TCP).

  The default in JAX 0.10; older versions had none, and a multi-process CPU
  run then fails at its first collective.
  """
  try:
    if not getattr(jax.config, "jax_cpu_collectives_implementation", None):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, KeyError, ValueError):  # pragma: no cover
    pass


def _check_port_free(coordinator_address: str) -> None:
  """ValueError if process 0 cannot listen on the coordinator's port (JAX
  crashed with a segmentation fault, the other processes waited)."""
  import socket  # pylint: disable=g-import-not-at-top
  port_text = coordinator_address.rsplit(":", 1)[1]
  if not port_text.isdigit():
    raise ValueError(f"coordinator_address must be HOST:PORT, got "
                     f"{coordinator_address!r}")
  try:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      # An earlier run's closed connections (TIME_WAIT) do not count.
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind(("", int(port_text)))
  except OSError as e:
    raise ValueError(f"process 0 cannot listen on port {port_text} of "
                     f"coordinator_address {coordinator_address!r} ({e}): "
                     f"another program (an earlier run, or another process "
                     f"started with --process_id 0) holds it; choose "
                     f"another port, and give each process its own "
                     f"--process_id") from None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, *,
                           initialization_timeout: int = 300) -> bool:
  """Starts JAX's multi-process runtime where needed; call it first.

  - With `coordinator_address` (HOST:PORT of process 0), `num_processes` and
    `process_id` given: `jax.distributed.initialize(...)` with them and
    cluster detection off (a manual launch: the same command on every host,
    process_id 0..N-1, each process using all its local devices). On CPU
    the processes exchange data with Gloo collectives. Some of them given
    inside a detected cluster: JAX fills in the rest.
  - With none given: auto-detection where JAX's cluster detection applies
    (`detect_cluster`: TPU pod slices, SLURM `srun` with several tasks, Open
    MPI), i.e. `jax.distributed.initialize()` without arguments; anywhere
    else a single-process run and a no-op.
  - Calling it again, or after JAX was initialised elsewhere, is a no-op.

  Must run before any other JAX call that touches devices. A peer that never
  arrives makes JAX abort the process after `initialization_timeout` seconds.

  Returns:
    True if the distributed runtime is (now) initialised.

  Raises:
    ValueError: an incomplete or inconsistent explicit set of arguments.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  if getattr(distributed.global_state, "client", None) is not None:
    return True
  explicit = {"coordinator_address": coordinator_address,
              "num_processes": num_processes, "process_id": process_id}
  given = {k: v for k, v in explicit.items() if v is not None}
  if given and num_processes == 1 and process_id in (None, 0):
    return False  # explicitly single-process
  if given:
    if coordinator_address is None:
      cluster = detect_cluster()
      if cluster is None:
        raise ValueError(
            f"coordinator_address (HOST:PORT of process 0) is required with "
            f"{sorted(given)} outside a SLURM/MPI/TPU cluster")
    if num_processes is not None and num_processes < 1:
      raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if (process_id is not None and num_processes is not None
        and not 0 <= process_id < num_processes):
      raise ValueError(f"process_id must be in [0, {num_processes}), got "
                       f"{process_id}")
    if coordinator_address is not None and ":" not in coordinator_address:
      raise ValueError(f"coordinator_address must be HOST:PORT, got "
                       f"{coordinator_address!r}")
    _enable_cpu_collectives()
    if process_id == 0 and coordinator_address is not None:
      _check_port_free(coordinator_address)
    logger.info("joining jax.distributed as process %s of %s (coordinator "
                "%s); waiting up to %d s for every process: start the same "
                "command on every host", process_id, num_processes,
                coordinator_address, initialization_timeout)
    kwargs = {}
    if len(given) == 3:
      # A fully explicit launch: keep JAX from also applying a detected
      # cluster's per-process device restriction (under SLURM it would pin
      # each process to GPU $SLURM_LOCALID); every process uses all its
      # local devices (JAX_LOCAL_DEVICE_IDS still restricts them).
      kwargs["cluster_detection_method"] = "deactivate"
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=initialization_timeout,
                               **kwargs)
    logger.info("jax.distributed initialised: process %d of %d",
                jax.process_index(), jax.process_count())
    return True
  cluster = detect_cluster()
  if cluster is None:
    return False
  logger.info("detected a %s cluster: initialising jax.distributed", cluster)
  _enable_cpu_collectives()
  jax.distributed.initialize(initialization_timeout=initialization_timeout)
  return True


# --------------------------------------------------------------------------
# Agreement between processes (a pod's hosts must run the same command).


def _failing_processes(ok: bool) -> list[int]:
  """The processes whose `ok` is False; the same list on every process (a
  collective: every process must call it)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  flags = multihost_utils.process_allgather(np.array([int(bool(ok))],
                                                     np.int32))
  return [i for i, f in enumerate(np.asarray(flags).reshape(-1)) if not f]


def broadcast_text(text: str) -> str:
  """Process 0's `text`, on every process (a collective)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(text.encode(), np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(
      np.array(len(data), np.int32)))
  buffer = data.copy() if jax.process_index() == 0 else np.zeros(size,
                                                                 np.uint8)
  return bytes(np.asarray(
      multihost_utils.broadcast_one_to_all(buffer))).decode()


def check_same_config(config: Mapping[str, Any]) -> None:
  """ValueError on every process unless all processes run with the config of
  process 0 (a flag given to one host only trained replicas that drift
  apart, or hung at the end, without a word). No-op in one process."""
  if jax.process_count() == 1:
    return
  import json  # pylint: disable=g-import-not-at-top
  mine = json.dumps(config, sort_keys=True, default=str)
  first = broadcast_text(mine)
  failing = _failing_processes(mine == first)
  if not failing:
    return
  advice = "every host must run the same command"
  if mine != first:
    from flax import traverse_util  # pylint: disable=g-import-not-at-top
    here, there = (traverse_util.flatten_dict(json.loads(text), sep=".")
                   for text in (mine, first))
    diffs = [f"{k} {here.get(k)!r} here, {there.get(k)!r} on process 0"
             for k in sorted(set(here) | set(there))
             if here.get(k) != there.get(k)]
    raise ValueError(f"the config of process {jax.process_index()} differs "
                     f"from process 0's: {'; '.join(diffs[:5])}; {advice}")
  raise ValueError(f"the config of process(es) "
                   f"{', '.join(map(str, failing))} differs from process 0's "
                   f"(their errors name the fields); {advice}")


def check_shared_directory(path: Any, what: str = "--workdir",
                           wait_s: float = 60.0) -> None:
  """ValueError on every process unless `path` is one folder all processes
  see (each writes its part of every checkpoint there): process 0 writes a
  file, the others look for it for up to `wait_s` seconds (network file
  systems may show it late). A folder per host hung at the first save and
  lost the checkpoint. No-op in one process."""
  if jax.process_count() == 1:
    return
  import time  # pylint: disable=g-import-not-at-top
  import uuid  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  marker = Path(path) / f".shared-check-{broadcast_text(uuid.uuid4().hex)}"
  if jax.process_index() == 0:
    marker.write_text("written by process 0 to check the folder is shared\n")
  _failing_processes(True)  # a barrier: the file is written
  deadline = time.monotonic() + wait_s
  while not marker.exists() and time.monotonic() < deadline:
    time.sleep(1.0)
  missing = _failing_processes(marker.exists())
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if missing:
    raise ValueError(
        f"{what} {str(path)!r} is not one folder shared by every process: "
        f"process(es) {', '.join(map(str, missing))} do not see the file "
        f"process 0 wrote there. Every process writes its part of each "
        f"checkpoint into it: give every host the same path on a shared file "
        f"system (NFS, a mounted bucket)")


def check_processes_agree(config: Mapping[str, Any], workdir: Any) -> None:
  """The start-up checks of a multi-process run, on every process: the same
  config (`check_same_config`) and one shared `workdir`
  (`check_shared_directory`). No-op in one process."""
  check_same_config(config)
  check_shared_directory(workdir)


# --------------------------------------------------------------------------
# Mesh and shardings.


def make_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named `BATCH_AXIS` over `devices` (default: all, global).

  Devices are ordered by (process, id), so each process's devices form one
  contiguous block of the batch axis and `process_batch_slice` is a slice.
  The axis type is `Auto` (not `make_mesh`'s `Explicit` default) so that
  un-annotated inputs can enter `shard_map` (docs/design.md §5).
  """
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  devices.sort(key=lambda d: (d.process_index, d.id))
  axis_type = getattr(getattr(jax.sharding, "AxisType", None), "Auto", None)
  if axis_type is None:  # JAX without axis types: every axis is "auto"
    return jax.sharding.Mesh(np.array(devices), (BATCH_AXIS,))
  return jax.sharding.Mesh(np.array(devices), (BATCH_AXIS,),
                           axis_types=(axis_type,))


def describe_devices(mesh: jax.sharding.Mesh,
                     global_batch_size: int | None = None) -> str:
  """One line naming what a run computes on, e.g. "8 devices (cpu x8) in 1
  process, this is process 0; global batch 64 = 8 per device" (the batch part
  only with `global_batch_size`): a run that fell back to the CPU says so."""
  devices = list(mesh.devices.flat)
  kinds = collections.Counter(
      f"{d.platform} {d.device_kind}".strip() if d.platform != "cpu"
      else "cpu" for d in devices)
  kinds_text = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
  processes = len({d.process_index for d in devices})
  line = (f"{len(devices)} device{'s' * (len(devices) != 1)} ({kinds_text}) "
          f"in {processes} process{'es' * (processes != 1)}, this is process "
          f"{jax.process_index()}")
  if global_batch_size is None:
    return line
  per_device = global_batch_size / len(devices)
  return (f"{line}; global batch {global_batch_size} = {per_device:g} per "
          "device")


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The leading (batch) axis split over `BATCH_AXIS`."""
  return NamedSharding(mesh, P(BATCH_AXIS))


def nearest_multiples(value: Any, num_devices: int) -> list[int]:
  """The positive multiples of `num_devices` next to `value` (one or two), to
  suggest in place of a batch size the devices cannot share evenly."""
  if not isinstance(value, (int, np.integer)) or value < 1:
    return [num_devices]
  below = value // num_devices * num_devices
  return [m for m in (below, below + num_devices) if m >= 1]


def _check_divisible(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
  n = mesh.devices.size
  if (not isinstance(global_batch_size, (int, np.integer))
      or global_batch_size < 1):
    raise ValueError(f"global batch size must be a positive int, got "
                     f"{global_batch_size!r}")
  if global_batch_size % n:
    raise ValueError(
        f"global batch size {global_batch_size} is not divisible by the "
        f"number of devices {n}; choose a multiple of {n} (e.g. "
        f"{' or '.join(map(str, nearest_multiples(global_batch_size, n)))})")
  return n


def process_batch_slice(global_batch_size: int,
                        mesh: jax.sharding.Mesh | None = None) -> slice:
  """The rows of every global batch that this process loads.

  Args:
    global_batch_size: rows of the global batch (`config.batch_size`).
    mesh: the data-parallel mesh (default `make_mesh()`).

  Raises:
    ValueError: the global batch is not divisible by the device count (both
      named), or this process's devices are not contiguous on the mesh.
  """
  mesh = make_mesh() if mesh is None else mesh
  _check_divisible(global_batch_size, mesh)
  index_map = batch_sharding(mesh).addressable_devices_indices_map(
      (global_batch_size,))
  ranges = sorted((idx[0].start or 0, idx[0].stop or global_batch_size)
                  for idx in index_map.values())
  start, stop = ranges[0][0], ranges[-1][1]
  if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
    raise ValueError("this process's devices are not contiguous on the mesh; "
                     "build it with parallel.make_mesh()")
  return slice(start, stop)


def global_batch_from_local(local: Mapping[str, np.ndarray],
                            mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of each array into global batch arrays.

  Every process passes its `process_batch_slice` rows (same row count on
  every process); the result is a dict of global `jax.Array`s sharded along
  `BATCH_AXIS`, without any cross-host transfer.
  """
  sharding = batch_sharding(mesh)
  n_local = len(mesh.local_devices)
  out = {}
  for name, value in local.items():
    value = np.asarray(value)
    if value.ndim == 0 or value.shape[0] % n_local:
      raise ValueError(
          f"global_batch_from_local: {name!r} has shape {value.shape}; its "
          f"leading axis must be divisible by the {n_local} local devices")
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, value,
                                                       global_shape)
  return out


# --------------------------------------------------------------------------
# shard_map.


def data_parallel(fn: Callable[..., Any], mesh: jax.sharding.Mesh,
                  in_specs: Any, out_specs: Any) -> Callable[..., Any]:
  """`shard_map(fn)` over `mesh` with pmap semantics (`check_vma=False`).

  Inside `fn`, arrays with spec `P(BATCH_AXIS)` are the local shard and
  replicated inputs (`P()`) are the full value; reduce explicitly with
  `jax.lax.pmean(x, BATCH_AXIS)` (gradients, metrics) and give BatchNorm
  `axis_name=BATCH_AXIS`. Disabling the varying-manual-axes check keeps the
  gradient of a per-shard loss per-shard (so `pmean` averages it) and lets
  Pallas kernels run inside.

  Works with `jax.shard_map` (JAX >= 0.7, `check_vma`) and falls back to
  `jax.experimental.shard_map.shard_map` (`check_rep`) on older versions.
  """
  shard_map = getattr(jax, "shard_map", None)
  if shard_map is not None:
    return shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     check_vma=False)
  from jax.experimental.shard_map import shard_map as legacy  # pylint: disable=g-import-not-at-top
  return legacy(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                check_rep=False)


# --------------------------------------------------------------------------
# How far the host may run ahead of the devices.
#
# XLA:CPU (jaxlib 0.10) deadlocks when the host dispatches too far ahead of
# several CPU devices of one process. Its client runs every multi-device
# program as one task per device on a thread pool of max(#cores, #devices)
# threads (2 threads for 2 devices on a 2-core machine), one such program at a
# time, and the per-device tasks of a program with a collective (the
# gradient/metric `pmean`, the evaluation's `psum`) block in the collective
# until every device's task has arrived. The pool also runs the "launch" tasks
# that enqueue each dispatched program, and a launch waits while its device
# already has 32 programs launched and unfinished. Once the host is 32
# programs ahead, such a waiting launch holds a pool thread; if the other
# threads hold the devices of the running collective that already arrived,
# the last device's task never gets a thread: "Expected 2 threads to join the
# rendezvous, but only 1 of them arrived on time", and XLA aborts the process
# (exit 134) after 40 s. Load on the machine makes devices slower than the
# host and so the run-ahead (and the abort) likelier. Keeping fewer than 32
# programs in flight per device means a launch never waits, so no pool thread
# is ever held by one. GPU, TPU and single-device CPU runs are unaffected and
# keep their unbounded asynchronous dispatch.

#: Programs a loop keeps in flight on a multi-device CPU mesh; far below
#: XLA:CPU's 32 per device, and deep enough to overlap the host's dispatch
#: with the devices' work (the devices run one program at a time anyway).
CPU_DISPATCH_DEPTH = 4


def dispatch_depth(mesh: jax.sharding.Mesh) -> int | None:
  """How many dispatched programs a loop over `mesh` may leave unfinished.

  `CPU_DISPATCH_DEPTH` when this process has several CPU devices on `mesh`
  (see the comment above: deeper dispatch can deadlock XLA:CPU), else None
  (no limit: one device, GPUs and TPUs).
  """
  local = [d for d in mesh.devices.flat
           if d.process_index == jax.process_index()]
  if len(local) > 1 and all(d.platform == "cpu" for d in local):
    return CPU_DISPATCH_DEPTH
  return None


class DispatchWindow:
  """Bounds the programs a host loop has dispatched but not yet finished.

  Call `push(outputs)` with an output of every program the loop dispatches
  (any pytree of arrays); once more than `depth` are pending it blocks until
  the oldest is ready. `depth=None` never blocks (nor keeps references).
  """

  def __init__(self, depth: int | None):
    if depth is not None and depth < 1:
      raise ValueError(f"DispatchWindow depth must be >= 1 or None, got "
                       f"{depth}")
    self.depth = depth
    self._pending: collections.deque[Any] = collections.deque()

  @classmethod
  def for_mesh(cls, mesh: jax.sharding.Mesh) -> "DispatchWindow":
    return cls(dispatch_depth(mesh))

  def push(self, outputs: Any) -> None:
    if self.depth is None:
      return
    self._pending.append(outputs)
    while len(self._pending) > self.depth:
      jax.block_until_ready(self._pending.popleft())

  def clear(self) -> None:
    """Forgets the pending outputs (after the loop blocked on them itself)."""
    self._pending.clear()
