"""Two processes on 127.0.0.1 equal one process with the same devices.

Each process has 2 CPU devices (`--xla_force_host_platform_device_count=2`)
and joins `jax.distributed` through `parallel.initialize_distributed` (Gloo
CPU collectives); together they train the AdderNet of test_parallel.py on
the same global batches as one process with 4 devices, each loading only its
rows. Every process runs under a timeout: a missing peer makes JAX abort the
process (exit 134) rather than raise (docs/design.md §5).
"""

from __future__ import annotations

import importlib
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_parallel as tp  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(Path(tp.__file__).resolve())
TIMEOUT = 300


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(commands: list[list[str]], env: dict[str, str],
                  timeout: float = TIMEOUT) -> list[str]:
  """Starts all commands, waits for all; kills every one on any failure."""
  procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for cmd in commands]
  outputs, failed = [], []
  try:
    for i, p in enumerate(procs):
      out, err = p.communicate(timeout=timeout)
      outputs.append(out)
      if p.returncode != 0:
        failed.append(f"process {i} exited {p.returncode}:\n{err[-3000:]}")
  except subprocess.TimeoutExpired:
    failed.append(f"timed out after {timeout} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert not failed, "\n".join(failed)
  return outputs


@pytest.fixture(scope="module")
def multihost_runs(tmp_path_factory):
  d = tmp_path_factory.mktemp("mh")
  port = free_port()
  commands = [[sys.executable, WORKER, "--steps", "4",
               "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
               "--process_id", str(i), "--out", str(d / "two.npz"),
               "--ckpt_dir", str(d / "ckpt")] for i in range(2)]
  run_processes(commands, tp.worker_env(2))
  # One process, 4 devices, the same global batches; it also restores the
  # checkpoint the two processes wrote.
  tp.run_worker(4, "--steps", "4", "--out", str(d / "one.npz"),
                "--restore_dir", str(d / "ckpt"), timeout=TIMEOUT)
  return {"two": tp.load(d / "two.npz"), "one": tp.load(d / "one.npz"),
          "dir": d}


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_two_processes_equal_one_process(multihost_runs):
  two, one = multihost_runs["two"], multihost_runs["one"]
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-5)
  for prefix in ("params/", "batch_stats/"):
    diffs = tp.rel_l2(two, one, prefix)
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_checkpoint_from_two_processes_restores_in_one(multihost_runs):
  two, one = multihost_runs["two"], multihost_runs["one"]
  assert int(one["restored_meta_processes"]) == 2
  restored = {k[len("restored/"):]: v for k, v in one.items()
              if k.startswith("restored/")}
  keys = [k for k in two if k.startswith(("params/", "batch_stats/"))]
  assert keys and set(keys) == set(restored)
  for k in keys:
    np.testing.assert_array_equal(restored[k], two[k], err_msg=k)


@pytest.mark.slow
def test_missing_peer_fails_within_timeout(tmp_path):
  """One process of two: JAX gives up (non-zero exit), it does not hang."""
  port = free_port()
  env = tp.worker_env(1)
  proc = subprocess.run(
      [sys.executable, "-c",
       "import sys; from addernet_jax import parallel; "
       f"parallel.initialize_distributed('127.0.0.1:{port}', 2, 0, "
       "initialization_timeout=3)"],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0


def _final_json(stdout: str) -> dict:
  import json  # pylint: disable=g-import-not-at-top
  lines = [l for l in stdout.strip().splitlines() if l.startswith("{")]
  assert lines, stdout[-2000:]
  return json.loads(lines[-1])


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_train_py_with_two_processes(tmp_path):
  """train.py --coordinator_address ... on the smoke config, 2 processes.

  The CNN baseline (`conv=mult`) keeps compilation short; the multi-process
  code path (distributed init, per-process data, checkpoints written by two
  processes, evaluation) is the same as for the AdderNet.
  """
  if not (ROOT / "train.py").is_file():
    pytest.skip("train.py is not in this checkout")
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import checkpoint as ckpt  # pylint: disable=g-import-not-at-top
  port = free_port()
  workdir = tmp_path / "run"
  commands = [[sys.executable, str(ROOT / "train.py"),
               "--config", str(ROOT / "configs" / "smoke.py"),
               "--workdir", str(workdir), "--config.conv=mult",
               "--config.recalibrate_bn_batches=0",
               "--coordinator_address", f"127.0.0.1:{port}",
               "--num_processes", "2", "--process_id", str(i)]
              for i in range(2)]
  outs = run_processes(commands, tp.worker_env(1))
  results = [_final_json(o) for o in outs]
  # stdout holds the result line alone (Gloo's "[Gloo] Rank 0 is connected
  # ..." went there and broke `train.py > result.json`).
  for out in outs:
    assert out.count("\n") == 1 and out.startswith("{"), out
  timing = ("images_per_sec", "wall_s")
  same = [{k: v for k, v in r.items() if k not in timing} for r in results]
  assert same[0] == same[1]
  assert results[0]["step"] == 3
  # The checkpoint the two processes wrote restores in this one process.
  mgr = ckpt.CheckpointManager(workdir / "checkpoints", read_only=True)
  try:
    assert mgr.latest_step() == 3
    saved = mgr._mgr.item_metadata(3)["state"]  # pylint: disable=protected-access
  finally:
    mgr.close()
  abstract = {"params": jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved["params"])}
  params = ckpt.restore_for_eval(workdir, abstract)["params"]
  leaves = jax.tree.leaves(params)
  assert leaves and all(np.isfinite(np.asarray(x)).all() for x in leaves)


