"""Turn the outputs of `benchmarks/gpu_session.sh` into RESULTS.md tables.

    python benchmarks/report.py RESULTS_DIR [--out report.md]

Reads whichever of floor.json, ops.jsonl, step.jsonl, official_torch.json,
filter_grad.json and tune.json the session wrote, and prints markdown: the
device's ceilings, each ResNet-20 adder layer against its floor, cuDNN and
the pure-jnp path, the training step against the CNN and the official
method, and each of issue 4's goals with the measured figure beside it.
A missing file leaves its rows out; nothing is estimated.

A goal is marked met only from complete, verified measurements:

- kernel goals (forward, input gradient against the floor) cover every
  ResNet-20 adder layer, strided and 1x1 included: each needs a tune.json row
  whose heuristic tile (the one dispatch runs) passed its check against the
  reference and was timed, and a floor. A family short of that is
  "unverified"; a verified layer under the target is "not met" whatever the
  other layers do.
- step goals use only step rows that ran the kernel they are labelled with
  in every adder layer (`ran`, recorded by dispatch while the step was
  traced, not the requested label) and whose gradients matched the XLA
  path's (`error_vs_xla.passed`). The 400-epoch projection needs the real
  training step (`real_step`: the config's optimizer, on-device
  augmentation) and its per-epoch evaluation time: 400 x (steps per epoch x
  the pipelined step time + one evaluation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.resnet20_layers import RESNET20_LAYERS  # noqa: E402

CIFAR10_TRAIN = 50_000
PAPER_EPOCHS = 400
GOALS = {"forward_floor": 0.50, "input_grad_floor": 0.35, "step_vs_cnn": 2.0,
         "speedup_vs_official": 30.0, "memory_vs_official": 0.10,
         "projection_minutes": 15.0}
ALL_LAYERS = tuple(layer[0] for layer in RESNET20_LAYERS)
# ADDERNET_GPU_KERNELS label -> the family dispatch must have run.
FAMILY_OF_LABEL = {"triton": "triton", "mosaic": "mosaic_gpu",
                   "mosaic_gpu": "mosaic_gpu", "simt": "triton_simt",
                   "triton_simt": "triton_simt", "xla": "xla"}
# tune.json family (module) name -> dispatch's family name.
FAMILY_OF_MODULE = {"gpu": "triton", "mosaic_gpu": "mosaic_gpu",
                    "triton_simt": "triton_simt", "tpu_batch": "tpu_batch",
                    "tpu": "tpu"}


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
  if isinstance(value, bool):
    return "yes" if value else "**no**"
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


# ------------------------------------------------------------ verification --


def ops_problem(row: dict) -> str | None:
  """Why an ops.jsonl row does not show the named implementation, verified;
  None when it does."""
  impl = row.get("implementation")
  if "ran_forward" not in row or "verified" not in row:
    return "no record of what ran"
  want = ("xla" if impl == "xla" else
          FAMILY_OF_LABEL.get(row.get("gpu_kernels", "triton"), "triton"))
  ran = sorted(set(row["ran_forward"]) | set(row["ran_input_grad"]))
  if ran != [want]:
    return f"ran {'+'.join(ran) or 'nothing'}, not {want}"
  if not row["verified"]:
    return "failed its check against XLA"
  return None


def step_problem(row: dict) -> str | None:
  """Why a step.jsonl row is not a verified measurement of its label."""
  ran = row.get("ran")
  if row.get("model", "resnet20") != "resnet20" or "cifar10" not in row.get(
      "config", "cifar10"):
    return (f"not the CIFAR-10 ResNet-20 recipe ({row.get('model')}, "
            f"{row.get('config')})")
  if ran is None or "error_vs_xla" not in row:
    return "no record of what ran"
  if row.get("conv") == "mult":
    return None if not any(ran.values()) else "ran adder layers"
  want = ("xla" if row.get("implementation") == "xla" else
          FAMILY_OF_LABEL.get(row.get("gpu_kernels", "triton"), "triton"))
  families = sorted(set(ran.get("forward", {})) | set(ran.get("input_grad",
                                                              {})))
  if not ran.get("forward") or not ran.get("input_grad"):
    return "no adder layer recorded"
  if families != [want]:
    counts = ", ".join(f"{kind} {dict(v)}" for kind, v in ran.items())
    return f"ran {'+'.join(families)} ({counts}), not {want} in every layer"
  if not (row["error_vs_xla"] or {}).get("passed", False):
    return "its gradients failed the check against XLA"
  return None


def _tune_rows(tune) -> dict:
  """{(family, kind, layer): tune row}; the Mosaic GPU forward as
  ("mosaic_gpu", "forward", layer)."""
  out = {}
  for row in (tune or {}).get("rows", []):
    family = FAMILY_OF_MODULE.get(row.get("family", "gpu"),
                                  row.get("family", "gpu"))
    out[(family, row["kind"], row["layer"])] = row
  return out


def kernel_goal(kind: str, tune_rows: dict, floors: dict) -> dict:
  """The worst heuristic-tile fraction of the floor over every layer, per
  family, and the verdict of the best family; see the module docstring."""
  target = GOALS[f"{kind}_floor"]
  families = sorted({f for f, k, _ in tune_rows if k == kind})
  results = []
  for family in families:
    fractions, problems = [], []
    for layer in ALL_LAYERS:
      row = tune_rows.get((family, kind, layer))
      heur = (row or {}).get("heuristic") or {}
      floor_s = (floors.get(layer) or {}).get(f"{kind}_floor_s")
      if row is None:
        problems.append(f"{layer}: not measured")
      elif heur.get("passed") is not True:
        problems.append(f"{layer}: heuristic tile failed its check")
      elif not heur.get("s"):
        problems.append(f"{layer}: not timed")
      elif not floor_s:
        problems.append(f"{layer}: no floor")
      else:
        fractions.append((floor_s / heur["s"], layer))
    worst = min(fractions, default=None)
    if worst is not None and worst[0] < target:
      verdict = "**not met**"
    elif problems and fractions:
      verdict = (f"unverified ({len(fractions)} of {len(ALL_LAYERS)} layers "
                 f"measured and checked)")
    elif problems:
      verdict = "not measured"
    else:
      verdict = "met"
    results.append({"family": family, "worst": worst, "verdict": verdict,
                    "problems": problems, "verified": len(fractions)})
  # Met by any family; else unverified while a family could still meet it;
  # not met only when every measured family is under the target.
  order = {"met": 3, "**not met**": 1, "not measured": 0}
  best = max(results, default=None, key=lambda r: (
      order.get(r["verdict"], 2), r["verified"],
      r["worst"][0] if r["worst"] else 0.0))
  return best or {"family": None, "worst": None, "verdict": "not measured",
                  "problems": [], "verified": 0}


# ----------------------------------------------------------------- tables --


def layer_section(floor, ops_rows, tune, official) -> list[str]:
  """Per-layer table (every measured figure, with what ran and its check)."""
  floors = {r["layer"]: r for r in (floor or {}).get("layers", [])}
  ops_by = {}
  for r in ops_rows:
    impl = r["implementation"]
    if impl == "pallas":
      impl = f"pallas-{r.get('gpu_kernels', 'triton')}"
    ops_by[(r["layer"], impl)] = r
  tuned = _tune_rows(tune)
  off = {r["layer"]: r for r in (official or {}).get("layers", [])}
  names = list(dict.fromkeys([*ALL_LAYERS, *floors,
                              *(k[0] for k in ops_by)]))
  rows = []
  for name in names:
    fl = floors.get(name, {})
    pallas = ops_by.get((name, "pallas-triton"), {})
    mosaic = ops_by.get((name, "pallas-mosaic"), {})
    xla = ops_by.get((name, "xla"), {})
    if not (fl or pallas or mosaic or xla or any(k[2] == name
                                                  for k in tuned)):
      continue
    row = [name]
    for family, kind in (("triton", "forward"), ("mosaic_gpu", "forward"),
                         ("triton", "input_grad")):
      t = tuned.get((family, kind, name)) or {}
      heur, best = t.get("heuristic") or {}, t.get("best") or {}
      floor_s = fl.get(f"{kind}_floor_s")
      if kind == "forward" and family == "triton" or kind == "input_grad":
        row.append(None if floor_s is None else floor_s * 1e3)
      if family == "triton":
        row.append(None if not heur.get("s") else heur["s"] * 1e3)
      if t and heur.get("passed") is not True:
        row += ["**failed check**", _pct(floor_s / best["s"] if floor_s
                                         and best.get("s") else None)]
      else:
        row += [_pct(floor_s / heur["s"] if floor_s and heur.get("s")
                     else None),
                _pct(floor_s / best["s"] if floor_s and best.get("s")
                     else None)]
    conv = pallas or mosaic or xla
    row += [pallas.get("fwd_ms_min"), mosaic.get("fwd_ms_min"),
            xla.get("fwd_ms_min"), conv.get("conv_fwd_ms_min"),
            pallas.get("fwd_bwd_ms_min"), mosaic.get("fwd_bwd_ms_min"),
            xla.get("fwd_bwd_ms_min"), conv.get("conv_fwd_bwd_ms_min"),
            pallas.get("fwd_bwd_buffers_mb"),
            conv.get("conv_fwd_bwd_buffers_mb")]
    checks = []
    for label, r in (("Triton", pallas), ("Mosaic GPU", mosaic),
                     ("pure jnp", xla)):
      if r:
        problem = ops_problem(r)
        err = max((r.get(k) or 0.0) for k in ("fwd_rel_err", "dx_rel_err",
                                              "dw_rel_err"))
        checks.append(f"{label}: {problem}" if problem else
                      f"{label} ok ({err:.0e})")
    row.append("; ".join(checks) or "not measured")
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
            "adder f+b MiB (XLA buffers)", "cuDNN f+b MiB",
            "ran, and error against XLA", "official fwd ms",
            "official f+b ms", "official f+b memory"]
  return _table(header, rows)


def _ran_text(row) -> str:
  ran = row.get("ran")
  if ran is None:
    return "not recorded"
  parts = [f"{kind} " + "+".join(f"{k} x{v}" for k, v in sorted(c.items()))
           for kind, c in ran.items() if c]
  return "; ".join(parts) or "no adder layer"


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
    problem = step_problem(r)
    err = (r.get("error_vs_xla") or {}).get("grads_rel_l2")
    rows.append([f"ours, {r.get('model', 'resnet20')} {conv} ({impl})",
                 r["batch"],
                 r.get("ms_per_step_pipelined"), r.get("ms_per_step_median"),
                 r.get("eval_s_per_epoch"),
                 r.get("compile_and_first_step_s"), r.get("peak_device_mb"),
                 (r.get("compiled_memory_mb") or {}).get("total"),
                 _ran_text(r), "reference" if impl == "xla" or conv == "mult"
                 else _fmt(err), problem or "ok"])
  for kind in ("adder", "mult"):
    r = off.get(f"resnet20_{kind}")
    if r:
      mem = r.get("memory") or {}
      rows.append([f"official method, {kind} (PyTorch)", r["batch"],
                   None if "step_s" not in r else r["step_s"] * 1e3, "", "",
                   "", None if not mem else mem["peak_bytes"] / 2**20, "",
                   "", "", ""])
  table = _table(["step", "batch", "ms/step (pipelined)",
                  "ms/step (each waited)", "eval s/epoch",
                  "compile + first step s", "peak device MiB (allocator)",
                  "XLA buffers MiB", "ran (adder layers)",
                  "grads vs XLA (rel. L2)", "verified"], rows)
  candidates = [r for key, r in by.items() if key[0] == "adder"
                and key[1] != "xla" and step_problem(r) is None]
  unverified = [f"{key[1]}: {step_problem(r)}" for key, r in by.items()
                if key[0] == "adder" and key[1] != "xla"
                and step_problem(r) is not None]
  ours = min(candidates, key=lambda r: r["ms_per_step_pipelined"],
             default=None)
  cnn = by.get(("mult", "xla")) or by.get(("mult", "default"))
  if cnn is not None and step_problem(cnn) is not None:
    cnn = None
  official_adder = off.get("resnet20_adder", {})
  figures = {"unverified_steps": unverified}
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
    if ours.get("real_step") and ours.get("eval_s_per_epoch") is not None:
      steps_per_epoch = ours.get("steps_per_epoch") or (
          CIFAR10_TRAIN // ours["batch"])
      epoch_s = (steps_per_epoch * ours["ms_per_step_pipelined"] / 1e3
                 + ours["eval_s_per_epoch"])
      figures["projection_minutes"] = PAPER_EPOCHS * epoch_s / 60
      figures["projection_steps"] = PAPER_EPOCHS * steps_per_epoch
      figures["projection_eval_minutes"] = (PAPER_EPOCHS *
                                            ours["eval_s_per_epoch"] / 60)
    else:
      figures["projection_missing"] = (
          "the verified step is not the real training step with a timed "
          "evaluation (train_step.py of this version records both)")
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


def goals_section(kernels: dict, figures: dict) -> list[str]:
  rows = []
  for kind, label, goal in (("forward", "forward kernel", ">= 50% of floor"),
                            ("input_grad", "dx kernel", ">= 35% of floor")):
    g = kernels[kind]
    family = f" ({g['family']})" if g["family"] else ""
    rows.append([f"{label}, worst of all {len(ALL_LAYERS)} layers{family} "
                 f"({g['verified']} of {len(ALL_LAYERS)} verified)", goal,
                 _pct(g["worst"][0] if g["worst"] else None)
                 + (f" ({g['worst'][1]})" if g["worst"] else ""),
                 g["verdict"]])
  for key, goal, fmt, ok in (
      ("step_vs_cnn", "<= 2x the CNN", lambda v: f"{v:.2f}x",
       lambda v: v <= GOALS["step_vs_cnn"]),
      ("speedup_vs_official", ">= 30x faster", lambda v: f"{v:.1f}x",
       lambda v: v >= GOALS["speedup_vs_official"]),
      ("memory_vs_official", "<= 0.1 of its peak", lambda v: f"{v:.3f}",
       lambda v: v <= GOALS["memory_vs_official"]),
      ("projection_minutes", "< 15 min", lambda v: f"{v:.1f} min "
       f"({figures.get('projection_steps')} steps + 400 evaluations, "
       f"{figures.get('projection_eval_minutes', 0):.1f} min of them)",
       lambda v: v < GOALS["projection_minutes"])):
    v = figures.get(key)
    label = {"step_vs_cnn": "ResNet-20 step, adder / CNN",
             "speedup_vs_official": "ResNet-20 step, official / ours",
             "memory_vs_official": "peak memory, ours / official",
             "projection_minutes": "400-epoch CIFAR-10 recipe, projected"}[key]
    if v is not None:
      verdict = "met" if ok(v) else "**not met**"
    elif figures.get("unverified_steps") and not figures.get("ours"):
      verdict = "unverified"
    else:
      verdict = "not measured"
    rows.append([label, goal, "not measured" if v is None else fmt(v),
                 verdict])
  lines = _table(["goal", "target", "measured", ""], rows)
  for kind in ("forward", "input_grad"):
    if kernels[kind]["problems"] and kernels[kind]["family"]:
      lines += ["", f"Why the {kind} goal of {kernels[kind]['family']} is "
                f"not complete: " + "; ".join(kernels[kind]["problems"]) + "."]
  if figures.get("ours"):
    lines += ["", f"Step goals use the fastest verified Pallas step: "
              f"{figures['ours']}."]
  if figures.get("unverified_steps"):
    lines += ["", "Step rows not used (not a verified run of their label): "
              + "; ".join(figures["unverified_steps"]) + "."]
  if figures.get("projection_missing"):
    lines += ["", f"No projection: {figures['projection_missing']}."]
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
  floors = {r["layer"]: r for r in (floor or {}).get("layers", [])}
  tune_rows = _tune_rows(tune)
  kernels = {kind: kernel_goal(kind, tune_rows, floors)
             for kind in ("forward", "input_grad")}
  layers = layer_section(floor, ops_rows, tune, official)
  step_table, figures = step_section(steps, official)
  versions = sorted({f"{r.get('device')} / JAX {r.get('jax')}"
                     for r in [*ops_rows, *steps]})
  text = "\n".join([
      "### Goals (issue 4)", "", *goals_section(kernels, figures), "",
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
