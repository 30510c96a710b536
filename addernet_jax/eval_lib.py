"""Evaluation: sharded top-1/top-5/loss over a whole split, and BatchNorm
re-estimation.

Every example of the evaluation split counts exactly once: the split is cut
into global batches of `eval_batch_size`, the last one padded and masked. The
per-device work runs in `jax.shard_map` over the mesh axis
`parallel.BATCH_AXIS`, and the sums are combined with `lax.psum`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Sequence

import flax
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from addernet_jax import data as data_lib
from addernet_jax import parallel
from addernet_jax import progress as progress_lib

P = jax.sharding.PartitionSpec
BATCH_AXIS = parallel.BATCH_AXIS
TOP_K = 5


class InMemoryEvalSet:
  """An evaluation split (uint8 images, int32 labels) replicated on the mesh."""

  def __init__(self, images: np.ndarray, labels: np.ndarray,
               mesh: jax.sharding.Mesh):
    if len(images) != len(labels) or len(labels) == 0:
      raise ValueError(f"evaluation set: {len(images)} images and "
                       f"{len(labels)} labels (need the same number, > 0)")
    rep = parallel.replicated_sharding(mesh)
    self.num_examples = int(len(labels))
    self.images = jax.make_array_from_callback(
        images.shape, rep, lambda index: images[index])
    labels = np.asarray(labels, np.int32)
    self.labels = jax.make_array_from_callback(
        labels.shape, rep, lambda index: labels[index])


def _sums(logits: jax.Array, labels: jax.Array, mask: jax.Array
          ) -> dict[str, jax.Array]:
  """Masked sums of loss, top-1 and top-5 hits, and the example count."""
  logits = logits.astype(jnp.float32)
  maskf = mask.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  k = min(TOP_K, logits.shape[-1])
  _, top = lax.top_k(logits, k)
  topk = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
  return {"loss": jnp.sum(loss * maskf), "top1": jnp.sum(top1 * maskf),
          "top5": jnp.sum(topk * maskf), "count": jnp.sum(maskf)}


def _finish(totals: dict[str, Any]) -> dict[str, float]:
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"loss": float(totals["loss"]) / count,
          "top1": float(totals["top1"]) / count,
          "top5": float(totals["top5"]) / count,
          "num_examples": int(round(count))}


class Evaluator:
  """Sharded evaluation of one model over a mesh.

  Args:
    model: a Linen model from `models.get_model` (BatchNorm axis name
      `BATCH_AXIS` or None; evaluation uses running statistics).
    info: the dataset's `DatasetInfo` (normalisation, image shape).
    mesh: the device mesh (axis `BATCH_AXIS`).
    eval_batch_size: global batch; a multiple of the number of devices.
    progress_bar: show a progress bar of the evaluated batches (on the
      console; removed when done).
  """

  def __init__(self, model: flax.linen.Module, info: data_lib.DatasetInfo,
               mesh: jax.sharding.Mesh, eval_batch_size: int, *,
               progress_bar: bool = False):
    num_devices = mesh.devices.size
    if eval_batch_size <= 0 or eval_batch_size % num_devices:
      raise ValueError(f"eval_batch_size={eval_batch_size} must be a positive"
                       f" multiple of the number of devices ({num_devices})")
    self.model, self.info, self.mesh = model, info, mesh
    self.batch_size = eval_batch_size
    self.progress_bar = progress_bar
    local = eval_batch_size // num_devices
    apply = model.apply

    # Every program adds its batch's sums to the running totals itself (one
    # program per batch, not one per metric): see `parallel.DispatchWindow`.
    def in_memory(params, batch_stats, images, labels, batch_index, totals):
      n = images.shape[0]
      pos = (batch_index * eval_batch_size + lax.axis_index(BATCH_AXIS) * local
             + jnp.arange(local, dtype=jnp.int32))
      mask = pos < n
      idx = jnp.where(mask, pos, 0)
      x = data_lib.augment_and_normalize(images[idx], None, info, train=False)
      logits = apply({"params": params, "batch_stats": batch_stats}, x,
                     train=False)
      return jax.tree.map(jnp.add, totals, lax.psum(
          _sums(logits, labels[idx], mask), BATCH_AXIS))

    def streamed(params, batch_stats, images, labels, mask, totals):
      logits = apply({"params": params, "batch_stats": batch_stats}, images,
                     train=False)
      return jax.tree.map(jnp.add, totals, lax.psum(
          _sums(logits, labels, mask), BATCH_AXIS))

    def batch_stats_of(params, batch_stats, images, perm, batch_size,
                       batch_index):
      # Training-mode forward pass of un-augmented training images; BN
      # averages its batch statistics over the mesh axis.
      local_b = batch_size // num_devices
      start = batch_index * batch_size + lax.axis_index(BATCH_AXIS) * local_b
      idx = lax.dynamic_slice(perm, (start,), (local_b,))
      x = data_lib.augment_and_normalize(images[idx], None, info, train=False)
      _, updates = apply({"params": params, "batch_stats": batch_stats}, x,
                         train=True, mutable=["batch_stats"])
      return updates["batch_stats"]

    def shard(fn, in_specs):
      return jax.jit(parallel.data_parallel(fn, mesh, in_specs=in_specs,
                                            out_specs=P()))

    self._in_memory = shard(in_memory, (P(),) * 6)
    self._streamed = shard(streamed, (P(), P(), P(BATCH_AXIS), P(BATCH_AXIS),
                                      P(BATCH_AXIS), P()))
    self._batch_stats_fn = batch_stats_of
    self._recal_cache: dict[int, Any] = {}

  def _zero_totals(self) -> dict[str, jax.Array]:
    zero = np.zeros((), np.float32)
    return jax.device_put({"loss": zero, "top1": zero, "top5": zero,
                           "count": zero},
                          parallel.replicated_sharding(self.mesh))

  def evaluate_in_memory(self, params: Any, batch_stats: Any,
                         eval_set: InMemoryEvalSet) -> dict[str, float]:
    """loss, top1, top5 (fractions) and num_examples over `eval_set`."""
    window = parallel.DispatchWindow.for_mesh(self.mesh)
    totals = self._zero_totals()
    num_batches = math.ceil(eval_set.num_examples / self.batch_size)
    with progress_lib.counting(num_batches, "evaluating",
                               self.progress_bar) as progress:
      for i in range(num_batches):
        totals = self._in_memory(params, batch_stats, eval_set.images,
                                 eval_set.labels, i, totals)
        window.push(totals)
        progress.dispatched(totals)
      return _finish(totals)

  def evaluate_stream(self, params: Any, batch_stats: Any,
                      batches: Iterator[dict[str, np.ndarray]], *,
                      max_examples: int = -1) -> dict[str, float]:
    """The same over per-process batches {'image', 'label', 'mask'} (e.g.
    `data.streaming_iterator(..., train=False)`); with `max_examples` > 0 it
    stops after the first batch that reaches that many examples."""
    return evaluate_stream_together([(self, params, batch_stats)], batches,
                                    max_examples=max_examples)[0]

  def recalibrate_batch_stats(self, params: Any, batch_stats: Any,
                              images: jax.Array, perm: jax.Array,
                              batch_size: int, num_batches: int) -> Any:
    """BatchNorm statistics re-estimated on `num_batches` training batches.

    Each batch (positions `perm[i*batch_size:(i+1)*batch_size]` of the
    replicated uint8 `images`, normalised, not augmented) runs in training
    mode from zero statistics, which gives (1 - momentum) * its batch
    statistics; the momentum is measured with a second pass from unit
    statistics. The result is the average of the per-batch statistics
    (PyTorch's `update_bn` with a cumulative average).
    """
    # A handful of programs, each over the whole tree of statistics (not one
    # per leaf, dozens for a ResNet): see `parallel.DispatchWindow`.
    fns = self._recal_cache.get(batch_size)
    if fns is None:
      stats = lambda p, b, im, pm, i: self._batch_stats_fn(p, b, im, pm,
                                                           batch_size, i)
      add_stats = lambda p, b, im, pm, i, total: jax.tree.map(
          jnp.add, total, stats(p, b, im, pm, i))
      fns = (jax.jit(parallel.data_parallel(stats, self.mesh,
                                            in_specs=(P(),) * 5,
                                            out_specs=P())),
             jax.jit(parallel.data_parallel(add_stats, self.mesh,
                                            in_specs=(P(),) * 6,
                                            out_specs=P())))
      self._recal_cache[batch_size] = fns
    fn, fn_add = fns
    window = parallel.DispatchWindow.for_mesh(self.mesh)
    zeros, ones = _zeros_and_ones(batch_stats)
    first = fn(params, zeros, images, perm, 0)
    window.push(first)
    from_ones = fn(params, ones, images, perm, 0)
    window.push(from_ones)
    total = first
    for i in range(1, num_batches):
      total = fn_add(params, zeros, images, perm, i, total)
      window.push(total)
    return _average_stats(total, first, from_ones, num_batches)


def evaluate_stream_together(
    runs: Sequence[tuple[Evaluator, Any, Any]],
    batches: Iterator[dict[str, np.ndarray]], *, max_examples: int = -1
) -> list[dict[str, float]]:
  """`Evaluator.evaluate_stream` of several models in one pass over the
  stream: `runs` is a list of (evaluator, params, batch_stats), all on the
  same mesh and eval batch size (e.g. a PKKD student and its teacher); each
  batch is read and placed on the devices once. Returns one result per run,
  in order."""
  if not runs:
    raise ValueError("evaluate_stream_together needs at least one model")
  first = runs[0][0]
  for evaluator, _, _ in runs[1:]:
    if (evaluator.mesh is not first.mesh
        or evaluator.batch_size != first.batch_size):
      raise ValueError("evaluate_stream_together: every evaluator must share "
                       f"one mesh and eval batch size, got batch sizes "
                       f"{[r[0].batch_size for r in runs]}")
  window = parallel.DispatchWindow.for_mesh(first.mesh)
  # pylint: disable=protected-access
  totals = [evaluator._zero_totals() for evaluator, _, _ in runs]
  seen = 0
  with progress_lib.counting(None, "evaluating",
                             first.progress_bar) as progress:
    for batch in batches:
      arrays = parallel.global_batch_from_local(
          {"image": batch["image"], "label": batch["label"],
           "mask": batch["mask"]}, first.mesh)
      for i, (evaluator, params, batch_stats) in enumerate(runs):
        totals[i] = evaluator._streamed(
            params, batch_stats, arrays["image"], arrays["label"],
            arrays["mask"], totals[i])
        window.push(totals[i])
      progress.dispatched(list(totals))  # a snapshot: the list changes
      seen += first.batch_size
      if 0 < max_examples <= seen:
        break
    # pylint: enable=protected-access
    if seen == 0:
      raise ValueError("the evaluation split is empty")
    return [_finish(t) for t in totals]


@jax.jit
def _zeros_and_ones(tree: Any) -> tuple[Any, Any]:
  return (jax.tree.map(jnp.zeros_like, tree), jax.tree.map(jnp.ones_like, tree))


@functools.partial(jax.jit, static_argnums=3)
def _average_stats(total: Any, first: Any, from_ones: Any,
                   num_batches: int) -> Any:
  """The sum of `num_batches` batches' (1 - momentum) * statistics divided
  by num_batches * (1 - momentum), the momentum measured per leaf as the
  mean of `from_ones - first` (the same pass from unit and zero statistics).
  """
  momentum = jax.tree.map(lambda a, b: jnp.mean(b - a), first, from_ones)
  return jax.tree.map(lambda s, m: s / (num_batches * (1.0 - m)), total,
                      momentum)


def evaluate_variables(config: ml_collections.ConfigDict, model: Any,
                       variables: dict[str, Any],
                       mesh: jax.sharding.Mesh | None = None
                       ) -> dict[str, Any]:
  """top1, top5, loss, num_examples of `variables` ({'params',
  'batch_stats'}) on the config's evaluation split."""
  mesh = mesh or parallel.make_mesh()
  info = data_lib.dataset_info(config.dataset)
  evaluator = Evaluator(model, info, mesh, config.eval_batch_size,
                        progress_bar=progress_lib.shown(config))
  rep = parallel.replicated_sharding(mesh)
  params = jax.device_put(variables["params"], rep)
  batch_stats = jax.device_put(variables.get("batch_stats", {}), rep)
  pipeline = config.get("input_pipeline", "auto")
  if (info.in_memory and pipeline != "streaming") or pipeline == "in_memory":
    _, (images, labels) = data_lib.load_in_memory_splits(
        config.dataset, config.data_dir,
        holdout_examples=config.get("holdout_examples", 0),
        eval_max_examples=config.get("eval_max_examples", -1),
        with_train=False,
        progress_bar=progress_lib.shown(config))
    return evaluator.evaluate_in_memory(
        params, batch_stats, InMemoryEvalSet(images, labels, mesh))
  it = data_lib.streaming_iterator(
      config.dataset, config.data_dir, "test",
      global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train=False, worker_count=config.get("num_workers"))
  try:
    return evaluator.evaluate_stream(
        params, batch_stats, it,
        max_examples=int(config.get("eval_max_examples", -1) or -1))
  finally:
    it.close()
