"""The adder convolution: a `jax.custom_vjp` with the official AdderNet backward.

Forward:  y[n,p,q,o] = -sum_{i,j,c} |xp[n, p*s+i, q*s+j, c] - w[i,j,c,o]|
Backward: dw = sum (xp - w) g  (full-precision gradient, returned raw)
          dx = sum clip(w - xp, -1, 1) g  (HardTanh-clipped), padding cropped.

`implementation` selects who computes the forward and the input gradient:
"xla" (pure jnp, `addernet_jax.reference`) or "pallas" (`kernels/`); None
picks Pallas on GPU/TPU and XLA elsewhere. Pallas kernels are used only after
`kernels.dispatch` has built, run and compared them with XLA on the exact
call (once per process and call signature; failures fall back along Mosaic
GPU -> Triton -> XLA with one log line); `record_backends` says what ran.
The filter gradient always uses the convolution weight-gradient identity
(see `reference.filter_grad`).

`gradient="exact"` keeps the forward (same backend, same values) and replaces
the backward by the true derivative of the forward (`_adder_padded_exact`):
dx = sum sign(w - xp) g, dw = sum sign(xp - w) g, with sign(0) = 0. It exists
to measure gradient masking (adversarial attacks, `addernet_jax.attacks`),
not for training.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple, Union

import jax
import numpy as np
import jax.numpy as jnp
from jax import lax

from addernet_jax import reference

Padding = Union[str, Sequence[tuple[int, int]]]
IMPLEMENTATIONS = ("xla", "pallas")
_SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

log = logging.getLogger(__name__)


class Backend(NamedTuple):
  """The two L1-specific computations an implementation provides.

  `input_grad_takes_window`: its input_grad accepts `rows=(start, stop)` and
  `cols=(start, stop)`, the padded-input window whose gradient is needed (the
  rest is padding the caller crops), and may skip the rest.
  `name`: what runs: "xla", or the Pallas kernel family that dispatch chose
  and checked ("triton", "mosaic_gpu", "triton_simt", "tpu_batch", "tpu";
  see `kernels.dispatch`).
  """
  forward: Callable[[jax.Array, jax.Array, tuple[int, int]], jax.Array]
  input_grad: Callable[..., jax.Array]
  input_grad_takes_window: bool = False
  name: str = "xla"


XLA_BACKEND = Backend(reference.forward, reference.input_grad, False, "xla")
_REFERENCE = (reference.forward, reference.input_grad)

Window = tuple[tuple[int, int], tuple[int, int]]


@functools.lru_cache(maxsize=None)
def _kernel_dispatch():
  """`addernet_jax.kernels.dispatch`, or None (logged once) where it cannot
  be imported: any exception, e.g. an AttributeError from a Pallas API that
  moved in the installed JAX, not only an ImportError."""
  try:
    from addernet_jax.kernels import dispatch  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    log.warning("adder_conv: the Pallas kernels cannot be imported (%s: %s); "
                "using the XLA implementation.", type(e).__name__, e)
    return None
  return dispatch


def _pallas_backend(xp_shape, w_shape, strides, dtype,
                    window: Window | None = None,
                    varying: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
                    ) -> Backend | None:
  """The checked Pallas backend for this call, or None (use XLA).
  `varying`: the shard_map mesh axes along which xp and w vary."""
  dispatch = _kernel_dispatch()
  if dispatch is None:
    return None
  rows, cols = window if window is not None else (None, None)
  kernels = dispatch.backend_for(xp_shape, w_shape, strides, dtype, rows=rows,
                                 cols=cols, reference=_REFERENCE,
                                 varying=varying)
  if kernels is None:
    return None
  return Backend(kernels.forward, kernels.input_grad,
                 kernels.input_grad_takes_window, kernels.name)


_warned: set[tuple[Any, ...]] = set()
_recorders: list[list[dict[str, Any]]] = []


@contextlib.contextmanager
def record_backends():
  """Records which implementation each adder layer traced inside the block
  runs: yields a list that receives one dict per forward and per input
  gradient traced (`kind`, `implementation`: "xla" or the kernel family,
  `requested`, shapes, strides, dtype). Benchmarks label their rows with it.
  """
  record: list[dict[str, Any]] = []
  _recorders.append(record)
  try:
    yield record
  finally:
    _recorders.remove(record)


def _select_backend(implementation: str | None, xp: jax.Array, w: jax.Array,
                    strides, window: Window | None = None,
                    kind: str = "forward") -> Backend:
  xp_shape, w_shape, dtype = xp.shape, w.shape, xp.dtype
  backend = XLA_BACKEND
  if implementation == "pallas" or (implementation is None and
                                    jax.default_backend() in ("gpu", "tpu")):
    varying = tuple(tuple(sorted(_varying_axes(a))) for a in (xp, w))
    backend = _pallas_backend(xp_shape, w_shape, strides, dtype, window,
                              varying)
    if backend is None:
      key = (implementation, tuple(xp_shape), tuple(w_shape), tuple(strides))
      if key not in _warned:
        _warned.add(key)
        log.warning("adder_conv: no Pallas kernel for input %s, filters %s, "
                    "strides %s; using the XLA implementation (why: the "
                    "addernet_jax.kernels.dispatch log, INFO level where a "
                    "kernel family does not take these shapes).",
                    tuple(xp_shape), tuple(w_shape), tuple(strides))
      backend = XLA_BACKEND
  for record in _recorders:
    record.append({"kind": kind, "implementation": backend.name,
                   "requested": implementation or "default",
                   "xp_shape": tuple(int(d) for d in xp_shape),
                   "w_shape": tuple(int(d) for d in w_shape),
                   "strides": tuple(strides), "dtype": jnp.dtype(dtype).name})
  return backend


def check_options(implementation: str | None, gradient: str = "official",
                  owner: str = "adder_conv") -> None:
  """ValueError naming `owner` unless both are values `adder_conv` takes
  (layers call it when built, not only when first applied)."""
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(f"{owner}: implementation must be None, 'xla' or "
                     f"'pallas', got {implementation!r}")
  if gradient not in GRADIENTS:
    raise ValueError(f"{owner}: gradient must be 'official' or 'exact', "
                     f"got {gradient!r}")


def as_int(value: Any) -> int | None:
  """`value` as an int if it is an integer (Python, NumPy or a concrete 0-d
  integer array; not a bool, not a float such as 1.5), else None."""
  if isinstance(value, (bool, np.bool_)):
    return None
  try:
    return operator.index(value)
  except TypeError:
    return None


def positive_int_pair(value: Any, name: str, owner: str = "adder_conv"
                      ) -> tuple[int, int]:
  """`value`, an int or a pair of ints (NumPy ints included), as a pair of
  positive ints; else a ValueError naming `owner`, `name` and the value."""
  single = as_int(value)
  if single is not None:
    value = (single, single)
  try:
    pair = tuple(as_int(v) for v in value)
  except TypeError:
    pair = ()
  if len(pair) != 2 or not all(v is not None and v >= 1 for v in pair):
    raise ValueError(f"{owner}: {name} must be a positive int or a pair of "
                     f"positive ints, got {value!r}")
  return pair  # type: ignore[return-value]


def _explicit_padding(padding: Padding, in_hw, kernel_hw,
                      strides) -> tuple[tuple[int, int], tuple[int, int]]:
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "VALID":
      return ((0, 0), (0, 0))
    if mode == "SAME":
      return tuple(lax.padtype_to_pads(in_hw, kernel_hw, strides, "SAME"))  # type: ignore[return-value]
    raise ValueError(f"adder_conv: padding must be 'SAME', 'VALID' or "
                     f"((top, bottom), (left, right)), got {padding!r}")
  try:
    pads = tuple((as_int(lo), as_int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    pads = ()
  if len(pads) != 2 or any(p is None or p < 0 for pair in pads for p in pair):
    raise ValueError(f"adder_conv: padding must be 'SAME', 'VALID' or "
                     f"((top, bottom), (left, right)) of non-negative ints, "
                     f"got {padding!r}")
  return pads  # type: ignore[return-value]


def _check_inputs(x, w) -> None:
  for name, arr, rank, layout in (("x", x, 4, "NHWC"), ("w", w, 4, "HWIO")):
    if not hasattr(arr, "shape") or not hasattr(arr, "dtype"):
      raise TypeError(f"adder_conv: {name} must be an array, got "
                      f"{type(arr).__name__}")
    if arr.ndim != rank:
      raise ValueError(f"adder_conv: {name} must have rank {rank} ({layout}), "
                       f"got shape {tuple(arr.shape)}")
    # As JAX takes it: NumPy float64 is float32 unless jax_enable_x64.
    dtype = jax.dtypes.canonicalize_dtype(arr.dtype)
    if not any(dtype == d for d in _SUPPORTED_DTYPES):
      raise TypeError(f"adder_conv: {name} must be float32, bfloat16 or "
                      f"float16, got {dtype}")
  if x.shape[3] != w.shape[2]:
    hints = []
    # Only where the transposed array would fit (a guess, so worded as one).
    if x.shape[1] == w.shape[2]:
      hints.append("if x is NCHW, transpose it to NHWC with "
                   "x.transpose(0, 2, 3, 1)")
    if w.shape[1] == x.shape[3] and w.shape[2] == w.shape[3]:
      hints.append("if w is OIHW (PyTorch), transpose it to HWIO with "
                   "w.transpose(2, 3, 1, 0)")
    hint = f" ({'; '.join(hints)})" if hints else ""
    raise ValueError(f"adder_conv: input channels do not match: x {tuple(x.shape)} "
                     f"(NHWC) has {x.shape[3]}, w {tuple(w.shape)} (HWIO) expects "
                     f"{w.shape[2]}{hint}")
  if 0 in w.shape[:3]:
    raise ValueError(f"adder_conv: filters must have a non-empty window and "
                     f"at least one input channel, got w {tuple(w.shape)} "
                     f"(HWIO)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adder_padded(xp: jax.Array, w: jax.Array, strides: tuple[int, int],
                  implementation: str | None,
                  window: tuple[tuple[int, int], tuple[int, int]]
                  ) -> jax.Array:
  """The adder layer on the padded input; `window` = the (rows, cols) of xp
  that are not padding (the input gradient is needed there only; dispatch
  checks the kernels on exactly that call)."""
  backend = _select_backend(implementation, xp, w, strides, window,
                            "forward")
  return backend.forward(xp, w, strides).astype(jnp.result_type(xp, w))


def _adder_padded_fwd(xp, w, strides, implementation, window):
  return _adder_padded(xp, w, strides, implementation, window), (xp, w)


def _varying_axes(x) -> frozenset:
  """The shard_map mesh axes along which `x` varies (empty outside one)."""
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.10
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(aval, "vma", frozenset()))  # older JAX


def _match_varying_axes(cotangent, primal):
  """Sum a cotangent over the mesh axes along which its primal is replicated.

  Inside `jax.shard_map` with `check_vma=True`, the cotangent of a replicated
  input (e.g. filters, while the batch is sharded) must be replicated too: as
  JAX's own autodiff does, sum the per-shard contributions.
  """
  extra = _varying_axes(cotangent) - _varying_axes(primal)
  return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _kernel_input_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
                       strides: tuple[int, int], backend: Backend,
                       window: Window) -> jax.Array:
  """A Pallas backend's input gradient. Pallas kernels have no derivative of
  their own, so a second derivative (grad of grad) of `adder_conv` takes the
  reference's: the derivative of the same official backward."""
  if backend.input_grad_takes_window:
    return backend.input_grad(xp, w, g, strides, rows=window[0],
                              cols=window[1])
  return backend.input_grad(xp, w, g, strides)


