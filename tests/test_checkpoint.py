"""CheckpointManager: round trip, retention, structure check, eval restore."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from addernet_jax import checkpoint as ckpt
from addernet_jax.models import get_model


class TrainState(train_state.TrainState):
  batch_stats: Any = None


def make_state(num_classes: int = 10, seed: int = 0) -> TrainState:
  """A LeNet-5-BN TrainState with random values (no adder compilation)."""
  model = get_model("lenet5_bn", num_classes=num_classes)
  x = jnp.zeros((2, 28, 28, 1), jnp.float32)
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False),
                          jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), shapes)
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           tx=optax.sgd(0.1, momentum=0.9),
                           batch_stats=variables["batch_stats"])


def perturb(state: TrainState, seed: int) -> TrainState:
  """A state with random (non-zero) values everywhere, step `seed`."""
  rng = np.random.default_rng(seed)
  new = jax.tree.map(
      lambda l: jnp.asarray(rng.standard_normal(l.shape), l.dtype)
      if hasattr(l, "dtype") and jnp.issubdtype(l.dtype, jnp.floating) else l,
      state)
  return new.replace(step=seed)


def abstract(state: TrainState) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
                      if hasattr(x, "shape") else x, state)


def assert_trees_equal(a: Any, b: Any) -> None:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def base_state() -> TrainState:
  return make_state()


def test_round_trip_keeps_values_types_and_meta(tmp_path, base_state):
  state = perturb(base_state, 7)
  meta = {"epoch": 3, "rng": np.arange(2, dtype=np.uint32), "lr": np.float32(.5)}
  with ckpt.CheckpointManager(tmp_path / "ck") as mgr:
    assert mgr.restore(abstract(base_state)) is None
    assert mgr.latest_step() is None
    assert mgr.save(7, state, meta, metrics={"eval_top1": 0.5})
    mgr.wait_until_finished()
    assert mgr.latest_step() == 7
  with ckpt.CheckpointManager(tmp_path / "ck") as mgr:
    restored, meta2 = mgr.restore(abstract(base_state))
  assert isinstance(restored, TrainState)
  assert int(restored.step) == 7
  assert restored.apply_fn is base_state.apply_fn  # static fields come back
  assert_trees_equal(restored, state)
  assert meta2 == {"epoch": 3, "rng": [0, 1], "lr": 0.5}


def test_keeps_last_n_and_best_across_restarts(tmp_path, base_state):
  accs = {1: 0.3, 2: 0.9, 3: 0.1, 4: 0.2, 5: None, 6: 0.4, 7: 0.35}
  mgr = ckpt.CheckpointManager(tmp_path, max_to_keep=2)
  for step in (1, 2, 3, 4):
    mgr.save(step, base_state, {},
             metrics=None if accs[step] is None else {"eval_top1": accs[step]})
  mgr.close()
  mgr = ckpt.CheckpointManager(tmp_path, max_to_keep=2)  # a restart
  for step in (5, 6, 7):
    mgr.save(step, base_state, {},
             metrics=None if accs[step] is None else {"eval_top1": accs[step]})
  mgr.wait_until_finished()
  assert mgr.all_steps() == [2, 6, 7]   # last two + best (0.9 at step 2)
  assert mgr.best_step() == 2
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "6", "7"]
  assert not mgr.save(7, base_state, {})  # an existing step is not rewritten
  mgr.close()


def test_min_mode_keeps_lowest(tmp_path, base_state):
  with ckpt.CheckpointManager(tmp_path, max_to_keep=1, best_metric="loss",
                              best_mode="min") as mgr:
    for step, loss in ((1, 2.0), (2, 0.5), (3, 1.0), (4, 3.0)):
      mgr.save(step, base_state, {}, metrics={"loss": loss})
    mgr.wait_until_finished()
    assert mgr.all_steps() == [2, 4]


def test_unfinished_step_directories_are_ignored(tmp_path, base_state):
  state = perturb(base_state, 3)
  with ckpt.CheckpointManager(tmp_path) as mgr:
    mgr.save(3, state, {"k": 1}, force=True)
  # What a SIGKILL during a save leaves behind: Orbax's temporary directory
  # (not yet renamed) and, from an older or foreign writer, a step directory
  # without the commit metadata.
  tmp = tmp_path / "9.orbax-checkpoint-tmp-1234567" / "state"
  tmp.mkdir(parents=True)
  (tmp / "garbage").write_bytes(b"\x00" * 10)
  (tmp_path / "8").mkdir()
  (tmp_path / "8" / "state").mkdir()
  with ckpt.CheckpointManager(tmp_path) as mgr:
    assert mgr.latest_step() == 3
    restored, meta = mgr.restore(abstract(base_state))
    assert meta == {"k": 1}
    assert_trees_equal(restored, state)
    mgr.save(8, state, {"k": 2})   # the number of the bad directory is free
    mgr.wait_until_finished()
    assert mgr.all_steps() == [3, 8]
  assert [p.name.split("-")[:2] for p in
          (tmp_path.parent / (tmp_path.name + ".corrupted")).iterdir()] == [
              ["8", "unfinished"]]
  # A kill while the rotation deleted an old step leaves the rest of it
  # (here: no commit file, its arrays): older than every committed step, so
  # not a save cut short. It was moved aside as "unfinished", filling the
  # .corrupted folder with full-size leftovers; its deletion is finished.
  (tmp_path / "2" / "state").mkdir(parents=True)
  (tmp_path / "2" / "state" / "array").write_bytes(b"\x01" * 10)
  with ckpt.CheckpointManager(tmp_path) as mgr:
    mgr.restore(abstract(base_state))
    assert mgr.all_steps() == [3, 8] and mgr.unfinished_steps() == []
  assert not (tmp_path / "2").exists()
  assert len(list((tmp_path.parent / (tmp_path.name + ".corrupted")
                   ).iterdir())) == 1


def test_architecture_mismatch_names_parameter_and_shapes(tmp_path,
                                                          base_state):
  with ckpt.CheckpointManager(tmp_path) as mgr:
    mgr.save(1, base_state, {}, force=True)
  other = make_state(num_classes=7)
  with ckpt.CheckpointManager(tmp_path) as mgr:
    with pytest.raises(ValueError) as err:
      mgr.restore(abstract(other))
  msg = str(err.value)
  # Orbax stores dicts sorted by key: the first difference is the last BN.
  assert "'params/bn5/bias'" in msg, msg
  assert "(10,) in the checkpoint but (7,) in the model" in msg, msg
  assert (tmp_path / "1").is_dir()   # a mismatch is not "corruption"
  with pytest.raises(ValueError, match="params/bn5/bias"):
    ckpt.restore_for_eval(tmp_path, abstract(other))


def test_structure_check_missing_and_extra():
  saved = {"params": {"a": np.zeros((2, 3)), "b": np.zeros(4)}}
  with pytest.raises(ValueError, match=r"'params/c'.*missing"):
    ckpt.check_structure(saved, {"params": {"a": np.zeros((2, 3)),
                                            "c": np.zeros(1)}})
  with pytest.raises(ValueError, match=r"'params/b'.*lacks"):
    ckpt.check_structure(saved, {"params": {"a": np.zeros((2, 3))}})
  # A partial restore may leave out whole entries (the optimizer state), not
  # leaves inside an entry it restores (that would be another network).
  ckpt.check_structure({**saved, "opt_state": {"mu": np.zeros(4)}}, saved,
                       allow_extra=True)
  with pytest.raises(ValueError, match=r"'params/b'.*lacks"):
    ckpt.check_structure(saved, {"params": {"a": np.zeros((2, 3))}},
                         allow_extra=True)


def test_eval_reads_again_when_training_deletes_the_step_it_reads(
    tmp_path, base_state, monkeypatch, caplog):
  """eval.py beside a running train.py, which deletes its oldest steps:
  a step removed mid-read was reported as damage ("every checkpoint ... is
  damaged"), inviting the user to delete good checkpoints."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  states = {s: perturb(base_state, s) for s in (1, 2, 3)}
  with ckpt.CheckpointManager(workdir / "checkpoints") as mgr:
    for step in (1, 2, 3):
      mgr.save(step, states[step], {})
  real = ckpt.CheckpointManager.restore_step
  removals = []

  def training_deletes_it(self, step, *args, **kwargs):
    if step == 3 and len(removals) < 1:  # rotated out while being read
      removals.append(step)
      shutil.rmtree(self.directory / str(step))
      raise ckpt.CheckpointCorruptedError(step, self.directory,
                                          "folder 'meta' is missing")
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ckpt.CheckpointManager, "restore_step",
                      training_deletes_it)
  with caplog.at_level("WARNING"):
    got = ckpt.restore_for_eval(workdir, abstract(base_state))
  assert_trees_equal(got, states[2])
  assert any("step 3 was removed while being read" in r.getMessage()
             for r in caplog.records)
  assert not any("damaged" in r.getMessage() for r in caplog.records)

  def always_removed(self, step, *args, **kwargs):
    (self.directory / str(step) / "_CHECKPOINT_METADATA").unlink()
    raise ckpt.CheckpointError("reading failed")

  busy = tmp_path / "busy"
  with ckpt.CheckpointManager(busy / "checkpoints", max_to_keep=9) as mgr:
    for step in range(1, 8):
      mgr.save(step, states[1], {})
  monkeypatch.setattr(ckpt.CheckpointManager, "restore_step", always_removed)
  with pytest.raises(ckpt.CheckpointError, match="removed while being read "
                     "5 times: a training run is saving there"):
    ckpt.restore_for_eval(busy, abstract(base_state))


