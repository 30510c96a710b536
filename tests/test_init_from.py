"""config.init_from: a new run starting from trained weights (a workdir of
this project or the official PyTorch checkpoint)."""

import json
from pathlib import Path
import re
import shutil
import sys

import chex
import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from addernet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from addernet_jax import layers  # pylint: disable=g-import-not-at-top
from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
from configs import smoke  # pylint: disable=g-import-not-at-top

KERNEL = layers.ADDER_KERNEL  # the smoke config's LeNet is an AdderNet


def _state(config, image_shape=(8, 8, 1), abstract=True):
  """A new TrainState (its shapes only unless `abstract` is False) and a
  one-device replicated sharding."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  create = lambda: train_lib.create_train_state(
      config, jax.random.PRNGKey(3), image_shape, steps_per_epoch=10)
  return (jax.eval_shape(create) if abstract else create()), rep


def _distance(a, b) -> float:
  return float(np.sqrt(sum(
      np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)
      for x, y in zip(jax.tree_util.tree_leaves(a),
                      jax.tree_util.tree_leaves(b)))))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("source")
  train_lib.train_and_evaluate(smoke.get_config(), workdir)
  return workdir


def test_a_workdir_gives_its_weights_and_a_fresh_optimizer(trained_workdir):
  config = smoke.get_config()
  config.init_from = str(trained_workdir)
  initial = train_lib.load_initial_weights(config)
  assert initial.describe() == f"{str(trained_workdir)!r} (step 3)"
  assert initial.record() == {"init_from": str(trained_workdir),
                              "init_from_step": 3}
  state, rep = _state(config)
  new = train_lib.with_initial_weights(state, initial, rep)
  saved = jax.device_get(train_lib.restore_variables(config, trained_workdir))
  chex.assert_trees_all_equal(new.params, saved["params"])
  chex.assert_trees_all_equal(new.batch_stats, saved["batch_stats"])
  # The optimizer state is the initial one of the new weights (momentum 0).
  chex.assert_trees_all_equal(new.opt_state, state.tx.init(new.params))
  assert new.params["fc3"][KERNEL].sharding == rep


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_a_run_from_a_workdir_trains_from_it_and_resumes_without_it(
    trained_workdir, tmp_path, monkeypatch, caplog):
  config = smoke.get_config()
  config.num_train_steps = 1
  # A relative path: the meta records it absolute, with the step read.
  monkeypatch.chdir(trained_workdir.parent)
  config.init_from = trained_workdir.name
  workdir = tmp_path / "run"
  train_lib.train_and_evaluate(config, workdir)
  # One step away from the source's weights, far from a random start.
  ours = jax.device_get(train_lib.restore_variables(config, workdir))
  theirs = jax.device_get(train_lib.restore_variables(config,
                                                      trained_workdir))
  random = _state(config, abstract=False)[0].params
  assert (_distance(ours["params"], theirs["params"])
          < 0.5 * _distance(random, theirs["params"]))

  def meta(step):
    with ckpt_lib.CheckpointManager(workdir / "checkpoints",
                                    read_only=True) as mgr:
      return mgr.meta(step)

  started = {"init_from": str(trained_workdir), "init_from_step": 3}
  assert {k: meta(1)[k] for k in started} == started
  # Resuming reads the run's own checkpoint, not init_from (even gone); a
  # warning says so, and the meta still names where the run started.
  config.num_train_steps = 2
  config.init_from = str(tmp_path / "gone")
  with caplog.at_level("WARNING"):
    resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed["step"] == 2
  assert {k: meta(2)[k] for k in started} == started
  assert any(f"config.init_from={str(tmp_path / 'gone')!r} is not read" in
             r.getMessage() and f"started from {str(trained_workdir)!r}" in
             r.getMessage() for r in caplog.records), caplog.text


def test_a_missing_source_fails_before_anything_is_written(tmp_path):
  config = smoke.get_config()
  config.init_from = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError,
                     match=r"config.init_from='.*nope' does not exist"):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_weights_of_another_architecture_are_named(trained_workdir,
                                                   tmp_path):
  config = smoke.get_config()
  config.init_from = str(trained_workdir)
  config.conv = "mult"
  with pytest.raises(ValueError, match=re.escape(
      f"config.init_from={str(trained_workdir)!r}: the checkpoint at step 3")
                     + ".*conv 'adder' in the checkpoint, 'mult' in the config"
                     ".*config.init_from takes weights of the config's model"):
    train_lib.load_initial_weights(config)
  # Not a workdir: the error says which setting it comes from.
  config = smoke.get_config()
  config.init_from = str(tmp_path)
  with pytest.raises(ValueError, match=re.escape(
      f"config.init_from={str(tmp_path)!r}: no checkpoint found")):
    train_lib.load_initial_weights(config)
  # One step of a workdir: named, with the workdir to give.
  step = trained_workdir / "checkpoints" / "3"
  config.init_from = str(step)
  with pytest.raises(ValueError, match=re.escape(
      f"config.init_from={str(step)!r} is one checkpoint step; give its "
      f"training workdir {str(trained_workdir)!r}")):
    train_lib.load_initial_weights(config)
  config = smoke.get_config()
  state, rep = _state(config)
  variables = jax.tree_util.tree_map(
      lambda leaf: np.ones(leaf.shape, leaf.dtype),
      {"params": state.params, "batch_stats": state.batch_stats})
  initial = train_lib.InitialWeights(variables, "/x", None)
  shape = variables["params"]["fc3"][KERNEL].shape
  variables["params"]["fc3"][KERNEL] = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match=re.escape(
      f"config.init_from='/x': params fc3/{KERNEL} has shape (3, 4), the "
      f"model's is {shape}")):
    train_lib.with_initial_weights(state, initial, rep)
  del variables["params"]["fc3"]
  with pytest.raises(ValueError, match="its params lacks fc3/"):
    train_lib.with_initial_weights(state, initial, rep)


def test_an_addersr_config_refuses_it():
  from configs import sr_smoke  # pylint: disable=g-import-not-at-top
  config = sr_smoke.get_config()
  config.init_from = "/anything"
  with pytest.raises(ValueError, match="init_from is for classification"):
    train_lib.train_and_evaluate(config, "/nonexistent-workdir")


def test_the_official_checkpoint_initialises_resnet20(shared_data):
  path = shared_data / "official-resnet20" / "ResNet20-AdderNet.pth"
  from addernet_jax import convert  # pylint: disable=g-import-not-at-top
  from configs import cifar10_resnet20  # pylint: disable=g-import-not-at-top
  config = cifar10_resnet20.get_config()
  config.init_from = str(path)
  initial = train_lib.load_initial_weights(config)
  assert initial.record() == {"init_from": str(path), "init_from_step": None}
  state, rep = _state(config, (32, 32, 3))
  new = train_lib.with_initial_weights(state, initial, rep)
  expected = convert.load_torch_checkpoint(path, "resnet20", in_channels=3)
  chex.assert_trees_all_equal(new.params, expected["params"])
  chex.assert_trees_all_equal(new.batch_stats, expected["batch_stats"])
  config.conv = "mult"
  with pytest.raises(ValueError, match="conv 'adder', the config has "
                     "config.conv='mult'"):
    train_lib.load_initial_weights(config)


def test_init_from_reads_the_latest_step_not_the_best(trained_workdir,
                                                      tmp_path):
  """init_from takes a workdir's LATEST step, as documented, even when an
  older step ranks better (here step 2 is made the best)."""
  source = tmp_path / "source"
  shutil.copytree(trained_workdir, source)
  (source / "checkpoints" / "2" / "metrics" / "metrics").write_text(
      json.dumps({"eval_top1": 1.0}))
  config = smoke.get_config()
  config.init_from = str(source)
  initial = train_lib.load_initial_weights(config)
  assert initial.step == 3
  latest = jax.device_get(train_lib.restore_variables(config, source))
  chex.assert_trees_all_equal(initial.variables["params"], latest["params"])


def test_training_ranks_its_checkpoints_by_eval_top1(trained_workdir):
  """Checkpoints saved at an evaluation carry its metrics (eval_top1 ranks
  "best"); one saved between evaluations carries none of them."""
  with ckpt_lib.CheckpointManager(trained_workdir / "checkpoints",
                                  read_only=True) as mgr:
    assert "eval_top1" in mgr.metrics(3), mgr.metrics(3)
    assert "eval_top1" not in (mgr.metrics(2) or {}), mgr.metrics(2)
    assert mgr.best_step() == 3
  got = ckpt_lib.restore_for_eval(
      trained_workdir, {"step": jax.ShapeDtypeStruct((), jax.numpy.int32)},
      which="best", with_meta=True)
  assert got.which == "best" and got.meta["step"] == 3


def test_training_opens_its_checkpoints_as_configured(tmp_path, monkeypatch):
  """The run's manager keeps config.max_checkpoints_to_keep steps and the
  best by eval_top1 (higher is better)."""
  made = []

  class Stop(Exception):
    pass

  class Spy(ckpt_lib.CheckpointManager):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      made.append((self.max_to_keep, self.best_metric, self.best_mode))
      self.close()
      raise Stop

  monkeypatch.setattr(train_lib.ckpt_lib, "CheckpointManager", Spy)
  config = smoke.get_config()
  config.max_checkpoints_to_keep = 5
  with pytest.raises(Stop):
    train_lib.train_and_evaluate(config, tmp_path / "run")
  assert made == [(5, "eval_top1", "max")]


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_init_from_after_an_unfinished_first_save_then_a_resume(
    trained_workdir, tmp_path):
  """A run with init_from killed in its first save leaves only an unfinished
  step folder: the rerun starts from init_from's weights (read only then),
  and its own resume continues from its checkpoint, the meta still naming
  where it started and metrics.jsonl marking the resume step."""
  config = smoke.get_config()
  config.num_train_steps = 1
  config.init_from = str(trained_workdir)
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "5" / "state").mkdir(parents=True)
  assert train_lib.train_and_evaluate(config, workdir)["step"] == 1
  config.num_train_steps = 2
  assert train_lib.train_and_evaluate(config, workdir)["step"] == 2
  started = {"init_from": str(trained_workdir), "init_from_step": 3}
  with ckpt_lib.CheckpointManager(workdir / "checkpoints",
                                  read_only=True) as mgr:
    assert mgr.all_steps() == [1, 2]
    for step in (1, 2):
      assert {k: mgr.meta(step)[k] for k in started} == started, step
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {"step": 1, "resumed_from_step": 1} in records, records
  assert not any(r.get("resumed_from_step") == 0 for r in records), records