def _kernel_input_grad_fwd(xp, w, g, strides, backend, window):
  return _kernel_input_grad(xp, w, g, strides, backend, window), (xp, w, g)


def _kernel_input_grad_bwd(strides, backend, window, residuals, cotangent):
  del backend, window  # outside the window the cotangent is zero
  xp, w, g = residuals
  out, vjp = jax.vjp(lambda a, b, c: reference.input_grad(a, b, c, strides),
                     xp, w, g)
  return vjp(cotangent.astype(out.dtype))


_kernel_input_grad.defvjp(_kernel_input_grad_fwd, _kernel_input_grad_bwd)


def _adder_padded_bwd(strides, implementation, window, residuals, g):
  xp, w = residuals
  backend = _select_backend(implementation, xp, w, strides, window,
                            "input_grad")
  if backend is XLA_BACKEND:
    dxp = backend.input_grad(xp, w, g, strides)
  else:
    dxp = _kernel_input_grad(xp, w, g, strides, backend, window)
  dw = reference.filter_grad(xp, w, g, strides)
  return (_match_varying_axes(dxp.astype(xp.dtype), xp),
          _match_varying_axes(dw.astype(w.dtype), w))


_adder_padded.defvjp(_adder_padded_fwd, _adder_padded_bwd)


# ------------------------------------------------------- exact gradient --
# `adder_conv(..., gradient="exact")`: the forward of `_adder_padded`, the
# backward the true derivative of the forward, d|d|/dd = sign(d) with
# sign(0) = 0 (a tie x == w contributes nothing; jnp.abs's own derivative
# would say 1). Pure jnp on every platform, in the per-tap form of
# `reference`: one (tap, channel block) step of a `lax.scan` at a time, no
# tensor of size (output x taps x channels). The filter gradient is a
# separate scan, so XLA drops it when only the input gradient is used.

