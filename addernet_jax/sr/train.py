"""AdderSR training and evaluation (`config.task = "sr"`).

`train_and_evaluate(config, workdir)` is what `train.py` runs for an SR
config (`train_lib.train_and_evaluate` hands over), `evaluate_checkpoint`
what `eval.py --checkpoint` runs. Conventions shared with classification:
checkpoints in `<workdir>/checkpoints` (`addernet_jax.checkpoint`: atomic,
checksummed, the best kept, here by `eval_psnr`), rerunning the same command
resumes, metrics in `<workdir>/metrics.jsonl`, SIGTERM saves and exits.

Training: every step takes `batch_size` random aligned patches
(`data.sample_batch`, a function of (seed, step), sampled on the host),
computes the L1 loss of the network's output against the HR patch (both in
[0, 1]) and takes an Adam step. The step is `jax.jit` over a 1-D mesh of all
devices with the per-device work in `jax.shard_map`, the gradients averaged
with `lax.pmean` and the adder units' BatchNorm statistics averaged over the
mesh, as in `train_lib`. Evaluation runs one whole LR image at a time on one
device and reports PSNR/SSIM on the Y channel (`metrics.y_psnr_ssim`, border
`scale`), also for bicubic interpolation (`bicubic_*`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from absl import logging
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from addernet_jax import checkpoint as ckpt_lib
from addernet_jax import cli
from addernet_jax import models
from addernet_jax import optim
from addernet_jax import parallel
from addernet_jax import preemption as preemption_lib
from addernet_jax import progress as progress_lib
from addernet_jax import step_loop
from addernet_jax import train_lib
from addernet_jax.models import sr as sr_models
from addernet_jax.sr import data as data_lib
from addernet_jax.sr import metrics as metrics_lib

# What training ranks its checkpoints by (`--which=best`).
BEST_METRIC = "eval_psnr"

P = jax.sharding.PartitionSpec
BATCH_AXIS = parallel.BATCH_AXIS
log = logging


def model_colors(config: ml_collections.ConfigDict) -> int:
  """`config.colors`, or the model's default (EDSR 3, VDSR 1)."""
  colors = config.get("colors")
  if colors is None:
    return 1 if config.model == "vdsr" else 3
  return colors


def build_model(config: ml_collections.ConfigDict,
                bn_axis_name: str | None = BATCH_AXIS):
  """The config's SR network (`models.get_sr_model`)."""
  return models.get_sr_model(
      config.model, scale=config.scale, conv=config.conv,
      colors=model_colors(config), dtype=train_lib.get_dtype(config.dtype),
      bn_axis_name=bn_axis_name, implementation=config.get("implementation"),
      self_shortcut=config.get("self_shortcut", True),
      power_activation=config.get("power_activation", True),
      identity_init=config.get("identity_init", True),
      num_blocks=config.get("num_blocks"), depth=config.get("depth"),
      features=config.get("features"))


