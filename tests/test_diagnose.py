"""benchmarks/diagnose.py and gpu_diagnose.sh without a GPU: ptxas parsing,
the size-limited archive, the summary, and the dump stage lowering the
kernels for CUDA with Pallas' Triton IR kept (the script's dry run)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name):
  spec = importlib.util.spec_from_file_location(
      name, ROOT / "benchmarks" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


diagnose = _module("diagnose")

PTXAS_OUTPUT = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'adder_forward_gpu' for 'sm_90a'
ptxas info    : Function properties for adder_forward_gpu
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 16384 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'adder_input_grad_gpu' for 'sm_90a'
ptxas info    : Function properties for adder_input_grad_gpu
    48 bytes stack frame, 44 bytes spill stores, 40 bytes spill loads
ptxas info    : Used 255 registers, 392 bytes cmem[0]
"""


def test_parse_ptxas_registers_spills_stack_smem():
  rows = diagnose.parse_ptxas(PTXAS_OUTPUT, "m.ptx")
  assert rows == [
      {"source": "m.ptx", "function": "adder_forward_gpu", "stack_bytes": 0,
       "spill_store_bytes": 0, "spill_load_bytes": 0, "registers": 96,
       "barriers": 1, "smem_bytes": 16384},
      {"source": "m.ptx", "function": "adder_input_grad_gpu",
       "stack_bytes": 48, "spill_store_bytes": 44, "spill_load_bytes": 40,
       "registers": 255}]


@pytest.mark.skipif(diagnose.find_ptxas() is None, reason="no ptxas here")
def test_ptxas_stage_on_a_real_ptx_file(tmp_path):
  (tmp_path / "xla").mkdir()
  (tmp_path / "xla" / "module.ptx").write_text(
      ".version 8.0\n.target sm_90\n.address_size 64\n"
      ".visible .entry adder_forward_gpu(.param .u64 p)\n{\n ret;\n}\n")
  diagnose.main(["ptxas", str(tmp_path)])
  rows = json.loads((tmp_path / "ptxas.json").read_text())
  assert rows[0]["function"] == "adder_forward_gpu"
  assert rows[0]["registers"] >= 0 and rows[0]["spill_store_bytes"] == 0
  assert "===== xla/module.ptx (sm_90) =====" in (
      tmp_path / "ptxas.txt").read_text()


def test_pack_stays_under_the_limit_dropping_the_least_useful(tmp_path):
  root = tmp_path / "dumps"
  for sub in ("ttir", "ptx", "mosaic", "xla"):
    (root / sub).mkdir(parents=True)
  (root / "ttir" / "a.txt").write_text("tt.func @adder_forward_gpu\n")
  (root / "ptx" / "a.ptx").write_text(".entry adder_forward_gpu\n")
  (root / "kernels.json").write_text("{}")
  (root / "mosaic" / "k.mlir-passes.txt").write_bytes(os.urandom(900_000))
  (root / "xla" / "m.sass").write_bytes(os.urandom(300_000))
  (root / "xla" / "m.after_optimizations.txt").write_text("HLO\n" * 1000)
  out = tmp_path / "dumps.tar.gz"
  diagnose.main(["pack", str(root), str(out), "--max_mb", "0.5"])
  assert out.stat().st_size <= 0.5 * 2**20
  names = tarfile.open(out).getnames()
  assert "dumps/ttir/a.txt" in names and "dumps/ptx/a.ptx" in names
  assert "dumps/kernels.json" in names
  assert "dumps/xla/m.after_optimizations.txt" in names  # HLO kept: fits
  assert "dumps/mosaic/k.mlir-passes.txt" not in names
  assert not (tmp_path / "dumps.tmp").exists()


