"""Time every ResNet-20 adder layer shape against `jax.lax.conv_general_dilated`.

    python benchmarks/ops.py [--batch 64] [--implementations xla,pallas]
        [--repeats 10] [--peak_gflops G --peak_gbps B] [--jsonl FILE]

For each layer shape and implementation: the forward, and forward+backward
(`jax.grad` w.r.t. input and filters, the AdderNet custom VJP), both jitted,
next to the same for the multiplication convolution. Prints a table and writes
one JSON line per (layer, implementation) to `--jsonl` (default
`ops_<backend>.jsonl`, appended to), with the backend, device kind, JAX
version and the GPU kernel family (`ADDERNET_GPU_KERNELS`: triton or mosaic).

With `--peak_gflops` (FP32 instruction rate, G/s) and `--peak_gbps` (memory
bandwidth, GB/s) it also reports each timing as a fraction of its floor: an
adder MAC costs 2 FP32 instructions (subtract, accumulate the absolute value),
and forward+backward is counted as 3 such passes (forward, input gradient,
filter gradient); the memory floor reads the inputs and writes the outputs once.
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
from jax import lax  # noqa: E402

from addernet_jax import ops  # noqa: E402

from benchmarks.resnet20_layers import RESNET20_LAYERS as LAYERS  # noqa: E402
from benchmarks.resnet20_layers import layer_shapes  # noqa: E402
from benchmarks.timing import per_call_seconds  # noqa: E402


def _time(fn, args, repeats: int, rounds: int = 5
          ) -> tuple[float, float, float, float]:
  """(compile+first run seconds, median ms, min ms, peak MiB) of jitted `fn`.

  Each of `rounds` rounds dispatches `repeats` calls back to back and waits
  once, so that on accelerators the host round trip of a wait is not timed;
  the median and min are over the rounds' per-call means. The memory is
  XLA's analysis of the compiled function (arguments + outputs + temporaries
  - aliased), per function and on every backend.
  """
  start = time.perf_counter()
  fn = fn.trace(*args).lower().compile()
  stats = fn.memory_analysis()
  # peak_memory_in_bytes leaves temporaries out on the CPU backend (seen on
  # JAX 0.10.2); the sum below counts every buffer the program owns.
  peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - start
  times = [1e3 * t for t in per_call_seconds(fn, args, reps=repeats,
                                              rounds=rounds)]
  return first, statistics.median(times), min(times), peak / 2**20


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


def _floor_s(macs, passes, nbytes, peak_gflops, peak_gbps):
  compute = 2 * passes * macs / (peak_gflops * 1e9) if peak_gflops else 0.0
  memory = nbytes / (peak_gbps * 1e9) if peak_gbps else 0.0
  return max(compute, memory)


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
  header = (f"{'layer':24s} {'impl':6s} {'MMAC':>8s} {'fwd ms':>8s} "
            f"{'conv':>7s} {'x':>5s} {'f+b ms':>8s} {'conv':>7s} {'x':>5s}")
  if args.peak_gflops or args.peak_gbps:
    header += f" {'fwd %floor':>10s} {'f+b %floor':>10s}"
  print(header)
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
      nbytes = 4 * (x.size + w.size + r.size)
      conv_f, conv_fb = _functions(_lax_conv, (s, s), padding)
      _, conv_fwd, conv_fwd_min, _ = _time(conv_f, (x, w), args.repeats)
      _, conv_fb_ms, conv_fb_min, conv_fb_mb = _time(conv_fb, (x, w, r),
                                                     args.repeats)
      for impl in impls:
        adder_f, adder_fb = _functions(_adder(impl), (s, s), padding)
        c_fwd, fwd, fwd_min, _ = _time(adder_f, (x, w), args.repeats)
        c_fb, fb, fb_min, fb_mb = _time(adder_fb, (x, w, r), args.repeats)
        row = dict(meta, layer=name, implementation=impl,
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
        line = (f"{name:24s} {impl:6s} {macs / 1e6:8.1f} {fwd:8.2f} "
                f"{conv_fwd:7.2f} {fwd / conv_fwd:5.1f} {fb:8.2f} "
                f"{conv_fb_ms:7.2f} {fb / conv_fb_ms:5.1f}")
        if args.peak_gflops or args.peak_gbps:
          f_floor = _floor_s(macs, 1, nbytes, args.peak_gflops, args.peak_gbps)
          fb_floor = _floor_s(macs, 3, 2 * nbytes, args.peak_gflops,
                              args.peak_gbps)
          row["fwd_fraction_of_floor"] = round(f_floor / (fwd_min / 1e3), 4)
          row["fwd_bwd_fraction_of_floor"] = round(fb_floor / (fb_min / 1e3), 4)
          line += (f" {100 * row['fwd_fraction_of_floor']:9.1f}% "
                   f"{100 * row['fwd_bwd_fraction_of_floor']:9.1f}%")
        print(line, flush=True)
        out.write(json.dumps(row) + "\n")
  print(f"# JSON lines: {jsonl}")


if __name__ == "__main__":
  main()