def test_restore_for_eval_latest_best_and_partial(tmp_path, base_state):
  workdir = tmp_path / "run"
  states = {s: perturb(base_state, s) for s in (1, 2, 3)}
  with ckpt.CheckpointManager(workdir / "checkpoints") as mgr:
    for step, acc in ((1, 0.2), (2, 0.8), (3, 0.5)):
      mgr.save(step, states[step], {}, metrics={"eval_top1": acc})
  latest = ckpt.restore_for_eval(workdir, abstract(base_state))
  assert_trees_equal(latest, states[3])
  best = ckpt.restore_for_eval(workdir / "checkpoints", abstract(base_state),
                               which="best")
  assert_trees_equal(best, states[2])
  # Only the variables an evaluation needs.
  part = {"params": abstract(base_state).params,
          "batch_stats": abstract(base_state).batch_stats}
  got = ckpt.restore_for_eval(workdir, part)
  assert_trees_equal(got, {"params": states[3].params,
                           "batch_stats": states[3].batch_stats})
  # A model lacking a parameter the checkpoint has, inside what it restores:
  # refused (dropping it would evaluate another network).
  fewer = {"params": dict(part["params"]), "batch_stats": part["batch_stats"]}
  dropped = sorted(fewer["params"])[0]
  del fewer["params"][dropped]
  with pytest.raises(ckpt.CheckpointStructureError,
                     match=f"params/{dropped}.*that the model lacks") as e:
    ckpt.restore_for_eval(workdir, fewer)
  assert e.value.extra_parameter.startswith(f"params/{dropped}")
  with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
    ckpt.restore_for_eval(tmp_path / "empty", part)
  # A step folder given for the workdir: said so, with the path to give.
  with pytest.raises(ckpt.CheckpointError, match=r"'.*checkpoints/2' is one "
                     rf"checkpoint step, not a workdir: pass the workdir "
                     rf"'{workdir}'"):
    ckpt.restore_for_eval(workdir / "checkpoints" / "2", part)
  with pytest.raises(ValueError, match="which"):
    ckpt.restore_for_eval(workdir, part, which="newest")