def test_summary_reports_kernels_ptxas_stages_and_fallbacks(tmp_path):
  (tmp_path / "kernels.json").write_text(json.dumps({
      "backend": "gpu", "jax": "0.0", "device": "H200", "batch": 256,
      "triton_ptx": "in the XLA dump",
      "kernels": [{"layer": "s1", "family": "triton", "kind": "forward",
                   "status": "compiled", "lower_s": 0.5, "compile_s": 1.5}]}))
  (tmp_path / "ptxas.json").write_text(json.dumps(
      diagnose.parse_ptxas(PTXAS_OUTPUT, "m.ptx")))
  log = tmp_path / "diagnose.log"
  log.write_text(
      "gpu_prepare: PREFLIGHT FAILED: the benchmarks cannot import\n"
      "=== tune (limit 120 s): python ...\n=== tune: exit 0 after 41 s\n"
      "=== step: exit 124 after 160 s\n"
      "WARNING kernels.dispatch: mosaic_gpu kernels rejected for xp (256, "
      "34, 34, 16), w (3, 3, 16, 16), strides (1, 1), float32, window rows "
      "(1, 33) cols (1, 33): fails at run time: XlaRuntimeError: ...; using "
      "triton.\n")
  text = diagnose.main(["summary", str(tmp_path), "--log", str(log),
                        "--out", str(tmp_path / "summary.md")]) or (
                            tmp_path / "summary.md").read_text()
  assert "| s1 | triton | forward | compiled | 0.5 | 1.5 |" in text
  assert "| m.ptx | adder_input_grad_gpu | 255 | 44 | 40 | 48 |  |" in text
  assert "tune ok (41 s), step exit 124 (160 s)" in text
  assert "Preparation: PREFLIGHT FAILED: the benchmarks cannot import" in text
  assert "Dispatch fallbacks logged: 1." in text
  assert "mosaic_gpu kernels rejected" in text


def test_dump_lowers_each_kernel_for_cuda_and_keeps_the_triton_ir(tmp_path):
  """The dump stage on a machine without a GPU (the dry run): every kernel
  is lowered for CUDA, Pallas' Triton IR kept, nothing compiled."""
  diagnose.main(["dump", str(tmp_path), "--batch", "2", "--layers",
                 "s3_1x1_32-64_s2"])
  index = json.loads((tmp_path / "kernels.json").read_text())
  kernels = {(k["family"], k["kind"]): k for k in index["kernels"]}
  assert set(kernels) == {("triton", "forward"), ("triton", "input_grad"),
                          ("triton_simt", "forward"),
                          ("triton_simt", "input_grad"),
                          ("mosaic_gpu", "forward")}
  for (family, kind), k in kernels.items():
    assert k["status"] == "lowered (no GPU)", k
    if family != "mosaic_gpu":  # Pallas Triton: the Triton IR is kept
      assert "tt.func" in (tmp_path / k["ttir"]).read_text()
  assert "adder_forward_gpu" in (
      tmp_path / kernels[("triton", "forward")]["ttir"]).read_text()
  from jax.experimental import pallas as pl  # the debug switch is undone
  assert pl.pallas_call.__module__.startswith("jax")


def test_gpu_diagnose_script_is_valid_bash_and_documented():
  script = ROOT / "benchmarks" / "gpu_diagnose.sh"
  for name in ("gpu_diagnose", "gpu_session", "gpu_prepare", "gpu_wheels"):
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / f"{name}.sh")],
                   check=True)
  text = script.read_text()
  for stage in ("env", "floor", "tune", "dump", "ptxas", "step-adder",
                "step-mult", "ops", "report"):
    assert f"stage {stage}" in text
  assert "QUICK" in text and "DIAG_BUDGET" in text


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_gpu_diagnose_dry_run_every_stage_succeeds(tmp_path):
  """QUICK=1 on the CPU: every stage exits 0 and the training-step stage
  writes its rows (a stage failing here would fail on the GPU too, and a
  device call is scarce; the step stage once broke unnoticed)."""
  out = tmp_path / "out"
  env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable,
         "DIAG_WORK": str(tmp_path / "work")}
  subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_diagnose.sh"),
                  str(out)], env=env, check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  log = (out / "diagnose.log").read_text()
  exits = re.findall(r"^=== (\S+): exit (\d+)", log, re.MULTILINE)
  assert {name for name, _ in exits} >= {
      "env", "floor", "tune", "dump", "ptxas", "step-adder-pallas-triton",
      "step-mult-xla", "ops", "report"}, log[-4000:]
  failed = [name for name, code in exits if code != "0"]
  assert not failed, f"stages failed: {failed}\n{log[-6000:]}"
  rows = [json.loads(line) for line in
          (tmp_path / "work" / "results" / "step.jsonl").read_text().splitlines()]
  assert [r["conv"] for r in rows] == ["adder", "mult"]
  assert all(r["final_loss_finite"] and r["eval_s_per_epoch"] is not None
             for r in rows), rows
  assert rows[0]["error_vs_xla"]["passed"], rows[0]


