"""The step loop the classification and AdderSR trainings share.

`run_steps` decides when a training loop logs, evaluates, saves and stops on
a preemption signal; the caller's functions do the work (one step, the
metrics, the evaluation, the checkpoint). `Throughput` times the training
steps between two logs, leaving out compilation and the pauses for
evaluation and checkpoints.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

from absl import logging as log
import jax

from addernet_jax import parallel
from addernet_jax import preemption as preemption_lib
from addernet_jax import progress as progress_lib


class Throughput:
  """Training examples per second between two `take`s, counting only the
  time the steps ran: `restart(step)` after the first step (compilation
  excluded), `restart()` after a pause (evaluation, a checkpoint)."""

  def __init__(self, step: int):
    self._time, self._step = time.perf_counter(), step

  def restart(self, step: int | None = None) -> None:
    self._time = time.perf_counter()
    if step is not None:
      self._step = step

  def take(self, step: int, batch_size: int) -> float | None:
    """Examples per second since the last take or restart (None when no
    step ran since), and restarts the count at `step`."""
    now = time.perf_counter()
    rate = None
    if step > self._step:
      rate = (step - self._step) * batch_size / max(now - self._time, 1e-9)
    self._time, self._step = now, step
    return rate


class LoopEnd(NamedTuple):
  """Where `run_steps` stopped: the step reached, whether a preemption
  signal stopped it, and the last evaluation's metrics (None if it ran
  none)."""
  step: int
  preempted: bool
  last_eval: dict[str, Any] | None


def run_steps(*, step: int, total_steps: int,
              train_step: Callable[[int], Any],
              flush: Callable[[int], None],
              evaluate: Callable[[int], dict[str, Any]],
              save: Callable[[int, dict[str, Any] | None, bool], None],
              eval_due: Callable[[int], bool], save_every: int,
              log_every: int, preemption: preemption_lib.PreemptionFlag,
              mesh: jax.sharding.Mesh, bar: Any,
              throughput: Throughput) -> LoopEnd:
  """Runs training steps `step`..`total_steps - 1`, then evaluates and saves.

  After each step `s` (counted from 1): metrics are flushed every
  `log_every` steps, an evaluation runs where `eval_due(s)` and a checkpoint
  is saved every `save_every` steps (both before the last step only: the
  final evaluation and save follow the loop), and a preemption signal saves
  and stops. A signal before the first step stops at once, with nothing
  new to save.

  Args:
    train_step: dispatches step `s` (0-based) and returns its outputs (any
      pytree of arrays; the loop waits on them only to bound the steps in
      flight and to time the first step).
    flush: fetches and writes the metrics of the steps since the last flush;
      called with the number of steps done.
    evaluate: evaluates the current state, returns its metrics.
    save: `save(step, eval_metrics_or_None, force)` writes a checkpoint.
    preemption: the `preemption.PreemptionFlag` of the run (`should_stop`,
      `signal_name`).
    bar: a tqdm bar counting finished steps (`progress.StepProgress`).
  """
  start_step = step
  last_eval = None
  if preemption.should_stop(step):
    log.warning("%s before the first step: stopping without training",
                preemption.signal_name)
    return LoopEnd(step, True, None)
  # At most a few steps in flight on a multi-device CPU mesh (XLA:CPU
  # deadlocks in a collective when the host runs 32 programs ahead; see
  # parallel.DispatchWindow); no limit on one device, GPUs and TPUs.
  window = parallel.DispatchWindow.for_mesh(mesh)
  progress = progress_lib.StepProgress(bar)
  preempted = False
  try:
    while step < total_steps:
      outputs = train_step(step)
      window.push(outputs)
      progress.dispatched(outputs)
      step += 1
      if step == start_step + 1:
        jax.block_until_ready(outputs)
        throughput.restart(step)
      if step % log_every == 0:
        flush(step)
      eval_metrics = None
      if eval_due(step) and step < total_steps:
        flush(step)
        eval_metrics = last_eval = evaluate(step)
        throughput.restart()
      if step % save_every == 0 and step < total_steps:
        flush(step)
        save(step, eval_metrics, False)
        throughput.restart()
      if preemption.should_stop(step):
        flush(step)
        save(step, eval_metrics, True)
        log.warning("%s: saved a checkpoint at step %d; exiting",
                    preemption.signal_name, step)
        preempted = True
        break
    flush(step)
  except BaseException:
    progress.close(timeout=1.0)  # a failed step may never finish
    raise
  progress.close()
  if preempted:
    return LoopEnd(step, True, last_eval)
  last_eval = evaluate(step)
  save(step, last_eval, True)
  return LoopEnd(step, False, last_eval)
