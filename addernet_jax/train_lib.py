"""Training: a data-parallel train step, per-epoch evaluation, checkpoints.

`train_and_evaluate(config, workdir)` is what `train.py` runs. The step is
`jax.jit` over a 1-D mesh of every device of every host, with the per-device
work inside `jax.shard_map` (axis `parallel.BATCH_AXIS`): each device computes
the gradient of its slice of the global batch, the gradients and metrics are
averaged with `lax.pmean` before the optimizer (so the adaptive learning rate
sees the global gradient) and BatchNorm averages its batch statistics over the
axis, so N devices compute what one device computes with the same global
batch, up to float32 reduction order. `check_vma=False` gives the classic pmap
semantics (docs/design.md §5: with `check_vma=True` the gradient of replicated
parameters is already summed and a following pmean does nothing).

In-memory datasets (MNIST, CIFAR, digits) live whole on every device as
uint8; the order of epoch `e` is a permutation drawn from (seed, e) with
`jax.random`, every step gathers its slice of that order on device and
augments it inside the jitted step (random crop/flip keyed by (seed, step,
position in the global batch), so the augmentation does not depend on the
device count either). The last partial batch of every epoch is dropped.
Streaming datasets (ImageNet) come from `data.streaming_iterator`, one slice
per process, assembled with `parallel.global_batch_from_local`.

With `config.distill = "pkkd"` the state also holds a CNN teacher and the
step is `distill.make_pkkd_core` (docs/pkkd.md), in the same shard_map.

Everything a step depends on is a function of (seed, step), so a run resumed
from a checkpoint ends bit-identical to an uninterrupted one (same program,
same device count).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

from absl import logging
import flax
from flax import traverse_util
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from addernet_jax import checkpoint as ckpt_lib
from addernet_jax import cli
from addernet_jax import data as data_lib
from addernet_jax import distill
from addernet_jax import eval_lib
from addernet_jax import models
from addernet_jax import optim
from addernet_jax import parallel
from addernet_jax import preemption as preemption_lib
from addernet_jax import progress as progress_lib
from addernet_jax import step_loop

P = jax.sharding.PartitionSpec
BATCH_AXIS = parallel.BATCH_AXIS
log = logging


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics and the augmentation key.

  Attributes (beyond `step`, `params`, `opt_state`, `apply_fn`, `tx`):
    batch_stats: BatchNorm running statistics (the `batch_stats` collection).
    rng: raw uint32[2] PRNG key; step `s` augments with `fold_in(rng, s)`.
  """
  batch_stats: Any = None
  rng: jax.Array | None = None


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf (the run stops, nothing is saved)."""


class NonFiniteStateError(NonFiniteLossError):
  """The parameters, batch statistics or optimizer state hold NaN or Inf at a
  checkpoint (the run stops, that checkpoint is not saved)."""


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of integer labels (float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def get_dtype(name: str) -> Any:
  """'float32' | 'bfloat16' | 'float16' -> the jnp dtype (ValueError else)."""
  if name not in DTYPES:
    raise ValueError(f"config.dtype must be one of {sorted(DTYPES)}, got "
                     f"{name!r}")
  return DTYPES[name]


def build_model(config: ml_collections.ConfigDict,
                bn_axis_name: str | None = BATCH_AXIS) -> flax.linen.Module:
  """The config's model; BatchNorm synchronised over `bn_axis_name`."""
  return models.get_model(config.model, num_classes=config.num_classes,
                          conv=config.conv, dtype=get_dtype(config.dtype),
                          bn_axis_name=bn_axis_name,
                          implementation=config.get("implementation"))


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array,
                       image_shape: tuple[int, int, int], *,
                       steps_per_epoch: int | None = None) -> TrainState:
  """Initial TrainState: parameters from `rng`, the config's optimizer.

  Args:
    config: a training config (model, conv, num_classes, dtype, optimizer
      keys).
    rng: raw PRNG key; split into the initialisation key and `state.rng`.
    image_shape: (H, W, C) of one input image.
    steps_per_epoch: for the per-epoch learning-rate schedule.
  """
  model = build_model(config)
  init_rng, aug_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), get_dtype(config.dtype))
  variables = model.init(init_rng, dummy, train=False)
  params = variables["params"]
  tx = optim.make_optimizer(config, params, steps_per_epoch=steps_per_epoch)
  fields = dict(apply_fn=model.apply, params=params, tx=tx,
                batch_stats=variables.get("batch_stats", {}), rng=aug_rng)
  if distill.distill_kind(config) == "pkkd":
    return _create_pkkd_state(config, init_rng, dummy, fields,
                              steps_per_epoch)
  return TrainState.create(**fields)


def _create_pkkd_state(config: ml_collections.ConfigDict, init_rng: jax.Array,
                       dummy: jax.Array, fields: dict[str, Any],
                       steps_per_epoch: int | None
                       ) -> distill.DistillTrainState:
  """The student's state (`fields`, initialised exactly as a plain run
  with the same seed) plus a CNN teacher of the same architecture, the
  identity linear transformations of the distilled layers, and the
  teacher's plain SGD (docs/pkkd.md)."""
  settings = distill.settings_from_config(config)
  t_config = distill.teacher_config(config)
  teacher = build_model(t_config)
  t_vars = teacher.init(jax.random.fold_in(init_rng, 1), dummy, train=False)
  channels = distill.distilled_layers(
      fields["apply_fn"], {"params": fields["params"],
                           "batch_stats": fields["batch_stats"]},
      dummy, settings.layers)
  t_params = {"model": t_vars["params"],
              "transform": distill.identity_transforms(channels)}
  t_tx = optim.make_optimizer(t_config, t_params,
                              steps_per_epoch=steps_per_epoch)
  return distill.DistillTrainState.create(
      **fields, teacher_params=t_params,
      teacher_batch_stats=t_vars.get("batch_stats", {}),
      teacher_opt_state=t_tx.init(t_params), teacher_apply_fn=teacher.apply,
      teacher_tx=t_tx)


# ----------------------------------------------------------------- steps --


