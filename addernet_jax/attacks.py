"""Adversarial robustness: white-box, untargeted L-infinity attacks.

The attacked function is `export.pixels_to_logits`: float pixels in [0, 1]
(NHWC) -> logits, normalisation inside, inference mode (BatchNorm running
statistics). Every attack maximises the cross-entropy of the true label and
keeps each adversarial image in the eps-ball around its clean image and in the
[0, 1] box: both clips are applied after the random start and after every
step. No quantisation to 8-bit pixels is applied.

Attacks (`parse_attack` names; the number is the count of gradient steps):

  fgsm     one step of size eps: x + eps * sign(grad)   (Goodfellow et al. 2015)
  bimN     N steps of size `step` from x               (Kurakin et al. 2017)
  pgdN     BIM from a uniform random start x + U(-eps, eps)  (Madry et al. 2018)
  mimN     N steps of size `step` along sign(g), g <- mu * g + grad / ||grad||_1
           per example, mu = 1.0                       (Dong et al. 2018)
  rfgsmN   a random step x + (eps / 2) * sign(N(0, 1)), then N steps of size
           `step` (R+FGSM of Tramer et al. 2018, iterated; the original takes
           one gradient step of eps - eps/2)

The gradient the attacker follows is the model's autodiff gradient: build the
model with `models.get_model(..., gradient="official")` for the AdderNet
backward (HardTanh-clipped input gradient, what attacks on the official
PyTorch model follow) or `gradient="exact"` for the true derivative of the
forward (sign(w - x), sign(0) = 0); comparing the two shows how much of an
adder network's measured robustness is gradient masking.

Random starts are drawn per example from `example_keys(seed, name,
positions)`, keyed by the example's position in the evaluated set, so results
do not depend on the batch size or the number of devices.

`AttackEvaluator` runs an attack over a whole evaluation set, data parallel
like `eval_lib.Evaluator` (each device attacks its shard of every batch,
only the metric sums are combined); one compiled program per model serves
every attack (an attack's numbers are arguments, `attack_params`).
`evaluate_attacks` is what `eval.py --attacks=...` calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from addernet_jax import data as data_lib
from addernet_jax import eval_lib
from addernet_jax import export
from addernet_jax import models
from addernet_jax import parallel
from addernet_jax import progress as progress_lib

logger = logging.getLogger(__name__)

P = jax.sharding.PartitionSpec
BATCH_AXIS = parallel.BATCH_AXIS

DEFAULT_ATTACKS = ("fgsm", "bim7", "pgd7", "mim5", "rfgsm5")
DEFAULT_EPS = 8 / 255
DEFAULT_STEP = 2 / 255
MIM_MOMENTUM = 1.0
GRADIENTS = ("official", "exact")
KINDS = ("fgsm", "bim", "pgd", "mim", "rfgsm")
# Iterative attacks' largest number of steps (PGD-1000 is about the most a
# robustness paper runs); a typo such as bim1000000 ran for days silently.
MAX_STEPS = 10_000

LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack as the general iterative method of `perturb`.

  Attributes:
    name: as given to `parse_attack` ("fgsm", "pgd7", ...).
    kind: "fgsm", "bim", "pgd", "mim" or "rfgsm".
    steps: number of gradient steps.
    step_is_eps: the step size is eps (FGSM) rather than `step`.
    uniform_start: start from x + U(-eps, eps) (PGD).
    sign_start: start from x + sign_start * eps * sign(N(0, 1)) (R+FGSM:
      0.5), 0 for none.
    momentum: MIM's mu (0: the plain sign of the gradient).
  """
  name: str
  kind: str
  steps: int
  step_is_eps: bool = False
  uniform_start: bool = False
  sign_start: float = 0.0
  momentum: float = 0.0

  def describe(self, eps: float, step: float) -> str:
    size = eps if self.step_is_eps else step
    start = ("uniform start in [-eps, eps], " if self.uniform_start else
             f"random start {self.sign_start:g}*eps*sign(N(0,1)), "
             if self.sign_start else "")
    mom = f", momentum {self.momentum:g}" if self.momentum else ""
    return (f"{self.name}: {start}{self.steps} step(s) of "
            f"{size * 255:.3g}/255{mom}, eps {eps * 255:.3g}/255")