def test_check_writable(tmp_path):
  assert ckpt.check_writable(tmp_path / "a" / "b").is_dir()
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(ckpt.CheckpointError, match="is a file, not a "
                     "directory") as err:
    ckpt.check_writable(blocker / "workdir")
  assert str(blocker / "workdir") in str(err.value)
  with pytest.raises(ckpt.CheckpointError, match="is a file, not a "
                     "directory"):
    ckpt.CheckpointManager(blocker / "ck")


def test_invalid_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    ckpt.CheckpointManager(tmp_path, max_to_keep=0)
  with pytest.raises(ValueError, match="best_mode"):
    ckpt.CheckpointManager(tmp_path, best_mode="largest")


@pytest.mark.parametrize("mode,values", [
    ("max", [float("nan"), 0.5, 0.7, 0.6]),
    ("min", [float("nan"), 0.5, 0.3, 0.4])])
def test_a_nan_metric_is_never_the_best(tmp_path, mode, values):
  with ckpt.CheckpointManager(tmp_path / "ck", max_to_keep=10,
                              best_metric="m", best_mode=mode,
                              async_save=False) as mgr:
    for step, value in enumerate(values, start=1):
      mgr.save(step, {"w": jnp.ones(2)}, metrics={"m": value})
    mgr.wait_until_finished()
    assert mgr.best_step() == 3