def _train_core(state: TrainState, images: jax.Array, labels: jax.Array
                ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One per-device SGD step on a local batch (inside shard_map)."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"])
    return cross_entropy_loss(logits, labels), (logits, updates)

  (loss, (logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = lax.pmean(grads, BATCH_AXIS)
  metrics = lax.pmean(
      {"loss": loss,
       "top1": jnp.mean((jnp.argmax(logits, -1) == labels).astype(
           jnp.float32))}, BATCH_AXIS)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates["batch_stats"])
  return new_state, metrics


def make_core(config: ml_collections.ConfigDict,
              steps_per_epoch: int = 1) -> Callable:
  """The per-device update of `config.distill`: the plain SGD step, or
  PKKD's joint student/teacher step (`distill.make_pkkd_core`)."""
  if distill.distill_kind(config) == "pkkd":
    return distill.make_pkkd_core(
        distill.settings_from_config(config, steps_per_epoch), BATCH_AXIS)
  return _train_core


def augment_batch(images_uint8: jax.Array, step_key: jax.Array,
                  positions: jax.Array, info: data_lib.DatasetInfo
                  ) -> jax.Array:
  """Training augmentation keyed per example by its position in the global
  batch (independent of how the batch is split over devices)."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, positions)
  one = lambda im, k: data_lib.augment_and_normalize(im[None], k, info,
                                                     train=True)[0]
  return jax.vmap(one)(images_uint8, keys)


def make_in_memory_train_step(mesh: jax.sharding.Mesh,
                              info: data_lib.DatasetInfo,
                              global_batch_size: int,
                              core: Callable = _train_core) -> Callable:
  """jit(shard_map(step)) for a dataset resident on every device.

  The returned function is `step(state, images, labels, perm, step_in_epoch)
  -> (state, metrics)`, with `images`/`labels` the whole training set and
  `perm` the epoch's order (all replicated). `core(state, images, labels)`
  is the per-device update (`make_core`).
  """
  num_devices = mesh.devices.size
  local = global_batch_size // num_devices

  def per_device(state, images, labels, perm, step_in_epoch):
    offset = lax.axis_index(BATCH_AXIS) * local
    start = step_in_epoch * global_batch_size + offset
    idx = lax.dynamic_slice(perm, (start,), (local,))
    step_key = jax.random.fold_in(state.rng, state.step)
    x = augment_batch(images[idx], step_key,
                      offset + jnp.arange(local, dtype=jnp.int32), info)
    return core(state, x, labels[idx])

  return jax.jit(parallel.data_parallel(per_device, mesh,
                                        in_specs=(P(),) * 5,
                                        out_specs=(P(), P())))


def make_streaming_train_step(mesh: jax.sharding.Mesh,
                              core: Callable = _train_core) -> Callable:
  """jit(shard_map(step)) for batches sharded over the mesh:
  `step(state, images, labels) -> (state, metrics)`."""
  return jax.jit(parallel.data_parallel(
      core, mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)),
      out_specs=(P(), P())))


# -------------------------------------------------------------- the loop --


def _ends_with_newline(path: Path) -> bool:
  with open(path, "rb") as f:
    f.seek(-1, os.SEEK_END)
    return f.read(1) == b"\n"


class MetricsWriter:
  """metrics.jsonl and TensorBoard in the workdir (process 0 only).

  A run resumed at `start_step` first appends `{"step": start_step,
  "resumed_from_step": start_step}` (also at step 0 when the file has lines:
  a run killed before its first checkpoint starts over): the lines above it
  past that step come from the interrupted run after its last checkpoint,
  and readers (`figures.read_metrics`) drop them.
  """

  def __init__(self, workdir: Path, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self._tb = None
    if enabled:
      path = workdir / "metrics.jsonl"
      earlier = path.is_file() and path.stat().st_size > 0
      # A run killed mid-write leaves half a line: start on a new one (the
      # marker was appended to it, and lost with it).
      torn = earlier and not _ends_with_newline(path)
      self._file = open(path, "a", encoding="utf-8")
      if torn:
        self._file.write("\n")
      if start_step > 0 or earlier:
        self._file.write(json.dumps({"step": int(start_step),
                                     "resumed_from_step": int(start_step)})
                         + "\n")
        self._file.flush()
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(str(workdir / "tensorboard"))
      except ImportError:  # optional
        log.warning("tensorboardX is not installed: no TensorBoard logs")

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in
                                    metrics.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in metrics.items():
        if isinstance(value, (int, float)) and key not in ("step",):
          self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      if self._tb is not None:
        self._tb.close()


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


# What a checkpoint's meta records of the run, and a resume or an evaluation
# must agree with (older checkpoints may lack some keys: those are skipped).
_RESUME_KEYS = ("model", "conv", "dataset", "distill", "seed", "batch_size",
                "holdout_examples", "steps_per_epoch")
_EVAL_KEYS = ("model", "conv", "dataset")


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config values a checkpoint's meta records for `check_meta`."""
  return {"model": config.model, "conv": config.conv,
          "dataset": config.dataset, "distill": distill.distill_kind(config),
          "seed": config.get("seed"), "batch_size": config.get("batch_size"),
          "holdout_examples": int(config.get("holdout_examples", 0) or 0)}


def schedule_identity(config: ml_collections.ConfigDict,
                      steps_per_epoch: int) -> dict[str, float]:
  """What a checkpoint's meta records of the learning-rate schedule: its peak
  and its length in epochs (`optim.schedule_epochs`)."""
  return {"learning_rate": float(config.learning_rate),
          "schedule_epochs": optim.schedule_epochs(config, steps_per_epoch)}


def schedule_change(meta: dict[str, Any], config: ml_collections.ConfigDict,
                    steps_per_epoch: int, step: int) -> str | None:
  """A warning when a resumed run's schedule differs from the checkpoint's
  (e.g. num_epochs raised to train longer): the cosine is recomputed over
  the new length, so the rate jumps at the resume step. None when it is the
  same, or the meta predates these keys."""
  old_lr, old_epochs = meta.get("learning_rate"), meta.get("schedule_epochs")
  if not isinstance(old_lr, (int, float)) or not isinstance(
      old_epochs, (int, float)):
    return None
  new = schedule_identity(config, steps_per_epoch)
  if (math.isclose(old_lr, new["learning_rate"]) and
      math.isclose(old_epochs, new["schedule_epochs"])):
    return None
  old_config = {"learning_rate": old_lr, "num_epochs": round(old_epochs) - 1,
                "num_train_steps": 0}
  before = float(optim.learning_rate_schedule(old_config, steps_per_epoch)(
      step))
  after = float(optim.learning_rate_schedule(config, steps_per_epoch)(step))
  jump = (f"so the rate goes from {before:.3g} to {after:.3g}"
          if not math.isclose(before, after, rel_tol=1e-3) else
          f"the same rate there ({after:.3g}), another decay after it")
  return (f"the learning-rate schedule differs from the checkpoint's run "
          f"(peak {old_lr:g} -> {new['learning_rate']:g}, cosine over "
          f"{old_epochs:g} -> {new['schedule_epochs']:g} epochs): from step "
          f"{step} it follows the new one, {jump}")


def device_count_change(meta: dict[str, Any], num_devices: int
                        ) -> str | None:
  """A warning when a run resumes on another device count than its
  checkpoint was written on (None if the same, or not recorded)."""
  saved_on = meta.get("num_devices")
  if not isinstance(saved_on, int) or saved_on == num_devices:
    return None
  return (f"resuming on {num_devices} devices a run checkpointed on "
          f"{saved_on}: it continues correctly, but with another float32 "
          f"summation order, so not bit-identical to an uninterrupted run")


def check_meta(meta: Any, expected: dict[str, Any], keys: tuple[str, ...],
               where: str, advice: str) -> None:
  """ValueError listing every key of `keys` where a checkpoint's `meta`
  differs from `expected` (keys absent from either are not compared)."""
  if not isinstance(meta, dict):
    return
  diffs = [f"{k} {meta[k]!r} in the checkpoint, {expected[k]!r} in the "
           f"config" for k in keys
           if k in meta and k in expected and meta[k] != expected[k]]
  if diffs:
    raise ValueError(f"{where} does not match the config: "
                     f"{'; '.join(diffs)}. {advice}")


RESUME_ADVICE = ("Resuming would mix two runs: rerun with the values it was "
                 "trained with, or give a new --workdir")
EVAL_ADVICE = ("Read it (evaluate, export, attack) with the config it was "
               "trained with")
INIT_ADVICE = ("config.init_from takes weights of the config's model, conv "
               "kind and dataset")


@contextlib.contextmanager
def explained_by_meta(directory: str | os.PathLike[str],
                      expected: dict[str, Any], keys: tuple[str, ...],
                      advice: str) -> Iterator[None]:
  """Turns a `CheckpointStructureError` inside the `with` into `check_meta`'s
  error when the newest checkpoint's meta shows why (e.g. `distill` or
  `model` differ): the config, not a parameter shape, is what to fix."""
  try:
    yield
  except ckpt_lib.CheckpointStructureError:
    meta = ckpt_lib.latest_meta(directory)
    check_meta(meta, expected, keys,
               f"the checkpoint at step {meta.get('step', '?')} in "
               f"{str(directory)!r}", advice)
    raise


def validate_config(config: ml_collections.ConfigDict, num_devices: int
                    ) -> data_lib.DatasetInfo:
  """Checks the keys the loop depends on; ValueError naming the bad value."""
  info = data_lib.dataset_info(config.dataset)
  if config.num_classes != info.num_classes:
    raise ValueError(
        f"config.num_classes={config.num_classes} but {config.dataset} has "
        f"{info.num_classes} classes")
  for key in ("batch_size", "eval_batch_size"):
    value = config.get(key)
    if not isinstance(value, int) or value <= 0 or value % num_devices:
      choices = " or ".join(f"--config.{key}={m}" for m in
                            parallel.nearest_multiples(value, num_devices))
      raise ValueError(
          f"config.{key}={value!r} must be a positive multiple of the number "
          f"of devices ({num_devices}), e.g. {choices}")
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs > 0 or config.num_train_steps > 0"
                     f" (got {config.num_epochs} and {config.num_train_steps})")
  if config.log_every_steps <= 0:
    raise ValueError(f"config.log_every_steps must be > 0, got "
                     f"{config.log_every_steps}")
  optim.check_config(config)
  check_checkpointing(config)
  init_from = config.get("init_from")
  if init_from is not None and not isinstance(init_from, str):
    raise ValueError(f"config.init_from={init_from!r} must be a path (a "
                     f"training workdir or a .pth file)")
  recalibrate = config.get("recalibrate_bn_batches", 0)
  if recalibrate is not None and (not isinstance(recalibrate, int)
                                  or recalibrate < 0):
    raise ValueError(f"config.recalibrate_bn_batches={recalibrate!r} must be "
                     f"an int >= 0 (0: no re-estimation)")
  holdout = config.get("holdout_examples", 0)
  if holdout is not None and (not isinstance(holdout, int) or holdout < 0):
    raise ValueError(f"config.holdout_examples={holdout!r} must be an int >= "
                     f"0 (0: evaluate on the test split)")
  get_dtype(config.dtype)
  if config.conv not in models.common.CONV_KINDS:
    raise ValueError(f"config.conv must be one of {models.common.CONV_KINDS},"
                     f" got {config.conv!r}")
  if config.model not in models.MODEL_NAMES:
    raise ValueError(f"config.model must be one of {models.MODEL_NAMES}, got "
                     f"{config.model!r}")
  if distill.distill_kind(config) == "pkkd":
    distill.settings_from_config(config)
  return info