def parse_attack(name: str) -> AttackSpec:
  """'fgsm', 'bimN', 'pgdN', 'mimN' or 'rfgsmN' (1 <= N <= MAX_STEPS) ->
  its spec."""
  m = re.fullmatch(r"(fgsm|bim|pgd|mim|rfgsm)(\d*)", str(name).strip().lower())
  if m is None:
    raise ValueError(f"unknown attack {name!r}: use fgsm, bimN, pgdN, mimN "
                     f"or rfgsmN (N = number of steps, e.g. "
                     f"{','.join(DEFAULT_ATTACKS)})")
  kind, digits = m.group(1), m.group(2)
  if kind == "fgsm":
    if digits not in ("", "1"):
      raise ValueError(f"attack {name!r}: FGSM is one step (use bimN for N "
                       f"steps)")
    return AttackSpec("fgsm", "fgsm", 1, step_is_eps=True)
  if not digits or int(digits) < 1:
    raise ValueError(f"attack {name!r}: give the number of steps, e.g. "
                     f"{kind}7")
  steps = int(digits)
  if steps > MAX_STEPS:
    raise ValueError(f"attack {name!r}: {steps} steps is more than "
                     f"{MAX_STEPS} (each step is a forward and a backward "
                     f"pass over the evaluation set)")
  label = f"{kind}{steps}"
  if kind == "bim":
    return AttackSpec(label, kind, steps)
  if kind == "pgd":
    return AttackSpec(label, kind, steps, uniform_start=True)
  if kind == "mim":
    return AttackSpec(label, kind, steps, momentum=MIM_MOMENTUM)
  return AttackSpec(label, kind, steps, sign_start=0.5)


def parse_attacks(names: str | Sequence[str]) -> list[AttackSpec]:
  """A comma list (or sequence) of attack names -> specs, duplicates
  dropped."""
  if isinstance(names, str):
    names = [n for n in names.split(",")]
  specs: list[AttackSpec] = []
  for n in names:
    if not str(n).strip():
      continue
    spec = parse_attack(n)
    if spec not in specs:
      specs.append(spec)
  if not specs:
    raise ValueError("no attack given")
  return specs


def parse_size(value: str | float) -> float:
  """'8/255', '0.03' or a float -> a float in (0, 1]."""
  if isinstance(value, str):
    text = value.strip()
    try:
      if "/" in text:
        num, den = text.split("/", 1)
        out = float(num) / float(den)
      else:
        out = float(text)
    except (ValueError, ZeroDivisionError):
      raise ValueError(f"{value!r} is not a number or a fraction like "
                       f"8/255") from None
  else:
    out = float(value)
  if not 0.0 < out <= 1.0:
    raise ValueError(f"{value!r} must be in (0, 1] (pixels are in [0, 1])")
  return out


# ------------------------------------------------------------ the attacks --


def _name_id(name: str) -> int:
  return zlib.crc32(name.encode()) & 0x7FFFFFFF


def _keys(seed, name_id, positions) -> jax.Array:
  base = jax.random.fold_in(jax.random.PRNGKey(0),
                            jnp.asarray(seed, jnp.uint32))
  base = jax.random.fold_in(base, jnp.asarray(name_id, jnp.uint32))
  return jax.vmap(lambda p: jax.random.fold_in(base, p))(
      jnp.asarray(positions).astype(jnp.uint32))


def example_keys(seed: int | jax.Array, name: str, positions: jax.Array
                 ) -> jax.Array:
  """One raw PRNG key per example from (seed, attack name, position of the
  example in the evaluated set): independent of batching and devices.
  `seed` may be traced."""
  return _keys(seed, _name_id(name), positions)


def project(x_adv: jax.Array, x: jax.Array, eps: float | jax.Array
            ) -> jax.Array:
  """Into the L-infinity eps-ball around `x`, then into [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def loss_grad(logits_fn: LogitsFn, x: jax.Array, labels: jax.Array
              ) -> jax.Array:
  """d/dx of the summed cross-entropy: each example's own gradient."""
  def loss(xa):
    logits = logits_fn(xa).astype(jnp.float32)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, labels))
  return jax.grad(loss)(x)


