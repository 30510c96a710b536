"""`models.common.BatchNorm` against PyTorch's BatchNorm, and 1 vs N devices.

PyTorch normalises with the biased batch variance and updates `running_var`
with the unbiased one (n / (n - 1)); so must we, or official checkpoints
fine-tune and evaluate differently (7% on one step's running-variance update
of the BatchNorm over the logits of the official ResNet-20, batch 64).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from addernet_jax.models import common, get_model


def _x64():
  """float64 enabled for a block (jax.enable_x64 from JAX 0.8, before that
  jax.experimental.enable_x64)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


def _f64(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


@pytest.mark.parametrize("shape", [(6, 5, 4, 3), (7, 3), (2, 1, 1, 10)])
def test_matches_torch_batchnorm_in_float64(shape):
  """Train-mode output and running statistics after three steps, then the
  eval-mode output, against torch.nn.BatchNorm2d / 1d in float64 (the last
  shape: a BatchNorm over logits of batch 2, where n / (n - 1) = 2)."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  c = shape[-1]
  cls = torch.nn.BatchNorm2d if len(shape) == 4 else torch.nn.BatchNorm1d
  ref = cls(c, momentum=0.1, eps=1e-5).double()
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(rng.standard_normal(c)))
    ref.bias.copy_(torch.from_numpy(rng.standard_normal(c)))
  to_torch = ((lambda a: torch.from_numpy(np.moveaxis(a, -1, 1)))
              if len(shape) == 4 else torch.from_numpy)
  from_torch = ((lambda t: np.moveaxis(t.detach().numpy(), 1, -1))
                if len(shape) == 4 else (lambda t: t.detach().numpy()))
  with _x64():
    bn = common.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float64,
                          param_dtype=jnp.float64)
    variables = _f64(bn.init(jax.random.key(0), jnp.zeros(shape),
                             use_running_average=False))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
    variables["params"] = {"scale": jnp.asarray(ref.weight.detach().numpy()),
                           "bias": jnp.asarray(ref.bias.detach().numpy())}
    for _ in range(3):
      # Adder-like activations: a large mean, a small spread.
      x = rng.standard_normal(shape) * 3.0 - 800.0
      want = from_torch(ref.train()(to_torch(x)))
      y, updates = bn.apply(variables, jnp.asarray(x),
                            use_running_average=False,
                            mutable=["batch_stats"])
      variables = {"params": variables["params"], **updates}
      np.testing.assert_allclose(y, want, rtol=0, atol=1e-12)
      stats = variables["batch_stats"]
      np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(),
                                 rtol=1e-13)
      np.testing.assert_allclose(stats["var"], ref.running_var.numpy(),
                                 rtol=1e-13)
    y = bn.apply(variables, jnp.asarray(x), use_running_average=True)
    np.testing.assert_allclose(y, from_torch(ref.eval()(to_torch(x))),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 8, 8, 16), (32, 32, 32, 4),
                                   (256, 4, 4, 16)])
def test_float32_statistics_of_adder_outputs_are_within_ulps_of_float64(
    shape):
  """Adder-like activations in float32 (means of -500 to -3000 per channel,
  a spread of 3): the batch mean is the float64 mean correctly rounded (half
  an ulp, as PyTorch's float32 running mean; XLA's plain float32 mean, not
  summed after a shift, was 0.6-1.0 ulp off), the variance within a few
  ulps, and the training-mode output within 2 ulps of the channel's mean
  (divided by its spread) of the float64 result, closer than PyTorch's
  float32 BatchNorm2d gets (a one-pass variance, E[x^2] - E[x]^2, was
  30-300x further than PyTorch's)."""
  rng = np.random.default_rng(sum(shape))
  channels = shape[-1]
  x = (rng.standard_normal(shape) * 3.0
       - rng.uniform(500, 3000, channels)).astype(np.float32)
  x64 = x.astype(np.float64)
  mean64 = x64.mean(axis=(0, 1, 2))
  var64 = np.square(x64 - mean64).mean(axis=(0, 1, 2))
  want = (x64 - mean64) / np.sqrt(var64 + 1e-5)
  bn = common.BatchNorm(momentum=0.0, epsilon=1e-5)  # running = this batch's
  variables = bn.init(jax.random.key(0), jnp.asarray(x),
                      use_running_average=False)
  y, updates = bn.apply(variables, jnp.asarray(x), use_running_average=False,
                        mutable=["batch_stats"])
  assert y.dtype == jnp.float32
  error = np.abs(np.asarray(y, np.float64) - want).max(axis=(0, 1, 2))
  ulp_of_mean = np.spacing(np.abs(mean64).astype(np.float32))
  bound = 2 * ulp_of_mean / np.sqrt(var64) + 8 * np.finfo(np.float32).eps
  assert np.all(error <= bound), (error, bound)
  stats = updates["batch_stats"]
  mean_error = np.abs(np.asarray(stats["mean"], np.float64) - mean64)
  assert np.all(mean_error <= 0.51 * ulp_of_mean), mean_error / ulp_of_mean
  n = x.size // channels
  np.testing.assert_allclose(stats["var"], var64 * n / (n - 1), rtol=1e-5)
  torch = pytest.importorskip("torch")
  official = torch.nn.BatchNorm2d(channels, eps=1e-5).train()
  with torch.no_grad():
    theirs = official(torch.from_numpy(np.moveaxis(x, -1, 1))).numpy()
  their_error = np.abs(np.moveaxis(theirs, 1, -1) - want).max()
  assert error.max() <= their_error, (error.max(), their_error)


def test_running_variance_is_unbiased_and_init_leaves_stats():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 2, 2, 3)),
                  jnp.float32)
  bn = common.BatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  assert set(variables["params"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]) == {"mean", "var"}
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  _, updates = bn.apply(variables, x, use_running_average=False,
                        mutable=["batch_stats"])
  n = 16
  var = np.var(np.asarray(x, np.float64), axis=(0, 1, 2))
  np.testing.assert_allclose(updates["batch_stats"]["var"],
                             0.9 + 0.1 * var * n / (n - 1), rtol=1e-6)


