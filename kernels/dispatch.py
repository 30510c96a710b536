"""Picks the Pallas kernels for `addernet_jax.ops`, and checks each before use.

`backend_for(xp_shape, w_shape, strides, dtype, rows=, cols=, reference=)`
returns a `Kernels` (this module's own small tuple of plain callables, which
`addernet_jax.ops` wraps; nothing here imports `addernet_jax`) or None, in
which case ops uses its XLA implementation.

Families and the fallback chain. A kernel family is a module of this package
with `forward(xp, w, strides, *, interpret)` and `input_grad(xp, w, g,
strides, *, interpret[, rows, cols])` (`FAMILY_MODULES`):

- "triton": `kernels.gpu`, Pallas with the Triton lowering (CUDA cores).
- "mosaic_gpu": `kernels.mosaic_gpu`, a Pallas Mosaic GPU forward (Hopper)
  with the Triton input gradient.
- "triton_simt": `kernels.triton_simt`, Pallas Triton kernels shaped like a
  SIMT SGEMM (register tiles, channel-major operands).
- "tpu_batch": `kernels.tpu_batch`, Pallas Mosaic TPU with the batch on the
  lanes (no patches matrix; batches of at least 64).
- "tpu": `kernels.tpu`, Pallas Mosaic TPU over a patches matrix (any batch).

Each platform tries a chain of families in order and falls back to XLA after
the last: on a GPU `ADDERNET_GPU_KERNELS` names it ("triton", the default;
"mosaic" = Mosaic GPU -> Triton; "simt" = Triton SIMT -> Triton; "xla" =
none; or a comma-separated list of family names), on a TPU it is
("tpu_batch", "tpu"), and on the CPU the families run in
Pallas interpret mode, chosen with `ADDERNET_CPU_KERNELS` ("gpu" = Triton,
the default; "tpu"; "tpu_batch,tpu"; "mosaic" = Mosaic GPU -> Triton, JAX
>= 0.11), so that
the test suite exercises the kernel logic and this dispatch on every run.
A family is skipped (and the next tried) when it cannot be imported (any
exception, not only ImportError), does not take the shapes (the family's own
`unsupported_reason`), cannot interpret on this JAX, or fails its check.

Check on first use (`kernel_failure`). Once per process and distinct call
(family, shapes, dtype, input-gradient window), before a family is used:
build the exact forward and input-gradient calls `ops` will make (the
operands' dtype, the window), run them on random data of the call's shapes,
and compare with the XLA reference `ops` passes (relative L2 and max error,
`TOLERANCE` by dtype; a non-finite value never passes). A family that fails
to build, fails at run time, returns other shapes or computes wrong numbers
is logged once (family, shapes, reason) and the next in the chain is tried.
The check runs eagerly, ahead-of-time compiled on concrete data, in a thread
of its own (JAX's trace state is per thread), so it works while `jax.jit` or
`jax.shard_map` traces the caller (inside `shard_map` on the per-device
shapes) and nothing of the caller's trace leaks into it. Inside
`shard_map(check_vma=True)` it runs the kernels in a `shard_map` of its own
with operands varying as the caller's (`varying`). Operands are capped at
`ADDERNET_KERNEL_PROBE_MAX_MB` (default 1024 MiB, the kernel's and the
reference's outputs included): a larger call is checked on fewer images (the
batch is only the outermost grid axis of every kernel), every other
dimension exact. `ADDERNET_KERNEL_PROBE=0` turns the check off, `=1` turns
it on in interpret mode too (off there by default: on the CPU the kernels
are a test vehicle, and the check would double their compile time; on
inside `shard_map(check_vma=True)`, where Pallas' HLO interpreter fails).

Limit: on CUDA an illegal memory access is sticky (the process's context is
lost), so after such a failure the XLA fallback fails too; the log line then
names the kernel that caused it. Interpret mode (CPU, JAX 0.10-0.11):
Pallas' HLO interpreter (Triton kernels) cannot run with varying operands
(`check_vma=True`): the check rejects it there; TPU interpret mode inside a
`shard_map` over several devices hangs at its multi-device barrier, so a
family's `INTERPRET_MAX_DEVICES` bounds the enclosing `shard_map`'s devices
for its interpret mode (the family is not used beyond).

GPU lowering choice. The adder kernels are broadcast-subtract-abs-accumulate
loops on CUDA cores: no tensor-core (wgmma) work. Triton lays out the
register tiles and broadcasts itself and lowers the same kernel source on JAX
0.10 to 0.12 (deprecated since 0.11, still present; selected explicitly with
Triton `CompilerParams`), and runs on Ampere too; Mosaic GPU (Hopper and
newer) is JAX's supported GPU backend. Triton is the default by reasoning,
not measurement; `benchmarks/gpu_session.sh` measures both.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import layout

log = logging.getLogger(__name__)

# Family name -> the module of this package that implements it (a module
# object may stand in, e.g. in tests).
FAMILY_MODULES: dict[str, Any] = {"triton": "gpu", "mosaic_gpu": "mosaic_gpu",
                                  "triton_simt": "triton_simt",
                                  "tpu_batch": "tpu_batch", "tpu": "tpu"}
# Names accepted in ADDERNET_GPU_KERNELS / ADDERNET_CPU_KERNELS besides the
# family names (a comma-separated list of either is a chain).
GPU_CHAINS = {"triton": ("triton",), "mosaic": ("mosaic_gpu", "triton"),
              "simt": ("triton_simt", "triton"), "xla": ()}
CPU_CHAINS = {"gpu": ("triton",), "triton": ("triton",), "tpu": ("tpu",),
              "mosaic": ("mosaic_gpu", "triton"),
              "simt": ("triton_simt", "triton"), "xla": ()}
TPU_CHAIN = ("tpu_batch", "tpu")
# The mesh axes along which (xp, w) vary inside the caller's shard_map.
Varying = tuple[tuple[str, ...], tuple[str, ...]]

# Kernel-vs-reference tolerance (relative L2 and max error relative to the
# reference's largest value) by input dtype. The kernels and the reference
# both accumulate in float32 from the same (exactly representable) inputs:
# measured differences are ~1e-7..2e-6; a wrong tap, tile or index is O(1).
TOLERANCE = {"float32": 2e-4, "float16": 5e-3, "bfloat16": 2e-2}
PROBE_SEED = 0x5EED


class Kernels(NamedTuple):
  """One kernel family's two calls, as `addernet_jax.ops` will make them.

  `input_grad_takes_window`: `input_grad` accepts `rows=(start, stop)` and
  `cols=(start, stop)` of the padded input (the rest is padding the caller
  crops) and may skip the rest.
  """
  name: str
  forward: Callable[..., jax.Array]
  input_grad: Callable[..., jax.Array]
  input_grad_takes_window: bool = False
  interpret: bool = False


# ------------------------------------------------------------- families --

_lock = threading.RLock()
_imported: dict[tuple[str, Any], tuple[Any, str | None]] = {}
_checked: dict[tuple, tuple[Any, str | None]] = {}
_logged: set[tuple] = set()


def reset() -> None:
  """Forgets every check, import attempt and logged line (for tests)."""
  with _lock:
    _imported.clear()
    _checked.clear()
    _logged.clear()


def load_family(name: str) -> tuple[Any, str | None]:
  """(module, None), or (None, why it cannot be imported). Any exception at
  import (an AttributeError from a moved Pallas API, say) counts."""
  entry = FAMILY_MODULES.get(name)
  if entry is None:
    return None, f"unknown kernel family {name!r} (known: {sorted(FAMILY_MODULES)})"
  if not isinstance(entry, str):
    return entry, None
  key = (name, entry)
  with _lock:
    if key not in _imported:
      try:
        _imported[key] = (importlib.import_module(f".{entry}", __package__),
                          None)
      except Exception as e:  # pylint: disable=broad-except
        _imported[key] = (None, f"import of kernels.{entry} failed: "
                          f"{_one_line(e)}")
    return _imported[key]


def make_kernels(name: str, module: Any, interpret: bool) -> Kernels:
  """The `Kernels` of family `name` implemented by `module`."""
  return Kernels(
      name=name,
      forward=functools.partial(module.forward, interpret=interpret),
      input_grad=functools.partial(module.input_grad, interpret=interpret),
      input_grad_takes_window=bool(getattr(module, "INPUT_GRAD_TAKES_WINDOW",
                                           False)),
      interpret=interpret)


def chain_for(platform: str) -> tuple[tuple[str, ...], bool]:
  """(family names to try in order, interpret) on `platform`."""
  if platform == "gpu":
    return _parse_chain("ADDERNET_GPU_KERNELS", "triton", GPU_CHAINS), False
  if platform == "tpu":
    return TPU_CHAIN, False
  if platform == "cpu":
    return _parse_chain("ADDERNET_CPU_KERNELS", "gpu", CPU_CHAINS), True
  return (), False


def _parse_chain(variable: str, default: str,
                 aliases: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
  value = os.environ.get(variable, default).strip().lower() or default
  chain: list[str] = []
  for token in filter(None, (t.strip() for t in value.split(","))):
    names = aliases.get(token, (token,) if token in FAMILY_MODULES else None)
    if names is None:
      _log_once(("env", variable, token), logging.WARNING,
                "kernels.dispatch: %s=%r: %r is not one of %s or a family %s; "
                "ignored", variable, value, token, sorted(aliases),
                sorted(FAMILY_MODULES))
      continue
    chain += [n for n in names if n not in chain]
  return tuple(chain)


# ------------------------------------------------------------- shapes --


def unsupported_reason(xp_shape: Sequence[int], w_shape: Sequence[int],
                       strides: Sequence[int]) -> str | None:
  """Why no kernel family takes these shapes, or None (each family may still
  refuse them: its own `unsupported_reason`)."""
  try:
    layout.check_shapes("dispatch", tuple(xp_shape), tuple(w_shape),
                        tuple(strides))
  except ValueError as e:
    return str(e)
  return None


def _manual_devices() -> int:
  """Devices of the enclosing `shard_map`'s manual mesh axes (1 outside
  one), from the abstract mesh JAX sets while tracing it."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
    manual = tuple(getattr(mesh, "manual_axes", ()))
    return math.prod(int(mesh.shape[a]) for a in manual) if manual else 1
  except Exception:  # pylint: disable=broad-except
    return 1