def check_checkpointing(config: ml_collections.ConfigDict) -> None:
  """ValueError unless config.max_checkpoints_to_keep is a positive int and
  config.checkpoint_every_steps is > 0 or 0/-1 (every epoch)."""
  value = config.get("max_checkpoints_to_keep")
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f"config.max_checkpoints_to_keep={value!r} must be an "
                     f"int >= 1")
  every = config.get("checkpoint_every_steps")
  if every is not None and (not isinstance(every, int) or every < -1):
    raise ValueError(f"config.checkpoint_every_steps={every!r} must be a "
                     f"number of steps > 0, or 0 or -1 (every epoch)")


class InMemoryData:
  """A training split and an evaluation split resident on every device."""

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               eval_images: np.ndarray, eval_labels: np.ndarray,
               batch_size: int, mesh: jax.sharding.Mesh):
    """From host arrays (uint8 images NHWC, integer labels; the same on every
    process), e.g. synthetic data in a benchmark."""
    self.num_train = len(labels)
    self.steps_per_epoch = self.num_train // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"config.batch_size={batch_size} exceeds the "
                       f"{self.num_train} training examples")
    rep = parallel.replicated_sharding(mesh)
    self.images = _replicate(images, rep)
    self.labels = _replicate(np.asarray(labels).astype(np.int32), rep)
    self.eval = eval_lib.InMemoryEvalSet(eval_images, eval_labels, mesh)
    n = self.num_train
    self._perm_fn = jax.jit(
        lambda key, epoch: jax.random.permutation(
            jax.random.fold_in(key, epoch), n).astype(jnp.int32),
        out_shardings=rep)

  @classmethod
  def load(cls, config: ml_collections.ConfigDict,
           mesh: jax.sharding.Mesh) -> "InMemoryData":
    """The splits of `config.dataset` (held-out and evaluation limits from
    the config)."""
    (images, labels), (eval_images, eval_labels) = (
        data_lib.load_in_memory_splits(
            config.dataset, config.data_dir,
            holdout_examples=config.get("holdout_examples", 0),
            eval_max_examples=config.get("eval_max_examples", -1),
            progress_bar=progress_lib.shown(config)))
    return cls(images, labels, eval_images, eval_labels, config.batch_size,
               mesh)

  def permutation(self, data_key: jax.Array, epoch: int) -> jax.Array:
    """The order of training epoch `epoch` (a function of seed and epoch)."""
    return self._perm_fn(data_key, epoch)