def validate_model_config(config: ml_collections.ConfigDict) -> None:
  """Checks the keys that define the SR network; ValueError naming the bad
  one."""
  if config.model not in models.SR_MODEL_NAMES:
    raise ValueError(f"config.model must be one of {models.SR_MODEL_NAMES} "
                     f"for config.task='sr', got {config.model!r}")
  if config.conv not in models.common.CONV_KINDS:
    raise ValueError(f"config.conv must be one of {models.common.CONV_KINDS},"
                     f" got {config.conv!r}")
  if config.get("scale") not in sr_models.SR_SCALES:
    raise ValueError(f"config.scale must be one of {sr_models.SR_SCALES}, "
                     f"got {config.get('scale')!r}")
  if model_colors(config) not in (1, 3):
    raise ValueError(f"config.colors must be 1 or 3, got {config.colors!r}")
  for key, least in (("num_blocks", 0), ("depth", 3), ("features", 1)):
    value = config.get(key)  # None: the published size
    if value is not None and (not isinstance(value, int)
                              or isinstance(value, bool) or value < least):
      raise ValueError(f"config.{key} must be None (the published size) or "
                       f"an int >= {least}, got {value!r}")
  train_lib.get_dtype(config.dtype)


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int) -> None:
  """Checks the keys the SR loop depends on; ValueError naming the bad one."""
  validate_model_config(config)
  for key in ("batch_size", "patch_size", "steps_per_epoch",
              "log_every_steps"):
    value = config.get(key)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{key} must be a positive int, got {value!r}")
  if config.batch_size % num_devices:
    choices = " or ".join(
        f"--config.batch_size={m}"
        for m in parallel.nearest_multiples(config.batch_size, num_devices))
    raise ValueError(f"config.batch_size={config.batch_size} must be a "
                     f"multiple of the number of devices ({num_devices}), "
                     f"e.g. {choices}")
  train_lib.check_checkpointing(config)
  every = config.get("eval_every_steps")
  if every is not None and (not isinstance(every, int)
                            or isinstance(every, bool) or every < -1):
    raise ValueError(f"config.eval_every_steps={every!r} must be a number of "
                     f"steps > 0, or 0 or -1 (every epoch)")
  check_optimizer_config(config)
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError("set config.num_epochs > 0 or config.num_train_steps > 0"
                     f" (got {config.num_epochs} and {config.num_train_steps})")
  if config.data_dir is None:
    raise ValueError("config.data_dir must name a folder of high-resolution "
                     "training images (e.g. DIV2K_train_HR)")


def eval_folder(config: ml_collections.ConfigDict) -> str:
  """The folder of HR evaluation images (`config.eval_data_dir`)."""
  folder = config.get("eval_data_dir")
  if folder is None:
    raise ValueError("config.eval_data_dir must name a folder of "
                     "high-resolution test images (e.g. Set5)")
  return folder


# ------------------------------------------------------------ optimiser --


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> optax.Schedule:
  """EDSR's step decay: `learning_rate * lr_decay_factor ** (step //
  lr_decay_steps)` (`lr_decay_steps` <= 0: constant)."""
  base = float(config.learning_rate)
  every = int(config.get("lr_decay_steps", 0) or 0)
  factor = float(config.get("lr_decay_factor", 0.5))
  if every <= 0:
    return lambda count: jnp.asarray(base, jnp.float32)
  return lambda count: base * factor ** (jnp.asarray(count) // every).astype(
      jnp.float32)


def check_optimizer_config(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the first field `make_optimizer` reads that is out of
  range (a negative learning rate trained to a loss of 4e14 without a
  word)."""
  number = optim.config_number
  number(config, "learning_rate", low_included=False)
  if number(config, "lr_decay_factor", low_included=False, default=0.5) > 1:
    raise ValueError(f"config.lr_decay_factor={config.lr_decay_factor!r} "
                     f"must be > 0 and <= 1 (EDSR halves the rate: 0.5)")
  number(config, "lr_decay_steps", low=-math.inf, default=0)
  number(config, "eta", default=0.2)
  number(config, "weight_decay", default=0.0)
  number(config, "adam_b1", high=1.0, default=0.9)
  number(config, "adam_b2", high=1.0, default=0.999)
  number(config, "adam_eps", low_included=False, default=1e-8)
  if not isinstance(config.get("adaptive_lr", False), (bool, np.bool_)):
    raise ValueError(f"config.adaptive_lr={config.adaptive_lr!r} must be "
                     f"True or False")


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """Adam (`adam_b1`, `adam_b2`, `adam_eps`) on the step-decay schedule;
  optionally (`adaptive_lr`) the AdderNet adaptive learning rate on the adder
  filters before it and (`weight_decay` > 0) L2 decay added to the
  gradient."""
  chain = []
  eta = config.get("eta", 0.2)
  if config.get("adaptive_lr", False) and eta > 0:
    chain.append(optax.masked(optim.scale_by_adaptive_lr(eta),
                              optim.adder_mask))
  if config.weight_decay > 0:
    chain.append(optax.add_decayed_weights(config.weight_decay))
  chain.append(optax.adam(learning_rate_schedule(config),
                          b1=config.get("adam_b1", 0.9),
                          b2=config.get("adam_b2", 0.999),
                          eps=config.get("adam_eps", 1e-8)))
  return optax.chain(*chain)


def create_train_state(config: ml_collections.ConfigDict,
                       rng: jax.Array) -> train_lib.TrainState:
  """Initial TrainState of the config's SR model and Adam."""
  model = build_model(config)
  init_rng, aug_rng = jax.random.split(rng)
  c = model_colors(config)
  dummy = jnp.zeros((1, config.patch_size, config.patch_size, c),
                    train_lib.get_dtype(config.dtype))
  variables = model.init(init_rng, dummy, train=False)
  return train_lib.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=make_optimizer(config), batch_stats=variables.get("batch_stats", {}),
      rng=aug_rng)


