"""Config files: every one loads, has the shared keys, documents itself; the
command line rejects bad keys and values with one line and no traceback."""

import importlib.util
import json
import os
from pathlib import Path
import re
import shlex
import subprocess
import sys
import types

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from addernet_jax import cli

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


def documented_commands() -> list[tuple[str, str, list[str]]]:
  """(where, program, argv) of every `python train.py`, `python eval.py`,
  `python -m addernet_jax.export` and `python -m addernet_jax.figures` line
  in README.md and docs/, continuations joined and optional flags' brackets
  dropped; lines with placeholders ("...", "<name>") left out."""
  found = []
  for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
    lines = md.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
      start, line = index, lines[index]
      while line.rstrip().endswith("\\") and index + 1 < len(lines):
        index += 1
        line = line.rstrip()[:-1] + " " + lines[index].strip()
      index += 1
      match = re.match(r"\s*(?:\$ )?(?:.*(?:&&|srun) )?python3? (?:-m )?"
                       r"((?:train|eval)\.py|addernet_jax\.(?:export|figures))"
                       r"(\s.*)?$", line)
      if not match or "..." in line or "<" in line:
        continue
      args = (match.group(2) or "").split(" #", 1)[0]
      if line[:match.start(1)].count('"') % 2:  # inside --command="..."
        args = args.rsplit('"', 1)[0]
      args = re.sub(r"\|[\w|]+", "", args)  # "latest|best": the first
      found.append((f"{md.name}:{start + 1}", match.group(1), shlex.split(
          args.replace("[", " ").replace("]", " "))))
  return found


_PARSE_DOCUMENTED = r"""
import argparse, contextlib, copy, importlib, io, json, sys
from absl import flags
from ml_collections import config_flags
program = sys.argv[1]
module = importlib.import_module(program.removesuffix(".py"))
if hasattr(module, "_define_flags"):
  module._define_flags()
own = [f for f in flags.FLAGS.get_key_flags_for_module(module)
       if f.name != "config"]


def parse_absl(argv):
  # A fresh parser each time: ml_collections adds the --config.* flags of
  # the file it loads, reading them from sys_argv.
  parser = flags.FlagValues()
  for flag in own:
    parser[flag.name] = copy.deepcopy(flag)
  config_flags.DEFINE_config_file("config", None, flag_values=parser,
                                  lock_config=True,
                                  sys_argv=[program, *argv])
  parser([program, *argv])
  if parser["config"].present:
    parser.config.to_dict()  # loads the file and applies the overrides


def parse_argparse(argv):
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      module.build_parser().parse_args(argv)
  except SystemExit:
    raise ValueError(stderr.getvalue().strip()) from None


parse = parse_argparse if hasattr(module, "build_parser") else parse_absl
failures = []
for where, argv in json.loads(sys.stdin.read()):
  try:
    parse(argv)
  except Exception as e:
    failures.append(f"{where}: {type(e).__name__}: {e}")
print(json.dumps(failures))
"""


@pytest.mark.extended  # .ci/run runs it (its extended step): about 12 s
@pytest.mark.parametrize("program", ["train.py", "eval.py",
                                     "addernet_jax.export",
                                     "addernet_jax.figures"])
