"""Progress reporting: bars count finished steps, not dispatched ones
(training and evaluation); images/s count training time only."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tqdm import tqdm

from addernet_jax import data as data_lib
from addernet_jax import eval_lib, parallel
from addernet_jax.models import get_model
from addernet_jax import progress as progress_lib
from addernet_jax.progress import StepProgress


class _Step:
  """A step output whose completion the test controls."""

  def __init__(self):
    self.done = threading.Event()

  def block_until_ready(self):
    self.done.wait()
    return self


def _bar() -> tqdm:
  return tqdm(total=10, file=io.StringIO())


def _wait_for(bar: tqdm, n: int) -> None:
  deadline = time.monotonic() + 10
  while bar.n < n and time.monotonic() < deadline:
    time.sleep(0.01)


def test_only_finished_steps_count_in_order():
  progress = StepProgress(_bar())
  steps = [{"loss": _Step(), "top1": _Step()} for _ in range(4)]
  for outputs in steps:
    progress.dispatched(outputs)
  time.sleep(0.2)
  assert progress.bar.n == 0  # the host ran ahead; nothing finished yet
  steps[0]["loss"].done.set()
  time.sleep(0.2)
  assert progress.bar.n == 0  # one output of the step is still running
  steps[0]["top1"].done.set()
  steps[2]["loss"].done.set()
  steps[2]["top1"].done.set()
  _wait_for(progress.bar, 1)
  time.sleep(0.2)
  assert progress.bar.n == 1  # step 2 waits behind step 1
  for outputs in steps:
    outputs["loss"].done.set()
    outputs["top1"].done.set()
  progress.close()
  assert progress.bar.n == 4


def test_real_outputs_are_all_counted_at_close():
  progress = StepProgress(_bar())
  x = jnp.ones((64, 64))
  for i in range(3):
    progress.dispatched({"loss": jnp.sum(x @ x * i), "n": i})
  progress.close()
  assert progress.bar.n == 3
  progress.close()  # a second close does nothing


def test_close_does_not_hang_on_a_step_that_never_finishes():
  progress = StepProgress(_bar())
  progress.dispatched({"loss": _Step()})
  start = time.monotonic()
  progress.close(timeout=0.3)
  assert time.monotonic() - start < 3
  assert progress.bar.n == 0


def test_a_disabled_bar_starts_no_thread():
  before = threading.active_count()
  progress = StepProgress(tqdm(total=3, disable=True))
  progress.dispatched({"loss": jnp.ones(())})
  assert threading.active_count() == before
  progress.close()


class _Clock:
  """The `time` module with a `perf_counter` the test can move forward."""

  def __init__(self):
    self.offset = 0.0

  def perf_counter(self) -> float:
    return time.perf_counter() + self.offset

  def __getattr__(self, name):
    return getattr(time, name)


def test_images_per_second_leave_out_evaluation_time(tmp_path, monkeypatch):
  """An evaluation (here made to take 1000 s) inside a logging interval
  made the interval's images/s, and the summary's, count it as training."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import digits_lenet5  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  clock = _Clock()
  monkeypatch.setattr(train_lib, "time", clock)
  evaluate = train_lib._evaluate  # pylint: disable=protected-access

  def slow_evaluate(*args, **kwargs):
    clock.offset += 1000.0
    return evaluate(*args, **kwargs)

  monkeypatch.setattr(train_lib, "_evaluate", slow_evaluate)
  config = digits_lenet5.get_config()
  config.update(conv="mult", num_epochs=2, log_every_steps=1000,
                eval_max_examples=32, recalibrate_bn_batches=1,
                progress_bar=False)
  summary = train_lib.train_and_evaluate(config, tmp_path)
  # Two epochs of 22 steps of 64 images; the last interval (steps 22-44)
  # follows the first epoch's evaluation.
  assert summary["step"] == 44
  assert summary["images_per_sec"] > 22 * 64 / 100, summary


