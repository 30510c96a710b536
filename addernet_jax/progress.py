"""Progress bars that count finished device work, not dispatched work."""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax


class StepProgress:
  """Counts finished steps (training or evaluation) on a tqdm bar.

  The host dispatches steps ahead of the devices (asynchronous dispatch) up
  to the next point where it waits for a result, a log line or an
  evaluation: a bar that counted dispatched steps ran, with its ETA, several
  times too fast and then stalled. `dispatched(outputs)` hands a step's
  outputs to a background thread that waits for each step in turn and then
  advances the bar; the loop itself never waits for it. `close()` counts
  what has finished and stops the thread. No thread for a disabled bar.
  """

  _STOP = object()

  def __init__(self, bar: Any):
    self.bar = bar
    self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
    self._thread = None
    if not getattr(bar, "disable", False):
      self._thread = threading.Thread(target=self._count, daemon=True,
                                      name="addernet-progress")
      self._thread.start()

  def dispatched(self, outputs: Any) -> None:
    if self._thread is not None:
      self._queue.put(outputs)

  def close(self, timeout: float = 5.0) -> None:
    """Stops counting once the steps handed over so far have finished (or
    after `timeout` seconds, e.g. when a step failed)."""
    if self._thread is not None:
      self._queue.put(self._STOP)
      self._thread.join(timeout)
      self._thread = None

  def _count(self) -> None:
    while (outputs := self._queue.get()) is not self._STOP:
      try:
        jax.block_until_ready(outputs)
      except Exception:  # pylint: disable=broad-except
        return  # the training loop reports a failed step itself
      self.bar.update(1)


def shown(config: Any) -> bool:
  """Whether this process shows progress bars: process 0, when its stderr is
  a terminal (a redirected log would fill with redrawn bars), unless
  `config.progress_bar` is False."""
  try:
    terminal = sys.stderr is not None and sys.stderr.isatty()
  except (AttributeError, ValueError):
    terminal = False
  return (jax.process_index() == 0 and terminal
          and bool(config.get("progress_bar", True)))


@contextlib.contextmanager
def counting(total: int | None, desc: str, enabled: bool,
             unit: str = "batch") -> Iterator[StepProgress]:
  """A tqdm bar `desc` over `total` steps (None: unknown), removed when the
  block ends, counting the finished steps handed to the yielded
  `StepProgress`. Nothing is shown unless `enabled`."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm(total=total, desc=desc, unit=unit, leave=False,
             disable=not enabled, dynamic_ncols=True)
  progress = StepProgress(bar)
  try:
    yield progress
  finally:
    progress.close(timeout=1.0)
    bar.close()
