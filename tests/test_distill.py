"""PKKD (addernet_jax.distill): the kernel maps, the distances, the loss
against a float64 hand computation, the config checks, and one tiny
end-to-end run on 2 devices (train.py) that resumes bit-identically and
whose student eval.py evaluates."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from addernet_jax import distill
from addernet_jax import models
from addernet_jax import train_lib

ROOT = Path(__file__).resolve().parents[1]
SMOKE = "configs/smoke.py"


def _x64():
  """float64 for a block (jax.enable_x64 from JAX 0.8)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top
  return enable_x64()


# ------------------------------------------------------------- kernels --


def test_kernel_map_is_in_0_1_and_decreasing():
  rng = np.random.default_rng(0)
  d = jnp.asarray(rng.uniform(500, 600, size=(4, 3, 3, 5)), jnp.float32)
  k = distill.kernel_map(d, sigma_scale=1.0)
  assert k.shape == d.shape and bool(jnp.all(k > 0)) and bool(jnp.all(k <= 1))
  # Per channel: larger distance -> smaller value.
  flat_d = np.asarray(d).reshape(-1, 5)
  flat_k = np.asarray(k).reshape(-1, 5)
  for c in range(5):
    order = np.argsort(flat_d[:, c])
    assert np.all(np.diff(flat_k[order, c]) <= 0)
  # 1 at the channel's closest pair, exp(-1 / sigma_scale) one standard
  # deviation farther.
  np.testing.assert_allclose(flat_k.max(0), 1.0)
  np.testing.assert_allclose(
      np.asarray(distill.normalized_kernel(
          jnp.asarray(flat_d.min(0) + flat_d.std(0)),
          jnp.asarray(flat_d.std(0)), jnp.asarray(flat_d.min(0)))),
      np.exp(-1.0), rtol=1e-5)


def test_kernel_map_ignores_the_scale_and_offset_of_the_distances():
  """Bandwidth = spread, centre = minimum: adder outputs in the thousands and
  CNN distances of order one map alike (docs/pkkd.md)."""
  with _x64():
    rng = np.random.default_rng(1)
    d = jnp.asarray(rng.uniform(0, 3, size=(6, 4)))
    k = distill.kernel_map(d, 2.0)
    np.testing.assert_allclose(np.asarray(distill.kernel_map(
        1000.0 + 37.0 * d, 2.0)), np.asarray(k), rtol=1e-10)
    # Wider bandwidth, flatter map.
    assert float(jnp.std(distill.kernel_map(d, 4.0))) < float(jnp.std(k))


def test_feature_loss_gradient_has_no_shift_or_scale_component():
  """The map depends only on the standardised distances: the gradient of a
  loss on it is orthogonal, per filter, to a uniform shift of the distances
  and to their scaling (the statistics are differentiated; held constant,
  the feature loss pushed every filter's distances as a whole)."""
  with _x64():
    rng = np.random.default_rng(4)
    d = jnp.asarray(rng.uniform(800, 900, size=(3, 5, 5, 4)))
    target = jnp.asarray(rng.uniform(0, 1, size=d.shape))
    grad = jax.grad(lambda v: jnp.mean(jnp.square(
        distill.kernel_map(v, 1.0) - target)))(d)
    scale = float(jnp.max(jnp.abs(jnp.sum(jnp.abs(grad), axis=(0, 1, 2)))))
    assert scale > 0
    shift = jnp.sum(grad, axis=(0, 1, 2))
    stretch = jnp.sum(grad * d, axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(shift), 0, atol=1e-9 * scale)
    np.testing.assert_allclose(np.asarray(stretch), 0, atol=1e-9 * scale * 900)