def test_models_use_it_with_unchanged_variable_names():
  model = get_model("resnet20", num_classes=10, conv="mult")
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert set(variables["params"]["bn2"]) == {"scale", "bias"}
  assert set(variables["batch_stats"]["layer2_0"]["downsample_bn"]) == {
      "mean", "var"}
  bound = model.bind(variables)
  assert isinstance(common.batch_norm(True, dtype=jnp.float32, axis_name=None,
                                      name="x"), common.BatchNorm)
  del bound


DEVICES = 4
SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from addernet_jax.models.common import BatchNorm

    mesh = jax.make_mesh((%(devices)d,), ("batch",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 3, 2, 5))
                    * 2.0 - 600.0, jnp.float32)
    synced = BatchNorm(momentum=0.9, axis_name="batch")
    local = BatchNorm(momentum=0.9)
    variables = local.init(jax.random.key(0), x, use_running_average=False)
    variables["params"]["scale"] = jnp.linspace(0.5, 2.0, 5)

    def step(v, x, model):
      y, upd = model.apply(v, x, use_running_average=False,
                           mutable=["batch_stats"])
      return y, upd["batch_stats"]

    one_y, one_stats = jax.jit(lambda v, x: step(v, x, local))(variables, x)
    out = {}
    for check_vma in (False, True):
      fn = jax.jit(jax.shard_map(
          lambda v, x: step(v, x, synced), mesh=mesh,
          in_specs=(P(), P("batch")), out_specs=(P("batch"), P()),
          check_vma=check_vma))
      y, stats = fn(variables, x)
      out[str(check_vma)] = {
          "y": float(np.abs(np.asarray(y) - np.asarray(one_y)).max()),
          "var": float(np.abs(np.asarray(stats["var"])
                              - np.asarray(one_stats["var"])).max()
                       / np.abs(np.asarray(one_stats["var"])).max()),
          "mean": float(np.abs(np.asarray(stats["mean"])
                               - np.asarray(one_stats["mean"])).max()
                        / np.abs(np.asarray(one_stats["mean"])).max())}
    # The count is global: the unbiased factor is 48/47, not 12/11.
    var = np.var(np.asarray(x, np.float64), axis=(0, 1, 2))
    out["factor"] = float(np.max(np.abs(
        (np.asarray(one_stats["var"]) - 0.9) / (0.1 * var) - 48 / 47)))
    print(json.dumps(out))
""") % {"devices": DEVICES}


def test_synchronised_over_devices_equals_one_device():
  """With `axis_name`, N devices give the statistics, and the n/(n-1) of the
  global batch, of one device on the whole batch (inside jax.shard_map, with
  and without check_vma)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["factor"] < 1e-5
  for check_vma in ("False", "True"):
    # Outputs are O(1); statistics are float32 reductions in another order.
    assert out[check_vma]["y"] < 1e-4, out
    assert out[check_vma]["var"] < 1e-5, out
    assert out[check_vma]["mean"] < 1e-6, out


def test_the_models_batch_norm_has_the_official_constants():
  """`common.batch_norm`, the factory every model uses, against
  torch.nn.BatchNorm2d with the official constants (momentum 0.1, eps 1e-5)
  in float64: training-mode output, running statistics over three steps,
  then the evaluation-mode module on them."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  shape = (6, 5, 4, 3)
  ref = torch.nn.BatchNorm2d(3, momentum=0.1, eps=1e-5).double()
  to_torch = lambda a: torch.from_numpy(np.moveaxis(a, -1, 1))
  from_torch = lambda t: np.moveaxis(t.detach().numpy(), 1, -1)
  with _x64():
    train = common.batch_norm(True, dtype=jnp.float64, axis_name=None,
                              name="bn")
    variables = _f64(train.init(jax.random.key(0), jnp.zeros(shape)))
    for _ in range(3):
      x = rng.standard_normal(shape) * 0.05 + 0.3  # variance near eps
      want = from_torch(ref.train()(to_torch(x)))
      y, updates = train.apply(variables, jnp.asarray(x),
                               mutable=["batch_stats"])
      variables = {"params": variables["params"], **_f64(updates)}
      np.testing.assert_allclose(y, want, rtol=0, atol=1e-10)
    np.testing.assert_allclose(variables["batch_stats"]["mean"],
                               ref.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(variables["batch_stats"]["var"],
                               ref.running_var.numpy(), rtol=1e-12)
    evaluate = common.batch_norm(False, dtype=jnp.float64, axis_name=None,
                                 name="bn")
    np.testing.assert_allclose(
        evaluate.apply(variables, jnp.asarray(x)),
        from_torch(ref.eval()(to_torch(x))), rtol=0, atol=1e-10)
