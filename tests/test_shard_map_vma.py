"""adder_conv inside a user's `jax.shard_map` with the default check_vma=True,
and under `jit` on a mesh with Explicit axes (sharding in types).

Runs in a subprocess with 2 or 4 host devices (XLA_FLAGS must be set before
JAX starts). The filter gradient of a replicated filter over a batch-sharded
input must be replicated (summed over shards, as JAX's autodiff does) and
equal the single-device gradient.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from addernet_jax.ops import adder_conv
    mesh = jax.make_mesh((2,), ("b",), axis_types=(jax.sharding.AxisType.Auto,))
    x = jax.random.normal(jax.random.key(0), (4, 7, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))

    def loss(w, x):  # pmean of the loss before grad: the check_vma=True idiom
      return jax.lax.pmean(jnp.mean(adder_conv(x, w, strides=2) ** 2), "b")

    grad = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1)), mesh=mesh,
                                 in_specs=(P(), P("b")), out_specs=(P(), P("b"))))
    dw, dx = grad(w, x)
    ref_dw, ref_dx = jax.grad(
        lambda w, x: jnp.mean(adder_conv(x, w, strides=2) ** 2), argnums=(0, 1))(w, x)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5 * np.abs(ref_dw).max())
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5 * np.abs(ref_dx).max())
    print("OK")
""")


def _run_on_devices(script: str, devices: int = 2) -> None:
  """Runs `script` in a fresh interpreter with `devices` host devices; it
  must print OK."""
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  result = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_gradients_inside_shard_map_with_check_vma():
  _run_on_devices(SCRIPT)


EXPLICIT_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from addernet_jax.ops import adder_conv
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    xh = rng.standard_normal((4, 7, 6, 3)).astype(np.float32)
    wh = rng.standard_normal((3, 3, 3, 6)).astype(np.float32)
    weights = np.arange(6, dtype=np.float32)
    for impl in ("xla", "pallas"):
      for gradient in ("official", "exact"):
        def loss(x, w):
          y = adder_conv(x, w, strides=(2, 1), padding=((1, 0), (0, 1)),
                         implementation=impl, gradient=gradient)
          return jnp.sum(y * weights) / 100, y
        (_, ref_y), ref = jax.value_and_grad(loss, (0, 1), has_aux=True)(xh, wh)
        for x_spec, w_spec, out_spec in (
            (P("d"), P(), P("d", None, None, None)),
            (P(), P(None, None, None, "d"), P(None, None, None, "d")),
            (P("d"), P(None, None, None, "d"), P("d", None, None, None))):
          x = jax.device_put(xh, NamedSharding(mesh, x_spec))
          w = jax.device_put(wh, NamedSharding(mesh, w_spec))
          (_, y), (dx, dw) = jax.jit(jax.value_and_grad(
              loss, (0, 1), has_aux=True))(x, w)
          assert y.sharding.spec == out_spec, (y.sharding, out_spec)
          full = lambda spec: tuple(spec) + (None,) * (4 - len(spec))
          assert full(dx.sharding.spec) == full(x_spec), dx.sharding
          assert full(dw.sharding.spec) == full(w_spec), dw.sharding
          np.testing.assert_allclose(y, ref_y, rtol=1e-6)
          for got, want in ((dx, ref[0]), (dw, ref[1])):
            np.testing.assert_allclose(got, want, rtol=1e-5,
                                       atol=1e-5 * np.abs(want).max())
    # flax.nnx.Conv passes lax.conv's out_sharding: with Explicit axes a
    # with_sharding_constraint only asserted (AssertionError "use
    # jax.sharding.reshard") where the spec differed.
    import flax.nnx as nnx
    from addernet_jax.ops import adder_conv_general_dilated
    conv = nnx.Conv(3, 6, (3, 3), conv_general_dilated=adder_conv_general_dilated,
                    use_bias=False, rngs=nnx.Rngs(0))
    want = conv(xh)
    with jax.set_mesh(mesh):
      x = jax.device_put(xh, NamedSharding(mesh, P("d")))
      y = nnx.jit(lambda m, x: m(x, out_sharding=P(None, None, None, "d")))(
          conv, x)
    assert tuple(y.sharding.spec) == (None, None, None, "d"), y.sharding
    np.testing.assert_allclose(y, want, rtol=1e-6)

    # A model's training step on an explicitly sharded batch: BatchNorm's
    # first-sample shift raised ShardingTypeError.
    from addernet_jax import models
    model = models.get_model("lenet5_bn", num_classes=10)
    images = rng.random((4, 28, 28, 1)).astype(np.float32)
    labels = np.arange(4) % 10
    variables = model.init(jax.random.key(0), images[:1], train=False)

    def step_loss(params, images, labels):
      logits, _ = model.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              images, train=True, mutable=["batch_stats"])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                           labels[:, None], axis=1))

    step = jax.jit(jax.value_and_grad(step_loss))
    want_loss, want_grads = step(variables["params"], images, labels)
    with jax.set_mesh(mesh):
      loss, grads = step(variables["params"],
                         jax.device_put(images, NamedSharding(mesh, P("d"))),
                         jax.device_put(labels, NamedSharding(mesh, P("d"))))
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-4,
                                 atol=1e-4 * np.abs(want).max())
    print("OK")
""")


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_explicit_sharding_in_types():
  """`jax.make_mesh`'s default Explicit axes (sharding in types): with the
  batch or the output channels sharded, gradients raised ShardingTypeError
  from inside the per-tap backward (and the Pallas forward). Forward and both
  gradients now equal the unsharded ones and keep their inputs' shardings."""
  _run_on_devices(EXPLICIT_SCRIPT)


PARTIAL_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from addernet_jax.ops import adder_conv
    explicit = jax.sharding.AxisType.Explicit
    mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(explicit, explicit))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 6)).astype(np.float32)
    loss = lambda w, x: jnp.mean(adder_conv(x, w, strides=(2, 1)) ** 2)
    ref_w, ref_x = jax.grad(loss, argnums=(0, 1))(w, x)
    grad = jax.jit(jax.shard_map(
        jax.grad(lambda w, x: jax.lax.pmean(loss(w, x), "a"), argnums=(0, 1)),
        mesh=mesh, in_specs=(P(), P("a")), out_specs=(P(), P("a")),
        axis_names={"a"}))
    # Manual over "a"; "b" stays Explicit and shards the input's channels,
    # rows or batch, or the filters' input or output channels.
    for x_spec, w_spec in ((P("a", None, None, "b"), P()),
                           (P(("a", "b")), P()), (P("a", "b"), P()),
                           (P("a"), P(None, None, None, "b")),
                           (P("a"), P(None, None, "b"))):
      with jax.set_mesh(mesh):
        gw, gx = grad(jax.device_put(w, NamedSharding(mesh, w_spec)),
                      jax.device_put(x, NamedSharding(mesh, x_spec)))
      full = lambda spec: tuple(spec) + (None,) * (4 - len(spec))
      assert full(gw.sharding.spec) == full(w_spec), (x_spec, gw.sharding)
      assert full(gx.sharding.spec) == full(x_spec), (x_spec, gx.sharding)
      for got, want in ((gw, ref_w), (gx, ref_x)):
        np.testing.assert_allclose(got, want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    print("OK")
""")


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_gradients_in_a_shard_map_over_some_axes_of_an_explicit_mesh():
  """A `shard_map` manual over one axis of a mesh whose other axis stays
  Explicit and shards the input or the filters: both gradients equal the
  unsharded ones and keep their inputs' shardings."""
  _run_on_devices(PARTIAL_SCRIPT, devices=4)