def _replicate(array: np.ndarray, sharding) -> jax.Array:
  """A host array (the same on every process) replicated on the mesh."""
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def _abstract(tree: Any, sharding) -> Any:
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def _fetch_metrics(pending: list[dict[str, jax.Array]], first_step: int
                   ) -> dict[str, float]:
  """Averages the pending per-step metrics; raises on a non-finite loss."""
  stacked = jax.device_get(pending)
  losses = np.array([m["loss"] for m in stacked], np.float64)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0]) + 1
    raise NonFiniteLossError(
        f"training loss is {losses[bad[0]]} at step {step}; stopping without "
        "saving (checkpoints written before it, if any, are kept)")
  result = {"train_loss": float(losses.mean()),
            "train_top1": float(np.mean([m["top1"] for m in stacked]))}
  for key in stacked[0]:  # e.g. PKKD's teacher_loss, feature_loss
    if key not in ("loss", "top1"):
      result[f"train_{key}"] = float(np.mean([m[key] for m in stacked]))
  return result


def is_sr_task(config: ml_collections.ConfigDict) -> bool:
  """Whether `config.task` is "sr" (AdderSR super-resolution) rather than
  "classification" (the default; ValueError for anything else)."""
  task = config.get("task", "classification")
  if task not in ("classification", "sr"):
    raise ValueError(f"config.task must be 'classification' or 'sr', got "
                     f"{task!r}")
  return task == "sr"


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Args:
    config: a training config (see configs/default.py).
    workdir: checkpoints in `<workdir>/checkpoints`, metrics in
      `<workdir>/metrics.jsonl` and `<workdir>/tensorboard`.

  Returns:
    The summary printed as the last line by train.py: step, epoch,
    train_loss, train_top1, eval_loss, eval_top1, eval_top5 (and
    eval_top1_recalibrated, preempted, ...).

  Raises:
    ValueError, TypeError, FileNotFoundError: bad config or data.
    NonFiniteLossError: the loss became NaN or Inf.
  """
  if is_sr_task(config):  # AdderSR: its own loop (addernet_jax/sr/train.py)
    if config.get("init_from"):
      raise ValueError("config.init_from is for classification runs; an "
                       "AdderSR run starts from random weights")
    from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
    return sr_train.train_and_evaluate(config, workdir)
  # From here on a SIGTERM or Ctrl-C, even during start-up (data loading,
  # compilation), stops the run cleanly (exit status 0), not with 143.
  with preemption_lib.install_preemption_handler() as preemption:
    return _train_classifier(config, workdir, preemption)


def _train_classifier(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str],
                      preemption: preemption_lib.PreemptionFlag
                      ) -> dict[str, Any]:
  """`train_and_evaluate` of a classification config."""
  cli.quiet_library_logs()
  mesh = parallel.make_mesh()
  num_devices = mesh.devices.size
  info = validate_config(config, num_devices)
  log.info("training on %s", parallel.describe_devices(mesh, config.batch_size))
  created = ckpt_lib.missing_directories(workdir)
  # A fresh run reads config.init_from first (a wrong one fails before the
  # data is loaded or anything is written); a resumed run does not read it.
  fresh = not _latest_step_dir(Path(workdir).expanduser() / "checkpoints")
  initial = (load_initial_weights(config)
             if fresh and config.get("init_from") else None)
  workdir = ckpt_lib.check_workdir(workdir)
  parallel.check_processes_agree(config.to_dict(), workdir)
  is_main = jax.process_index() == 0
  rep = parallel.replicated_sharding(mesh)

  root = jax.random.PRNGKey(config.seed)
  init_rng, data_key = jax.random.split(root)

  # Data first: a bad data_dir fails before anything is written (and leaves
  # no empty workdir behind).
  train_iter = None
  try:
    if use_in_memory(config, info):
      data = InMemoryData.load(config, mesh)
      steps_per_epoch = data.steps_per_epoch
    else:
      data = None
      guess = _latest_step_dir(workdir / "checkpoints")
      train_iter = _streaming_train(config, info, guess)
      steps_per_epoch = train_iter.steps_per_epoch
    # Abstractly, before anything is written: the model, the optimizers and
    # PKKD's layer patterns are checked here.
    create = lambda key: create_train_state(
        config, key, info.image_shape, steps_per_epoch=steps_per_epoch)
    abstract_state = _abstract(jax.eval_shape(create, init_rng), rep)
  except BaseException:
    if train_iter is not None:
      train_iter.close()
    ckpt_lib.remove_if_empty(created)
    raise
  try:
    mgr = ckpt_lib.CheckpointManager(
        workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep,
        best_metric="eval_top1")
  except BaseException:
    if train_iter is not None:
      train_iter.close()
    raise
  try:
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else config.num_epochs * steps_per_epoch)

    expected_meta = {**run_identity(config), "steps_per_epoch": steps_per_epoch}
    with explained_by_meta(workdir / "checkpoints", expected_meta,
                           _RESUME_KEYS, RESUME_ADVICE):
      restored = mgr.restore(abstract_state)
    resumed_meta = {}
    # Where the run started, for the meta: random weights unless below.
    provenance = {"init_from": None, "init_from_step": None}
    if restored is None:
      state = jax.jit(create, out_shardings=rep)(init_rng)
      start_step = 0
      if config.get("init_from"):
        # (read here if the workdir held only unfinished step folders)
        initial = initial or load_initial_weights(config)
        state = with_initial_weights(state, initial, rep)
        log.info("parameters and BatchNorm statistics from %s",
                 initial.describe())
        provenance = initial.record()
    else:
      state, meta = restored
      start_step = int(jax.device_get(state.step))
      check_meta(meta, expected_meta, _RESUME_KEYS,
                 f"the checkpoint at step {start_step} in {str(workdir)!r}",
                 RESUME_ADVICE)
      log.info("resumed from step %d (%s)", start_step, meta)
      resumed_meta = meta if isinstance(meta, dict) else {}
      provenance = {key: resumed_meta.get(key) for key in provenance}
      _note_init_from_not_read(config, workdir, start_step, provenance)
      change = (schedule_change(resumed_meta, config, steps_per_epoch,
                                start_step) if start_step < total_steps
                else None)  # nothing left to train: no rate to change
      if change:
        log.warning("%s", change)
      change = device_count_change(resumed_meta, num_devices)
      if change:
        log.warning("%s", change)
      if start_step >= total_steps:
        log.warning("the checkpoint is at step %d, the config's last step is "
                    "%d: nothing to train, evaluating it", start_step,
                    total_steps)
    if train_iter is not None and start_step != guess:
      train_iter.close()
      train_iter = _streaming_train(config, info, start_step)

    core = make_core(config, steps_per_epoch)
    if data is not None:
      train_step = make_in_memory_train_step(mesh, info, config.batch_size,
                                             core)
    else:
      train_step = make_streaming_train_step(mesh, core)
    bar = progress_lib.shown(config)
    evaluator = eval_lib.Evaluator(build_model(config), info, mesh,
                                   config.eval_batch_size, progress_bar=bar)
    teacher_evaluator = None
    if isinstance(state, distill.DistillTrainState):
      teacher_evaluator = eval_lib.Evaluator(
          build_model(distill.teacher_config(config)), info, mesh,
          config.eval_batch_size, progress_bar=bar)
    lr_fn = optim.learning_rate_schedule(config, steps_per_epoch)
    summary = _loop(config, workdir, mesh, info, state, start_step,
                    total_steps, steps_per_epoch, data, train_iter,
                    data_key, train_step, evaluator, lr_fn, mgr, is_main,
                    resumed_meta, teacher_evaluator, preemption, provenance)
  finally:
    if train_iter is not None:
      train_iter.close()
    mgr.close()
  return summary


def _latest_step_dir(directory: Path) -> int:
  """The largest committed step number in a checkpoint folder (0 if none):
  where a streaming run will most likely resume (checked after restoring)."""
  if not directory.is_dir():
    return 0
  return max((int(p.name) for p in directory.iterdir() if p.name.isdigit()),
             default=0)


def use_in_memory(config: ml_collections.ConfigDict,
                  info: data_lib.DatasetInfo) -> bool:
  """Whether the dataset is kept on the devices (else streamed)."""
  pipeline = config.get("input_pipeline", "auto")
  if pipeline not in ("auto", "in_memory", "streaming"):
    raise ValueError(f"config.input_pipeline must be 'auto', 'in_memory' or "
                     f"'streaming', got {pipeline!r}")
  if pipeline == "in_memory" and not info.in_memory:
    raise ValueError(f"{info.name} does not fit in memory: use "
                     "config.input_pipeline='streaming' (or 'auto')")
  return info.in_memory if pipeline == "auto" else pipeline == "in_memory"


def _streaming_train(config, info, start_step: int):
  return data_lib.streaming_iterator(
      config.dataset, config.data_dir, "train",
      global_batch_size=config.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      seed=config.seed, train=True, start_step=start_step,
      num_epochs=None, worker_count=config.get("num_workers"))


def _recalibrated_top1(config: ml_collections.ConfigDict,
                       evaluator: eval_lib.Evaluator, params: Any,
                       batch_stats: Any, data: InMemoryData,
                       epoch: int) -> float | None:
  """Top-1 with BatchNorm statistics re-estimated on
  `config.recalibrate_bn_batches` training batches of epoch `epoch`'s order
  (None when that is 0)."""
  stats = _recalibrated_stats(config, evaluator, params, batch_stats, data,
                              epoch)
  if stats is None:
    return None
  return evaluator.evaluate_in_memory(params, stats, data.eval)["top1"]


def _recalibrated_stats(config: ml_collections.ConfigDict,
                        evaluator: eval_lib.Evaluator, params: Any,
                        batch_stats: Any, data: InMemoryData,
                        epoch: int) -> Any:
  """BatchNorm statistics re-estimated on `config.recalibrate_bn_batches`
  training batches of epoch `epoch`'s order (None when that is 0)."""
  num_batches = int(config.get("recalibrate_bn_batches", 0) or 0)
  if num_batches <= 0:
    return None
  return evaluator.recalibrate_batch_stats(
      params, batch_stats, data.images,
      data.permutation(jax.random.PRNGKey(config.seed + 1), epoch),
      config.batch_size, min(num_batches, data.steps_per_epoch))


