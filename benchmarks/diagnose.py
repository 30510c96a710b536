"""Why the kernels run as fast as they do: compiled-kernel dumps and reports.

The Python half of `benchmarks/gpu_diagnose.sh` (one device call that times
and explains). Subcommands, each writing as it goes so that a stage cut short
by its time limit keeps what it did:

    python benchmarks/diagnose.py dump DIR [--batch 256] [--layers a,b]
        [--families triton,triton_simt,mosaic_gpu]
  For each ResNet-20 adder layer and kernel (forward and input gradient of
  each family, the input gradient with the window `ops` passes), builds the
  kernel alone as `ops` calls it and keeps: the Pallas kernel jaxpr and the
  Triton IR (TTIR) Pallas prints in debug mode (`DIR/ttir/`), the PTX of
  Triton kernels where JAX compiles them itself (`DIR/ptx/`), and, through
  the environment `gpu_diagnose.sh` sets before JAX starts, XLA's dumps
  (`--xla_dump_to`: HLO after optimisation and each module's PTX, which
  holds the Triton kernels XLA compiles) and Mosaic GPU's
  (`MOSAIC_GPU_DUMP_TO`: MLIR passes, PTX, ptxas output, SASS). On a machine
  without a GPU the kernels are lowered for CUDA only (TTIR, no PTX): the dry
  run. `DIR/kernels.json` indexes every kernel with its compile time.
    python benchmarks/diagnose.py ptxas DIR
  `ptxas -v` on every PTX file under DIR for its own target: registers,
  spill stores and loads, stack frame and shared memory per function
  (`DIR/ptxas.txt` raw, `DIR/ptxas.json` parsed), plus the ptxas reports
  Mosaic GPU dumped itself.
    python benchmarks/diagnose.py pack DIR OUT.tar.gz [--max_mb 15]
  A gzip tar of DIR under the size limit of one file the device tool brings
  back, dropping the least useful dumps first (MLIR pass dumps, then SASS,
  then HLO) if it would not fit.
    python benchmarks/diagnose.py summary DIR [--log LOG] [--out FILE]
  Markdown: per kernel its registers, spills, stack and shared memory, and
  the dispatch decisions and fallbacks found in the log.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.resnet20_layers import layer_shapes, selected_layers  # noqa: E402

FAMILY_MODULES = {"triton": "gpu", "mosaic_gpu": "mosaic_gpu",
                  "triton_simt": "triton_simt"}


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ------------------------------------------------------------------ dump --


@contextlib.contextmanager
def _pallas_debug(capture: io.StringIO):
  """Pallas' debug printing (kernel jaxpr, grid mapping, Triton IR) on, into
  `capture`; and, where JAX compiles Triton kernels itself, their PTX kept
  in `_TRITON_PTX`."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  original = pl.pallas_call

  def pallas_call(*args, **kwargs):
    kwargs["debug"] = True
    return original(*args, **kwargs)
  pl.pallas_call = pallas_call
  try:
    with contextlib.redirect_stdout(capture):
      yield
  finally:
    pl.pallas_call = original


_TRITON_PTX: list[tuple[str, str]] = []


@contextlib.contextmanager
def _capture_triton_ptx():
  """Yields how Triton kernels get their PTX here; where newer JAX's Pallas
  compiles Triton itself, wraps that compile so that the PTX is kept in
  `_TRITON_PTX` (where XLA compiles them, their PTX is in XLA's dump)."""
  try:
    from jax._src.pallas.triton import pallas_call_registration as reg  # pylint: disable=g-import-not-at-top
  except Exception as e:  # pylint: disable=broad-except
    yield f"no Pallas Triton registration ({type(e).__name__})"
    return
  triton = getattr(reg, "triton", None)
  if triton is None or not hasattr(triton, "compile"):
    yield "Pallas hands the Triton IR to XLA: PTX in the XLA dump"
    return
  original = triton.compile

  def compile_and_keep(*args, **kwargs):
    result = original(*args, **kwargs)
    asm = getattr(result, "asm", None)
    if isinstance(asm, bytes):
      asm = asm.decode(errors="replace")
    if asm:
      _TRITON_PTX.append((str(args[0]) if args else "", asm))
    return result

  class _Proxy(types.ModuleType):
    def __getattr__(self, name):
      return getattr(triton, name)
  proxy = _Proxy("triton_capture")
  proxy.compile = compile_and_keep
  reg.triton = proxy
  try:
    yield ("PTX kept from Pallas' own Triton compile where this JAX does "
           "that (`ptx/`), else in the XLA dump")
  finally:
    reg.triton = triton


