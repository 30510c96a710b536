"""eval.py: our checkpoints (latest and best) and the official PyTorch one."""

import json
import os
import re
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("jax_compilation_cache")


def run(cache: Path, *args: str, timeout: float = 900
        ) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess) -> dict:
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def one_line_error(result: subprocess.CompletedProcess) -> str:
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  return errors[0]


def test_eval_of_our_checkpoint_matches_training(jax_cache, tmp_path,
                                                 monkeypatch):
  summary = last_json(run(jax_cache, "train.py", "--config",
                          "configs/smoke.py", f"--workdir={tmp_path}",
                          "--config.progress_bar=false"))
  for which in ("latest", "best"):
    process = run(jax_cache, "eval.py", "--config", "configs/smoke.py",
                  f"--checkpoint={tmp_path}", f"--which={which}")
    result = last_json(process)
    # The log names the devices, as training's does.
    assert re.search(r"evaluating on \d+ devices? \(cpu x\d+\) in 1 process",
                     process.stderr), process.stderr[-3000:]
    assert result["num_examples"] == 40 and result["step"] == 3
    # The same parameters on the same 40 examples as the final evaluation.
    assert result["top1"] == pytest.approx(summary["eval_top1"], abs=1e-6)
    assert result["top5"] == pytest.approx(summary["eval_top5"], abs=1e-6)
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    # BatchNorm re-estimated on the final evaluation's training batches.
    assert result["top1_recalibrated"] == pytest.approx(
        summary["eval_top1_recalibrated"], abs=1e-6)
  # A model trained on digits, evaluated under a config of another dataset
  # (LeNet pads every input, so the shapes alone would not tell).
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  from configs import mnist_lenet5  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="dataset 'digits' in the checkpoint, "
                     "'mnist' in the config"):
    train_lib.evaluate_checkpoint(mnist_lenet5.get_config(), tmp_path)
  # Held-out examples it was trained on (it held none out) are refused.
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.holdout_examples = 40
  with pytest.raises(ValueError, match=r"holdout_examples=40 evaluates on the "
                     r"last 40 training examples, .* trained with "
                     r"holdout_examples=0: 40 of them were trained on"):
    train_lib.evaluate_checkpoint(config, tmp_path)
  # Evaluated without the run's seed, batch size and number of batches
  # (overrides not repeated): BatchNorm is still re-estimated on the run's
  # batches (other batches, and another top1_recalibrated, before).
  config = smoke.get_config()
  config.seed, config.batch_size = config.seed + 5, config.batch_size * 2
  config.recalibrate_bn_batches += 3
  seen = []
  recalibrated_stats = train_lib._recalibrated_stats  # pylint: disable=protected-access
  def spy(used_config, *args):
    seen.append((used_config.seed, used_config.batch_size,
                 used_config.recalibrate_bn_batches))
    return recalibrated_stats(used_config, *args)
  monkeypatch.setattr(train_lib, "_recalibrated_stats", spy)
  result = train_lib.evaluate_checkpoint(config, tmp_path)
  trained = smoke.get_config()
  assert seen == [(trained.seed, trained.batch_size,
                   trained.recalibrate_bn_batches)]
  assert result["top1_recalibrated"] == pytest.approx(
      summary["eval_top1_recalibrated"], abs=1e-6)
  assert config.seed == smoke.get_config().seed + 5  # the caller's untouched


def test_eval_needs_exactly_one_checkpoint(jax_cache, tmp_path):
  error = one_line_error(run(jax_cache, "eval.py", "--config",
                             "configs/smoke.py"))
  assert "--checkpoint" in error and "--torch_checkpoint" in error
  error = one_line_error(run(jax_cache, "eval.py", "--config",
                             "configs/smoke.py", f"--checkpoint={tmp_path}"))
  assert str(tmp_path) in error
  error = one_line_error(run(jax_cache, "eval.py", "--config",
                             "configs/cifar10_resnet20.py",
                             f"--torch_checkpoint={tmp_path / 'x.pth'}"))
  assert "x.pth" in error


@pytest.fixture(scope="module")
def cifar10_jpeg_test(tmp_path_factory) -> Path:
  tarball = SHARED_DATA / "cifar10-jpeg.tar.gz"
  if not tarball.is_file():
    pytest.skip(f"shared CIFAR-10 JPEG tarball not found at {tarball}")
  if shutil.which("tar") is None:
    pytest.skip("needs the tar command to extract the CIFAR-10 JPEG test set")
  out = tmp_path_factory.mktemp("cifar10jpeg")
  subprocess.run(["tar", "xzf", str(tarball), "-C", str(out),
                  "cifar10-jpeg/test"], check=True)
  return out / "cifar10-jpeg"


