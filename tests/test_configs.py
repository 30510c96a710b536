"""Config files: every one loads, has the shared keys, documents itself; the
command line rejects bad keys and values with one line and no traceback."""

import importlib.util
import os
from pathlib import Path
import subprocess
import sys

import ml_collections
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SHARED_KEYS = {
    "dataset": str, "data_dir": (str, type(None)), "model": str, "conv": str,
    "num_classes": int, "batch_size": int, "num_epochs": int,
    "num_train_steps": int, "learning_rate": float, "momentum": float,
    "weight_decay": float, "eta": float, "checkpoint_every_steps": int,
    "seed": int,
}
EXPERIMENTS = {
    "cifar10_resnet20": ("cifar10", "resnet20", 10),
    "cifar10_resnet32": ("cifar10", "resnet32", 10),
    "cifar100_resnet20": ("cifar100", "resnet20", 100),
    "cifar100_resnet32": ("cifar100", "resnet32", 100),
    "cifar10_vgg_small": ("cifar10", "vgg_small", 10),
    "cifar100_vgg_small": ("cifar100", "vgg_small", 100),
    "mnist_lenet5": ("mnist", "lenet5_bn", 10),
    "imagenet_resnet18": ("imagenet2012", "resnet18", 1000),
    "imagenet_resnet50": ("imagenet2012", "resnet50", 1000),
    "digits_lenet5": ("digits", "lenet5_bn", 10),
    "smoke": ("digits", "lenet5_bn", 10),
    # AdderSR (config.task = "sr"): no classes.
    "sr_edsr_x2": ("image_folder", "edsr_baseline", 0),
    "sr_edsr_x3": ("image_folder", "edsr_baseline", 0),
    "sr_edsr_x4": ("image_folder", "edsr_baseline", 0),
    "sr_vdsr_x2": ("image_folder", "vdsr", 0),
    "sr_smoke": ("image_folder", "edsr_baseline", 0),
}
PKKD_EXPERIMENTS = {f"{name}_pkkd": EXPERIMENTS[name] for name in (
    "cifar10_resnet20", "cifar10_resnet32", "cifar100_resnet20",
    "cifar100_resnet32", "cifar10_vgg_small", "cifar100_vgg_small",
    "imagenet_resnet18", "imagenet_resnet50")}
EXPERIMENTS.update(PKKD_EXPERIMENTS)
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py")
                      if p.stem not in ("__init__", "default"))


