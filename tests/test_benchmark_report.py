"""benchmarks/report.py: the GPU session's tables and goal checks, on made-up
results (the arithmetic and the met / not met / not measured verdicts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name):
  spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


report = _module("report")


def _goal_row(text: str, label: str) -> list[str]:
  for line in text.splitlines():
    if line.startswith(f"| {label}"):
      return [cell.strip() for cell in line.strip("|").split("|")]
  raise AssertionError(f"no row {label!r} in\n{text}")


def _write(folder: Path, *, adder_ms: float, cnn_ms: float,
           official_s: float, fwd_s: float, dx_s: float) -> None:
  layers = ["s1_3x3_16-16", "s2_3x3_32-32", "s3_3x3_64-64"]
  floor = {"device": "test GPU", "jax": "0.0", "python": "3", "date": "d",
           "fp32": {"adder_chain_instr_per_s": 5e13,
                    "fma_chain_instr_per_s": 5e13},
           "memory": {"bytes_per_s": 3e12}, "instr_per_s_used": 5e13,
           "layers": [{"layer": name, "forward_floor_s": 1e-4,
                       "input_grad_floor_s": 2e-4} for name in layers]}
  (folder / "floor.json").write_text(json.dumps(floor))
  tune = {"rows": [{"layer": name, "kind": kind, "family": "gpu",
                    "heuristic": {"s": s}, "best": {"s": s / 2}}
                   for name in layers
                   for kind, s in (("forward", fwd_s), ("input_grad", dx_s))]}
  (folder / "tune.json").write_text(json.dumps(tune))
  steps = [{"conv": "adder", "implementation": "pallas", "gpu_kernels": "triton",
            "batch": 256, "ms_per_step_pipelined": adder_ms,
            "peak_device_mb": 500.0, "device": "test GPU", "jax": "0.0"},
           {"conv": "mult", "implementation": "xla", "gpu_kernels": "triton",
            "batch": 256, "ms_per_step_pipelined": cnn_ms,
            "peak_device_mb": 300.0, "device": "test GPU", "jax": "0.0"}]
  (folder / "step.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
  official = {"device": "test GPU", "torch": "0", "layers": [],
              "steps": [{"model": "resnet20_adder", "batch": 256,
                         "step_s": official_s,
                         "memory": {"peak_bytes": 10 * 2**30}}]}
  (folder / "official_torch.json").write_text(json.dumps(official))


def test_goals_met(tmp_path):
  _write(tmp_path, adder_ms=3.0, cnn_ms=2.0, official_s=0.3, fwd_s=1.6e-4,
         dx_s=5e-4)
  text = report.main([str(tmp_path)])
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == ["1.50x", "met"]
  assert _goal_row(text, "ResNet-20 step, official / ours")[2:] == [
      "100.0x", "met"]
  # 500 MiB against 10 GiB.
  assert _goal_row(text, "peak memory, ours / official")[2:] == [
      "0.049", "met"]
  # 400 epochs x 195 steps (50,000 // 256) x 3 ms = 3.9 minutes.
  assert _goal_row(text, "400-epoch CIFAR-10 recipe")[2] == (
      "3.9 min (78000 steps)")
  # Floors 1e-4 / 2e-4 s against kernels of 1.6e-4 / 5e-4 s: 62% and 40%.
  forward = _goal_row(text, "forward kernel, worst of the large layers")
  assert forward[0].endswith("(3 of 3 measured)")
  assert forward[2:] == ["62%", "met"]
  assert _goal_row(text, "dx kernel, worst")[2:] == ["40%", "met"]


def test_goals_not_met_and_not_measured(tmp_path):
  _write(tmp_path, adder_ms=9.0, cnn_ms=2.0, official_s=0.1, fwd_s=4e-4,
         dx_s=1e-3)
  (tmp_path / "official_torch.json").unlink()
  text = report.main([str(tmp_path), "--out", str(tmp_path / "report.md")])
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == [
      "4.50x", "**not met**"]
  assert _goal_row(text, "ResNet-20 step, official / ours")[2:] == [
      "not measured", "not measured"]
  assert _goal_row(text, "forward kernel, worst")[2:] == ["25%", "**not met**"]
  assert (tmp_path / "report.md").read_text() == text


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="is not a folder"):
    report.main([str(tmp_path / "absent")])