def _family_refuses(module: Any, xp_shape, w_shape, strides,
                    interpret: bool) -> str | None:
  if interpret and not getattr(module, "interpret_supported", lambda: True)():
    return f"no interpret mode on JAX {jax.__version__}"
  most = getattr(module, "INTERPRET_MAX_DEVICES", None)
  devices = _manual_devices() if interpret and most is not None else 1
  if most is not None and devices > most:
    return (f"its interpret mode runs inside a shard_map of at most {most} "
            f"device(s), this one has {devices} (the interpreter's "
            f"multi-device simulation waits at a barrier and hangs)")
  refuses = getattr(module, "unsupported_reason", None)
  if refuses is not None:
    try:
      return refuses(tuple(xp_shape), tuple(w_shape), tuple(strides))
    except Exception as e:  # pylint: disable=broad-except
      return f"unsupported_reason raised {_one_line(e)}"
  return None


# ---------------------------------------------------- check on first use --


def probe_enabled(interpret: bool = False, varying: bool = False) -> bool:
  """`ADDERNET_KERNEL_PROBE`: "0" off, "1" on; unset: on for kernels compiled
  for a device, off in interpret mode (the CPU, where the kernels run only as
  a test vehicle and the check would double their compile time) unless the
  operands vary along mesh axes (`varying`: inside `shard_map(check_vma=True)`,
  where Pallas' HLO interpreter fails; the check then falls back instead)."""
  value = os.environ.get("ADDERNET_KERNEL_PROBE", "")
  return value == "1" if value in ("0", "1") else (not interpret or varying)


