"""count_ops against hand-derived MAC counts."""

from __future__ import annotations

import pytest

from addernet_jax import opcount


def _conv_macs(h_out, w_out, cout, k, cin):
  return h_out * w_out * cout * k * k * cin


def _resnet20_adder_macs() -> int:
  """Every adder layer of the official CIFAR ResNet-20, by hand."""
  total = 0
  cin, size = 16, 32
  for stage, planes in enumerate((16, 32, 64)):
    for block in range(3):
      if stage > 0 and block == 0:
        size //= 2
        total += _conv_macs(size, size, planes, 1, cin)  # 1x1 downsample
      total += _conv_macs(size, size, planes, 3, cin)    # conv1
      total += _conv_macs(size, size, planes, 3, planes)  # conv2
      cin = planes
  return total


@pytest.fixture(scope="module")
def counts_computed_once():
  """`opcount.count_ops` remembering its results within this module: the
  two tables count the same models (about 10 s each)."""
  real, memo = opcount.count_ops, {}

  def count_ops(model_name, input_shape, conv="adder", **kwargs):
    key = (model_name, tuple(input_shape), conv, tuple(sorted(kwargs.items())))
    if key not in memo:
      memo[key] = real(model_name, input_shape, conv, **kwargs)
    return memo[key]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(opcount, "count_ops", count_ops)
    yield


@pytest.fixture(scope="module")
def resnet20_adder():
  return opcount.count_ops("resnet20", (32, 32, 3), conv="adder")


@pytest.fixture(scope="module")
def resnet20_mult():
  return opcount.count_ops("resnet20", (32, 32, 3), conv="mult")


def test_resnet20_adder(resnet20_adder):
  result = resnet20_adder
  adder = [r for r in result["layers"] if r["kind"] == "adder"]
  mult = [r for r in result["layers"] if r["kind"] == "mult"]
  assert len(adder) == 20 and [r["name"] for r in mult] == ["conv1", "fc"]
  adder_macs = sum(r["macs"] for r in adder)
  assert adder_macs == _resnet20_adder_macs() == 40_370_176  # ~40.4M
  # one layer by hand: layer2_0/conv1, 3x3 stride 2, 16 -> 32, 32x32 -> 16x16
  layer = next(r for r in adder if r["name"] == "layer2_0/conv1")
  assert layer["macs"] == 16 * 16 * 32 * (3 * 3 * 16) == 1_179_648
  assert layer["input_shape"] == (1, 32, 32, 16)
  assert layer["output_shape"] == (1, 16, 16, 32)
  assert layer["mul"] == 0 and layer["add"] == 2 * layer["macs"]
  stem = 32 * 32 * 16 * 27
  fc = 64 * 10
  assert result["total"]["mul"] == stem + fc
  assert result["total"]["add"] == 2 * adder_macs + stem + fc


def test_mult_twin_has_same_macs_as_multiplications(resnet20_adder,
                                                    resnet20_mult):
  adder, mult = resnet20_adder, resnet20_mult
  assert [r["name"] for r in adder["layers"]] == [
      r["name"] for r in mult["layers"]]
  assert [r["macs"] for r in adder["layers"]] == [
      r["macs"] for r in mult["layers"]]
  assert all(r["kind"] == "mult" for r in mult["layers"])
  assert mult["total"]["mul"] == mult["total"]["add"] == adder["total"]["macs"]


def test_lenet5_bn_adder_has_no_multiplications():
  result = opcount.count_ops("lenet5_bn", (28, 28, 1), conv="adder")
  assert result["total"]["mul"] == 0
  assert all(r["kind"] == "adder" for r in result["layers"])
  macs = (_conv_macs(28, 28, 6, 5, 1) + _conv_macs(10, 10, 16, 5, 6)
          + 400 * 120 + 120 * 84 + 84 * 10)
  assert result["total"]["add"] == 2 * macs == 833_040


def test_batch_dimension_scales_counts():
  one = opcount.count_ops("lenet5_bn", (28, 28, 1), conv="mult")
  three = opcount.count_ops("lenet5_bn", (3, 28, 28, 1), conv="mult")
  assert three["total"]["mul"] == 3 * one["total"]["mul"]
  assert three["layers"][0]["input_shape"] == (3, 28, 28, 1)