def load(path: Path) -> ml_collections.ConfigDict:
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  spec = importlib.util.spec_from_file_location(f"_cfg_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config()


def test_every_experiment_has_a_config():
  assert {p.stem for p in CONFIG_FILES} == set(EXPERIMENTS)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_with_shared_keys(path):
  module, config = load(path)
  for key, kind in SHARED_KEYS.items():
    assert key in config, f"{path.name} lacks {key}"
    assert isinstance(config[key], kind), (path.name, key, config[key])
  dataset, model, classes = EXPERIMENTS[path.stem]
  assert (config.dataset, config.model, config.num_classes) == (
      dataset, model, classes)
  assert config.conv == "adder"
  assert config.batch_size % 8 == 0 and config.eval_batch_size > 0
  doc = module.__doc__
  assert f"configs/{path.stem}.py" in doc and "python train.py" in doc
  assert "Expected result" in doc


def test_every_key_is_commented():
  """Each key of the base config has a comment right above it."""
  lines = (CONFIG_DIR / "default.py").read_text().splitlines()
  _, config = load(CONFIG_DIR / "cifar10_resnet20.py")
  for key in config:
    index = next(i for i, line in enumerate(lines)
                 if line.strip().startswith(f"config.{key} ="))
    assert lines[index - 1].strip().startswith("#"), key


def test_cifar10_resnet20_is_the_official_recipe():
  _, c = load(CONFIG_DIR / "cifar10_resnet20.py")
  assert (c.batch_size, c.learning_rate, c.momentum, c.weight_decay, c.eta,
          c.num_epochs) == (256, 0.1, 0.9, 5e-4, 0.2, 399)
  assert c.num_train_steps <= 0 and c.adaptive_lr
  assert c.dtype == "float32" and c.data_dir is None


def test_imagenet_recipe():
  for name in ("imagenet_resnet18", "imagenet_resnet50"):
    _, c = load(CONFIG_DIR / f"{name}.py")
    assert (c.batch_size, c.learning_rate, c.num_epochs) == (256, 0.1, 150)


def test_pkkd_configs_are_their_base_recipe_with_distillation():
  for name in PKKD_EXPERIMENTS:
    _, c = load(CONFIG_DIR / f"{name}.py")
    _, base = load(CONFIG_DIR / f"{name[:-len('_pkkd')]}.py")
    assert c.distill == "pkkd" and base.distill == "none"
    assert c.conv == "adder" and c.adaptive_lr
    for key in ("batch_size", "learning_rate", "num_epochs", "weight_decay",
                "momentum", "eta"):
      assert c[key] == base[key], (name, key)


def test_sr_recipes():
  """EDSR's recipe (AdderSR follows it): batch 16, LR patch 48, Adam 1e-4
  halved every 200k steps, 300k steps; scales 2, 3, 4; the CNN by --conv."""
  for name, scale in (("sr_edsr_x2", 2), ("sr_edsr_x3", 3),
                      ("sr_edsr_x4", 4), ("sr_vdsr_x2", 2)):
    _, c = load(CONFIG_DIR / f"{name}.py")
    assert c.task == "sr" and c.scale == scale
    assert (c.batch_size, c.learning_rate, c.lr_decay_steps,
            c.num_epochs * c.steps_per_epoch) == (16, 1e-4, 200_000, 300_000)
    assert c.patch_size == (24 if name == "sr_vdsr_x2" else 48)
  _, c = load(CONFIG_DIR / "cifar10_resnet20.py")
  assert c.task == "classification"


def test_mnist_recipe():
  _, c = load(CONFIG_DIR / "mnist_lenet5.py")
  assert (c.learning_rate, c.num_epochs, c.batch_size) == (0.1, 50, 256)


# ----------------------------------------------------------- command line --


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *needles: str):
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1, result.stderr
  for needle in needles:
    assert needle in errors[0], errors[0]
  assert result.stdout.strip() == ""


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_unknown_config_key_is_one_line_error(script, tmp_path):
  result = run_cli(script, "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}", f"--checkpoint={tmp_path}",
                   "--config.no_such_key=3")
  assert_one_line_error(result, "no_such_key")


def test_unknown_flags_suggest_the_programs_own_flags(tmp_path):
  """absl suggested among every flag, its logging ones included: train.py's
  --work_dir drew nothing useful and eval.py's --workdir drew 'log_dir'."""
  result = run_cli("train.py", "--config", "configs/smoke.py",
                   f"--work_dir={tmp_path}")
  assert_one_line_error(
      result, "unknown command line flag --work_dir; did you mean "
      "--workdir? (train.py takes --config, --coordinator_address, "
      "--num_processes, --process_id, --workdir;")
  result = run_cli("eval.py", "--config", "configs/smoke.py",
                   f"--chekpoint={tmp_path}")
  assert_one_line_error(
      result, "did you mean --checkpoint or --torch_checkpoint? (eval.py "
      "takes --attack_eps,")
  assert "log_dir" not in result.stderr


def test_missing_required_flags_are_named_with_their_help():
  """absl's "flag --config=None: Flag --config must have a value other than
  None." for each flag left out, before."""
  result = run_cli("train.py")
  assert_one_line_error(
      result, "train.py needs --config and --workdir (--config: ",
      "; --workdir: Directory for checkpoints")
  assert "other than None" not in result.stderr


def test_eval_reads_workdir_as_train_py_names_it(tmp_path):
  """`eval.py --workdir` (train.py's name for the folder) is --checkpoint."""
  result = run_cli("eval.py", "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}")
  assert_one_line_error(result, f"no checkpoint found in '{tmp_path}'")