def test_normalized_kernel_is_the_laplace_and_gaussian_kernel():
  with _x64():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(7, 9))
    f = rng.normal(size=(9,))
    l1 = np.abs(x - f).sum(-1)
    l2sq = np.square(x - f).sum(-1)
    sigma = 3.0
    # Laplace exp(-|x-f|_1 / sigma), normalised at 0: the kernel itself.
    np.testing.assert_allclose(
        np.asarray(distill.normalized_kernel(jnp.asarray(l1), sigma, 0.0)),
        np.exp(-l1 / sigma), rtol=1e-12)
    # Gaussian exp(-|x-f|^2 / (2 sigma^2)): bandwidth 2 sigma^2.
    np.testing.assert_allclose(
        np.asarray(distill.normalized_kernel(jnp.asarray(l2sq),
                                             2 * sigma**2, 0.0)),
        np.exp(-l2sq / (2 * sigma**2)), rtol=1e-12)
    # Normalising at c divides by the kernel's value at c.
    c = 4.0
    np.testing.assert_allclose(
        np.asarray(distill.normalized_kernel(jnp.asarray(l1), sigma, c)),
        np.exp(-l1 / sigma) / np.exp(-c / sigma), rtol=1e-12)
    # The exponent is clipped above: no overflow.
    big = distill.normalized_kernel(jnp.asarray([-1e6]), 1.0, 0.0)
    assert float(big[0]) == pytest.approx(np.exp(distill.MAX_EXPONENT))


def _brute_sq_distance(x, w, stride, pad):
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw, _, cout = w.shape
  n, hp, wp, _ = xp.shape
  ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  out = np.zeros((n, ho, wo, cout))
  for p in range(ho):
    for q in range(wo):
      patch = xp[:, p * stride:p * stride + kh, q * stride:q * stride + kw, :]
      out[:, p, q, :] = np.square(patch[..., None] - w[None]).sum((1, 2, 3))
  return out


@pytest.mark.parametrize("stride,pad", [(1, ((1, 1), (1, 1))),
                                        (2, ((0, 0), (0, 0)))])