def _evaluate(config, evaluator, state, data, info, mesh, steps_per_epoch,
              epoch, teacher_evaluator=None) -> dict[str, float]:
  """Test metrics with running statistics (and recalibrated ones, in-memory
  data only; and the PKKD teacher's accuracy)."""
  if data is not None:
    results = evaluator.evaluate_in_memory(state.params, state.batch_stats,
                                           data.eval)
    recal = _recalibrated_top1(config, evaluator, state.params,
                               state.batch_stats, data, epoch)
    if recal is not None:
      results["top1_recalibrated"] = recal
    if teacher_evaluator is not None:  # PKKD: the CNN teacher's accuracy
      results["teacher_top1"] = teacher_evaluator.evaluate_in_memory(
          state.teacher_params["model"], state.teacher_batch_stats,
          data.eval)["top1"]
  else:
    it = data_lib.streaming_iterator(
        config.dataset, config.data_dir, "test",
        global_batch_size=config.eval_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(), train=False,
        worker_count=config.get("num_workers"))
    runs = [(evaluator, state.params, state.batch_stats)]
    if teacher_evaluator is not None:  # PKKD: the teacher in the same pass
      runs.append((teacher_evaluator, state.teacher_params["model"],
                   state.teacher_batch_stats))
    try:
      results, *teacher = eval_lib.evaluate_stream_together(
          runs, it,
          max_examples=int(config.get("eval_max_examples", -1) or -1))
    finally:
      it.close()
    if teacher:
      results["teacher_top1"] = teacher[0]["top1"]
  return {f"eval_{k}": v for k, v in results.items()}