def make_train_step(mesh: jax.sharding.Mesh) -> Callable:
  """jit(shard_map(step)): `step(state, lr, hr) -> (state, metrics)` with
  `lr`, `hr` float batches sharded over the mesh."""

  def per_device(state, lr, hr):
    def loss_fn(params):
      out, updates = state.apply_fn(
          {"params": params, "batch_stats": state.batch_stats}, lr,
          train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.abs(out - hr)), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grads = lax.pmean(grads, BATCH_AXIS)
    loss = lax.pmean(loss, BATCH_AXIS)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", {}))
    return new_state, {"loss": loss}

  return jax.jit(parallel.data_parallel(
      per_device, mesh, in_specs=(P(), P(BATCH_AXIS), P(BATCH_AXIS)),
      out_specs=(P(), P())))


# ----------------------------------------------------------- evaluation --


class Evaluator:
  """PSNR/SSIM of a model on a folder of HR images (one image at a time; each
  distinct LR size compiles the network once)."""

  def __init__(self, config: ml_collections.ConfigDict,
               images: data_lib.ImageFolderSR):
    self.config = config
    self.images = images
    self.colors = model_colors(config)
    self.scale = config.scale
    model = build_model(config, bn_axis_name=None)
    self._apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    self._bicubic = jax.jit(
        lambda x, size: sr_models.bicubic_resize(x, size),
        static_argnums=1)
    self._baseline: dict[str, float] | None = None

  def _score(self, hr: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    """Y-channel PSNR/SSIM of a network output in [0, 1] (RGB, or Y for a
    one-channel model) against the 8-bit RGB HR image."""
    out = metrics_lib.quantize(out)
    target = hr if self.colors == 3 else metrics_lib.rgb_to_y(hr)
    return metrics_lib.y_psnr_ssim(out, target, self.scale)

  def baseline(self) -> dict[str, float]:
    """Bicubic interpolation of the LR images (`jax.image.resize`, the
    interpolation VDSR starts from), scored like a network."""
    if self._baseline is None:
      scores = []
      for lr, hr in zip(self.images.lr, self.images.hr):
        x = jnp.asarray(data_lib.to_model_input(lr, 3)[None])
        up = np.asarray(self._bicubic(x, hr.shape[:2]))[0]
        scores.append(metrics_lib.y_psnr_ssim(metrics_lib.quantize(up), hr,
                                              self.scale))
      self._baseline = {"bicubic_psnr": float(np.mean([s[0] for s in scores])),
                        "bicubic_ssim": float(np.mean([s[1] for s in scores]))}
    return self._baseline

  def evaluate(self, params: Any, batch_stats: Any) -> dict[str, Any]:
    """`psnr`, `ssim` (means over the images), `num_images`, and the bicubic
    baseline's `bicubic_psnr`, `bicubic_ssim`."""
    variables = {"params": params, "batch_stats": batch_stats}
    scores = []
    for lr, hr in zip(self.images.lr, self.images.hr):
      x = jnp.asarray(data_lib.to_model_input(lr, self.colors)[None])
      out = np.asarray(jax.device_get(self._apply(variables, x)))[0]
      if self.colors == 1:
        out = out[..., 0]
      scores.append(self._score(hr, out))
    return {"psnr": float(np.mean([s[0] for s in scores])),
            "ssim": float(np.mean([s[1] for s in scores])),
            "num_images": len(scores), **self.baseline()}


def load_eval_images(config: ml_collections.ConfigDict
                     ) -> data_lib.ImageFolderSR:
  """The evaluation folder's images (the first `eval_max_images` if > 0)."""
  # SSIM's 11x11 window must fit after cropping `scale` pixels per border.
  min_lr = math.ceil((11 + 2 * config.scale) / config.scale)
  return data_lib.ImageFolderSR(
      eval_folder(config), config.scale,
      max_images=int(config.get("eval_max_images", -1) or -1),
      min_lr_size=min_lr)


# -------------------------------------------------------------- the loop --


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """Trains an SR model (resuming from `workdir`) and evaluates it.

  Returns:
    The summary train.py prints as its last line: step, epoch, train_loss,
    eval_psnr, eval_ssim, eval_bicubic_psnr, eval_bicubic_ssim,
    eval_num_images, wall_s (and preempted).

  Raises:
    ValueError, FileNotFoundError, NotADirectoryError: bad config or data.
    train_lib.NonFiniteLossError: the loss became NaN or Inf.
  """
  # From here on a SIGTERM or Ctrl-C, even during start-up (data loading,
  # compilation), stops the run cleanly (exit status 0), not with 143.
  with preemption_lib.install_preemption_handler() as preemption:
    return _train_sr(config, workdir, preemption)


def _train_sr(config: ml_collections.ConfigDict,
              workdir: str | os.PathLike[str],
              preemption: preemption_lib.PreemptionFlag) -> dict[str, Any]:
  """`train_and_evaluate` once the preemption handler is installed."""
  cli.quiet_library_logs()
  mesh = parallel.make_mesh()
  validate_config(config, mesh.devices.size)
  log.info("training on %s", parallel.describe_devices(mesh, config.batch_size))
  # Data first: a bad folder fails before anything is written.
  train_data = data_lib.ImageFolderSR(
      config.data_dir, config.scale,
      max_images=int(config.get("train_max_images", -1) or -1),
      min_lr_size=config.patch_size)
  eval_images = load_eval_images(config)
  created = ckpt_lib.missing_directories(workdir)
  workdir = ckpt_lib.check_workdir(workdir)
  parallel.check_processes_agree(config.to_dict(), workdir)
  is_main = jax.process_index() == 0
  rep = parallel.replicated_sharding(mesh)
  steps_per_epoch = config.steps_per_epoch
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  every = config.checkpoint_every_steps
  every = steps_per_epoch if every is None or every <= 0 else every
  eval_every = config.get("eval_every_steps")
  eval_every = (steps_per_epoch if eval_every is None or eval_every <= 0
                else eval_every)
  colors = model_colors(config)
  init_rng = jax.random.PRNGKey(config.seed)
  create = lambda key: create_train_state(config, key)
  try:  # abstractly, before anything is written
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
        jax.eval_shape(create, init_rng))
  except BaseException:
    ckpt_lib.remove_if_empty(created)
    raise

  mgr = ckpt_lib.CheckpointManager(
      workdir / "checkpoints", max_to_keep=config.max_checkpoints_to_keep,
      best_metric=BEST_METRIC)
  writer = None
  try:
    with _explained(config, workdir / "checkpoints",
                    tuple(run_identity(config)), train_lib.RESUME_ADVICE):
      restored = mgr.restore(abstract)
    last_train: dict[str, Any] = {}
    if restored is None:
      state = jax.jit(create, out_shardings=rep)(init_rng)
      step = 0
    else:
      state, meta = restored
      step = int(jax.device_get(state.step))
      train_lib.check_meta(
          meta, run_identity(config), tuple(run_identity(config)),
          f"the checkpoint at step {step} in {str(workdir)!r}",
          train_lib.RESUME_ADVICE)
      log.info("resumed from step %d", step)
      if isinstance(meta, dict) and meta.get("train_loss") is not None:
        last_train["train_loss"] = meta["train_loss"]
    start_step = step
    train_step = make_train_step(mesh)
    evaluator = Evaluator(config, eval_images)
    lr_fn = learning_rate_schedule(config)
    writer = train_lib.MetricsWriter(workdir, is_main, start_step)
    local = parallel.process_batch_slice(config.batch_size, mesh)

    def batch(step_index: int):
      lr, hr = data_lib.sample_batch(train_data, config.batch_size,
                                     config.patch_size, config.seed,
                                     step_index,
                                     augment=config.get("augment", True))
      lr = data_lib.to_model_input(lr[local], colors)
      hr = data_lib.to_model_input(hr[local], colors)
      return parallel.global_batch_from_local({"lr": lr, "hr": hr}, mesh)

    pending: list[jax.Array] = []
    last_saved = step if step > 0 else -1
    t_start = time.perf_counter()
    throughput = step_loop.Throughput(step)

    def train_one(step_index: int) -> dict[str, jax.Array]:
      nonlocal state
      lr, hr = batch(step_index).values()
      state, m = train_step(state, lr, hr)
      pending.append(m["loss"])
      return m

    def flush(step: int) -> None:
      nonlocal pending, last_train
      if not pending:
        return
      losses = np.asarray(jax.device_get(pending), np.float64)
      if not np.all(np.isfinite(losses)):
        bad = int(np.flatnonzero(~np.isfinite(losses))[0])
        raise train_lib.NonFiniteLossError(
            f"training loss is {losses[bad]} at step "
            f"{step - len(losses) + bad + 1}; stopping without saving "
            "(checkpoints written before it, if any, are kept)")
      last_train = {"train_loss": float(losses.mean()),
                    "lr": float(lr_fn(step - 1)),
                    "epoch": step / steps_per_epoch}
      rate = throughput.take(step, config.batch_size)
      if rate is not None:  # none right after the first (compiling) step
        last_train["patches_per_sec"] = rate
      writer.write(step, last_train)
      pending = []

    def evaluate(step: int) -> dict[str, Any]:
      result = evaluator.evaluate(state.params, state.batch_stats)
      out = {f"eval_{k}": v for k, v in result.items()}
      writer.write(step, {**out, "epoch": step / steps_per_epoch})
      log.info("step %d: %s", step, out)
      return out

    def save(step: int, eval_metrics: dict[str, Any] | None, force: bool):
      nonlocal last_saved
      if step == last_saved:
        return
      bad = ckpt_lib.non_finite_leaves(
          {"params": state.params, "batch_stats": state.batch_stats,
           "opt_state": state.opt_state})
      if bad:
        raise train_lib.NonFiniteStateError(
            f"the training state is not finite after step {step}: "
            f"{next(iter(bad))!r}; stopping without saving")
      meta = {"step": step, "epoch": step / steps_per_epoch,
              **run_identity(config),
              "train_loss": last_train.get("train_loss")}
      scalars = {k: float(v) for k, v in (eval_metrics or last_train).items()
                 if isinstance(v, (int, float))}
      mgr.save(step, state, meta, metrics=scalars, force=force)
      last_saved = step

    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=total_steps, initial=step, unit="step",
               disable=not progress_lib.shown(config),
               dynamic_ncols=True)
    try:
      end = step_loop.run_steps(
          step=step, total_steps=total_steps, train_step=train_one,
          flush=flush, evaluate=evaluate, save=save,
          eval_due=lambda s: s % eval_every == 0, save_every=every,
          log_every=config.log_every_steps, preemption=preemption,
          mesh=mesh, bar=bar, throughput=throughput)
      mgr.wait_until_finished()
    finally:
      bar.close()
  finally:
    if writer is not None:
      writer.close()
    mgr.close()
  step, preempted, last_eval = end.step, end.preempted, end.last_eval or {}
  summary = {"step": step, "epoch": round(step / steps_per_epoch, 4),
             "train_loss": last_train.get("train_loss"),
             "eval_psnr": last_eval.get("eval_psnr"),
             "eval_ssim": last_eval.get("eval_ssim"),
             **{k: v for k, v in last_eval.items()
                if k not in ("eval_psnr", "eval_ssim")},
             "wall_s": round(time.perf_counter() - t_start, 2)}
  if preempted:
    summary["preempted"] = True
  return summary


