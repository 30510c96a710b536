"""`kernels.dispatch`: every kernel is built, run and compared with XLA on the
exact call before use, and failures fall back Mosaic GPU -> Triton -> XLA.

Failures are injected on the CPU: kernel families (module stand-ins) that
raise at import, at build, at run time, return wrong shapes, non-finite or
wrong numbers, plus real Pallas kernels in interpret mode that fail to build
or miscompute. Correct stand-ins are small per-tap jnp functions (they
compile in a fraction of a second); the comparison is with
`addernet_jax.reference`, as in production.
"""

from __future__ import annotations

import functools
import logging
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from addernet_jax import ops
from addernet_jax.kernels import dispatch, gpu, layout

LOGGER = "addernet_jax.kernels.dispatch"
# One small call shared by most tests (so the comparison program compiles
# once): x [2, 5, 6, 3], 3x3 filters to 4 channels, SAME, stride 1.
X_SHAPE, W_SHAPE = (2, 5, 6, 3), (3, 3, 3, 4)
XP_SHAPE, WINDOW = (2, 7, 8, 3), ((1, 6), (1, 7))


def _naive_forward(xp, w, strides):
  kh, kw = w.shape[:2]
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  y = jnp.zeros((xp.shape[0], ho, wo, w.shape[3]), jnp.float32)
  for i in range(kh):
    for j in range(kw):
      v = xp[:, i:i + strides[0] * (ho - 1) + 1:strides[0],
             j:j + strides[1] * (wo - 1) + 1:strides[1]].astype(jnp.float32)
      y = y - jnp.abs(v[..., None] - w[i, j].astype(jnp.float32)).sum(-2)
  return y


def _naive_input_grad(xp, w, g, strides, bound=1.0):
  kh, kw = w.shape[:2]
  ho, wo = g.shape[1:3]
  dxp = jnp.zeros(xp.shape, jnp.float32)
  for i in range(kh):
    for j in range(kw):
      sl = (slice(None), slice(i, i + strides[0] * (ho - 1) + 1, strides[0]),
            slice(j, j + strides[1] * (wo - 1) + 1, strides[1]))
      clipped = jnp.clip(w[i, j].astype(jnp.float32)
                         - xp[sl].astype(jnp.float32)[..., None], -bound,
                         bound)
      dxp = dxp.at[sl].add((clipped * g.astype(jnp.float32)[..., None, :]
                            ).sum(-1))
  return dxp


def family(name="fake", forward=None, input_grad=None, takes_window=True,
           **attrs):
  """A kernel family: correct unless `forward` / `input_grad` replace a part.
  Records every call's (kind, shapes, dtypes, window) in `.calls`."""
  calls = []

  def fwd(xp, w, strides, interpret=False):
    calls.append(("forward", xp.shape, xp.dtype, w.dtype, interpret))
    return (forward or _naive_forward)(xp, w, strides)

  def dx(xp, w, g, strides, interpret=False, rows=None, cols=None):
    calls.append(("input_grad", xp.shape, g.dtype, rows, cols))
    out = (input_grad or _naive_input_grad)(xp, w, g, strides)
    if rows is not None:  # like the Triton kernel: zeros outside the window
      mask = jnp.zeros(xp.shape[:3], bool).at[:, rows[0]:rows[1],
                                               cols[0]:cols[1]].set(True)
      out = jnp.where(mask[..., None], out, 0.0)
    return out

  return types.SimpleNamespace(__name__=name, forward=fwd, input_grad=dx,
                               INPUT_GRAD_TAKES_WINDOW=takes_window,
                               calls=calls, **attrs)


def _raise(message):
  def fail(*args, **kwargs):
    raise NotImplementedError(message)
  return fail


def _fails_at_run_time(xp, w, strides):
  """Builds, then raises while the compiled program runs (as a launch error
  or an illegal address would)."""
  def crash(y):
    raise RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS (injected)")
  y = _naive_forward(xp, w, strides)
  return jax.pure_callback(crash, jax.ShapeDtypeStruct(y.shape, y.dtype), y)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
  dispatch.reset()
  ops._warned.clear()
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE", "1")
  monkeypatch.delenv("ADDERNET_GPU_KERNELS", raising=False)
  monkeypatch.delenv("ADDERNET_CPU_KERNELS", raising=False)
  yield
  dispatch.reset()


