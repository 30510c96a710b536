"""Preemption: turn SIGTERM (and Ctrl-C) into a flag the training loop checks.

Preemptible TPU/GPU nodes (and SLURM's `--signal`, Kubernetes, `kill`) send
SIGTERM some seconds before the process is killed. The training loop should
not die mid-step; it checks `preempted.should_stop(step)` once per step,
saves a checkpoint and exits with status 0, and the next run resumes.
A first Ctrl-C (SIGINT) does the same; a second one interrupts at once
(KeyboardInterrupt, as Python does by default; in the command-line entry
points, after `exit_at_second_interrupt()`, one line and exit status 130:
a KeyboardInterrupt raised while XLA compiles crashed the interpreter).

    preempted = install_preemption_handler()
    for step in ...:
      state = train_step(state, batch)
      if preempted.should_stop(step):
        ckpt.save(step, state, meta, force=True)
        sys.exit(0)

With several processes, SIGTERM usually reaches every host, but not at the
same step; each process must stop at the SAME step or the others block in a
collective. `should_stop(step)` therefore agrees globally: when JAX's
distributed runtime is initialised it uses JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`, which the coordination
service drives from SIGTERM on any host), else it reads the local flag.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import jax

logger = logging.getLogger(__name__)


def _distributed_preemption_available() -> bool:
  """True when JAX's coordination service tracks preemption notices."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover
    return False
  state = getattr(distributed, "global_state", None)
  return (jax.process_count() > 1 and state is not None
          and getattr(state, "preemption_sync_manager", None) is not None)


DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT)


_exit_at_second_interrupt = False


def exit_at_second_interrupt(enabled: bool = True) -> None:
  """A second Ctrl-C exits the process at once (one `error:` line, status
  130) instead of raising KeyboardInterrupt: for command-line entry points,
  where the exception, raised inside XLA's compilation or a device wait,
  ended in a segmentation fault or a long traceback."""
  global _exit_at_second_interrupt
  _exit_at_second_interrupt = enabled


def _second_interrupt() -> None:
  if _exit_at_second_interrupt:
    os.write(2, b"error: interrupted again: stopped at once, without saving "
                b"(checkpoints already written are kept)\n")
    os._exit(130)  # pylint: disable=protected-access
  raise KeyboardInterrupt  # as Python does by default


class PreemptionFlag(threading.Event):
  """A `threading.Event` set by SIGTERM and SIGINT (or the given signals).

  `is_set()` is this process's view; use `should_stop(step)` in the training
  loop, which is the same in every process of a multi-process run.
  """

  def __init__(self, signals: tuple[int, ...] = DEFAULT_SIGNALS):
    super().__init__()
    self.signals = signals
    self.signal_received: int | None = None
    self._previous: dict[int, Any] = {}
    self._use_jax_sync = False

  def _handler(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.is_set():
      _second_interrupt()
    self.signal_received = signum
    if not self.is_set():
      logger.warning(
          "received %s: will save a checkpoint and stop after the current "
          "step (during start-up: stop before the first one)%s",
          signal.Signals(signum).name,
          " (Ctrl-C again to stop at once, without saving)"
          if signum == signal.SIGINT else "")
    self.set()

  @property
  def signal_name(self) -> str:
    """"SIGTERM" or "SIGINT": what asked to stop (SIGTERM when JAX's
    coordination service passed the notice on from another process)."""
    return signal.Signals(self.signal_received or signal.SIGTERM).name

  def _sigint_to_sigterm(self, signum: int, frame: Any) -> None:
    del signum, frame
    if self.signal_received == signal.SIGINT:
      _second_interrupt()
    self.signal_received = signal.SIGINT
    logger.warning(
        "received SIGINT: every process will save a checkpoint and stop at "
        "a step they all reach (Ctrl-C again to stop this process at once, "
        "without saving; the others then stop with an error)")
    os.kill(os.getpid(), signal.SIGTERM)

  def install(self) -> "PreemptionFlag":
    """Installs the handlers (main thread only); returns self."""
    self._use_jax_sync = _distributed_preemption_available()
    if threading.current_thread() is not threading.main_thread():
      logger.warning("install_preemption_handler called outside the main "
                     "thread: signals cannot be caught there")
      return self
    for sig in self.signals:
      if self._use_jax_sync and sig == signal.SIGTERM:
        # JAX's coordination service already listens for SIGTERM and tells
        # every process; a Python handler would replace its handler.
        continue
      handler = self._handler
      if self._use_jax_sync and sig == signal.SIGINT:
        # A Ctrl-C reaches one process only, which cannot stop alone without
        # blocking the others in a collective: it becomes a SIGTERM to this
        # process, which JAX's coordination service tells every process.
        handler = self._sigint_to_sigterm
      self._previous[sig] = signal.signal(sig, handler)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were in place before `install`."""
    for sig, prev in self._previous.items():
      signal.signal(sig, prev)
    self._previous.clear()

  def should_stop(self, step: int) -> bool:
    """True if training should checkpoint and stop after step `step`.

    Must be called by every process at every step when there are several
    processes (it is then a collective agreement on the stopping step).
    """
    if self._use_jax_sync:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self.set()
        return True
      return False
    return self.is_set()

  def __enter__(self) -> "PreemptionFlag":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()


def install_preemption_handler(
    signals: tuple[int, ...] = DEFAULT_SIGNALS) -> PreemptionFlag:
  """Installs SIGTERM and SIGINT handlers and returns the flag they set.

  Call after `parallel.initialize_distributed` (so that a multi-process run
  uses JAX's cross-host preemption agreement) and from the main thread.

  Args:
    signals: the signals that request a checkpoint-and-exit (a second
      SIGINT raises KeyboardInterrupt; with several processes a SIGINT is
      passed on as a SIGTERM, which JAX tells every process).

  Returns:
    A `PreemptionFlag` (a `threading.Event`): `.is_set()` once a signal
    arrived, `.should_stop(step)` to agree on the stopping step across
    processes, `.uninstall()` to restore the previous handlers.
  """
  return PreemptionFlag(signals).install()


__all__ = ["PreemptionFlag", "install_preemption_handler"]