def test_documented_commands_parse(program):
  """Every command of these programs in the README and docs names flags the
  program has, config files that exist and config keys of that config."""
  commands = [(where, argv) for where, name, argv in documented_commands()
              if name == program]
  assert len(commands) >= 3, commands
  result = subprocess.run(
      [sys.executable, "-c", _PARSE_DOCUMENTED, program],
      input=json.dumps(commands), cwd=ROOT, capture_output=True, text=True,
      timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  failures = json.loads(result.stdout.strip().splitlines()[-1])
  assert not failures, "\n".join(failures)


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
  if script == "eval.py":  # the same parse_flags: its own reads only
    files = {"partial.py": files["partial.py"]}
  for name, (text, needle) in files.items():
    (tmp_path / name).write_text(text)
    where = "--workdir" if script == "train.py" else "--checkpoint"
    result = run_cli(script, "--config", str(tmp_path / name),
                     f"{where}={tmp_path / 'run'}")
    assert_one_line_error(result, needle)
  assert not (tmp_path / "run").exists()


def test_config_files_whose_get_config_misbehaves_are_one_line_errors(
    tmp_path, monkeypatch, capsys):
  """get_config not a function, taking an argument, raising, returning a
  dict or None: ml_collections' folded traceback or a misleading "--config
  must have a value other than None" before. (parse_flags in process; the
  last case through train.py.)"""
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
    if name != "none.py":
      with pytest.raises(SystemExit) as e:
        _parse(["p", f"--config={tmp_path / name}", "--workdir=w"],
               monkeypatch)
      err = capsys.readouterr().err
      assert e.value.code == 2 and err.count("\n") == 1, err
      assert err.startswith("error: ") and needle in err and name in err, err
      continue
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


def test_no_length_or_no_logging_interval_is_refused_before_the_run():
  """Both lengths 0 failed only after the data loaded (naming num_epochs
  alone), and log_every_steps=0 as a ZeroDivisionError inside the loop."""
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  for fields, message in (
      ({"num_epochs": 0, "num_train_steps": 0},
       r"set config.num_epochs > 0 or config.num_train_steps > 0 \(got 0 "
       r"and 0\)"),
      ({"log_every_steps": 0}, r"config.log_every_steps must be > 0, got 0")):
    _, config = load(CONFIG_DIR / "smoke.py")
    config.update(fields)
    with pytest.raises(ValueError, match=message):
      train_lib.validate_config(config, 1)


def test_a_batch_the_devices_cannot_share_names_the_multiples_next_to_it():
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  _, config = load(CONFIG_DIR / "smoke.py")
  config.batch_size, config.eval_batch_size = 64, 30
  with pytest.raises(ValueError, match=r"config.batch_size=64 must be a "
                     r"positive multiple of the number of devices \(3\), "
                     r"e.g. --config.batch_size=63 or --config.batch_size=66$"):
    train_lib.validate_config(config, 3)
  config.batch_size = 2
  with pytest.raises(ValueError, match=r"e.g. --config.batch_size=3$"):
    train_lib.validate_config(config, 3)
  config.batch_size = 12
  with pytest.raises(ValueError, match=r"config.eval_batch_size=30 .* \(4\), "
                     r"e.g. --config.eval_batch_size=28 or "
                     r"--config.eval_batch_size=32$"):
    train_lib.validate_config(config, 4)


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


# From a mutation audit: cli's helpers and parse_flags in process.


def test_json_line_turns_numpy_integers_and_nested_non_finite_into_json():
  line = cli.json_line({"n": np.int64(7), "rows": (np.int32(-3),
                                                   np.float64("-inf")),
                        "deep": {"x": [np.float16(0.5), float("nan")]}})
  assert json.loads(line) == {"n": 7, "rows": [-3, None],
                              "deep": {"x": [0.5, None]}}
  line = cli.json_line({"ok": np.bool_(True), "top1": jnp.float32(0.25),
                        "loss": jnp.asarray(np.inf), "per_class": np.array(
                            [[0.5, np.nan], [1, 2]], np.float32)})
  assert json.loads(line) == {"ok": True, "top1": 0.25, "loss": None,
                              "per_class": [[0.5, None], [1.0, 2.0]]}
  # A bfloat16 NumPy scalar (ml_dtypes, not under np.floating) was a
  # TypeError.
  scalar = np.asarray(jnp.bfloat16(1.5))[()]
  assert json.loads(cli.json_line({"lr": scalar})) == {"lr": 1.5}


def test_print_error_is_one_line_and_unwraps_key_errors(capsys):
  assert cli.print_error(KeyError("dataset")) == 1
  assert capsys.readouterr().err == "error: dataset\n"
  assert cli.print_error(ValueError("bad  value\n  at\tline 3")) == 1
  assert capsys.readouterr().err == "error: bad value at line 3\n"
  assert cli.print_error(KeyError()) == 1  # no args: str() of the error
  assert capsys.readouterr().err == "error: \n"


def test_config_path_of_the_command_line():
  assert cli._config_path(["p", "--config=runs/a=b.py:x", "--workdir=w"]) == (
      "runs/a=b.py:x")
  assert cli._config_path(["p", "--workdir", "w", "--config", "c.py"]) == (
      "c.py")
  assert cli._config_path(["p", "--workdir=w", "--config"]) is None
  assert cli._config_path(["p", "--workdir=w"]) is None


def test_missing_flags_are_named_once():
  text = cli._missing_flags_text(["zz_nope_a", "zz_nope_b", "zz_nope_a"])
  assert "needs --zz_nope_a and --zz_nope_b (--zz_nope_a; --zz_nope_b)" in (
      text), text


def test_a_failed_computation_in_a_single_process_is_raised_again(
    monkeypatch, capsys):
  """exit_if_peer_failed returns for one process (the caller raises), and
  with several prints one line naming the process and leaves with 1."""
  exits = []

  def fake_exit(code):
    exits.append(code)
    raise SystemExit(code)
  monkeypatch.setattr(cli.os, "_exit", fake_exit)
  error = jax.errors.JaxRuntimeError("INTERNAL: boom\nsecond line")
  assert cli.exit_if_peer_failed(error) is None
  assert cli.exit_if_peer_failed(ValueError("x")) is None
  assert exits == [] and capsys.readouterr().err == ""
  monkeypatch.setattr(cli.jax, "process_count", lambda: 2)
  monkeypatch.setattr(cli.jax, "process_index", lambda: 1)
  assert cli.exit_if_peer_failed(ValueError("x")) is None
  with pytest.raises(SystemExit):
    cli.exit_if_peer_failed(error)
  assert exits == [1]
  err = capsys.readouterr().err
  assert err.startswith("error: process 1: a computation shared with the "
                        "other processes failed (INTERNAL: boom):"), err
  assert "second line" not in err


def test_unknown_fields_are_matched_against_their_siblings_only():
  """A nested typo is compared with the fields of its own section: the
  closer top-level `opt_decay` is no suggestion for `opt.decay`."""
  ref = ml_collections.ConfigDict({"opt_decay": 0.1, "seed": 1,
                                   "opt": {"decay_rate": 0.9}})
  config = ml_collections.ConfigDict({"opt_decay": 0.1, "sed": 2,
                                      "opt": {"decay_rate": 0.9,
                                              "decay": 0.5}})
  assert sorted(cli.unknown_config_fields(config, [ref])) == [
      "opt.decay (did you mean opt.decay_rate?)", "sed (did you mean seed?)"]


_CONFIG = ("import ml_collections\n"
           "def get_config():\n"
           "  c = ml_collections.ConfigDict()\n"
           "  c.model = 'lenet5'\n  c.seed = 4\n"
           "  c.pkkd = ml_collections.ConfigDict({'tau': 1.0})\n"
           "  return c\n")


def _parse(argv, monkeypatch):
  """cli.parse_flags(argv) on a private FlagValues with train.py's --config
  and --workdir (in place of absl's global one for `cli`)."""
  # ml_collections loads the file as module "config_config" with the
  # deprecated load_module(), which reuses the module left in sys.modules:
  # a file without get_config() found the previous file's.
  monkeypatch.delitem(sys.modules, "config_config", raising=False)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Training config file.",
                                  flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints.",
                      flag_values=fv)
  flags.mark_flags_as_required(["config", "workdir"], flag_values=fv)
  monkeypatch.setattr(cli, "flags", types.SimpleNamespace(
      FLAGS=fv, Error=flags.Error,
      UnrecognizedFlagError=flags.UnrecognizedFlagError))
  return cli.parse_flags(argv), fv