OFFICIAL = SHARED_DATA / "official-resnet20"


@pytest.mark.slow
def test_evaluator_reproduces_official_predictions(jax_cache):
  """The sharded evaluation of the converted official checkpoint on the 297
  lossless test images: the official accuracy (269/297) and the official
  loss, computed in float64 from the official logits."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  lossless = OFFICIAL / "cifar10_test_lossless_297.npz"
  checkpoint = OFFICIAL / "ResNet20-AdderNet.pth"
  if not (lossless.is_file() and checkpoint.is_file()):
    pytest.skip(f"official checkpoint or lossless images missing in "
                f"{OFFICIAL}")
  script = f"""
import json, sys
import numpy as np
sys.path.insert(0, {str(ROOT)!r})
from addernet_jax import convert, data, eval_lib, models, parallel
d = np.load({str(lossless)!r})
variables = convert.load_torch_checkpoint({str(checkpoint)!r}, "resnet20")
mesh = parallel.make_mesh()
model = models.get_model("resnet20", num_classes=10, bn_axis_name="batch")
ev = eval_lib.Evaluator(model, data.dataset_info("cifar10"), mesh, 128)
print(json.dumps(ev.evaluate_in_memory(
    variables["params"], variables["batch_stats"],
    eval_lib.InMemoryEvalSet(d["images"], d["labels"], mesh))))
"""
  result = last_json(run(jax_cache, "-c", script))
  d = np.load(lossless)
  logits = d["official_logits"].astype(np.float64)
  labels = d["labels"].astype(np.int64)
  log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + \
      logits.max(1)
  official_loss = float(np.mean(log_z - logits[np.arange(len(labels)),
                                               labels]))
  official_top1 = float(np.mean(logits.argmax(1) == labels))
  assert result["num_examples"] == 297
  assert official_top1 == pytest.approx(269 / 297)
  assert result["top1"] == pytest.approx(official_top1, abs=1e-9)
  assert result["loss"] == pytest.approx(official_loss, rel=1e-3)


@pytest.mark.extended  # for time; .ci/run runs it after the default suite
@pytest.mark.slow
def test_eval_official_torch_checkpoint_on_jpeg_test_folder(
    jax_cache, cifar10_jpeg_test):
  checkpoint = OFFICIAL / "ResNet20-AdderNet.pth"
  if not checkpoint.is_file():
    pytest.skip(f"official checkpoint not found at {checkpoint}")
  process = run(jax_cache, "eval.py", "--config",
                "configs/cifar10_resnet20.py",
                f"--torch_checkpoint={checkpoint}",
                f"--config.data_dir={cifar10_jpeg_test}",
                "--config.eval_max_examples=1000", "--config.conv=mult")
  result = last_json(process)
  # The conv kind is the file's; a config saying otherwise is warned about.
  assert ("holds a model of conv kind 'adder' (read from the file); "
          "config.conv='mult' is not used") in process.stderr
  print(f"official ResNet-20 AdderNet on 1000 CIFAR-10 JPEG test images: "
        f"{result}")
  # The first 1000 files are the first 100 of every class (the listing
  # interleaves the classes; 79.5% top-1 measured 2026-11-30). On all
  # 10,000 (91.8% on the original PNG test set; these lossy JPEG copies,
  # 27-33 dB, cost accuracy) eval.py measured 80.83% top-1, 97.9% top-5
  # (2-core CPU, 2026-11-23); the accuracy itself is checked on lossless
  # images above.
  assert result["num_examples"] == 1000 and result["conv"] == "adder"
  assert result["top1"] > 0.6 and result["top5"] >= result["top1"]


def test_evaluator_metrics_against_float64_at_every_rank():
  """Top-1, top-5 and loss of the evaluator over 300 examples (a padded last
  batch) whose label sits at every rank 0-9 of the logits, against float64
  NumPy: top-5 counts ranks 0-4 (the official checkpoint's test images put
  no label at rank 4, so they cannot tell top-5 from top-4)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from addernet_jax import data, eval_lib, parallel  # pylint: disable=g-import-not-at-top

  class PixelsAsLogits(nn.Module):  # the first 10 normalised pixels

    @nn.compact
    def __call__(self, x, train=False):
      return x.reshape(x.shape[0], -1)[:, :10] * 3.0

  rng = np.random.default_rng(0)
  n = 300
  info = data.dataset_info("mnist")
  images = np.zeros((n, *info.image_shape), np.uint8)
  values = np.stack([rng.permutation(256)[:10] for _ in range(n)])
  images.reshape(n, -1)[:, :10] = values
  ranks = np.arange(n) % 10
  labels = np.argsort(-values, axis=1)[np.arange(n), ranks]
  mesh = parallel.make_mesh()
  evaluator = eval_lib.Evaluator(PixelsAsLogits(), info, mesh, 64)
  got = evaluator.evaluate_in_memory(
      {}, {}, eval_lib.InMemoryEvalSet(images, labels, mesh))
  logits = (values / 255.0 - info.mean[0]) / info.std[0] * 3.0
  top = logits.max(1)
  loss = top + np.log(np.exp(logits - top[:, None]).sum(1)) - logits[
      np.arange(n), labels]
  assert got["num_examples"] == n
  assert got["top1"] == pytest.approx(np.mean(ranks == 0))  # 0.1
  assert got["top5"] == pytest.approx(np.mean(ranks < 5))  # 0.5
  assert got["loss"] == pytest.approx(loss.mean(), rel=1e-5)