def test_imagenet_default_classes_and_override():
  result = opcount.count_ops("resnet18", (64, 64, 3), conv="mult")
  fc = result["layers"][-1]
  assert fc["name"] == "fc" and fc["output_shape"][-1] == 1000
  assert fc["macs"] == 512 * 1000
  stem = result["layers"][0]
  assert stem["macs"] == _conv_macs(32, 32, 64, 7, 3)
  small = opcount.count_ops("resnet18", (64, 64, 3), conv="mult",
                            num_classes=7)
  assert small["layers"][-1]["macs"] == 512 * 7


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown model 'resnet21'"):
    opcount.count_ops("resnet21", (32, 32, 3))
  with pytest.raises(ValueError, match="input_shape"):
    opcount.count_ops("resnet20", (32, 32))
  with pytest.raises(ValueError, match="conv"):
    opcount.count_ops("resnet20", (32, 32, 3), conv="shift")
  # Found by using it: truncated (32.5 -> 32) or ignored silently, or a
  # KeyError: 'mul' for the whole count_ops result.
  with pytest.raises(ValueError, match=r"input_shape .* got \(32.5, 32, 3\)"):
    opcount.count_ops("resnet20", (32.5, 32, 3))
  with pytest.raises(ValueError, match="scale= is for the super-resolution"):
    opcount.count_ops("resnet20", (32, 32, 3), scale=2)
  with pytest.raises(ValueError, match="vdsr is a super-resolution model: it "
                     "takes no num_classes="):
    opcount.count_ops("vdsr", (16, 16, 1), scale=2, num_classes=10)
  with pytest.raises(ValueError, match=r'pass count_ops\(...\)\["total"\]'):
    opcount.estimate_energy_pj({"total": {"mul": 1, "add": 1}, "layers": []})
  with pytest.raises(ValueError, match='"mul" and "add" counts'):
    opcount.estimate_cycles({"macs": 3})


def test_format_count():
  assert opcount.format_count(40_370_176) == "40.37M"
  assert opcount.format_count(870) == "870"
  assert opcount.format_count(1_814_073_344) == "1.81G"


def test_format_boundaries():
  """A unit starts at its own size (1000 is "1.00K", not "1000"), energies
  too: switching units only above it (> for >=) passed every test."""
  assert opcount.format_count(1000) == "1.00K"
  assert opcount.format_count(1_000_000) == "1.00M"
  assert opcount.format_energy(2.5e9) == "2.50 mJ"
  assert opcount.format_energy(2.5e8) == "250.00 uJ"
  assert opcount.format_energy(1e3) == "1.00 nJ"
  assert opcount.format_energy(999.0) == "999.0 pJ"


def test_ops_table_columns(counts_computed_once):
  """Each count in its own column (ANN #Mul, ANN #Add, CNN #Mul, CNN #Add):
  only the per-model counts were tested, not the table that reports them."""
  table = opcount.markdown_table()
  assert "| lenet5_bn | 28x28x1 | 0 | 833.04K | 416.52K | 416.52K |" in table
  # ResNet-20 at CIFAR size: stem + fc multiply (443,008), 40,370,176 adder
  # MACs (test_resnet20_adder).
  assert "| resnet20 | 32x32x3 | 443.01K | 81.18M | 40.81M | 40.81M |" in (
      table), table


# ------------------------------------------------------- energy, latency --

def test_paper_latency_example_from_the_paper_counts():
  """AdderNet paper, section 3.3: LeNet-5 on a VIA Nano 2000 (multiply 4
  cycles, add 2) takes about 1.7M cycles as an AdderNet (870K additions)
  against 2.6M as a CNN (435K multiplications and 435K additions)."""
  ann = {"mul": 0, "add": 870_000}
  cnn = {"mul": 435_000, "add": 435_000}
  assert opcount.estimate_cycles(ann) == 1_740_000
  assert opcount.estimate_cycles(cnn) == 2_610_000


def test_lenet_latency_and_energy_with_our_counts():
  ann = opcount.count_ops("lenet5_bn", (28, 28, 1), conv="adder")["total"]
  cnn = opcount.count_ops("lenet5_bn", (28, 28, 1), conv="mult")["total"]
  macs = 416_520  # conv 117,600 + 240,000, fc 48,000 + 10,080 + 840
  assert opcount.estimate_cycles(ann) == 2 * 2 * macs
  assert opcount.estimate_cycles(cnn) == (4 + 2) * macs
  # ISSCC 2014, 45 nm: fp32 add 0.9 pJ, multiply 3.7 pJ.
  assert opcount.estimate_energy_pj(ann) == pytest.approx(2 * macs * 0.9)
  assert opcount.estimate_energy_pj(cnn) == pytest.approx(macs * (3.7 + 0.9))
  assert opcount.estimate_energy_pj(cnn, "int8") == pytest.approx(
      macs * (0.2 + 0.03))
  # An adder MAC (two fp32 additions, 1.8 pJ) against a multiplication MAC
  # (4.6 pJ): 39% of the energy; in int8 the adder MAC costs 26%.
  assert opcount.estimate_energy_pj(ann) / opcount.estimate_energy_pj(
      cnn) == pytest.approx(1.8 / 4.6)