def test_squared_l2_distance_of_a_convolution(stride, pad):
  with _x64():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 6, 6, 3))
    w = rng.normal(size=(3, 3, 3, 4))
    dot = lax.conv_general_dilated(
        jnp.asarray(x), jnp.asarray(w), (stride, stride), pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    got = distill.squared_l2_distance(jnp.asarray(x), jnp.asarray(w), dot,
                                      strides=(stride, stride), padding=pad)
    np.testing.assert_allclose(np.asarray(got),
                               _brute_sq_distance(x, w, stride, pad),
                               rtol=1e-10, atol=1e-10)
    # Dense: (in, out) filters.
    xd, wd = rng.normal(size=(5, 7)), rng.normal(size=(7, 3))
    got = distill.squared_l2_distance(jnp.asarray(xd), jnp.asarray(wd),
                                      jnp.asarray(xd @ wd))
    np.testing.assert_allclose(
        np.asarray(got), np.square(xd[:, :, None] - wd[None]).sum(1),
        rtol=1e-10)


# -------------------------------------------------------------- the loss --


def _np_kernel_map(d, scale):
  axes = tuple(range(d.ndim - 1))
  low, std = d.min(axes), d.std(axes)
  return np.exp((low - d) / (scale * std))


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_pkkd_student_loss_matches_a_float64_hand_computation():
  rng = np.random.default_rng(4)
  logits, t_logits = rng.normal(size=(4, 3)), rng.normal(size=(4, 3)) * 2
  labels = np.array([0, 2, 1, 2])
  # Two layers: an adder conv output (L1 distances, in the hundreds) and
  # a dense one; the teacher's squared L2 distances; 1x1 transformations.
  d_a = {"a": rng.uniform(300, 320, size=(4, 2, 2, 3)),
         "b": rng.uniform(10, 20, size=(4, 2))}
  d_c = {"a": rng.uniform(0, 5, size=(4, 2, 2, 3)),
         "b": rng.uniform(0, 9, size=(4, 2))}
  mats = {"a": np.eye(3) + 0.1 * rng.normal(size=(3, 3)),
          "b": np.eye(2) + 0.1 * rng.normal(size=(2, 2))}
  scale, temp = 1.5, 3.0
  w_ce, w_kd, w_feat, ramp = 0.7, 0.4, 2.0, 0.5

  # By hand, in numpy float64.
  g = {k: _np_kernel_map(v, scale) for k, v in d_a.items()}
  h = {k: _np_kernel_map(v, scale) @ mats[k] for k, v in d_c.items()}
  feat = np.mean([np.mean((g[k] - h[k])**2) for k in ("a", "b")])
  ce = -np.mean(_np_log_softmax(logits)[np.arange(4), labels])
  ls, lt = _np_log_softmax(logits / temp), _np_log_softmax(t_logits / temp)
  kd = temp**2 * np.mean((np.exp(lt) * (lt - ls)).sum(-1))
  expected = w_ce * ce + ramp * (w_kd * kd + w_feat * feat)

  with _x64():
    g_j = {k: distill.kernel_map(jnp.asarray(v), scale)
           for k, v in d_a.items()}
    h_j = {k: distill.linear_transform(
        distill.kernel_map(jnp.asarray(v), scale), jnp.asarray(mats[k]))
           for k, v in d_c.items()}
    total, parts = distill.pkkd_student_loss(
        jnp.asarray(logits), jnp.asarray(t_logits), jnp.asarray(labels),
        g_j, h_j, ce_weight=w_ce, kd_weight=w_kd, feature_weight=w_feat,
        temperature=temp, ramp=ramp)
    assert total.dtype == jnp.float64
  np.testing.assert_allclose(float(parts["ce"]), ce, rtol=1e-12)
  np.testing.assert_allclose(float(parts["kd"]), kd, rtol=1e-12)
  np.testing.assert_allclose(float(parts["feature"]), feat, rtol=1e-12)
  np.testing.assert_allclose(float(total), expected, rtol=1e-12)


def test_output_distillation_is_zero_for_equal_outputs():
  z = jnp.asarray(np.random.default_rng(5).normal(size=(3, 10)), jnp.float32)
  assert float(distill.soft_distillation_loss(z, z, 4.0)) == pytest.approx(
      0.0, abs=1e-6)
  assert float(distill.soft_distillation_loss(z, -z, 4.0)) > 0


def test_distill_ramp():
  assert float(distill.distill_ramp(0, 0)) == 1.0
  assert float(distill.distill_ramp(0, 4)) == pytest.approx(0.25)
  assert float(distill.distill_ramp(3, 4)) == 1.0
  assert float(distill.distill_ramp(100, 4)) == 1.0


# ------------------------------------------------- layers and settings --


def test_student_and_teacher_expose_the_same_layers():
  """The interceptor finds the adder layers of the student and the same
  layers, multiplication ones, in the CNN; the stem is never distilled."""
  x = jnp.zeros((2, 8, 8, 3))
  student = models.get_model("resnet20", num_classes=10, conv="adder")
  teacher = models.get_model("resnet20", num_classes=10, conv="mult")
  s_vars = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), x))
  channels = distill.distilled_layers(student.apply, s_vars, x, ("*",))
  assert len(channels) == 18 + 2  # 18 3x3 layers and 2 projections
  assert "conv1" not in channels and channels["layer3_0/conv1"] == 64
  assert "layer2_0/downsample_conv" in channels
  only = distill.distilled_layers(student.apply, s_vars, x,
                                  ("layer3_*/conv2",))
  assert sorted(only) == ["layer3_0/conv2", "layer3_1/conv2",
                          "layer3_2/conv2"]
  t_vars = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), x))

  def taps(v):
    _, _, t = distill.apply_with_taps(
        teacher.apply, v, x, train=False, mutable=(),
        select=lambda k, m: isinstance(m, distill.MULT_LAYERS)
        and k in channels)
    return {k: tap["output"] for k, tap in t.items()}

  assert set(jax.eval_shape(taps, t_vars)) == set(channels)
  params = distill.identity_transforms(channels)
  assert params["layer3_0"]["conv1"]["kernel"].shape == (64, 64)
  np.testing.assert_array_equal(
      np.asarray(params["layer1_0"]["conv2"]["kernel"]), np.eye(16))


