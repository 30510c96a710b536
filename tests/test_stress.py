"""Multi-device CPU runs that must not abort in an XLA:CPU collective.

XLA:CPU aborts a process ("Expected 2 threads to join the rendezvous, but
only 1 of them arrived on time", exit 134) when the host dispatches 32 or more
collective programs ahead of its devices: `parallel.DispatchWindow` keeps at
most `parallel.CPU_DISPATCH_DEPTH` in flight, and every training and
evaluation loop pushes what it dispatches into one.

Default tests (measured 2026-11-29, JAX 0.10.2, 2-core CPU):
- the hazard itself, directly: 2,000 tiny all-reduce programs on 2 and on 8
  devices through a `DispatchWindow.for_mesh` window, under CPU load, finish
  (1-3 s); dispatched without the window they abort after 60 s, idle machine
  or busy (`test_unbounded_dispatch_aborts`, extended: the control that shows
  the check can fail);
- the loops' wiring: a training run pushes every step and every evaluation
  batch through the window.

Extended (`pytest -m extended tests/test_stress.py`): `train_and_evaluate`
(the code path of train.py: training, evaluation with BatchNorm
re-estimation, Orbax checkpoint saves) on 2 and 8 devices under CPU load,
ADDERNET_STRESS_RUNS times in a row in one worker process (`python
tests/test_stress.py --runs N ...`, this file; 1 by default, the issue's
figure is 20 + 20). It was the default check until it stopped reproducing
the abort: with the window disabled (depth 1000) 2 of 2 runs on 2 devices
completed under two busy loops (2026-11-29), where the first run had aborted
when the window was added. Each run re-traces its programs (50-80 s of wall
time per run at load average 15-21).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path
import subprocess
import sys
import time

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs per device count of the extended end-to-end check (20 + 20: the
# issue's figure).
RUNS = int(os.environ.get("ADDERNET_STRESS_RUNS", "1"))
# All-reduce programs dispatched by the direct check (the abort came within
# the first few hundred without a window).
COLLECTIVE_STEPS = 2000

# A small run that still dispatches many programs without waiting for them.
STRESS_OVERRIDES = {
    "batch_size": 32,
    "num_train_steps": 40,
    "log_every_steps": 40,
    "checkpoint_every_steps": 36,
    "eval_batch_size": 16,   # the 359 test digits in 23 batches
    "eval_max_examples": -1,
    "recalibrate_bn_batches": 2,
    "progress_bar": False,
}


def worker(args: argparse.Namespace) -> None:
  """Trains `args.runs` times in this process; one JSON line per run."""
  sys.path.insert(0, str(ROOT))
  from absl import logging  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  config = smoke.get_config()
  config.update(STRESS_OVERRIDES)
  for item in args.set:  # experiments: --set key=python_literal
    key, value = item.split("=", 1)
    config[key] = ast.literal_eval(value)
  workdir = Path(args.workdir)
  for i in range(args.runs):
    start, cpu = time.perf_counter(), time.process_time()
    summary = train_lib.train_and_evaluate(config, workdir / f"run{i}")
    print(json.dumps({"run": i, "devices": jax.device_count(),
                      "step": summary["step"],
                      "eval_top1": summary["eval_top1"],
                      "seconds": round(time.perf_counter() - start, 2),
                      "cpu_seconds": round(time.process_time() - cpu, 2)}),
          flush=True)


def collectives(args: argparse.Namespace) -> None:
  """Dispatches `args.collectives` all-reduce programs, through a
  `DispatchWindow.for_mesh` window unless `args.no_window`; prints ok."""
  sys.path.insert(0, str(ROOT))
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(jax.devices())
  axis = mesh.axis_names[0]
  spec = PartitionSpec(axis)
  total = jax.shard_map(lambda a: jax.lax.psum(a * 1.0001, axis), mesh=mesh,
                        in_specs=spec, out_specs=PartitionSpec())

  @jax.jit
  def step(x):
    return x + total(x).sum()

  x = jax.device_put(jnp.ones((256 * jax.device_count(),)),
                     NamedSharding(mesh, spec))
  window = parallel.DispatchWindow(
      None if args.no_window else parallel.dispatch_depth(mesh))
  for _ in range(args.collectives):
    x = step(x)
    window.push(x)
  jax.block_until_ready(x)
  print("ok", flush=True)


def _cpu_env(num_devices: int, **extra: str) -> dict[str, str]:
  """This environment with `num_devices` CPU devices (and `extra`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={num_devices}")
  return env


def _run_collectives(num_devices: int, window: bool, timeout: float
                     ) -> subprocess.CompletedProcess:
  env = _cpu_env(num_devices)
  command = [sys.executable, str(Path(__file__).resolve()), "--collectives",
             str(COLLECTIVE_STEPS)] + ([] if window else ["--no_window"])
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _burners() -> list[subprocess.Popen]:
  """One busy-looping process per core (at least two)."""
  return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(max(2, os.cpu_count() or 2))]