def attack_params(spec: AttackSpec, eps: float | jax.Array,
                  step: float | jax.Array) -> dict[str, jax.Array]:
  """The numbers `perturb_with` needs for `spec` (arrays: one compiled
  program serves every attack)."""
  eps = jnp.asarray(eps, jnp.float32)
  return {"eps": eps,
          "size": eps if spec.step_is_eps else jnp.asarray(step, jnp.float32),
          "steps": jnp.asarray(spec.steps, jnp.int32),
          "uniform_start": jnp.asarray(float(spec.uniform_start), jnp.float32),
          "sign_start": jnp.asarray(spec.sign_start, jnp.float32),
          "momentum": jnp.asarray(spec.momentum, jnp.float32)}


def perturb(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
            keys: jax.Array, spec: AttackSpec, *,
            eps: float | jax.Array = DEFAULT_EPS,
            step: float | jax.Array = DEFAULT_STEP) -> jax.Array:
  """Adversarial images for `images` (float, [0, 1], NHWC) under `spec`.

  The general iterative method (every attack of `parse_attack` is one):

      x_0 = proj(x + eps * (u * U(-1, 1) + s * sign(N(0, 1))))
      g_0 = 0
      g_t = grad_t                                   (mu = 0: FGSM, BIM, PGD,
                                                      R+FGSM)
      g_t = mu * g_{t-1} + grad_t / ||grad_t||_1     (mu > 0: MIM; the L1 norm
                                                      per example)
      x_t = proj(x_{t-1} + size * sign(g_t)),  t = 1..steps

  with `proj` = clip to the eps-ball around x, then to [0, 1]; `size` = eps
  for FGSM, `step` otherwise; u = 1 for PGD, s = 1/2 for R+FGSM, else 0.
  `keys` holds one raw key per example (`example_keys`). Traceable: jit it,
  or call it inside `jax.shard_map`.
  """
  return perturb_with(logits_fn, images, labels, keys,
                      attack_params(spec, eps, step))


def perturb_with(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array,
                 keys: jax.Array, params: dict[str, jax.Array]) -> jax.Array:
  """`perturb` with the attack given as `attack_params` (traced numbers)."""
  x = images.astype(jnp.float32)
  eps, size = params["eps"], params["size"]
  shape = x.shape[1:]
  uniform = jax.vmap(lambda k: jax.random.uniform(
      jax.random.fold_in(k, 0), shape, jnp.float32, -1.0, 1.0))(keys)
  signs = jax.vmap(lambda k: jnp.sign(jax.random.normal(
      jax.random.fold_in(k, 1), shape, jnp.float32)))(keys)
  start = params["uniform_start"] * uniform + params["sign_start"] * signs
  x_adv = project(x + eps * start, x, eps)  # x itself when start == 0
  momentum = params["momentum"]

  def body(_, carry):
    x_adv, g = carry
    grad = loss_grad(logits_fn, x_adv, labels)
    l1 = jnp.sum(jnp.abs(grad), axis=tuple(range(1, grad.ndim)),
                 keepdims=True)
    g = jnp.where(momentum > 0,
                  momentum * g + grad / jnp.maximum(l1, 1e-30), grad)
    return project(x_adv + size * jnp.sign(g), x, eps), g

  x_adv, _ = lax.fori_loop(0, params["steps"], body,
                           (x_adv, jnp.zeros_like(x)))
  return x_adv


def _run(name, logits_fn, images, labels, key, **kwargs):
  key = jax.random.PRNGKey(0) if key is None else key
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(images.shape[0], dtype=jnp.uint32))
  return perturb(logits_fn, images, labels, keys, parse_attack(name),
                 **kwargs)


def fgsm(logits_fn: LogitsFn, images, labels, *, eps=DEFAULT_EPS):
  """x + eps * sign(grad), clipped to [0, 1]."""
  return _run("fgsm", logits_fn, images, labels, None, eps=eps)


def bim(logits_fn: LogitsFn, images, labels, *, eps=DEFAULT_EPS,
        step=DEFAULT_STEP, steps=7):
  """`steps` signed-gradient steps of size `step`, projected each time."""
  return _run(f"bim{steps}", logits_fn, images, labels, None, eps=eps,
              step=step)


def pgd(logits_fn: LogitsFn, images, labels, key, *, eps=DEFAULT_EPS,
        step=DEFAULT_STEP, steps=7):
  """BIM from x + U(-eps, eps) (per-example noise from `key`)."""
  return _run(f"pgd{steps}", logits_fn, images, labels, key, eps=eps,
              step=step)


