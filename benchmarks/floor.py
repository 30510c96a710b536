"""Device ceilings and the ResNet-20 adder layers' floors.

    python benchmarks/floor.py [--batch 256] [--out floor.json]

Measures, on the default JAX device:
  - the FP32 instruction rate, with a fused element-wise chain of
    `x = |x - a| + b` steps (2 FP32 instructions per step, the adder MAC's
    instruction mix: a subtraction and an add of an absolute value) and, for
    comparison, a chain of FMAs (1 instruction per step);
  - memory bandwidth, with a large copy-like kernel (`y = x + 1`, bytes read
    plus bytes written).
Then derives each ResNet-20 adder layer's floor at `--batch` for the forward,
the input gradient and the filter gradient: max(instructions / rate, bytes /
bandwidth), with the instructions per MAC of `INSTR_PER_MAC` (the one floor
model: `benchmarks/ops.py` and `benchmarks/report.py` use these figures).
Prints one JSON object (last line). Every figure is measured here; run it on
the device you report.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.resnet20_layers import RESNET20_LAYERS, layer_shapes  # noqa: E402,F401

# FP32 instructions per MAC on CUDA cores, the floor model of every benchmark:
#   forward      subtract, accumulate |d| (abs is a free operand modifier): 2
#   input_grad   subtract, clip as one `min.xorsign.abs.f32` (sm_86 and newer,
#                the GPUs this project is measured on; older GPUs clip with
#                min + max, 4 instructions, so they reach at most 3/4 of this
#                floor), FMA with the output gradient: 3
#   filter_grad  the convolution weight-gradient identity, one FMA: 1
# The floor is the fewest instructions any kernel needs, so the input
# gradient's is 3, the count of kernels/triton_simt.py's "xorsign" clip.
INSTR_PER_MAC = {"forward": 2, "input_grad": 3, "filter_grad": 1}
KINDS = tuple(INSTR_PER_MAC)


def traffic_bytes(kind: str, sh: dict, itemsize: int = 4) -> int:
  """Fewest bytes `kind` moves for one layer (`layer_shapes` dict): each
  operand read once and each result written once."""
  size = {k: math.prod(sh[k]) for k in ("xp", "w", "y")}
  return itemsize * {"forward": size["xp"] + size["w"] + size["y"],
                     "input_grad": 2 * size["xp"] + size["w"] + size["y"],
                     "filter_grad": size["xp"] + 2 * size["w"] + size["y"]
                     }[kind]


def floor_s(kind: str, sh: dict, instr_per_s: float | None,
            bytes_per_s: float | None, itemsize: int = 4
            ) -> tuple[float, str]:
  """(seconds, "compute" or "memory") below which `kind` cannot run on one
  layer: max(instructions / rate, bytes / bandwidth); a rate left out
  (None or 0) does not bound."""
  t_compute = (INSTR_PER_MAC[kind] * sh["macs"] / instr_per_s
               if instr_per_s else 0.0)
  t_memory = (traffic_bytes(kind, sh, itemsize) / bytes_per_s
              if bytes_per_s else 0.0)
  return max(t_compute, t_memory), ("compute" if t_compute >= t_memory
                                    else "memory")


def _time(fn, *args, reps: int) -> float:
  """Median seconds of `fn(*args)` after a warm-up (compile excluded)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def fp32_rate(elements: int, steps: int, reps: int) -> dict:
  """FP32 instructions per second from two fused element-wise chains."""
  x = jax.random.normal(jax.random.key(0), (elements,), jnp.float32)

  @jax.jit
  def adder_chain(x):
    a, b = jnp.float32(0.37), jnp.float32(-0.21)
    for _ in range(steps):
      x = jnp.abs(x - a) + b
    return x

  @jax.jit
  def fma_chain(x):
    a, b = jnp.float32(0.999), jnp.float32(1e-3)
    for _ in range(steps):
      x = x * a + b
    return x

  t_add = _time(adder_chain, x, reps=reps)
  t_fma = _time(fma_chain, x, reps=reps)
  return {"adder_chain_instr_per_s": 2 * steps * elements / t_add,
          "fma_chain_instr_per_s": steps * elements / t_fma,
          "adder_chain_s": t_add, "fma_chain_s": t_fma,
          "elements": elements, "steps": steps}


def bandwidth(nbytes: int, reps: int) -> dict:
  """Bytes per second of a large copy-like kernel (read + write counted)."""
  x = jax.random.normal(jax.random.key(1), (nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda x: x + 1.0)
  t = _time(copy, x, reps=reps)
  return {"bytes_per_s": 2 * x.size * 4 / t, "copy_s": t,
          "bytes_each_way": x.size * 4}


def layer_floors(batch: int, instr_per_s: float, bytes_per_s: float,
                 itemsize: int = 4) -> list[dict]:
  """Each ResNet-20 adder layer's forward, input-gradient and filter-gradient
  floor (seconds), and forward + backward as their sum."""
  rows = []
  for layer in RESNET20_LAYERS:
    sh = layer_shapes(batch, layer)
    row = {"layer": layer[0], "count": layer[1], "macs": sh["macs"],
           "instr_per_mac": INSTR_PER_MAC}
    for kind in KINDS:
      row[f"{kind}_floor_s"], row[f"{kind}_bound"] = floor_s(
          kind, sh, instr_per_s, bytes_per_s, itemsize)
    row["fwd_bwd_floor_s"] = sum(row[f"{kind}_floor_s"] for kind in KINDS)
    rows.append(row)
  return rows


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--elements", type=int, default=None,
                      help="elements of the FP32-rate chains (default: 2^26 "
                           "on accelerators, 2^20 on the CPU)")
  parser.add_argument("--steps", type=int, default=256)
  parser.add_argument("--copy_mb", type=int, default=None,
                      help="copy size in MiB (default 2048, CPU 256)")
  parser.add_argument("--reps", type=int, default=20)
  parser.add_argument("--out", type=str, default=None)
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  elements = args.elements or (1 << 20 if on_cpu else 1 << 26)
  copy_mb = args.copy_mb or (256 if on_cpu else 2048)
  rate = fp32_rate(elements, args.steps, args.reps)
  bw = bandwidth(copy_mb << 20, args.reps)
  instr = max(rate["adder_chain_instr_per_s"], rate["fma_chain_instr_per_s"])
  floors = layer_floors(args.batch, instr, bw["bytes_per_s"])
  net = {kind: sum(r["count"] * r[f"{kind}_floor_s"] for r in floors)
         for kind in KINDS}
  result = {
      "device": str(jax.devices()[0].device_kind),
      "backend": jax.default_backend(),
      "jax": jax.__version__, "python": platform.python_version(),
      "date": time.strftime("%Y-%m-%d"),
      "fp32": rate, "memory": bw,
      "instr_per_s_used": instr,
      "batch": args.batch,
      "layers": floors,
      "resnet20_adder_forward_floor_s": net["forward"],
      "resnet20_adder_input_grad_floor_s": net["input_grad"],
      "resnet20_adder_filter_grad_floor_s": net["filter_grad"],
  }
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