GRADIENTS = ("official", "exact")


def _exact_input_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
                      strides: tuple[int, int]) -> jax.Array:
  """dxp[n, p*s+i, q*s+j, c] += sum_o sign(w[i,j,c,o] - xp[...]) g[n,p,q,o]
  (float32, the shape of the padded input `xp`)."""
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  n, _, _, _ = xp.shape
  _, ho, wo, _ = g.shape
  nb = -(-cout // reference.TERMS_PER_STEP)
  ob = -(-cout // nb)
  # Zero output-gradient channels contribute sign(.) * 0 = 0.
  extra = ((0, 0), (0, 0), (0, 0), (0, nb * ob - cout))
  w = jnp.pad(w.astype(jnp.float32), extra)
  g = jnp.pad(g.astype(jnp.float32), extra)
  xp = xp.astype(jnp.float32)
  span = (sh * (ho - 1) + 1, sw * (wo - 1) + 1)

  def step(dxp, k):
    tap, o0 = k // nb, (k % nb) * ob
    i, j = tap // kw, tap % kw
    window = lax.dynamic_slice(xp, (0, i, j, 0), (n, *span, cin))
    view = window[:, ::sh, ::sw] if (sh, sw) != (1, 1) else window
    ws = lax.dynamic_slice(w, (i, j, 0, o0), (1, 1, cin, ob))[0, 0]
    gs = lax.dynamic_slice(g, (0, 0, 0, o0), (n, ho, wo, ob))
    contrib = jnp.sign(ws[:, 0] - view) * gs[..., 0:1]
    for o in range(1, ob):
      contrib = contrib + jnp.sign(ws[:, o] - view) * gs[..., o:o + 1]
    if (sh, sw) != (1, 1):  # back onto the strided window
      contrib = lax.pad(contrib, jnp.float32(0), ((0, 0, 0), (0, 0, sh - 1),
                                                  (0, 0, sw - 1), (0, 0, 0)))
    acc = lax.dynamic_slice(dxp, (0, i, j, 0), (n, *span, cin))
    return lax.dynamic_update_slice(dxp, acc + contrib, (0, i, j, 0)), None

  dxp, _ = lax.scan(step, jnp.zeros_like(xp), jnp.arange(kh * kw * nb))
  return dxp


def _exact_filter_grad(xp: jax.Array, w: jax.Array, g: jax.Array,
                       strides: tuple[int, int]) -> jax.Array:
  """dw[i,j,c,o] = sum_{n,p,q} sign(xp[n, p*s+i, q*s+j, c] - w[i,j,c,o])
  g[n,p,q,o] (float32)."""
  kh, kw, cin, cout = w.shape
  sh, sw = strides
  n = xp.shape[0]
  _, ho, wo, _ = g.shape
  nb = -(-cin // reference.TERMS_PER_STEP)
  cb = -(-cin // nb)
  xp = jnp.pad(xp.astype(jnp.float32),
               ((0, 0), (0, 0), (0, 0), (0, nb * cb - cin)))
  w = jnp.pad(w.astype(jnp.float32), ((0, 0), (0, 0), (0, nb * cb - cin),
                                      (0, 0)))
  g = g.astype(jnp.float32)

  def step(carry, k):
    tap, c0 = k // nb, (k % nb) * cb
    i, j = tap // kw, tap % kw
    window = lax.dynamic_slice(
        xp, (0, i, j, c0), (n, sh * (ho - 1) + 1, sw * (wo - 1) + 1, cb))
    view = window[:, ::sh, ::sw] if (sh, sw) != (1, 1) else window
    ws = lax.dynamic_slice(w, (i, j, c0, 0), (1, 1, cb, cout))[0, 0]
    rows = [jnp.sum(jnp.sign(view[..., c:c + 1] - ws[c]) * g, axis=(0, 1, 2))
            for c in range(cb)]
    return carry, jnp.stack(rows)

  _, dw = lax.scan(step, None, jnp.arange(kh * kw * nb))
  return dw.reshape(kh, kw, nb * cb, cout)[:, :, :cin]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _adder_padded_exact(xp: jax.Array, w: jax.Array, strides: tuple[int, int],
                        implementation: str | None,
                        window: tuple[tuple[int, int], tuple[int, int]]
                        ) -> jax.Array:
  """`_adder_padded` (same forward) with the true derivative as backward."""
  return _adder_padded(xp, w, strides, implementation, window)


def _adder_padded_exact_fwd(xp, w, strides, implementation, window):
  return (_adder_padded(xp, w, strides, implementation, window), (xp, w))


def _adder_padded_exact_bwd(strides, implementation, window, residuals, g):
  del implementation, window
  xp, w = residuals
  dxp = _exact_input_grad(xp, w, g, strides)
  dw = _exact_filter_grad(xp, w, g, strides)
  return (_match_varying_axes(dxp.astype(xp.dtype), xp),
          _match_varying_axes(dw.astype(w.dtype), w))


_adder_padded_exact.defvjp(_adder_padded_exact_fwd, _adder_padded_exact_bwd)


def adder_conv(x: jax.Array, w: jax.Array, *,
               strides: int | Sequence[int] = (1, 1),
               padding: Padding = "SAME",
               implementation: str | None = None,
               gradient: str = "official") -> jax.Array:
  """Adder convolution of `x` (NHWC) with filters `w` (HWIO) -> NHWC.

  Args:
    x: input `[n, h, w, cin]`, float32, bfloat16 or float16.
    w: filters `[kh, kw, cin, cout]`.
    strides: an int or `(sh, sw)`.
    padding: "SAME", "VALID" or `((top, bottom), (left, right))`. Padded taps
      are real zeros and contribute `-|w|`, as in the official release.
    implementation: None (best for the backend), "xla" or "pallas".
    gradient: "official": the AdderNet backward (HardTanh-clipped input
      gradient, full-precision filter gradient); "exact": the true
      derivative of the forward, sign(w - x) and sign(x - w) with sign(0) = 0
      (for attacks and gradient-masking studies; the forward is the same).

  Returns:
    `[n, ho, wo, cout]` in the promoted input dtype, accumulated in float32.
    Differentiable with the AdderNet custom VJP (not the true derivative)
    unless `gradient="exact"`. Reverse mode only (`jax.jvp` raises JAX's
    custom_vjp error). Second derivatives (grad of grad) differentiate that
    backward: on the XLA path directly, with Pallas kernels through the
    reference's derivative of the same backward (kernels have none).
  """
  check_options(implementation, gradient)
  _check_inputs(x, w)
  strides = positive_int_pair(strides, "strides")
  pads = _explicit_padding(padding, x.shape[1:3], w.shape[:2], strides)
  padded_hw = (x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1]))
  if padded_hw[0] < w.shape[0] or padded_hw[1] < w.shape[1]:
    raise ValueError(f"adder_conv: filters {tuple(w.shape[:2])} are larger than "
                     f"the padded input {padded_hw} (x {tuple(x.shape)}, "
                     f"padding {pads})")
  dtype = jnp.result_type(x, w)
  window = ((pads[0][0], pads[0][0] + x.shape[1]),
            (pads[1][0], pads[1][0] + x.shape[2]))
  op = _adder_padded_exact if gradient == "exact" else _adder_padded

  def run(x: jax.Array, w: jax.Array) -> jax.Array:
    x, w = x.astype(dtype), w.astype(dtype)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0))) if any(
        p for pair in pads for p in pair) else x
    return op(xp, w, strides, implementation, window)

  explicit = _explicit_sharding(x, w)
  if explicit is None:
    return run(x, w)
  # Sharding in types (`jax.make_mesh`'s default Explicit axes): the
  # reshapes and slices of the per-tap backward have no sharding rule there,
  # so the layer runs with those axes Auto, as XLA partitions any jnp code,
  # and returns the batch sharded as x's, the channels as w's outputs.
  axes, out_sharding = explicit
  return jax.sharding.auto_axes(run, axes=axes, out_sharding=out_sharding)(
      x, w)


