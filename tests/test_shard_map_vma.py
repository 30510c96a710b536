"""adder_conv inside a user's `jax.shard_map` with the default check_vma=True.

Runs in a subprocess with 2 host devices (XLA_FLAGS must be set before JAX
starts). The filter gradient of a replicated filter over a batch-sharded
input must be replicated (summed over shards, as JAX's autodiff does) and
equal the single-device gradient.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_gradients_inside_shard_map_with_check_vma():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
