"""Faults: corrupted checkpoints, full disks, unwritable dirs, SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from addernet_jax import checkpoint as ckpt
from addernet_jax import preemption

ROOT = Path(__file__).resolve().parents[1]


def make_state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"params": {"conv": {"adder_kernel": jnp.asarray(
      rng.standard_normal((3, 3, 5, 7)), jnp.float32)},
                     "bn": {"scale": jnp.asarray(rng.standard_normal(7),
                                                 jnp.float32)}},
          "step": seed}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                        if hasattr(x, "shape") else x, make_state(0))


def assert_state(got: dict, seed: int) -> None:
  want = make_state(seed)
  assert int(got["step"]) == seed
  for a, b in zip(jax.tree.leaves(got["params"]),
                  jax.tree.leaves(want["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def save_two(directory: Path) -> None:
  with ckpt.CheckpointManager(directory) as mgr:
    for step in (1, 2):
      mgr.save(step, make_state(step), {"step": step})


def _largest_data_file(step_dir: Path) -> Path:
  files = [p for p in (step_dir / "state").rglob("*")
           if p.is_file() and "/d/" in str(p)]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> None:
  f = _largest_data_file(step_dir)
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])


def _garble(step_dir: Path) -> None:
  f = _largest_data_file(step_dir)
  data = bytearray(f.read_bytes())
  mid = len(data) // 2
  for i in range(mid, min(mid + 16, len(data))):
    data[i] ^= 0x5A
  f.write_bytes(bytes(data))


def _garble_all_data(step_dir: Path) -> None:
  for f in (step_dir / "state").rglob("*"):
    if f.is_file() and "/d/" in str(f):
      data = bytearray(f.read_bytes())
      for i in range(len(data) // 3, len(data) // 3 + 8):
        data[i] ^= 0xFF
      f.write_bytes(bytes(data))


def _drop_state_metadata(step_dir: Path) -> None:
  (step_dir / "state" / "_METADATA").unlink()


def _garble_meta_json(step_dir: Path) -> None:
  (step_dir / "meta" / "metadata").write_text('{"step": 2, ')


CORRUPTIONS = [_truncate, _garble, _garble_all_data, _drop_state_metadata,
               _garble_meta_json]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__)
def test_corrupted_latest_falls_back_with_warning(tmp_path, corrupt, caplog):
  directory = tmp_path / "checkpoints"
  save_two(directory)
  corrupt(directory / "2")
  with caplog.at_level(logging.WARNING, logger="addernet_jax.checkpoint"):
    with ckpt.CheckpointManager(directory) as mgr:
      state, meta = mgr.restore(ABSTRACT)
      assert_state(state, 1)
      assert meta == {"step": 1}
      text = caplog.text
      assert "step 2" in text and "falling back" in text, text
      assert "resuming from checkpoint step 1 instead of step 2" in text
      # The bad step was moved aside (kept for inspection), so the run can
      # write step 2 again.
      assert not (directory / "2").exists()
      assert list((tmp_path / "checkpoints.corrupted").iterdir())
      assert mgr.save(2, make_state(2), {"step": 2}, force=True)
    with ckpt.CheckpointManager(directory) as mgr:
      assert_state(mgr.restore(ABSTRACT)[0], 2)


def test_all_corrupted_is_an_error_not_a_fresh_start(tmp_path):
  directory = tmp_path / "ck"
  save_two(directory)
  _truncate(directory / "1")
  _truncate(directory / "2")
  with ckpt.CheckpointManager(directory) as mgr:
    with pytest.raises(ckpt.CheckpointError, match="could be restored"):
      mgr.restore(ABSTRACT)


def test_eval_restore_skips_corrupted_without_moving_it(tmp_path):
  directory = tmp_path / "ck"
  save_two(directory)
  _truncate(directory / "2")
  got = ckpt.restore_for_eval(directory, ABSTRACT)
  assert_state(got, 1)
  assert (directory / "2").is_dir()  # read-only: nothing moved


def test_disk_full_while_saving_raises_and_keeps_previous(tmp_path,
                                                          monkeypatch):
  directory = tmp_path / "ck"
  mgr = ckpt.CheckpointManager(directory)
  mgr.save(1, make_state(1), {"step": 1}, force=True)

  path_cls = type(epath.Path(directory))
  real_write_text = path_cls.write_text

  def full(self, *args, **kwargs):
    raise OSError(28, "No space left on device", str(self))
  monkeypatch.setattr(path_cls, "write_text", full)
  with pytest.raises(ckpt.CheckpointError) as err:
    mgr.save(2, make_state(2), {"step": 2})
    mgr.wait_until_finished()
  msg = str(err.value)
  assert "disk is full" in msg and str(directory) in msg and "step 2" in msg
  monkeypatch.setattr(path_cls, "write_text", real_write_text)
  assert mgr.all_steps() == [1]
  assert_state(mgr.restore(ABSTRACT)[0], 1)
  # Once space is back, saving works again.
  assert mgr.save(2, make_state(2), {"step": 2}, force=True)
  mgr.close()
  with ckpt.CheckpointManager(directory) as mgr:
    assert mgr.all_steps() == [1, 2]
    assert_state(mgr.restore(ABSTRACT)[0], 2)


_FSIZE_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np, jax.numpy as jnp
    from addernet_jax import checkpoint as ckpt
    d = sys.argv[1]
    mgr = ckpt.CheckpointManager(d)
    mgr.save(1, {"w": jnp.ones((4,))}, {"step": 1}, force=True)
    # A real write failure inside TensorStore (C++): a file size limit.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    big = {"w": jnp.asarray(np.random.default_rng(0).standard_normal(
        (64, 1024)), jnp.float32)}
    try:
      mgr.save(2, big, {"step": 2}, force=True)
    except ckpt.CheckpointError as e:
      print("CheckpointError:", e)
      sys.exit(3)
    print("no error")
""")