def _probe_budget_bytes() -> int:
  """`ADDERNET_KERNEL_PROBE_MAX_MB` in bytes; "inf": no cap; unreadable or
  NaN: the default 1024."""
  try:
    return int(float(os.environ.get("ADDERNET_KERNEL_PROBE_MAX_MB", "1024"))
               * 2**20)
  except OverflowError:  # inf
    return sys.maxsize
  except ValueError:
    return 1024 * 2**20


def probe_batch(xp_shape, w_shape, strides, dtype) -> int:
  """Images the check runs: the call's batch, or fewer to fit the budget.

  Per image: the inputs (xp, g) in `dtype`, and in float32 the kernel's
  and the reference's outputs (y and dxp each), about what is live at once.
  """
  n = int(xp_shape[0])
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  xp_px = math.prod(xp_shape[1:])
  y_px = ho * wo * w_shape[3]
  per_image = (jnp.dtype(dtype).itemsize * (xp_px + y_px)
               + 4 * 2 * (xp_px + y_px))
  fixed = 3 * 4 * math.prod(w_shape)
  return max(1, min(n, (_probe_budget_bytes() - fixed) // max(per_image, 1)))


def _one_line(e: BaseException) -> str:
  """The exception in one line: its first line, and its last where they
  differ (a runtime error's text often ends with the cause's traceback)."""
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = lines[0][:300] if lines else ""
  if len(lines) > 1:
    text += f" ... {lines[-1][:300]}"
  return f"{type(e).__name__}: {text}"


def _uniform(seed: jax.Array, shape, dtype, salt: int) -> jax.Array:
  """Counter-based hash noise, uniform with unit variance in [-sqrt(3),
  sqrt(3)): cheap to compile (threefry normals took 25 s on a busy CPU) and
  never constant. Every element differs from its neighbours."""
  x = lax.iota(jnp.uint32, math.prod(shape))
  x = x + (seed.astype(jnp.uint32) * jnp.uint32(0x9E3779B9)
           + jnp.uint32((salt * 0x85EBCA6B) & 0xFFFFFFFF))
  for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B), (16, None)):
    x = x ^ (x >> shift)
    if mult is not None:
      x = x * jnp.uint32(mult)
  u = (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
  return ((u - 0.5) * jnp.float32(2 * math.sqrt(3.0))).reshape(shape).astype(
      dtype)


def _rel_errors(got, want) -> list[jax.Array]:
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  diff = got - want
  scale_l2 = jnp.maximum(jnp.linalg.norm(want), 1e-30)
  scale_max = jnp.maximum(jnp.max(jnp.abs(want)), 1e-30)
  return [jnp.linalg.norm(diff) / scale_l2,
          jnp.max(jnp.abs(diff)) / scale_max]


@functools.lru_cache(maxsize=64)
def _programs(xp_shape, w_shape, strides, dtype_name, rows, cols, reference):
  """The compiled data and comparison programs of one call signature (shared
  by every family checked on it)."""
  dtype = jnp.dtype(dtype_name)
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  g_shape = (xp_shape[0], ho, wo, w_shape[3])
  crop = (slice(None), slice(*(rows or (None, None))),
          slice(*(cols or (None, None))), slice(None))

  def data(seed):
    return (_uniform(seed, xp_shape, dtype, 1), _uniform(seed, w_shape, dtype, 2),
            _uniform(seed, g_shape, dtype, 3))

  def compare(xp, w, g, y, dxp):
    dx = dxp[crop]
    out = [jnp.all(jnp.isfinite(y)), jnp.all(jnp.isfinite(dx))]
    if reference is not None:
      out += _rel_errors(y, reference[0](xp, w, strides))
      out += _rel_errors(dx, reference[1](xp, w, g, strides)[crop])
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in out])

  spec = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt)
  data_c = jax.jit(data).trace(spec((), jnp.int32)).lower().compile()
  compare_c = jax.jit(compare).trace(
      spec(xp_shape, dtype), spec(w_shape, dtype), spec(g_shape, dtype),
      spec(g_shape, jnp.float32), spec(xp_shape, jnp.float32)).lower().compile()
  return data_c, compare_c