def explicit_layout(arr: Any) -> tuple[Any, tuple[Any, ...]] | None:
  """(mesh, spec padded to the rank) of an array whose type is sharded over
  Explicit mesh axes (`jax.make_mesh`'s default: sharding in types); None
  otherwise (no mesh, Auto or Manual axes only, a NumPy array)."""
  if not isinstance(arr, (jax.Array, jax.core.Tracer)):
    return None
  sharding = getattr(jax.typeof(arr), "sharding", None)
  spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
  explicit = _explicit_axes(mesh)
  if spec is None or not explicit:
    return None
  spec = tuple(spec) + (None,) * (np.ndim(arr) - len(spec))
  if not any(a in explicit for entry in spec for a in _axis_names(entry)):
    return None
  return mesh, spec


def _explicit_axes(mesh: Any) -> frozenset:
  """The names of `mesh`'s Explicit axes (none before JAX had axis types)."""
  explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit",
                     None)
  if explicit is None:
    return frozenset()
  return frozenset(name for name, kind in zip(
      getattr(mesh, "axis_names", ()), getattr(mesh, "axis_types", ()))
                   if kind == explicit)


def _axis_names(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _explicit_sharding(x: Any, w: Any
                       ) -> tuple[tuple[str, ...], Any] | None:
  """None, or (the Explicit mesh axes that shard `x` or `w`, the output's
  NamedSharding: batch as x's, channels as w's outputs)."""
  layouts = [explicit_layout(x), explicit_layout(w)]
  found = [layout for layout in layouts if layout is not None]
  if not found:
    return None
  mesh = found[0][0]
  explicit = _explicit_axes(mesh)
  specs = [layout[1] if layout is not None else (None,) * 4
           for layout in layouts]
  used = {a for spec in specs for entry in spec for a in _axis_names(entry)
          if a in explicit}
  batch, channels = specs[0][0], specs[1][3]
  if set(_axis_names(batch)) & set(_axis_names(channels)):
    channels = None  # one mesh axis cannot shard two dimensions
  out = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(batch, None, None, channels))
  return tuple(sorted(used)), out


