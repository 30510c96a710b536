"""jax.export round trips: the file runs with JAX alone and gives the model's
logits, for any batch size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from addernet_jax import data as data_lib
from addernet_jax import export
from addernet_jax import models

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter whose path does not reach this repository.
_LOAD_AND_CALL = r"""
import sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
x = np.load(sys.argv[2])
np.save(sys.argv[3], np.asarray(exported.call(x)))
assert not any(m.startswith("addernet_jax") for m in sys.modules)
print(exported.in_avals, exported.platforms)
"""


def _call_without_the_repo(path: Path, x: np.ndarray, tmp: Path) -> np.ndarray:
  np.save(tmp / "x.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-c", _LOAD_AND_CALL, str(path), str(tmp / "x.npy"),
       str(tmp / "y.npy")], cwd=tmp, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return np.load(tmp / "y.npy")


@pytest.fixture(scope="module")
def lenet():
  """LeNet-5-BN whose running statistics are those of MNIST-like inputs (60
  train-mode passes at momentum 0.9 over 32 random images; the tests use
  other images). With initial or randomly perturbed statistics the adder
  outputs (near -36) made every ReLU after the first BatchNorm zero: the
  logits were the same for every image, and the round trips compared
  constants (the round trip checks that they vary)."""
  info = data_lib.dataset_info("mnist")
  model = models.get_model("lenet5_bn", num_classes=10, conv="adder",
                           implementation="xla")
  variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 28, 28, 1)),
                         train=False)
  rng = np.random.default_rng(1)
  x = (rng.random((32, 28, 28, 1), np.float32) - 0.1307) / 0.3081
  step = jax.jit(lambda v: model.apply(v, x, train=True,
                                       mutable=["batch_stats"])[1])
  for _ in range(60):
    variables = {"params": variables["params"], **step(variables)}
  return model, jax.device_get(variables), info


def test_round_trip_gives_the_models_logits_at_any_batch(lenet, tmp_path):
  model, variables, info = lenet
  exported = export.export_model(model, variables, info,
                                 platforms=("cpu", "cuda"))
  assert exported.platforms == ("cpu", "cuda")
  path = export.save(exported, tmp_path / "lenet.jaxexport")
  rng = np.random.default_rng(0)
  fn = export.pixels_to_logits(model, variables, info)
  for batch in (1, 5):
    x = rng.random((batch, 28, 28, 1), dtype=np.float32)
    expected = np.asarray(jax.jit(fn)(x))
    # The reference is the model itself on normalised pixels.
    direct = model.apply(variables, (x - 0.1307) / 0.3081, train=False)
    np.testing.assert_allclose(expected, direct, rtol=1e-5, atol=1e-3)
    # Not vacuous: the logits depend on the image.
    assert batch == 1 or np.ptp(np.asarray(direct), axis=0).max() > 0.1, direct
    got = _call_without_the_repo(path, x, tmp_path)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-4)
  again = export.load(path).call(x)
  np.testing.assert_allclose(np.asarray(again), expected, rtol=1e-6,
                             atol=1e-4)


def test_exported_logits_depend_on_the_pixels_as_normalised(lenet,
                                                            tmp_path):
  """The export must normalise the pixels as training did ((x - mean) / std):
  on a dead network, whose logits ignore the input, any normalisation passed
  the round trip."""
  model, variables, info = lenet
  rng = np.random.default_rng(0)
  x = rng.random((5, 28, 28, 1), dtype=np.float32)
  direct = np.asarray(model.apply(variables, (x - 0.1307) / 0.3081,
                                  train=False))
  # Not vacuous: the logits vary with the image, and normalising otherwise
  # ((x - m) * s, or no mean) changes them.
  assert np.ptp(direct, axis=0).max() > 0.1, direct
  for wrong in ((x - 0.1307) * 0.3081, x / 0.3081):
    assert np.abs(np.asarray(model.apply(variables, wrong, train=False))
                  - direct).max() > 0.1
  exported = export.export_model(model, variables, info, platforms=("cpu",))
  np.testing.assert_allclose(np.asarray(exported.call(x)), direct,
                             rtol=1e-4, atol=1e-4)


def test_export_lowers_for_the_platforms_asked(lenet):
  """--platforms must reach jax.export: a fixed platform list passed the
  round trip, which asks for the default ("cpu", "cuda") only."""
  model, variables, info = lenet
  for platforms in (("cpu",), ("cpu", "tpu")):
    exported = export.export_model(model, variables, info,
                                   platforms=platforms)
    assert exported.platforms == platforms


def test_bad_inputs_get_clear_errors(lenet, tmp_path):
  model, variables, info = lenet
  with pytest.raises(ValueError, match="platforms must be among"):
    export.export_model(model, variables, info, platforms=("gpu42",))
  (tmp_path / "junk").write_bytes(b"not an exported model")
  with pytest.raises(ValueError, match="not a jax.export file"):
    export.load(tmp_path / "junk")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    export.load(tmp_path / "missing")
  with pytest.raises(ValueError, match="is a directory"):
    export.save(export.export_model(model, variables, info,
                                    platforms=("cpu",)), tmp_path)


def test_no_platform_is_refused(lenet):
  """Accepting an empty --platforms= (an export for the host's platform
  only) passed every test."""
  model, variables, info = lenet
  with pytest.raises(ValueError, match="platforms must be among"):
    export.export_model(model, variables, info, platforms=())


def _official_inputs(shared: Path):
  npz = shared / "official-resnet20" / "cifar10_test_lossless_297.npz"
  pth = shared / "official-resnet20" / "ResNet20-AdderNet.pth"
  if not (npz.is_file() and pth.is_file()):
    pytest.skip(f"official checkpoint or test images absent in {shared}")
  return pth, np.load(npz)


@pytest.mark.slow
def test_cli_exports_the_official_checkpoint(shared_data, tmp_path):
  """The command exports the official ResNet-20; the file alone reproduces
  the official PyTorch logits on real test images."""
  pth, data = _official_inputs(shared_data)
  out = tmp_path / "resnet20.jaxexport"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "addernet_jax.export", "--config",
         "configs/cifar10_resnet20.py", f"--torch_checkpoint={pth}",
         f"--output={out}"]
  result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["platforms"] == ["cpu", "cuda"] and out.is_file()
  x = data["images"][:32].astype(np.float32) / 255.0
  logits = _call_without_the_repo(out, x, tmp_path)
  official = data["official_logits"][:32]
  np.testing.assert_array_equal(logits.argmax(-1), official.argmax(-1))
  assert np.abs(logits - official).max() < 2e-2
  bad = subprocess.run(cmd[:-2] + [f"--torch_checkpoint={tmp_path}/no.pth",
                                   f"--output={out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("error: torch "
                                                        "checkpoint")
  assert "Traceback" not in bad.stderr


# ------------------------------------------- inputs and outputs checked --


def _lenet_torch_checkpoint(path: Path, num_classes: int, in_channels: int):
  """A random official-layout LeNet-5-BN AdderNet saved with torch.save."""
  torch = pytest.importorskip("torch", reason="torch is not installed")
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  model = models.get_model("lenet5_bn", num_classes=num_classes, conv="adder")
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, in_channels)),
      train=False))
  rng = np.random.default_rng(0)
  state = {}
  for collection, tree in abstract.items():
    for keys, leaf in traverse_util.flatten_dict(tree).items():
      attr = {"adder_kernel": "adder", "scale": "weight", "bias": "bias",
              "mean": "running_mean", "var": "running_var"}[keys[-1]]
      shape = leaf.shape
      shape = ((shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4
               else shape[::-1])
      state[f"{keys[0]}.{attr}"] = torch.from_numpy(
          rng.random(shape, np.float32) + 0.5)
  torch.save(state, path)


def _mnist_lenet_config():
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict({"model": "lenet5_bn", "dataset": "mnist",
                                    "dtype": "float32"})


def test_torch_checkpoint_must_fit_the_dataset(tmp_path):
  config = _mnist_lenet_config()
  good = tmp_path / "good.pth"
  _lenet_torch_checkpoint(good, num_classes=10, in_channels=1)
  model, variables = export.load_variables(config, torch_checkpoint=good)
  assert variables["params"]["fc3"]["adder_kernel"].shape == (84, 10)
  rgb = tmp_path / "rgb.pth"
  _lenet_torch_checkpoint(rgb, num_classes=10, in_channels=3)
  with pytest.raises(ValueError, match=r"rgb.pth is not a lenet5_bn: "
                     r"conv1\.adder has shape \(6, 3, 5, 5\).*3-channel"):
    export.load_variables(config, torch_checkpoint=rgb)
  wide = tmp_path / "wide.pth"
  _lenet_torch_checkpoint(wide, num_classes=100, in_channels=1)
  with pytest.raises(ValueError, match=r"wide.pth' has 100 classes, mnist "
                     r"has 10"):
    export.load_variables(config, torch_checkpoint=wide)
  del model
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match="training workdir: pass it with "
                     "--checkpoint"):
    export.load_variables(config, torch_checkpoint=tmp_path / "run")


def test_load_variables_restores_the_checkpoint_asked(monkeypatch, lenet):
  """load_variables must pass `which` on to the restore: dropping it
  (--which=best exporting the latest checkpoint) passed every test."""
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  _, variables, _ = lenet
  asked = []

  def restore(config, checkpoint, which="latest"):
    del config, checkpoint
    asked.append(which)
    return {"params": variables["params"],
            "batch_stats": variables["batch_stats"], "step": 3}
  monkeypatch.setattr(train_lib, "restore_variables", restore)
  config = _mnist_lenet_config()
  config.update({"num_classes": 10, "conv": "adder"})
  export.load_variables(config, checkpoint="unused", which="best",
                        warn_running_statistics=False)
  assert asked == ["best"]


def test_output_that_would_harm_an_input_is_refused(tmp_path):
  pth = tmp_path / "model.pth"
  pth.write_bytes(b"weights")
  with pytest.raises(ValueError, match="is the torch checkpoint itself"):
    export.check_output(pth, torch_checkpoint=pth)
  with pytest.raises(ValueError, match="is the torch checkpoint itself"):
    export.check_output(tmp_path / "sub" / ".." / "model.pth",
                        torch_checkpoint=str(pth))
  link = tmp_path / "link.jaxexport"
  link.symlink_to(pth)
  with pytest.raises(ValueError, match="is the torch checkpoint itself"):
    export.check_output(link, torch_checkpoint=pth)
  assert export.check_output(tmp_path / "model.jaxexport",
                             torch_checkpoint=pth) == (tmp_path /
                                                       "model.jaxexport")
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  for inside in (workdir / "checkpoints" / "m.jaxexport",
                 workdir / "checkpoints" / "100" / "m.jaxexport",
                 tmp_path / "elsewhere" / ".." / "run" / "checkpoints" /
                 "m.jaxexport"):
    with pytest.raises(ValueError, match="inside the checkpoint folder"):
      export.check_output(inside, checkpoint=workdir)
  # Given as the checkpoint folder itself: that folder is protected.
  with pytest.raises(ValueError, match="inside the checkpoint folder"):
    export.check_output(workdir / "checkpoints" / "m.jaxexport",
                        checkpoint=workdir / "checkpoints")
  # The workdir's own files are not exports: refused as such.
  with pytest.raises(ValueError, match="exists and is not an exported model"):
    export.check_output(workdir / "metrics.jsonl", checkpoint=workdir)
  for fine in (tmp_path / "m.jaxexport", workdir / "m.jaxexport"):
    assert export.check_output(fine, checkpoint=workdir) == fine
  with pytest.raises(ValueError, match=r"'.*model.pth' is a file, not a "
                     r"directory"):
    export.check_output(pth / "deeper" / "m.jaxexport")
  with pytest.raises(ValueError, match="is a directory"):
    export.check_output(workdir)
  assert pth.read_bytes() == b"weights"
  assert (workdir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_output_must_not_be_the_config_file(tmp_path, monkeypatch):
  config = tmp_path / "my_config.py"
  config.write_text("def get_config(): ...\n")
  (tmp_path / "sub").mkdir()
  monkeypatch.chdir(tmp_path / "sub")
  for output in (config, "../my_config.py"):
    with pytest.raises(ValueError, match="is the --config file itself"):
      export.check_output(output, config_file=config)
  link = tmp_path / "config_link.py"
  link.symlink_to(config)
  with pytest.raises(ValueError, match="is the --config file itself"):
    export.check_output(config, config_file=link)
  assert config.read_text() == "def get_config(): ...\n"


def test_only_a_previous_export_is_replaced(lenet, tmp_path):
  model, variables, info = lenet
  exported = export.export_model(model, variables, info, platforms=("cpu",))
  previous = export.save(exported, tmp_path / "m.jaxexport")
  assert export.is_exported_model(previous)
  assert export.save(exported, previous) == previous
  assert export.check_output(previous) == previous
  for name, content in (("notes.txt", b"my notes"), ("empty.jaxexport", b""),
                        ("history.jsonl", b'{"step": 1}\n')):
    foreign = tmp_path / name
    foreign.write_bytes(content)
    assert not export.is_exported_model(foreign)
    with pytest.raises(ValueError, match="exists and is not an exported "
                       "model; only a previous export is replaced"):
      export.check_output(foreign)
    with pytest.raises(ValueError, match="is not an exported model"):
      export.save(exported, foreign)
    assert foreign.read_bytes() == content
  fifo = tmp_path / "fifo"
  os.mkfifo(fifo)
  with pytest.raises(ValueError, match="exists and is not a regular file"):
    export.check_output(fifo)


def test_cli_refuses_to_overwrite_its_inputs(tmp_path):
  pth = tmp_path / "mine.pth"
  pth.write_bytes(b"not even a checkpoint")
  config = tmp_path / "config_copy.py"
  config.write_bytes((ROOT / "configs" / "cifar10_resnet20.py").read_bytes())
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  notes = tmp_path / "notes.txt"
  notes.write_text("mine")
  before = {p: p.read_bytes() for p in (pth, config, workdir / "metrics.jsonl",
                                        notes)}
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  for source, output, message in (
      (f"--torch_checkpoint={pth}", pth, "is the torch checkpoint itself"),
      (f"--torch_checkpoint={pth}", pth / "x.jaxexport",
       "is a file, not a directory"),
      (f"--torch_checkpoint={pth}", config, "is the --config file itself"),
      (f"--checkpoint={workdir}", workdir / "metrics.jsonl",
       "is not an exported model"),
      (f"--torch_checkpoint={pth}", notes, "is not an exported model")):
    result = subprocess.run(
        [sys.executable, "-m", "addernet_jax.export", f"--config={config}",
         source, f"--output={output}"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in result.stderr
  assert {p: p.read_bytes() for p in before} == before


# The export command with load_variables replaced by one that reports its
# arguments (as the error the command prints last).
_MAIN_WITH_A_FAKE_LOADER = r"""
from absl import app
from addernet_jax import cli, export
def fake(config, **kwargs):
  raise ValueError("asked " + repr(sorted(kwargs.items())))
