"""benchmarks/report.py: the GPU session's tables and goal checks, on made-up
results (the arithmetic, and that no goal is marked met from partial,
fallen-back or unchecked rows)."""

from __future__ import annotations

import copy
import functools
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
LAYERS = list(report.ALL_LAYERS)


def _goal_row(text: str, label: str) -> list[str]:
  for line in text.splitlines():
    if line.startswith(f"| {label}"):
      return [cell.strip() for cell in line.strip("|").split("|")]
  raise AssertionError(f"no row {label!r} in\n{text}")


def _step(conv="adder", implementation="pallas", kernels="triton",
          ms=3.0, ran=None, passed=True, **extra):
  if ran is None:
    family = {"triton": "triton", "mosaic": "mosaic_gpu"}[kernels]
    family = "xla" if implementation == "xla" else family
    ran = ({"forward": {}, "input_grad": {}} if conv == "mult" else
           {"forward": {family: 20}, "input_grad": {family: 20}})
  row = {"conv": conv, "implementation": implementation,
         "gpu_kernels": kernels, "batch": 256, "ms_per_step_pipelined": ms,
         "peak_device_mb": 500.0, "device": "test GPU", "jax": "0.0",
         "real_step": True, "steps_per_epoch": 195, "eval_s_per_epoch": 0.5,
         "ran": ran,
         "error_vs_xla": {"grads_rel_l2": 1e-5, "passed": passed}}
  row.update(extra)
  return row


def _results(*, adder_ms=3.0, cnn_ms=2.0, official_s=0.3, fwd_s=1.6e-4,
             dx_s=5e-4) -> dict:
  """A complete, verified session: every layer, every check passed."""
  floor = {"device": "test GPU", "jax": "0.0", "python": "3", "date": "d",
           "fp32": {"adder_chain_instr_per_s": 5e13,
                    "fma_chain_instr_per_s": 5e13},
           "memory": {"bytes_per_s": 3e12}, "instr_per_s_used": 5e13,
           "layers": [{"layer": name, "forward_floor_s": 1e-4,
                       "input_grad_floor_s": 2e-4} for name in LAYERS]}
  tune = {"rows": [{"layer": name, "kind": kind, "family": "gpu",
                    "heuristic": {"s": s, "passed": True, "rel_err": 1e-7},
                    "best": {"s": s / 2, "passed": True}}
                   for name in LAYERS
                   for kind, s in (("forward", fwd_s), ("input_grad", dx_s))]}
  steps = [_step(ms=adder_ms), _step("mult", "xla", ms=cnn_ms)]
  official = {"device": "test GPU", "torch": "0", "layers": [],
              "steps": [{"model": "resnet20_adder", "batch": 256,
                         "step_s": official_s,
                         "memory": {"peak_bytes": 10 * 2**30}}]}
  return {"floor.json": floor, "tune.json": tune, "step.jsonl": steps,
          "official_torch.json": official}


def _report(folder: Path, results: dict) -> str:
  for name, value in results.items():
    if name.endswith(".jsonl"):
      text = "".join(json.dumps(r) + "\n" for r in value)
    else:
      text = json.dumps(value)
    (folder / name).write_text(text)
  return report.main([str(folder)])


def test_goals_met(tmp_path):
  text = _report(tmp_path, _results())
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == ["1.50x", "met"]
  assert _goal_row(text, "ResNet-20 step, official / ours")[2:] == [
      "100.0x", "met"]
  # 500 MiB against 10 GiB.
  assert _goal_row(text, "peak memory, ours / official")[2:] == [
      "0.049", "met"]
  # 400 epochs x (195 steps (50,000 // 256) x 3 ms + 0.5 s of evaluation)
  # = 400 x 1.085 s = 7.2 minutes, 3.3 of them evaluating.
  assert _goal_row(text, "400-epoch CIFAR-10 recipe")[2:] == [
      "7.2 min (78000 steps + 400 evaluations, 3.3 min of them)", "met"]
  # Floors 1e-4 / 2e-4 s against kernels of 1.6e-4 / 5e-4 s: 62% and 40%.
  forward = _goal_row(text, "forward kernel, worst of all 7 layers")
  assert forward[0].endswith("(triton) (7 of 7 verified)")
  assert forward[2:] == [f"62% ({LAYERS[0]})", "met"]
  assert _goal_row(text, "dx kernel")[2:] == [f"40% ({LAYERS[0]})", "met"]