def _wheel(folder: Path, name: str) -> Path:
  """A minimal pure-Python wheel of one module `name` with VALUE = 7."""
  path = folder / f"{name}-0.1-py3-none-any.whl"
  info = f"{name}-0.1.dist-info"
  files = {f"{name}/__init__.py": "VALUE = 7\n",
           f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n",
           f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\n"
                            "Root-Is-Purelib: true\nTag: py3-none-any\n"}
  files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
  with zipfile.ZipFile(path, "w") as archive:
    for member, text in files.items():
      archive.writestr(member, text)
  return path


def _prepare(tmp_path, env, then=""):
  script = (f". benchmarks/gpu_prepare.sh; PY={sys.executable}; "
            f"gpu_prepare {tmp_path / 'scratch'} {then}")
  return subprocess.run(["bash", "-c", script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def test_gpu_prepare_installs_carried_wheels_and_checks_imports(tmp_path):
  """The device image lacks packages (ml_collections): gpu_prepare installs
  the carried wheels where the checkout's Python finds them, and says what to
  do when an import still fails."""
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _wheel(wheels, "carried_pkg_for_test")
  env = {**os.environ, "WHEELS": str(wheels), "JAX_PLATFORMS": "cpu"}
  result = _prepare(tmp_path, env, '&& "$PY" -c "import carried_pkg_for_test '
                    'as m; print(m.VALUE, m.__file__)"')
  assert result.returncode == 0, result.stdout + result.stderr
  assert "installed 1 carried wheels" in result.stdout
  assert "and its kernels import" in result.stdout
  assert f"7 {tmp_path / 'scratch' / 'site'}" in result.stdout

  blocker = tmp_path / "blocker"
  blocker.mkdir()
  (blocker / "sitecustomize.py").write_text(
      "import sys\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] == 'ml_collections':\n"
      "      raise ModuleNotFoundError(\"No module named 'ml_collections'\")\n"
      "sys.meta_path.insert(0, Block())\n")
  env = {**env, "WHEELS": str(tmp_path / "none"), "PYTHONPATH": str(blocker)}
  result = _prepare(tmp_path, env)
  assert result.returncode == 1, result.stdout + result.stderr
  assert "PREFLIGHT FAILED" in result.stdout
  assert "benchmarks/gpu_wheels.sh" in result.stdout
  assert "No module named 'ml_collections'" in result.stderr


@pytest.mark.extended  # .ci/run runs it (its extended step)
def test_gpu_session_dry_run_of_the_stages_the_diagnosis_lacks(tmp_path):
  """gpu_session.sh's QUICK=1 stages that gpu_diagnose.sh does not run:
  the official PyTorch method (where PyTorch is installed) and the
  filter-gradient formulations, then the report."""
  stages = ["floor", "dw", "report"]
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    stages.insert(1, "official")
  except ImportError:
    pass
  out = tmp_path / "out"
  env = {**os.environ, "QUICK": "1", "PYTHON": sys.executable}
  subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_session.sh"),
                  str(out), *stages], env=env, check=True, cwd=ROOT,
                 capture_output=True, timeout=600)
  log = (out / "session.log").read_text()
  exits = dict(re.findall(r"^=== (\S+): exit (\d+)", log, re.MULTILINE))
  assert set(exits) == set(stages) and set(exits.values()) == {"0"}, log[-6000:]
  rows = json.loads((out / "filter_grad.json").read_text())
  assert rows, rows
  if "official" in stages:
    assert json.loads((out / "official_torch.json").read_text())