export.load_variables = fake
export._define_flags()
app.run(export.main, flags_parser=cli.parse_flags)
"""


def test_cli_passes_which_and_batch_stats_to_the_loader(tmp_path):
  """--which and --batch_stats must reach load_variables: dropping them
  (the latest checkpoint exported with its running statistics) passed every
  test."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, "-c", _MAIN_WITH_A_FAKE_LOADER,
       "--config=configs/mnist_lenet5.py", f"--checkpoint={tmp_path / 'run'}",
       "--which=best", "--batch_stats=recalibrated",
       f"--output={tmp_path / 'x.jaxexport'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "('which', 'best')" in last and (
      "('batch_stats', 'recalibrated')" in last), last


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_a_short_run_exports_re_estimated_statistics_on_request(
    tmp_path, monkeypatch):
  """A 1-epoch MNIST run exported its running BatchNorm statistics (15%
  top-1 against 98% re-estimated) without a word. The export now warns, and
  --batch_stats=recalibrated exports the statistics training's final
  evaluation scored with."""
  from addernet_jax import eval_lib, train_lib  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT))
  from configs import smoke  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  summary = train_lib.train_and_evaluate(config, tmp_path / "run")
  running, recal = summary["eval_top1"], summary["eval_top1_recalibrated"]

  caveat = export.running_statistics_caveat(tmp_path / "run", 3)
  assert (caveat is not None) == (recal - running > 0.05)
  monkeypatch.setattr(export, "RUNNING_STATISTICS_GAP", recal - running - 1)
  assert (f"score {100 * running:.2f}% top-1 at step 3 against "
          f"{100 * recal:.2f}% with statistics re-estimated"
          ) in export.running_statistics_caveat(tmp_path / "run", 3)

  # eval.py --attacks loads through load_variables: the export's advice
  # (--batch_stats, a flag eval.py lacks) is not given there.
  from addernet_jax import attacks  # pylint: disable=g-import-not-at-top
  warned = []
  monkeypatch.setattr(export.logging, "warning", lambda *args: warned.extend(
      a for a in args if "--batch_stats" in str(a)))
  export.load_variables(config, checkpoint=tmp_path / "run")
  assert len(warned) == 1, warned
  attacks.load_attack_models(config, checkpoint=str(tmp_path / "run"))
  assert len(warned) == 1, warned

  variables, result = train_lib.recalibrated_variables(config,
                                                       tmp_path / "run")
  assert result["top1"] == pytest.approx(running, abs=1e-9)
  assert result["top1_recalibrated"] == pytest.approx(recal, abs=1e-9)
  model, exported_vars = export.load_variables(
      config, checkpoint=tmp_path / "run", batch_stats="recalibrated")
  jax.tree.map(np.testing.assert_array_equal, exported_vars, variables)
  assert eval_lib.evaluate_variables(config, model, variables)["top1"] == (
      pytest.approx(recal, abs=1e-9))
  running_vars = train_lib.restore_variables(config, tmp_path / "run")
  assert not np.array_equal(
      jax.tree.leaves(variables["batch_stats"])[0],
      np.asarray(jax.tree.leaves(running_vars["batch_stats"])[0]))

  with pytest.raises(ValueError, match="an official checkpoint keeps its "
                     "running ones"):
    export.load_variables(config, torch_checkpoint=tmp_path / "x.pth",
                          batch_stats="recalibrated")
  with pytest.raises(ValueError, match="batch_stats must be one of"):
    export.load_variables(config, checkpoint=tmp_path / "run",
                          batch_stats="best")
  from configs import sr_smoke  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="load_variables is for classification"):
    export.load_variables(sr_smoke.get_config(), checkpoint=tmp_path / "run")


