"""The paper's figures (addernet_jax.figures): the numbers behind them and the
command line, on synthetic data, bundled digits and small models."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from addernet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
from addernet_jax import convert, figures, layers, models, train_lib
from addernet_jax.data import local
from addernet_jax.models import lenet_plus

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


def _check_written(files, max_png_bytes=150_000):
  png, svg = map(Path, files)
  assert png.read_bytes()[:8] == PNG_MAGIC
  assert 1_000 < png.stat().st_size < max_png_bytes
  assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml")


# ------------------------------------------------------------------ fits --


@pytest.mark.parametrize("family", ["laplace", "gaussian"])
def test_the_right_family_wins_on_synthetic_samples(family):
  rng = np.random.default_rng(0)
  loc, scale = 0.3, 2.0
  w = (rng.laplace(loc, scale, 20_000) if family == "laplace" else
       rng.normal(loc, scale, 20_000))
  fits = figures.weight_fits(w.astype(np.float32).reshape(100, 200))
  assert fits["better"] == family
  assert fits["num_weights"] == 20_000
  assert abs(fits["loglik_difference"]) > 0.02
  winner = fits[family]
  assert winner["loc"] == pytest.approx(loc, abs=0.05)
  assert winner["scale"] == pytest.approx(scale, rel=0.03)


def test_fits_are_the_closed_form_maximum_likelihood():
  w = np.random.default_rng(1).standard_t(3, 5_000)
  lap, gau = figures.fit_laplace(w), figures.fit_gaussian(w)
  assert lap["loc"] == np.median(w)
  assert lap["scale"] == pytest.approx(np.mean(np.abs(w - np.median(w))))
  # At the MLE, mean |w - m| / b = 1 and mean (w - mu)^2 / s^2 = 1.
  assert lap["loglik"] == pytest.approx(-np.log(2 * lap["scale"]) - 1)
  assert gau["loglik"] == pytest.approx(
      -0.5 * np.log(2 * np.pi * np.var(w)) - 0.5)
  # Moving either fit's parameters lowers its likelihood.
  for dl, ds in ((0.1, 0), (0, 0.1), (0, -0.1)):
    assert np.mean(figures.laplace_logpdf(
        w, lap["loc"] + dl, lap["scale"] * (1 + ds))) < lap["loglik"]
    assert np.mean(figures.gaussian_logpdf(
        w, gau["loc"] + dl, gau["scale"] * (1 + ds))) < gau["loglik"]


def test_gaussian_scale_is_the_biased_std():
  """The Gaussian fit's scale is the maximum-likelihood (biased) std: the
  average log-likelihood is flat at the MLE, so the test above let an
  n - 1 divisor pass."""
  w = np.random.default_rng(2).normal(0, 1, 50)
  assert figures.fit_gaussian(w)["scale"] == pytest.approx(np.std(w),
                                                           rel=1e-12)


@pytest.mark.parametrize("bad", [[1.0], [2.0, 2.0, 2.0], [0.0, np.nan, 1.0]])
def test_fits_refuse_degenerate_values(bad):
  with pytest.raises(ValueError):
    figures.weight_fits(bad)


def test_laplace_beats_gaussian_on_the_official_resnet20_adder_layers(
    shared_data):
  path = shared_data / "official-resnet20" / "ResNet20-AdderNet.pth"
  if not path.is_file():
    pytest.skip(f"{path} is absent")
  params = convert.load_torch_checkpoint(path, "resnet20")["params"]
  adder = [l for l in figures.filter_layers(params)
           if l not in ("conv1", "fc")]
  assert len(adder) == 20
  for layer in adder:
    fits = figures.weight_fits(figures._layer_kernel(params, layer))  # pylint: disable=protected-access
    # Measured: 0.08 to 0.26 nats per weight in every one of the 20 layers.
    assert fits["better"] == "laplace", (layer, fits)
    assert fits["loglik_difference"] > 0.05, (layer, fits)


def _fake_workdir(root: Path, conv: str, seed: int, steps=(390,),
                  steps_per_epoch: int = 195) -> tuple[Path, dict]:
  """A workdir with checkpoints laid out as training saves them (a state
  with step/params/batch_stats, and the meta), holding random LeNet-5-BN
  parameters: adder filters N(0, 1), CNN filters U(-1/sqrt(fan_in), ...) as
  at initialisation (shapes from `jax.eval_shape`: nothing is compiled).
  Every step holds the same parameters; its meta says its step."""
  model = models.get_model("lenet5_bn", num_classes=10, conv=conv)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)), train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if getattr(path[-1], "key", None) == "kernel":
      bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    return rng.normal(0, 1, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  workdir = root / conv
  with ckpt_lib.CheckpointManager(workdir / "checkpoints",
                                  best_metric=None) as mgr:
    for step in steps:
      state = {"step": np.asarray(step, np.int32), **variables}
      meta = {"step": step, "epoch": step / steps_per_epoch,
              "steps_per_epoch": steps_per_epoch, "seed": seed,
              "model": "lenet5_bn", "conv": conv, "dataset": "mnist"}
      mgr.save(step, state, meta, force=True)
      mgr.wait_until_finished()
  return workdir, variables["params"]


def test_weights_read_the_newest_meta_and_a_fractional_epoch(tmp_path):
  """The meta of the oldest checkpoint, or the epoch as `step //
  steps_per_epoch`, passed every test: each fake workdir had one checkpoint
  at a whole epoch."""
  workdir, _ = _fake_workdir(tmp_path, "adder", 0, steps=(180, 390),
                             steps_per_epoch=180)
  assert figures.checkpoint_meta(workdir)["step"] == 390
  loaded = figures.load_layer_weights(workdir, "conv1")
  assert (loaded["step"], loaded["epoch"]) == (390, 2.17)


def test_weights_command_reads_workdirs(tmp_path, capsys):
  adder, adder_params = _fake_workdir(tmp_path, "adder", 0)
  mult, mult_params = _fake_workdir(tmp_path, "mult", 1)
  out = tmp_path / "fig" / "weights.png"
  assert figures.main(["weights", "--workdirs", str(adder), str(mult),
                       "--output", str(out)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _check_written(result["files"])
  first, second = result["panels"]
  assert (first["conv"], first["step"], first["epoch"]) == ("adder", 390, 2.0)
  assert second["conv"] == "mult"
  expected = figures.weight_fits(adder_params["conv2"]["adder_kernel"])
  for family in ("laplace", "gaussian"):
    assert first["fits"][family] == pytest.approx(expected[family])
  # As initialised: N(0, 1) adder filters are Gaussian; uniform CNN filters
  # are closer to a Gaussian than to a Laplace too.
  assert first["fits"]["better"] == second["fits"]["better"] == "gaussian"
  assert first["fits"]["gaussian"]["scale"] == pytest.approx(1.0, rel=0.05)
  np.testing.assert_array_equal(
      figures.load_layer_weights(mult, "fc1")["weights"],
      mult_params["fc1"]["kernel"])


def test_weights_command_errors(tmp_path, capsys):
  adder, _ = _fake_workdir(tmp_path, "adder", 0)
  cases = [
      (["--workdirs", str(tmp_path / "missing")], "does not exist"),
      (["--workdirs", str(tmp_path)], "no training checkpoint"),
      (["--workdirs", str(adder), "--layer", "conv9"],
       "no layer 'conv9'; layers with filters: conv1, conv2, fc1"),
      (["--torch_checkpoints", str(tmp_path / "x.pth")],
       "torch checkpoint '" + str(tmp_path / "x.pth") + "': no such file"),
      (["--torch_checkpoints", str(adder)],
       "is a directory, not a .pth file; it looks like a training workdir"),
      ([], "give --workdirs and/or --torch_checkpoints"),
      # An AdderSR workdir (its meta has no dataset): was `error: dataset`.
      (["--workdirs", str(tmp_path / "sr")],
       "is not a classification run (an AdderSR workdir?)"),
  ]
  meta = tmp_path / "sr" / "checkpoints" / "4" / "meta"
  meta.mkdir(parents=True)
  (meta / "metadata").write_text(json.dumps(
      {"task": "sr", "model": "vdsr", "conv": "adder", "scale": 2}))
  for args, message in cases:
    assert figures.main(["weights", *args, "--output",
                         str(tmp_path / "w.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message in err[0]
  assert figures.main(["weights", "--workdirs", str(adder), "--output",
                       str(tmp_path / "w.jpg")]) == 1
  assert "must end in .png" in capsys.readouterr().err


def test_weights_command_leaves_out_orbax_read_only_warnings(tmp_path):
  """Reading a checkpoint read-only is on purpose: Orbax's warnings about it
  stay out of the command's output, as in eval.py's."""
  adder, _ = _fake_workdir(tmp_path, "adder", 0)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [sys.executable, "-m", "addernet_jax.figures", "weights", "--workdirs",
       str(adder), "--output", str(tmp_path / "w.png")], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.strip().splitlines()[-1])["panels"]
  assert "read only" not in result.stderr, result.stderr
  assert "read_only" not in result.stderr, result.stderr


# ---------------------------------------------------------------- curves --


def _write_metrics(workdir: Path, lines) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / "metrics.jsonl", "w", encoding="utf-8") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")


def _run_lines(scale: float):
  lines = []
  for epoch in (1, 2, 3):
    for k in (1, 2):
      step = (epoch - 1) * 10 + 5 * k
      lines.append({"step": step, "train_loss": scale / step,
                    "train_top1": 1 - scale / step, "images_per_sec": 10.0,
                    "lr": 0.1 / epoch, "epoch": step / 10})
    lines.append({"step": epoch * 10, "eval_loss": scale / epoch,
                  "eval_top1": 1 - 0.1 * scale / epoch, "eval_top5": 1.0,
                  "eval_top1_recalibrated": 1 - 0.05 * scale / epoch,
                  "epoch": float(epoch)})
  return lines


def test_read_metrics_keeps_the_last_line_of_each_step(tmp_path):
  lines = _run_lines(1.0)
  # A resumed run repeats steps after its checkpoint; a killed one may leave
  # half a line; a non-finite loss is written as a string.
  lines[3] = {**lines[3], "train_loss": 99.0}
  lines += [lines[4], '{"step": 3', {"step": 30, "train_loss": "nan",
                                     "train_top1": 0.5, "lr": 0.01,
                                     "epoch": 3.0}]
  _write_metrics(tmp_path, lines)
  metrics = figures.read_metrics(tmp_path)
  steps = [r["step"] for r in metrics["train"]]
  assert steps == sorted(set(steps)) == [5, 10, 15, 20, 25, 30]
  assert [r["step"] for r in metrics["eval"]] == [10, 20, 30]
  assert metrics["train"][2]["train_loss"] == 99.0
  assert np.isnan(metrics["train"][-1]["train_loss"])
  summary = figures.curve_summary(metrics)
  assert summary["last_epoch"] == 3.0
  assert summary["best_eval_top1"] == pytest.approx(1 - 0.1 / 3)
  assert summary["last_eval_top1_recalibrated"] == pytest.approx(1 - 0.05 / 3)


def test_best_accuracy_is_the_best_not_the_last(tmp_path):
  """`best_*` is the maximum over the evaluations, not the last one: the
  fixtures' accuracies only ever rose, so the last value passed."""
  lines = _run_lines(1.0)
  lines.append({"step": 40, "eval_top1": 0.5, "eval_loss": 2.0,
                "epoch": 4.0})
  _write_metrics(tmp_path / "cls", lines)
  summary = figures.curve_summary(figures.read_metrics(tmp_path / "cls"))
  assert summary["last_eval_top1"] == 0.5
  assert summary["best_eval_top1"] == pytest.approx(1 - 0.1 / 3)
  _write_metrics(tmp_path / "sr", [
      {"step": 1, "train_loss": 0.1, "epoch": 1.0},
      {"step": 1, "eval_psnr": 31.0, "eval_ssim": 0.9, "epoch": 1.0},
      {"step": 2, "eval_psnr": 30.0, "eval_ssim": 0.8, "epoch": 2.0}])
  summary = figures.curve_summary(figures.read_metrics(tmp_path / "sr"))
  assert (summary["last_eval_psnr"], summary["best_eval_psnr"]) == (30.0,
                                                                    31.0)