def adder_conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
    padding: Padding, lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1,
    batch_group_count: int = 1, precision: Any = None,
    preferred_element_type: Any = None, out_sharding: Any = None, *,
    implementation: str | None = None, gradient: str = "official"
) -> jax.Array:
  """`adder_conv` behind the signature of `jax.lax.conv_general_dilated`.

  Pass it as `flax.linen.Conv(..., conv_general_dilated=...)` (or to
  `flax.nnx.Conv`) to turn that layer into an adder layer. Only 2-D windows,
  no dilation and no feature/batch groups are supported; anything else raises
  a ValueError. `precision` is ignored (accumulation is float32);
  `out_sharding` (passed by `flax.nnx.Conv`) constrains the result's sharding.
  """
  del precision
  for name, value in (("lhs_dilation", lhs_dilation),
                      ("rhs_dilation", rhs_dilation)):
    if value is not None and any(d != 1 for d in value):
      raise ValueError(f"adder_conv_general_dilated: {name}={tuple(value)} is "
                       f"not supported (adder layers have no dilation)")
  if feature_group_count != 1 or batch_group_count != 1:
    raise ValueError(f"adder_conv_general_dilated: grouped adder convolutions "
                     f"are not supported (feature_group_count="
                     f"{feature_group_count}, batch_group_count="
                     f"{batch_group_count})")
  if lhs.ndim != 4 or rhs.ndim != 4:
    raise ValueError(f"adder_conv_general_dilated: only 2-D convolutions are "
                     f"supported, got lhs of shape {tuple(lhs.shape)} and rhs "
                     f"of shape {tuple(rhs.shape)}")
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  cin, rhs_cin = lhs.shape[dn.lhs_spec[1]], rhs.shape[dn.rhs_spec[1]]
  if cin != rhs_cin:
    layout = (f"dimension_numbers={dimension_numbers!r}"
              if dimension_numbers is not None else
              "dimension_numbers=None, i.e. lax's default (NCHW, OIHW, NCHW); "
              "pass ('NHWC', 'HWIO', 'NHWC') for Flax's layout")
    raise ValueError(f"adder_conv_general_dilated: input channels do not "
                     f"match: lhs {tuple(lhs.shape)} has {cin}, rhs "
                     f"{tuple(rhs.shape)} expects {rhs_cin} ({layout})")
  x = jnp.transpose(lhs, dn.lhs_spec)            # -> N C H W
  x = jnp.transpose(x, (0, 2, 3, 1))             # -> N H W C
  w = jnp.transpose(rhs, dn.rhs_spec)            # -> O I H W
  w = jnp.transpose(w, (2, 3, 1, 0))             # -> H W I O
  y = adder_conv(x, w, strides=window_strides, padding=padding,
                 implementation=implementation,
                 gradient=gradient)  # N H W O
  y = jnp.transpose(y, (0, 3, 1, 2))             # -> N C H W
  y = jnp.transpose(y, tuple(int(i) for i in np.argsort(dn.out_spec)))
  if preferred_element_type is not None:
    y = y.astype(preferred_element_type)
  if out_sharding is not None:
    y = _constrain_sharding(y, out_sharding)
  return y


def _constrain_sharding(y: jax.Array, sharding: Any) -> jax.Array:
  """`y` with `sharding` (lax.conv's `out_sharding`): on Explicit mesh axes a
  `reshard` (sharding in types; `with_sharding_constraint` only asserts
  there), else a constraint for XLA's partitioner."""
  mesh = getattr(sharding, "mesh", None) or jax.sharding.get_abstract_mesh()
  if _explicit_axes(mesh):
    return jax.sharding.reshard(y, sharding)
  return jax.lax.with_sharding_constraint(y, sharding)
