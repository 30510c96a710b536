"""Time every ResNet-20 adder layer shape against `jax.lax.conv_general_dilated`.

    python benchmarks/ops.py [--batch 64] [--implementations xla,pallas]
        [--repeats 10] [--peak_gflops G --peak_gbps B] [--jsonl FILE]

For each layer shape and implementation: the forward, and forward+backward
(`jax.grad` w.r.t. input and filters, the AdderNet custom VJP), both jitted,
next to the same for the multiplication convolution. Prints a table and writes
one JSON line per (layer, implementation) to `--jsonl` (default
`ops_<backend>.jsonl`, appended to), with the backend, device kind, JAX
version and the GPU kernel family (`ADDERNET_GPU_KERNELS`: triton or mosaic).

Every row also says what ran and whether it was right: `ran_forward` and
`ran_input_grad` are the implementations dispatch actually used while the
functions were traced (`addernet_jax.ops.record_backends`: "xla", "triton",
"mosaic_gpu", "tpu_batch", "tpu", ...; not the requested label), and `fwd_rel_err`,
`dx_rel_err`, `dw_rel_err` the relative L2 errors of its forward output and
gradients against the pure-jnp (XLA) implementation on the same inputs;
`verified` is true when all three are within `TOLERANCE`.

With `--peak_gflops` (FP32 instruction rate, G/s) and `--peak_gbps` (memory
bandwidth, GB/s) it also reports each timing as a fraction of its floor, from
the floor model of `benchmarks/floor.py` (instructions per MAC of the forward,
input gradient and filter gradient; each operand read and each result written
once); forward+backward's floor is the sum of the three.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from addernet_jax import ops  # noqa: E402

from benchmarks.floor import KINDS, floor_s  # noqa: E402
from benchmarks.resnet20_layers import RESNET20_LAYERS as LAYERS  # noqa: E402
from benchmarks.resnet20_layers import layer_shapes  # noqa: E402
from benchmarks.timing import per_call_seconds  # noqa: E402

# Relative L2 error against XLA above which a row is not `verified`: the
# kernels and XLA both accumulate float32 (measured ~1e-7..2e-6).
TOLERANCE = 1e-4


def _compile(fn, args):
  """(compiled `fn`, compile + first run seconds, XLA's buffers MiB).

  The memory is XLA's analysis of the compiled function (arguments +
  outputs + temporaries - aliased), per function and on every backend.
  """
  start = time.perf_counter()
  fn = fn.trace(*args).lower().compile()
  stats = fn.memory_analysis()
  # peak_memory_in_bytes leaves temporaries out on the CPU backend (seen on
  # JAX 0.10.2); the sum below counts every buffer the program owns.
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  out = jax.block_until_ready(fn(*args))
  return fn, out, time.perf_counter() - start, peak / 2**20


def _time(fn, args, repeats: int, rounds: int = 5) -> tuple[float, float]:
  """(median ms, min ms) of compiled `fn`.

  Each of `rounds` rounds dispatches `repeats` calls back to back and waits
  once, so that on accelerators the host round trip of a wait is not timed;
  the median and min are over the rounds' per-call means.
  """
  times = [1e3 * t for t in per_call_seconds(fn, args, reps=repeats,
                                              rounds=rounds)]
  return statistics.median(times), min(times)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ran(record, kind: str) -> list[str]:
  return sorted({r["implementation"] for r in record if r["kind"] == kind})


def _functions(conv, strides, padding):
  def forward(x, w):
    return conv(x, w, strides, padding)

  def forward_backward(x, w, r):
    return jax.grad(lambda a, b: jnp.sum(forward(a, b) * r),
                    argnums=(0, 1))(x, w)

  return jax.jit(forward), jax.jit(forward_backward)


def _lax_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _adder(implementation):
  def conv(x, w, strides, padding):
    return ops.adder_conv(x, w, strides=strides, padding=padding,
                          implementation=implementation)
  return conv


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--implementations", default=None,
                      help="comma-separated: xla,pallas (default: xla on CPU, "
                      "xla,pallas elsewhere)")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--peak_gflops", type=float, default=None,
                      help="measured FP32 instruction rate, G/s")
  parser.add_argument("--peak_gbps", type=float, default=None,
                      help="measured memory bandwidth, GB/s")
  parser.add_argument("--jsonl", default=None,
                      help="JSON-lines output (default ops_<backend>.jsonl)")
  parser.add_argument("--layers", default=None,
                      help="comma-separated layer indices (default: all)")
  args = parser.parse_args(argv)

  backend = jax.default_backend()
  device = jax.devices()[0]
  impls = (args.implementations.split(",") if args.implementations else
           (["xla"] if backend == "cpu" else ["xla", "pallas"]))
  for impl in impls:
    if impl not in ops.IMPLEMENTATIONS:
      parser.error(f"unknown implementation {impl!r}; choose from "
                   f"{', '.join(ops.IMPLEMENTATIONS)}")
  layers = (LAYERS if args.layers is None else
            [LAYERS[int(i)] for i in args.layers.split(",")])
  meta = {"backend": backend, "device": device.device_kind,
          "jax": jax.__version__, "batch": args.batch,
          "gpu_kernels": os.environ.get("ADDERNET_GPU_KERNELS", "triton"),
          "date": datetime.date.today().isoformat()}
  jsonl = Path(args.jsonl or f"ops_{backend}.jsonl")
  print(f"# adder layers of ResNet-20, batch {args.batch}: {meta}")
  header = (f"{'layer':24s} {'impl':6s} {'ran':12s} {'MMAC':>8s} "
            f"{'fwd ms':>8s} {'conv':>7s} {'x':>5s} {'f+b ms':>8s} "
            f"{'conv':>7s} {'x':>5s} {'err':>8s}")
  if args.peak_gflops or args.peak_gbps:
    header += f" {'fwd %floor':>10s} {'f+b %floor':>10s}"
  print(header)
  instr = args.peak_gflops * 1e9 if args.peak_gflops else None
  bandwidth = args.peak_gbps * 1e9 if args.peak_gbps else None
  key = jax.random.PRNGKey(0)
  with jsonl.open("a") as out:
    for layer in layers:
      name, count, h, w_in, cin, cout, k, s, pad = layer
      shapes = layer_shapes(args.batch, layer)
      kx, kw_, kr = jax.random.split(jax.random.fold_in(key, h * cout + k), 3)
      x = jax.random.normal(kx, (args.batch, h, w_in, cin), jnp.float32)
      w = jax.random.normal(kw_, shapes["w"], jnp.float32)
      padding = ((pad, pad), (pad, pad))
      r = jax.random.normal(kr, shapes["y"], jnp.float32)
      macs = shapes["macs"]
      conv_f, conv_fb = _functions(_lax_conv, (s, s), padding)
      conv_f, _, _, _ = _compile(conv_f, (x, w))
      conv_fwd, conv_fwd_min = _time(conv_f, (x, w), args.repeats)
      conv_fb, _, _, conv_fb_mb = _compile(conv_fb, (x, w, r))
      conv_fb_ms, conv_fb_min = _time(conv_fb, (x, w, r), args.repeats)
      del conv_f, conv_fb
      reference = None  # XLA's outputs on these inputs, the rows' yardstick
      for impl in (["xla"] if "xla" not in impls else []) + impls:
        adder_f, adder_fb = _functions(_adder(impl), (s, s), padding)
        with ops.record_backends() as record:
          adder_f, y, c_fwd, _ = _compile(adder_f, (x, w))
          adder_fb, (dx, dw), c_fb, fb_mb = _compile(adder_fb, (x, w, r))
        if impl == "xla" and reference is None:
          reference = (y, dx, dw)
        errors = [rel_err(a, b) for a, b in zip((y, dx, dw), reference)]
        del y, dx, dw
        if impl not in impls:  # only the yardstick, not a requested row
          continue
        fwd, fwd_min = _time(adder_f, (x, w), args.repeats)
        fb, fb_min = _time(adder_fb, (x, w, r), args.repeats)
        row = dict(meta, layer=name, implementation=impl,
                   ran_forward=_ran(record, "forward"),
                   ran_input_grad=_ran(record, "input_grad"),
                   fwd_rel_err=errors[0], dx_rel_err=errors[1],
                   dw_rel_err=errors[2], tolerance=TOLERANCE,
                   verified=bool(max(errors) <= TOLERANCE),
                   input_shape=list(x.shape), filter_shape=list(w.shape),
                   strides=[s, s], padding=padding, count_in_resnet20=count,
                   adder_macs=macs, fwd_ms_median=round(fwd, 3),
                   fwd_ms_min=round(fwd_min, 3),
                   fwd_bwd_ms_median=round(fb, 3),
                   fwd_bwd_ms_min=round(fb_min, 3),
                   conv_fwd_ms_median=round(conv_fwd, 3),
                   conv_fwd_ms_min=round(conv_fwd_min, 3),
                   conv_fwd_bwd_ms_median=round(conv_fb_ms, 3),
                   conv_fwd_bwd_ms_min=round(conv_fb_min, 3),
                   fwd_bwd_buffers_mb=round(fb_mb, 2),
                   conv_fwd_bwd_buffers_mb=round(conv_fb_mb, 2),
                   first_call_s=round(c_fwd + c_fb, 2))
        ran = "+".join(sorted(set(row["ran_forward"] + row["ran_input_grad"])))
        line = (f"{name:24s} {impl:6s} {ran:12s} {macs / 1e6:8.1f} "
                f"{fwd:8.2f} {conv_fwd:7.2f} {fwd / conv_fwd:5.1f} {fb:8.2f} "
                f"{conv_fb_ms:7.2f} {fb / conv_fb_ms:5.1f} "
                f"{max(errors):8.1e}")
        if instr or bandwidth:
          f_floor = floor_s("forward", shapes, instr, bandwidth)[0]
          fb_floor = sum(floor_s(kind, shapes, instr, bandwidth)[0]
                         for kind in KINDS)
          row["fwd_floor_s"], row["fwd_bwd_floor_s"] = f_floor, fb_floor
          row["fwd_fraction_of_floor"] = round(f_floor / (fwd_min / 1e3), 4)
          row["fwd_bwd_fraction_of_floor"] = round(fb_floor / (fb_min / 1e3), 4)
          line += (f" {100 * row['fwd_fraction_of_floor']:9.1f}% "
                   f"{100 * row['fwd_bwd_fraction_of_floor']:9.1f}%")
        print(line, flush=True)
        out.write(json.dumps(row) + "\n")
  print(f"# JSON lines: {jsonl}")


if __name__ == "__main__":
  main()