def test_energy_and_latency_reject_unknown_settings():
  totals = {"mul": 1, "add": 1}
  with pytest.raises(ValueError, match="precision 'fp8'.*fp16"):
    opcount.estimate_energy_pj(totals, "fp8")
  with pytest.raises(ValueError, match="processor 'z80'"):
    opcount.estimate_cycles(totals, "z80")


def test_energy_table_has_every_model(counts_computed_once):
  table = opcount.markdown_energy_table()
  for name in opcount.models_lib.MODEL_NAMES:
    assert f"| {name} |" in table
  # The whole row, latency columns included (a wrong ANN or CNN cycle count
  # or ratio passed). LeNet-5-BN: 416,520 MACs; ANN 2 adds x 2 cycles, CNN
  # 4 + 2 cycles.
  assert ("| lenet5_bn | 28x28x1 | 749.74 nJ | 1.92 uJ | 0.39 | 1.67M | "
          "2.50M | 0.67 |") in table, table


def test_sr_sizes_and_config_counts_by_hand(capsys):
  """A reduced AdderSR network (sr_smoke: EDSR, 1 block of 8 channels, x2)
  was counted as the full EDSR; counts per config were not available."""
  import json  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  configs = Path(__file__).resolve().parents[1] / "configs"
  f, blocks, h, w = 8, 1, 360, 640
  # head 3->F, blocks x 2 FxF, body end FxF, upsampler F->4F: at LR; the
  # tail F->3 at HR (4 pixels per LR pixel); all 3x3.
  per_lr_pixel = 9 * (3 * f + 2 * blocks * f * f + f * f + f * 4 * f
                      + 4 * f * 3)
  total = opcount.count_ops("edsr_baseline", (h, w, 3), conv="mult", scale=2,
                            num_blocks=blocks, features=f)["total"]
  assert total["macs"] == per_lr_pixel * h * w
  opcount.main(["--config", str(configs / "sr_smoke.py")])
  counts = json.loads(capsys.readouterr().out)
  assert counts["input_shape"] == [h, w, 3]
  assert counts["mult"]["macs"] == counts["adder"]["macs"] == total["macs"]
  assert counts["mult"]["energy_pj"] == opcount.estimate_energy_pj(
      counts["mult"])
  # A classification config: its dataset's image size and classes.
  opcount.main(["--config", str(configs / "cifar100_resnet20.py")])
  counts = json.loads(capsys.readouterr().out)
  ten = opcount.count_ops("resnet20", (32, 32, 3), num_classes=10)["total"]
  assert counts["adder"]["mul"] - ten["mul"] == 64 * 90  # the wider fc
  with pytest.raises(ValueError, match="size the super-resolution models"):
    opcount.count_ops("resnet20", (32, 32, 3), features=8)
  with pytest.raises(ValueError, match=r"unexpected argument\(s\) \['width'"):
    opcount.count_ops("vdsr", (8, 8, 1), scale=2, width=8)
  with pytest.raises(SystemExit):
    opcount.main(["--config", str(configs / "missing.py")])
  assert "--config" in capsys.readouterr().err


def test_energy_and_latency_tables_are_the_cited_ones():
  """Horowitz, ISSCC 2014, Fig. 1.1.9 (45 nm; pJ): FP32 mult 3.7, add 0.9;
  FP16 mult 1.1, add 0.4; 8-bit int mult 0.2, add 0.03. The AdderNet paper
  (3.3): VIA Nano 2000, multiplication 4 cycles, addition 2."""
  assert opcount.ENERGY_PJ == {"fp32": {"mul": 3.7, "add": 0.9},
                               "fp16": {"mul": 1.1, "add": 0.4},
                               "int8": {"mul": 0.2, "add": 0.03}}
  assert opcount.CYCLES == {"via_nano_2000": {"mul": 4, "add": 2}}
  totals = {"mul": 1000, "add": 3000}
  assert opcount.estimate_energy_pj(totals, "fp16") == pytest.approx(
      1000 * 1.1 + 3000 * 0.4)