def _smoke(**overrides):
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.distill = "pkkd"
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


@pytest.mark.parametrize("overrides,needle", [
    ({"distill": "pkdd"}, "config.distill"),
    ({"conv": "mult"}, "config.conv must be 'adder'"),
    ({"pkkd.temperature": 0.0}, "config.pkkd.temperature"),
    ({"pkkd.kd_weight": -1.0}, "config.pkkd.kd_weight"),
    ({"pkkd.layers": " "}, "config.pkkd.layers"),
    ({"pkkd.warmup_epochs": -2.0}, "config.pkkd.warmup_epochs"),
    ({"pkkd.warmup_epochs": float("nan")}, "config.pkkd.warmup_epochs"),
    # A teacher rate of 0 or NaN was named as config.learning_rate.
    ({"pkkd.teacher_learning_rate": 0.0}, "config.pkkd.teacher_learning_rate"),
    ({"pkkd.teacher_learning_rate": float("nan")},
     "config.pkkd.teacher_learning_rate"),
    ({"pkkd.teacher_weight_decay": float("inf")},
     "config.pkkd.teacher_weight_decay"),
    ({"pkkd.teacher_weight_decay": -1e-4}, "config.pkkd.teacher_weight_decay"),
    ({"pkkd.ce_weight": 0.0, "pkkd.kd_weight": 0.0,
      "pkkd.feature_weight": 0.0}, "are all 0: the student would learn"),
])
def test_bad_pkkd_config_is_a_clear_error(overrides, needle):
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
    train_lib.validate_config(_smoke(**overrides), 1)


def test_layer_patterns_that_match_nothing_are_named():
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  config = _smoke(**{"pkkd.layers": "layer9_*"})
  info = data_lib.dataset_info(config.dataset)
  with pytest.raises(ValueError, match="layer9_.*matches no adder layer"):
    jax.eval_shape(lambda k: train_lib.create_train_state(
        config, k, info.image_shape, steps_per_epoch=10),
                   jax.random.PRNGKey(0))
  # One idle pattern beside others that match (a BatchNorm's name) was
  # silently ignored.
  config = _smoke(**{"pkkd.layers": "fc*, bn1"})
  with pytest.raises(ValueError, match=r"pattern\(s\) \['bn1'\] match no "
                     "adder layer"):
    jax.eval_shape(lambda k: train_lib.create_train_state(
        config, k, info.image_shape, steps_per_epoch=10),
                   jax.random.PRNGKey(0))


def test_teacher_config_is_plain_sgd_of_the_recipe():
  config = _smoke(**{"pkkd.teacher_learning_rate": 0.05})
  t = distill.teacher_config(config)
  assert (t.conv, t.adaptive_lr, t.learning_rate) == ("mult", False, 0.05)
  assert (t.momentum, t.weight_decay) == (config.momentum,
                                          config.weight_decay)
  assert config.conv == "adder" and config.adaptive_lr  # unchanged


TWO_DEVICE_KERNEL = """
import jax, jax.numpy as jnp, numpy as np
from addernet_jax import distill, parallel
P = jax.sharding.PartitionSpec
assert jax.device_count() == 2
d = jnp.asarray(np.random.default_rng(0).uniform(0, 9, (6, 3, 3, 4)),
                jnp.float32)
mesh = parallel.make_mesh()
f = jax.jit(parallel.data_parallel(
    lambda x: distill.kernel_map(x, 1.5, parallel.BATCH_AXIS), mesh,
    in_specs=P(parallel.BATCH_AXIS), out_specs=P(parallel.BATCH_AXIS)))
np.testing.assert_allclose(np.asarray(f(d)),
                           np.asarray(distill.kernel_map(d, 1.5)), rtol=1e-5)
print("ok")
"""


def test_kernel_bandwidth_is_that_of_the_global_batch(jax_cache):
  """On 2 devices each half of the batch is mapped with the moments of the
  whole batch: the maps equal those of one device."""
  result = _run(jax_cache, "-c", TWO_DEVICE_KERNEL)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr


TWO_VS_ONE_DEVICE_STEP = """
import jax, numpy as np
from configs import smoke
from addernet_jax import data as data_lib, distill, eval_lib, parallel, train_lib
assert jax.device_count() == 2
config = smoke.get_config()
config.distill = "pkkd"
info = data_lib.dataset_info(config.dataset)
start = jax.device_get(train_lib.create_train_state(
    config, jax.random.PRNGKey(0), info.image_shape, steps_per_epoch=4))
core = train_lib.make_core(config, 4)
rng = np.random.default_rng(0)
batches = [(rng.standard_normal((8, *info.image_shape)).astype(np.float32),
            rng.integers(0, 10, 8).astype(np.int32)) for _ in range(3)]
ends = {}
for n in (2, 1):
  mesh = parallel.make_mesh(jax.devices()[:n])
  state = jax.device_put(start, parallel.replicated_sharding(mesh))
  step = train_lib.make_streaming_train_step(mesh, core)
  for x, y in batches:
    b = parallel.global_batch_from_local({"image": x, "label": y}, mesh)
    state, metrics = step(state, b["image"], b["label"])
  ends[n] = jax.device_get(
      {"params": state.params, "batch_stats": state.batch_stats,
       "teacher_params": state.teacher_params,
       "teacher_batch_stats": state.teacher_batch_stats,
       "metrics": metrics})
  if n == 2:  # student and teacher in one pass = each on its own
    student = eval_lib.Evaluator(train_lib.build_model(config), info, mesh, 8)
    teacher = eval_lib.Evaluator(train_lib.build_model(
        distill.teacher_config(config)), info, mesh, 8)
    stream = lambda: iter([{"image": x, "label": y, "mask": np.ones(8, bool)}
                           for x, y in batches])
    both = eval_lib.evaluate_stream_together(
        [(student, state.params, state.batch_stats),
         (teacher, state.teacher_params["model"],
          state.teacher_batch_stats)], stream())
    assert both[0] == student.evaluate_stream(state.params, state.batch_stats,
                                              stream()), both
    assert both[1] == teacher.evaluate_stream(
        state.teacher_params["model"], state.teacher_batch_stats,
        stream()), both
    assert both[0]["num_examples"] == 24 and both[0] != both[1], both
worst = {}
for path, a in jax.tree_util.tree_leaves_with_path(ends[2]):
  b = ends[1]
  for k in path:
    b = b[k.key]
  worst[jax.tree_util.keystr(path)] = float(
      np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))
assert len(worst) > 40, sorted(worst)
bad = {k: v for k, v in worst.items() if v > 1e-4}
assert not bad, bad
moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(
    jax.tree.leaves(ends[1]["teacher_params"]),
    jax.tree.leaves(start.teacher_params))]
assert max(moved) > 1e-3, moved
print("ok", max(worst.values()))
"""


@pytest.mark.extended  # for time; .ci/run runs it after the default suite
def test_pkkd_step_on_two_devices_equals_one_device(jax_cache):
  """Three PKKD steps (student, teacher, transformations, both BatchNorms)
  on a 2-device mesh equal those on 1 device up to float32 reduction order
  (the kernel bandwidths, BatchNorm statistics and gradients are those of
  the global batch); student and teacher evaluated in one pass over a
  stream equal each evaluated alone."""
  result = _run(jax_cache, "-c", TWO_VS_ONE_DEVICE_STEP)
  assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# ---------------------------------------------------------- end to end --


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jax_compilation_cache")


def _run(cache: Path, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=2"))
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1800)


def _last_json(result: subprocess.CompletedProcess) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _train(cache: Path, workdir: Path, *overrides: str) -> dict:
  return _last_json(_run(cache, "train.py", "--config", SMOKE,
                         f"--workdir={workdir}", "--config.progress_bar=false",
                         "--config.distill=pkkd",
                         "--config.recalibrate_bn_batches=0", *overrides))