def test_parse_flags_exits_2_naming_only_the_overrides_at_fault(
    tmp_path, monkeypatch, capsys):
  path = tmp_path / "cfg.py"
  path.write_text(_CONFIG)
  # An override whose *value* is the unknown key's name, or whose key only
  # begins with it, is not the culprit.
  with pytest.raises(SystemExit) as e:
    _parse(["p", f"--config={path}", "--workdir=w", "--config.model=no_such",
            "--config.no_such=1"], monkeypatch)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: unknown config key 'no_such' in "
                        "--config.no_such=1 (not a field"), err
  assert "--config.model" not in err
  with pytest.raises(SystemExit):
    _parse(["p", f"--config={path}", "--workdir=w", "--config.pkkd.tau=2",
            "--config.pk=1"], monkeypatch)
  err = capsys.readouterr().err
  assert "in --config.pk=1 (not a field" in err and "tau" not in err, err
  # An unknown top-level key named as a valid nested one: only it is named,
  # in either order.
  for pair in (["--config.pkkd.tau=2", "--config.tau=1"],
               ["--config.tau=1", "--config.pkkd.tau=2"]):
    with pytest.raises(SystemExit):
      _parse(["p", f"--config={path}", "--workdir=w", *pair], monkeypatch)
    err = capsys.readouterr().err
    assert "key 'tau' in --config.tau=1 (not a field" in err, err
    assert "pkkd" not in err, err
  # An unknown key inside the path (a group the config lacks), alone or
  # beside a valid override of a field of that name.
  for pair, culprit in (
      (["--config.seed=3", "--config.optim.lr=0.1"], "--config.optim.lr=0.1"),
      (["--config.tau.x=1", "--config.pkkd.tau=2"], "--config.tau.x=1")):
    with pytest.raises(SystemExit) as e:
      _parse(["p", f"--config={path}", "--workdir=w", *pair], monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    key = culprit.split(".")[1]
    assert err.startswith(f"error: unknown config key '{key}' in {culprit} "
                          f"(not a field"), err
    assert "cannot load" not in err and pair[0] not in err.replace(
        culprit, ""), err
  for argv, needle in (
      ([f"--config={path}", "--workdir=w", "--config.seed=many"], "seed"),
      ([], "needs --config and --workdir (--config: Training config file; "
       "--workdir: Directory for checkpoints)"),
      ([f"--config={path}", "--workdir=w", "--wrokdir=x"],
       "unknown command line flag --wrokdir")):
    with pytest.raises(SystemExit) as e:
      _parse(["p", *argv], monkeypatch)
    assert e.value.code == 2, argv
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and needle in err, err
  remaining, fv = _parse(["p", f"--config={path}", "--workdir=w",
                          "--config.seed=9", "x"], monkeypatch)
  assert remaining == ["p", "x"] and fv["config"].value.seed == 9


def test_config_files_that_fail_while_loading_are_named_precisely(
    tmp_path, monkeypatch, capsys):
  """Only an AttributeError about get_config itself means "defines no
  get_config()": a field read but unset, a NameError that mentions
  get_config, another AttributeError keep their own words and line."""
  files = {
      "noget.py": ("x = 1\n", "it defines no get_config() function"),
      "field.py": ("import ml_collections\ndef get_config():\n"
                   "  c = ml_collections.ConfigDict({'a': 1})\n"
                   "  c.b = c.nope\n  return c\n",
                   "(line 4): it reads the field 'nope', which is not set"),
      "name.py": ("x = get_config_helper()\ndef get_config():\n  pass\n",
                  "(line 1): NameError: name 'get_config_helper' is not "
                  "defined"),
      "attr.py": ("import os\nos.no_such_thing\n",
                  "(line 2): AttributeError: module 'os' has no attribute"),
      "syntax.py": ("def get_config(:\n", "(line 1): SyntaxError")}
  for name, (text, needle) in files.items():
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit) as e:
      _parse(["p", f"--config={tmp_path / name}", "--workdir=w"],
             monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot load the --config file "
                          f"'{tmp_path / name}'"), err
    assert needle in err and err.count("\n") == 1, err


