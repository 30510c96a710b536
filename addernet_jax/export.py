r"""Serialises a trained model for serving with `jax.export`.

    python -m addernet_jax.export --config configs/cifar10_resnet20.py \
        --checkpoint WORKDIR --output resnet20.jaxexport
    python -m addernet_jax.export --config configs/cifar10_resnet20.py \
        --torch_checkpoint ResNet20-AdderNet.pth --output resnet20.jaxexport

The file holds one inference function, weights included: float32 images in
[0, 1], NHWC, any batch size (a symbolic batch dimension) -> float32 logits.
Normalisation and BatchNorm (running statistics, or with `--batch_stats=recalibrated`
statistics re-estimated on training batches) are inside. It runs with
JAX alone, without this repository:

    import jax, numpy as np
    exported = jax.export.deserialize(open("resnet20.jaxexport", "rb").read())
    logits = exported.call(np.zeros((8, 32, 32, 3), np.float32))

An AdderSR checkpoint (`config.task = "sr"`) exports its network alone:
float32 LR images in [0, 1] of any batch, height and width (RGB; a
one-channel model such as VDSR takes BT.601 Y / 255, as in training) ->
float32 images `scale` times larger, neither clipped nor rounded (the
evaluation rounds them to 8 bits).

The adder layers are exported in their pure-jnp form (the Pallas kernels are
platform-specific custom calls), lowered for every platform asked for
(default CPU and CUDA; `jax.export` refuses to run it on another).

`--output` replaces only a previous export: the config file, the torch
checkpoint, anything inside the checkpoint folder and any other existing
file are refused before any work (`check_output`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
from jax import export as jax_export
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from addernet_jax import checkpoint as ckpt_lib
from addernet_jax import cli
from addernet_jax import data as data_lib
from addernet_jax import models
from addernet_jax import train_lib

DEFAULT_PLATFORMS = ("cpu", "cuda")


def pixels_to_logits(model: Any, variables: dict[str, Any],
                     info: data_lib.DatasetInfo) -> Callable[[jax.Array],
                                                             jax.Array]:
  """`f(images)`: float images in [0, 1], NHWC -> float32 logits, in
  inference mode (running BatchNorm statistics), normalised as in training."""
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}

  def f(images: jax.Array) -> jax.Array:
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    x = (images.astype(jnp.float32) - mean) / std
    return model.apply(variables, x, train=False).astype(jnp.float32)

  return f


BATCH_STATS = ("running", "recalibrated")
# How far (top-1) the running statistics may trail re-estimated ones before
# exporting them draws a warning.
RUNNING_STATISTICS_GAP = 0.05


def load_variables(config: ml_collections.ConfigDict, *,
                   checkpoint: str | os.PathLike[str] | None = None,
                   which: str = "latest",
                   torch_checkpoint: str | os.PathLike[str] | None = None,
                   batch_stats: str = "running",
                   warn_running_statistics: bool = True
                   ) -> tuple[Any, dict[str, Any]]:
  """(model, variables as host arrays) of a training workdir or an
  official-layout PyTorch checkpoint; the model uses the pure-jnp adder.

  `batch_stats="recalibrated"` (a training workdir only) replaces the
  checkpoint's running BatchNorm statistics with ones re-estimated on
  training batches (`train_lib.recalibrated_variables`): after a short run
  the running ones make a much weaker model (1 epoch of MNIST: 15% against
  98% top-1).

  `warn_running_statistics`: log `running_statistics_caveat` (an export's
  wording) when the running statistics trail re-estimated ones.

  A PyTorch checkpoint must fit the config's dataset: its stem takes the
  dataset's image channels and its classifier has the dataset's classes
  (ValueError otherwise).
  """
  if (checkpoint is None) == (torch_checkpoint is None):
    raise ValueError("give exactly one of checkpoint (a training workdir) and"
                     " torch_checkpoint (a .pth file)")
  if train_lib.is_sr_task(config):
    raise ValueError("load_variables is for classification configs; an "
                     "AdderSR config (config.task='sr') loads with "
                     "load_sr_variables")
  if batch_stats not in BATCH_STATS:
    raise ValueError(f"batch_stats must be one of {BATCH_STATS}, got "
                     f"{batch_stats!r}")
  if batch_stats == "recalibrated" and torch_checkpoint is not None:
    raise ValueError("batch_stats='recalibrated' re-estimates a training "
                     "workdir's statistics (--checkpoint); an official "
                     "checkpoint keeps its running ones")
  dtype = train_lib.get_dtype(config.dtype)
  if torch_checkpoint is not None:
    variables, kwargs = train_lib.torch_checkpoint_variables(
        config, torch_checkpoint)
    num_classes, conv = kwargs["num_classes"], kwargs["conv"]
  elif batch_stats == "recalibrated":
    variables, result = train_lib.recalibrated_variables(config, checkpoint,
                                                         which)
    logging.info("BatchNorm statistics re-estimated: top-1 %.2f%% (running "
                 "statistics %.2f%%) at step %d", 100 * result[
                     "top1_recalibrated"], 100 * result["top1"],
                 result["step"])
    num_classes, conv = config.num_classes, config.conv
  else:
    restored = train_lib.restore_variables(config, checkpoint, which)
    variables = {"params": restored["params"],
                 "batch_stats": restored["batch_stats"]}
    num_classes, conv = config.num_classes, config.conv
    caveat = warn_running_statistics and running_statistics_caveat(
        checkpoint, int(jax.device_get(restored["step"])))
    if caveat:
      logging.warning("%s", caveat)
  model = models.get_model(config.model, num_classes=num_classes, conv=conv,
                           dtype=dtype, implementation="xla")
  return model, jax.device_get(variables)


def load_sr_variables(config: ml_collections.ConfigDict,
                      checkpoint: str | os.PathLike[str],
                      which: str = "latest") -> tuple[Any, dict[str, Any]]:
  """(model, variables as host arrays) of an AdderSR training workdir (the
  checkpoint's recorded architecture is checked against `config`); the model
  uses the pure-jnp adder."""
  from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
  restored = sr_train.restore_variables(config, checkpoint, which)
  variables = {"params": restored["params"],
               "batch_stats": restored["batch_stats"]}
  model_config = ml_collections.ConfigDict(config.to_dict())
  model_config.implementation = "xla"
  model = sr_train.build_model(model_config, bn_axis_name=None)
  return model, jax.device_get(variables)


def running_statistics_caveat(checkpoint: str | os.PathLike[str],
                              step: int) -> str | None:
  """A warning when the evaluation saved with checkpoint `step` shows its
  running BatchNorm statistics trailing re-estimated ones by more than
  `RUNNING_STATISTICS_GAP` top-1 (as after a short run); None otherwise or
  when the step has no such evaluation."""
  mgr = ckpt_lib.CheckpointManager(_checkpoint_folder(checkpoint),
                                   read_only=True)
  try:
    metrics = mgr.metrics(step) or {}
  finally:
    mgr.close()
  running = metrics.get("eval_top1")
  recalibrated = metrics.get("eval_top1_recalibrated")
  if (not isinstance(running, (int, float))
      or not isinstance(recalibrated, (int, float))
      or recalibrated - running <= RUNNING_STATISTICS_GAP):
    return None
  return (f"the checkpoint's running BatchNorm statistics, which the export "
          f"holds, score {100 * running:.2f}% top-1 at step {step} against "
          f"{100 * recalibrated:.2f}% with statistics re-estimated (usual "
          f"after a short run): --batch_stats=recalibrated exports the "
          f"re-estimated ones")


def export_model(model: Any, variables: dict[str, Any],
                 info: data_lib.DatasetInfo, *,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS
                 ) -> jax_export.Exported:
  """`jax.export.Exported` of `pixels_to_logits` with a symbolic batch."""
  _check_platforms(platforms)
  (batch,) = jax_export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *info.image_shape), jnp.float32)
  fn = jax.jit(pixels_to_logits(model, variables, info))
  return jax_export.export(fn, platforms=tuple(platforms))(spec)


def export_sr_model(model: Any, variables: dict[str, Any], colors: int, *,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS
                    ) -> jax_export.Exported:
  """`jax.export.Exported` of an SR network in inference mode: float32 LR
  images in [0, 1], shape (batch, height, width, colors), every size
  symbolic -> float32 images `scale` times larger (not clipped)."""
  _check_platforms(platforms)
  batch, height, width = jax_export.symbolic_shape("batch, height, width")
  spec = jax.ShapeDtypeStruct((batch, height, width, colors), jnp.float32)
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}
  fn = jax.jit(lambda x: model.apply(variables, x.astype(jnp.float32),
                                     train=False).astype(jnp.float32))
  return jax_export.export(fn, platforms=tuple(platforms))(spec)


def _check_platforms(platforms: Sequence[str]) -> None:
  unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
  if unknown or not platforms:
    raise ValueError(f"platforms must be among cpu, cuda, rocm, tpu; got "
                     f"{list(platforms)}")


def _checkpoint_folder(workdir: str | os.PathLike[str]) -> Path:
  """Where the checkpoints of a --checkpoint workdir live (resolved):
  `<workdir>/checkpoints`, or the folder itself when given directly."""
  root = Path(workdir).expanduser().resolve()
  return root / "checkpoints" if (root / "checkpoints").is_dir() else root


def _same_file(a: Path, b: Path) -> bool:
  """Whether `a` and `b` name one file (links followed; paths compared
  when either does not exist)."""
  if a.exists() and b.exists():
    return os.path.samefile(a, b)
  return a.resolve() == b.resolve()


def is_exported_model(path: str | os.PathLike[str]) -> bool:
  """Whether `path` is a file that `load` reads (a `jax.export` file)."""
  try:
    load(path)
  except (OSError, ValueError):
    return False
  return True


def check_output(output: str | os.PathLike[str], *,
                 checkpoint: str | os.PathLike[str] | None = None,
                 torch_checkpoint: str | os.PathLike[str] | None = None,
                 config_file: str | os.PathLike[str] | None = None
                 ) -> Path:
  """`output` (with ~ expanded) if an exported model can be written there
  without harming the user's files; a ValueError before any work otherwise.

  Refused: an existing directory; a path below a regular file; the
  `torch_checkpoint` file and the `config_file` themselves; anything inside
  the checkpoint folder of the `checkpoint` workdir; an existing path that
  is not a regular file; an existing file that is not an exported model
  (only a previous export is replaced: a workdir's metrics.jsonl is safe,
  a new `<workdir>/model.jaxexport` is fine).
  """
  path = Path(output).expanduser()
  if path.is_dir():
    raise ValueError(f"output {str(output)!r} is a directory; give a file "
                     f"name")
  blocker = ckpt_lib.file_in_the_way(path)
  if blocker is not None:
    raise ValueError(f"cannot write output {str(output)!r}: "
                     f"{str(blocker)!r} is a file, not a directory")
  for source, what in ((torch_checkpoint, "the torch checkpoint"),
                       (config_file, "the --config file")):
    if source is not None and _same_file(Path(source).expanduser(), path):
      raise ValueError(f"output {str(output)!r} is {what} itself; give "
                       f"another file name")
  if checkpoint is not None:
    folder = _checkpoint_folder(checkpoint)
    resolved = path.resolve()
    if resolved == folder or folder in resolved.parents:
      raise ValueError(f"output {str(output)!r} is inside the checkpoint "
                       f"folder {str(folder)!r} of --checkpoint; write it "
                       f"elsewhere")
  if path.exists():
    if not path.is_file():
      raise ValueError(f"output {str(output)!r} exists and is not a regular "
                       f"file; give another file name")
    if not is_exported_model(path):
      raise ValueError(f"output {str(output)!r} exists and is not an "
                       f"exported model; only a previous export is "
                       f"replaced: give another file name or delete it")
  return path


def save(exported: jax_export.Exported, path: str | os.PathLike[str]) -> Path:
  """Writes `exported.serialize()` to `path` (atomically); returns it."""
  path = check_output(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_bytes(exported.serialize())
  os.replace(tmp, path)
  return path


def load(path: str | os.PathLike[str]) -> jax_export.Exported:
  """The `jax.export.Exported` saved at `path` (call it with `.call(x)`)."""
  try:
    return jax_export.deserialize(bytearray(Path(path).read_bytes()))
  except FileNotFoundError:
    raise FileNotFoundError(f"exported model {str(path)!r} does not exist"
                            ) from None
  except Exception as e:  # flatbuffers raises assorted errors on bad bytes
    raise ValueError(f"{str(path)!r} is not a jax.export file: "
                     f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------- CLI --

FLAGS = flags.FLAGS


def _define_flags() -> None:
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file(
      "config", None, "The training config of the model (configs/*.py).",
      lock_config=True)
  flags.DEFINE_string("checkpoint", None, "A training workdir.")
  flags.DEFINE_alias("workdir", "checkpoint")  # the name train.py gives it
  flags.DEFINE_enum("which", "latest", ["latest", "best"],
                    "With --checkpoint: the latest or the best checkpoint.")
  flags.DEFINE_string("torch_checkpoint", None,
                      "An official-layout PyTorch .pth file.")
  flags.DEFINE_string("output", None, "Where to write the exported model.")
  flags.DEFINE_list("platforms", list(DEFAULT_PLATFORMS),
                    "Platforms to lower for (cpu, cuda, rocm, tpu).")
  flags.DEFINE_enum("batch_stats", "running", list(BATCH_STATS),
                    "With --checkpoint: the checkpoint's running BatchNorm "
                    "statistics, or ones re-estimated on training batches "
                    "as training's final evaluation does (needs the "
                    "training data; much better after a short run).")
  flags.mark_flags_as_required(["config", "output"])


def main(argv: Sequence[str]) -> int:
  """Exports; the last line printed is a JSON object with `output`,
  `bytes`, `platforms` and `input_shape`."""
  if len(argv) > 1:
    return cli.print_error(f"unexpected arguments: {list(argv[1:])}")
  try:
    config = FLAGS.config
    check_output(FLAGS.output, checkpoint=FLAGS.checkpoint,
                 torch_checkpoint=FLAGS.torch_checkpoint,
                 config_file=config_flags.get_config_filename(
                     FLAGS["config"]))
    if train_lib.is_sr_task(config):
      exported, described = _export_sr(config)
    else:
      model, variables = load_variables(
          config, checkpoint=FLAGS.checkpoint, which=FLAGS.which,
          torch_checkpoint=FLAGS.torch_checkpoint,
          batch_stats=FLAGS.batch_stats)
      info = data_lib.dataset_info(config.dataset)
      exported = export_model(model, variables, info,
                              platforms=FLAGS.platforms)
      described = {"input_shape": ["batch", *info.image_shape],
                   "batch_stats": FLAGS.batch_stats,
                   "input": "float32 pixels in [0, 1]"}
    path = save(exported, FLAGS.output)
  except cli.USER_ERRORS as e:
    return cli.print_error(e)
  print(json.dumps({"output": str(path), "bytes": path.stat().st_size,
                    "platforms": list(exported.platforms), **described}),
        flush=True)
  return 0


def _export_sr(config: ml_collections.ConfigDict
               ) -> tuple[jax_export.Exported, dict[str, Any]]:
  """main's export of an AdderSR config: (exported, JSON fields)."""
  from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
  if FLAGS.torch_checkpoint is not None:
    raise ValueError("--torch_checkpoint is for classification configs: "
                     "there are no official AdderSR weights; give "
                     "--checkpoint WORKDIR")
  if FLAGS.checkpoint is None:
    raise ValueError("give --checkpoint WORKDIR (an AdderSR training run)")
  if FLAGS.batch_stats != "running":
    raise ValueError("--batch_stats=recalibrated is for classification "
                     "configs; an AdderSR model is evaluated, and exported, "
                     "with its running BatchNorm statistics")
  model, variables = load_sr_variables(config, FLAGS.checkpoint, FLAGS.which)
  colors = sr_train.model_colors(config)
  exported = export_sr_model(model, variables, colors,
                             platforms=FLAGS.platforms)
  return exported, {
      "input_shape": ["batch", "height", "width", colors],
      "output_shape": ["batch", f"{config.scale}*height",
                       f"{config.scale}*width", colors],
      "input": ("float32 LR pixels in [0, 1]" if colors == 3 else
                "float32 BT.601 Y / 255 of the LR image"),
      "output_values": "float32, neither clipped nor rounded"}


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
