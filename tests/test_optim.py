"""The adaptive-LR Optax transform, the adder mask, the official schedule and
the whole optimiser against an independent numpy PyTorch-SGD reference."""

from __future__ import annotations

import math

import chex
import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util
from hypothesis import given, settings, strategies as st

from addernet_jax import layers, optim


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, eta=0.2,
      num_epochs=400, num_train_steps=0, optimizer="sgd"))
  config.update(overrides)
  return config


def _params(seed: int = 0) -> dict:
  """A Flax-like tree: stem kernel, adder filters, BN, a classifier."""
  rng = np.random.default_rng(seed)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      "conv1": {"kernel": normal(3, 3, 3, 5)},
      "bn1": {"scale": normal(5), "bias": normal(5)},
      "layer1_0": {"conv1": {"adder_kernel": normal(3, 3, 5, 7)},
                   "downsample_conv": {"adder_kernel": normal(1, 1, 5, 7)}},
      "fc": {"kernel": normal(1, 1, 7, 3), "bias": normal(3)},
  }


ADDER_PATHS = {("layer1_0", "conv1", "adder_kernel"),
               ("layer1_0", "downsample_conv", "adder_kernel")}


TRANSFORMS = {
    "scale_by_adaptive_lr": lambda p: optim.scale_by_adaptive_lr(0.2),
    "masked_adaptive_lr": lambda p: optax.masked(
        optim.scale_by_adaptive_lr(0.3), optim.adder_mask),
    "make_optimizer": lambda p: optim.make_optimizer(_config(), p, 7),
    "make_optimizer_no_adaptive": lambda p: optim.make_optimizer(
        _config(adaptive_lr=False), p, 7),
    "masked_adaptive_lr_per_output_channel": lambda p: optax.masked(
        optim.scale_by_adaptive_lr(0.2, layer_axes=-1), optim.adder_mask),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_transform_jits_finite_and_keeps_shapes(name):
  params = _params()
  tx = TRANSFORMS[name](params)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: p * 0.37 - 0.1, params)
  step = jax.jit(tx.update)
  for _ in range(3):
    updates, state = step(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    chex.assert_tree_all_finite(updates)
    chex.assert_tree_all_finite(state)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = step(zero, tx.init(params), params)
  chex.assert_tree_all_finite(updates)


def test_state_type():
  assert isinstance(optim.scale_by_adaptive_lr().init(_params()),
                    optim.ScaleByAdaptiveLRState)


def test_adder_mask_exact():
  mask = optim.adder_mask(_params())
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  assert {tuple(k.key for k in path) for path, v in flat if v} == ADDER_PATHS
  assert all(isinstance(v, bool) for _, v in flat)


def test_adder_mask_on_flattened_dicts():
  """flatten_dict's tuple keys and "/"-joined keys selected nothing."""
  for sep in (None, "/"):
    flat = traverse_util.flatten_dict(_params(), sep=sep)
    mask = optim.adder_mask(flat)
    selected = {k if sep is None else tuple(k.split("/"))
                for k, v in mask.items() if v}
    assert selected == ADDER_PATHS, (sep, selected)
  assert not optim.adder_mask({"x/adder_kernel_norm": 1.0})[
      "x/adder_kernel_norm"]
  assert not optim.adder_mask({("adder_kernel", "scale"): 1.0})[
      ("adder_kernel", "scale")]


def test_adder_mask_matches_the_whole_name_only():
  """Taking a key that merely ends in "adder_kernel" ("my_adder_kernel") for
  an adder filter passed every test: the whole last name must match."""
  mask = optim.adder_mask({"a/my_adder_kernel": 1.0, "my_adder_kernel": 1.0,
                           "a/adder_kernel": 1.0})
  assert mask == {"a/my_adder_kernel": False, "my_adder_kernel": False,
                  "a/adder_kernel": True}


def test_adder_mask_on_flax_module():
  """Real Linen parameter names: only the AdderConv filter is masked."""

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Conv(4, (3, 3))(x)
      x = layers.AdderConv(3, (3, 3), name="adder")(x)
      return nn.Dense(2)(x.reshape((x.shape[0], -1)))

  params = jax.eval_shape(
      lambda: Net().init(jax.random.key(0), jnp.ones((1, 5, 5, 2))))["params"]
  mask = optim.adder_mask(params)
  assert mask["adder"][layers.ADDER_KERNEL] is True
  assert sum(jax.tree.leaves(mask)) == 1


@settings(max_examples=40, deadline=None)
@given(
    shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
    scale=st.floats(1e-6, 1e4),
    eta=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_property_adder_norm_and_others_untouched(shape, scale, eta, seed):
  rng = np.random.default_rng(seed)
  grads = {
      "a": {"adder_kernel": jnp.asarray(rng.normal(size=shape) * scale,
                                        jnp.float32)},
      "b": {"kernel": jnp.asarray(rng.normal(size=shape[::-1]) * scale,
                                  jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
  }
  tx = optax.masked(optim.scale_by_adaptive_lr(eta), optim.adder_mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  g = np.asarray(grads["a"]["adder_kernel"], np.float64)
  k = g.size
  norm = np.linalg.norm(np.asarray(updates["a"]["adder_kernel"], np.float64))
  if np.linalg.norm(g) > 0:
    np.testing.assert_allclose(norm, eta * math.sqrt(k), rtol=2e-5)
    # direction kept
    np.testing.assert_allclose(
        np.asarray(updates["a"]["adder_kernel"], np.float64),
        g / np.linalg.norm(g) * eta * math.sqrt(k), rtol=2e-5,
        atol=1e-6 * eta * math.sqrt(k))
  np.testing.assert_array_equal(updates["b"]["kernel"], grads["b"]["kernel"])
  np.testing.assert_array_equal(updates["b"]["bias"], grads["b"]["bias"])


def test_zero_gradients_give_zero_updates():
  grads = {"x": {"adder_kernel": jnp.zeros((3, 3, 4, 5))},
           "y": {"adder_kernel": jnp.zeros((2,), jnp.bfloat16)}}
  tx = optim.scale_by_adaptive_lr(0.2)
  updates, _ = jax.jit(tx.update)(grads, tx.init(grads))
  for leaf in jax.tree.leaves(updates):
    assert not np.isnan(np.asarray(leaf, np.float32)).any()
    np.testing.assert_array_equal(np.asarray(leaf, np.float32), 0)


class _ScannedAdder(nn.Module):
  """Three AdderConv layers stacked by nn.scan (one leaf, leading axis 3)."""

  @nn.compact
  def __call__(self, x):
    block = nn.scan(lambda mdl, c, _: (layers.AdderConv(4, (3, 3))(c), None),
                    variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    return block(self, x, None)[0]


def test_layers_stacked_by_scan_get_one_norm_each(caplog):
  """nn.scan stacks its layers' filters in one leaf: one norm over it gave
  each layer an update in proportion to its own gradient (measured ratios
  0.17 / 0.54 / 1.64 of the paper's norm). layer_axes=0 takes one norm per
  layer, equal to the unrolled layers'; make_optimizer warns without it."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  model = _ScannedAdder()
  params = model.init(jax.random.key(0), x)["params"]
  grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2 *
                                     jnp.arange(4.0)))(params)
  stacked = grads["AdderConv_0"]["adder_kernel"]
  assert stacked.shape == (3, 3, 3, 4, 4)
  per_layer = [np.asarray(stacked[i], np.float64) for i in range(3)]
  norms = [np.linalg.norm(g) for g in per_layer]
  assert max(norms) > 1.2 * min(norms)  # a single norm would show

  tx = optax.masked(optim.scale_by_adaptive_lr(0.2, layer_axes=0),
                    optim.adder_mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params))
  got = np.asarray(updates["AdderConv_0"]["adder_kernel"])
  for i, g in enumerate(per_layer):
    np.testing.assert_allclose(got[i], g / norms[i] * 0.2 * math.sqrt(g.size),
                               rtol=2e-5, atol=1e-7)
  # A function choosing per leaf does the same.
  by_path = optim.scale_by_adaptive_lr(
      0.2, layer_axes=lambda path, leaf: 0 if leaf.ndim == 5 else None)
  again, _ = by_path.update(grads, by_path.init(grads))
  np.testing.assert_allclose(
      again["AdderConv_0"]["adder_kernel"], got, rtol=1e-6)

  caplog.clear()
  with caplog.at_level("WARNING", logger="addernet_jax.optim"):
    optim.make_optimizer(_config(), params, 7)
  assert "['AdderConv_0']['adder_kernel'] (3, 3, 3, 4, 4)" in (
      caplog.text) and "layer_axes=0" in caplog.text, caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="addernet_jax.optim"):
    optim.make_optimizer(_config(), params, 7, layer_axes=0)
    optim.make_optimizer(_config(), _params(), 7)
  assert not caplog.text, caplog.text

  for axes, message in ((5, "layer_axes 5 does not fit"),
                        ((0, 1, 2, 3, 4), "leaves no filter axis")):
    bad = optim.scale_by_adaptive_lr(0.2, layer_axes=axes)
    with pytest.raises(ValueError, match=message + r".*AdderConv_0"):
      bad.update(grads, bad.init(grads))


def test_make_optimizer_layer_axes_leave_unstacked_filters_whole():
  """A model mixing a scanned stack and a plain adder layer: an int
  layer_axes split the plain (3, 3, cin, cout) filter into kernel rows (norm
  0.9 made of rows of 0.52 instead of 1.2). In make_optimizer it applies to
  stacked filters only (rank other than 4 and 2)."""
  rng = np.random.default_rng(4)
  grads = {"stack": {"adder_kernel": jnp.asarray(
               rng.normal(size=(3, 3, 3, 4, 4)) * [[[[[1.0]]]], [[[[3.0]]]],
                                                    [[[[9.0]]]]], jnp.float32)},
           "plain": {"adder_kernel": jnp.asarray(
               rng.normal(size=(3, 3, 4, 4)), jnp.float32)},
           "fc": {"adder_kernel": jnp.asarray(rng.normal(size=(4, 10)),
                                              jnp.float32)}}
  config = _config(weight_decay=0.0, momentum=0.0)
  lr = float(optim.learning_rate_schedule(config, 7)(0))
  tx = optim.make_optimizer(config, grads, 7, layer_axes=0)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  norm = lambda a: float(np.linalg.norm(np.asarray(a, np.float64)))
  for i in range(3):
    assert norm(updates["stack"]["adder_kernel"][i]) / lr == pytest.approx(
        0.2 * math.sqrt(144), rel=1e-5)
  assert norm(updates["plain"]["adder_kernel"]) / lr == pytest.approx(
      0.2 * math.sqrt(144), rel=1e-5)
  assert norm(updates["fc"]["adder_kernel"]) / lr == pytest.approx(
      0.2 * math.sqrt(40), rel=1e-5)


def test_make_optimizer_layer_axes_keep_each_unstacked_filters_direction():
  """The test above compares norms only: a dense (rank-2) filter split into
  per-row norms has the same total norm (rows of 0.2 sqrt(10) add up to
  0.2 sqrt(40)) but another direction. The whole update is compared here."""
  rng = np.random.default_rng(4)
  grads = {"stack": {"adder_kernel": jnp.asarray(
               rng.normal(size=(3, 3, 3, 4, 4)), jnp.float32)},
           "plain": {"adder_kernel": jnp.asarray(
               rng.normal(size=(3, 3, 4, 4)), jnp.float32)},
           "fc": {"adder_kernel": jnp.asarray(
               rng.normal(size=(4, 10)) * [[1.0], [3.0], [9.0], [0.1]],
               jnp.float32)}}
  config = _config(weight_decay=0.0, momentum=0.0)
  lr = float(optim.learning_rate_schedule(config, 7)(0))
  tx = optim.make_optimizer(config, grads, 7, layer_axes=0)
  updates, _ = tx.update(grads, tx.init(grads), grads)
  expected = lambda g: -lr * g / np.linalg.norm(g) * 0.2 * math.sqrt(g.size)
  for name in ("plain", "fc"):
    g = np.asarray(grads[name]["adder_kernel"], np.float64)
    np.testing.assert_allclose(np.asarray(updates[name]["adder_kernel"]),
                               expected(g), rtol=1e-5, atol=1e-7)
  for i in range(3):
    g = np.asarray(grads["stack"]["adder_kernel"][i], np.float64)
    np.testing.assert_allclose(np.asarray(updates["stack"]["adder_kernel"][i]),
                               expected(g), rtol=1e-5, atol=1e-7)


def test_a_dense_adder_filter_draws_no_stacked_layer_warning(caplog):
  """A rank-2 (dense) adder filter is a plain layer, not a scanned stack:
  warning that it needs layer_axes passed every test."""
  params = {"fc": {"adder_kernel": jnp.zeros((84, 10))},
            "conv": {"adder_kernel": jnp.zeros((3, 3, 4, 4))}}
  with caplog.at_level("WARNING", logger="addernet_jax.optim"):
    optim.make_optimizer(_config(num_epochs=3), params, 7)
  assert not caplog.text, caplog.text


@pytest.mark.parametrize("layer_axes", [True, 1.0, "0", (0, 1.5)])
def test_layer_axes_of_the_wrong_type_are_refused_at_once(layer_axes):
  """Were accepted (True as axis 1) or failed at the first update with
  "'float' object is not iterable"."""
  with pytest.raises(TypeError, match="layer_axes must be None, an int, a "
                     "sequence of ints or a function"):
    optim.scale_by_adaptive_lr(0.2, layer_axes=layer_axes)
  with pytest.raises(TypeError, match="layer_axes must be"):
    optim.make_optimizer(_config(), _params(), 7, layer_axes=layer_axes)
  injected = optax.inject_hyperparams(optim.scale_by_adaptive_lr)
  with pytest.raises(TypeError, match=r"static_args=\('layer_axes',\)"):
    injected(eta=0.2, layer_axes=0).init(_params())
  tx = optax.inject_hyperparams(optim.scale_by_adaptive_lr,
                                static_args=("layer_axes",))(eta=0.2,
                                                             layer_axes=-1)
  filters = {"adder_kernel": _params()["layer1_0"]["conv1"]["adder_kernel"]}
  out, _ = tx.update(filters, tx.init(filters))
  per_output = np.linalg.norm(np.asarray(out["adder_kernel"]).reshape(-1, 7),
                              axis=0)
  np.testing.assert_allclose(per_output, 0.2 * math.sqrt(45), rtol=1e-5)


def test_infinite_and_python_float_gradients():
  """An infinite entry: NaN there, 0 elsewhere (as the docstring says); a
  Python float leaf is taken as an array."""
  tx = optim.scale_by_adaptive_lr(0.2)
  out, _ = tx.update({"g": jnp.asarray([1.0, np.inf, 2.0])}, tx.init(None))
  np.testing.assert_array_equal(np.asarray(out["g"]), [0.0, np.nan, 0.0])
  out, _ = tx.update({"g": 3.0}, tx.init(None))
  np.testing.assert_allclose(np.asarray(out["g"]), 0.2, rtol=1e-6)


def test_bfloat16_keeps_dtype():
  g = {"adder_kernel": jnp.asarray(
      np.random.default_rng(1).normal(size=(3, 5, 2)), jnp.bfloat16)}
  out, _ = optim.scale_by_adaptive_lr(0.2).update(g, optim.ScaleByAdaptiveLRState())
  assert out["adder_kernel"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(out["adder_kernel"], np.float64)),
      0.2 * math.sqrt(30), rtol=1e-2)


def test_bfloat16_norm_is_taken_in_float32():
  """The norm must be taken in float32 whatever the gradient's dtype (the
  dtype test above allows 1% off): each bfloat16 entry is the float32
  rescaled value rounded once."""
  rng = np.random.default_rng(0)
  g32 = rng.normal(size=(64, 3, 3, 64)).astype(np.float32)
  g = {"adder_kernel": jnp.asarray(g32, jnp.bfloat16)}
  out, _ = optim.scale_by_adaptive_lr(0.2).update(
      g, optim.ScaleByAdaptiveLRState())
  gb = np.asarray(g["adder_kernel"], np.float64)
  want = gb / np.linalg.norm(gb) * 0.2 * math.sqrt(gb.size)
  got = np.asarray(out["adder_kernel"], np.float64)
  # One bf16 rounding per entry (<= 2**-9 relative); on the norm it averages
  # out far below the 2**-9 a bf16 factor would add to every entry.
  np.testing.assert_allclose(np.linalg.norm(got), np.linalg.norm(want),
                             rtol=2e-4)
  np.testing.assert_allclose(got, want, rtol=2**-8, atol=0)


def _official_lr(epoch: int, lr0: float = 0.1, total: float = 400) -> float:
  return lr0 / 2 * (1 + math.cos(epoch / total * math.pi))


def test_schedule_matches_official_at_epoch_boundaries():
  # The official loop: epochs 1..399 of a 400-epoch cosine = num_epochs=399.
  spe = 7
  schedule = optim.learning_rate_schedule(_config(num_epochs=399), spe)
  for epoch in (1, 2, 3, 100, 200, 398, 399):  # official epochs
    first, last = (epoch - 1) * spe, epoch * spe - 1
    for step in (first, last):
      np.testing.assert_allclose(float(schedule(step)), _official_lr(epoch),
                                 rtol=1e-6, atol=1e-9)
  assert float(schedule(0)) == pytest.approx(0.05 * (1 + math.cos(math.pi /
                                                                   400)))
  # Past the end the rate stays at the last epoch's (never negative).
  assert float(schedule(10_000 * spe)) == pytest.approx(_official_lr(399),
                                                      rel=1e-4)
  # jit-able with a traced count
  np.testing.assert_allclose(float(jax.jit(schedule)(jnp.int32(spe))),
                             _official_lr(2), rtol=1e-6)


@pytest.mark.parametrize("num_epochs", [1, 2, 3, 50])
def test_schedule_every_epoch_of_the_run_trains(num_epochs):
  """A run of N epochs trains N epochs at a non-zero rate (an N-epoch cosine
  would put the last epoch at cos(pi/2) = 0: a 1-epoch run would not learn)."""
  spe = 4
  schedule = optim.learning_rate_schedule(_config(num_epochs=num_epochs), spe)
  rates = [float(schedule(s)) for s in range(num_epochs * spe)]
  assert min(rates) > 0
  for step, rate in enumerate(rates):
    np.testing.assert_allclose(
        rate, _official_lr(step // spe + 1, total=num_epochs + 1), rtol=1e-5)
  assert all(a >= b for a, b in zip(rates, rates[1:]))
  if num_epochs == 1:
    np.testing.assert_allclose(rates[0], 0.05, rtol=1e-6)


def test_schedule_num_train_steps_override():
  spe = 5
  schedule = optim.learning_rate_schedule(_config(num_train_steps=20), spe)
  # 20 steps = 4 epochs of a 5-epoch cosine, like 399 of 400.
  for step in range(20):
    np.testing.assert_allclose(float(schedule(step)),
                               _official_lr(step // spe + 1, total=5),
                               rtol=1e-6)
  short = optim.learning_rate_schedule(_config(num_train_steps=3), 100)
  # a run shorter than an epoch: epoch 1 of a 2-epoch cosine
  np.testing.assert_allclose(float(short(2)), 0.05, rtol=1e-6)
  partial = optim.learning_rate_schedule(_config(num_train_steps=21), spe)
  np.testing.assert_allclose(float(partial(20)), _official_lr(5, total=6),
                             rtol=1e-6)


def _numpy_reference(params, grads_seq, lrs, eta, momentum, wd):
  """PyTorch SGD(momentum, weight_decay) with the official adder backward
  scaling, in float64 (torch.optim.SGD: d = g + wd*p; buf = m*buf + d, buf=d
  on the first step; p -= lr * buf)."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {}
  for grads, lr in zip(grads_seq, lrs):
    for k in p:
      g = np.asarray(grads[k], np.float64)
      if k.endswith("adder_kernel"):
        g = g / max(np.linalg.norm(g), 1e-12) * math.sqrt(g.size) * eta
      d = g + wd * p[k]
      buf[k] = d if k not in buf else momentum * buf[k] + d
      p[k] = p[k] - lr * buf[k]
  return p


def test_make_optimizer_matches_pytorch_sgd_reference():
  params = _params(3)
  config = _config()
  spe = 2  # three steps cross an epoch boundary: the rate changes
  tx = optim.make_optimizer(config, params, steps_per_epoch=spe)
  state = tx.init(params)
  rng = np.random.default_rng(7)
  flat_params = {"/".join(k): v for k, v in
                 traverse_util.flatten_dict(params).items()}
  grads_seq = [{k: rng.normal(size=v.shape) * 3 for k, v in flat_params.items()}
               for _ in range(3)]
  step = jax.jit(tx.update)
  current = params
  for grads in grads_seq:
    tree = traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v, jnp.float32)
         for k, v in grads.items()})
    updates, state = step(tree, state, current)
    current = optax.apply_updates(current, updates)
  lrs = [_official_lr(s // spe + 1) for s in range(3)]
  want = _numpy_reference(flat_params, grads_seq, lrs, 0.2, 0.9, 5e-4)
  got = {"/".join(k): np.asarray(v) for k, v in
         traverse_util.flatten_dict(current).items()}
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                               err_msg=key)
  # and the adaptive rate mattered: without it the adder filters differ
  plain = _numpy_reference(
      {k: v for k, v in flat_params.items()}, grads_seq, lrs, 0.0, 0.9, 5e-4)
  assert not np.allclose(plain["layer1_0/conv1/adder_kernel"],
                         got["layer1_0/conv1/adder_kernel"], atol=1e-3)


def test_make_optimizer_config_errors():
  with pytest.raises(ValueError, match="optimizer must be 'sgd'"):
    optim.make_optimizer(_config(optimizer="adam"), _params(), 3)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    optim.make_optimizer(_config(), _params())
  with pytest.raises(ValueError, match="steps_per_epoch must be"):
    optim.make_optimizer(_config(), _params(), 0)
  # steps_per_epoch from the config
  cfg = _config(steps_per_epoch=4)
  tx = optim.make_optimizer(cfg, _params())
  tx.update(_params(), tx.init(_params()), _params())


@pytest.mark.parametrize("key,value,message", [
    ("momentum", None, "config has no 'momentum'.*official value is 0.9"),
    ("weight_decay", None, "config has no 'weight_decay'"),
    ("momentum", 1.0, r"config.momentum=1.0 must be a number >= 0 and < 1"),
    ("momentum", "0.9", "config.momentum='0.9' must be a number"),
    ("weight_decay", -1e-4, "config.weight_decay=-0.0001 must be a number"),
    ("weight_decay", float("inf"), "config.weight_decay=inf must be"),
    # found by using it: each was accepted (a negative or NaN rate trains
    # backwards or to NaN) or failed with an error naming no field
    ("learning_rate", -0.1, r"config.learning_rate=-0.1 must be a number > "
     r"0 \(finite\)"),
    ("learning_rate", float("nan"), "config.learning_rate=nan must be"),
    ("learning_rate", "0.1", "config.learning_rate='0.1' must be a number"),
    ("learning_rate", optax.constant_schedule(0.1),
     "build the optax chain yourself"),
    ("eta", -1.0, "config.eta=-1.0 must be a number >= 0"),
    ("num_epochs", "2", "config.num_epochs='2' must be a number"),
    ("num_epochs", 2.5, "config.num_epochs=2.5 must be a whole number"),
    ("adaptive_lr", "false", "config.adaptive_lr='false' must be True or "
     "False"),
])
def test_make_optimizer_refuses_missing_or_bad_momentum_and_decay(
    key, value, message):
  """A config without momentum trained silently without it (the official
  0.9); a missing field must be named, 0 is the way to switch it off."""
  config = dict(_config())
  if value is None:
    del config[key]
  else:
    config[key] = value
  with pytest.raises(ValueError, match=message):
    optim.make_optimizer(config, _params(), 3)
  if key in ("momentum", "weight_decay"):
    config[key] = 0
    optim.make_optimizer(config, _params(), 3)  # 0 switches it off


def test_make_optimizer_takes_numpy_and_jax_scalars():
  config = {**_config().to_dict(), "learning_rate": np.float32(0.1),
            "momentum": jnp.float32(0.9), "weight_decay": jnp.asarray(5e-4),
            "num_epochs": np.int64(400)}
  np.testing.assert_array_equal(
      optim.learning_rate_schedule(config, np.int64(7))(30),
      optim.learning_rate_schedule(config, 7)(30))
  got = optim.make_optimizer(config, _params(), np.int64(7))
  want = optim.make_optimizer(_config(), _params(), 7)
  grads = jax.tree.map(lambda p: p * 2.0, _params())
  chex.assert_trees_all_close(
      got.update(grads, got.init(_params()), _params())[0],
      want.update(grads, want.init(_params()), _params())[0], rtol=1e-6)
  with pytest.raises(ValueError, match="steps_per_epoch must be a positive "
                     "int, got 2.5"):
    optim.make_optimizer(_config(), _params(), 2.5)


def test_adaptive_lr_disabled():
  params = _params()
  grads = jax.tree.map(lambda p: p * 2.0, params)
  for config in (_config(eta=0.0), _config(adaptive_lr=False)):
    tx = optim.make_optimizer(config, params, 3)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = _official_lr(1)
    got = np.asarray(updates["layer1_0"]["conv1"]["adder_kernel"])
    want = -lr * (np.asarray(grads["layer1_0"]["conv1"]["adder_kernel"])
                  + 5e-4 * np.asarray(params["layer1_0"]["conv1"]
                                      ["adder_kernel"]))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adder_mask_on_nnx_state():
  """`nnx.state`/`nnx.split`/`nnx.grad` keep arrays in Variables (path
  `... adder_kernel .value`): the mask selected nothing, so a hand-built
  NNX training loop silently trained without the adaptive learning rate."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Mult(nnx.Module):  # as nnx.Conv's parameters (cheaper to build)
    def __init__(self):
      self.kernel = nnx.Param(jnp.asarray(
          np.random.default_rng(1).normal(size=(3, 3, 2, 3)), jnp.float32))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = Mult()
      self.adder = layers.AdderConvNNX(3, 4, 3, rngs=rngs)

  _, params = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  # Gradients have the parameters' structure (as `jax.grad` of a function
  # of `params` returns).
  grads = jax.tree.map(lambda p: p * 3.0 - 1.0, params)
  mask = optim.adder_mask(grads)
  assert [v for v in jax.tree.leaves(mask)].count(True) == 1
  tx = optax.masked(optim.scale_by_adaptive_lr(0.2), optim.adder_mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  g = np.asarray(grads["adder"]["adder_kernel"][...], np.float64)
  np.testing.assert_allclose(
      updates["adder"]["adder_kernel"][...],
      g / np.linalg.norm(g) * 0.2 * math.sqrt(g.size), rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(updates["conv"]["kernel"][...],
                                grads["conv"]["kernel"][...])


def test_eta_through_inject_hyperparams_under_jit():
  """`optax.inject_hyperparams` (the Optax way to schedule eta) passes eta
  as a traced array: `float(eta)` raised a ConcretizationTypeError."""
  grads = {"a": {"adder_kernel": _params()["layer1_0"]["conv1"]["adder_kernel"]}}
  tx = optax.inject_hyperparams(optim.scale_by_adaptive_lr)(
      eta=optax.linear_schedule(0.3, 0.1, 2))
  state = tx.init(grads)
  step = jax.jit(tx.update)
  g = np.asarray(grads["a"]["adder_kernel"], np.float64)
  for eta in (0.3, 0.2, 0.1):
    updates, state = step(grads, state)
    np.testing.assert_allclose(
        updates["a"]["adder_kernel"],
        g / np.linalg.norm(g) * eta * math.sqrt(g.size), rtol=1e-5)


def test_a_zero_gradient_stays_zero_with_a_scheduled_eta():
  """Through optax.inject_hyperparams eta is traced: that branch must clamp
  the norm too (without it an unused layer's zero gradient gives NaN, and
  every test passed)."""
  grads = {"adder_kernel": jnp.zeros((3, 3, 2, 4), jnp.float32)}
  tx = optax.inject_hyperparams(optim.scale_by_adaptive_lr)(
      eta=optax.linear_schedule(0.3, 0.1, 2))
  out, _ = jax.jit(tx.update)(grads, tx.init(grads))
  np.testing.assert_array_equal(np.asarray(out["adder_kernel"]), 0.0)


def test_bad_eta_raises_clear_error():
  with pytest.raises(ValueError, match="eta must be a finite number >= 0, "
                     "got -0.2"):
    optim.scale_by_adaptive_lr(-0.2)
  with pytest.raises(TypeError, match="inject_hyperparams"):
    optim.scale_by_adaptive_lr(optax.constant_schedule(0.2))


def test_eta_defaults_to_the_papers():
  """A config without `eta` gets the paper's 0.2 (the updates equal those of
  eta=0.2 and differ from eta=0.1)."""
  params = _params()
  grads = jax.tree.map(lambda p: p * 3.0 + 0.5, params)

  def first_update(config):
    tx = optim.make_optimizer(config, params, 3)
    return tx.update(grads, tx.init(params), params)[0]

  config = _config()
  del config["eta"]
  default = first_update(config)
  chex.assert_trees_all_close(default, first_update(_config(eta=0.2)),
                              rtol=0, atol=0)
  other = first_update(_config(eta=0.1))
  assert not np.allclose(default["layer1_0"]["conv1"]["adder_kernel"],
                         other["layer1_0"]["conv1"]["adder_kernel"])