def _loop(config, workdir, mesh, info, state, start_step, total_steps,
          steps_per_epoch, data, train_iter, data_key, train_step,
          evaluator, lr_fn, mgr, is_main, resumed_meta,
          teacher_evaluator, preemption, provenance) -> dict[str, Any]:
  """The training loop proper (see `train_and_evaluate`)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  writer = MetricsWriter(workdir, is_main, start_step)
  every = config.checkpoint_every_steps
  every = steps_per_epoch if every is None or every <= 0 else every
  eval_every = max(1, int(config.get("eval_every_epochs", 1) or 1))
  bar = tqdm(total=total_steps, initial=start_step, unit="step",
             disable=not progress_lib.shown(config),
             dynamic_ncols=True, smoothing=0.1)
  last_train: dict[str, float] = {
      k: resumed_meta[k] for k in ("train_loss", "train_top1")
      if resumed_meta.get(k) is not None}
  pending: list[dict[str, jax.Array]] = []
  pending_first = start_step
  perm_epoch, perm = -1, None
  t_start = time.perf_counter()
  throughput = step_loop.Throughput(start_step)
  last_saved = start_step if start_step > 0 else -1

  def train_one(step: int) -> dict[str, jax.Array]:
    nonlocal state, perm, perm_epoch
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    if data is not None:
      if epoch != perm_epoch:
        perm, perm_epoch = data.permutation(data_key, epoch), epoch
      state, metrics = train_step(state, data.images, data.labels, perm,
                                  step_in_epoch)
    else:
      batch = next(train_iter)
      batch = parallel.global_batch_from_local(
          {"image": batch["image"], "label": batch["label"]}, mesh)
      state, metrics = train_step(state, batch["image"], batch["label"])
    pending.append(metrics)
    return metrics

  def flush_metrics(step: int) -> None:
    nonlocal pending, pending_first, last_train
    if not pending:
      return
    metrics = _fetch_metrics(pending, pending_first)
    ips = throughput.take(step, config.batch_size)
    if ips is not None:  # images/s of the steps since the last log
      metrics["images_per_sec"] = ips
      bar.set_postfix(loss=f"{metrics['train_loss']:.4f}",
                      img_s=f"{ips:.0f}", refresh=False)
    metrics.update(lr=float(lr_fn(step - 1)), epoch=step / steps_per_epoch)
    writer.write(step, metrics)
    last_train = metrics
    pending, pending_first = [], step

  def evaluate(step: int) -> dict[str, float]:
    eval_metrics = _evaluate(config, evaluator, state, data, info, mesh,
                             steps_per_epoch,
                             _last_epoch(step, steps_per_epoch),
                             teacher_evaluator)
    writer.write(step, {**eval_metrics, "epoch": step / steps_per_epoch})
    log.info("step %d: %s", step, eval_metrics)
    return eval_metrics

  def save(step: int, eval_metrics: dict[str, float] | None, force: bool):
    nonlocal last_saved
    if step == last_saved:
      return
    meta = {"step": step, "epoch": step / steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, **run_identity(config),
            **schedule_identity(config, steps_per_epoch),
            "num_devices": int(mesh.devices.size),
            **provenance,
            "recalibrate_bn_batches": int(
                config.get("recalibrate_bn_batches", 0) or 0),
            "train_loss": last_train.get("train_loss"),
            "train_top1": last_train.get("train_top1")}
    # The loss checked for step s comes from the parameters before that
    # step's update: check what is about to be saved.
    non_finite = ckpt_lib.non_finite_leaves(
        {"params": state.params, "batch_stats": state.batch_stats,
         "opt_state": state.opt_state})
    if non_finite:
      first = next(iter(non_finite))
      kept = (f"the last checkpoint, step {last_saved}, is kept"
              if last_saved > 0 else "no checkpoint was written")
      raise NonFiniteStateError(
          f"the training state is not finite after step {step}: {first!r} "
          f"has {non_finite[first]} NaN/Inf value(s) ({len(non_finite)} "
          f"array(s) affected); stopping without saving step {step} ({kept})")
    # Steps without an evaluation still pass metrics (ranked last for
    # "best"), which keeps Orbax from warning about missing metrics.
    metrics = {k: float(v) for k, v in (eval_metrics or last_train).items()
               if isinstance(v, (int, float))}
    mgr.save(step, state, meta, metrics=metrics, force=force)
    last_saved = step

  def eval_due(step: int) -> bool:
    epochs, in_epoch = divmod(step, steps_per_epoch)
    return in_epoch == 0 and epochs % eval_every == 0

  try:
    end = step_loop.run_steps(
        step=start_step, total_steps=total_steps, train_step=train_one,
        flush=flush_metrics, evaluate=evaluate, save=save, eval_due=eval_due,
        save_every=every, log_every=config.log_every_steps,
        preemption=preemption, mesh=mesh, bar=bar, throughput=throughput)
    mgr.wait_until_finished()
  finally:
    bar.close()
    writer.close()

  step, preempted, last_eval = end.step, end.preempted, end.last_eval or {}
  summary = {"step": step, "epoch": round(step / steps_per_epoch, 4),
             "train_loss": last_train.get("train_loss"),
             "train_top1": last_train.get("train_top1"),
             **last_eval,
             # and any further training metric of the step (e.g. PKKD's)
             **{k: v for k, v in last_train.items() if k.startswith("train_")},
             "images_per_sec": last_train.get("images_per_sec"),
             "wall_s": round(time.perf_counter() - t_start, 2)}
  if "eval_top1" not in summary:
    summary["eval_top1"] = None
  if preempted:
    summary["preempted"] = True
  return summary


# ------------------------------------------------------------ evaluation --


def restore_variables(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str], which: str = "latest"
                      ) -> dict[str, Any]:
  """`{"params", "batch_stats", "step"}` of a training checkpoint ("latest",
  or "best" by eval_top1), replicated on the mesh, read-only.

  Only these parts of the saved TrainState are read, so the optimizer
  settings of `config` do not matter; the architecture must match
  (a ValueError names the first mismatching parameter).
  """
  return _restore_for_eval(config, workdir, which).state


def _restore_for_eval(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str], which: str,
                      advice: str = EVAL_ADVICE) -> ckpt_lib.EvalRestore:
  """`restore_variables` with the step's meta and which step it read; a
  checkpoint of another model, conv kind or dataset is a ValueError."""
  info = data_lib.dataset_info(config.dataset)
  rep = parallel.replicated_sharding(parallel.make_mesh())
  model = build_model(config)
  dummy = jnp.zeros((1, *info.image_shape), get_dtype(config.dtype))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), dummy, train=False))
  abstract = _abstract({"step": jax.ShapeDtypeStruct((), jnp.int32),
                        "params": variables["params"],
                        "batch_stats": variables.get("batch_stats", {})}, rep)
  with explained_by_meta(workdir, run_identity(config), _EVAL_KEYS,
                         advice):
    restored = ckpt_lib.restore_for_eval(workdir, abstract, which=which,
                                         with_meta=True)
  where = (f"the checkpoint in {str(workdir)!r} (step "
           f"{restored.meta.get('step', '?')})")
  check_meta(restored.meta, run_identity(config), _EVAL_KEYS, where, advice)
  _check_holdout_unseen(restored.meta, config, where)
  return restored


class InitialWeights(NamedTuple):
  """Trained weights a new run starts from (`config.init_from`)."""
  variables: dict[str, Any]  # {"params", "batch_stats"}, host arrays
  path: str  # absolute
  step: int | None  # the workdir's step read; None for a .pth file

  def describe(self) -> str:
    return repr(self.path) + ("" if self.step is None
                              else f" (step {self.step})")

  def record(self) -> dict[str, Any]:
    """What checkpoints' meta say of where the run started."""
    return {"init_from": self.path, "init_from_step": self.step}