def test_batch_norm_re_estimation_is_the_average_of_batch_statistics():
  """BN statistics re-estimated over 3 batches equal the float64 average of
  each batch's mean and unbiased variance (PyTorch's `update_bn` with a
  cumulative average), whatever the statistics were before."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from addernet_jax import data, eval_lib, parallel  # pylint: disable=g-import-not-at-top
  from addernet_jax.models import common  # pylint: disable=g-import-not-at-top

  class NormalisedPixels(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      x = common.batch_norm(train, dtype=jnp.float32, axis_name=None,
                            name="bn")(x)
      return x.reshape(x.shape[0], -1)[:, :10]

  rng = np.random.default_rng(0)
  info = data.dataset_info("cifar10")
  images = rng.integers(0, 256, (100, *info.image_shape), np.uint8)
  perm = rng.permutation(100).astype(np.int32)
  model = NormalisedPixels()
  stale = {"bn": {"mean": jnp.full((3,), 5.0), "var": jnp.full((3,), 9.0)}}
  mesh = parallel.make_mesh()
  evaluator = eval_lib.Evaluator(model, info, mesh, 32)
  params = {"bn": {"scale": jnp.full((3,), 2.0), "bias": jnp.ones((3,))}}
  got = evaluator.recalibrate_batch_stats(params, stale, jnp.asarray(images),
                                          jnp.asarray(perm), 32, 3)
  x = (images / 255.0 - np.array(info.mean)) / np.array(info.std)
  batches = [x[perm[i * 32:(i + 1) * 32]] for i in range(3)]
  want_mean = np.mean([b.mean((0, 1, 2)) for b in batches], axis=0)
  want_var = np.mean([b.reshape(-1, 3).var(0, ddof=1) for b in batches],
                     axis=0)
  np.testing.assert_allclose(got["bn"]["mean"], want_mean, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(got["bn"]["var"], want_var, rtol=1e-5)
  assert jax.tree.structure(got) == jax.tree.structure(stale)


def test_evaluate_stream_stops_after_the_batch_that_reaches_max_examples():
  """evaluate_stream with max_examples: every example of the batches read
  counts, and reading stops after the first batch that reaches the limit
  (16 of 8-example batches: 2 batches; 17: 3; -1: all 5)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from addernet_jax import data, eval_lib, parallel  # pylint: disable=g-import-not-at-top

  class Zeros(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      return x.reshape(x.shape[0], -1)[:, :10] * 0.0

  info = data.dataset_info("mnist")
  mesh = parallel.make_mesh()
  evaluator = eval_lib.Evaluator(Zeros(), info, mesh, 8)
  read = []

  def batches():
    for i in range(5):
      read.append(i)
      yield {"image": np.zeros((8, *info.image_shape), np.float32),
             "label": np.zeros(8, np.int32), "mask": np.ones(8, bool)}

  for limit, want in ((16, 16), (17, 24), (-1, 40)):
    read.clear()
    got = evaluator.evaluate_stream({}, {}, batches(), max_examples=limit)
    assert got["num_examples"] == want and len(read) == want // 8, (limit,
                                                                  got)