def test_misspelt_nested_key_names_it_plainly_with_the_suggestion(tmp_path):
  """ConfigDict wraps its KeyError in an AttributeError: the line once read
  `unknown config key '\\'feature_wieght\\'\\nDid you mean ...'`."""
  result = run_cli("train.py", "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}", "--config.seed=3",
                   "--config.pkkd.feature_wieght=0")
  assert_one_line_error(
      result, "unknown config key 'feature_wieght' in "
      "--config.pkkd.feature_wieght=0 (",
      'Did you mean "feature_weight" instead of "feature_wieght"?')
  assert "\\" not in result.stderr, result.stderr
  assert "seed" not in result.stderr, result.stderr  # only the culprit


def test_wrong_value_type_is_one_line_error(tmp_path):
  result = run_cli("train.py", "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}", "--config.batch_size=lots")
  assert_one_line_error(result, "batch_size")


def test_missing_config_file_is_one_line_error(tmp_path):
  result = run_cli("train.py", "--config", "configs/no_such_config.py",
                   f"--workdir={tmp_path}")
  assert_one_line_error(result, "no_such_config")


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_broken_config_files_are_one_line_errors(script, tmp_path):
  """A file without get_config(), one that does not parse, one whose config
  lacks a field the run reads: tracebacks, or "unknown config key", before."""
  files = {
      "noget.py": ("x = 1\n", "defines no get_config() function"),
      "syntax.py": ("def get_config(:\n", "(line 1): SyntaxError"),
      "partial.py": ("import ml_collections\ndef get_config():\n"
                     "  c = ml_collections.ConfigDict()\n"
                     "  c.model = 'lenet5_bn'\n  return c\n",
                     "the config has no field 'dataset'")}
  for name, (text, needle) in files.items():
    (tmp_path / name).write_text(text)
    where = "--workdir" if script == "train.py" else "--checkpoint"
    result = run_cli(script, "--config", str(tmp_path / name),
                     f"{where}={tmp_path / 'run'}")
    assert_one_line_error(result, needle)
  assert not (tmp_path / "run").exists()


def test_config_files_whose_get_config_misbehaves_are_one_line_errors(
    tmp_path):
  """get_config not a function, taking an argument, raising, returning a
  dict or None: ml_collections' folded traceback or a misleading "--config
  must have a value other than None" before."""
  files = {
      "notfunc.py": ("get_config = 3\n",
                     "calling its get_config() failed: TypeError: 'int'"),
      "witharg.py": ("def get_config(arg):\n  return arg\n",
                     "calling its get_config() failed: TypeError: get_config"),
      "raises.py": ("def get_config():\n  raise ValueError('boom')\n",
                    "calling its get_config() failed: ValueError: boom"),
      "dict.py": ("def get_config():\n  return {'model': 'x'}\n",
                  "returned a dict, not an ml_collections.ConfigDict"),
      "none.py": ("def get_config():\n  pass\n",
                  "returned None (a missing return statement?)")}
  for name, (text, needle) in files.items():
    (tmp_path / name).write_text(text)
    result = run_cli("train.py", "--config", str(tmp_path / name),
                     f"--workdir={tmp_path / 'run'}")
    assert_one_line_error(result, needle)
    assert name in result.stderr
  assert not (tmp_path / "run").exists()