def test_goals_not_met_and_not_measured(tmp_path):
  results = _results(adder_ms=9.0, fwd_s=4e-4, dx_s=1e-3)
  del results["official_torch.json"]
  text = _report(tmp_path, results)
  report.main([str(tmp_path), "--out", str(tmp_path / "report.md")])
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == [
      "4.50x", "**not met**"]
  assert _goal_row(text, "ResNet-20 step, official / ours")[2:] == [
      "not measured", "not measured"]
  assert _goal_row(text, "forward kernel")[2:] == [f"25% ({LAYERS[0]})",
                                                    "**not met**"]
  assert (tmp_path / "report.md").read_text() == text


@pytest.mark.parametrize("missing", ["s2_1x1_16-32_s2", "s3_3x3_32-64_s2"])
def test_kernel_goal_needs_every_layer_strided_and_1x1(tmp_path, missing):
  """The large layers alone (all fast here) never make the goal met."""
  results = _results()
  tune = results["tune.json"]
  tune["rows"] = [r for r in tune["rows"] if r["layer"] != missing]
  text = _report(tmp_path, results)
  for label in ("forward kernel", "dx kernel"):
    row = _goal_row(text, label)
    assert row[0].endswith("(6 of 7 verified)")
    assert row[3] == "unverified (6 of 7 layers measured and checked)"
  assert f"{missing}: not measured" in text


def test_kernel_goal_needs_every_heuristic_tile_checked(tmp_path):
  results = _results()
  for row in results["tune.json"]["rows"]:
    if row["layer"] == "s3_1x1_32-64_s2" and row["kind"] == "forward":
      row["heuristic"]["passed"] = False  # wrong numbers, still timed fast
    if row["layer"] == "s2_3x3_16-32_s2" and row["kind"] == "input_grad":
      del row["heuristic"]["passed"]  # an old sweep without the check
  text = _report(tmp_path, results)
  assert _goal_row(text, "forward kernel")[3].startswith("unverified")
  assert _goal_row(text, "dx kernel")[3].startswith("unverified")
  assert "s3_1x1_32-64_s2: heuristic tile failed its check" in text
  assert "**failed check**" in text


def test_a_verified_layer_under_the_target_is_not_met(tmp_path):
  results = _results()
  rows = results["tune.json"]["rows"]
  rows[:] = [r for r in rows if r["layer"] != "s1_3x3_16-16"]
  for row in rows:
    if row["layer"] == "s2_1x1_16-32_s2" and row["kind"] == "forward":
      row["heuristic"]["s"] = 1e-3  # 10% of the floor
  text = _report(tmp_path, results)
  assert _goal_row(text, "forward kernel")[2:] == ["10% (s2_1x1_16-32_s2)",
                                                    "**not met**"]


def test_the_mosaic_forward_counts_only_when_complete(tmp_path):
  results = _results(fwd_s=4e-4)  # Triton forward: 25%, not met
  mosaic = [{"layer": name, "kind": "forward", "family": "mosaic_gpu",
             "heuristic": {"s": 1.25e-4, "passed": True},
             "best": {"s": 1e-4, "passed": True}} for name in LAYERS]
  results["tune.json"]["rows"] += mosaic[:-1]
  text = _report(tmp_path, results)
  row = _goal_row(text, "forward kernel")
  assert "(mosaic_gpu)" in row[0] and row[3].startswith("unverified")
  results["tune.json"]["rows"].append(mosaic[-1])
  text = _report(tmp_path, results)
  assert _goal_row(text, "forward kernel")[2:] == [f"80% ({LAYERS[0]})",
                                                    "met"]


