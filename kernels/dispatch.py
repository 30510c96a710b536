"""Picks the Pallas kernels for `addernet_jax.ops` (its `implementation="pallas"`).

`backend_for(xp_shape, w_shape, strides)` returns an `addernet_jax.ops.Backend`
or None (ops then falls back to XLA with a one-time log line):

- "gpu": the Triton-lowered kernels of `kernels.gpu` (see below for why).
- "tpu": the Mosaic TPU kernels of `kernels.tpu`.
- "cpu": the `kernels.gpu` kernels in Pallas interpret mode, so that the test
  suite exercises the kernel logic on every CI run (set
  `ADDERNET_CPU_KERNELS=tpu` or `=mosaic` to interpret the TPU kernels or the
  Mosaic GPU forward instead; the latter needs JAX >= 0.11).

GPU lowering choice. The adder kernels are broadcast-subtract-abs-accumulate
loops on CUDA cores: no tensor-core (wgmma) work. Triton lays out the register
tiles and broadcasts itself and lowers the same kernel source on JAX 0.10 to
0.12 (deprecated since 0.11, still present; selected explicitly with Triton
`CompilerParams`, so the `jax_pallas_use_mosaic_gpu` default does not matter),
and runs on Ampere too; Mosaic GPU (Hopper and newer) is JAX's supported GPU
backend. Triton is the default by reasoning, not measurement: no GPU was
available when this was written. The choice is switchable with `ADDERNET_GPU_KERNELS`:
"triton" (default), "mosaic" (`kernels.mosaic_gpu`: a Mosaic GPU forward, for
Hopper, with the Triton input gradient; written so the choice can be made by
measuring both with `benchmarks/gpu_session.sh`) or "xla" (no Pallas kernel).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from addernet_jax.ops import Backend
from . import gpu, layout, tpu

try:  # Mosaic GPU's Pallas API moves between JAX releases.
  from . import mosaic_gpu
except ImportError:  # pragma: no cover - a JAX without Pallas Mosaic GPU.
  mosaic_gpu = None

log = logging.getLogger(__name__)

# Offsets inside the Triton kernels are int32 unless an operand exceeds 4 GiB;
# the TPU path builds a patches matrix, which we cap to keep memory bounded.
MAX_TPU_PATCHES_BYTES = 4 << 30

# "mosaic": the Mosaic GPU forward (Hopper) with the Triton input gradient;
# shapes it does not take use the Triton pair.
_GPU_FAMILIES = {"triton": gpu}
if mosaic_gpu is not None:
  _GPU_FAMILIES["mosaic"] = mosaic_gpu


def unsupported_reason(xp_shape: Sequence[int], w_shape: Sequence[int],
                       strides: Sequence[int], platform: str) -> str | None:
  """Why the kernels do not take these shapes, or None if they do."""
  try:
    layout.check_shapes("dispatch", tuple(xp_shape), tuple(w_shape),
                        tuple(strides))
  except ValueError as e:
    return str(e)
  if platform == "tpu":
    ho, wo = layout.output_hw(xp_shape, w_shape, strides)
    k = w_shape[0] * w_shape[1] * w_shape[2]
    patches = 4 * k * xp_shape[0] * ho * wo
    if patches > MAX_TPU_PATCHES_BYTES:
      return (f"TPU patches matrix would take {patches} bytes "
              f"(> {MAX_TPU_PATCHES_BYTES})")
  return None


def _backend(module, interpret: bool) -> Backend:
  return Backend(
      forward=functools.partial(module.forward, interpret=interpret),
      input_grad=functools.partial(module.input_grad, interpret=interpret),
      input_grad_takes_window=getattr(module, "INPUT_GRAD_TAKES_WINDOW",
                                      False))


@functools.lru_cache(maxsize=None)
def kernel_failure(module, xp_shape: tuple[int, ...], w_shape: tuple[int, ...],
                   strides: tuple[int, int], dtype: str) -> str | None:
  """Why `module`'s kernels fail to lower or compile for these shapes, or None.

  Run once per shape on a real GPU/TPU before the kernels are used, so that a
  kernel the installed JAX, Triton or Mosaic cannot build (a deprecated
  lowering removed, an op it does not support) becomes a logged XLA fallback
  rather than an error in the user's step. Costs one kernel compile per shape.
  `ADDERNET_KERNEL_PROBE=0` skips it.
  """
  if os.environ.get("ADDERNET_KERNEL_PROBE", "1") == "0":
    return None
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  xp = jax.ShapeDtypeStruct(xp_shape, jnp.dtype(dtype))
  w = jax.ShapeDtypeStruct(w_shape, jnp.float32)
  g = jax.ShapeDtypeStruct((xp_shape[0], ho, wo, w_shape[3]), jnp.float32)
  try:
    jax.jit(lambda a, b: module.forward(a, b, strides)).trace(
        xp, w).lower().compile()
    jax.jit(lambda a, b, c: module.input_grad(a, b, c, strides)).trace(
        xp, w, g).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def _checked_backend(module, xp_shape, w_shape, strides, dtype) -> Backend | None:
  reason = kernel_failure(module, tuple(int(d) for d in xp_shape),
                          tuple(int(d) for d in w_shape), strides,
                          jnp.dtype(dtype).name)
  if reason is not None:
    log.warning("kernels.dispatch: the %s kernels failed to build for xp %s, "
                "w %s, strides %s (%s); using the XLA implementation.",
                module.__name__, tuple(xp_shape), tuple(w_shape), strides,
                reason)
    return None
  return _backend(module, interpret=False)


def backend_for(xp_shape: Sequence[int], w_shape: Sequence[int],
                strides: Sequence[int],
                dtype: Any = jnp.float32) -> Backend | None:
  """The Pallas backend for these shapes on the default JAX backend, or None.

  None (with a log line saying why) where the kernels do not take the shapes
  or, on a GPU/TPU, fail to build for them (`kernel_failure`).
  """
  platform = jax.default_backend()
  strides = tuple(int(s) for s in strides)
  reason = unsupported_reason(xp_shape, w_shape, strides, platform)
  if reason is not None:
    log.info("kernels.dispatch: no kernel for xp %s, w %s, strides %s: %s",
             tuple(xp_shape), tuple(w_shape), strides, reason)
    return None
  if platform == "gpu":
    choice = os.environ.get("ADDERNET_GPU_KERNELS", "triton").lower()
    module = _GPU_FAMILIES.get(choice)
    if module is None:
      if choice != "xla":
        log.warning("kernels.dispatch: ADDERNET_GPU_KERNELS=%r is not one of "
                    "%s or 'xla'", choice, sorted(_GPU_FAMILIES))
      return None
    if module is mosaic_gpu and mosaic_gpu is not None:
      why = mosaic_gpu.unsupported_reason(tuple(xp_shape), tuple(w_shape),
                                          strides)
      if why is not None:
        log.info("kernels.dispatch: Mosaic GPU forward does not take xp %s, "
                 "w %s (%s); using the Triton kernels", tuple(xp_shape),
                 tuple(w_shape), why)
        module = gpu
    return _checked_backend(module, xp_shape, w_shape, strides, dtype)
  if platform == "tpu":
    return _checked_backend(tpu, xp_shape, w_shape, strides, dtype)
  if platform == "cpu":
    choice = os.environ.get("ADDERNET_CPU_KERNELS", "gpu").lower()
    if choice == "mosaic" and mosaic_gpu is not None and (
        mosaic_gpu.interpret_supported()) and (
        mosaic_gpu.unsupported_reason(tuple(xp_shape), tuple(w_shape),
                                      strides) is None):
      return _backend(mosaic_gpu, interpret=True)
    return _backend(tpu if choice == "tpu" else gpu, interpret=True)
  return None


def mac_count(xp_shape: Sequence[int], w_shape: Sequence[int],
              strides: Sequence[int]) -> int:
  """Adder multiply-accumulates of one forward pass (n*ho*wo*kh*kw*cin*cout)."""
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  return xp_shape[0] * ho * wo * math.prod(w_shape)