def architecture(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The network's shape beyond model, conv and scale: colors, width and
  depth as built (the published sizes where the config leaves them out) and,
  for AdderSR, the two fixes. `self_shortcut` adds no parameter, so only
  this record tells a checkpoint trained without it (evaluated with it, the
  PSNR was silently wrong). `identity_init` is left out: it changes only
  the initialisation, and the EDSR gates it adds are named on restore."""
  model = build_model(config, bn_axis_name=None)
  arch = {"colors": model.colors, "features": model.features}
  if config.model == "vdsr":
    arch["depth"] = model.depth
  else:
    arch["num_blocks"] = model.num_blocks
  if config.conv == "adder":
    arch["self_shortcut"] = bool(model.self_shortcut)
    arch["power_activation"] = bool(model.power_activation)
  return arch


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint's meta records of the run, and a resume must keep."""
  return {"task": "sr", "model": config.model, "conv": config.conv,
          "scale": config.scale, **architecture(config), "seed": config.seed,
          "batch_size": config.batch_size}


# What evaluating a checkpoint must match: everything but seed and batch size.
_EVAL_KEYS_EXCLUDED = ("seed", "batch_size")


def restore_variables(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str], which: str = "latest"
                      ) -> dict[str, Any]:
  """`{"params", "batch_stats", "step"}` of an SR training checkpoint."""
  return _restore_for_eval(config, workdir, which).state