@pytest.mark.parametrize("change,reason", [
    ({"ran": {"forward": {"triton": 19, "xla": 1},
              "input_grad": {"triton": 19, "xla": 1}}},
     "ran triton+xla"),
    ({"ran": {"forward": {"xla": 20}, "input_grad": {"xla": 20}}},
     "ran xla"),
    ({"passed": False}, "gradients failed the check against XLA"),
    ({"ran": None}, None),
])
def test_step_rows_that_did_not_run_their_kernel_verified_are_not_used(
    tmp_path, change, reason):
  results = _results()
  ran = change.get("ran", "keep")
  step = _step(passed=change.get("passed", True),
               **({} if ran == "keep" else {"ran": ran}))
  if ran is None:
    del step["ran"]
    reason = "no record of what ran"
  results["step.jsonl"][0] = step
  text = _report(tmp_path, results)
  for label in ("ResNet-20 step, adder / CNN", "peak memory, ours / official",
                "400-epoch CIFAR-10 recipe"):
    assert _goal_row(text, label)[2:] == ["not measured", "unverified"]
  assert "Step rows not used" in text and reason in text
  # A verified Mosaic GPU step beside it is used instead.
  results["step.jsonl"].append(_step(kernels="mosaic", ms=4.0))
  text = _report(tmp_path, results)
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == ["2.00x", "met"]
  assert "pallas (mosaic kernels)" in text


def test_projection_needs_the_real_step_and_its_evaluation(tmp_path):
  results = _results()
  old = copy.deepcopy(results["step.jsonl"][0])
  del old["real_step"], old["eval_s_per_epoch"]
  results["step.jsonl"][0] = old
  text = _report(tmp_path, results)
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[3] == "met"
  assert _goal_row(text, "400-epoch CIFAR-10 recipe")[2:] == [
      "not measured", "not measured"]
  assert "No projection: the verified step is not the real training step" \
      in text


def test_ops_rows_show_what_ran_and_their_error(tmp_path):
  results = _results()
  common = {"layer": LAYERS[3], "fwd_ms_min": 1.0, "fwd_bwd_ms_min": 2.0,
            "conv_fwd_ms_min": 0.5, "conv_fwd_bwd_ms_min": 1.0,
            "fwd_rel_err": 1e-7, "dx_rel_err": 2e-7, "dw_rel_err": 0.0}
  results["ops.jsonl"] = [
      dict(common, implementation="pallas", gpu_kernels="triton",
           ran_forward=["xla"], ran_input_grad=["xla"], verified=True),
      dict(common, implementation="xla", ran_forward=["xla"],
           ran_input_grad=["xla"], verified=True)]
  text = _report(tmp_path, results)
  assert "Triton: ran xla, not triton; pure jnp ok (2e-07)" in text


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="is not a folder"):
    report.main([str(tmp_path / "absent")])