def _abstract_gpu():
  """An abstract H100 for lowering on a machine without a GPU (JAX >= 0.12
  asks for one; older JAX does not)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    mesh = jax.sharding.AbstractMesh(
        (1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
            device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
  except (AttributeError, TypeError):
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh)


def dump(args) -> None:
  with _capture_triton_ptx() as how:
    _dump(args, how)


def _dump(args, triton_ptx: str) -> None:
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  out = Path(args.dir)
  for sub in ("ttir", "ptx"):
    (out / sub).mkdir(parents=True, exist_ok=True)
  on_gpu = jax.default_backend() == "gpu"
  index = {"backend": jax.default_backend(), "jax": jax.__version__,
           "device": str(jax.devices()[0].device_kind), "batch": args.batch,
           "triton_ptx": triton_ptx,
           "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "mosaic_dump": os.environ.get("MOSAIC_GPU_DUMP_TO", ""),
           "kernels": []}
  layers = selected_layers(args.layers)
  families = [f for f in args.families.split(",") if f]
  for layer in layers:
    name, _, h, w_in, _, _, _, s, pad = layer
    sh = layer_shapes(args.batch, layer)
    for family in families:
      entry = {"layer": name, "family": family}
      try:
        module = importlib.import_module(
            f"addernet_jax.kernels.{FAMILY_MODULES.get(family, family)}")
      except Exception as e:  # pylint: disable=broad-except
        index["kernels"].append(dict(entry, status=f"import failed: {e}"))
        continue
      refuses = getattr(module, "unsupported_reason", None)
      why = refuses(sh["xp"], sh["w"], sh["strides"]) if refuses else None
      kinds = ("forward",) if family == "mosaic_gpu" else ("forward",
                                                           "input_grad")
      for kind in kinds:
        item = dict(entry, kind=kind)
        if why is not None:
          index["kernels"].append(dict(item, status=f"not taken: {why}"))
          continue
        window = {"rows": (pad, pad + h), "cols": (pad, pad + w_in)}
        if kind == "forward":
          fn = lambda xp, w, m=module: m.forward(xp, w, sh["strides"])
          specs = (sh["xp"], sh["w"])
        else:
          fn = lambda xp, w, g, m=module: m.input_grad(
              xp, w, g, sh["strides"], **window)
          specs = (sh["xp"], sh["w"], sh["y"])
        fn.__name__ = _safe(f"adder_{family}_{kind}_{name}")
        avals = [jax.ShapeDtypeStruct(sp, jnp.float32) for sp in specs]
        capture = io.StringIO()
        start = time.perf_counter()
        ptx_before = len(_TRITON_PTX)
        try:
          with _pallas_debug(capture):
            if on_gpu:
              lowered = jax.jit(fn).trace(*avals).lower()
            else:
              with _abstract_gpu():
                lowered = jax.jit(fn).trace(*avals).lower(
                    lowering_platforms=("cuda",))
          item["lower_s"] = round(time.perf_counter() - start, 2)
          if on_gpu:
            start = time.perf_counter()
            lowered.compile()
            item["compile_s"] = round(time.perf_counter() - start, 2)
          item["status"] = "compiled" if on_gpu else "lowered (no GPU)"
        except Exception as e:  # pylint: disable=broad-except
          item["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        stem = _safe(f"{name}.{family}.{kind}")
        if capture.getvalue():
          (out / "ttir" / f"{stem}.txt").write_text(capture.getvalue())
          item["ttir"] = f"ttir/{stem}.txt"
        for i, (_, asm) in enumerate(_TRITON_PTX[ptx_before:]):
          path = out / "ptx" / f"{stem}.{i}.ptx"
          path.write_text(asm)
          item.setdefault("ptx", []).append(str(path.relative_to(out)))
        index["kernels"].append(item)
        print(json.dumps(item), flush=True)
        (out / "kernels.json").write_text(json.dumps(index, indent=1))
  (out / "kernels.json").write_text(json.dumps(index, indent=1))


# ----------------------------------------------------------------- ptxas --

_PTXAS_PATTERNS = {
    "function": re.compile(r"Compiling entry function '([^']+)'"),
    "properties": re.compile(r"Function properties for (\S+)"),
    "frame": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                        r"(\d+) bytes spill loads"),
    "used": re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?"
                       r"(?:, (\d+) bytes smem)?"),
}


def find_ptxas() -> str | None:
  """ptxas from $PTXAS, the PATH, CUDA's usual folders or Triton's wheel."""
  candidates = [os.environ.get("PTXAS"), shutil.which("ptxas"),
                "/usr/local/cuda/bin/ptxas"]
  with contextlib.suppress(Exception):
    import triton  # pylint: disable=g-import-not-at-top
    candidates.append(str(Path(triton.__file__).parent / "backends" /
                          "nvidia" / "bin" / "ptxas"))
  for c in candidates:
    if c and Path(c).is_file() and os.access(c, os.X_OK):
      return c
  return None


def parse_ptxas(text: str, source: str) -> list[dict]:
  """Per-function registers, spills, stack and shared memory of `ptxas -v`."""
  rows, current = [], None
  for line in text.splitlines():
    m = (_PTXAS_PATTERNS["function"].search(line) or
         _PTXAS_PATTERNS["properties"].search(line))
    if m:
      if current is None or current["function"] != m.group(1):
        current = {"source": source, "function": m.group(1)}
        rows.append(current)
      continue
    if current is None:
      continue
    m = _PTXAS_PATTERNS["frame"].search(line)
    if m:
      current.update(stack_bytes=int(m.group(1)),
                     spill_store_bytes=int(m.group(2)),
                     spill_load_bytes=int(m.group(3)))
    m = _PTXAS_PATTERNS["used"].search(line)
    if m:
      current["registers"] = int(m.group(1))
      if m.group(2):
        current["barriers"] = int(m.group(2))
      if m.group(3):
        current["smem_bytes"] = int(m.group(3))
  return rows


def ptxas(args) -> None:
  root = Path(args.dir)
  tool = find_ptxas()
  raw, rows = [], []
  files = sorted(p for p in root.rglob("*.ptx") if p.is_file())
  if tool is None:
    raw.append("ptxas: not found (set $PTXAS); PTX files left unassembled")
  else:
    raw.append(subprocess.run([tool, "--version"], capture_output=True,
                              text=True).stdout.strip())
  for path in files if tool else []:
    target = re.search(r"^\s*\.target\s+(sm_\w+)", path.read_text(
        errors="replace"), re.M)
    arch = target.group(1) if target else "sm_90a"
    cmd = [tool, "-v", f"--gpu-name={arch}", str(path), "-o", os.devnull]
    try:
      done = subprocess.run(cmd, capture_output=True, text=True,
                            timeout=args.timeout)
      text = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
      text = f"ptxas timed out after {args.timeout} s"
    rel = str(path.relative_to(root))
    raw.append(f"===== {rel} ({arch}) =====\n{text}")
    rows += parse_ptxas(text, rel)
    (root / "ptxas.txt").write_text("\n".join(raw) + "\n")
  # Mosaic GPU writes its own ptxas -v reports when dumping.
  for path in sorted(root.rglob("*ptxas*")):
    if path.is_file() and path.name not in ("ptxas.txt", "ptxas.json"):
      text = path.read_text(errors="replace")
      raw.append(f"===== {path.relative_to(root)} (Mosaic GPU) =====\n{text}")
      rows += parse_ptxas(text, str(path.relative_to(root)))
  if not files:
    raw.append("no PTX files (no GPU compile in the dump stage)")
  (root / "ptxas.txt").write_text("\n".join(raw) + "\n")
  (root / "ptxas.json").write_text(json.dumps(rows, indent=1))
  print(f"ptxas: {len(files)} PTX files, {len(rows)} functions")


# ------------------------------------------------------------------ pack --

# Dropped first when the archive would not fit (least useful to most).
_DROP_ORDER = [
    ("MLIR pass dumps", re.compile(r"mlir|pass", re.I)),
    ("SASS", re.compile(r"\.sass", re.I)),
    ("LLVM IR", re.compile(r"\.ll$|llvm", re.I)),
    ("HLO before optimisation", re.compile(r"before_optimizations", re.I)),
    ("HLO", re.compile(r"\.txt$|\.pb$|hlo", re.I)),
]


def pack(args) -> None:
  root, out = Path(args.dir), Path(args.out)
  limit = int(args.max_mb * 2**20)
  files = sorted(p for p in root.rglob("*") if p.is_file())
  dropped = []
  while True:
    tmp = out.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
      for p in files:
        tar.add(p, arcname=str(p.relative_to(root.parent)))
    if tmp.stat().st_size <= limit or not _DROP_ORDER[len(dropped):]:
      break
    label, pattern = _DROP_ORDER[len(dropped)]
    keep = [p for p in files if not pattern.search(str(p.relative_to(root)))
            or p.suffix in (".ptx", ".json") or "ttir" in p.parts]
    dropped.append(f"{label} ({len(files) - len(keep)} files)")
    files = keep
  if tmp.stat().st_size > limit:  # still too large: largest files out
    files.sort(key=lambda p: p.stat().st_size)
    while files and tmp.stat().st_size > limit:
      dropped.append(f"{files.pop().name} (largest)")
      with tarfile.open(tmp, "w:gz") as tar:
        for p in files:
          tar.add(p, arcname=str(p.relative_to(root.parent)))
  tmp.replace(out)
  print(f"pack: {out} {out.stat().st_size / 2**20:.1f} MiB, {len(files)} "
        f"files" + (f"; left out: {', '.join(dropped)}" if dropped else ""))


# --------------------------------------------------------------- summary --


def summary(args) -> str:
  root = Path(args.dir)
  lines = ["### Diagnostics (`benchmarks/gpu_diagnose.sh`)", ""]
  index = json.loads((root / "kernels.json").read_text()) if (
      root / "kernels.json").is_file() else None
  ptx_rows = json.loads((root / "ptxas.json").read_text()) if (
      root / "ptxas.json").is_file() else []
  if index:
    lines += [f"Kernels built one by one on {index['device']} "
              f"({index['backend']}), JAX {index['jax']}, batch "
              f"{index['batch']}; Triton PTX: {index['triton_ptx']}.", "",
              "| layer | family | kernel | status | lower s | compile s |",
              "| --- | --- | --- | --- | --- | --- |"]
    for k in index["kernels"]:
      lines.append(f"| {k['layer']} | {k['family']} | {k.get('kind', '')} | "
                   f"{k.get('status', '')[:120]} | {k.get('lower_s', '')} | "
                   f"{k.get('compile_s', '')} |")
  else:
    lines.append("No kernel dump (the dump stage did not run or wrote "
                 "nothing).")
  adder = [r for r in ptx_rows if re.search(r"adder|mosaic|kernel",
                                             r["function"], re.I)]
  lines += ["", f"ptxas -v, {len(adder)} kernel functions of "
            f"{len(ptx_rows)} (registers per thread; spills and stack in "
            "bytes):", ""]
  if adder:
    lines += ["| PTX file | function | registers | spill stores | "
              "spill loads | stack | smem |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in adder:
      lines.append(f"| {r['source']} | {r['function'][:60]} | "
                   f"{r.get('registers', '')} | "
                   f"{r.get('spill_store_bytes', '')} | "
                   f"{r.get('spill_load_bytes', '')} | "
                   f"{r.get('stack_bytes', '')} | {r.get('smem_bytes', '')} |")
  else:
    lines.append("No ptxas figures (no PTX was produced, or ptxas missing).")
  if args.log and Path(args.log).is_file():
    text = Path(args.log).read_text(errors="replace")
    decisions = sorted(set(re.findall(
        r"kernels\.dispatch: [^\n]*(?:rejected|not used|no kernel)[^\n]*",
        text)))
    stages = re.findall(r"=== (\S+): exit (\d+) after (\d+) s", text)
    prepare = re.findall(r"^gpu_prepare: ([^\n]*)", text, re.MULTILINE)
    if prepare:  # carried wheels and the import check (gpu_prepare.sh)
      lines += ["", "Preparation: " + "; ".join(m[:300] for m in prepare)]
    lines += ["", "Stages: " + (", ".join(
        f"{n} {'ok' if rc == '0' else 'exit ' + rc} ({t} s)"
        for n, rc, t in stages) or "none recorded") + "."]
    lines += ["", f"Dispatch fallbacks logged: {len(decisions)}."]
    lines += [f"- {d[:400]}" for d in decisions[:40]]
  text = "\n".join(lines) + "\n"
  if args.out:
    Path(args.out).write_text(text)
  print(text)
  return text


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("dump")
  p.add_argument("dir")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--layers", default="")
  p.add_argument("--families", default="triton,triton_simt,mosaic_gpu")
  p = sub.add_parser("ptxas")
  p.add_argument("dir")
  p.add_argument("--timeout", type=int, default=60)
  p = sub.add_parser("pack")
  p.add_argument("dir")
  p.add_argument("out")
  p.add_argument("--max_mb", type=float, default=15.0)
  p = sub.add_parser("summary")
  p.add_argument("dir")
  p.add_argument("--log", default=None)
  p.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.command == "dump":
    selected_layers(args.layers, parser)  # an unknown name: one error line
  {"dump": dump, "ptxas": ptxas, "pack": pack, "summary": summary}[
      args.command](args)


if __name__ == "__main__":
  main()