def _init_from_path(config: ml_collections.ConfigDict) -> Path:
  """`config.init_from` as the absolute path the meta records."""
  return Path(str(config.init_from)).expanduser().absolute()


def load_initial_weights(config: ml_collections.ConfigDict) -> InitialWeights:
  """The weights of `config.init_from`: a training workdir (its latest
  checkpoint; the model, conv kind and dataset checked against its meta) or
  an official-layout PyTorch checkpoint (`addernet_jax.convert`; its conv
  kind and classes checked against the config).

  Raises:
    FileNotFoundError: no such path.
    ValueError: weights of another model, conv kind, dataset or number of
      classes, or unreadable ones; the message starts with
      `config.init_from=PATH:`.
  """
  given = str(config.init_from)
  source = _init_from_path(config)
  if not source.exists():
    raise FileNotFoundError(f"config.init_from={given!r} does not exist (a "
                            f"training workdir or a .pth file)")
  step_of = ckpt_lib.workdir_of_step(source)
  if step_of is not None:
    raise ValueError(f"config.init_from={given!r} is one checkpoint step; "
                     f"give its training workdir {str(step_of)!r}, whose "
                     f"latest step is read")
  try:
    if source.is_dir():
      restored = _restore_for_eval(config, source, "latest", INIT_ADVICE)
      variables = {"params": restored.state["params"],
                   "batch_stats": restored.state["batch_stats"]}
      step = int(jax.device_get(restored.state["step"]))
      return InitialWeights(jax.device_get(variables), str(source), step)
    variables, kwargs = torch_checkpoint_variables(config, source)
    conv = kwargs["conv"]
    if conv != config.conv:
      raise ValueError(f"it holds a model with conv {conv!r}, the config has "
                       f"config.conv={config.conv!r}")
    return InitialWeights(variables, str(source), None)
  except cli.USER_ERRORS as e:
    raise ValueError(f"config.init_from={given!r}: {e}") from e


def with_initial_weights(state: TrainState, initial: InitialWeights,
                         sharding: Any) -> TrainState:
  """`state` with its parameters and BatchNorm statistics taken from
  `initial` (the same tree and shapes; cast to the state's dtypes) and its
  optimizer state made afresh for them."""
  new = {}
  source = initial.describe()
  for name in ("params", "batch_stats"):
    ours = traverse_util.flatten_dict(flax.core.unfreeze(getattr(state,
                                                                 name)))
    theirs = traverse_util.flatten_dict(flax.core.unfreeze(
        initial.variables.get(name, {})))
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    if missing or extra:
      which = (f"lacks {'/'.join(missing[0])}" if missing
               else f"has {'/'.join(extra[0])}, which the model has not")
      raise ValueError(f"config.init_from={source}: its {name} {which}")
    for key, leaf in ours.items():
      if tuple(np.shape(theirs[key])) != tuple(leaf.shape):
        raise ValueError(
            f"config.init_from={source}: {name} {'/'.join(key)} has shape "
            f"{tuple(np.shape(theirs[key]))}, the model's is "
            f"{tuple(leaf.shape)}")
    new[name] = traverse_util.unflatten_dict({
        key: _replicate(np.asarray(theirs[key], leaf.dtype), sharding)
        for key, leaf in ours.items()})
  params = new["params"]
  opt_state = jax.jit(state.tx.init, out_shardings=sharding)(params)
  return state.replace(params=params, batch_stats=new["batch_stats"],
                       opt_state=opt_state)


def _note_init_from_not_read(config: ml_collections.ConfigDict,
                             workdir: Path, step: int,
                             provenance: dict[str, Any]) -> None:
  """Logs that a resumed run does not read `config.init_from`: a warning
  when it names other weights than the run started from (a new fine-tuning
  meant for a new workdir)."""
  given = config.get("init_from")
  if not given:
    return
  if str(_init_from_path(config)) == provenance["init_from"]:
    log.info("config.init_from is not read again: the run continues from its "
             "own checkpoint at step %d", step)
    return
  started = (f"started from {provenance['init_from']!r}"
             if provenance["init_from"] else "started from random weights")
  log.warning("config.init_from=%r is not read: %r holds a run at step %d "
              "(%s), which this continues; give a new --workdir to start a "
              "run from %r", given, str(workdir), step, started, given)


def _check_holdout_unseen(meta: Any, config: ml_collections.ConfigDict,
                          where: str) -> None:
  """ValueError if `config.holdout_examples` would evaluate on training
  examples the checkpoint was trained on: the last N' training examples
  were all held out only if N' <= the N it was trained with (0, the test
  split, is always fine)."""
  trained = meta.get("holdout_examples") if isinstance(meta, dict) else None
  held = int(config.get("holdout_examples", 0) or 0)
  if trained is None or held <= trained:
    return
  raise ValueError(
      f"config.holdout_examples={held} evaluates on the last {held} training "
      f"examples, but {where} was trained with holdout_examples={trained}: "
      f"{held - trained} of them were trained on. Use holdout_examples <= "
      f"{trained} (0: the test split)")


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike[str], which: str = "latest"
                        ) -> dict[str, Any]:
  """top1, top5, loss, num_examples (and step) of a training checkpoint on
  the config's evaluation split (for `config.task = "sr"`: psnr, ssim,
  num_images, bicubic_psnr, bicubic_ssim, from `sr.train`)."""
  if is_sr_task(config):
    from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
    return sr_train.evaluate_checkpoint(config, workdir, which=which)
  restored = _restore_for_eval(config, workdir, which)
  step = int(jax.device_get(restored.state["step"]))
  info = data_lib.dataset_info(config.dataset)
  if (int(config.get("recalibrate_bn_batches", 0) or 0) > 0
      and use_in_memory(config, info)):
    result = _evaluate_with_recalibration(
        _with_training_batches(config, restored.meta), info, restored.state,
        step)
  else:
    result = eval_lib.evaluate_variables(config, build_model(config),
                                         restored.state)
  return {**result, "step": step,
          "checkpoint": str(Path(workdir).expanduser().absolute()),
          "which": restored.which}