def _normal_varying(varying: Varying) -> Varying:
  return tuple(tuple(sorted(map(str, axes))) for axes in varying)  # type: ignore[return-value]


def _in_shard_map(run: Callable, varying: Varying) -> Callable:
  """`run(xp, w, g)` inside a `shard_map(check_vma=True)` over a one-device
  mesh whose axes make xp vary along `varying[0]`, w along `varying[1]` and
  g (the forward's output gradient) along both; `run` itself without axes."""
  x_axes, w_axes = _normal_varying(varying)
  both = tuple(sorted(set(x_axes) | set(w_axes)))
  if not both:
    return run
  mesh = jax.sharding.Mesh(
      np.array(jax.devices()[:1]).reshape((1,) * len(both)), both,
      axis_types=(jax.sharding.AxisType.Auto,) * len(both))
  spec = lambda axes: jax.sharding.PartitionSpec(axes or None)
  return jax.shard_map(run, mesh=mesh,
                       in_specs=(spec(x_axes), spec(w_axes), spec(both)),
                       out_specs=(spec(both), spec(both)), check_vma=True)


def check_kernels(kernels: Kernels, xp_shape: Sequence[int],
                  w_shape: Sequence[int], strides: Sequence[int],
                  dtype: Any, *, rows: tuple[int, int] | None = None,
                  cols: tuple[int, int] | None = None,
                  reference: tuple[Callable, Callable] | None = None,
                  varying: Varying = ((), ())) -> str | None:
  """Why `kernels` must not be used for this call, or None (not cached).

  Builds ahead of time the forward and the input gradient exactly as `ops`
  calls them (xp, w and g in `dtype`, passed as arguments; the (rows, cols)
  window where the family takes one), runs them on random data of the
  call's shapes (`probe_batch` images), and compares them with `reference =
  (forward, input_grad)` (XLA) inside the window. Without a reference only
  building, running and finite outputs are checked.

  The check runs in a thread of its own: JAX keeps its trace state (the
  caller's `jit`, the axis names of an enclosing `shard_map`) per thread,
  and none of it may leak into the check's own programs. `varying` = the
  mesh axes along which xp and w vary in the caller (inside
  `shard_map(check_vma=True)`): the kernels then run inside a `shard_map`
  over a one-device mesh with those axes and the same varying operands, as
  the caller will run them.
  """
  outcome: list[str | None] = []

  def work():
    try:
      outcome.append(_check_kernels(kernels, xp_shape, w_shape, strides,
                                    dtype, rows, cols, reference, varying))
    except BaseException as e:  # pylint: disable=broad-except
      outcome.append(f"could not be checked: {_one_line(e)}")

  worker = threading.Thread(target=work, name="addernet-kernel-check",
                            daemon=True)
  worker.start()
  worker.join()
  return outcome[0] if outcome else "could not be checked (no result)"