def _on_gpu(monkeypatch, chain="mosaic", **families):
  """Pretend to be on a GPU whose families are the given stand-ins."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", chain)
  for name, module in families.items():
    monkeypatch.setitem(dispatch.FAMILY_MODULES, name, module)


def _backend(dtype="float32"):
  """dispatch.backend_for on the shared call, as ops makes it."""
  return dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), dtype,
                              rows=WINDOW[0], cols=WINDOW[1],
                              reference=ops._REFERENCE)


def _check(module, dtype="float32", window=WINDOW):
  return dispatch.check_kernels(
      dispatch.make_kernels("fake", module, False), XP_SHAPE, W_SHAPE, (1, 1),
      dtype, rows=window[0], cols=window[1], reference=ops._REFERENCE)


def _wrong_edge(xp, w, strides):  # a ragged-edge tile computed wrongly
  return _naive_forward(xp, w, strides).at[:, -1, -1, :].add(3.0)


@pytest.mark.parametrize("module,expected", [
    (family(), None),
    (family(forward=_raise("Mosaic lowering: unsupported op (injected)")),
     r"^does not build: NotImplementedError: Mosaic lowering"),
    (family(forward=_fails_at_run_time),
     r"^fails at run time: .*ILLEGAL_ADDRESS \(injected\)"),
    (family(forward=_wrong_edge),
     r"^computes wrong numbers: relative error against XLA forward .* "
     r"\(tolerance 0.0002 for float32\)"),
    (family(input_grad=lambda *a: 1.01 * _naive_input_grad(*a)),
     r"^computes wrong numbers: .*input gradient 1\.0e-02"),
    (family(forward=lambda *a: _naive_forward(*a).at[0, 0, 0, 0].set(jnp.nan)),
     r"^computes non-finite values \(forward\)"),
    (family(forward=lambda xp, w, s: _naive_forward(xp, w, s)[:, :-1]),
     r"^returns shapes \(2, 4, 6, 4\) and \(2, 7, 8, 3\), expected"),
], ids=["correct", "build", "run", "wrong-forward", "wrong-dx", "nan",
        "shape"])
def test_check_catches_each_failure_kind(module, expected):
  reason = _check(module)
  if expected is None:
    assert reason is None
  else:
    assert reason is not None and re.search(expected, reason), reason


def test_check_uses_the_exact_call_dtype_and_window():
  """bfloat16 xp, w and g (as ops passes them), the (rows, cols) window of a
  family that takes one, all shapes exact; the bf16 tolerance applies."""
  module = family()
  assert _check(module, "bfloat16") is None
  assert ("forward", XP_SHAPE, jnp.bfloat16, jnp.bfloat16, False) in \
      module.calls
  assert ("input_grad", XP_SHAPE, jnp.bfloat16, (1, 6), (1, 7)) in \
      module.calls
  # Outside the window the kernel writes zeros: not compared, not an error.
  module = family(takes_window=False)
  assert _check(module) is None
  assert ("input_grad", XP_SHAPE, jnp.float32, None, None) in module.calls


def test_large_calls_are_checked_on_fewer_images(monkeypatch):
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE_MAX_MB", "1")
  n = dispatch.probe_batch((256, 34, 34, 16), (3, 3, 16, 16), (1, 1),
                           "float32")
  assert 1 <= n < 256
  per_image = (4 + 8) * (34 * 34 * 16 + 32 * 32 * 16)
  assert n * per_image <= 2**20
  monkeypatch.delenv("ADDERNET_KERNEL_PROBE_MAX_MB")
  assert dispatch.probe_batch((256, 34, 34, 16), (3, 3, 16, 16), (1, 1),
                              "float32") == 256
  # 4096 images (1.6 GiB) exceed the default 1024 MB; "inf" is no cap (it
  # raised OverflowError, which turned every kernel off), NaN the default.
  big = ((4096, 34, 34, 16), (3, 3, 16, 16), (1, 1), "float32")
  capped = dispatch.probe_batch(*big)
  assert 1 <= capped < 4096
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE_MAX_MB", "inf")
  assert dispatch.probe_batch(*big) == 4096
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE_MAX_MB", "nan")
  assert dispatch.probe_batch(*big) == capped


def test_fallback_chain_mosaic_then_triton_then_xla(monkeypatch, caplog):
  mosaic = family("mosaic", forward=_fails_at_run_time)
  triton = family("triton")
  _on_gpu(monkeypatch, mosaic_gpu=mosaic, triton=triton)
  with caplog.at_level(logging.INFO, logger=LOGGER):
    for _ in range(3):  # checked and logged once per call signature
      kernels = dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), "float32",
                                     rows=WINDOW[0], cols=WINDOW[1],
                                     reference=ops._REFERENCE)
      assert kernels.name == "triton" and not kernels.interpret
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, caplog.text
  text = warnings[0].getMessage()
  for part in ("mosaic_gpu kernels rejected", str(XP_SHAPE), str(W_SHAPE),
               "float32", "fails at run time", "ILLEGAL_ADDRESS",
               "using triton"):
    assert part in text, text
  assert sum(c[0] == "forward" for c in mosaic.calls) == 1
  # Triton wrong too: XLA, with its own line.
  dispatch.reset()
  monkeypatch.setitem(dispatch.FAMILY_MODULES, "triton",
                      family(forward=_wrong_edge))
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), "float32",
                                rows=WINDOW[0], cols=WINDOW[1],
                                reference=ops._REFERENCE) is None
  assert "triton kernels rejected" in caplog.text
  assert "computes wrong numbers" in caplog.text
  assert "using the XLA implementation" in caplog.text


def test_family_that_does_not_take_the_shapes_is_skipped(monkeypatch, caplog):
  mosaic = family("mosaic", unsupported_reason=lambda *a: "slab exceeds a "
                  "TMA box (injected)")
  _on_gpu(monkeypatch, mosaic_gpu=mosaic, triton=family())
  with caplog.at_level(logging.INFO, logger=LOGGER):
    kernels = _backend()
  assert kernels.name == "triton" and mosaic.calls == []
  assert "mosaic_gpu kernels not used" in caplog.text
  assert "TMA box (injected)" in caplog.text


def test_import_errors_of_any_kind_fall_back(monkeypatch, caplog):
  """An AttributeError at import (a Pallas API that moved) is a fallback,
  not an exception in the user's program, in dispatch and in ops."""
  def import_module(name, package=None):
    if name == ".mosaic_gpu":
      raise AttributeError("module 'plgpu' has no attribute 'load'")
    return __import__("importlib").import_module(name, package)
  monkeypatch.setattr(dispatch, "importlib",
                      types.SimpleNamespace(import_module=import_module))
  _on_gpu(monkeypatch, triton=family())
  monkeypatch.setitem(dispatch.FAMILY_MODULES, "mosaic_gpu", "mosaic_gpu")
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    kernels = _backend()
  assert kernels.name == "triton"
  assert "import of kernels.mosaic_gpu failed: AttributeError" in caplog.text
  # ops: dispatch itself failing to import.
  ops._kernel_dispatch.cache_clear()
  real_import = __import__

  def broken_import(name, *args, **kwargs):
    if name == "addernet_jax.kernels" or name.endswith("kernels.dispatch"):
      raise AttributeError("partially initialised module (injected)")
    return real_import(name, *args, **kwargs)
  monkeypatch.setattr("builtins.__import__", broken_import)
  try:
    with caplog.at_level(logging.WARNING, logger="addernet_jax.ops"):
      assert ops._pallas_backend(XP_SHAPE, W_SHAPE, (1, 1), "float32") is None
  finally:
    monkeypatch.undo()
    ops._kernel_dispatch.cache_clear()
  assert "cannot be imported (AttributeError" in caplog.text


