"""Time one ResNet training step (forward, custom backward, SGD update).

    python benchmarks/train_step.py --model resnet20 --conv adder --batch 64 --steps 10

Prints one JSON line: ms_per_step_median (and min/max) of steps waited on one
by one, ms_per_step_pipelined (steps dispatched back to back, one wait at the
end, as in a training loop), compile_s, peak_rss_mb, compiled_memory_mb
(XLA's memory analysis of the compiled step: temporaries, arguments, outputs,
aliased, total) and, on accelerators, peak_device_mb (the allocator's peak), with the
device and versions (`--jsonl FILE` also appends it). Run the adder and mult variants in one session to compare them side by
side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from addernet_jax.models import get_model  # noqa: E402

INPUT_SHAPES = {"lenet5_bn": (28, 28, 1), "resnet18": (224, 224, 3),
                "resnet34": (224, 224, 3), "resnet50": (224, 224, 3)}


def build_step(model, learning_rate: float = 0.1):
  """A jitted SGD-with-momentum step over params and batch_stats."""
  optimizer = optax.sgd(learning_rate, momentum=0.9)

  def loss_fn(params, batch_stats, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), updates["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return optimizer, step


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


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--conv", default="adder", choices=("adder", "mult"))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--implementation", default=None,
                      choices=(None, "xla", "pallas"))
  parser.add_argument("--dtype", default="float32",
                      choices=("float32", "bfloat16"))
  parser.add_argument("--jsonl", default=None,
                      help="also append the JSON line to this file")
  args = parser.parse_args(argv)

  model = get_model(args.model, num_classes=args.num_classes, conv=args.conv,
                    dtype=jnp.dtype(args.dtype),
                    implementation=args.implementation)
  shape = (args.batch, *INPUT_SHAPES.get(args.model, (32, 32, 3)))
  key_x, key_y, key_init = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(key_x, shape, jnp.float32)
  labels = jax.random.randint(key_y, (args.batch,), 0, args.num_classes)
  variables = model.init(key_init, images[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  optimizer, step = build_step(model)
  opt_state = optimizer.init(params)

  start = time.perf_counter()
  step = step.trace(params, batch_stats, opt_state, images, labels).lower(
      ).compile()
  params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                              images, labels)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                images, labels)
    jax.block_until_ready(loss)
    times.append((time.perf_counter() - start) * 1e3)
  # As in a training loop: steps dispatched back to back, one wait at the end
  # (on accelerators this hides the per-step host round trip).
  start = time.perf_counter()
  for _ in range(args.steps):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                images, labels)
  jax.block_until_ready((params, loss))
  pipelined_ms = (time.perf_counter() - start) * 1e3 / args.steps

  result = {
      "model": args.model, "conv": args.conv, "batch": args.batch,
      "steps": args.steps, "dtype": args.dtype,
      "implementation": args.implementation or "default",
      "gpu_kernels": os.environ.get("ADDERNET_GPU_KERNELS", "triton"),
      "ms_per_step_median": round(statistics.median(times), 2),
      "ms_per_step_min": round(min(times), 2),
      "ms_per_step_max": round(max(times), 2),
      "ms_per_step_pipelined": round(pipelined_ms, 3),
      "compile_and_first_step_s": round(compile_s, 2),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      "peak_device_mb": peak_device_mb(),
      "compiled_memory_mb": compiled_memory_mb(step),
      "final_loss_finite": bool(jnp.isfinite(loss)),
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "jax": jax.__version__, "python": platform.python_version(),
  }
  print(json.dumps(result))
  if args.jsonl:
    with open(args.jsonl, "a") as out:
      out.write(json.dumps(result) + "\n")
  return result


if __name__ == "__main__":
  main()