def _check_kernels(kernels, xp_shape, w_shape, strides, dtype, rows, cols,
                   reference, varying) -> str | None:
  xp_shape, w_shape = tuple(map(int, xp_shape)), tuple(map(int, w_shape))
  strides = tuple(map(int, strides))
  dtype = jnp.dtype(dtype)
  rows = None if rows is None else tuple(map(int, rows))
  cols = None if cols is None else tuple(map(int, cols))
  xp_shape = (probe_batch(xp_shape, w_shape, strides, dtype), *xp_shape[1:])
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  g_shape = (xp_shape[0], ho, wo, w_shape[3])
  window = {}
  if kernels.input_grad_takes_window:
    window = {k: v for k, v in (("rows", rows), ("cols", cols))
              if v is not None}

  def run(xp, w, g):  # float32 here: no eager op may run outside a program
    return (kernels.forward(xp, w, strides).astype(jnp.float32),
            kernels.input_grad(xp, w, g, strides, **window).astype(
                jnp.float32))
  run = _in_shard_map(run, varying)

  try:
    data_c, compare_c = _programs(xp_shape, w_shape, strides, dtype.name,
                                  rows, cols, reference)
    xp, w, g = data_c(np.int32(PROBE_SEED))
  except Exception as e:  # pylint: disable=broad-except
    return f"could not be checked (the check's own programs failed): {_one_line(e)}"
  try:
    compiled = jax.jit(run).trace(xp, w, g).lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    return f"does not build: {_one_line(e)}"
  try:
    y, dxp = compiled(xp, w, g)
    jax.block_until_ready((y, dxp))
  except Exception as e:  # pylint: disable=broad-except
    return f"fails at run time: {_one_line(e)}"
  if tuple(y.shape) != g_shape or tuple(dxp.shape) != xp_shape:
    return (f"returns shapes {tuple(y.shape)} and {tuple(dxp.shape)}, "
            f"expected {g_shape} and {xp_shape}")
  try:
    stats = np.asarray(compare_c(xp, w, g, y, dxp))
  except Exception as e:  # pylint: disable=broad-except
    return f"could not be compared with XLA: {_one_line(e)}"
  del xp, w, g, y, dxp
  if not stats[0] or not stats[1]:
    which = " and ".join(n for n, ok in (("forward", stats[0]),
                                         ("input gradient", stats[1]))
                         if not ok)
    return f"computes non-finite values ({which}) on finite random data"
  if reference is not None:
    tol = TOLERANCE.get(dtype.name, TOLERANCE["float32"])
    errors = stats[2:]
    if not np.all(errors <= tol):
      return (f"computes wrong numbers: relative error against XLA forward "
              f"{errors[0]:.1e} (L2) / {errors[1]:.1e} (max), input gradient "
              f"{errors[2]:.1e} / {errors[3]:.1e} (tolerance {tol:g} for "
              f"{dtype.name})")
  return None