_PREEMPT_SCRIPT = """
import os, signal, sys, time
import numpy as np
from addernet_jax import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
flag = parallel.install_preemption_handler()
mesh = parallel.make_mesh()
total = jax.jit(lambda x: x.sum())
for step in range(400):
  x = parallel.global_batch_from_local({"x": np.ones(2, np.float32)}, mesh)
  total(x["x"]).block_until_ready()  # a cross-process collective per step
  if step == 5 and jax.process_index() == 0:
    os.kill(os.getpid(), getattr(signal, sys.argv[3]))  # process 0 only
  if flag.should_stop(step):
    print("STOP", step, flush=True)
    sys.exit(0)
  time.sleep(0.02)
sys.exit(5)
"""


@pytest.mark.slow
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_signal_to_one_process_stops_all_at_the_same_step(signal_name):
  """SIGTERM (preemption) or Ctrl-C on one process. A Ctrl-C used to stop
  that process alone, leaving the others blocked until JAX's heartbeat
  gave up."""
  port = free_port()
  commands = [[sys.executable, "-c", _PREEMPT_SCRIPT, f"127.0.0.1:{port}",
               str(i), signal_name] for i in range(2)]
  outs = run_processes(commands, tp.worker_env(1), timeout=180)
  stops = [[l for l in o.splitlines() if l.startswith("STOP")] for o in outs]
  assert stops[0] and stops[0] == stops[1], outs
  assert int(stops[0][0].split()[1]) >= 5


_AGREEMENT_SCRIPT = """
import sys
from pathlib import Path
from addernet_jax import parallel
parallel.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
import jax
pid, root = jax.process_index(), Path(sys.argv[3])
own = root / f"host{pid}"
own.mkdir(parents=True, exist_ok=True)
for check in (lambda: parallel.check_shared_directory(own, wait_s=1),
              lambda: parallel.check_same_config({"lr": 0.1, "n": pid})):
  try:
    check()
    print("NO ERROR", flush=True)
  except ValueError as e:
    print("ERROR", e, flush=True)
parallel.check_shared_directory(root, wait_s=1)
parallel.check_same_config({"lr": 0.1, "opt": {"m": 0.9}})
print("AGREED", sorted(p.name for p in root.iterdir()), flush=True)
"""


@pytest.mark.slow
def test_processes_refuse_unshared_workdirs_and_differing_configs(tmp_path):
  """Found rehearsing a pod on one machine: a folder per host hung at the
  first save and lost the checkpoint; a flag given to one host only
  trained drifting replicas (or hung at the end) without a word. Every
  process now gets the error, at start-up."""
  port = free_port()
  commands = [[sys.executable, "-c", _AGREEMENT_SCRIPT, f"127.0.0.1:{port}",
               str(i), str(tmp_path)] for i in range(2)]
  outs = run_processes(commands, tp.worker_env(1), timeout=180)
  for pid, out in enumerate(outs):
    lines = out.splitlines()
    errors = [l for l in lines if l.startswith(("ERROR", "NO ERROR"))]
    assert len(errors) == 2, out
    assert errors[0].startswith(f"ERROR --workdir '{tmp_path}/host{pid}' is "
                                "not one folder shared by every process: "
                                "process(es) 1 do not see"), out
    if pid == 0:
      assert errors[1] == ("ERROR the config of process(es) 1 differs from "
                           "process 0's (their errors name the fields); "
                           "every host must run the same command"), out
    else:
      assert errors[1] == ("ERROR the config of process 1 differs from "
                           "process 0's: n 1 here, 0 on process 0; every "
                           "host must run the same command"), out
    # The shared folder passes, and the check leaves no file behind.
    assert "AGREED ['host0', 'host1']" in lines, out


def test_a_busy_coordinator_port_is_named():
  """JAX's coordinator crashed (segmentation fault) on a port in use."""
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(ValueError, match=rf"process 0 cannot listen on port "
                       rf"{port} .*choose another port"):
      parallel._check_port_free(f"localhost:{port}")  # pylint: disable=protected-access
  parallel._check_port_free(f"localhost:{port}")  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["smoke", "sr_smoke"])
def test_every_training_loop_runs_the_multi_process_start_up_checks(
    name, tmp_path, monkeypatch):
  """AdderSR's loop (its own) skipped the config and shared-workdir checks
  of a multi-process run. Both loops call them before writing anything."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel, train_lib  # pylint: disable=g-import-not-at-top
  checked = []

  def disagree(config, workdir):
    checked.append((config["seed"], Path(workdir)))
    raise ValueError("processes disagree")

  monkeypatch.setattr(parallel, "check_processes_agree", disagree)
  sys.path.insert(0, str(ROOT))
  config = importlib.import_module(f"configs.{name}").get_config()
  if name == "sr_smoke":
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
      (tmp_path / split).mkdir()
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
          tmp_path / split / "a.png")
    config.data_dir = str(tmp_path / "train")
    config.eval_data_dir = str(tmp_path / "test")
  with pytest.raises(ValueError, match="processes disagree"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert checked == [(config.seed, tmp_path / "run")]
  assert not (tmp_path / "run" / "checkpoints").exists()
