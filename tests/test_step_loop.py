"""The step loop both trainings share: when it logs, evaluates, saves, stops."""

from __future__ import annotations

import types

import jax.numpy as jnp
import pytest

from addernet_jax import parallel
from addernet_jax import step_loop


class _Preemption:
  signal_name = "SIGTERM"

  def __init__(self, at: int | None):
    self.at = at

  def should_stop(self, step: int) -> bool:
    return self.at is not None and step >= self.at


def _run(total: int, *, start: int = 0, log_every: int = 2,
         save_every: int = 4, eval_every: int = 3,
         preempt_at: int | None = None, record_clock: bool = False):
  """Runs the loop with recording callbacks; returns (end, events). With
  `record_clock`, the throughput clock's restarts are events too."""
  events = []

  class Clock:
    def restart(self, step=None):
      events.append(("restart", step))

  def train_step(step):
    events.append(("step", step))
    return jnp.asarray(step)

  end = step_loop.run_steps(
      step=start, total_steps=total, train_step=train_step,
      flush=lambda s: events.append(("flush", s)),
      evaluate=lambda s: events.append(("eval", s)) or {"eval_x": float(s)},
      save=lambda s, m, force: events.append(("save", s, m, force)),
      eval_due=lambda s: s % eval_every == 0, save_every=save_every,
      log_every=log_every, preemption=_Preemption(preempt_at),
      mesh=parallel.make_mesh(), bar=types.SimpleNamespace(disable=True),
      throughput=Clock() if record_clock else step_loop.Throughput(start))
  return end, events


def test_cadence_of_logs_evaluations_and_checkpoints():
  end, events = _run(8)
  assert end == (8, False, {"eval_x": 8.0})
  assert [e for e in events if e[0] != "step"] == [
      ("flush", 2),
      ("flush", 3), ("eval", 3),
      ("flush", 4), ("flush", 4), ("save", 4, None, False),
      ("flush", 6), ("flush", 6), ("eval", 6),
      # step 8 is the last: no evaluation or save inside the loop, the
      # final ones instead (8 is a multiple of both cadences)
      ("flush", 8), ("flush", 8), ("eval", 8), ("save", 8, {"eval_x": 8.0},
                                                True)]
  assert [e[1] for e in events if e[0] == "step"] == list(range(8))


def test_an_evaluation_at_a_checkpoint_is_passed_to_it():
  _, events = _run(13, eval_every=4, save_every=4, log_every=100)
  saves = [e for e in events if e[0] == "save"]
  assert saves[:2] == [("save", 4, {"eval_x": 4.0}, False),
                       ("save", 8, {"eval_x": 8.0}, False)]
  assert saves[-1] == ("save", 13, {"eval_x": 13.0}, True)


def test_resumed_run_counts_from_its_step():
  end, events = _run(7, start=5, log_every=1)
  assert [e[1] for e in events if e[0] == "step"] == [5, 6]
  assert end.step == 7 and not end.preempted


def test_preemption_saves_and_stops_without_a_final_evaluation():
  end, events = _run(20, preempt_at=5, eval_every=100)
  assert end == (5, True, None)
  after = events[events.index(("step", 4)) + 1:]
  assert ("flush", 5) in after and after.count(("save", 5, None, True)) == 1
  assert after.index(("flush", 5)) < after.index(("save", 5, None, True))
  assert not any(e[0] == "eval" for e in events)


def test_preemption_at_an_evaluation_saves_its_metrics():
  """A signal on an evaluation step saved the checkpoint with the training
  metrics: the evaluation was lost to "best" (ranked last)."""
  end, events = _run(20, preempt_at=6, eval_every=3, save_every=100)
  assert end == (6, True, {"eval_x": 6.0})
  assert [e for e in events if e[0] == "save"] == [
      ("save", 6, {"eval_x": 6.0}, True)]


def test_throughput_clock_restarts_after_first_step_and_every_pause():
  """The rate leaves out compilation (the first step of a resumed run too)
  and every evaluation and checkpoint inside the loop."""
  _, events = _run(9, start=2, log_every=100, record_clock=True)

  def after(event):
    return events[events.index(event) + 1]
  assert after(("step", 2)) == ("restart", 3)  # resumed: first step is 2
  assert after(("eval", 3)) == ("restart", None)
  assert after(("save", 4, None, False)) == ("restart", None)
  assert after(("eval", 6)) == ("restart", None)
  assert after(("save", 8, None, False)) == ("restart", None)


def test_resumed_run_logs_on_the_global_cadence():
  """Log lines fall on multiples of log_every of the global step."""
  _, events = _run(11, start=3, log_every=4, eval_every=100, save_every=100)
  assert [e[1] for e in events if e[0] == "flush"] == [4, 8, 11]


def test_preempted_run_returns_its_last_evaluation():
  """A preempted run reports the metrics of its last evaluation."""
  end, _ = _run(20, preempt_at=7, eval_every=3, save_every=100)
  assert end == (7, True, {"eval_x": 6.0})


def test_last_step_on_the_evaluation_cadence_is_evaluated_once():
  """When the last step is also an evaluation step, only the final
  evaluation runs (not one inside the loop as well)."""
  _, events = _run(12, eval_every=3, save_every=100, log_every=100)
  assert [e[1] for e in events if e[0] == "eval"] == [3, 6, 9, 12]


def test_preemption_before_the_first_step_does_nothing():
  end, events = _run(20, start=7, preempt_at=7)
  assert end == (7, True, None) and events == []


def test_failing_step_propagates_and_nothing_is_saved():
  saved = []

  def train_step(step):
    if step == 2:
      raise RuntimeError("boom")
    return jnp.asarray(step)

  with pytest.raises(RuntimeError, match="boom"):
    step_loop.run_steps(
        step=0, total_steps=5, train_step=train_step, flush=lambda s: None,
        evaluate=lambda s: {}, save=lambda *a: saved.append(a),
        eval_due=lambda s: False, save_every=100, log_every=100,
        preemption=_Preemption(None), mesh=parallel.make_mesh(),
        bar=types.SimpleNamespace(disable=True),
        throughput=step_loop.Throughput(0))
  assert saved == []


def test_throughput_leaves_out_pauses(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(step_loop.time, "perf_counter", lambda: now[0])
  clock = step_loop.Throughput(0)
  now[0] = 130.0  # compiling the first step
  clock.restart(1)
  now[0] = 132.0  # steps 2..5 take 2 s
  assert clock.take(5, batch_size=10) == pytest.approx(4 * 10 / 2.0)
  now[0] = 140.0  # an evaluation
  clock.restart()
  now[0] = 141.0  # steps 6..7 take 1 s
  assert clock.take(7, batch_size=10) == pytest.approx(2 * 10 / 1.0)
  assert clock.take(7, batch_size=10) is None  # no step since
