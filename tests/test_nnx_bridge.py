"""The paper's models as Flax NNX modules (`models.to_nnx`): the same outputs
and the same training steps as the Linen models, pretrained weights loaded,
mismatches named."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import flax.linen as nn
import optax
import pytest
from flax import nnx

from addernet_jax import convert, optim
from addernet_jax.models import get_model, linen_variables, load_variables, to_nnx

OFFICIAL = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
            / "official-resnet20" / "ResNet20-AdderNet.pth")
SHAPE = (8, 28, 28, 1)


def _linen_variables(model, shape, seed):
  """Variables of another initialisation than `to_nnx`'s (seed 0), with
  BatchNorm statistics near those of the images, perturbed. (Statistics
  far from them, as drawn from U(0.5, 2) before, leave every ReLU after the
  first adder layer dead in evaluation: the same logits for every image.)"""
  variables = jax.jit(lambda x: model.init(  # rbg: compiles 2x faster
      jax.random.key(seed, impl="rbg"), x, train=False))(jnp.zeros(shape))
  update = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"])
  x = _images(shape, seed=seed + 100)
  stats = variables["batch_stats"]
  for _ in range(40):  # running averages -> the batch's statistics
    stats = update({"params": variables["params"], "batch_stats": stats}, x)
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a) * rng.uniform(0.7, 1.4, a.shape),
                            a.dtype), stats)
  return {"params": variables["params"], "batch_stats": stats}


def _images(shape, seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


@nnx.jit(static_argnames="train")
def _nnx_call(module, x, train):
  if train:
    return module(x, train=True, mutable=["batch_stats"])
  return module(x, train=False)


def _linen_call(model, variables, x, train):
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True,
                                            mutable=["batch_stats"]))(
                                                variables, x)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_outputs_and_batch_statistics_match_the_linen_model():
  model = get_model("lenet5_bn", num_classes=10)
  variables = _linen_variables(model, SHAPE, seed=3)
  module = to_nnx(model, SHAPE, variables)
  x = _images(SHAPE)
  want = _linen_call(model, variables, x, False)
  assert np.ptp(np.asarray(want), axis=0).max() > 0.1, want  # not constant
  np.testing.assert_array_equal(_nnx_call(module, x, False), want)
  want, updates = _linen_call(model, variables, x, True)
  got = _nnx_call(module, x, True)
  np.testing.assert_array_equal(got, want)
  got_variables = linen_variables(module)
  jax.tree.map(np.testing.assert_array_equal, got_variables["batch_stats"],
               updates["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, got_variables["params"],
               variables["params"])


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_a_training_step_matches_the_linen_step():
  """Three steps of the official optimiser (adaptive LR on the adder
  filters, weight decay, momentum) through `nnx.Optimizer` give the Linen
  step's parameters and statistics."""
  model = get_model("lenet5_bn", num_classes=10)
  variables = _linen_variables(model, SHAPE, seed=4)
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, eta=0.2,
      num_epochs=2, num_train_steps=0))
  tx = optim.make_optimizer(config, variables["params"], steps_per_epoch=2)
  batches = [(_images(SHAPE, seed), jnp.arange(SHAPE[0]) % 10)
             for seed in range(3)]

  @jax.jit
  def linen_step(params, stats, opt_state, x, y):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": stats},
                                    x, train=True, mutable=["batch_stats"])
      return (optax.softmax_cross_entropy_with_integer_labels(logits, y)
              .mean(), updates["batch_stats"])
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  linen_losses = []
  for x, y in batches:
    params, stats, opt_state, loss = linen_step(params, stats, opt_state, x, y)
    linen_losses.append(float(loss))

  module = to_nnx(model, SHAPE, variables)
  optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(module, optimizer, x, y):
    def loss_fn(module):
      logits = module(x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(module)
    optimizer.update(module, grads)
    return loss

  nnx_losses = [float(nnx_step(module, optimizer, x, y)) for x, y in batches]
  np.testing.assert_allclose(nnx_losses, linen_losses, rtol=1e-5)
  got = linen_variables(module)
  for want_tree, got_tree in ((params, got["params"]),
                              (stats, got["batch_stats"])):
    jax.tree.map(lambda w, g: np.testing.assert_allclose(g, w, rtol=1e-4,
                                                         atol=1e-5),
                 want_tree, got_tree)
  # The adder filters moved by the adaptive learning rate, not by the raw
  # gradient: every layer's first update has norm lr * eta * sqrt(k).
  assert not np.allclose(got["params"]["conv1"]["adder_kernel"],
                         variables["params"]["conv1"]["adder_kernel"])


def test_mismatched_variables_are_named_and_nothing_is_loaded():
  model = get_model("lenet5_bn", num_classes=10)
  module = to_nnx(model, SHAPE)
  before = linen_variables(module)
  good = jax.tree.map(  # none of the values `to_nnx` starts from
      lambda a: jnp.full(a.shape, 0.5, a.dtype), jax.eval_shape(
          lambda: model.init(jax.random.key(5), jnp.zeros(SHAPE),
                             train=False)))

  wrong_shape = jax.tree.map(lambda a: a, good)
  wrong_shape["params"]["conv2"]["adder_kernel"] = jnp.zeros((5, 5, 6, 17))
  with pytest.raises(ValueError, match=r"params/conv2/adder_kernel has shape "
                     r"\(5, 5, 6, 17\); the model expects \(5, 5, 6, 16\)"):
    load_variables(module, wrong_shape)

  missing = {"params": good["params"]}
  with pytest.raises(ValueError, match=r"variables lack 'bn\d/(mean|var)'"):
    load_variables(module, missing)

  extra = jax.tree.map(lambda a: a, good)
  extra["params"]["fc4"] = {"kernel": jnp.zeros((3,))}
  with pytest.raises(ValueError, match=r"params/fc4/kernel \(shape \(3,\)\) "
                     r"has no counterpart"):
    load_variables(module, extra)

  swapped = jax.tree.map(lambda a: a, good)
  swapped["batch_stats"]["bn1"]["scale"] = swapped["params"]["bn1"].pop("scale")
  with pytest.raises(ValueError, match=r"batch_stats/bn1/scale is a Param"):
    load_variables(module, swapped)

  with pytest.raises(ValueError, match="unknown variable collection 'cache'"):
    load_variables(module, {**good, "cache": {}})
  with pytest.raises(ValueError, match="must be a mapping"):
    load_variables(module, [good])
  jax.tree.map(np.testing.assert_array_equal, linen_variables(module), before)


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_official_checkpoint_runs_as_an_nnx_module():
  if not OFFICIAL.is_file():
    pytest.skip(f"{OFFICIAL} is absent (the shared real-data folder sits "
                f"beside a developer checkout, not in a user's clone)")
  model = get_model("resnet20", num_classes=10)
  variables = convert.load_torch_checkpoint(OFFICIAL, "resnet20")
  module = to_nnx(model, (1, 32, 32, 3), variables)
  x = _images((4, 32, 32, 3))
  np.testing.assert_array_equal(_nnx_call(module, x, False),
                                _linen_call(model, variables, x, False))


# From a mutation audit: dtypes, the seed, a variable given twice.


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(5, name="dense")(x)
    return nn.BatchNorm(use_running_average=not train, name="bn")(x)


def test_loaded_variables_keep_the_models_dtype_and_seed_matters():
  model = _Tiny()
  shape = (3, 7)
  variables = model.init(jax.random.key(11), jnp.ones(shape), train=False)
  rng = np.random.default_rng(12)
  half = jax.tree.map(
      lambda a: rng.normal(size=a.shape).astype(np.float16), variables)
  module = to_nnx(model, shape, half)
  got = linen_variables(module)
  for want, have in zip(jax.tree.leaves(half), jax.tree.leaves(got)):
    assert have.dtype == jnp.float32
    np.testing.assert_array_equal(have, want.astype(np.float32))
  a = linen_variables(to_nnx(model, shape, seed=1))["params"]
  b = linen_variables(to_nnx(model, shape, seed=1))["params"]
  c = linen_variables(to_nnx(model, shape, seed=2))["params"]
  np.testing.assert_array_equal(a["dense"]["kernel"], b["dense"]["kernel"])
  assert not np.allclose(a["dense"]["kernel"], c["dense"]["kernel"])


def test_a_stray_copy_in_another_collection_is_refused():
  """`params/bn/mean` (a batch statistic's name) beside the real
  `batch_stats/bn/mean` is named in either order (listed after
  batch_stats it was named; before it, it was dropped without a word)."""
  model = _Tiny()
  v = model.init(jax.random.key(3), jnp.ones((2, 3)), train=False)
  module = to_nnx(model, (2, 3))
  before = linen_variables(module)
  params = {**v["params"], "bn": {**v["params"]["bn"],
                                  "mean": jnp.full((5,), 7.0)}}
  for stray in ({"batch_stats": v["batch_stats"], "params": params},
                {"params": params, "batch_stats": v["batch_stats"]}):
    with pytest.raises(ValueError, match=r"'bn/mean' in both '(params|batch"
                       r"_stats)' and '(params|batch_stats)'"):
      load_variables(module, stray)
  after = linen_variables(module)
  for want, got in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(got, want)  # nothing loaded