def _saved_state(workdir: Path, num_train_steps: int) -> dict:
  """Both networks of the latest checkpoint, as numpy."""
  from addernet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  config = _smoke(num_train_steps=num_train_steps)
  info = data_lib.dataset_info(config.dataset)
  state = jax.eval_shape(lambda k: train_lib.create_train_state(
      config, k, info.image_shape, steps_per_epoch=89), jax.random.PRNGKey(0))
  rep = parallel.replicated_sharding(parallel.make_mesh())
  keys = ("step", "params", "batch_stats", "opt_state", "teacher_params",
          "teacher_batch_stats", "teacher_opt_state")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      {k: getattr(state, k) for k in keys})
  return jax.device_get(ckpt_lib.restore_for_eval(workdir, abstract))


@pytest.mark.slow
@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_pkkd_trains_on_two_devices_resumes_exactly_and_evaluates(
    jax_cache, tmp_path):
  full = _train(jax_cache, tmp_path / "full")  # 3 steps, saved at 2 and 3
  assert full["step"] == 3
  for key in ("train_loss", "train_teacher_loss", "train_teacher_top1",
              "train_kd_loss", "train_feature_loss", "train_distill_loss",
              "eval_top1", "eval_teacher_top1"):
    assert np.isfinite(full[key]), key
  assert full["train_feature_loss"] > 0
  # The same run stopped after its step-2 checkpoint: the same command
  # resumes from it (both networks, both optimizers) and ends bit-identical.
  shutil.copytree(tmp_path / "full", tmp_path / "part")
  shutil.rmtree(tmp_path / "part" / "checkpoints" / "3")
  resumed = _train(jax_cache, tmp_path / "part")
  assert resumed["step"] == 3
  for key in ("train_loss", "eval_loss", "eval_top1", "eval_teacher_top1"):
    assert resumed[key] == full[key], key
  a, b = _saved_state(tmp_path / "full", 3), _saved_state(tmp_path / "part", 3)
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  assert len(flat_a) > 40  # the teacher's parameters and optimizer too
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  # Rerun without distillation: the config, not a parameter shape, is named.
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="distill 'pkkd' in the checkpoint, "
                     "'none' in the config"):
    train_lib.train_and_evaluate(_smoke(distill="none"), tmp_path / "full")
  # eval.py evaluates the student of a PKKD checkpoint.
  result = _last_json(_run(jax_cache, "eval.py", "--config", SMOKE,
                           f"--checkpoint={tmp_path / 'full'}",
                           "--config.distill=pkkd"))
  assert result["step"] == 3 and result["num_examples"] == 40
  assert result["top1"] == pytest.approx(full["eval_top1"], abs=1e-6)
  assert result["loss"] == pytest.approx(full["eval_loss"], rel=1e-5)


def test_bad_distill_value_is_one_line_error(jax_cache, tmp_path):
  result = _run(jax_cache, "train.py", "--config", SMOKE,
                f"--workdir={tmp_path}", "--config.distill=kd")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "config.distill" in errors[0], result.stderr