def test_env_chain_and_probe_switch(monkeypatch, caplog):
  wrong = family(forward=_wrong_edge)
  _on_gpu(monkeypatch, "triton", triton=wrong)
  assert _backend() is None
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE", "0")  # unchecked: used as is
  assert _backend().name == "triton"
  # Interpret mode (CPU) is checked only when asked for, or where operands
  # vary along mesh axes (Pallas' HLO interpreter fails there).
  monkeypatch.delenv("ADDERNET_KERNEL_PROBE")
  assert dispatch.probe_enabled(interpret=False)
  assert not dispatch.probe_enabled(interpret=True)
  assert dispatch.probe_enabled(interpret=True, varying=True)
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE", "0")
  assert not dispatch.probe_enabled(interpret=True, varying=True)
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "mosaic_gpu, bogus")
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert dispatch.chain_for("gpu") == (("mosaic_gpu",), False)
  assert "'bogus' is not one of" in caplog.text
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "xla")
  assert dispatch.chain_for("gpu") == ((), False)
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "simt")
  assert dispatch.chain_for("gpu") == (("triton_simt", "triton"), False)
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "mosaic")
  assert dispatch.chain_for("cpu") == (("mosaic_gpu", "triton"), True)


def _loss_grads(x, w, implementation, dtype=jnp.float32):
  def loss(x, w):
    y = ops.adder_conv(x.astype(dtype), w.astype(dtype), padding="SAME",
                       implementation=implementation)
    return jnp.sum(jnp.sin(y.astype(jnp.float32) / 3.0))
  return jax.jit(jax.value_and_grad(loss, (0, 1)))(x, w)