def _with_training_batches(config: ml_collections.ConfigDict,
                           meta: dict[str, Any]) -> ml_collections.ConfigDict:
  """`config` with the seed, batch size and number of batches the
  checkpoint's run re-estimated BatchNorm with (its meta), which choose the
  training batches: evaluating with other values (an override not repeated)
  gave another top1_recalibrated than training's, without a word."""
  changes = {key: meta[key] for key in ("seed", "batch_size",
                                        "recalibrate_bn_batches")
             if isinstance(meta.get(key), int)
             and not isinstance(meta[key], bool)
             and (meta[key] > 0 or key == "seed")
             and meta[key] != config.get(key)}
  if not changes:
    return config
  log.info("re-estimating BatchNorm statistics on the training batches the "
           "checkpoint was trained with: %s (from its meta; the config has "
           "%s)", ", ".join(f"{k}={v}" for k, v in changes.items()),
           ", ".join(f"{k}={config.get(k)}" for k in changes))
  config = config.copy_and_resolve_references()
  for key, value in changes.items():
    config[key] = value
  return config


def _evaluate_with_recalibration(config: ml_collections.ConfigDict,
                                 info: data_lib.DatasetInfo,
                                 variables: dict[str, Any],
                                 step: int) -> dict[str, Any]:
  """top1, top5, loss, num_examples and top1_recalibrated, as training's
  final evaluation at `step` computes them (the same training batches)."""
  return _recalibrate(config, info, variables, step)[0]


def _recalibrate(config: ml_collections.ConfigDict,
                 info: data_lib.DatasetInfo, variables: dict[str, Any],
                 step: int) -> tuple[dict[str, Any], Any]:
  """(`_evaluate_with_recalibration`'s result, the re-estimated BatchNorm
  statistics)."""
  mesh = parallel.make_mesh()
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"config.batch_size={config.batch_size} must be a "
                     f"multiple of the number of devices "
                     f"({mesh.devices.size}) to re-estimate BatchNorm "
                     "statistics (or set --config.recalibrate_bn_batches=0)")
  data = InMemoryData.load(config, mesh)
  rep = parallel.replicated_sharding(mesh)
  params = jax.device_put(variables["params"], rep)
  batch_stats = jax.device_put(variables.get("batch_stats", {}), rep)
  evaluator = eval_lib.Evaluator(
      build_model(config), info, mesh, config.eval_batch_size,
      progress_bar=progress_lib.shown(config))
  result = evaluator.evaluate_in_memory(params, batch_stats, data.eval)
  stats = _recalibrated_stats(config, evaluator, params, batch_stats, data,
                              _last_epoch(step, data.steps_per_epoch))
  result["top1_recalibrated"] = (
      None if stats is None else
      evaluator.evaluate_in_memory(params, stats, data.eval)["top1"])
  return result, stats


def recalibrated_variables(config: ml_collections.ConfigDict,
                           workdir: str | os.PathLike[str],
                           which: str = "latest"
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, result) of a training checkpoint: its parameters with the
  BatchNorm statistics re-estimated on the training batches its run's final
  evaluation used (`recalibrate_bn_batches` of them, with the checkpoint's
  seed and batch size), and `evaluate_checkpoint`'s result (`top1` with the
  running statistics, `top1_recalibrated` with these). After a short run
  the running statistics lag far behind the weights (1 epoch of MNIST:
  15% against 98%)."""
  if is_sr_task(config):
    raise ValueError("re-estimating BatchNorm statistics is for "
                     "classification configs")
  if int(config.get("recalibrate_bn_batches", 0) or 0) <= 0:
    raise ValueError("set config.recalibrate_bn_batches > 0 (the number of "
                     "training batches to re-estimate BatchNorm on)")
  info = data_lib.dataset_info(config.dataset)
  if not use_in_memory(config, info):
    raise ValueError(f"re-estimating BatchNorm statistics needs the "
                     f"in-memory data pipeline; {config.dataset} is streamed")
  restored = _restore_for_eval(config, workdir, which)
  step = int(jax.device_get(restored.state["step"]))
  result, stats = _recalibrate(_with_training_batches(config, restored.meta),
                               info, restored.state, step)
  variables = {"params": restored.state["params"], "batch_stats": stats}
  return jax.device_get(variables), {
      **result, "step": step,
      "checkpoint": str(Path(workdir).expanduser().absolute()),
      "which": restored.which}


def _last_epoch(step: int, steps_per_epoch: int) -> int:
  """The epoch of the last step trained before `step` (whose order every
  evaluation at `step` re-estimates BatchNorm on)."""
  return max(step - 1, 0) // steps_per_epoch


def evaluate_torch_checkpoint(config: ml_collections.ConfigDict,
                              path: str | os.PathLike[str]) -> dict[str, Any]:
  """The same for an official-layout PyTorch checkpoint (through
  `addernet_jax.convert`); its conv kind is read from the file."""
  variables, kwargs = torch_checkpoint_variables(config, path)
  conv = kwargs["conv"]
  if conv != config.conv:
    log.warning("%s holds a model of conv kind %r (read from the file); "
                "config.conv=%r is not used", path, conv, config.conv)
  model = models.get_model(config.model, num_classes=kwargs["num_classes"],
                           conv=conv, dtype=get_dtype(config.dtype),
                           bn_axis_name=BATCH_AXIS,
                           implementation=config.get("implementation"))
  result = eval_lib.evaluate_variables(config, model, variables)
  return {**result, "torch_checkpoint": str(path), "conv": conv}


def torch_checkpoint_variables(config: ml_collections.ConfigDict,
                               path: str | os.PathLike[str]
                               ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(variables, `{"num_classes", "conv"}` read from the file) of an
  official-layout PyTorch checkpoint of `config.model`
  (`addernet_jax.convert`). ValueError unless its stem takes the dataset's
  image channels and its classifier has the dataset's classes."""
  from addernet_jax import convert  # pylint: disable=g-import-not-at-top
  info = data_lib.dataset_info(config.dataset)
  variables = convert.load_torch_checkpoint(
      path, config.model, in_channels=info.image_shape[-1])
  kwargs = convert.infer_model_kwargs(variables)
  if kwargs["num_classes"] != info.num_classes:
    raise ValueError(f"{str(path)!r} has {kwargs['num_classes']} classes, "
                     f"{config.dataset} has {info.num_classes}")
  return variables, kwargs