def test_a_two_epoch_run_passes_its_settings_to_each_part(tmp_path,
                                                         monkeypatch):
  """What no other default test saw (a mutation audit of train_lib): the
  evaluation cadence (`eval_every_epochs`), held-out examples, the epoch
  whose batches re-estimate BatchNorm, the optimizer's steps per epoch, the
  batch images/s counts and the logged rate at an epoch's last step."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from configs import digits_lenet5  # pylint: disable=g-import-not-at-top
  from addernet_jax import optim, step_loop, train_lib  # pylint: disable=g-import-not-at-top
  seen = {"steps_per_epoch": [], "recalibration_epochs": [], "batches": []}
  make_optimizer = optim.make_optimizer
  recalibrated_stats = train_lib._recalibrated_stats  # pylint: disable=protected-access
  take = step_loop.Throughput.take

  def spy_make_optimizer(config, params, steps_per_epoch, **kwargs):
    seen["steps_per_epoch"].append(steps_per_epoch)
    return make_optimizer(config, params, steps_per_epoch=steps_per_epoch,
                          **kwargs)

  def spy_recalibrated_stats(config, evaluator, params, batch_stats, data,
                             epoch):
    seen["recalibration_epochs"].append(epoch)
    return recalibrated_stats(config, evaluator, params, batch_stats, data,
                              epoch)

  def spy_take(self, step, batch_size):
    seen["batches"].append(batch_size)
    return take(self, step, batch_size)

  monkeypatch.setattr(optim, "make_optimizer", spy_make_optimizer)
  monkeypatch.setattr(train_lib, "_recalibrated_stats", spy_recalibrated_stats)
  monkeypatch.setattr(step_loop.Throughput, "take", spy_take)
  config = digits_lenet5.get_config()
  # 1438 training images less 40 held out: 21 steps of 64 an epoch.
  config.update(conv="mult", num_epochs=2, log_every_steps=7,
                eval_every_epochs=2, holdout_examples=40, eval_max_examples=-1,
                recalibrate_bn_batches=1, progress_bar=False)
  summary = train_lib.train_and_evaluate(config.copy_and_resolve_references(),
                                         tmp_path)
  assert summary["step"] == 42 and summary["eval_num_examples"] == 40, summary
  lines = [json.loads(l) for l in
           (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "eval_top1" in l] == [42], lines
  assert seen["recalibration_epochs"] == [1], seen
  assert seen["steps_per_epoch"] == [21], seen
  assert seen["batches"] and set(seen["batches"]) == {64}, seen
  rate = optim.learning_rate_schedule(config, 21)
  logged = {l["step"]: l["lr"] for l in lines if "lr" in l}
  assert sorted(logged) == [7, 14, 21, 28, 35, 42], logged
  for step, lr in logged.items():  # the rate of the interval's last step
    assert lr == pytest.approx(float(rate(step - 1)), rel=1e-6), (step, lr)
  assert logged[21] != pytest.approx(float(rate(21)), rel=1e-6)


def test_evaluation_shows_its_batches(capsys, monkeypatch):
  """`Evaluator(..., progress_bar=True)` counts the evaluated batches on a bar
  that is removed when the evaluation ends, waiting for each batch's device
  arrays; without it nothing is shown."""
  handed = []
  dispatched = StepProgress.dispatched
  monkeypatch.setattr(StepProgress, "dispatched", lambda self, outputs: (
      handed.append(jax.tree.leaves(outputs)), dispatched(self, outputs)))
  model = get_model("lenet5_bn", num_classes=10, conv="mult")
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  eval_set = eval_lib.InMemoryEvalSet(
      rng.integers(0, 256, (40, 8, 8, 1), np.uint8),
      rng.integers(0, 10, 40), mesh)
  results = []
  for shown in (True, False):
    evaluator = eval_lib.Evaluator(model, data_lib.dataset_info("digits"),
                                   mesh, 16, progress_bar=shown)
    capsys.readouterr()
    results.append(evaluator.evaluate_in_memory(
        variables["params"], variables["batch_stats"], eval_set))
    err = capsys.readouterr().err
    if shown:
      assert "evaluating:" in err and "/3 [" in err, err
    else:
      assert err == ""
  assert results[0] == results[1] and results[0]["num_examples"] == 40
  assert len(handed) == 6 and all(
      leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
      for leaves in handed)


def test_bars_are_shown_on_a_terminal_only(monkeypatch):
  """A log redirected to a file filled with redrawn bars (carriage returns
  and cursor-up escapes); they are shown where stderr is a terminal."""
  from addernet_jax import progress  # pylint: disable=g-import-not-at-top

  class Stream:
    def __init__(self, tty):
      self.tty = tty

    def isatty(self):
      return self.tty

  for tty, setting, expected in ((True, True, True), (False, True, False),
                                 (True, False, False)):
    monkeypatch.setattr(sys, "stderr", Stream(tty))
    assert progress.shown({"progress_bar": setting}) is expected
  monkeypatch.setattr(sys, "stderr", None)
  assert progress.shown({}) is False


# From a mutation audit: a failed or hung step, the default, counting's bar.


class _Failing:
  def block_until_ready(self):
    raise RuntimeError("the step failed on the device")


def test_a_failed_step_stops_the_count_without_a_thread_error(monkeypatch):
  """The steps finished before a failed one are counted, none after it
  (the loop reports the failure), and the failure does not escape the
  counting thread."""
  escaped = []
  monkeypatch.setattr(threading, "excepthook", escaped.append)
  bar = tqdm(total=7, file=io.StringIO())
  progress = progress_lib.StepProgress(bar)
  progress.dispatched({"loss": jnp.ones((3, 5)).sum()})
  progress.dispatched({"loss": _Failing()})
  for _ in range(3):
    progress.dispatched({"loss": jnp.ones((2,))})
  progress.close(timeout=5.0)
  assert bar.n == 1 and not escaped, (bar.n, escaped)


def test_a_second_close_after_a_hung_step_does_not_wait_again():
  progress = progress_lib.StepProgress(tqdm(total=3, file=io.StringIO()))
  step = _Step()
  progress.dispatched({"loss": step})
  progress.close(timeout=0.2)
  start = time.monotonic()
  progress.close(timeout=3.0)  # the thread was let go: nothing to join
  took = time.monotonic() - start
  step.done.set()
  assert took < 1.0, took


def test_bars_are_shown_by_default_on_a_terminal(monkeypatch):
  """A config without `progress_bar` shows bars (the field defaults to
  True), as a ConfigDict or a dict."""
  class Tty:
    def isatty(self):
      return True
  monkeypatch.setattr(sys, "stderr", Tty())
  assert progress_lib.shown({}) is True
  assert progress_lib.shown(ml_collections.ConfigDict({"seed": 3})) is True
  assert progress_lib.shown({"progress_bar": 0}) is False


def test_counting_removes_its_bar_and_counts_to_the_total(monkeypatch):
  """The bar of `counting` has the total given, counts every finished step
  at the end of the block and is removed (leave=False) when it ends."""
  made = []
  real = tqdm

  def recording(*args, **kwargs):
    kwargs["file"] = io.StringIO()
    bar = real(*args, **kwargs)
    made.append((bar, kwargs))
    return bar
  monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(
      tqdm=recording))
  with progress_lib.counting(5, "scoring", enabled=True, unit="img") as p:
    for i in range(5):
      p.dispatched({"x": jnp.full((3, 2), float(i)).sum()})
  (bar, kwargs), = made
  assert (bar.total, bar.desc, bar.unit) == (5, "scoring", "img")
  assert kwargs["leave"] is False and kwargs["disable"] is False
  assert bar.n == 5
