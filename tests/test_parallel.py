"""Data parallel equals one device; the check_vma pitfall stays guarded.

The training runs happen in subprocesses with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the device count is
fixed when JAX starts). This file is also the worker those subprocesses run
(`python tests/test_parallel.py --steps ...`), shared with test_multihost.py.

The model is a small AdderNet (two adder convolutions with BatchNorm
synchronised over the batch axis, a multiplication classifier) trained with
SGD + momentum + weight decay + the adaptive learning rate, on a global batch
of 16 random 10x10x3 images split over the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
IMAGE_SHAPE = (10, 10, 3)
NUM_CLASSES = 5


# --------------------------------------------------------------------------
# The worker (runs in a subprocess).


def _make_model(fast_variance: bool = False):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from addernet_jax.layers import AdderConv  # pylint: disable=g-import-not-at-top
  from addernet_jax.parallel import BATCH_AXIS  # pylint: disable=g-import-not-at-top

  class TinyAdderNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9,
                                epsilon=1e-5, axis_name=BATCH_AXIS,
                                use_fast_variance=fast_variance)
      x = nn.Conv(4, (3, 3), use_bias=False)(x)  # multiplication stem
      x = nn.relu(bn()(x))
      x = AdderConv(6, (3, 3), padding="SAME", implementation="xla")(x)
      x = nn.relu(bn()(x))
      x = AdderConv(7, (3, 3), strides=2, padding="SAME",
                    implementation="xla")(x)
      x = nn.relu(bn()(x))
      x = x.mean(axis=(1, 2))
      return bn()(nn.Dense(NUM_CLASSES, use_bias=False)(x))
  return TinyAdderNet()


def _make_tx(params):
  import optax  # pylint: disable=g-import-not-at-top
  config = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
            "eta": 0.2, "num_epochs": 4, "num_train_steps": 0}
  try:
    from addernet_jax import optim  # pylint: disable=g-import-not-at-top
    return optim.make_optimizer(config, params, steps_per_epoch=2)
  except ImportError:  # the core optimiser has not landed: an equivalent
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def adaptive(updates, state, params=None):
      del params
      def f(path, g):
        if getattr(path[-1], "key", None) == "adder_kernel":
          return g * 0.2 * jnp.sqrt(g.size) / jnp.maximum(
              jnp.linalg.norm(g), 1e-12)
        return g
      return jax.tree_util.tree_map_with_path(f, updates), state
    return optax.chain(
        optax.GradientTransformation(lambda p: optax.EmptyState(), adaptive),
        optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))


def _global_batch(step: int):
  rng = np.random.default_rng(1000 + step)
  images = rng.standard_normal((GLOBAL_BATCH, *IMAGE_SHAPE)).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
  return images, labels


def worker(args: argparse.Namespace) -> dict:
  """Trains `args.steps` steps; writes params (and grads) to `args.out`."""
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top

  if args.coordinator:
    parallel.initialize_distributed(args.coordinator, args.num_processes,
                                    args.process_id)
  counts = [int(c) for c in args.mesh_devices.split(",") if c] or [0]
  summary = {}
  for count in counts:
    devices = jax.devices()[:count] if count else jax.devices()
    mesh = parallel.make_mesh(devices)
    prefix = f"{count}/" if len(counts) > 1 else ""
    summary[count or len(devices)] = _train(args, mesh, prefix)
  return summary


def _train(args: argparse.Namespace, mesh, prefix: str) -> dict:
  """Builds the state on `mesh`, trains, saves/restores as asked."""
  import flax  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top

  class State(train_state.TrainState):
    batch_stats: flax.core.FrozenDict | dict = None

  rep = parallel.replicated_sharding(mesh)
  model = _make_model(fast_variance=args.fast_variance)
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((2, *IMAGE_SHAPE)), train=False))(jax.random.PRNGKey(0))
  variables = jax.tree.map(np.asarray, variables)
  tx = _make_tx(variables["params"])
  state = State.create(apply_fn=model.apply, params=variables["params"],
                       tx=tx, batch_stats=variables["batch_stats"])
  state = jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), rep, lambda idx, x=np.asarray(x): x[idx]), state)

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
    return loss, updates["batch_stats"]

  def grads_local(state, images, labels):
    (loss, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, images, labels)
    return lax.pmean(g, parallel.BATCH_AXIS), stats, loss

  def per_device(state, images, labels):
    grads, stats, loss = grads_local(state, images, labels)
    loss = lax.pmean(loss, parallel.BATCH_AXIS)
    return state.apply_gradients(grads=grads, batch_stats=stats), loss, grads

  specs = (P(), P(parallel.BATCH_AXIS), P(parallel.BATCH_AXIS))
  step_fn = jax.jit(parallel.data_parallel(per_device, mesh, specs,
                                           (P(), P(), P())))
  rows = parallel.process_batch_slice(GLOBAL_BATCH, mesh)
  out = {}

  def global_batch(step):
    images, labels = _global_batch(step)
    b = parallel.global_batch_from_local(
        {"image": images[rows], "label": labels[rows]}, mesh)
    return b["image"], b["label"]

  if args.check_grads:
    x, _ = global_batch(0)
    # The pitfall on a least-squares loss (the adder custom VJP does not
    # even trace under check_vma=True): jax.shard_map's default
    # check_vma=True + pmean versus the wrapper + pmean versus plain grad.
    w = jax.make_array_from_callback(
        (3,), rep, lambda idx: np.array([0.5, -1.0, 2.0], np.float32)[idx])
    lsq = lambda w, x: jnp.mean((x[:, :3].sum(axis=(1, 2)) @ w) ** 2)
    local_grad = lambda w, x: lax.pmean(jax.grad(lsq)(w, x),
                                        parallel.BATCH_AXIS)
    lsq_specs = (P(), P(parallel.BATCH_AXIS))
    out["lsq/ours"] = np.asarray(jax.jit(parallel.data_parallel(
        local_grad, mesh, lsq_specs, P()))(w, x).addressable_data(0))
    out["lsq/vma"] = np.asarray(jax.jit(jax.shard_map(
        local_grad, mesh=mesh, in_specs=lsq_specs, out_specs=P()))(
            w, x).addressable_data(0))
    out["lsq/ref"] = np.asarray(jax.grad(lsq)(
        np.asarray(w.addressable_data(0)), _global_batch(0)[0]))

  t0 = time.perf_counter()
  losses = []
  for step in range(args.steps):
    x, y = global_batch(step)
    state, loss, grads = step_fn(state, x, y)
    losses.append(float(np.asarray(loss.addressable_data(0))))
    if step == 0 and args.check_grads:  # the AdderNet gradient of step 0
      for path, leaf in _flat(grads).items():
        out[f"grads_ours/{path}"] = leaf
  seconds = time.perf_counter() - t0
  for path, leaf in _flat({"params": state.params,
                           "batch_stats": state.batch_stats}).items():
    out[path] = leaf
  out["losses"] = np.array(losses)

  if args.ckpt_dir:
    from addernet_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
    with ckpt.CheckpointManager(args.ckpt_dir) as mgr:
      mgr.save(args.steps, state, {"steps": args.steps,
                                   "processes": jax.process_count()},
               force=True)
  if args.restore_dir:
    from addernet_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    with ckpt.CheckpointManager(args.restore_dir) as mgr:
      restored, meta = mgr.restore(abstract)
    for path, leaf in _flat({"params": restored.params,
                             "batch_stats": restored.batch_stats}).items():
      out[f"restored/{path}"] = leaf
    out["restored_meta_processes"] = np.array(meta["processes"])
  if jax.process_index() == 0 and args.out:
    out_path = Path(args.out)
    if prefix:
      out_path = out_path.with_name(prefix.rstrip("/") + "-" + out_path.name)
    np.savez(out_path, **out)
  return {"seconds": seconds, "devices": mesh.devices.size,
          "processes": jax.process_count()}


def _flat(tree) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=g-import-not-at-top
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(name(k) for k in path): np.asarray(
      leaf.addressable_data(0) if hasattr(leaf, "addressable_data") else leaf)
          for path, leaf in leaves}


def _parse(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--mesh_devices", default="",
                 help="comma-separated device counts to train on, in turn "
                 "(default: all devices)")
  p.add_argument("--out", default="")
  p.add_argument("--check_grads", action="store_true")
  p.add_argument("--fast_variance", action="store_true",
                 help="Flax's default one-pass BatchNorm variance, "
                 "E[x^2]-E[x]^2 (10-100x larger N-vs-1-device gaps)")
  p.add_argument("--coordinator", default="")
  p.add_argument("--num_processes", type=int, default=None)
  p.add_argument("--process_id", type=int, default=None)
  p.add_argument("--ckpt_dir", default="")
  p.add_argument("--restore_dir", default="")
  return p.parse_args(argv)


# --------------------------------------------------------------------------
# Helpers for the tests.


def worker_env(num_devices: int) -> dict[str, str]:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_worker(num_devices: int, *args: str, timeout: float = 300
               ) -> subprocess.CompletedProcess:
  proc = subprocess.run(
      [sys.executable, str(Path(__file__).resolve()), *args],
      env=worker_env(num_devices), capture_output=True, text=True,
      timeout=timeout, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return proc


def load(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def rel_l2(a: dict, b: dict, prefix: str) -> dict[str, float]:
  """Per leaf under `prefix`: ||a - b|| / ||b||."""
  keys = [k for k in a if k.startswith(prefix)]
  assert keys and set(keys) == {k for k in b if k.startswith(prefix)}
  return {k: float(np.linalg.norm(a[k] - b[k]) /
                   max(np.linalg.norm(b[k]), 1e-30)) for k in keys}


# --------------------------------------------------------------------------
# The tests.


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict[str, np.ndarray]]:
  """One worker process with 8 devices: 8-device and 1-device training."""
  d = tmp_path_factory.mktemp("dp")
  run_worker(8, "--steps", "4", "--mesh_devices", "8,1", "--check_grads",
             "--out", str(d / "run.npz"))
  return {"8": load(d / "8-run.npz"), "1": load(d / "1-run.npz"), "dir": d}


def test_eight_devices_equal_one_device(runs):
  eight, one = runs["8"], runs["1"]
  # Same loss curve, statistics and parameters up to float32 reduction order
  # (the batch is summed in another order over 8 shards). Measured on a
  # 2-core CPU: <= 1e-5 relative (L2, per leaf); 4 steps of a chaotic
  # training (docs/design.md §5) keep it at rounding level. Per-device BatchNorm
  # statistics or summed gradients give differences of order 1.
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  for prefix in ("params/", "batch_stats/"):
    diffs = rel_l2(eight, one, prefix)
    assert max(diffs.values()) < 1e-4, diffs
  # ...and the parameters did move (the comparison is not vacuous).
  assert not np.allclose(eight["losses"][0], eight["losses"][-1])


def test_gradients_are_averaged_not_summed(runs):
  eight, one = runs["8"], runs["1"]
  diffs = rel_l2(eight, one, "grads_ours/")
  assert max(diffs.values()) < 1e-4, diffs
  # The pitfall the wrapper avoids: with jax.shard_map's default
  # check_vma=True the gradient w.r.t. replicated parameters is already
  # summed over the 8 devices and pmean does not undo it.
  lsq_ref = eight["lsq/ref"]
  np.testing.assert_allclose(eight["lsq/ours"], lsq_ref, rtol=1e-5)
  np.testing.assert_allclose(one["lsq/ours"], lsq_ref, rtol=1e-5)
  np.testing.assert_allclose(eight["lsq/vma"], 8 * lsq_ref, rtol=1e-5)


@pytest.mark.slow
def test_same_seed_same_devices_is_bit_identical(runs):
  """Determinism: a second process, same seed and device count (1)."""
  out = runs["dir"] / "again.npz"
  run_worker(8, "--steps", "4", "--mesh_devices", "1", "--out", str(out))
  again = load(out)
  for k, v in runs["1"].items():
    if k.startswith(("params/", "batch_stats/")) or k == "losses":
      np.testing.assert_array_equal(again[k], v, err_msg=k)


def test_process_batch_slice_and_errors():
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  assert parallel.process_batch_slice(6 * n, mesh) == slice(0, 6 * n)
  with pytest.raises(ValueError, match="positive"):
    parallel.process_batch_slice(0, mesh)
  fake = jax.sharding.Mesh(np.array(jax.devices() * 3), ("batch",))
  with pytest.raises(ValueError, match=r"batch size 7 .*devices 3"):
    parallel.process_batch_slice(7, fake)


def test_describe_devices_names_kinds_processes_and_per_device_batch():
  import types  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  line = parallel.describe_devices(mesh, 8 * n)
  assert line.startswith(f"{n} device")
  assert f"(cpu x{n}) in 1 process, this is process 0" in line, line
  assert line.endswith(f"global batch {8 * n} = 8 per device"), line

  def device(process, kind):
    return types.SimpleNamespace(platform="gpu", device_kind=kind,
                                 process_index=process, id=0)
  pod = types.SimpleNamespace(devices=np.array(
      [device(p, "NVIDIA H100") for p in range(2) for _ in range(3)] +
      [device(2, "NVIDIA H200")]))
  line = parallel.describe_devices(pod, 14)
  assert line.startswith("7 devices (gpu NVIDIA H100 x6, gpu NVIDIA H200 x1) "
                         "in 3 processes, this is process "), line
  assert line.endswith("global batch 14 = 2 per device"), line
  assert parallel.describe_devices(pod).endswith("this is process 0"), line
  assert jax.process_index() == 0


def test_mesh_is_auto_and_one_dimensional():
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  assert mesh.axis_names == (parallel.BATCH_AXIS,)
  assert mesh.devices.size == len(jax.devices())
  axis_types = getattr(mesh, "axis_types", None)
  if axis_types is not None:
    assert axis_types == (jax.sharding.AxisType.Auto,)
  local = parallel.global_batch_from_local(
      {"x": np.arange(mesh.devices.size * 3.0)}, mesh)["x"]
  assert local.sharding == parallel.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(local),
                                np.arange(mesh.devices.size * 3.0))


def test_make_mesh_orders_devices_by_process_and_id():
  """make_mesh promises (process, id) order whatever order it is given (a
  process's devices must form one block of the batch axis). Checked with 4
  devices in a subprocess: with this process's one device any order passed."""
  code = ("import jax\nfrom addernet_jax import parallel\n"
          "m = parallel.make_mesh(jax.devices()[::-1])\n"
          "print(' '.join(str(d.id) for d in m.devices.flat))\n")
  result = subprocess.run([sys.executable, "-c", code], env=worker_env(4),
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  ids = [int(i) for i in result.stdout.strip().splitlines()[-1].split()]
  assert ids == sorted(ids) and len(ids) == 4, ids


def test_global_batch_shape_counts_every_process(monkeypatch):
  """Each process passes its own rows: the global batch is process_count
  times the local one (only the slow multi-process test saw a wrong count)."""
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  n = mesh.devices.size
  seen = []
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(jax, "make_array_from_process_local_data",
                      lambda sharding, value, shape: seen.append(shape))
  parallel.global_batch_from_local({"x": np.zeros((4 * n, 5))}, mesh)
  assert seen == [(12 * n, 5)]


def test_initialize_distributed_single_process_is_a_noop(monkeypatch):
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri",
              "PMIX_NAMESPACE", "TPU_WORKER_HOSTNAMES",
              "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.detect_cluster() is None
  assert parallel.initialize_distributed() is False
  assert parallel.initialize_distributed(num_processes=1) is False
  # A single-task SLURM allocation is not a cluster (JAX would pin one GPU).
  monkeypatch.setenv("SLURM_JOB_ID", "1")
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert parallel.detect_cluster() is None
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.detect_cluster() == "slurm"
  with pytest.raises(ValueError, match="HOST:PORT"):
    parallel.initialize_distributed("localhost", 2, 0)
  with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\)"):
    parallel.initialize_distributed("localhost:1234", 2, 2)


def test_a_fully_explicit_launch_turns_cluster_detection_off(monkeypatch):
  """With address, count and id all given, JAX must not also apply a
  detected SLURM cluster's one-GPU-per-process restriction (no test looked
  at what jax.distributed.initialize gets); with some given inside a
  cluster, JAX's detection fills in the rest."""
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(parallel, "_check_port_free", lambda address: None)
  monkeypatch.setattr(parallel, "_enable_cpu_collectives", lambda: None)
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
  for var, value in (("SLURM_JOB_ID", "1"), ("SLURM_PROCID", "1"),
                     ("SLURM_NTASKS", "2")):
    monkeypatch.setenv(var, value)
  assert parallel.initialize_distributed("localhost:1234", 2, 1) is True
  assert calls[-1]["cluster_detection_method"] == "deactivate"
  assert calls[-1]["process_id"] == 1 and calls[-1]["num_processes"] == 2
  assert parallel.initialize_distributed(num_processes=2, process_id=1)
  assert "cluster_detection_method" not in calls[-1]


def test_a_single_tpu_host_is_not_a_cluster(monkeypatch):
  """Taking TPU_WORKER_HOSTNAMES naming one host (a single TPU VM) for a pod
  slice passed every test: only several hosts make a TPU cluster."""
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  for var in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "OMPI_MCA_orte_hnp_uri",
              "PMIX_NAMESPACE", "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
  assert parallel.detect_cluster() is None
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
  assert parallel.detect_cluster() == "tpu"


if __name__ == "__main__":
  result = worker(_parse(sys.argv[1:]))
  print(json.dumps(result))