def test_best_step_is_none_when_no_step_has_the_metric(tmp_path):
  """Steps saved without the ranking metric (training passes its train
  metrics at checkpoints between evaluations) are never "the best": with
  none ranked, best_step is None and evaluation falls back to the latest,
  saying so (a min-mode manager picked the OLDEST step)."""
  for mode in ("max", "min"):
    directory = tmp_path / mode
    with ckpt.CheckpointManager(directory, max_to_keep=10, best_metric="m",
                                best_mode=mode, async_save=False) as mgr:
      for step in (1, 2, 3):
        mgr.save(step, {"w": jnp.full(2, float(step))},
                 metrics={"train_loss": float(step)})
      assert mgr.best_step() is None, mode
    got = ckpt.restore_for_eval(directory, {"w": jax.ShapeDtypeStruct(
        (2,), jnp.float32)}, which="best", with_meta=True, best_metric="m")
    assert got.which == "latest", mode
    np.testing.assert_array_equal(np.asarray(got.state["w"]), [3.0, 3.0])


def test_a_run_killed_in_its_first_save_can_start_over(tmp_path, base_state):
  """A SIGKILL during the very first save leaves only an unfinished step
  folder. It is moved aside as unfinished, which is not a damaged step: the
  rerun (and the one after it) starts from step 0 instead of refusing to
  "start over silently"."""
  directory = tmp_path / "ck"
  (directory / "4" / "state").mkdir(parents=True)  # no commit file
  for _ in range(2):
    with ckpt.CheckpointManager(directory) as mgr:
      assert mgr.restore(abstract(base_state)) is None
      assert mgr.quarantined_steps() == []
  moved = list((tmp_path / "ck.corrupted").iterdir())
  assert [p.name.split("-")[:2] for p in moved] == [["4", "unfinished"]]


def test_latest_step_and_latest_meta_are_the_newest_step(tmp_path):
  """With several steps, the newest (what latest_meta explains a mismatch
  with), not the oldest."""
  directory = tmp_path / "ck"
  with ckpt.CheckpointManager(directory, max_to_keep=5,
                              async_save=False) as mgr:
    for step in (1, 2, 3):
      mgr.save(step, {"w": jnp.full(2, float(step))}, {"step": step})
    assert mgr.latest_step() == 3
  assert ckpt.latest_meta(directory) == {"step": 3}
  assert ckpt.latest_meta(tmp_path) == {}  # no checkpoints/ there


@pytest.mark.parametrize("bad", [None, "n/a", [0.9]])
def test_a_metric_that_is_not_a_number_is_never_the_best(tmp_path, bad):
  """A step whose ranking metric is null, a string or a list (a hand-edited
  or foreign metrics file) ranks last, like a missing one: neither the save
  (Orbax ranks the steps to rotate them) nor best_step fails, and it is
  never picked."""
  with ckpt.CheckpointManager(tmp_path / "ck", max_to_keep=10,
                              best_metric="m", async_save=False) as mgr:
    for step, value in enumerate([0.5, bad, 0.7, 0.6], start=1):
      mgr.save(step, {"w": jnp.ones(2)}, metrics={"m": value})
    assert mgr.best_step() == 3


def test_restore_right_after_an_asynchronous_save_waits_for_it(tmp_path):
  """A restore issued while a background save is still writing returns that
  step, whole: it waits for the save to commit. (Read at once, the step was
  an unfinished directory that restore tried to move aside, and step 1 came
  back; the 16 MB array keeps the write going long enough to tell.)"""
  rng = np.random.default_rng(0)
  states = [{"w": jnp.asarray(rng.standard_normal(4_000_000), jnp.float32),
             "step": jnp.asarray(step)} for step in (1, 2)]
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        states[0])
  with ckpt.CheckpointManager(tmp_path / "ck", async_save=True) as mgr:
    assert mgr.save(1, states[0])
    mgr.wait_until_finished()
    assert mgr.save(2, states[1])
    restored, _ = mgr.restore(target)
    assert int(restored["step"]) == 2
    np.testing.assert_array_equal(restored["w"], states[1]["w"])
    assert mgr.all_steps() == [1, 2] and mgr.quarantined_steps() == []