def test_tune_never_picks_a_tile_that_fails_its_check(tmp_path, monkeypatch):
  """A wrong tile (here also the only "fast" one) is recorded with its
  error, not timed and not picked; a NaN tile and one that raises too."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from addernet_jax import reference  # pylint: disable=g-import-not-at-top
  tune = _module("tune_kernels")
  gpu = tune.gpu
  good, wrong, nan, broken = (gpu.BlockSizes(16 * 2**i, 8) for i in range(4))

  static = ("strides", "block_sizes", "interpret")

  @functools.partial(jax.jit, static_argnames=static)
  def forward(xp, w, strides, block_sizes=None, interpret=False):
    if block_sizes == broken:
      raise ValueError("Triton: out of resources (injected)")
    y = reference.forward(xp, w, strides)
    return {wrong: y + 1.0, nan: y * jnp.nan}.get(block_sizes, y)

  @functools.partial(jax.jit, static_argnames=static + ("rows", "cols"))
  def input_grad(xp, w, g, strides, block_sizes=None, interpret=False,
                 rows=None, cols=None):
    assert (rows, cols) == ((0, 16), (0, 16))  # the window ops passes
    if block_sizes == broken:
      raise ValueError("Triton: out of resources (injected)")
    dx = reference.input_grad(xp, w, g, strides)
    return {wrong: -dx, nan: dx * jnp.nan}.get(block_sizes, dx)

  monkeypatch.setattr(gpu, "forward", forward)
  monkeypatch.setattr(gpu, "input_grad", input_grad)
  monkeypatch.setattr(tune, "candidates",
                      lambda *args: [wrong, nan, broken, good])
  out = tmp_path / "tune.json"
  tune.main(["--batch", "1", "--reps", "1", "--layers", "s3_1x1_32-64_s2",
             "--out", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["kind"] for r in rows] == ["forward", "input_grad"]
  for row in rows:
    assert row["best"]["block_sizes"] == good.__dict__
    assert row["heuristic"]["passed"] is False and "s" not in row["heuristic"]
    assert row["failed"] == 3
    for entry in row["candidates"][:3]:
      assert entry["passed"] is False and "s" not in entry
  assert all("out of resources" in r["candidates"][2]["error"] for r in rows)


def test_step_goals_use_only_the_cifar10_resnet20_recipe(tmp_path):
  results = _results()
  for row in results["step.jsonl"]:
    row.update(model="lenet5_bn", config="configs/mnist_lenet5.py")
  text = _report(tmp_path, results)
  assert _goal_row(text, "ResNet-20 step, adder / CNN")[2:] == [
      "not measured", "unverified"]
  assert "not the CIFAR-10 ResNet-20 recipe (lenet5_bn" in text


@pytest.mark.parametrize("kind", ["forward", "input_grad"])
def test_tune_sweeps_the_simt_family(kind):
  """The triton_simt sweep: register tiles x warp splits the register
  estimate admits, and each option varied alone on the heuristic's tile."""
  from addernet_jax.kernels import triton_simt as simt  # pylint: disable=g-import-not-at-top
  tune = _module("tune_kernels")
  sh = {"xp": (256, 18, 18, 32), "w": (3, 3, 32, 32), "strides": (1, 1)}
  first = simt.get_block_sizes(kind, sh["xp"], sh["w"], sh["strides"], "gpu",
                               num_sms=132)
  cands = tune.simt_candidates(simt, kind, first, interpret=False)
  assert all(simt.blocks_per_sm(kind, bs) for bs in cands)
  tiles = {(bs.pix_per_thread, bs.ch_per_thread) for bs in cands}
  assert {(1, 4), (2, 8)} <= tiles
  assert (4, 8) in tiles  # forward: without compensation or unrolled less
  option = "accumulate" if kind == "forward" else "clip"
  values = simt.ACCUMULATE if kind == "forward" else simt.CLIP
  assert {getattr(bs, option) for bs in cands} == set(values)
  assert {bs.num_stages for bs in cands} == {1, 2, 3}
  assert {bs.unroll for bs in cands} >= {1, 2, 4}
  # Interpret mode (a script check on the CPU): the option variants only.
  first = simt.get_block_sizes(kind, sh["xp"], sh["w"], sh["strides"], "cpu")
  cands = tune.simt_candidates(simt, kind, first, interpret=True)
  assert {(bs.pix_per_thread, bs.ch_per_thread) for bs in cands} == {
      (first.pix_per_thread, first.ch_per_thread)}
  assert {getattr(bs, option) for bs in cands} == set(values)


def test_tune_sweeps_the_tpu_batch_family():
  """The tpu_batch sweep starts from the heuristic's tile (this backend's)
  and adds only tiles within the SMEM filter block and the VMEM budget."""
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax.kernels import tpu_batch  # pylint: disable=g-import-not-at-top
  tune = _module("tune_kernels")
  sh = {"xp": (256, 10, 10, 64), "w": (3, 3, 64, 64), "strides": (1, 1)}
  for kind in ("forward", "input_grad"):
    cands = tune.candidates(tpu_batch, kind, sh, interpret=False)
    assert cands[0] == tpu_batch.get_block_sizes(
        kind, sh["xp"], sh["w"], sh["strides"], jax.default_backend())
    assert len(cands) > 3 and len(set(cands)) == len(cands)
    geo = tpu_batch._geometry(sh["xp"], sh["w"], sh["strides"])
    for bs in cands[1:]:
      assert 9 * bs.block_c * bs.block_n <= tpu_batch.SMEM_SCALARS
      assert tpu_batch._vmem_bytes(kind, geo, sh["w"], sh["strides"],
                                   bs) <= tpu_batch.VMEM_BUDGET


def test_an_unknown_layer_name_is_refused_naming_the_valid_ones():
  """`filter_grad.py --layers layer1` ran nothing and exited 0."""
  layers = _module("resnet20_layers")
  assert layers.selected_layers("") == layers.RESNET20_LAYERS
  assert [l[0] for l in layers.selected_layers(
      "s3_3x3_64-64,s1_3x3_16-16")] == ["s1_3x3_16-16", "s3_3x3_64-64"]
  with pytest.raises(ValueError, match=r"unknown --layers \['layer1'\]; "
                     r"choose from \['s1_3x3_16-16'"):
    layers.selected_layers("s1_3x3_16-16,layer1")