def test_student_distances_are_the_l1_distances_of_the_adder_layer():
  """PKKD's kernel maps of an adder layer start from its L1 distances
  ||x - f||_1 (>= 0) for every patch and filter, against float64 NumPy."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from addernet_jax import layers  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      return layers.AdderConv(4, kernel_size=(3, 3), padding="VALID",
                              name="a")(x)

  x = np.random.default_rng(0).normal(size=(2, 5, 5, 3)).astype(np.float32)
  model = Net()
  variables = model.init(jax.random.key(0), x)
  _, _, taps = distill.apply_with_taps(model.apply, variables, x, train=False,
                                       mutable=(),
                                       select=lambda name, module: True)
  got = np.asarray(distill.student_distances(taps)["a"], np.float64)
  w = np.asarray(taps["a"]["kernel"], np.float64)  # HWIO
  want = np.zeros((2, 3, 3, 4))
  for i in range(3):
    for j in range(3):
      patch = x[:, i:i + 3, j:j + 3, :, None].astype(np.float64)
      want[:, i, j] = np.abs(patch - w).sum(axis=(1, 2, 3))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_pkkd_step_weighs_its_losses_and_teaches_the_cnn_from_labels_only():
  """One PKKD step on one device (no collectives): the student's total is
  ce_w CE + ramp (kd_w KD + feat_w feature) with the ramp of warmup_epochs *
  steps_per_epoch steps; the metrics are the student's CE and the teacher's
  training-mode CE and accuracy; the CNN's parameters move by its optimizer's
  update of the gradient of its cross-entropy alone (the KD and feature
  terms reach only the student and the linear transformations), and its
  BatchNorm statistics are those of its training-mode forward."""
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  w_ce, w_kd, w_feat, temp = 0.7, 0.4, 2.0, 3.0
  config = _smoke(**{"pkkd.ce_weight": w_ce, "pkkd.kd_weight": w_kd,
                     "pkkd.feature_weight": w_feat, "pkkd.temperature": temp,
                     "pkkd.warmup_epochs": 2.0})
  steps_per_epoch = 4
  settings = distill.settings_from_config(config, steps_per_epoch)
  assert settings.warmup_steps == 8  # 2 epochs of 4 steps
  info = data_lib.dataset_info(config.dataset)
  state = train_lib.create_train_state(config, jax.random.PRNGKey(0),
                                       info.image_shape,
                                       steps_per_epoch=steps_per_epoch)
  # Both networks without a BatchNorm axis: the step runs outside shard_map.
  state = state.replace(
      apply_fn=train_lib.build_model(config, bn_axis_name=None).apply,
      teacher_apply_fn=train_lib.build_model(
          distill.teacher_config(config), bn_axis_name=None).apply)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((8, *info.image_shape)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  new, m = jax.jit(distill.make_pkkd_core(settings, None))(state, x, y)
  m = {k: float(v) for k, v in m.items()}

  ramp = 1.0 / 8  # step 0 of an 8-step warm-up
  assert m["distill_loss"] == pytest.approx(
      w_ce * m["loss"] + ramp * (w_kd * m["kd_loss"]
                                 + w_feat * m["feature_loss"]), rel=1e-5)
  logits, _ = state.apply_fn({"params": state.params,
                              "batch_stats": state.batch_stats}, x,
                             train=True, mutable=["batch_stats"])
  assert m["loss"] == pytest.approx(float(distill.cross_entropy(logits, y)),
                                    rel=1e-5)

  def teacher_ce(params):
    t_logits, updates = state.teacher_apply_fn(
        {"params": params, "batch_stats": state.teacher_batch_stats}, x,
        train=True, mutable=["batch_stats"])
    return distill.cross_entropy(t_logits, y), (t_logits, updates)

  (t_ce, (t_logits, t_updates)), t_grad = jax.value_and_grad(
      teacher_ce, has_aux=True)(state.teacher_params["model"])
  assert m["teacher_loss"] == pytest.approx(float(t_ce), rel=1e-5)
  assert m["teacher_top1"] == pytest.approx(
      float(jnp.mean(jnp.argmax(t_logits, -1) == y)))
  assert m["kd_loss"] == pytest.approx(float(
      distill.soft_distillation_loss(logits, t_logits, temp)), rel=1e-4)
  for a, b in zip(jax.tree.leaves(new.teacher_batch_stats),
                  jax.tree.leaves(t_updates["batch_stats"]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)
  # The CNN moves by its optimizer's step on its own cross-entropy gradient
  # (elementwise SGD: the transformations' gradients do not touch it); the
  # transformations move too.
  zero = jax.tree.map(jnp.zeros_like, state.teacher_params["transform"])
  step, _ = state.teacher_tx.update({"model": t_grad, "transform": zero},
                                    state.teacher_opt_state,
                                    state.teacher_params)
  want = optax.apply_updates(state.teacher_params["model"], step["model"])
  for a, b in zip(jax.tree.leaves(new.teacher_params["model"]),
                  jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-7)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
      jax.tree.leaves(new.teacher_params["transform"]),
      jax.tree.leaves(state.teacher_params["transform"])))
