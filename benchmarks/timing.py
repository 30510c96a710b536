"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import jax


def per_call_seconds(fn: Callable, args: Sequence = (), *, reps: int,
                     rounds: int) -> list[float]:
  """Seconds per call of `fn(*args)`, one figure per round.

  Each round dispatches `reps` calls back to back and waits once, so that on
  accelerators the host round trip of a wait is not timed. Call `fn` once
  before (compilation is not excluded here).
  """
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(reps)])
    times.append((time.perf_counter() - start) / reps)
  return times