def test_unknown_config_fields_are_named_with_a_close_known_name():
  import configs  # pylint: disable=g-import-not-at-top
  from addernet_jax import cli  # pylint: disable=g-import-not-at-top
  shipped = configs.shipped_configs()
  assert {"cifar10_resnet20", "cifar10_resnet20_pkkd", "sr_edsr_x2",
          "smoke"} <= set(shipped)
  for name, config in shipped.items():  # each shipped config is known
    assert not cli.unknown_config_fields(config, shipped.values()), name
  config = configs.shipped_configs()["cifar10_resnet20_pkkd"]  # a copy
  config.learning_rte = 0.2
  config.pkkd.temprature = 1.0
  config.my_notes = {"owner": "me", "tags": ["a"]}
  unknown = cli.unknown_config_fields(config, shipped.values())
  assert sorted(unknown) == [
      "learning_rte (did you mean learning_rate?)", "my_notes",
      "pkkd.temprature (did you mean pkkd.temperature?)"], unknown


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_cli_warns_about_a_misspelt_config_field(script, tmp_path):
  """A typo in a config file (not an override: those are refused) was
  ignored without a word."""
  (tmp_path / "typo.py").write_text(
      "from configs import smoke\n"
      "def get_config():\n"
      "  config = smoke.get_config()\n"
      "  config.weight_decy = 0.0\n"
      "  return config\n")
  where = "--workdir" if script == "train.py" else "--checkpoint"
  result = run_cli(script, "--config", str(tmp_path / "typo.py"),
                   f"{where}={tmp_path / 'run'}",
                   "--config.num_classes=3")  # then stop early
  assert_one_line_error(result)
  assert ("not read: weight_decy (did you mean weight_decay?)"
          in result.stderr), result.stderr


def test_missing_data_dir_is_one_line_error(tmp_path):
  result = run_cli("train.py", "--config", "configs/mnist_lenet5.py",
                   f"--workdir={tmp_path}",
                   f"--config.data_dir={tmp_path / 'nowhere'}")
  assert_one_line_error(result, "nowhere")


def test_unset_data_dir_without_tfds_is_one_line_error(tmp_path):
  """config.data_dir unset means TFDS: where it is not installed (as in a
  plain install), train.py and eval.py say so in one line."""
  pytest.importorskip("jax")
  if importlib.util.find_spec("tensorflow_datasets") is not None:
    pytest.skip("tensorflow_datasets is installed here")
  result = run_cli("train.py", "--config", "configs/cifar10_resnet20.py",
                   f"--workdir={tmp_path / 'run'}")
  assert_one_line_error(result, "TensorFlow Datasets", "config.data_dir")
  assert not (tmp_path / "run").exists()
  official = ROOT.parent / "shared/data/official-resnet20/ResNet20-AdderNet.pth"
  if official.is_file():
    result = run_cli("eval.py", "--config", "configs/cifar10_resnet20.py",
                     f"--torch_checkpoint={official}")
    assert_one_line_error(result, "TensorFlow Datasets")


def test_bad_value_is_one_line_error(tmp_path):
  result = run_cli("train.py", "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}", "--config.conv=bogus")
  assert_one_line_error(result, "bogus")
  result = run_cli("train.py", "--config", "configs/smoke.py",
                   f"--workdir={tmp_path}", "--config.num_classes=7")
  assert_one_line_error(result, "num_classes")


@pytest.mark.parametrize("key,value", [("learning_rate", -0.1),
                                       ("learning_rate", 0.0),
                                       ("momentum", -0.9),
                                       ("momentum", 5.0),
                                       ("momentum", 1.0),
                                       ("weight_decay", float("nan")),
                                       ("eta", float("nan")),
                                       ("eta", -3.0),
                                       ("eta", float("inf")),
                                       ("max_checkpoints_to_keep", 0),
                                       ("holdout_examples", -5),
                                       ("recalibrate_bn_batches", -1),
                                       ("checkpoint_every_steps", -7)])
def test_optimizer_values_out_of_range_are_refused(key, value):
  """NaN or a negative eta once switched the adaptive rate off silently."""
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  _, config = load(CONFIG_DIR / "smoke.py")
  config[key] = value
  with pytest.raises(ValueError, match=f"config.{key}="):
    train_lib.validate_config(config, 1)
  config[key] = type(value)(0.5 if key != "max_checkpoints_to_keep" else 1)
  train_lib.validate_config(config, 1)


def test_eta_that_would_switch_the_adaptive_rate_off_is_refused():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from addernet_jax import optim  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(
      learning_rate=0.1, momentum=0.9, weight_decay=5e-4, num_epochs=2,
      num_train_steps=-1, eta=float("nan")))
  with pytest.raises(ValueError, match=r"config.eta=nan must be a number >= "
                     r"0 \(finite\)"):
    optim.make_optimizer(config, {"w": 1.0}, 10)