def test_symbolic_batch_with_its_gradient():
  """`jax.export` of adder_conv with a symbolic batch and its VJP
  (`serialize(vjp_order=1)`) failed: the CPU filter gradient's static
  blocks of 256 terms compared a symbolic size with 256. With symbolic sizes
  it takes the convolution form; the gradient through the deserialised
  function equals adder_conv's."""
  from jax import export as jax_export  # pylint: disable=g-import-not-at-top
  from addernet_jax import ops  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(7)
  w = rng.standard_normal((3, 3, 2, 3)).astype(np.float32)
  fn = jax.jit(lambda x: ops.adder_conv(x, w, strides=2))
  (batch,) = jax_export.symbolic_shape("b")
  exported = jax_export.export(fn)(
      jax.ShapeDtypeStruct((batch, 9, 8, 2), jnp.float32))
  restored = jax_export.deserialize(exported.serialize(vjp_order=1))
  for n in (1, 3):
    x = rng.standard_normal((n, 9, 8, 2)).astype(np.float32)
    r = rng.standard_normal((n, 5, 4, 3)).astype(np.float32)
    got = jax.grad(lambda x: jnp.sum(restored.call(x) * r))(x)
    want = jax.grad(lambda x: jnp.sum(fn(x) * r))(x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_cli_loads_a_shipped_config_from_another_folder(tmp_path):
  """`python -m addernet_jax.export --config <checkout>/configs/x.py` run
  outside the checkout failed with "No module named 'configs'" (the shipped
  configs import configs.default), although train.py ran from there."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run(
      [sys.executable, "-m", "addernet_jax.export",
       f"--config={ROOT / 'configs' / 'cifar10_resnet20.py'}",
       f"--torch_checkpoint={tmp_path / 'no.pth'}",
       f"--output={tmp_path / 'y.jaxexport'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert "no.pth': no such file" in last, last