def _data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32),
          jnp.asarray(rng.standard_normal(W_SHAPE), jnp.float32))


@functools.lru_cache(maxsize=None)
def _xla_loss_grads():
  return _loss_grads(*_data(), "xla")


def test_under_jit_a_rejected_chain_gives_the_xla_result(monkeypatch):
  """Mosaic GPU fails to build, Triton miscomputes its input gradient: the
  check runs eagerly while jit traces the step, and the step is XLA's."""
  _on_gpu(monkeypatch, mosaic_gpu=family(forward=_raise("no wgmma")),
          triton=family(input_grad=lambda *a: -_naive_input_grad(*a)))
  x, w = _data()
  with ops.record_backends() as record:
    val, grads = _loss_grads(x, w, "pallas")
  assert {(r["kind"], r["implementation"]) for r in record} == {
      ("forward", "xla"), ("input_grad", "xla")}
  want_val, want_grads = _xla_loss_grads()
  np.testing.assert_allclose(val, want_val, rtol=1e-6)
  for a, b in zip(grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_under_jit_a_passing_family_runs_and_is_recorded(monkeypatch):
  triton = family()
  _on_gpu(monkeypatch, "triton", triton=triton)
  x, w = _data()
  with ops.record_backends() as record:
    _, grads = _loss_grads(x, w, None, jnp.bfloat16)  # default on a "GPU"
  assert [(r["kind"], r["implementation"], r["dtype"]) for r in record] == [
      ("forward", "triton", "bfloat16"), ("input_grad", "triton", "bfloat16")]
  # The probe ran exactly the call the step makes: bf16 g, the VJP's window.
  probe_dx = [c for c in triton.calls if c[0] == "input_grad"]
  assert probe_dx[0] == ("input_grad", XP_SHAPE, jnp.bfloat16, (1, 6), (1, 7))
  assert all(c == probe_dx[0] for c in probe_dx)
  assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in grads)