@contextlib.contextmanager
def _explained(config: ml_collections.ConfigDict,
               directory: str | os.PathLike[str], keys: tuple[str, ...],
               advice: str) -> Iterator[None]:
  """`train_lib.explained_by_meta`, and where the EDSR blocks' gates
  (docs/addersr.md, choice 15) are what differs, which `identity_init`
  the checkpoint needs."""
  try:
    with train_lib.explained_by_meta(directory, run_identity(config), keys,
                                     advice):
      yield
  except ckpt_lib.CheckpointStructureError as e:
    if (e.missing_parameter or "").endswith("_gate"):
      hint = ("It looks like an AdderSR EDSR checkpoint from before the "
              "blocks' gates: --config.identity_init=false restores it into "
              "the same network without them")
    elif (e.extra_parameter or "").endswith("_gate"):
      hint = ("The checkpoint's EDSR blocks have gates (trained with "
              "identity_init=true, the default): leave out "
              "--config.identity_init=false")
    else:
      raise
    end = "" if str(e).endswith(("?", ".")) else "."
    raise ckpt_lib.CheckpointStructureError(f"{e}{end} {hint}") from e


def _restore_for_eval(config: ml_collections.ConfigDict,
                      workdir: str | os.PathLike[str], which: str
                      ) -> ckpt_lib.EvalRestore:
  """`restore_variables` with the step's meta and which step it read; a
  checkpoint of another model, conv kind or scale is a ValueError."""
  model = build_model(config, bn_axis_name=None)
  c = model_colors(config)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, c)), train=False))
  rep = parallel.replicated_sharding(parallel.make_mesh())
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      {"step": jax.ShapeDtypeStruct((), jnp.int32),
       "params": variables["params"],
       "batch_stats": variables.get("batch_stats", {})})
  keys = tuple(k for k in run_identity(config)
               if k not in _EVAL_KEYS_EXCLUDED)
  with _explained(config, workdir, keys, train_lib.EVAL_ADVICE):
    restored = ckpt_lib.restore_for_eval(workdir, abstract, which=which,
                                         with_meta=True,
                                         best_metric=BEST_METRIC)
  train_lib.check_meta(restored.meta, run_identity(config), keys,
                       f"the checkpoint in {str(workdir)!r}",
                       train_lib.EVAL_ADVICE)
  return restored


def evaluate_checkpoint(config: ml_collections.ConfigDict,
                        workdir: str | os.PathLike[str], which: str = "latest"
                        ) -> dict[str, Any]:
  """psnr, ssim, num_images, bicubic_psnr, bicubic_ssim (and step) of a
  checkpoint on `config.eval_data_dir` (`which`: "latest" or "best" by
  eval_psnr)."""
  validate_model_config(config)
  images = load_eval_images(config)
  restored = _restore_for_eval(config, workdir, which)
  result = Evaluator(config, images).evaluate(restored.state["params"],
                                              restored.state["batch_stats"])
  return {**result, "step": int(jax.device_get(restored.state["step"])),
          "checkpoint": str(Path(workdir).expanduser().absolute()),
          "which": restored.which}