def test_json_line_is_strict_json():
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from addernet_jax import cli  # pylint: disable=g-import-not-at-top
  line = cli.json_line({"loss": float("nan"), "top1": np.float32(0.5),
                        "rows": [{"x": float("inf")}], "n": 3})
  assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {
      "loss": None, "top1": 0.5, "rows": [{"x": None}], "n": 3}


@pytest.mark.extended  # 90 s of tracing: run in .ci/run's correctness step
@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_builds_and_traces_its_training_step(path):
  """Each recipe as train.py builds it (model, optimizer with its adaptive
  LR and schedule, PKKD's teacher, AdderSR's model and Adam), one training
  step traced on abstract inputs of the dataset's shape: no data, no
  compilation, every config file checked."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from addernet_jax import parallel, train_lib  # pylint: disable=g-import-not-at-top
  from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
  _, config = load(path)
  mesh = parallel.make_mesh(jax.devices()[:1])
  batch = 2
  key = jax.random.PRNGKey(0)
  if train_lib.is_sr_task(config):
    state = jax.eval_shape(lambda k: sr_train.create_train_state(config, k),
                           key)
    colors = sr_train.model_colors(config)
    lr = jax.ShapeDtypeStruct((batch, config.patch_size, config.patch_size,
                               colors), jnp.float32)
    size = config.patch_size * config.scale
    hr = jax.ShapeDtypeStruct((batch, size, size, colors), jnp.float32)
    step, args = sr_train.make_train_step(mesh), (lr, hr)
  else:
    info = data_lib.dataset_info(config.dataset)
    steps_per_epoch = 10
    state = jax.eval_shape(lambda k: train_lib.create_train_state(
        config, k, info.image_shape, steps_per_epoch=steps_per_epoch), key)
    images = jax.ShapeDtypeStruct((batch, *info.image_shape),
                                  train_lib.get_dtype(config.dtype))
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    step = train_lib.make_streaming_train_step(
        mesh, train_lib.make_core(config, steps_per_epoch))
    args = (images, labels)
  out_state, metrics = jax.eval_shape(step, state, *args)
  assert jax.tree.structure(out_state) == jax.tree.structure(state)
  assert all(m.shape == () for m in jax.tree.leaves(metrics)), metrics


_STDOUT_SCRIPT = """
import os, sys
from addernet_jax import cli
with cli.stdout_kept_for_the_result() as print_line:
  try:
    os.write(1, b"native line\\n")   # what Gloo's C++ prints
  except OSError:  # stdout closed: C code ignores the error, as here
    pass
  print("python print")
  print_line("table row")
print("result")
"""


@pytest.mark.parametrize("closed", [False, True])
def test_stdout_holds_only_what_the_entry_points_print(tmp_path, closed):
  """train.py/eval.py: native prints went to stdout before the result line;
  within the block they go to stderr. With stdout closed (`>&-`) the block
  crashed (AttributeError on sys.stdout None)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  redirect = ">&-" if closed else f"> {tmp_path / 'out.txt'}"
  result = subprocess.run(
      ["bash", "-c", f'"{sys.executable}" -c "$SCRIPT" {redirect} '
       f'2> {tmp_path / "err.txt"}'],
      env=dict(env, SCRIPT=_STDOUT_SCRIPT), capture_output=True, text=True,
      timeout=120)
  err = (tmp_path / "err.txt").read_text()
  assert result.returncode == 0, err
  if not closed:
    assert (tmp_path / "out.txt").read_text() == "table row\nresult\n"
    assert "native line\npython print\n" in err, err


def test_stdout_block_leaves_captured_stdout_alone(capsys):
  """Where sys.stdout is not file descriptor 1 (pytest, Jupyter,
  redirect_stdout) nothing is redirected and print_line prints there."""
  from addernet_jax import cli  # pylint: disable=g-import-not-at-top
  with cli.stdout_kept_for_the_result() as print_line:
    print_line("row")
    print("inside")
  assert capsys.readouterr().out == "row\ninside\n"