def mim(logits_fn: LogitsFn, images, labels, *, eps=DEFAULT_EPS,
        step=DEFAULT_STEP, steps=5):
  """Momentum iterative method (mu = 1.0, L1-normalised gradients)."""
  return _run(f"mim{steps}", logits_fn, images, labels, None, eps=eps,
              step=step)


def rfgsm(logits_fn: LogitsFn, images, labels, key, *, eps=DEFAULT_EPS,
          step=DEFAULT_STEP, steps=5):
  """x + (eps/2) sign(N(0, 1)) (noise from `key`), then BIM steps."""
  return _run(f"rfgsm{steps}", logits_fn, images, labels, key, eps=eps,
              step=step)


# ---------------------------------------------------- sharded evaluation --


def select_examples(labels: np.ndarray, max_examples: int) -> np.ndarray:
  """Indices of the evaluated subset: all, or `max_examples` evenly spaced
  ones of the split sorted by class (stable: each class keeps its order),
  i.e. `argsort(labels, stable)[floor(i * n / max_examples)]`, so that
  every class keeps its share whatever the order of the files."""
  num_examples = len(labels)
  if max_examples is None or max_examples <= 0 or max_examples >= num_examples:
    return np.arange(num_examples)
  by_class = np.argsort(np.asarray(labels), kind="stable")
  return by_class[np.arange(max_examples, dtype=np.int64) * num_examples
                  // max_examples]


class AttackEvaluator:
  """One attack at a time over an in-memory evaluation set, data parallel.

  Args:
    model: a Linen model (`models.get_model(..., gradient=...)`); its
      autodiff gradient is what the attacker follows.
    info: the dataset's `DatasetInfo` (normalisation).
    mesh: the device mesh (axis `BATCH_AXIS`).
    batch_size: global batch, a multiple of the number of devices.
  """

  def __init__(self, model: Any, info: data_lib.DatasetInfo,
               mesh: jax.sharding.Mesh, batch_size: int):
    num_devices = mesh.devices.size
    if batch_size <= 0 or batch_size % num_devices:
      raise ValueError(f"attack batch size {batch_size} must be a positive "
                       f"multiple of the number of devices ({num_devices})")
    self.model, self.info, self.mesh = model, info, mesh
    self.batch_size = batch_size
    self._local = batch_size // num_devices
    model, info, local, batch = (self.model, self.info, self._local,
                                 self.batch_size)

    def per_device(params, batch_stats, images, labels, batch_index,
                   attack, name_id, seed):
      n = images.shape[0]
      pos = (batch_index * batch + lax.axis_index(BATCH_AXIS) * local
             + jnp.arange(local, dtype=jnp.int32))
      mask = pos < n
      idx = jnp.where(mask, pos, 0)
      x = images[idx].astype(jnp.float32) / 255.0
      y = labels[idx]
      f = export.pixels_to_logits(
          model, {"params": params, "batch_stats": batch_stats}, info)
      keys = _keys(seed, name_id, pos)
      x_adv = perturb_with(f, x, y, keys, attack)
      clean = f(x)
      adv = f(x_adv)
      maskf = mask.astype(jnp.float32)
      sums = {
          "clean_top1": jnp.sum((jnp.argmax(clean, -1) == y) * maskf),
          "top1": jnp.sum((jnp.argmax(adv, -1) == y) * maskf),
          "loss": jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
              adv, y) * maskf),
          "max_linf": jnp.max(jnp.abs(x_adv - x).max(axis=(1, 2, 3)) * maskf),
          "count": jnp.sum(maskf)}
      sums = {k: (lax.pmax(v, BATCH_AXIS) if k == "max_linf" else
                  lax.psum(v, BATCH_AXIS)) for k, v in sums.items()}
      return sums, x_adv

    # One program for every attack: the attack's numbers are arguments.
    self._fn = jax.jit(parallel.data_parallel(
        per_device, self.mesh, in_specs=(P(),) * 8,
        out_specs=(P(), P(BATCH_AXIS))))

  def run(self, params: Any, batch_stats: Any,
          eval_set: eval_lib.InMemoryEvalSet, spec: AttackSpec, *,
          eps: float = DEFAULT_EPS, step: float = DEFAULT_STEP,
          seed: int = 0, return_examples: bool = False) -> dict[str, Any]:
    """clean_top1, top1 and loss under attack (fractions), max_linf (the
    largest |x_adv - x| seen) and num_examples over `eval_set`; with
    `return_examples` also `examples`, the adversarial images (numpy)."""
    attack = attack_params(spec, eps, step)
    name_id = jnp.uint32(_name_id(spec.name))
    totals, examples = None, []
    num_batches = math.ceil(eval_set.num_examples / self.batch_size)
    for i in range(num_batches):
      out, x_adv = self._fn(params, batch_stats, eval_set.images,
                            eval_set.labels, jnp.int32(i), attack, name_id,
                            jnp.uint32(seed))
      # One batch (one program with collectives) in flight at a time; the
      # sums are added on the host.
      out = {k: float(v) for k, v in jax.device_get(out).items()}
      if totals is None:
        totals = out
      else:
        totals = {k: (max(totals[k], v) if k == "max_linf" else
                      totals[k] + v) for k, v in out.items()}
      if return_examples:
        examples.append(np.asarray(jax.device_get(x_adv)))
    count = totals["count"]
    result = {"clean_top1": totals["clean_top1"] / count,
              "top1": totals["top1"] / count,
              "loss": totals["loss"] / count,
              "max_linf": totals["max_linf"],
              "num_examples": int(round(count))}
    if return_examples:
      result["examples"] = np.concatenate(examples)[:eval_set.num_examples]
    return result