@pytest.mark.slow
def test_write_failure_in_tensorstore_is_reported(tmp_path):
  directory = tmp_path / "ck"
  proc = subprocess.run(
      [sys.executable, "-c", _FSIZE_SCRIPT, str(directory)],
      capture_output=True, text=True, timeout=240, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 3, proc.stdout + proc.stderr[-3000:]
  assert "step 2" in proc.stdout and str(directory) in proc.stdout
  with ckpt.CheckpointManager(directory) as mgr:
    assert mgr.all_steps() == [1]
    got, meta = mgr.restore({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
    np.testing.assert_array_equal(np.asarray(got["w"]), np.ones(4))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
  directory = tmp_path / "ro"
  directory.mkdir()
  directory.chmod(0o555)
  try:
    with pytest.raises(ckpt.CheckpointError, match="permission denied"):
      ckpt.check_writable(directory)
  finally:
    directory.chmod(0o755)


def test_sigterm_sets_the_flag_and_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.install_preemption_handler() as flag:
    assert not flag.is_set() and not flag.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.wait(5.0)
    assert flag.should_stop(1)
    assert flag.signal_received == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


_SAVE_LOOP = textwrap.dedent("""
    import sys
    import numpy as np, jax.numpy as jnp
    from addernet_jax import checkpoint as ckpt
    mgr = ckpt.CheckpointManager(sys.argv[1], max_to_keep=2)
    start = (mgr.latest_step() or 0) + 1
    for step in range(start, start + 10000):
      w = jnp.full((128, 1024), step, jnp.float32)  # 512 KiB per save
      mgr.save(step, {"w": w, "b": jnp.full((7,), -step, jnp.float32)},
               {"step": step})
      print(step, flush=True)
""")


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_bad_checkpoint(tmp_path):
  """Kill -9 a process that saves asynchronously, at several moments."""
  directory = tmp_path / "ck"
  abstract = {"w": jax.ShapeDtypeStruct((128, 1024), jnp.float32),
              "b": jax.ShapeDtypeStruct((7,), jnp.float32)}
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  rng = np.random.default_rng(0)
  last_restored = 0
  for kill_after in (2, 3, 5):
    proc = subprocess.Popen([sys.executable, "-c", _SAVE_LOOP, str(directory)],
                            stdout=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
      printed = []
      while len(printed) < kill_after:
        line = proc.stdout.readline()
        assert line, "the save loop exited early"
        printed.append(int(line))
      time.sleep(float(rng.uniform(0, 0.05)))  # somewhere inside a save
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=30)
    finally:
      if proc.poll() is None:
        proc.kill()
    with ckpt.CheckpointManager(directory, max_to_keep=2) as mgr:
      state, meta = mgr.restore(abstract)
      step = meta["step"]
      # Whatever was on disk: a complete checkpoint, consistent with itself.
      assert last_restored < step, (last_restored, step)
      np.testing.assert_array_equal(np.asarray(state["w"]), step)
      np.testing.assert_array_equal(np.asarray(state["b"]), -step)
      assert mgr.latest_step() == step
      last_restored = step
