"""Block-size sweep of the Pallas adder kernels over the ResNet-20 layers.

    python benchmarks/tune_kernels.py --batch 256 --out tune.json

For each ResNet-20 adder layer (benchmarks/floor.py's table) and each kernel
(forward, input_grad) of the families for this backend (`kernels.gpu` on
GPUs, `kernels.tpu_batch` and `kernels.tpu` on TPUs; also the
`kernels.mosaic_gpu` forward on Hopper), times
every candidate `BlockSizes` first checks its result against
`addernet_jax.reference` (relative L2 error, `TOLERANCE`; non-finite fails),
then times the candidates that pass (median over rounds of --reps calls
dispatched back to back, compile excluded), and reports the heuristic's
choice beside the fastest candidate that passed: a tile that computes wrong
numbers is recorded with its error (`passed: false`) and never picked.
With --floor FILE (the JSON of benchmarks/floor.py) each time is also given as
a fraction of that layer's floor. Prints one JSON object (last line).
The input gradient runs with the (rows, cols) window `ops` passes, as
dispatch runs it, and is checked inside that window. `--families
gpu,triton_simt` names the kernel modules (default `kernels.gpu`).
On the CPU it runs the kernels in interpret mode at --batch 2 (a script check,
not a measurement worth reporting).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from addernet_jax import reference  # noqa: E402
from benchmarks.resnet20_layers import layer_shapes, selected_layers  # noqa: E402
from benchmarks.timing import per_call_seconds  # noqa: E402
from addernet_jax.kernels import gpu  # noqa: E402

# Relative L2 error against the float32 reference above which a candidate
# fails (the kernels measure ~1e-7..2e-6; a wrong tile is O(1)).
TOLERANCE = 1e-4

# Families whose Pallas API this JAX may lack: any exception at import (an
# AttributeError from a moved API too) leaves that family out.
try:
  from addernet_jax.kernels import tpu  # noqa: E402
except Exception:  # pylint: disable=broad-except  # pragma: no cover
  tpu = None
try:
  from addernet_jax.kernels import tpu_batch  # noqa: E402
except Exception:  # pylint: disable=broad-except  # pragma: no cover
  tpu_batch = None
try:
  from addernet_jax.kernels import mosaic_gpu  # noqa: E402
except Exception:  # pylint: disable=broad-except  # pragma: no cover
  mosaic_gpu = None


def candidates(family, kind: str, sh: dict, interpret: bool,
               window: dict | None = None):
  """Candidate BlockSizes for one layer (the heuristic's first: the tile
  dispatch runs, given the input-gradient window where the heuristic takes
  one). Families other than gpu, triton_simt, mosaic_gpu, tpu and
  tpu_batch: the heuristic only."""
  platform = "cpu" if interpret else jax.default_backend()
  if family is mosaic_gpu:
    first = mosaic_gpu.get_block_sizes(sh["xp"], sh["w"], sh["strides"])
  else:
    extra = {}
    if kind == "input_grad" and window and "rows" in inspect.signature(
        family.get_block_sizes).parameters:
      extra = window
    first = family.get_block_sizes(kind, sh["xp"], sh["w"], sh["strides"],
                                   platform, **extra)
  out = [first]
  if family is gpu:
    channels = sh["w"][3] if kind == "forward" else sh["w"][2]
    chans = sorted({min(c, gpu.layout.next_pow2(channels))
                    for c in (8, 16, 32, 64)})
    # About 24 candidates a layer and kernel: one compile each (about a
    # second on a GPU), so the whole sweep fits a 10-minute device call.
    grid = itertools.product((32, 64, 128, 256), chans, (4, 8), (2,))
    for pix, ch, warps, stages in grid:
      if pix * ch > 16384 or (interpret and warps != 4):
        continue
      out.append(gpu.BlockSizes(pix, ch, warps, stages))
  elif getattr(family, "__name__", "").endswith("triton_simt"):
    out.extend(simt_candidates(family, kind, first, interpret))
  elif family is mosaic_gpu:
    cout = sh["w"][3]
    for pix, ch in itertools.product((64, 128), (8, 16, 32, 64)):
      bs = mosaic_gpu.BlockSizes(pix, min(ch, mosaic_gpu.layout.round_up(cout, 8)))
      if mosaic_gpu.unsupported_reason(sh["xp"], sh["w"], sh["strides"],
                                       bs) is None:
        out.append(bs)
  elif family is tpu:
    k = sh["w"][0] * sh["w"][1] * sh["w"][2]
    for m8, bk, bn in itertools.product((8, 16, 32), (64, 128, 256, k),
                                        (8, 16, 32)):
      out.append(tpu.BlockSizes(m8, min(bk, k), min(bn, sh["w"][3])))
  elif family is tpu_batch:
    kh, kw, cin, cout = sh["w"]
    geo = tpu_batch._geometry(sh["xp"], sh["w"], sh["strides"])  # pylint: disable=protected-access
    for bc, bn in itertools.product((8, 16, 32, 64, cin), (8, 16, 24)):
      bs = tpu_batch.BlockSizes(min(bc, cin), min(bn, cout))
      if (kh * kw * bs.block_c * bs.block_n <= tpu_batch.SMEM_SCALARS and
          tpu_batch._vmem_bytes(kind, geo, sh["w"], sh["strides"], bs)  # pylint: disable=protected-access
          <= tpu_batch.VMEM_BUDGET):
        out.append(bs)
  seen, unique = set(), []
  for bs in out:
    if bs not in seen:
      seen.add(bs)
      unique.append(bs)
  return unique


def simt_candidates(simt, kind: str, first, interpret: bool) -> list:
  """The `kernels.triton_simt` sweep: every register tile R x C (R in 1, 2,
  4, 8; C in 4, 8) with every warp split (and, forward, every accumulation)
  the register estimate admits (unrolling less where that makes a tile
  fit), at the heuristic's other options (--layers and --max_candidates fit
  the sweep to a device call); then, on the heuristic's tile, each option
  varied alone: forward accumulation (kahan, tap, flat), input-gradient clip
  (xorsign, minmax), unroll (1, 2, 4, 8), software-pipelining depth (1, 2,
  3). Input-gradient tiles stop at R*C = 32 (larger ones did not finish
  building). In interpret mode only the option variants (a script check)."""
  out = []
  if not interpret:
    # Forward: also each accumulation, as it sets the registers a tile needs
    # (8x8 fits only without compensation).
    modes = simt.ACCUMULATE if kind == "forward" else (first.accumulate,)
    for r, c, (wp, wc), mode in itertools.product(
        (1, 2, 4, 8), (4, 8), simt.WARPS, modes):
      if kind == "input_grad" and r * c > 32:
        continue
      bs = dataclasses.replace(first, pix_per_thread=r, ch_per_thread=c,
                               warps_pix=wp, warps_ch=wc, accumulate=mode)
      while not simt.blocks_per_sm(kind, bs) and bs.unroll > 1:
        bs = dataclasses.replace(bs, unroll=bs.unroll // 2)  # fewer operands
      if simt.blocks_per_sm(kind, bs):
        out.append(bs)
  options = {"unroll": (1, 2, 4, 8), "num_stages": (1, 2, 3)}
  if kind == "forward":
    options["accumulate"] = simt.ACCUMULATE
  else:
    options["clip"] = simt.CLIP
  if interpret:  # interpret mode runs no software pipeline: skip stages.
    options.pop("num_stages")
  for name, values in options.items():
    for value in values:
      try:
        bs = dataclasses.replace(first, **{name: value})
        if name == "unroll" and first.chunk % value:
          bs = dataclasses.replace(bs, chunk=value * (first.chunk // value))
      except ValueError:  # e.g. a chunk that is no multiple of unroll
        continue
      if interpret or simt.blocks_per_sm(kind, bs):
        out.append(bs)
  return out


def _time(fn, reps, rounds: int = 3):
  """Seconds per call: median over rounds of `reps` calls dispatched back to
  back with one wait (the host round trip of a wait is not timed)."""
  jax.block_until_ready(fn())
  return statistics.median(per_call_seconds(fn, reps=reps, rounds=rounds))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=None)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--max_candidates", type=int, default=0,
                      help="cap per layer and kernel (0: all)")
  parser.add_argument("--layers", default="", help="comma-separated names")
  parser.add_argument("--floor", default=None, help="floor.py JSON output")
  parser.add_argument("--out", default=None,
                      help="JSON output, rewritten after every layer")
  parser.add_argument("--families", default=None,
                      help="comma-separated kernel modules (default: gpu, or "
                      "tpu_batch,tpu on TPUs), e.g. gpu,triton_simt")
  parser.add_argument("--mosaic", action=argparse.BooleanOptionalAction,
                      default=None, help="also sweep the Mosaic GPU forward "
                      "(default: on a Hopper or newer GPU)")
  args = parser.parse_args(argv)
  if args.mosaic is None:
    device = jax.devices()[0]
    args.mosaic = (jax.default_backend() == "gpu" and
                   float(getattr(device, "compute_capability", 0)) >= 9.0)
  backend = jax.default_backend()
  interpret = backend not in ("gpu", "tpu")
  families = {"tpu": [f for f in (tpu_batch, tpu) if f is not None]}.get(
      backend, [gpu])
  if args.families:
    families = [importlib.import_module(f"addernet_jax.kernels.{name}")
                for name in args.families.split(",") if name]
  if args.mosaic and mosaic_gpu is not None and mosaic_gpu not in families:
    families.append(mosaic_gpu)
  batch = args.batch or (2 if interpret else 256)
  floors = {}
  if args.floor:
    for row in json.loads(Path(args.floor).read_text())["layers"]:
      floors[row["layer"]] = row
  layers = selected_layers(args.layers, parser)
  rows = []
  result = {"device": str(jax.devices()[0].device_kind), "backend": backend,
            "interpret": interpret, "jax": jax.__version__, "batch": batch,
            "date": time.strftime("%Y-%m-%d"), "rows": rows}
  key = jax.random.key(0)
  for layer in layers:
    sh = layer_shapes(batch, layer)
    kx, kw, kg, key = jax.random.split(key, 4)
    xp = jax.random.normal(kx, sh["xp"], jnp.float32)
    w = 0.7 * jax.random.normal(kw, sh["w"], jnp.float32)
    g = jax.random.normal(kg, sh["y"], jnp.float32)
    want = {"forward": reference.forward(xp, w, sh["strides"]),
            "input_grad": reference.input_grad(xp, w, g, sh["strides"])}
    # The input-gradient window ops passes (the rows and columns it keeps):
    # timed and checked as dispatch runs it.
    _, _, h, w_in, _, _, _, _, pad = layer
    window = {"rows": (pad, pad + h), "cols": (pad, pad + w_in)}
    crop = (slice(None), slice(pad, pad + h), slice(pad, pad + w_in))
    for family, kind in [(f, k) for f in families
                         for k in ("forward", "input_grad")
                         if not (f is mosaic_gpu and k == "input_grad")]:
      takes_window = getattr(family, "INPUT_GRAD_TAKES_WINDOW", False)
      cands = candidates(family, kind, sh, interpret,
                         window if takes_window else None)
      if args.max_candidates:
        cands = cands[:args.max_candidates]
      results = []
      for bs in cands:
        if kind == "forward":
          fn = lambda bs=bs: family.forward(xp, w, sh["strides"], block_sizes=bs,
                                            interpret=interpret)
        else:
          fn = lambda bs=bs: family.input_grad(
              xp, w, g, sh["strides"], block_sizes=bs, interpret=interpret,
              **(window if takes_window else {}))
        entry = {"block_sizes": bs.__dict__}
        try:
          got = fn()
          err = (rel_err(got, want[kind]) if kind == "forward" else
                 rel_err(got[crop], want[kind][crop]))
          entry.update(rel_err=err, passed=bool(err <= TOLERANCE))
          if entry["passed"]:  # a wrong tile is neither timed nor picked
            t = _time(fn, args.reps)
            entry["s"] = t
            if layer[0] in floors:
              entry["fraction_of_floor"] = (
                  floors[layer[0]][f"{kind}_floor_s"] / t)
        except Exception as e:  # a candidate that does not compile or run.
          entry.update(passed=False,
                       error=f"{type(e).__name__}: {str(e)[:200]}")
        results.append(entry)
      ok = [r for r in results if r.get("passed") and "s" in r]
      best = min(ok, key=lambda r: r["s"]) if ok else None
      name = family.__name__.rsplit(".", 1)[-1]
      rows.append({"layer": layer[0], "kind": kind, "family": name,
                   "tolerance": TOLERANCE, "heuristic": results[0],
                   "best": best, "candidates": results,
                   "failed": sum(not r.get("passed") for r in results)})
      print(json.dumps({"layer": layer[0], "kind": kind, "family": name,
                        "heuristic_passed": results[0].get("passed"),
                        "failed": rows[-1]["failed"],
                        "heuristic_s": results[0].get("s"),
                        "best_s": best and best["s"],
                        "best": best and best["block_sizes"]}), flush=True)
      if args.out:  # after every layer: a sweep cut short keeps its results
        Path(args.out).write_text(json.dumps(result, indent=1))
  print(json.dumps({k: v for k, v in result.items() if k != "rows"} |
                   {"summary": [{"layer": r["layer"], "kind": r["kind"],
                                 "family": r["family"],
                                 "heuristic_s": r["heuristic"].get("s"),
                                 "best_s": r["best"] and r["best"]["s"]}
                                for r in rows]}))
  return result


if __name__ == "__main__":
  main()