def _run_worker(num_devices: int, workdir: Path, cache: Path,
                timeout: float) -> list[dict]:
  env = _cpu_env(num_devices,
                 PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get(
                     "PYTHONPATH", ""),
                 JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  try:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--runs", str(RUNS),
         "--workdir", str(workdir)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout
    err = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
    pytest.fail(f"{num_devices} devices: no result after {timeout} s (a "
                f"hang?)\n{(out or '')[-1500:]}\n{(err or '')[-3000:]}")
  runs = [json.loads(l) for l in proc.stdout.splitlines()
          if l.startswith("{")]
  assert proc.returncode == 0, (
      f"{num_devices} devices: the worker exited with {proc.returncode} after "
      f"{len(runs)} of {RUNS} runs (134 = XLA aborted it)\n"
      f"{proc.stderr[-4000:]}")
  return runs


class _FakeDevice:

  def __init__(self, platform: str, process_index: int = 0):
    self.platform, self.process_index = platform, process_index


class _FakeMesh:

  def __init__(self, *devices):
    import numpy as np  # pylint: disable=g-import-not-at-top
    self.devices = np.array(devices, dtype=object)


def test_dispatch_depth_only_limits_several_cpu_devices_of_this_process():
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  cpu, gpu = _FakeDevice("cpu"), _FakeDevice("gpu")
  depth = parallel.CPU_DISPATCH_DEPTH
  assert 1 <= depth < 32  # XLA:CPU's in-flight limit per device is 32
  assert parallel.dispatch_depth(_FakeMesh(cpu, _FakeDevice("cpu"))) == depth
  assert parallel.dispatch_depth(_FakeMesh(*[cpu] * 8)) == depth
  assert parallel.dispatch_depth(_FakeMesh(cpu)) is None
  assert parallel.dispatch_depth(_FakeMesh(gpu, gpu)) is None
  # One CPU device here, the others in other processes: nothing to limit.
  assert parallel.dispatch_depth(
      _FakeMesh(cpu, _FakeDevice("cpu", process_index=1))) is None
  import jax  # pylint: disable=g-import-not-at-top
  assert parallel.dispatch_depth(parallel.make_mesh(jax.devices()[:1])) is None


def test_dispatch_window_blocks_on_the_oldest_beyond_its_depth(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  blocked = []
  monkeypatch.setattr(jax, "block_until_ready", blocked.append)
  window = parallel.DispatchWindow(2)
  for i in range(5):
    window.push({"out": i})
  assert blocked == [{"out": 0}, {"out": 1}, {"out": 2}]
  unlimited = parallel.DispatchWindow(None)
  for i in range(100):
    unlimited.push(i)
  assert len(blocked) == 3 and not unlimited._pending  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="depth"):
    parallel.DispatchWindow(0)


def _stop(burners: list[subprocess.Popen]) -> None:
  for p in burners:
    p.kill()
  for p in burners:
    p.wait()


@pytest.mark.slow
def test_windowed_collectives_finish_under_cpu_load():
  burners = _burners()
  try:
    for num_devices in (2, 8):
      try:
        proc = _run_collectives(num_devices, window=True, timeout=300)
      except subprocess.TimeoutExpired:
        pytest.fail(f"{num_devices} devices: {COLLECTIVE_STEPS} windowed "
                    f"all-reduces did not finish in 300 s (a hang?)")
      assert proc.returncode == 0 and "ok" in proc.stdout, (
          f"{num_devices} devices: exit {proc.returncode} (-6 or 134: XLA "
          f"aborted it)\n{proc.stderr[-3000:]}")
  finally:
    _stop(burners)


@pytest.mark.extended
def test_unbounded_dispatch_aborts():
  """The control: without the window the same programs abort (if a JAX
  release stops aborting, the window can go, and this test says so)."""
  try:
    proc = _run_collectives(2, window=False, timeout=600)
  except subprocess.TimeoutExpired:
    pytest.fail("unbounded dispatch neither finished nor aborted in 600 s")
  assert proc.returncode != 0, (
      "2,000 all-reduces dispatched without a window finished: this XLA no "
      "longer aborts (parallel.DispatchWindow may be unnecessary)")
  assert "rendezvous" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_training_and_evaluation_push_every_program(monkeypatch, tmp_path):
  """train_and_evaluate (smoke config, one device, the window forced on):
  every training step and evaluation batch goes through a window."""
  sys.path.insert(0, str(ROOT))
  from absl import logging  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel, train_lib  # pylint: disable=g-import-not-at-top
  from configs import smoke  # pylint: disable=g-import-not-at-top

  logging.set_verbosity(logging.WARNING)
  pushes = []
  push = parallel.DispatchWindow.push

  def counting_push(self, outputs):
    pushes.append(self.depth)
    push(self, outputs)

  def for_mesh(cls, mesh):
    return cls(parallel.CPU_DISPATCH_DEPTH)

  monkeypatch.setattr(parallel.DispatchWindow, "push", counting_push)
  monkeypatch.setattr(parallel.DispatchWindow, "for_mesh",
                      classmethod(for_mesh))
  config = smoke.get_config()
  config.recalibrate_bn_batches = 0
  summary = train_lib.train_and_evaluate(config, tmp_path / "run")
  assert summary["step"] == config.num_train_steps
  eval_batches = -(-config.eval_max_examples // config.eval_batch_size)
  # Every push went to a window of the forced depth.
  assert pushes and set(pushes) == {parallel.CPU_DISPATCH_DEPTH}, pushes
  assert len(pushes) >= config.num_train_steps + eval_batches, (
      len(pushes), config.num_train_steps, eval_batches)


@pytest.mark.extended
def test_multi_device_runs_under_cpu_load_all_complete(tmp_path):
  cache = tmp_path / "jax_cache"
  burners = _burners()
  try:
    start = time.perf_counter()
    for num_devices in (2, 8):
      runs = _run_worker(num_devices, tmp_path / f"d{num_devices}", cache,
                         timeout=2400)
      assert len(runs) == RUNS, runs
      for run in runs:
        assert run["devices"] == num_devices
        assert run["step"] == STRESS_OVERRIDES["num_train_steps"], run
        assert 0.0 <= run["eval_top1"] <= 1.0, run
    print(f"{2 * RUNS} runs in {time.perf_counter() - start:.0f} s")
  finally:
    _stop(burners)


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=RUNS)
  parser.add_argument("--workdir")
  parser.add_argument("--set", action="append", default=[],
                      help="config override key=python_literal")
  parser.add_argument("--collectives", type=int, default=0,
                      help="instead of training: dispatch this many "
                      "all-reduce programs")
  parser.add_argument("--no_window", action="store_true")
  parsed = parser.parse_args()
  if parsed.collectives:
    collectives(parsed)
  elif parsed.workdir:
    worker(parsed)
  else:
    parser.error("--workdir (training runs) or --collectives N is required")
