"""Turn the outputs of `benchmarks/gpu_session.sh` into RESULTS.md tables.

    python benchmarks/report.py RESULTS_DIR [--out report.md]

Reads whichever of floor.json, ops.jsonl, step.jsonl, official_torch.json and
tune.json the session wrote, and prints markdown: the device's ceilings, each
ResNet-20 adder layer against its floor, cuDNN and the pure-jnp path, the
training step against the CNN and the official method, and each of issue 4's
goals with the measured figure beside it. A missing file leaves its rows out;
nothing is estimated. The 400-epoch projection multiplies the measured step
time by the paper recipe's step count (50,000 images, last partial batch
dropped, batch 256 unless the step was measured at another batch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CIFAR10_TRAIN = 50_000
PAPER_EPOCHS = 400
GOALS = {"forward_floor": 0.50, "input_grad_floor": 0.35, "step_vs_cnn": 2.0,
         "speedup_vs_official": 30.0, "memory_vs_official": 0.10,
         "projection_minutes": 15.0}
LARGE_LAYERS = ("s1_3x3_16-16", "s2_3x3_32-32", "s3_3x3_64-64")


def _load_json(path: Path):
  return json.loads(path.read_text()) if path.is_file() else None


def _load_jsonl(path: Path) -> list[dict]:
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()
          if line.strip()]


def _fmt(value, digits: int = 3) -> str:
  if value is None:
    return "not measured"
  if isinstance(value, float):
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def _pct(value) -> str:
  return "not measured" if value is None else f"{100 * value:.0f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(" --- " for _ in header) + "|"]
  lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c
                              for c in row) + " |" for row in rows]
  return lines


def _goal(ok: bool | None) -> str:
  return "not measured" if ok is None else ("met" if ok else "**not met**")


def ceilings_section(floor) -> list[str]:
  if not floor:
    return ["Device ceilings: not measured (no floor.json)."]
  fp32, mem = floor["fp32"], floor["memory"]
  return [f"Device: {floor['device']}, JAX {floor['jax']}, Python "
          f"{floor['python']}, {floor['date']}.", "",
          *_table(["ceiling", "measured"], [
              ["FP32 `|x - a| + b` chain (instructions/s)",
               f"{fp32['adder_chain_instr_per_s'] / 1e9:,.1f} G"],
              ["FP32 FMA chain (instructions/s)",
               f"{fp32['fma_chain_instr_per_s'] / 1e9:,.1f} G"],
              ["copy bandwidth (read + write)",
               f"{mem['bytes_per_s'] / 1e9:,.1f} GB/s"]])]


def layer_section(floor, ops_rows, tune, official) -> tuple[list[str], dict]:
  """Per-layer table, and the worst forward / input-grad floor fractions."""
  floors = {r["layer"]: r for r in (floor or {}).get("layers", [])}
  ops_by = {}
  for r in ops_rows:
    impl = r["implementation"]
    if impl == "pallas":
      impl = f"pallas-{r.get('gpu_kernels', 'triton')}"
    ops_by[(r["layer"], impl)] = r
  tuned = {}
  for row in (tune or {}).get("rows", []):
    best = row.get("best") or {}
    heur = row.get("heuristic") or {}
    family = row.get("family", "gpu")
    kind = row["kind"] if family != "mosaic_gpu" else "mosaic_forward"
    tuned[(row["layer"], kind)] = (heur.get("s"), best.get("s"))
  off = {r["layer"]: r for r in (official or {}).get("layers", [])}
  names = list(dict.fromkeys([*floors, *(k[0] for k in ops_by)]))
  rows, fractions = [], {"forward": [], "input_grad": [], "mosaic_forward": []}
  for name in names:
    fl = floors.get(name, {})
    pallas = ops_by.get((name, "pallas-triton"), {})
    mosaic = ops_by.get((name, "pallas-mosaic"), {})
    xla = ops_by.get((name, "xla"), {})
    row = [name]
    for kind in ("forward", "input_grad"):
      heur_s, best_s = tuned.get((name, kind), (None, None))
      floor_s = fl.get(f"{kind}_floor_s")
      frac = floor_s / heur_s if floor_s and heur_s else None
      best_frac = floor_s / best_s if floor_s and best_s else None
      if name in LARGE_LAYERS:
        fractions[kind].append(frac)
      row += [None if floor_s is None else floor_s * 1e3,
              None if heur_s is None else heur_s * 1e3, _pct(frac),
              _pct(best_frac)]
      if kind == "forward":
        m_heur, m_best = tuned.get((name, "mosaic_forward"), (None, None))
        row += [_pct(floor_s / m_heur if floor_s and m_heur else None),
                _pct(floor_s / m_best if floor_s and m_best else None)]
        if name in LARGE_LAYERS and m_heur and floor_s:
          fractions["mosaic_forward"].append(floor_s / m_heur)
    conv = pallas or mosaic or xla
    row += [pallas.get("fwd_ms_min"), mosaic.get("fwd_ms_min"),
            xla.get("fwd_ms_min"), conv.get("conv_fwd_ms_min"),
            pallas.get("fwd_bwd_ms_min"), mosaic.get("fwd_bwd_ms_min"),
            xla.get("fwd_bwd_ms_min"), conv.get("conv_fwd_bwd_ms_min"),
            pallas.get("fwd_bwd_buffers_mb"), conv.get("conv_fwd_bwd_buffers_mb")]
    o = off.get(name, {})
    row += [None if "forward_s" not in o else o["forward_s"] * 1e3,
            None if "fwd_bwd_s" not in o else o["fwd_bwd_s"] * 1e3,
            o.get("error", "") or (None if not o.get("fwd_bwd_memory") else
                                   f"{o['fwd_bwd_memory']['peak_above_resident_bytes'] / 2**30:.2f} GiB")]
    rows.append(row)
  header = ["layer", "fwd floor ms", "Triton fwd ms", "% floor",
            "% floor (best tile)", "Mosaic GPU fwd % floor",
            "(best tile)", "dx floor ms", "dx kernel ms", "% floor",
            "% floor (best tile)", "adder fwd ms (Triton)", "(Mosaic GPU)",
            "(pure jnp)", "cuDNN fwd ms", "adder f+b ms (Triton)",
            "(Mosaic GPU fwd)", "(pure jnp)", "cuDNN f+b ms",
            "adder f+b MiB (XLA buffers)", "cuDNN f+b MiB", "official fwd ms",
            "official f+b ms",
            "official f+b memory"]
  return _table(header, rows), fractions


def step_section(steps, official) -> tuple[list[str], dict]:
  by = {}
  for r in steps:
    impl = r["implementation"]
    if impl != "xla" and r["conv"] == "adder":
      impl = f"{impl}-{r.get('gpu_kernels', 'triton')}"
    by[(r["conv"], impl)] = r
  off = {r["model"]: r for r in (official or {}).get("steps", [])}
  rows = []
  for (conv, impl), r in by.items():
    rows.append([f"ours, {conv} ({impl})", r["batch"],
                 r.get("ms_per_step_pipelined"), r.get("ms_per_step_median"),
                 r.get("compile_and_first_step_s"), r.get("peak_device_mb"),
                 (r.get("compiled_memory_mb") or {}).get("total")])
  for kind in ("adder", "mult"):
    r = off.get(f"resnet20_{kind}")
    if r:
      mem = r.get("memory") or {}
      rows.append([f"official method, {kind} (PyTorch)", r["batch"],
                   None if "step_s" not in r else r["step_s"] * 1e3, "",
                   "", None if not mem else mem["peak_bytes"] / 2**20, ""])
  table = _table(["step", "batch", "ms/step (pipelined)",
                  "ms/step (each waited)", "compile + first step s",
                  "peak device MiB (allocator)", "XLA buffers MiB"], rows)
  candidates = [r for key, r in by.items() if key[0] == "adder"
                and key[1] != "xla"]
  ours = min(candidates, key=lambda r: r["ms_per_step_pipelined"],
             default=None)
  cnn = by.get(("mult", "xla")) or by.get(("mult", "default"))
  official_adder = off.get("resnet20_adder", {})
  figures = {}
  if ours and cnn:
    figures["step_vs_cnn"] = (ours["ms_per_step_pipelined"] /
                              cnn["ms_per_step_pipelined"])
  if ours and "step_s" in official_adder:
    figures["speedup_vs_official"] = (official_adder["step_s"] * 1e3 /
                                      ours["ms_per_step_pipelined"])
  if ours and ours.get("peak_device_mb") and official_adder.get("memory"):
    figures["memory_vs_official"] = (
        ours["peak_device_mb"] / (official_adder["memory"]["peak_bytes"] / 2**20))
  if ours:
    figures["ours"] = (f"{ours['implementation']} "
                       f"({ours.get('gpu_kernels', 'triton')} kernels)")
    steps_per_epoch = CIFAR10_TRAIN // ours["batch"]
    figures["projection_minutes"] = (PAPER_EPOCHS * steps_per_epoch *
                                     ours["ms_per_step_pipelined"] / 6e4)
    figures["projection_steps"] = PAPER_EPOCHS * steps_per_epoch
  return table, figures


def filter_grad_section(dw) -> list[str]:
  if not dw:
    return ["Filter-gradient formulations: not measured (no filter_grad.json)."]
  names = [k for k in dw["rows"][0] if k not in ("layer", "batch")]
  rows = []
  for row in dw["rows"]:
    cells = [row["layer"]]
    for name in names:
      entry = row.get(name, {})
      cells.append(entry.get("error", "")[:40] or
                   f"{entry['s'] * 1e3:.3g} ms ({entry['rel_err']:.1e})")
    rows.append(cells)
  return [f"ms (relative L2 error against float64), {dw['device']}, JAX "
          f"{dw['jax']}:", "", *_table(["layer", *names], rows)]


def goals_section(fractions: dict, figures: dict) -> list[str]:
  def worst(values):
    values = [v for v in values if v is not None]
    return min(values) if values else None
  def label(kernel, kind):
    measured = sum(v is not None for v in fractions[kind])
    return (f"{kernel} kernel, worst of the large layers ({measured} of "
            f"{len(LARGE_LAYERS)} measured)")
  fwd, dx = worst(fractions["forward"]), worst(fractions["input_grad"])
  if fractions.get("mosaic_forward"):  # the faster family's forward counts
    mosaic = worst(fractions["mosaic_forward"])
    fwd = mosaic if fwd is None else max(fwd, mosaic)
  rows = [
      [label("forward", "forward"), ">= 50% of floor", _pct(fwd),
       _goal(None if fwd is None else fwd >= GOALS["forward_floor"])],
      [label("dx", "input_grad"), ">= 35% of floor", _pct(dx),
       _goal(None if dx is None else dx >= GOALS["input_grad_floor"])]]
  for key, goal, fmt, ok in (
      ("step_vs_cnn", "<= 2x the CNN", lambda v: f"{v:.2f}x",
       lambda v: v <= GOALS["step_vs_cnn"]),
      ("speedup_vs_official", ">= 30x faster", lambda v: f"{v:.1f}x",
       lambda v: v >= GOALS["speedup_vs_official"]),
      ("memory_vs_official", "<= 0.1 of its peak", lambda v: f"{v:.3f}",
       lambda v: v <= GOALS["memory_vs_official"]),
      ("projection_minutes", "< 15 min", lambda v: f"{v:.1f} min "
       f"({figures.get('projection_steps')} steps)",
       lambda v: v < GOALS["projection_minutes"])):
    v = figures.get(key)
    label = {"step_vs_cnn": "ResNet-20 step, adder / CNN",
             "speedup_vs_official": "ResNet-20 step, official / ours",
             "memory_vs_official": "peak memory, ours / official",
             "projection_minutes": "400-epoch CIFAR-10 recipe, projected"}[key]
    rows.append([label, goal, "not measured" if v is None else fmt(v),
                 _goal(None if v is None else ok(v))])
  lines = _table(["goal", "target", "measured", ""], rows)
  if figures.get("ours"):
    lines += ["", f"Step goals use the faster Pallas step: {figures['ours']}."]
  return lines


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", help="gpu_session.sh's results folder")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  d = Path(args.results)
  if not d.is_dir():
    sys.exit(f"report.py: {d} is not a folder")
  floor = _load_json(d / "floor.json")
  official = _load_json(d / "official_torch.json")
  tune = _load_json(d / "tune.json")
  dw = _load_json(d / "filter_grad.json")
  ops_rows = _load_jsonl(d / "ops.jsonl")
  steps = _load_jsonl(d / "step.jsonl")
  layers, fractions = layer_section(floor, ops_rows, tune, official)
  step_table, figures = step_section(steps, official)
  versions = sorted({f"{r.get('device')} / JAX {r.get('jax')}"
                     for r in [*ops_rows, *steps]})
  text = "\n".join([
      "### Goals (issue 4)", "", *goals_section(fractions, figures), "",
      "### Device ceilings", "", *ceilings_section(floor), "",
      "### ResNet-20 adder layers (ms; kernel times are min over repeats)", "",
      *layers, "",
      "### ResNet-20 training step", "", *step_table, "",
      "### Filter gradient (`benchmarks/filter_grad.py`)", "",
      *filter_grad_section(dw), "",
      f"Measured on: {', '.join(versions) or 'nothing'}"
      + (f"; official method: {official['device']}, torch {official['torch']}"
         if official else ""), ""])
  if args.out:
    Path(args.out).write_text(text)
  print(text)
  return text


if __name__ == "__main__":
  main()