@pytest.mark.parametrize("check_vma", [False, True])
def test_inside_shard_map_the_check_sees_local_shapes(monkeypatch, check_vma):
  """The per-device step of train.py: the check runs on the local batch while
  shard_map traces, and a rejected family falls back there too."""
  triton = family(forward=_wrong_edge)
  _on_gpu(monkeypatch, "triton", triton=triton)
  mesh = jax.make_mesh((1,), ("b",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x, w = _data()

  def loss(x, w):
    y = ops.adder_conv(x, w, padding="SAME", implementation="pallas")
    return jax.lax.pmean(jnp.sum(jnp.sin(y / 3.0)), "b")
  step = jax.jit(jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh,
                               in_specs=(P("b"), P()),
                               out_specs=(P("b"), P()), check_vma=check_vma))
  with ops.record_backends() as record:
    grads = step(x, w)
  assert {r["implementation"] for r in record} == {"xla"}
  assert triton.calls[0][1] == XP_SHAPE  # the local (here: whole) batch
  for a, b in zip(grads, _xla_loss_grads()[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _shard_map_grad(check_vma):
  """The gradient of a data-parallel loss over a one-device mesh "b"."""
  mesh = jax.make_mesh((1,), ("b",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def loss(x, w):
    y = ops.adder_conv(x, w, padding="SAME", implementation="pallas")
    return jax.lax.pmean(jnp.sum(jnp.sin(y / 3.0)), "b")
  return jax.jit(jax.shard_map(jax.grad(loss, (0, 1)), mesh=mesh,
                               in_specs=(P("b"), P()),
                               out_specs=(P("b"), P()), check_vma=check_vma))


@pytest.mark.parametrize("check_vma", [False, True])
def test_check_runs_the_kernels_as_the_caller_does(monkeypatch, check_vma):
  """The check runs outside the caller's trace (no axis name of its
  shard_map is bound there), and with the caller's varying operands: inside
  `shard_map(check_vma=True)` the kernels see xp varying along "b" and w
  replicated, as the step will call them."""
  seen = []

  def forward(xp, w, strides):
    try:
      bound = int(jax.lax.axis_size("b"))
    except NameError:
      bound = None
    seen.append((bound, layout.varying_axes(xp), layout.varying_axes(w)))
    return _naive_forward(xp, w, strides)
  _on_gpu(monkeypatch, "triton", triton=family(forward=forward))
  with ops.record_backends() as record:
    grads = _shard_map_grad(check_vma)(*_data())
  assert {r["implementation"] for r in record} == {"triton"}
  probe, *in_step = seen
  if check_vma:  # a one-device mesh of the check's own, xp varying alone
    assert probe == (1, {"b"}, frozenset())
  else:
    assert probe == (None, frozenset(), frozenset())
  assert in_step and all(s[0] == 1 for s in in_step)  # the caller's mesh
  for a, b in zip(grads, _xla_loss_grads()[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------ real Pallas kernels in interpret mode --


def _pallas_forward_without_abs(xp, w, strides, interpret=True):
  """A real Pallas kernel that miscomputes: it forgets the absolute value."""
  del interpret
  n, hp, wp, c = xp.shape
  ho, wo = layout.output_hw(xp.shape, w.shape, strides)
  kh, kw, _, cout = w.shape

  def kernel(x_ref, w_ref, o_ref):
    acc = jnp.zeros((ho, wo, cout), jnp.float32)
    for i in range(kh):
      for j in range(kw):
        v = x_ref[0, i:i + ho, j:j + wo, :].astype(jnp.float32)
        acc -= (v[..., None] - w_ref[i, j].astype(jnp.float32)).sum(-2)
    o_ref[0] = acc
  return pl.pallas_call(
      kernel, grid=(n,),
      in_specs=[pl.BlockSpec((1, hp, wp, c), lambda b: (b, 0, 0, 0)),
                pl.BlockSpec(w.shape, lambda b: (0, 0, 0, 0))],
      out_specs=pl.BlockSpec((1, ho, wo, cout), lambda b: (b, 0, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((n, ho, wo, cout), jnp.float32),
      interpret=True)(xp, w)


def _pallas_that_does_not_build(xp, w, strides, interpret=True):
  """A real Pallas kernel whose block does not match its operand's rank."""
  del strides, interpret
  return pl.pallas_call(
      lambda x_ref, o_ref: None, grid=(1,),
      in_specs=[pl.BlockSpec((1, 1), lambda b: (0, 0))],
      out_specs=pl.BlockSpec((1, 1), lambda b: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((1, 1), jnp.float32),
      interpret=True)(xp)


def test_real_interpret_kernels_checked_and_rejected(monkeypatch, caplog):
  """The Triton kernels in interpret mode pass; a Pallas forward that
  miscomputes and one that does not build are rejected, on the CPU chain."""
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "mosaic")
  monkeypatch.setitem(dispatch.FAMILY_MODULES, "triton", family(
      forward=_pallas_forward_without_abs))
  monkeypatch.setitem(dispatch.FAMILY_MODULES, "mosaic_gpu", family(
      forward=_pallas_that_does_not_build))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), rows=WINDOW[0],
                                cols=WINDOW[1],
                                reference=ops._REFERENCE) is None
  assert "mosaic_gpu kernels rejected" in caplog.text
  assert "does not build" in caplog.text
  assert "triton kernels rejected" in caplog.text
  assert "computes wrong numbers" in caplog.text
  monkeypatch.setitem(dispatch.FAMILY_MODULES, "triton", gpu)
  dispatch.reset()
  kernels = dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), rows=WINDOW[0],
                                 cols=WINDOW[1], reference=ops._REFERENCE)
  assert kernels.name == "triton" and kernels.interpret
  assert kernels.forward.func is gpu.forward


def test_check_runs_once_per_signature_and_is_cheap_to_repeat(monkeypatch):
  module = family()
  _on_gpu(monkeypatch, "triton", triton=module)
  for dtype in ("float32", "float32", "bfloat16", "float32", "bfloat16"):
    dispatch.backend_for(XP_SHAPE, W_SHAPE, (1, 1), dtype, rows=WINDOW[0],
                         cols=WINDOW[1], reference=ops._REFERENCE)
  forwards = [c for c in module.calls if c[0] == "forward"]
  assert [c[2] for c in forwards] == [jnp.float32, jnp.bfloat16]


def _forward_off_by(delta):
  """A forward wrong at one output element by `delta`: under the tolerance
  in relative L2 over the whole output, far over it as a max error."""
  def forward(xp, w, strides):
    return _naive_forward(xp, w, strides).at[0, 0, 0, 0].add(delta)
  return forward


def test_check_rejects_a_single_wrong_element_by_its_max_error():
  """One output element off by 0.04 (of outputs near -30, L2 norm ~480):
  relative L2 ~8e-5 passes the float32 tolerance 2e-4, relative max ~1e-3
  does not. Without the max-error half of the comparison a kernel wrong at
  one ragged-edge pixel of a large call would pass."""
  reason = _check(family(forward=_forward_off_by(0.04)))
  assert reason is not None and reason.startswith("computes wrong numbers"), (
      reason)
  errors = [float(e) for e in re.findall(r"(\d\.\de[-+]\d+)", reason)]
  assert errors[0] < dispatch.TOLERANCE["float32"] < errors[1], reason


def _clip_at_2(xp, w, g, strides):
  """The input gradient with HardTanh's bound at 2 instead of 1."""
  return _naive_input_grad(xp, w, g, strides, bound=2.0)


def test_check_data_saturates_the_clip():
  """The check's random data must reach |w - x| > 1, else an input gradient
  with the wrong HardTanh bound (or none) passes it."""
  reason = _check(family(input_grad=_clip_at_2))
  assert reason is not None and re.search(
      r"^computes wrong numbers: .*input gradient", reason), reason


def test_check_is_redone_for_another_window_strides_and_varying(monkeypatch):
  """A check holds for its exact call only: another input-gradient window,
  other strides, or operands varying along other mesh axes are checked
  again (each can change what the kernel computes or whether it runs)."""
  seen = []

  def forward(xp, w, strides):
    seen.append((tuple(strides), layout.varying_axes(xp)))
    return _naive_forward(xp, w, strides)
  module = family(forward=forward)
  _on_gpu(monkeypatch, "triton", triton=module)
  other_window = ((2, 5), (1, 7))
  for strides, window, varying in (
      ((1, 1), WINDOW, ((), ())),
      ((1, 1), other_window, ((), ())),      # another window
      ((2, 2), WINDOW, ((), ())),            # other strides
      ((1, 1), WINDOW, (("b",), ())),        # xp varying along "b"
      ((1, 1), WINDOW, ((), ())),            # all seen: no new check
  ):
    assert dispatch.backend_for(
        XP_SHAPE, W_SHAPE, strides, "float32", rows=window[0],
        cols=window[1], reference=ops._REFERENCE,
        varying=varying).name == "triton"
  windows = [c[3:] for c in module.calls if c[0] == "input_grad"]
  assert windows.count(((2, 5), (1, 7))) == 1, windows
  assert seen == [((1, 1), frozenset()), ((1, 1), frozenset()),
                  ((2, 2), frozenset()), ((1, 1), frozenset({"b"}))], seen


def test_a_rejection_is_logged_for_each_dtype(monkeypatch, caplog):
  """A family rejected for float32 and again for bfloat16 on the same shapes
  says so twice: the second rejection names its dtype."""
  _on_gpu(monkeypatch, "triton", triton=family(forward=_wrong_edge))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert _backend("float32") is None
    assert _backend("bfloat16") is None
  lines = [r.getMessage() for r in caplog.records
           if r.levelno == logging.WARNING and "rejected" in r.getMessage()]
  assert len(lines) == 2, lines
  assert ", float32, " in lines[0] and ", bfloat16, " in lines[1], lines


def test_a_family_whose_unsupported_reason_raises_is_skipped(monkeypatch,
                                                            caplog):
  """`unsupported_reason` raising (a family's own bug) is a fallback to the
  next family, logged, not an exception in the user's program."""
  def refuses(*shapes):
    raise ZeroDivisionError("integer division by zero (injected)")
  _on_gpu(monkeypatch, mosaic_gpu=family("mosaic", unsupported_reason=refuses),
          triton=family())
  with caplog.at_level(logging.INFO, logger=LOGGER):
    assert _backend().name == "triton"
  assert "unsupported_reason raised ZeroDivisionError" in caplog.text


# From a second mutation audit: chain parsing, the interpret-mode device
# limit, the probe's batch floor, and the check's less common outcomes.


def test_chain_variables_empty_or_repeating_names(monkeypatch):
  """An empty variable is the default chain (not "no kernels"); a family
  named twice (an alias and its name) is tried once: twice, its rejection
  read "triton kernels rejected ...; using triton"."""
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", " ")
  assert dispatch.chain_for("gpu") == (("triton",), False)
  monkeypatch.setenv("ADDERNET_CPU_KERNELS", "")
  assert dispatch.chain_for("cpu") == (("triton",), True)
  monkeypatch.setenv("ADDERNET_GPU_KERNELS", "mosaic, Triton,mosaic_gpu")
  assert dispatch.chain_for("gpu") == (("mosaic_gpu", "triton"), False)


def test_interpret_device_limit_leaves_compiled_kernels_alone(monkeypatch):
  """`INTERPRET_MAX_DEVICES` bounds a family's interpret mode only: compiled
  (on a TPU) it runs inside a shard_map over any number of devices."""
  monkeypatch.setattr(dispatch, "_manual_devices", lambda: 8)
  module = family(INTERPRET_MAX_DEVICES=1)
  shapes = (XP_SHAPE, W_SHAPE, (1, 1))
  assert dispatch._family_refuses(module, *shapes, interpret=False) is None
  why = dispatch._family_refuses(module, *shapes, interpret=True)
  assert why is not None and "at most 1 device(s), this one has 8" in why


def test_probe_runs_at_least_one_image_under_any_budget(monkeypatch):
  monkeypatch.setenv("ADDERNET_KERNEL_PROBE_MAX_MB", "0")
  assert dispatch.probe_batch((8, 34, 34, 16), (3, 3, 16, 16), (1, 1),
                              "float32") == 1


def test_check_names_a_wrong_input_gradient_shape_and_nan():
  """The input gradient's own failures are named as such: another shape
  (not "could not be compared with XLA"), a NaN inside the window (not
  "computes wrong numbers")."""
  crop = family(takes_window=False, input_grad=lambda *a: _naive_input_grad(
      *a)[:, :-1])
  reason = _check(crop)
  assert reason is not None and reason.startswith(
      "returns shapes (2, 5, 6, 4) and (2, 6, 8, 3), expected"), reason
  nan = family(input_grad=lambda *a: _naive_input_grad(*a).at[0, 3, 3, 0].set(
      jnp.nan))
  reason = _check(nan)
  assert reason == ("computes non-finite values (input gradient) on finite "
                    "random data"), reason


def test_float16_calls_are_held_to_the_float16_tolerance():
  """A forward 2% off is rejected for float16 (tolerance 5e-3)."""
  reason = _check(family(forward=lambda *a: 1.02 * _naive_forward(*a)),
                  "float16")
  assert reason is not None and reason.startswith(
      "computes wrong numbers") and "(tolerance 0.005 for float16)" in (
          reason), reason


def test_a_check_without_reference_is_not_reused_with_one():
  """kernel_failure without a reference checks building, running and
  finite outputs only; the same call with a reference is checked again."""
  args = ("fake", family(forward=_wrong_edge), XP_SHAPE, W_SHAPE, (1, 1),
          "float32")
  window = dict(rows=WINDOW[0], cols=WINDOW[1])
  assert dispatch.kernel_failure(*args, **window) is None
  reason = dispatch.kernel_failure(*args, **window, reference=ops._REFERENCE)
  assert reason is not None and reason.startswith("computes wrong numbers")