def test_curve_summary_recalibrated_only_where_logged(tmp_path):
  """Evaluations without a recalibrated accuracy are left out: counting
  them as 0 (then reported as the last recalibrated accuracy) passed."""
  lines = _run_lines(1.0)
  del lines[-1]["eval_top1_recalibrated"]
  _write_metrics(tmp_path, lines)
  s = figures.curve_summary(figures.read_metrics(tmp_path))
  assert s["last_eval_top1_recalibrated"] == pytest.approx(1 - 0.05 / 2)


def test_read_metrics_drops_the_interrupted_runs_steps_after_a_resume(
    tmp_path):
  """A run killed at step 5 after a checkpoint at 2, resumed with another
  log interval: its steps 3-5 and its evaluation at 4 are not the run's."""
  first = train_lib.MetricsWriter(tmp_path, True)
  for step in range(1, 6):
    first.write(step, {"train_loss": 10.0 + step, "epoch": step / 2})
  first.write(4, {"eval_top1": 0.9, "eval_loss": 1.0, "epoch": 2.0})
  first.close()
  resumed = train_lib.MetricsWriter(tmp_path, True, start_step=2)
  resumed.write(4, {"train_loss": 4.0, "epoch": 2.0})
  resumed.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[6]) == {"step": 2, "resumed_from_step": 2}
  metrics = figures.read_metrics(tmp_path)
  assert [(r["step"], r["train_loss"]) for r in metrics["train"]] == [
      (1, 11.0), (2, 12.0), (4, 4.0)]
  assert metrics["eval"] == []
  # A run that starts at step 0 writes no marker.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  train_lib.MetricsWriter(fresh, True, start_step=0).close()
  assert (fresh / "metrics.jsonl").read_text() == ""
  # A run killed before its first checkpoint starts over from step 0: its
  # lines were left in place, and its steps appeared twice.
  killed = train_lib.MetricsWriter(fresh, True)
  killed.write(2, {"train_loss": 7.0, "epoch": 1.0})
  killed.close()
  again = train_lib.MetricsWriter(fresh, True, start_step=0)
  again.write(2, {"train_loss": 5.0, "epoch": 1.0})
  again.close()
  assert [(r["step"], r["train_loss"])
          for r in figures.read_metrics(fresh)["train"]] == [(2, 5.0)]
  # A run killed mid-write left half a line: the resume marker was appended
  # to it and lost with it, so the killed run's steps counted.
  with open(fresh / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 3, "train_loss": 9.0}\n{"step": 4, "train_lo')
  resumed = train_lib.MetricsWriter(fresh, True, start_step=2)
  resumed.close()
  assert (fresh / "metrics.jsonl").read_text().endswith(
      '"train_lo\n{"step": 2, "resumed_from_step": 2}\n')
  assert [r["step"] for r in figures.read_metrics(fresh)["train"]] == [2]


def test_read_metrics_warns_about_lines_that_are_not_json(tmp_path, caplog):
  lines = _run_lines(1.0)
  lines[4:4] = ['{"step": 3', ""]
  _write_metrics(tmp_path, lines + ['{"step": 40, "train_lo'])
  with caplog.at_level("WARNING", logger="addernet_jax.figures"):
    metrics = figures.read_metrics(tmp_path)
  assert len(metrics["train"]) == 6
  warnings = [r.getMessage() for r in caplog.records]
  path = tmp_path / "metrics.jsonl"
  assert warnings == [f"{path} line {n} is not valid JSON (a run killed "
                      "mid-write leaves half a line); skipping it"
                      for n in (5, 12)], warnings


def test_read_metrics_warns_about_lines_that_are_not_utf8(tmp_path, caplog):
  lines = [json.dumps(line) for line in _run_lines(1.0)]
  data = ("\n".join(lines[:2]) + "\n").encode()
  data += b'{"step": 11, "note": "caf\x80"}\n\xff\xfe\n'
  data += ("\n".join(lines[2:]) + "\n").encode()
  (tmp_path / "metrics.jsonl").write_bytes(data)
  with caplog.at_level("WARNING", logger="addernet_jax.figures"):
    metrics = figures.read_metrics(tmp_path)
  assert [r["step"] for r in metrics["train"]] == [5, 10, 15, 20, 25, 30]
  path = tmp_path / "metrics.jsonl"
  assert [r.getMessage() for r in caplog.records] == [
      f"{path} line 3 is not UTF-8 text (byte 0x80 at column 26); skipping "
      "it", f"{path} line 4 is not UTF-8 text (byte 0xff at column 1); "
      "skipping it"]


def test_read_metrics_accepts_a_byte_order_mark(tmp_path, caplog):
  """A file saved by an editor that adds a BOM: its first line was skipped
  as "half a line"."""
  lines = [json.dumps(line) for line in _run_lines(1.0)]
  (tmp_path / "metrics.jsonl").write_bytes(
      b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
  with caplog.at_level("WARNING", logger="addernet_jax.figures"):
    metrics = figures.read_metrics(tmp_path)
  assert [r["step"] for r in metrics["train"]] == [5, 10, 15, 20, 25, 30]
  assert not caplog.records


def test_curves_draws_the_learning_rate_as_steps(tmp_path, monkeypatch):
  """A logged lr is the rate of the steps up to its line: a per-epoch
  schedule is drawn as steps, each value held back to the previous point."""
  figs = []
  monkeypatch.setattr(figures, "save_figure",
                      lambda fig, output: figs.append(fig) or [])
  _write_metrics(tmp_path / "run", _run_lines(1.0))
  figures.plot_curves([{"label": "run",
                        "metrics": figures.read_metrics(tmp_path / "run")}],
                      str(tmp_path / "c.png"))
  ax_lr = figs[0].axes[2]
  assert ax_lr.get_title() == "learning rate"
  (line,) = ax_lr.get_lines()
  assert line.get_drawstyle() == "steps-pre"
  assert list(line.get_ydata()) == pytest.approx(
      [0.1, 0.1, 0.05, 0.05, 0.1 / 3, 0.1 / 3])
  # Without accuracies or evaluations the error panel stays empty, and
  # matplotlib is not asked for a legend there (it would warn).
  _write_metrics(tmp_path / "loss_only", [
      {"step": s, "train_loss": 1.0 / s, "lr": 0.1} for s in (1, 2)])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    figures.plot_curves(
        [{"label": "x", "metrics": figures.read_metrics(
            tmp_path / "loss_only")}], str(tmp_path / "c.png"))
  assert not figs[1].axes[1].get_lines()


def test_curves_error_panel_plots_top1_error_in_percent(tmp_path,
                                                        monkeypatch):
  """The error panel's data is 100 * (1 - top-1): only the learning-rate
  panel's data was checked, so plotting the accuracy itself passed."""
  figs = []
  monkeypatch.setattr(figures, "save_figure",
                      lambda fig, output: figs.append(fig) or [])
  _write_metrics(tmp_path / "run", _run_lines(1.0))
  figures.plot_curves([{"label": "run", "metrics": figures.read_metrics(
      tmp_path / "run")}], str(tmp_path / "c.png"))
  ax_err = figs[0].axes[1]
  lines = {l.get_label(): l for l in ax_err.get_lines()}
  assert list(lines["run eval"].get_ydata()) == pytest.approx(
      [100 * 0.1 / e for e in (1, 2, 3)])
  assert list(lines["run eval, BN recalibrated"].get_ydata()) == pytest.approx(
      [100 * 0.05 / e for e in (1, 2, 3)])


def _sr_lines():
  lines = []
  for step in (1, 2, 3, 4):
    lines.append({"step": step, "train_loss": 0.1 / step, "lr": 1e-4,
                  "epoch": step / 2})
    if step % 2 == 0:
      lines.append({"step": step, "eval_psnr": 30.0 + step,
                    "eval_ssim": 0.8 + step / 100, "eval_bicubic_psnr": 31.0,
                    "eval_bicubic_ssim": 0.85, "eval_num_images": 2,
                    "epoch": step / 2})
  return lines


def test_curves_of_an_addersr_run_plot_l1_loss_and_psnr(tmp_path, capsys,
                                                        monkeypatch):
  """An AdderSR workdir was drawn as a classifier's: its L1 loss under
  "cross-entropy loss", an empty top-1 panel and no PSNR."""
  _write_metrics(tmp_path / "sr", _sr_lines())
  metrics = figures.read_metrics(tmp_path / "sr")
  assert [r["step"] for r in metrics["eval"]] == [2, 4]
  summary = figures.curve_summary(metrics)
  assert summary["last_eval_psnr"] == 34.0 and summary["best_eval_psnr"] == 34
  assert summary["last_eval_ssim"] == pytest.approx(0.84)
  assert summary["eval_bicubic_psnr"] == 31.0
  figs = []
  monkeypatch.setattr(figures, "save_figure",
                      lambda fig, output: figs.append(fig) or [])
  figures.plot_curves([{"label": "sr", "metrics": metrics}],
                      str(tmp_path / "c.png"))
  ax_loss, ax_psnr, _ = figs[0].axes
  assert ax_loss.get_ylabel() == "L1 loss"
  assert ax_psnr.get_ylabel() == "PSNR (dB)"
  psnr, bicubic = ax_psnr.get_lines()
  assert list(psnr.get_ydata()) == [32.0, 34.0]
  assert list(bicubic.get_ydata()) == [31.0, 31.0]
  _write_metrics(tmp_path / "cls", _run_lines(1.0))
  with pytest.raises(figures.FigureError, match="runs of one kind"):
    figures.plot_curves(
        [{"label": "sr", "metrics": metrics},
         {"label": "cls", "metrics": figures.read_metrics(tmp_path / "cls")}],
        str(tmp_path / "c.png"))


def test_curves_refuses_duplicate_labels(tmp_path, capsys):
  for exp in ("exp1", "exp2"):
    _write_metrics(tmp_path / exp / "run", _run_lines(1.0))
  one, two = str(tmp_path / "exp1" / "run"), str(tmp_path / "exp2" / "run")
  out = tmp_path / "curves.png"
  for args, message in [
      (["--workdirs", one, two],
       f"workdirs {one!r} and {two!r} would have the same label 'run' (their "
       "folder name); give one distinct name per workdir with --labels"),
      (["--workdirs", one, one], "the same label 'run'"),
      (["--workdirs", one, two, "--labels", "a", "a"],
       "the same label 'a' (in --labels)")]:
    assert figures.main(["curves", *args, "--output", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  assert not out.exists()
  assert figures.main(["curves", "--workdirs", one, two, "--labels", "a",
                       "b", "--output", str(out)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert set(result["runs"]) == {"a", "b"}


def test_output_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
  """A bad --output fails at once, before a workdir is read or a model is
  trained (here every such step would fail differently)."""
  def forbidden(*args, **kwargs):
    raise AssertionError("work started before --output was checked")

  for name in ("_load_data", "train_feature_model", "read_metrics",
               "load_layer_weights", "load_torch_layer_weights"):
    monkeypatch.setattr(figures, name, forbidden)
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "taken.png").mkdir()
  (tmp_path / "svg_taken.svg").mkdir()
  commands = {
      "weights": ["--workdirs", str(tmp_path)],
      "features": ["--dataset", "digits"],
      "curves": ["--workdirs", str(tmp_path)],
      "gradients": ["--dataset", "digits"]}
  outputs = {str(tmp_path / "f.jpg"): "--output must end in .png",
             str(tmp_path / "a_file" / "f.png"):
                 f"{str(tmp_path / 'a_file')!r} is a file, not a directory",
             str(tmp_path / "taken.png"): "taken.png' is a directory",
             str(tmp_path / "svg_taken.png"): "svg_taken.svg' is a directory"}
  for command, args in commands.items():
    for output, message in outputs.items():
      assert figures.main([command, *args, "--output", output]) == 1
      err = capsys.readouterr().err.strip().splitlines()
      assert len(err) == 1 and err[0].startswith("error: "), err
      assert message in err[0], (command, err)


@pytest.mark.parametrize("command,args,message", [
    ("features", ["--batch_size", "0"], "--batch_size must be >= 2, got 0"),
    ("features", ["--batch_size", "1"], "--batch_size must be >= 2, got 1"),
    ("features", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    ("features", ["--train_examples", "-1"],
     "--train_examples must be >= 0, got -1"),
    ("features", ["--holdout_examples", "-1"],
     "--holdout_examples must be >= 0, got -1"),
    ("features", ["--plot_examples", "0"],
     "--plot_examples must be >= 1, got 0"),
    ("features", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("features", ["--learning_rate", "0"], "--learning_rate must be > 0"),
    ("features", ["--learning_rate", "nan"],
     "--learning_rate must be > 0, got nan"),
    ("gradients", ["--batch_size", "0"], "--batch_size must be >= 2, got 0"),
    ("gradients", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("gradients", ["--holdout_examples", "-3"],
     "--holdout_examples must be >= 0, got -3"),
    ("gradients", ["--seed", "-2"], "--seed must be >= 0, got -2")])
def test_numeric_flags_are_checked_before_any_work(tmp_path, capsys,
                                                   monkeypatch, command, args,
                                                   message):
  def forbidden(*unused_args, **unused_kwargs):
    raise AssertionError("work started before the flags were checked")

  for name in ("_load_data", "train_feature_model", "gradient_norm_trace"):
    monkeypatch.setattr(figures, name, forbidden)
  assert figures.main([command, "--dataset", "digits", *args, "--output",
                       str(tmp_path / "f.png")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert message in err[0], err


def test_train_feature_model_refuses_empty_batches():
  images, labels = local.load_digits("train")
  for batch_size, epochs in ((0, 1), (1, 1), (16, 0)):
    with pytest.raises(figures.FigureError,
                       match="--batch_size must be >= 2 and --epochs >= 1"):
      figures.train_feature_model("mult", (images[:32], labels[:32]),
                                  dataset="digits", widths=(2,) * 6,
                                  epochs=epochs, batch_size=batch_size)


def test_curves_command(tmp_path, capsys):
  _write_metrics(tmp_path / "adder", _run_lines(1.0))
  _write_metrics(tmp_path / "mult", _run_lines(0.5))
  out = tmp_path / "curves.png"
  assert figures.main(["curves", "--workdirs", str(tmp_path / "adder"),
                       str(tmp_path / "mult"), "--labels", "ANN", "CNN",
                       "--output", str(out)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _check_written(result["files"])
  assert set(result["runs"]) == {"ANN", "CNN"}
  assert result["runs"]["CNN"]["last_eval_top1"] == pytest.approx(1 - 0.05 / 3)
  for args, message in [
      (["--workdirs", str(tmp_path / "nope")], "does not exist"),
      # a wrong path after a good one: nothing printed before the error
      (["--workdirs", str(tmp_path / "adder"), str(tmp_path / "nope")],
       "does not exist"),
      (["--workdirs", str(tmp_path)], "metrics.jsonl' does not exist"),
      (["--workdirs", str(tmp_path / "adder"), "--labels", "a", "b"],
       "--labels has 2 names for 1 workdirs")]:
    assert figures.main(["curves", *args, "--output", str(out)]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not captured.out, captured.out


# ------------------------------------------------------- gradient norms --


def _probe_gradients(model, variables, x, labels, names):
  """For each layer in `names`: its input and dL/d(its output) for the
  training loss, found by intercepting the layer's call and adding a zero
  perturbation to its output (no use of the adder backward)."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.name in names and context.method_name == "__call__":
      shapes[context.module.name] = out.shape
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.apply(variables, x, train=True,
                                       mutable=["batch_stats"]))

  def loss_with(deltas):
    inputs = {}

    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      name = context.module.name
      if name in names and context.method_name == "__call__":
        inputs[name] = args[0]
        return out + deltas[name]
      return out

    with nn.intercept_methods(add_delta):
      logits, _ = model.apply(variables, x, train=True,
                              mutable=["batch_stats"])
    return train_lib.cross_entropy_loss(logits, labels), inputs

  zeros = {k: jnp.zeros(v, jnp.float32) for k, v in shapes.items()}
  g, inputs = jax.jit(jax.grad(loss_with, has_aux=True))(zeros)
  return ({k: np.asarray(v, np.float64) for k, v in inputs.items()},
          {k: np.asarray(v, np.float64) for k, v in g.items()})


class _TinyAdderNet(nn.Module):
  """Adder conv (5x5, zero padding 2) - BN - ReLU - max pool - adder dense -
  BN: the layer kinds of LeNet-5-BN, small enough to compile in seconds."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda name: nn.BatchNorm(use_running_average=not train,
                                   momentum=0.9, name=name)
    x = layers.AdderConv(3, (5, 5), padding=((2, 2), (2, 2)),
                         name="conv1")(x)
    x = nn.max_pool(nn.relu(bn("bn1")(x)), (2, 2), strides=(2, 2))
    x = layers.AdderDense(10, name="fc")(x.reshape((x.shape[0], -1)))
    return bn("bn2")(x)


def test_adder_gradients_match_the_official_formula_directly():
  images, labels = local.load_digits("train")
  images, labels = images[:24], np.asarray(labels[:24], np.int32)
  model = _TinyAdderNet()
  x = figures._normalize(images, "digits")  # pylint: disable=protected-access
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x[:1]))()
  grads, loss = jax.jit(lambda v: figures.layer_gradients(
      model, v, x, labels))(variables)
  assert np.isfinite(loss)
  assert list(grads) == ["conv1", "fc"]
  norms = figures.l2_norms(grads)
  for name, g in grads.items():
    assert np.all(np.isfinite(g)) and norms[name] > 0
    assert norms[name] == pytest.approx(
        np.sqrt(np.sum(np.square(np.asarray(g, np.float64)))))
  params = variables["params"]
  # fc: dW[c, o] = sum_n (x[n, c] - W[c, o]) * g[n, o].
  inputs, out_grads = _probe_gradients(model, variables, x, labels,
                                       ("conv1", "fc"))
  xin, g = inputs["fc"], out_grads["fc"]
  w = np.asarray(params["fc"]["adder_kernel"], np.float64)
  direct = np.einsum("nco,no->co", xin[:, :, None] - w[None], g)
  np.testing.assert_allclose(grads["fc"], direct, rtol=1e-4,
                             atol=1e-4 * np.abs(direct).max())
  # conv1: dW[i, j, c, o] = sum_{n,p,q} (xp[n, p+i, q+j, c] - W[i, j, c, o])
  # * g[n, p, q, o] with xp the input zero-padded by 2.
  xin, g = inputs["conv1"], out_grads["conv1"]
  w = np.asarray(params["conv1"]["adder_kernel"], np.float64)
  xp = np.pad(xin, ((0, 0), (2, 2), (2, 2), (0, 0)))
  out_h, out_w = g.shape[1:3]
  direct = np.zeros_like(w)
  for i in range(5):
    for j in range(5):
      view = xp[:, i:i + out_h, j:j + out_w, :]
      direct[i, j] = (np.einsum("npqc,npqo->co", view, g)
                      - w[i, j] * g.sum(axis=(0, 1, 2))[None, :])
  np.testing.assert_allclose(grads["conv1"], direct, rtol=1e-4,
                             atol=1e-4 * np.abs(direct).max())


def test_normalize_uses_the_dataset_statistics():
  """The figures' own normalisation (gradient and feature figures) divides
  by the dataset's std: leaving the division out passed."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  got = figures._normalize(x, "mnist")  # pylint: disable=protected-access
  np.testing.assert_allclose(got, (x / 255.0 - 0.1307) / 0.3081, rtol=1e-6,
                             atol=1e-6)


def _spy_normalize(monkeypatch):
  """Records a copy of every batch passed to figures._normalize."""
  seen = []
  real = figures._normalize  # pylint: disable=protected-access

  def spy(x, dataset):
    seen.append(np.asarray(x).copy())
    return real(x, dataset)

  monkeypatch.setattr(figures, "_normalize", spy)
  return seen


def _rows(batches):
  """The images of `batches`, as a sorted list of their bytes."""
  return sorted(map(bytes, np.concatenate(batches).reshape(
      sum(len(b) for b in batches), -1)))


def test_gradient_norm_trace_steps_through_the_batches(monkeypatch):
  """Step s uses batch s of one permutation: every step on the first
  batch again passed."""
  images, labels = local.load_digits("train")
  images, labels = images[:96], labels[:96]
  seen = _spy_normalize(monkeypatch)
  figures.gradient_norm_trace("mult", images, labels, dataset="digits",
                              steps=3, batch_size=32)
  assert len(seen) == 4  # seen[0]: the initialisation sample
  assert _rows(seen[1:]) == _rows([images])


@pytest.mark.extended  # .ci/run runs it (its extended step)
@pytest.mark.slow
def test_gradient_norm_trace_adder_smaller_than_cnn():
  images, labels = local.load_digits("train")
  traces = {conv: figures.gradient_norm_trace(
      conv, images[:96], labels[:96], dataset="digits", steps=2,
      batch_size=32) for conv in ("adder", "mult")}
  for trace in traces.values():
    assert trace["layers"] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert np.asarray(trace["norms"]).shape == (2, 5)
    assert np.all(np.isfinite(trace["norms"]))
    assert np.all(np.isfinite(trace["losses"]))
  # At initialisation (measured on MNIST: 0.004-0.012 against 1.9-4.9; on
  # these digits the same orders), every adder layer's gradient is smaller.
  first = {c: np.asarray(t["norms"][0]) for c, t in traces.items()}
  assert np.all(first["adder"] * 10 < first["mult"])


def test_gradients_command_errors(tmp_path, capsys):
  out = str(tmp_path / "g.png")
  for args, message in [
      (["--data_dir", str(tmp_path / "none")], "does not exist"),
      ([], "--data_dir is required for mnist"),
      (["--dataset", "digits", "--batch_size", "5000"], "fewer than")]:
    assert figures.main(["gradients", *args, "--output", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_gradients_reads_only_the_training_split(tmp_path, capsys):
  """The gradient figure uses training images only: MNIST without its test
  pair (as shipped with just the training set) was refused."""
  import struct  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, 40, dtype=np.uint8)
  (tmp_path / "train-images-idx3-ubyte").write_bytes(
      struct.pack(">IIII", 0x803, 40, 28, 28) + images.tobytes())
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(
      struct.pack(">II", 0x801, 40) + labels.tobytes())
  _, (got_images, got_labels), evaluation = figures._load_data(  # pylint: disable=protected-access
      "mnist", str(tmp_path), 7, with_eval=False)
  assert evaluation is None
  np.testing.assert_array_equal(got_images[..., 0], images[:33])
  np.testing.assert_array_equal(got_labels, labels[:33])
  assert figures.main(["gradients", "--data_dir", str(tmp_path),
                       "--holdout_examples", "40",
                       "--output", str(tmp_path / "g.png")]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: --holdout_examples 40 must be smaller than the 40 "
                 "training examples"], err


# -------------------------------------------------------------- features --


def test_feature_geometry_tells_rays_from_clusters():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 200)
  angles = labels * 2 * np.pi / 10
  # CNN-like: classes along rays from the origin, spread in length.
  r = rng.uniform(1, 10, labels.size)
  ang = angles + rng.normal(0, 0.08, labels.size)
  rays = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
  # AdderNet-like: round clusters around centres away from the origin.
  centres = 5 * np.stack([np.cos(angles), np.sin(angles)], 1) + 3
  blobs = centres + rng.normal(0, 0.5, (labels.size, 2))
  g_rays = figures.feature_geometry(rays, labels)
  g_blobs = figures.feature_geometry(blobs, labels)
  assert g_rays["angle_top1"] > 0.99 and g_rays["radial_elongation"] > 5
  assert g_rays["centre_top1"] < g_rays["angle_top1"]
  assert g_blobs["centre_top1"] > 0.99
  assert 0.8 < g_blobs["radial_elongation"] < 1.25
  with pytest.raises(ValueError, match=r"need \[N, 2\] features"):
    figures.feature_geometry(np.zeros((4, 3)), np.zeros(4))


def test_angular_spread_is_the_circular_standard_deviation():
  """For angles N(mu, sigma) the circular std is sigma: a spread off by a
  factor sqrt(2) passed."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 4000)
  sigma = 0.2
  ang = labels * np.pi / 2 + rng.normal(0, sigma, labels.size)
  r = rng.uniform(1, 3, labels.size)
  f = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
  g = figures.feature_geometry(f, labels)
  assert g["angular_spread_deg"] == pytest.approx(np.degrees(sigma),
                                                  rel=0.05)


def test_feature_geometry_with_labels_that_are_not_0_to_k():
  """Class ids need not be 0..K-1 (a held-out subset may lack some):
  taking the nearest centre's index for its class id passed."""
  rng = np.random.default_rng(0)
  labels = np.repeat(np.array([2, 5, 7]), 100)
  centres = {2: (5, 0), 5: (0, 5), 7: (-5, -5)}
  f = np.stack([centres[k] for k in labels]) + rng.normal(0, 0.3, (300, 2))
  g = figures.feature_geometry(f, labels)
  assert g["centre_top1"] == 1.0 and g["angle_top1"] == 1.0


@pytest.mark.parametrize("conv", [
    pytest.param("adder", marks=pytest.mark.slow), "mult"])
def test_lenet_plus_plus_features_shape(conv):
  images, labels = local.load_digits("test")
  model = lenet_plus.lenet_plus_plus(conv=conv, widths=(2, 2, 2, 2, 2, 2))
  x = figures._normalize(images[:2], "digits")  # pylint: disable=protected-access
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x,
                                         train=False))()
  assert figures.filter_layers(variables["params"]) == [
      "classifier", *(f"conv{i}" for i in range(1, 7)), "fc_features"]
  kernel_name = "adder_kernel" if conv == "adder" else "kernel"
  assert variables["params"]["classifier"][kernel_name].shape == (2, 10)
  assert ("bias" in variables["params"]["classifier"]) == (conv == "mult")
  features, logits = figures.extract_features(model, variables, images[:37],
                                              "digits", batch_size=16)
  assert features.shape == (37, 2) and logits.shape == (37, 10)
  assert np.all(np.isfinite(features))
  if conv == "adder":  # logits = -L1 distance to the classifier's centres
    centres = np.asarray(variables["params"]["classifier"]["adder_kernel"])
    expected = -np.abs(features[:, :, None] - centres[None]).sum(axis=1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="6 convolutions"):
    lenet_plus.lenet_plus_plus(widths=(2, 2)).init(jax.random.PRNGKey(0), x)


def test_features_command_errors(tmp_path, capsys):
  out = str(tmp_path / "f.png")
  for args, message in [
      (["--widths", "4,4"], "--widths must be 6 positive integers"),
      (["--widths", "a,b"], "6 comma-separated integers"),
      (["--data_dir", str(tmp_path / "none")], "does not exist"),
      (["--dataset", "digits", "--holdout_examples", "0", "--batch_size",
        "4000"], "make no batch of 4000")]:
    assert figures.main(["features", *args, "--output", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


class _BNNet(nn.Module):
  """Dense - BatchNorm: batch statistics that numpy can recompute."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(3, name="fc")(x.reshape((x.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        name="bn")(x)


def test_recalibrated_batch_stats_are_the_average_of_batch_statistics():
  """The features figure's BatchNorm statistics are the mean, over the full
  batches, of each batch's mean and variance: statistics left scaled by
  1 - momentum, or a partial last batch counted, passed."""
  images, _ = local.load_digits("train")
  images = images[:70]
  model = _BNNet()
  x = figures._normalize(images, "digits")  # pylint: disable=protected-access
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  stats = figures.recalibrate_batch_stats(model, variables, images,
                                          "digits", batch_size=16)
  w = np.asarray(variables["params"]["fc"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["fc"]["bias"], np.float64)
  h = np.asarray(x, np.float64).reshape(70, -1) @ w + b
  batches = [h[i:i + 16] for i in range(0, 64, 16)]  # the last 6 left out
  np.testing.assert_allclose(stats["bn"]["mean"],
                             np.mean([v.mean(0) for v in batches], 0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats["bn"]["var"],
                             np.mean([v.var(0) for v in batches], 0),
                             rtol=1e-4, atol=1e-5)


def test_train_feature_model_reshuffles_and_recalibrates_on_20_batches(
    monkeypatch):
  """Every epoch sees every image once, in a new order, and BatchNorm is
  re-estimated on the first 20 batches: one order for all epochs, or fewer
  batches, passed."""
  images, labels = local.load_digits("train")
  images, labels = images[:200], labels[:200]
  seen = _spy_normalize(monkeypatch)
  got = {}

  def fake_recal(model, variables, imgs, dataset, batch_size):
    del model, dataset, batch_size
    got["n"] = len(imgs)
    return variables["batch_stats"]

  monkeypatch.setattr(figures, "recalibrate_batch_stats", fake_recal)
  figures.train_feature_model("mult", (images, labels), dataset="digits",
                              widths=(2,) * 6, epochs=2, batch_size=8)
  epochs = [seen[1:26], seen[26:51]]  # seen[0]: the initialisation sample
  assert len(seen) == 51
  for batches in epochs:
    assert _rows(batches) == _rows([images])
  assert not all(np.array_equal(a, b) for a, b in zip(*epochs))
  assert got["n"] == 160


@pytest.mark.extended  # the LeNet++ model and the figure code have their own tests
@pytest.mark.slow
def test_features_command_on_digits(tmp_path, capsys):
  out = tmp_path / "features.png"
  assert figures.main([
      "features", "--dataset", "digits",  # holdout 0 by default for digits
      "--train_examples", "0", "--epochs", "2", "--batch_size", "64",
      "--widths", "2,2,4,4,8,8", "--output", str(out)]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  _check_written(result["files"])
  assert result["eval_examples"] == 359
  for conv in ("adder", "mult"):
    assert np.isfinite(result[conv]["final_train_loss"])
    assert 0.0 <= result[conv]["eval_top1"] <= 1.0


def test_plot_features_writes_small_files(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(10), 300)
  panels = []
  for conv in ("adder", "mult"):
    features = rng.normal(0, 1, (labels.size, 2)) + labels[:, None]
    panels.append({"conv": conv, "features": features, "labels": labels,
                   "top1": 0.9, "classifier": rng.normal(0, 1, (2, 10)),
                   "geometry": figures.feature_geometry(features, labels)})
  _check_written(figures.plot_features(panels, str(tmp_path / "f.png"),
                                       "synthetic"))