def kernel_failure(name: str, module: Any, xp_shape, w_shape, strides, dtype,
                   *, rows=None, cols=None, interpret: bool = False,
                   reference: tuple[Callable, Callable] | None = None,
                   varying: Varying = ((), ())) -> str | None:
  """`check_kernels` of family `name` (implemented by `module`), once per
  process and distinct call; None when `ADDERNET_KERNEL_PROBE=0`."""
  varying = _normal_varying(varying)
  if not probe_enabled(interpret, any(varying)):
    return None
  key = (name, id(module), tuple(map(int, xp_shape)), tuple(map(int, w_shape)),
         tuple(map(int, strides)), jnp.dtype(dtype).name,
         None if rows is None else tuple(rows),
         None if cols is None else tuple(cols), interpret, reference, varying)
  with _lock:
    if key not in _checked:  # the module is kept so that its id stays unique
      _checked[key] = (module, check_kernels(
          make_kernels(name, module, interpret), xp_shape, w_shape, strides,
          dtype, rows=rows, cols=cols, reference=reference, varying=varying))
    return _checked[key][1]


def _log_once(key, level, message, *args) -> None:
  with _lock:
    if key in _logged:
      return
    _logged.add(key)
  log.log(level, message, *args)


def backend_for(xp_shape: Sequence[int], w_shape: Sequence[int],
                strides: Sequence[int], dtype: Any = jnp.float32, *,
                rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None,
                reference: tuple[Callable, Callable] | None = None,
                varying: Varying = ((), ())) -> Kernels | None:
  """The first family of this platform's chain that takes, builds, runs and
  matches `reference` for this exact call; None (XLA) when none does.

  Args:
    xp_shape, w_shape, strides: the padded input NHWC, filters HWIO, strides.
    dtype: the dtype of xp, w and the output gradient.
    rows, cols: the padded-input window whose gradient the caller keeps.
    reference: `(forward, input_grad)` of the XLA implementation the
      kernels are checked against (`addernet_jax.reference`'s, from ops).
    varying: the `shard_map` mesh axes along which xp and w vary in the
      caller (`check_vma=True`; empty elsewhere): the check runs the kernels
      with operands varying alike.
  """
  platform = jax.default_backend()
  xp_shape, w_shape = tuple(map(int, xp_shape)), tuple(map(int, w_shape))
  strides = tuple(int(s) for s in strides)
  reason = unsupported_reason(xp_shape, w_shape, strides)
  if reason is not None:
    _log_once(("shape", xp_shape, w_shape, strides), logging.INFO,
              "kernels.dispatch: no kernel for xp %s, w %s, strides %s: %s",
              xp_shape, w_shape, strides, reason)
    return None
  chain, interpret = chain_for(platform)
  dtype_name = jnp.dtype(dtype).name
  for position, name in enumerate(chain):
    then = (chain[position + 1] if position + 1 < len(chain)
            else "the XLA implementation")
    module, why = load_family(name)
    level = logging.WARNING
    if module is not None:
      why = _family_refuses(module, xp_shape, w_shape, strides, interpret)
      level = logging.INFO  # a family that does not take a shape: expected
      if why is None:
        why = kernel_failure(name, module, xp_shape, w_shape, strides,
                             dtype_name, rows=rows, cols=cols,
                             interpret=interpret, reference=reference,
                             varying=varying)
        level = logging.WARNING
    if why is None:
      return make_kernels(name, module, interpret)
    _log_once((name, xp_shape, w_shape, strides, dtype_name, rows, cols),
              level, "kernels.dispatch: %s kernels %s for xp %s, w %s, "
              "strides %s, %s, window rows %s cols %s: %s; using %s.",
              name, "not used" if level == logging.INFO else "rejected",
              xp_shape, w_shape, strides, dtype_name, rows, cols, why, then)
  return None


def mac_count(xp_shape: Sequence[int], w_shape: Sequence[int],
              strides: Sequence[int]) -> int:
  """Adder multiply-accumulates of one forward pass (n*ho*wo*kh*kw*cin*cout)."""
  ho, wo = layout.output_hw(xp_shape, w_shape, strides)
  return xp_shape[0] * ho * wo * math.prod(w_shape)
