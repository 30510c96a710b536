"""Time the real training step of a config, and its per-epoch evaluation.

    python benchmarks/train_step.py --model resnet20 --conv adder --batch 64 --steps 10
        [--config configs/cifar10_resnet20.py] [--implementation pallas]
        [--num_train N] [--num_test N] [--no-eval] [--no-check] [--jsonl FILE]

The step is what `train.py` runs (`addernet_jax.train_lib`): the config's
optimizer (adaptive learning rate on the adder filters, weight decay,
momentum, the schedule), on-device random crop and flip of a resident uint8
dataset, `jax.shard_map` over every device. The data are synthetic (uniform
random pixels and labels) of the dataset's size, so no download is needed;
the evaluation is `train_lib`'s per-epoch one (test set with running
statistics, BatchNorm re-estimation on `recalibrate_bn_batches` training
batches and the test set again) on a synthetic test set of the dataset's
size. Datasets that are streamed (ImageNet) time the streaming step on one
synthetic batch and no evaluation.

Prints one JSON line: ms_per_step_median (and min/max) of steps waited on one
by one, ms_per_step_pipelined (steps dispatched back to back, one wait at the
end, as in a training loop), compile_and_first_step_s, eval_s_per_epoch,
steps_per_epoch (of the real dataset size), peak_rss_mb, compiled_memory_mb
(XLA's memory analysis of the compiled step) and, on accelerators,
peak_device_mb (the allocator's peak), with the device and versions; and
what ran: `ran` counts, per kind (forward, input_grad), the adder layers
traced with each implementation ("xla", "triton", "mosaic_gpu", "tpu_batch",
"tpu", ...; from
dispatch, not the requested label), and `error_vs_xla` compares one step's
gradients (same parameters and batch) with the pure-jnp path. `--jsonl FILE`
also appends the line. Run the adder and mult variants in one session to
compare them side by side.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from addernet_jax import data as data_lib  # noqa: E402
from addernet_jax import eval_lib, models, ops, parallel  # noqa: E402
from addernet_jax import train_lib  # noqa: E402

# Relative L2 error of one step's gradients against the pure-jnp path above
# which a row is not verified. The layers agree to ~1e-6; BatchNorm over
# outputs in the hundreds amplifies rounding (docs/design.md: 0.1-0.3% for
# float32 on real data), a wrong kernel gives O(1).
STEP_TOLERANCE = {"float32": 1e-2, "bfloat16": 5e-2, "float16": 5e-2}
DEFAULT_CONFIG = {"lenet5_bn": "configs/mnist_lenet5.py",
                  "resnet18": "configs/imagenet_resnet18.py",
                  "resnet34": "configs/imagenet_resnet18.py",
                  "resnet50": "configs/imagenet_resnet50.py"}


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", ROOT / path
                                                if not Path(path).is_absolute()
                                                else path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def compiled_memory_mb(compiled) -> dict:
  """XLA's own account of a compiled step's memory (arguments, outputs,
  temporaries and their peak), in MiB; available on every backend."""
  stats = compiled.memory_analysis()
  out = {name.replace("_size", ""): round(
      getattr(stats, f"{name}_in_bytes") / 2**20, 1)
         for name in ("temp_size", "argument_size", "output_size",
                      "alias_size")}
  # peak_memory_in_bytes leaves temporaries out on the CPU backend (JAX
  # 0.10.2), so the total is summed here.
  out["total"] = round(out["temp"] + out["argument"] + out["output"]
                       - out["alias"], 1)
  return out


def peak_device_mb() -> float | None:
  stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def ran_counts(record) -> dict:
  """{kind: {implementation: adder layers traced with it}}."""
  out = {"forward": {}, "input_grad": {}}
  for r in record:
    counts = out.setdefault(r["kind"], {})
    counts[r["implementation"]] = counts.get(r["implementation"], 0) + 1
  return out


def _rel_l2(a, b) -> float:
  a = np.concatenate([np.ravel(np.asarray(x, np.float64))
                      for x in jax.tree.leaves(a)])
  b = np.concatenate([np.ravel(np.asarray(x, np.float64))
                      for x in jax.tree.leaves(b)])
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def error_vs_xla(config, params, batch_stats, images, labels) -> dict:
  """One step's loss and gradients with the config's implementation against
  the pure-jnp path, same parameters and batch, one device, train mode."""
  def grads(implementation):
    model = models.get_model(
        config.model, num_classes=config.num_classes, conv=config.conv,
        dtype=train_lib.get_dtype(config.dtype), bn_axis_name=None,
        implementation=implementation)

    def loss_fn(p):
      logits, _ = model.apply({"params": p, "batch_stats": batch_stats},
                              images, train=True, mutable=["batch_stats"])
      return train_lib.cross_entropy_loss(logits, labels)
    return jax.jit(jax.value_and_grad(loss_fn))(params)

  loss, g = grads(config.get("implementation"))
  loss_x, g_x = grads("xla")
  err = _rel_l2(g, g_x)
  tol = STEP_TOLERANCE.get(config.dtype, STEP_TOLERANCE["float32"])
  return {"grads_rel_l2": err, "loss_abs_diff": abs(float(loss) -
                                                    float(loss_x)),
          "tolerance": tol,
          "passed": bool(np.isfinite(err) and err <= tol
                         and np.isfinite(float(loss)))}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=None,
                      help="model name (default: the config's, or resnet20 "
                      "without --config)")
  parser.add_argument("--config", default=None,
                      help="config file (default: configs/cifar10_resnet20.py"
                      ", or the model's dataset config)")
  parser.add_argument("--conv", default="adder", choices=("adder", "mult"))
  parser.add_argument("--batch", type=int, default=None,
                      help="global batch (default: the config's)")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--num_classes", type=int, default=None)
  parser.add_argument("--implementation", default=None,
                      choices=(None, "xla", "pallas"))
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--num_train", type=int, default=None,
                      help="resident synthetic training images (default: "
                      "the dataset's size); steps_per_epoch always uses the "
                      "dataset's size")
  parser.add_argument("--num_test", type=int, default=None,
                      help="synthetic test images (default: the dataset's)")
  parser.add_argument("--eval", action=argparse.BooleanOptionalAction,
                      default=True, help="time the per-epoch evaluation")
  parser.add_argument("--check", action=argparse.BooleanOptionalAction,
                      default=True, help="compare one step's gradients "
                      "with the pure-jnp path")
  parser.add_argument("--jsonl", default=None,
                      help="also append the JSON line to this file")
  args = parser.parse_args(argv)

  if args.model is None and args.config is None:
    args.model = "resnet20"
  config_path = args.config or DEFAULT_CONFIG.get(
      args.model, "configs/cifar10_resnet20.py")
  config = load_config(config_path)
  if args.model is not None:  # --config alone keeps the config's model
    config.model = args.model
  config.conv, config.dtype = args.conv, args.dtype
  config.implementation = args.implementation
  if args.batch:
    config.batch_size = args.batch
  if args.num_classes:
    config.num_classes = args.num_classes
  info = data_lib.dataset_info(config.dataset)
  mesh = parallel.make_mesh()
  batch = config.batch_size
  rng = np.random.default_rng(0)
  in_memory = info.in_memory
  train_size = info.train_size or batch
  steps_per_epoch = train_size // batch
  num_train = max(batch, min(args.num_train or train_size, train_size))
  rep = parallel.replicated_sharding(mesh)
  create = lambda key: train_lib.create_train_state(
      config, key, info.image_shape, steps_per_epoch=steps_per_epoch)
  state = jax.jit(create, out_shardings=rep)(jax.random.key(config.seed))

  if in_memory:
    images = rng.integers(0, 256, (num_train, *info.image_shape), np.uint8)
    labels = rng.integers(0, info.num_classes, (num_train,), np.int32)
    num_test = args.num_test or info.test_size or config.eval_batch_size
    test_images = rng.integers(0, 256, (num_test, *info.image_shape),
                               np.uint8)
    test_labels = rng.integers(0, info.num_classes, (num_test,), np.int32)
    # train_lib's own resident data, as training builds it from files.
    data = train_lib.InMemoryData(images, labels, test_images, test_labels,
                                  batch, mesh)
    perm = data.permutation(jax.random.key(1), 0)
    step_fn = train_lib.make_in_memory_train_step(mesh, info, batch)
    step_args = lambda i: (data.images, data.labels, perm,
                           i % data.steps_per_epoch)
    step_name = "train_lib.make_in_memory_train_step"
  else:
    images = rng.integers(0, 256, (batch, *info.image_shape), np.uint8)
    labels = rng.integers(0, info.num_classes, (batch,), np.int32)
    x = data_lib.augment_and_normalize(jnp.asarray(images), None, info,
                                       train=False)
    x = jax.device_put(x, parallel.batch_sharding(mesh))
    y = jax.device_put(jnp.asarray(labels), parallel.batch_sharding(mesh))
    step_fn = train_lib.make_streaming_train_step(mesh)
    step_args = lambda i: (x, y)
    step_name = "train_lib.make_streaming_train_step"

  print(f"compiling and timing {args.steps} steps of {step_name}",
        file=sys.stderr, flush=True)
  start = time.perf_counter()
  with ops.record_backends() as record:
    step = step_fn.trace(state, *step_args(0)).lower().compile()
  state, metrics = step(state, *step_args(0))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, *step_args(i + 1))
    jax.block_until_ready(metrics)
    times.append((time.perf_counter() - start) * 1e3)
  # As in a training loop: steps dispatched back to back, one wait at the end
  # (on accelerators this hides the per-step host round trip).
  start = time.perf_counter()
  for i in range(args.steps):
    state, metrics = step(state, *step_args(i))
  jax.block_until_ready((state.params, metrics))
  pipelined_ms = (time.perf_counter() - start) * 1e3 / args.steps

  eval_s = eval_compile_s = None
  if args.eval and in_memory:
    print(f"timing the per-epoch evaluation: 3 evaluations of {num_test} "
          f"test images, each with BatchNorm re-estimated (minutes on a CPU; "
          f"--no-eval skips it)", file=sys.stderr, flush=True)
    evaluator = eval_lib.Evaluator(train_lib.build_model(config), info, mesh,
                                   config.eval_batch_size)
    start = time.perf_counter()
    train_lib._evaluate(config, evaluator, state, data, info, mesh,  # pylint: disable=protected-access
                        steps_per_epoch, 1)
    eval_compile_s = time.perf_counter() - start
    runs = []
    for epoch in (2, 3):
      start = time.perf_counter()
      train_lib._evaluate(config, evaluator, state, data, info, mesh,  # pylint: disable=protected-access
                          steps_per_epoch, epoch)
      runs.append(time.perf_counter() - start)
    eval_s = min(runs)

  check = {"passed": True, "reference": True}
  counts = ran_counts(record)
  if args.check and config.conv == "adder" and any(
      k != "xla" for c in counts.values() for k in c):
    n = min(batch, num_train)
    x_check = data_lib.augment_and_normalize(jnp.asarray(images[:n]), None,
                                             info, train=False)
    check = error_vs_xla(config, state.params, state.batch_stats,
                         x_check.astype(train_lib.get_dtype(config.dtype)),
                         jnp.asarray(labels[:n]))

  result = {
      "model": config.model, "conv": config.conv, "batch": batch,
      "steps": args.steps, "dtype": config.dtype, "config": config_path,
      "implementation": args.implementation or "default",
      "gpu_kernels": os.environ.get("ADDERNET_GPU_KERNELS", "triton"),
      "real_step": True, "step_fn": step_name,
      "optimizer": {"learning_rate": config.learning_rate,
                    "momentum": config.momentum,
                    "weight_decay": config.weight_decay,
                    "adaptive_lr": bool(config.get("adaptive_lr", True)),
                    "eta": config.eta},
      "augmentation": "on-device random crop + flip" if in_memory else
                      "none (streamed datasets augment on the host)",
      "steps_per_epoch": steps_per_epoch, "num_epochs": config.num_epochs,
      "devices": mesh.devices.size,
      "ms_per_step_median": round(statistics.median(times), 2),
      "ms_per_step_min": round(min(times), 2),
      "ms_per_step_max": round(max(times), 2),
      "ms_per_step_pipelined": round(pipelined_ms, 3),
      "compile_and_first_step_s": round(compile_s, 2),
      "eval_s_per_epoch": None if eval_s is None else round(eval_s, 3),
      "eval_compile_s": (None if eval_compile_s is None
                         else round(eval_compile_s, 2)),
      "ran": counts, "error_vs_xla": check,
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "peak_device_mb": peak_device_mb(),
      "compiled_memory_mb": compiled_memory_mb(step),
      "final_loss_finite": bool(jnp.isfinite(metrics["loss"])),
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__, "python": platform.python_version(),
      "optax": optax.__version__,
  }
  print(json.dumps(result))
  if args.jsonl:
    with open(args.jsonl, "a") as out:
      out.write(json.dumps(result) + "\n")
  return result


if __name__ == "__main__":
  main()