# From a second mutation audit (cli): the paths no test reached.


def test_missing_config_fields_named_leaves_other_attribute_errors_alone():
  """Only a ConfigDict's missing field becomes the "no field" ValueError;
  another AttributeError (a bug in the code) is raised as it was, not
  reported as "the config has no field None"."""
  config = ml_collections.ConfigDict({"a": 1})
  with pytest.raises(ValueError, match=r"^the config has no field 'nope'"):
    with cli.missing_config_fields_named():
      _ = config.nope
  with pytest.raises(AttributeError, match="no_such_thing"):
    with cli.missing_config_fields_named():
      _ = os.no_such_thing


def test_unknown_config_fields_warning_only_when_there_are_some(caplog):
  ref = ml_collections.ConfigDict({"seed": 1, "pkkd": {"tau": 1.0}})
  with caplog.at_level("WARNING"):
    cli.warn_unknown_config_fields(ref, [ref])
    assert not caplog.records, caplog.text
    cli.warn_unknown_config_fields(
        ml_collections.ConfigDict({"sed": 1, "pkkd": {"tau": 1.0}}), [ref])
  assert "not read: sed (did you mean seed?)" in caplog.text


def test_parse_flags_exits_2_for_a_config_file_that_does_not_exist(
    tmp_path, monkeypatch, capsys):
  """Exit status 2 for every command-line error, a missing file included."""
  with pytest.raises(SystemExit) as e:
    _parse(["p", f"--config={tmp_path / 'nowhere.py'}", "--workdir=w"],
           monkeypatch)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: cannot load the --config file: ") and (
      "nowhere.py" in err and err.count("\n") == 1), err


def test_stdout_block_keeps_a_late_print_out_of_the_result(capfd,
                                                           monkeypatch):
  """A print after the block's last print_line sat in sys.stdout's buffer
  when file descriptor 1 was restored: it must reach stderr, not the
  result. (sys.stdout a block-buffered file on descriptor 1, as when
  `train.py > result.json`.)"""
  stdout = open(1, "w", closefd=False)  # pylint: disable=consider-using-with
  monkeypatch.setattr(sys, "stdout", stdout)
  with cli.stdout_kept_for_the_result() as print_line:
    print_line("row")
    print("late")
  print("result")
  stdout.flush()
  out, err = capfd.readouterr()
  assert out == "row\nresult\n" and "late" in err, (out, err)


def test_overrides_at_fault_are_all_named_when_the_file_has_each_path(
    tmp_path, monkeypatch):
  """Of two overrides through the unknown key, the one whose path the
  config file lacks; where the file has both paths, both (not none, which
  turned the line into a misleading "cannot load the --config file")."""
  for text, culprits in (
      (_CONFIG, ["--config.tau=1"]),
      (_CONFIG.replace("  return c", "  c.tau = 0.5\n  return c"),
       ["--config.tau=1", "--config.pkkd.tau=2"])):
    path = tmp_path / "cfg.py"
    path.write_text(text)
    argv = ["p", f"--config={path}", "--config.tau=1", "--config.pkkd.tau=2"]
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv,
                                    sys_argv=argv)
    monkeypatch.setattr(cli, "flags", types.SimpleNamespace(FLAGS=fv))
    assert cli._overrides_setting(argv, "tau") == culprits