def load_attack_models(config: ml_collections.ConfigDict, *,
                       checkpoint: str | None = None, which: str = "latest",
                       torch_checkpoint: str | None = None,
                       gradients: Sequence[str] = GRADIENTS
                       ) -> tuple[dict[str, Any], dict[str, Any], str]:
  """({gradient: model}, variables, conv) of a training workdir or an
  official-layout PyTorch checkpoint. A model without adder layers
  (conv="mult") has one gradient: its models are all the same."""
  from addernet_jax import convert  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  # eval.py warns about running statistics in the attacks' own words.
  _, variables = export.load_variables(config, checkpoint=checkpoint,
                                       which=which,
                                       torch_checkpoint=torch_checkpoint,
                                       warn_running_statistics=False)
  kwargs = convert.infer_model_kwargs(variables)
  built = {g: models.get_model(
      config.model, num_classes=kwargs["num_classes"], conv=kwargs["conv"],
      dtype=train_lib.get_dtype(config.dtype),
      implementation=config.get("implementation"), gradient=g)
           for g in gradients}
  return built, variables, kwargs["conv"]


def evaluate_attacks(config: ml_collections.ConfigDict,
                     attacks: str | Sequence[str] = DEFAULT_ATTACKS, *,
                     checkpoint: str | None = None, which: str = "latest",
                     torch_checkpoint: str | None = None,
                     gradient: str = "both", eps: float = DEFAULT_EPS,
                     step: float = DEFAULT_STEP, seed: int = 0,
                     max_examples: int = -1,
                     mesh: jax.sharding.Mesh | None = None,
                     on_row: Callable[[dict[str, Any]], None] | None = None
                     ) -> dict[str, Any]:
  """Every attack with every gradient on the config's evaluation split.

  Args:
    config: the model's training config (dataset, data_dir, model,
      eval_batch_size, holdout_examples, eval_max_examples, dtype).
    attacks: names for `parse_attack`, a comma list or a sequence.
    checkpoint, which, torch_checkpoint: the model, as for eval.py.
    gradient: "official", "exact" or "both". For a model without adder
      layers the two coincide and only "exact" is run.
    eps, step: the L-infinity radius and step size, in [0, 1] pixel units.
    seed: of the random starts (PGD, R+FGSM).
    max_examples: > 0: attack that many examples of the evaluation split,
      evenly spaced in class order (`select_examples`).
    mesh: default `parallel.make_mesh()`.
    on_row: called with each result row as soon as it is measured.

  Returns:
    {"eps", "step", "seed", "num_examples", "subset", "conv", "rows": [...]}
    with one row per (attack, gradient): attack, gradient, clean_top1, top1,
    loss, max_linf, num_examples, seconds, description.
  """
  specs = parse_attacks(attacks)
  if gradient not in (*GRADIENTS, "both"):
    raise ValueError(f"gradient must be official, exact or both, got "
                     f"{gradient!r}")
  eps, step = parse_size(eps), parse_size(step)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"attack seed must be an int in [0, 2**32), got {seed!r}")
  info = data_lib.dataset_info(config.dataset)
  pipeline = config.get("input_pipeline", "auto")
  if (not info.in_memory and pipeline != "in_memory") or pipeline == "streaming":
    raise ValueError(f"attacks run on in-memory evaluation sets only "
                     f"({config.dataset} is streamed); use a smaller dataset "
                     f"or --config.input_pipeline=in_memory")
  gradients = list(GRADIENTS) if gradient == "both" else [gradient]
  built, variables, conv = load_attack_models(
      config, checkpoint=checkpoint, which=which,
      torch_checkpoint=torch_checkpoint, gradients=gradients)
  if conv != "adder":
    # No adder layer: the official and exact gradients are the same.
    built = {"exact": built[gradients[-1]]}
    gradients = ["exact"]
  _, (images, labels) = data_lib.load_in_memory_splits(
      config.dataset, config.data_dir,
      holdout_examples=config.get("holdout_examples", 0),
      eval_max_examples=config.get("eval_max_examples", -1),
      with_train=False,
      progress_bar=progress_lib.shown(config))
  total = len(labels)
  index = select_examples(labels, max_examples)
  images, labels = images[index], labels[index]
  mesh = mesh or parallel.make_mesh()
  ndev = mesh.devices.size
  batch = min(int(config.eval_batch_size), -(-len(labels) // ndev) * ndev)
  batch = -(-batch // ndev) * ndev
  eval_set = eval_lib.InMemoryEvalSet(images, labels, mesh)
  rep = parallel.replicated_sharding(mesh)
  params = jax.device_put(variables["params"], rep)
  batch_stats = jax.device_put(variables.get("batch_stats", {}), rep)
  subset = ("all" if len(index) == total else
            f"{len(index)} of {total}, evenly spaced in class order: "
            f"floor(i * {total} / {len(index)})")
  rows = []
  for g in gradients:
    evaluator = AttackEvaluator(built[g], info, mesh, batch)
    for spec in specs:
      start = time.perf_counter()
      result = evaluator.run(params, batch_stats, eval_set, spec, eps=eps,
                             step=step, seed=seed)
      row = {"attack": spec.name, "gradient": g, **result,
             "seconds": round(time.perf_counter() - start, 2),
             "description": spec.describe(eps, step)}
      rows.append(row)
      if row["max_linf"] < 0.01 * eps:
        logger.warning(
            "%s (%s gradient) moved no pixel by more than %.2g (eps %.3g): "
            "the model's input gradient is zero almost everywhere (e.g. "
            "outputs that do not depend on the input), so this row says "
            "nothing about robustness", spec.name, g, row["max_linf"], eps)
      if on_row is not None:
        on_row(row)
  return {"eps": eps, "step": step, "seed": seed,
          "num_examples": int(len(index)), "subset": subset, "conv": conv,
          "rows": rows}


TABLE_HEADER = (f"{'attack':<8} {'gradient':<9} {'examples':>8} "
                f"{'clean top-1':>11} {'attacked top-1':>14} "
                f"{'attacked loss':>13} {'seconds':>8}")


def running_statistics_caveat(result: Mapping[str, Any],
                              gap: float = 0.05) -> str | None:
  """A warning when an evaluation's `top1` (running BatchNorm statistics,
  which the attacks use) trails its `top1_recalibrated` by more than `gap`,
  as after a short run; None otherwise."""
  recalibrated = result.get("top1_recalibrated")
  if recalibrated is None or recalibrated - result["top1"] <= gap:
    return None
  return (f"the attacks use the checkpoint's running BatchNorm statistics, "
          f"with which it scores {100 * result['top1']:.2f}% top-1 against "
          f"{100 * recalibrated:.2f}% with statistics re-estimated (usual "
          f"after a short run): the attack rows describe that weaker model")


def format_row(row: dict[str, Any]) -> str:
  """One line of the table eval.py prints (percentages)."""
  return (f"{row['attack']:<8} {row['gradient']:<9} "
          f"{row['num_examples']:>8d} {100 * row['clean_top1']:>10.2f}% "
          f"{100 * row['top1']:>13.2f}% {row['loss']:>13.4f} "
          f"{row['seconds']:>8.1f}")
