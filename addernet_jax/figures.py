"""The paper's figures, reproducible: `python -m addernet_jax.figures ...`.

Four subcommands, each writing a PNG (`--output`) and an SVG next to it with
matplotlib's Agg backend, printing the numbers behind the figure, and ending
with one JSON line:

- `weights`: the weight distribution of one layer of trained models (an
  AdderNet and its CNN twin), with maximum-likelihood Laplace and Gaussian
  densities and the average log-likelihood per weight of each (the paper:
  adder filters are Laplacian-like, CNN filters Gaussian-like);
- `features`: the 2-D features of a LeNet++ trained on MNIST, AdderNet vs CNN
  (the paper: CNN features separate by angle, AdderNet features cluster
  around class centres);
- `curves`: training curves (loss, top-1 error or AdderSR's PSNR, learning
  rate) of one or several workdirs from their `metrics.jsonl`;
- `gradients`: per-layer L2 norms of the filter gradients of LeNet-5-BN,
  AdderNet vs CNN, in the first iterations (the motivation of the adaptive
  learning rate).

The computations (`fit_laplace`, `fit_gaussian`, `read_metrics`,
`layer_gradients`, `train_feature_model`, `feature_geometry`, ...) are plain
functions that tests and notebooks call without the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_DATASET_LABELS = {"mnist": "MNIST", "digits": "scikit-learn digits"}
_LOG = logging.getLogger("addernet_jax.figures")
ANN_COLOR = "tab:red"
CNN_COLOR = "tab:blue"
FIGURE_DPI = 100


class FigureError(ValueError):
  """A user error the command line reports as one `error:` line."""


# ------------------------------------------------------ distribution fits --


def _flat64(values: Any) -> np.ndarray:
  w = np.asarray(values, dtype=np.float64).ravel()
  if w.size < 2:
    raise ValueError(f"need at least 2 values to fit a distribution, got "
                     f"{w.size}")
  if not np.all(np.isfinite(w)):
    raise ValueError("the values to fit contain NaN or Inf")
  return w


def laplace_logpdf(x: Any, loc: float, scale: float) -> np.ndarray:
  """log of the Laplace density (1 / 2b) exp(-|x - loc| / b)."""
  x = np.asarray(x, np.float64)
  return -np.log(2.0 * scale) - np.abs(x - loc) / scale


def gaussian_logpdf(x: Any, loc: float, scale: float) -> np.ndarray:
  """log of the normal density with mean `loc` and standard deviation
  `scale`."""
  x = np.asarray(x, np.float64)
  return (-0.5 * np.log(2.0 * np.pi * scale * scale)
          - 0.5 * np.square((x - loc) / scale))


def fit_laplace(values: Any) -> dict[str, float]:
  """Maximum-likelihood Laplace fit: location = the median, scale = the mean
  absolute deviation from it; `loglik` is the average log-likelihood per
  value (float64)."""
  w = _flat64(values)
  loc = float(np.median(w))
  scale = float(np.mean(np.abs(w - loc)))
  if scale <= 0:
    raise ValueError("all values are equal: no Laplace fit")
  return {"loc": loc, "scale": scale,
          "loglik": float(np.mean(laplace_logpdf(w, loc, scale)))}


def fit_gaussian(values: Any) -> dict[str, float]:
  """Maximum-likelihood Gaussian fit: the mean and the (biased, 1/n)
  standard deviation; `loglik` as for `fit_laplace`."""
  w = _flat64(values)
  loc = float(np.mean(w))
  scale = float(np.std(w))
  if scale <= 0:
    raise ValueError("all values are equal: no Gaussian fit")
  return {"loc": loc, "scale": scale,
          "loglik": float(np.mean(gaussian_logpdf(w, loc, scale)))}


def weight_fits(values: Any) -> dict[str, Any]:
  """Both fits of the flattened `values` and which family fits better."""
  laplace, gaussian = fit_laplace(values), fit_gaussian(values)
  return {"num_weights": int(np.size(values)), "laplace": laplace,
          "gaussian": gaussian,
          "better": ("laplace" if laplace["loglik"] > gaussian["loglik"]
                     else "gaussian"),
          "loglik_difference": laplace["loglik"] - gaussian["loglik"]}


# ------------------------------------------------------------ checkpoints --


def _check_dir(path: str | os.PathLike[str], what: str) -> Path:
  p = Path(path).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
  if not p.is_dir():
    raise NotADirectoryError(f"{what} {str(path)!r} is not a directory")
  return p


def checkpoint_meta(workdir: str | os.PathLike[str]) -> dict[str, Any]:
  """The JSON meta (model, conv, dataset, step, epoch, ...) that training
  saved with the newest checkpoint of `workdir`."""
  from addernet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  root = _check_dir(workdir, "workdir")
  directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
  steps = sorted((int(p.name) for p in directory.iterdir()
                  if p.name.isdigit()), reverse=True)
  for step in steps:
    meta_dir = directory / str(step) / ckpt_lib.META
    for candidate in sorted(meta_dir.glob("*")) if meta_dir.is_dir() else []:
      try:
        meta = json.loads(candidate.read_text(encoding="utf-8"))
      except (OSError, ValueError):
        continue
      if isinstance(meta, dict) and "model" in meta:
        return meta
  raise FileNotFoundError(f"no training checkpoint with its meta in "
                          f"{str(workdir)!r} (a workdir of train.py has "
                          "checkpoints/<step>/meta)")


def _config_from_meta(meta: dict[str, Any]):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  info = data_lib.dataset_info(meta["dataset"])
  return ml_collections.ConfigDict({
      "model": meta["model"], "conv": meta["conv"],
      "dataset": meta["dataset"], "num_classes": info.num_classes,
      "dtype": "float32", "implementation": None})


def _layer_kernel(params: dict[str, Any], layer: str) -> np.ndarray:
  node: Any = params
  for part in layer.split("/"):
    if not isinstance(node, dict) or part not in node:
      raise KeyError(f"no layer {layer!r}; layers with filters: "
                     f"{', '.join(filter_layers(params))}")
    node = node[part]
  for name in ("adder_kernel", "kernel"):
    if isinstance(node, dict) and name in node:
      return np.asarray(node[name])
  raise KeyError(f"layer {layer!r} has no filters; layers with filters: "
                 f"{', '.join(filter_layers(params))}")


def filter_layers(params: Any) -> list[str]:
  """Paths ("conv1", "layer1_0/conv2", ...) of every layer with a `kernel`
  or `adder_kernel` parameter, in JAX's (sorted) pytree order."""
  import jax  # pylint: disable=g-import-not-at-top
  names = []
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys and keys[-1] in ("kernel", "adder_kernel"):
      names.append("/".join(keys[:-1]))
  return names


def load_layer_weights(workdir: str | os.PathLike[str], layer: str,
                       which: str = "latest") -> dict[str, Any]:
  """One layer's filters from a training workdir (read-only).

  Returns:
    {"weights": float32 array, "conv", "model", "dataset", "step", "epoch",
     "workdir"}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  meta = checkpoint_meta(workdir)
  if meta.get("task") == "sr" or "dataset" not in meta:
    raise FigureError(f"{str(workdir)!r} is not a classification run (an "
                      f"AdderSR workdir?): `weights` reads the filters of "
                      f"classification checkpoints")
  config = _config_from_meta(meta)
  restored = train_lib.restore_variables(config, workdir, which)
  params = jax.device_get(restored["params"])
  step = int(jax.device_get(restored["step"]))
  per_epoch = meta.get("steps_per_epoch")
  return {"weights": _layer_kernel(params, layer), "conv": meta["conv"],
          "model": meta["model"], "dataset": meta["dataset"], "step": step,
          "epoch": round(step / per_epoch, 2) if per_epoch else None,
          "workdir": str(workdir)}


def load_torch_layer_weights(path: str | os.PathLike[str], model_name: str,
                             layer: str) -> dict[str, Any]:
  """One layer's filters from an official-layout PyTorch checkpoint (e.g.
  the released ResNet-20 AdderNet), through `addernet_jax.convert`."""
  from addernet_jax import convert  # pylint: disable=g-import-not-at-top
  variables = convert.load_torch_checkpoint(path, model_name)
  kwargs = convert.infer_model_kwargs(variables)
  return {"weights": _layer_kernel(variables["params"], layer),
          "conv": kwargs["conv"], "model": model_name, "dataset": None,
          "step": None, "epoch": None, "workdir": str(path),
          "source": Path(path).name}


# ---------------------------------------------------------------- plotting --


def _figure(width: float, height: float):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg", force=False)
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=FIGURE_DPI,
                layout="constrained")


def check_output(output: str | os.PathLike[str]) -> Path:
  """`output` (with ~ expanded) if the PNG and the SVG next to it can be
  written there; a `FigureError` otherwise (each command checks before its
  work)."""
  png = Path(output).expanduser()
  if png.suffix.lower() != ".png":
    raise FigureError(f"--output must end in .png, got {str(output)!r}")
  for path in (png, png.with_suffix(".svg")):
    if path.is_dir():
      raise FigureError(f"--output {str(output)!r}: {str(path)!r} is a "
                        f"directory")
  from addernet_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  blocker = ckpt_lib.file_in_the_way(png)
  if blocker is not None:
    raise FigureError(f"--output {str(output)!r}: {str(blocker)!r} is a "
                      f"file, not a directory")
  return png


def save_figure(fig, output: str | os.PathLike[str]) -> list[str]:
  """Writes `output` (PNG) and the SVG next to it; returns both paths."""
  png = check_output(output)
  png.parent.mkdir(parents=True, exist_ok=True)
  svg = png.with_suffix(".svg")
  fig.savefig(png, dpi=FIGURE_DPI)
  # A 256-colour palette makes the PNGs 3-4x smaller with no visible change
  # (a plot has few colours; scatter transparency adds a few hundred).
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(png) as image:
    rgb = image.convert("RGB")
  rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
               dither=Image.Dither.NONE).save(png, optimize=True)
  fig.savefig(svg, metadata={"Date": None})
  return [str(png), str(svg)]


def _conv_label(conv: str) -> str:
  return {"adder": "AdderNet", "mult": "CNN"}.get(conv, conv)


def _conv_color(conv: str, index: int) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  if conv == "adder":
    return ANN_COLOR
  if conv == "mult":
    return CNN_COLOR
  return matplotlib.colormaps["tab10"](index % 10)


def plot_weights(panels: Sequence[dict[str, Any]], layer: str, output: str
                 ) -> list[str]:
  """Histograms (linear and log density) of each panel's weights with both
  fitted densities; `panels` are `load_layer_weights` results plus
  `weight_fits` under "fits"."""
  n = len(panels)
  fig = _figure(4.2 * n, 6.2)
  axes = fig.subplots(2, n, squeeze=False)
  for col, panel in enumerate(panels):
    w = np.asarray(panel["weights"], np.float64).ravel()
    fits = panel["fits"]
    lo, hi = np.percentile(w, [0.1, 99.9])
    pad = 0.15 * (hi - lo)
    xs = np.linspace(lo - pad, hi + pad, 400)
    lap, gau = fits["laplace"], fits["gaussian"]
    epoch = panel.get("epoch")
    title = (f"{_conv_label(panel['conv'])} {panel['model']} {layer}"
             + (f", epoch {epoch:g}" if epoch is not None else "")
             + (f"\n{panel['source']}" if panel.get("source") else ""))
    for row, log in enumerate((False, True)):
      ax = axes[row][col]
      ax.hist(w, bins=80, range=(lo - pad, hi + pad), density=True,
              color="0.75", edgecolor="none", label=f"{w.size:,} weights")
      ax.plot(xs, np.exp(laplace_logpdf(xs, lap["loc"], lap["scale"])),
              color="tab:red",
              label=f"Laplace: {lap['loglik']:.3f} nats/weight")
      ax.plot(xs, np.exp(gaussian_logpdf(xs, gau["loc"], gau["scale"])),
              color="tab:blue", linestyle="--",
              label=f"Gaussian: {gau['loglik']:.3f} nats/weight")
      if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.5 / (w.size * (hi - lo + 2 * pad) / 80))
        ax.set_xlabel("weight")
      else:
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="upper left", frameon=False)
      ax.set_ylabel("density (log)" if log else "density")
      ax.tick_params(labelsize=8)
  return save_figure(fig, output)


def read_metrics(workdir: str | os.PathLike[str]
                 ) -> dict[str, list[dict[str, float]]]:
  """`{"train": [...], "eval": [...]}` from `<workdir>/metrics.jsonl`.

  Training lines have `train_loss`, evaluation lines `eval_top1` (AdderSR:
  `eval_psnr`); each kind
  is sorted by step and keeps the last line of a step (a resumed run repeats
  the steps after its checkpoint). A `resumed_from_step` line drops the lines
  before it past that step: the interrupted run's steps after its last
  checkpoint, which the resumed run may not log again. Values are floats
  ("nan" strings become NaN); a line that is not UTF-8 or not JSON (a run
  killed mid-write, a damaged file) is skipped with a warning naming the
  file and the line.
  """
  root = _check_dir(workdir, "workdir")
  path = root / "metrics.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{str(path)!r} does not exist (train.py writes "
                            "it into its --workdir)")
  kinds: dict[str, dict[int, dict[str, float]]] = {"train": {}, "eval": {}}
  for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
    try:
      # A file saved by some editors starts with a byte-order mark.
      line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError as e:
      _LOG.warning("%s line %d is not UTF-8 text (byte 0x%02x at column %d);"
                   " skipping it", path, number, raw[e.start], e.start + 1)
      continue
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except ValueError:
      _LOG.warning("%s line %d is not valid JSON (a run killed mid-write "
                   "leaves half a line); skipping it", path, number)
      continue
    if not isinstance(record, dict) or "step" not in record:
      continue
    if isinstance(record.get("resumed_from_step"), int):
      resumed = record["resumed_from_step"]
      for steps in kinds.values():
        for stale in [s for s in steps if s > resumed]:
          del steps[stale]
      continue
    values = {}
    for key, value in record.items():
      try:
        values[key] = float(value)
      except (TypeError, ValueError):
        continue
    kind = ("train" if "train_loss" in values else
            "eval" if "eval_top1" in values or "eval_psnr" in values
            else None)
    if kind is not None:
      kinds[kind][int(values["step"])] = values
  if not kinds["train"] and not kinds["eval"]:
    raise FigureError(f"{str(path)!r} has no training or evaluation lines")
  return {k: [v[s] for s in sorted(v)] for k, v in kinds.items()}


def _epochs(records: list[dict[str, float]]) -> np.ndarray:
  """The records' epochs (their steps where a record has no epoch)."""
  if all("epoch" in r for r in records):
    return np.array([r["epoch"] for r in records])
  return np.array([r["step"] for r in records], np.float64)


def is_sr_run(metrics: dict[str, list[dict[str, float]]]) -> bool:
  """True for an AdderSR run's metrics (its evaluations are PSNR/SSIM)."""
  return any("eval_psnr" in r for r in metrics["eval"])


def curve_summary(metrics: dict[str, list[dict[str, float]]]
                  ) -> dict[str, Any]:
  """The last epoch and the last and best evaluation accuracies (AdderSR:
  PSNR and SSIM)."""
  train, evals = metrics["train"], metrics["eval"]
  last = (train[-1] if train else evals[-1])
  out: dict[str, Any] = {"last_step": int(last["step"]),
                         "last_epoch": last.get("epoch")}
  if evals and is_sr_run(metrics):
    psnr = [e for e in evals if "eval_psnr" in e]
    out["last_eval_psnr"] = psnr[-1]["eval_psnr"]
    out["best_eval_psnr"] = max(e["eval_psnr"] for e in psnr)
    out["last_eval_ssim"] = psnr[-1].get("eval_ssim")
    out["eval_bicubic_psnr"] = psnr[-1].get("eval_bicubic_psnr")
  elif evals:
    out["last_eval_top1"] = evals[-1].get("eval_top1")
    out["best_eval_top1"] = max(e["eval_top1"] for e in evals)
    recal = [e["eval_top1_recalibrated"] for e in evals
             if "eval_top1_recalibrated" in e]
    if recal:
      out["last_eval_top1_recalibrated"] = recal[-1]
      out["best_eval_top1_recalibrated"] = max(recal)
  if train:
    out["last_train_loss"] = train[-1].get("train_loss")
  return out


def plot_curves(runs: Sequence[dict[str, Any]], output: str) -> list[str]:
  """Loss, top-1 error (log scale) and learning rate against the epoch;
  each run has "label", "metrics" (`read_metrics`) and optionally "conv".
  AdderSR runs: L1 loss and evaluation PSNR (with bicubic's) instead; the
  runs of one figure are all of one kind (`FigureError` otherwise)."""
  kinds = {is_sr_run(run["metrics"]) for run in runs}
  if len(kinds) > 1:
    raise FigureError("curves draws runs of one kind: give either "
                      "classification or super-resolution workdirs")
  if kinds == {True}:
    return _plot_sr_curves(runs, output)
  fig = _figure(13, 3.8)
  ax_loss, ax_err, ax_lr = fig.subplots(1, 3)
  for i, (run, color) in enumerate(zip(runs, _run_colors(runs))):
    label = run["label"]
    train, evals = run["metrics"]["train"], run["metrics"]["eval"]
    if train:
      _plot_training(ax_loss, ax_lr, train, color, label, i)
      if all("train_top1" in r for r in train):
        ax_err.plot(_epochs(train),
                    [100 * (1 - r["train_top1"]) for r in train],
                    color=color, lw=1, alpha=0.8, label=f"{label} train")
    if evals:
      ep = _epochs(evals)
      if all("eval_loss" in r for r in evals):
        ax_loss.plot(ep, [r["eval_loss"] for r in evals], color=color,
                     lw=1.8, ls="--", marker="o", ms=2.5,
                     label=f"{label} eval")
      ax_err.plot(ep, [100 * (1 - r["eval_top1"]) for r in evals],
                  color=color, lw=1.8, ls="--", marker="o", ms=2.5,
                  label=f"{label} eval")
      recal = [r for r in evals if "eval_top1_recalibrated" in r]
      if recal:
        ax_err.plot(_epochs(recal),
                    [100 * (1 - r["eval_top1_recalibrated"]) for r in recal],
                    color=color, lw=1.2, ls=":", marker="s", ms=2,
                    label=f"{label} eval, BN recalibrated")
  ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log",
              title="loss")
  ax_err.set(xlabel="epoch", ylabel="top-1 error (%)", yscale="log",
             title="top-1 error (100 - accuracy)")
  ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
  _finish_axes(ax_loss, ax_err, ax_lr)
  return save_figure(fig, output)


def _plot_sr_curves(runs: Sequence[dict[str, Any]], output: str
                    ) -> list[str]:
  """`plot_curves` for AdderSR runs: training L1 loss, evaluation PSNR (and
  bicubic interpolation's, dotted) and the learning rate."""
  fig = _figure(13, 3.8)
  ax_loss, ax_psnr, ax_lr = fig.subplots(1, 3)
  for i, (run, color) in enumerate(zip(runs, _run_colors(runs))):
    label = run["label"]
    train, evals = run["metrics"]["train"], run["metrics"]["eval"]
    if train:
      _plot_training(ax_loss, ax_lr, train, color, label, i)
    psnr = [r for r in evals if "eval_psnr" in r]
    if psnr:
      ax_psnr.plot(_epochs(psnr), [r["eval_psnr"] for r in psnr],
                   color=color, lw=1.8, ls="--", marker="o", ms=2.5,
                   label=f"{label} eval")
      bicubic = [r for r in psnr if "eval_bicubic_psnr" in r]
      if bicubic:
        ax_psnr.plot(_epochs(bicubic),
                     [r["eval_bicubic_psnr"] for r in bicubic], color=color,
                     lw=1, ls=":", label=f"{label} bicubic")
  ax_loss.set(xlabel="epoch", ylabel="L1 loss", yscale="log", title="loss")
  ax_psnr.set(xlabel="epoch", ylabel="PSNR (dB)", title="evaluation PSNR")
  ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
  _finish_axes(ax_loss, ax_psnr, ax_lr)
  return save_figure(fig, output)


def _run_colors(runs: Sequence[dict[str, Any]]) -> list[str]:
  """One colour per run: AdderNet's and CNN's when the runs are one of each
  (or one run), else a cycle."""
  convs = [run.get("conv") for run in runs]
  by_conv = all(c in ("adder", "mult") and convs.count(c) == 1 for c in convs)
  return [_conv_color(run["conv"] if by_conv else "", i)
          for i, run in enumerate(runs)]


def _plot_training(ax_loss: Any, ax_lr: Any, train: list[dict[str, float]],
                   color: str, label: str, index: int) -> None:
  """A run's training loss and, where logged, its learning rate."""
  ep = _epochs(train)
  ax_loss.plot(ep, [r["train_loss"] for r in train], color=color, lw=1,
               alpha=0.8, label=f"{label} train")
  if all("lr" in r for r in train):
    # Runs often share a schedule: the later ones drawn thinner on top. A
    # logged lr is the rate of the steps since the previous line, so it
    # holds up to its point ("steps-pre"), and a per-epoch schedule shows as
    # steps.
    ax_lr.plot(ep, [r["lr"] for r in train], color=color,
               lw=max(1.2, 3.5 - 1.5 * index), label=label,
               drawstyle="steps-pre")


def _finish_axes(*axes: Any) -> None:
  """Grid, small ticks and a legend where something is labelled."""
  for ax in axes:
    ax.grid(True, which="both", alpha=0.25)
    ax.tick_params(labelsize=8)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, frameon=False)


# -------------------------------------------------------- gradient norms --


def _normalize(images: np.ndarray, dataset: str) -> np.ndarray:
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  info = data_lib.dataset_info(dataset)
  mean = np.asarray(info.mean, np.float32)
  std = np.asarray(info.std, np.float32)
  return (np.asarray(images, np.float32) / 255.0 - mean) / std


def layer_gradients(model: Any, variables: dict[str, Any], images: Any,
                    labels: Any) -> tuple[dict[str, Any], float]:
  """Gradients of the mean cross-entropy (training mode: batch statistics)
  with respect to every layer's filters, as the training step computes them
  (adder layers: the official backward of `addernet_jax.ops`, raw, before
  the adaptive learning rate).

  Returns:
    ({layer path: gradient array}, the loss); jit-compatible.
  """
  import jax  # pylint: disable=g-import-not-at-top
  (loss, _), grads = jax.value_and_grad(_training_loss, has_aux=True)(
      variables["params"], model, variables.get("batch_stats", {}), images,
      labels)
  return filter_gradients(grads), loss


def _training_loss(params: Any, model: Any, batch_stats: Any, images: Any,
                   labels: Any) -> tuple[Any, Any]:
  """(mean cross-entropy in training mode, new batch_stats)."""
  from addernet_jax import train_lib  # pylint: disable=g-import-not-at-top
  out, updates = model.apply({"params": params, "batch_stats": batch_stats},
                             images, train=True, mutable=["batch_stats"])
  logits = out[0] if isinstance(out, tuple) else out
  return (train_lib.cross_entropy_loss(logits, labels),
          updates["batch_stats"])


def filter_gradients(grads: Any) -> dict[str, Any]:
  """{layer path: gradient} of the `kernel` and `adder_kernel` leaves of a
  gradient pytree, in `filter_layers` order."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys and keys[-1] in ("kernel", "adder_kernel"):
      out["/".join(keys[:-1])] = leaf
  return out


def l2_norms(grads: dict[str, Any]) -> dict[str, float]:
  """{layer: L2 norm} in float64."""
  return {k: float(np.linalg.norm(np.asarray(v, np.float64).ravel()))
          for k, v in grads.items()}


def gradient_norm_trace(conv: str, images: np.ndarray, labels: np.ndarray, *,
                        dataset: str, model_name: str = "lenet5_bn",
                        steps: int = 1, batch_size: int = 256, seed: int = 0,
                        learning_rate: float = 0.1) -> dict[str, Any]:
  """Per-layer gradient norms at the first `steps` iterations of training
  (the official optimiser, one batch per step, no augmentation); step 1 is
  the initialisation.

  Returns:
    {"layers": [...], "norms": [[norm per layer] per step], "losses": [...]}
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from addernet_jax import models, optim  # pylint: disable=g-import-not-at-top
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  info = data_lib.dataset_info(dataset)
  if steps < 1 or batch_size < 2:
    raise FigureError("--steps must be >= 1 and --batch_size >= 2")
  if len(labels) < batch_size:
    raise FigureError(f"{len(labels)} images, fewer than --batch_size "
                      f"{batch_size}")
  model = models.get_model(model_name, num_classes=info.num_classes,
                           conv=conv)
  x0 = _normalize(images[:1], dataset)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), x0,
                                         train=False))()
  steps_per_epoch = len(labels) // batch_size
  tx = optim.make_optimizer(
      {"learning_rate": learning_rate, "momentum": 0.9, "weight_decay": 5e-4,
       "eta": 0.2, "num_epochs": max(1, math.ceil(steps / steps_per_epoch))},
      variables["params"], steps_per_epoch=steps_per_epoch)
  opt_state = tx.init(variables["params"])

  @jax.jit
  def step_fn(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(
        _training_loss, has_aux=True)(params, model, batch_stats, x, y)
    upd, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, upd), batch_stats, opt_state, loss,
            filter_gradients(grads))

  order = np.random.default_rng(seed).permutation(len(labels))
  params, batch_stats = variables["params"], variables["batch_stats"]
  names = None
  trace, losses = [], []
  for s in range(steps):
    idx = order[(s % steps_per_epoch) * batch_size:
                (s % steps_per_epoch + 1) * batch_size]
    x = _normalize(images[idx], dataset)
    y = np.asarray(labels[idx], np.int32)
    params, batch_stats, opt_state, loss, grads = step_fn(
        params, batch_stats, opt_state, x, y)
    norms = l2_norms(grads)
    names = names or list(norms)
    trace.append([norms[n] for n in names])
    losses.append(float(loss))
  return {"conv": conv, "layers": names, "norms": trace, "losses": losses}


def plot_gradients(traces: Sequence[dict[str, Any]], output: str,
                   title: str) -> list[str]:
  """Grouped bars (log scale): per layer, the mean norm over the steps of
  each trace, with the range over the steps as error bars."""
  fig = _figure(7.5, 4.2)
  ax = fig.subplots()
  layers = traces[0]["layers"]
  width = 0.8 / len(traces)
  x = np.arange(len(layers))
  for i, trace in enumerate(traces):
    norms = np.asarray(trace["norms"])
    mean = norms.mean(axis=0)
    err = np.stack([mean - norms.min(axis=0), norms.max(axis=0) - mean])
    pos = x + (i - (len(traces) - 1) / 2) * width
    bars = ax.bar(pos, mean, width, color=_conv_color(trace["conv"], i),
                  label=_conv_label(trace["conv"]),
                  yerr=err if len(norms) > 1 else None, capsize=3)
    for bar, value, top in zip(bars, mean, norms.max(axis=0)):
      ax.annotate(f"{value:.2g}", (bar.get_x() + bar.get_width() / 2, top),
                  xytext=(0, 3), textcoords="offset points", ha="center",
                  va="bottom", fontsize=7)
  ax.set_xticks(x, layers)
  ax.set_yscale("log")
  top = max(float(np.max(t["norms"])) for t in traces)
  ax.set_ylim(top=top * 12)  # room for the legend above the bars
  ax.set_ylabel("L2 norm of the filter gradient")
  ax.set_title(title, fontsize=10)
  ax.legend(frameon=False, loc="upper center", ncol=len(traces))
  ax.grid(True, axis="y", which="both", alpha=0.25)
  return save_figure(fig, output)


# --------------------------------------------------------------- features --


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield slice(start, min(n, start + batch_size))


def train_feature_model(conv: str, train: tuple[np.ndarray, np.ndarray], *,
                        dataset: str, widths: Sequence[int],
                        epochs: int = 3, batch_size: int = 128,
                        learning_rate: float = 0.1, seed: int = 0,
                        log: Any = None) -> dict[str, Any]:
  """Trains `models.lenet_plus.lenet_plus_plus(conv=conv, widths=widths)`
  with the official optimiser (adaptive learning rate on the adder filters,
  momentum 0.9, weight decay 5e-4, the per-epoch cosine over `epochs`),
  without augmentation, then re-estimates the BatchNorm statistics on up to
  20 training batches.

  Returns:
    {"model", "variables", "losses" (per step), "seconds"}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from addernet_jax import data as data_lib, optim  # pylint: disable=g-import-not-at-top
  from addernet_jax.models import lenet_plus  # pylint: disable=g-import-not-at-top
  info = data_lib.dataset_info(dataset)
  images, labels = train
  if batch_size < 2 or epochs < 1:
    raise FigureError("--batch_size must be >= 2 and --epochs >= 1")
  steps_per_epoch = len(labels) // batch_size
  if steps_per_epoch < 1 or epochs < 1:
    raise FigureError(f"{len(labels)} training images make no batch of "
                      f"{batch_size}")
  model = lenet_plus.lenet_plus_plus(num_classes=info.num_classes, conv=conv,
                                     widths=widths)
  x0 = _normalize(images[:1], dataset)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(seed), x0,
                                         train=False))()
  tx = optim.make_optimizer(
      {"learning_rate": learning_rate, "momentum": 0.9, "weight_decay": 5e-4,
       "eta": 0.2, "num_epochs": epochs}, variables["params"],
      steps_per_epoch=steps_per_epoch)

  @jax.jit
  def step_fn(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(
        _training_loss, has_aux=True)(params, model, batch_stats, x, y)
    upd, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, upd), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  start = time.perf_counter()
  for epoch in range(epochs):
    order = np.random.default_rng([seed, epoch]).permutation(len(labels))
    for s in range(steps_per_epoch):
      idx = order[s * batch_size:(s + 1) * batch_size]
      params, batch_stats, opt_state, loss = step_fn(
          params, batch_stats, opt_state, _normalize(images[idx], dataset),
          np.asarray(labels[idx], np.int32))
      losses.append(loss)
    losses[-steps_per_epoch:] = [float(v) for v in
                                 jax.device_get(losses[-steps_per_epoch:])]
    if not all(math.isfinite(v) for v in losses[-steps_per_epoch:]):
      raise FloatingPointError(f"{conv}: the training loss is not finite "
                               f"in epoch {epoch + 1}")
    if log is not None:
      log(f"{_conv_label(conv)}: epoch {epoch + 1}/{epochs}, mean training "
          f"loss {np.mean(losses[-steps_per_epoch:]):.4f} "
          f"({time.perf_counter() - start:.0f} s)")
  variables = {"params": params, "batch_stats": recalibrate_batch_stats(
      model, {"params": params, "batch_stats": batch_stats},
      images[:min(len(labels), 20 * batch_size)], dataset, batch_size)}
  return {"model": model, "variables": variables, "losses": losses,
          "seconds": time.perf_counter() - start}


def recalibrate_batch_stats(model: Any, variables: dict[str, Any],
                            images: np.ndarray, dataset: str,
                            batch_size: int) -> Any:
  """BatchNorm statistics re-estimated as the average of the batch
  statistics of `images` in batches (the running averages lag behind an
  AdderNet's fast-moving outputs; docs/design.md, numerics).

  Training mode from zero statistics returns (1 - momentum) times the batch
  statistics; the models' BatchNorm momentum is 0.9.
  """
  import jax  # pylint: disable=g-import-not-at-top
  momentum = 0.9
  zeros = jax.tree.map(np.zeros_like, variables["batch_stats"])

  @jax.jit
  def stats(x):
    _, updates = model.apply({"params": variables["params"],
                              "batch_stats": zeros}, x, train=True,
                             mutable=["batch_stats"])
    return updates["batch_stats"]

  total, count = None, 0
  for sl in _batches(len(images) - len(images) % batch_size or len(images),
                     batch_size):
    s = stats(_normalize(images[sl], dataset))
    total = s if total is None else jax.tree.map(np.add, total, s)
    count += 1
  return jax.tree.map(lambda t: np.asarray(t) / (count * (1 - momentum)),
                      total)


def extract_features(model: Any, variables: dict[str, Any],
                     images: np.ndarray, dataset: str,
                     batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, feature_dim], logits [N, classes]) in inference mode."""
  import jax  # pylint: disable=g-import-not-at-top
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  feats, logits = [], []
  for sl in _batches(len(images), batch_size):
    lo, fe = apply(_normalize(images[sl], dataset))
    feats.append(np.asarray(fe))
    logits.append(np.asarray(lo))
  return np.concatenate(feats), np.concatenate(logits)


def feature_geometry(features: np.ndarray, labels: np.ndarray
                     ) -> dict[str, float]:
  """How the classes of 2-D features separate, by angle or by centre.

  - `angle_top1`: accuracy of the nearest class by angle alone (cosine
    similarity to each class's mean direction from the origin);
  - `centre_top1`: accuracy of the nearest class centre (Euclidean);
  - `radial_elongation`: median over classes of std(radial) / std(tangential)
    of a class's features, radial meaning along its mean direction from the
    origin: CNN features stretched along rays from the origin give values
    well above 1, round clusters about 1;
  - `angular_spread_deg`: median over classes of the circular standard
    deviation of the feature angles, in degrees.
  """
  f = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if f.ndim != 2 or f.shape[1] != 2 or len(f) != len(y):
    raise ValueError(f"need [N, 2] features and N labels, got {f.shape} and "
                     f"{y.shape}")
  classes = np.unique(y)
  centres = np.stack([f[y == k].mean(axis=0) for k in classes])
  dirs = centres / np.maximum(np.linalg.norm(centres, axis=1,
                                             keepdims=True), 1e-12)
  unit = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
  angle_pred = classes[np.argmax(unit @ dirs.T, axis=1)]
  dist = np.linalg.norm(f[:, None, :] - centres[None], axis=-1)
  centre_pred = classes[np.argmin(dist, axis=1)]
  elong, spread = [], []
  for k, d in zip(classes, dirs):
    fk = f[y == k]
    if len(fk) < 3:
      continue
    radial = fk @ d
    tangential = fk @ np.array([-d[1], d[0]])
    elong.append(np.std(radial) / max(np.std(tangential), 1e-12))
    angles = np.arctan2(fk[:, 1], fk[:, 0])
    r = np.abs(np.mean(np.exp(1j * angles)))
    spread.append(np.degrees(np.sqrt(-2 * np.log(max(r, 1e-12)))))
  return {"angle_top1": float(np.mean(angle_pred == y)),
          "centre_top1": float(np.mean(centre_pred == y)),
          "radial_elongation": float(np.median(elong)),
          "angular_spread_deg": float(np.median(spread))}


def plot_features(panels: Sequence[dict[str, Any]], output: str,
                  caption: str) -> list[str]:
  """Scatter of each panel's 2-D features coloured by class; an AdderNet
  panel also marks its classifier's class centres (the adder classifier's
  filters), a CNN panel its classifier's weight directions."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  from matplotlib import patheffects  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["tab10"]
  fig = _figure(5.2 * len(panels), 5.4)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, panel in zip(axes, panels):
    f, y = panel["features"], panel["labels"]
    ax.scatter(f[:, 0], f[:, 1], c=[cmap(int(k) % 10) for k in y], s=3,
               alpha=0.6, linewidths=0, rasterized=True)
    kernel = panel.get("classifier")
    if kernel is not None and panel["conv"] == "adder":
      for k in range(kernel.shape[1]):
        ax.scatter(kernel[0, k], kernel[1, k], marker="X", s=90,
                   color=cmap(k % 10), edgecolors="black", linewidths=0.8)
    elif kernel is not None:
      reach = np.abs(f).max() * 1.05
      for k in range(kernel.shape[1]):
        d = kernel[:, k] / max(np.linalg.norm(kernel[:, k]), 1e-12)
        ax.plot([0, reach * d[0]], [0, reach * d[1]], color=cmap(k % 10),
                lw=1, alpha=0.9)
    outline = [patheffects.withStroke(linewidth=2.5, foreground="white")]
    for k in np.unique(y):
      c = np.median(f[y == k], axis=0)
      ax.annotate(str(int(k)), c, xytext=(7, 7), textcoords="offset points",
                  fontsize=11, fontweight="bold", ha="center", va="center",
                  color="black", path_effects=outline)
    g = panel["geometry"]
    ax.set_title(f"{_conv_label(panel['conv'])}: held-out top-1 "
                 f"{100 * panel['top1']:.1f}%\nnearest centre "
                 f"{100 * g['centre_top1']:.1f}%, by angle alone "
                 f"{100 * g['angle_top1']:.1f}%, radial/tangential "
                 f"{g['radial_elongation']:.1f}", fontsize=9)
    ax.axhline(0, color="0.8", lw=0.6, zorder=0)
    ax.axvline(0, color="0.8", lw=0.6, zorder=0)
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=8)
  fig.suptitle(caption, fontsize=9)
  return save_figure(fig, output)


# ------------------------------------------------------------ command line --


def _print(*args: Any) -> None:
  print(*args, flush=True)


def _parse_widths(text: str) -> tuple[int, ...]:
  try:
    widths = tuple(int(v) for v in text.split(","))
  except ValueError:
    raise FigureError(f"--widths must be 6 comma-separated integers, got "
                      f"{text!r}") from None
  if len(widths) != 6 or min(widths) < 1:
    raise FigureError(f"--widths must be 6 positive integers, got {text!r}")
  return widths


def _check_numbers(args: argparse.Namespace,
                   minimums: dict[str, float]) -> None:
  """A `FigureError` naming the first flag of `minimums` below its minimum
  (or not finite); flags left at None are not checked."""
  for name, minimum in minimums.items():
    value = getattr(args, name)
    if value is not None and not (math.isfinite(value) and value >= minimum):
      raise FigureError(f"--{name} must be >= {minimum:g}, got {value}")


def _load_data(dataset: str, data_dir: str | None, holdout: int,
               with_eval: bool = True):
  """(info, (train images, labels), evaluation pair or None): with
  `with_eval=False` only the training split is read (no test files needed)
  and its last `holdout` examples are still left out."""
  from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  if dataset != "digits":
    if not data_dir:
      raise FigureError(f"--data_dir is required for {dataset}")
    _check_dir(data_dir, "--data_dir")
  info = data_lib.dataset_info(dataset)
  if with_eval:
    train, evaluation = data_lib.load_in_memory_splits(
        dataset, data_dir, holdout_examples=holdout)
    return info, train, evaluation
  images, labels = data_lib.load_arrays(dataset, data_dir, "train")
  if holdout >= len(labels):
    raise FigureError(f"--holdout_examples {holdout} must be smaller than "
                      f"the {len(labels)} training examples")
  end = len(labels) - holdout
  return info, (images[:end], labels[:end]), None


def cmd_weights(args: argparse.Namespace) -> dict[str, Any]:
  check_output(args.output)
  if not args.workdirs and not args.torch_checkpoints:
    raise FigureError("give --workdirs and/or --torch_checkpoints")
  sources = ([("workdir", w) for w in args.workdirs or []] +
             [("torch", t) for t in args.torch_checkpoints or []])
  panels = []
  for kind, workdir in sources:
    panel = (load_layer_weights(workdir, args.layer, args.which)
             if kind == "workdir" else
             load_torch_layer_weights(workdir, args.torch_model, args.layer))
    panel["fits"] = weight_fits(panel["weights"])
    panels.append(panel)
    fl, fg = panel["fits"]["laplace"], panel["fits"]["gaussian"]
    where = (f"step {panel['step']} (epoch {panel['epoch']})"
             if panel["step"] is not None else "PyTorch checkpoint")
    _print(f"{workdir}: {_conv_label(panel['conv'])} {panel['model']} "
           f"{args.layer}, {where}, "
           f"{panel['fits']['num_weights']} weights: average log-likelihood "
           f"per weight Laplace {fl['loglik']:.4f} (median {fl['loc']:.4g}, "
           f"scale {fl['scale']:.4g}), Gaussian {fg['loglik']:.4f} (mean "
           f"{fg['loc']:.4g}, std {fg['scale']:.4g}): "
           f"{panel['fits']['better']} fits better")
  files = plot_weights(panels, args.layer, args.output)
  return {"files": files, "layer": args.layer, "panels": [
      {k: p[k] for k in ("workdir", "conv", "model", "step", "epoch",
                         "fits")} for p in panels]}


def cmd_curves(args: argparse.Namespace) -> dict[str, Any]:
  check_output(args.output)
  labels = args.labels or [Path(w).expanduser().resolve().name or str(w)
                           for w in args.workdirs]
  if len(labels) != len(args.workdirs):
    raise FigureError(f"--labels has {len(labels)} names for "
                      f"{len(args.workdirs)} workdirs")
  seen: dict[str, str] = {}
  for workdir, label in zip(args.workdirs, labels):
    if label in seen:
      how = "in --labels" if args.labels else "their folder name"
      raise FigureError(
          f"workdirs {seen[label]!r} and {workdir!r} would have the same "
          f"label {label!r} ({how}); give one distinct name per workdir with "
          f"--labels")
    seen[label] = workdir
  runs = []
  for workdir, label in zip(args.workdirs, labels):
    metrics = read_metrics(workdir)
    try:
      conv = checkpoint_meta(workdir).get("conv")
    except (FileNotFoundError, NotADirectoryError):
      conv = None
    runs.append({"label": label, "metrics": metrics, "conv": conv,
                 "summary": curve_summary(metrics)})
  # Every workdir is read before anything is printed: a wrong path among them
  # ends in one error line, not after the summaries of the others.
  for workdir, run in zip(args.workdirs, runs):
    _print(f"{run['label']} ({workdir}): {json.dumps(run['summary'])}")
  files = plot_curves(runs, args.output)
  return {"files": files, "runs": {r["label"]: r["summary"] for r in runs}}


def cmd_gradients(args: argparse.Namespace) -> dict[str, Any]:
  check_output(args.output)
  _check_numbers(args, {"holdout_examples": 0, "batch_size": 2, "steps": 1,
                        "seed": 0})
  info, train, _ = _load_data(args.dataset, args.data_dir,
                              args.holdout_examples, with_eval=False)
  images, labels = train
  traces = []
  for conv in ("adder", "mult"):
    trace = gradient_norm_trace(conv, images, labels, dataset=args.dataset,
                                steps=args.steps, batch_size=args.batch_size,
                                seed=args.seed)
    traces.append(trace)
    first = dict(zip(trace["layers"], trace["norms"][0]))
    mean = dict(zip(trace["layers"],
                    np.asarray(trace["norms"]).mean(axis=0).tolist()))
    _print(f"{_conv_label(conv)}: gradient L2 norm per layer at "
           f"initialisation: " + ", ".join(
               f"{k} {v:.3g}" for k, v in first.items()) +
           (f"; mean over the first {args.steps} steps: " + ", ".join(
               f"{k} {v:.3g}" for k, v in mean.items())
            if args.steps > 1 else ""))
  when = ("at initialisation" if args.steps == 1 else
          f"mean over the first {args.steps} training steps (bars: range)")
  title = (f"LeNet-5-BN on {_DATASET_LABELS.get(info.name, info.name)}, "
           f"batch {args.batch_size}\nfilter-gradient L2 norms: {when}")
  files = plot_gradients(traces, args.output, title)
  return {"files": files, "batch_size": args.batch_size, "steps": args.steps,
          "norms": {t["conv"]: {"layers": t["layers"], "per_step": t["norms"],
                                "losses": t["losses"]} for t in traces}}


def cmd_features(args: argparse.Namespace) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  check_output(args.output)
  _check_numbers(args, {"holdout_examples": 0, "train_examples": 0,
                        "epochs": 1, "batch_size": 2, "plot_examples": 1,
                        "seed": 0})
  if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
    raise FigureError(f"--learning_rate must be > 0, got "
                      f"{args.learning_rate}")
  widths = _parse_widths(args.widths)
  holdout = args.holdout_examples
  if holdout is None:
    holdout = 10000 if args.dataset == "mnist" else 0
  info, train, evaluation = _load_data(args.dataset, args.data_dir, holdout)
  if args.train_examples > 0:
    train = train[0][:args.train_examples], train[1][:args.train_examples]
  plot_n = min(args.plot_examples, len(evaluation[1]))
  eval_images, eval_labels = evaluation
  panels, summary = [], {}
  for conv in ("adder", "mult"):
    trained = train_feature_model(
        conv, train, dataset=args.dataset, widths=widths, epochs=args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        seed=args.seed, log=_print)
    features, logits = extract_features(trained["model"],
                                        trained["variables"], eval_images,
                                        args.dataset)
    top1 = float(np.mean(np.argmax(logits, -1) == eval_labels))
    geometry = feature_geometry(features, eval_labels)
    params = jax.device_get(trained["variables"]["params"])
    classifier = np.asarray(_layer_kernel(params, "classifier"))
    panels.append({"conv": conv, "features": features[:plot_n],
                   "labels": eval_labels[:plot_n], "top1": top1,
                   "geometry": geometry, "classifier": classifier})
    summary[conv] = {"eval_top1": top1, **geometry,
                     "train_seconds": round(trained["seconds"], 1),
                     "final_train_loss": float(np.mean(
                         trained["losses"][-20:]))}
    _print(f"{_conv_label(conv)}: {json.dumps(summary[conv])}")
  caption = (f"LeNet++ (widths {','.join(map(str, widths))}) on "
             f"{_DATASET_LABELS.get(info.name, info.name)}: "
             f"{len(train[1]):,} training images, {args.epochs} epochs, batch "
             f"{args.batch_size}; {plot_n:,} held-out images shown, "
             f"statistics on all {len(eval_labels):,}")
  files = plot_features(panels, args.output, caption)
  return {"files": files, "widths": list(widths),
          "train_examples": int(len(train[1])), "epochs": args.epochs,
          "eval_examples": int(len(eval_labels)), **summary}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m addernet_jax.figures",
      description="The AdderNet paper's figures from this project's runs: "
      "PNG at --output, SVG next to it; the last line printed is JSON.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("weights", help="weight histograms with Laplace and "
                     "Gaussian fits (AdderNet vs CNN)")
  p.add_argument("--workdirs", nargs="+",
                 help="training workdirs (train.py --workdir), e.g. the "
                 "AdderNet and its CNN twin")
  p.add_argument("--torch_checkpoints", nargs="+",
                 help="official-layout PyTorch checkpoints (.pth), e.g. the "
                 "released ResNet-20 AdderNet")
  p.add_argument("--torch_model", default="resnet20",
                 help="architecture of --torch_checkpoints")
  p.add_argument("--layer", default="conv2",
                 help="parameter path of the layer (default conv2, LeNet-5's "
                 "C3; nested: layer1_0/conv1)")
  p.add_argument("--which", choices=("latest", "best"), default="latest")
  p.add_argument("--output", required=True, help="PNG path")
  p.set_defaults(func=cmd_weights)

  p = sub.add_parser("features", help="2-D LeNet++ features on MNIST "
                     "(AdderNet vs CNN)")
  p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
  p.add_argument("--data_dir", help="MNIST IDX files (not needed for digits)")
  p.add_argument("--holdout_examples", type=int, default=None,
                 help="evaluate on the last N training images (0: the test "
                 "split; default 10000 for mnist, 0 for digits)")
  p.add_argument("--train_examples", type=int, default=12800,
                 help="train on the first N training images (0: all)")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--batch_size", type=int, default=128)
  p.add_argument("--learning_rate", type=float, default=0.1)
  p.add_argument("--widths", default="4,4,8,8,16,16",
                 help="channels of the 6 convolutions (Wen et al.: "
                 "32,32,64,64,128,128; the default, 1/8 of that, trains on a "
                 "CPU in minutes)")
  p.add_argument("--plot_examples", type=int, default=3000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", required=True, help="PNG path")
  p.set_defaults(func=cmd_features)

  p = sub.add_parser("curves", help="loss, accuracy and learning rate of "
                     "workdirs from metrics.jsonl")
  p.add_argument("--workdirs", nargs="+", required=True)
  p.add_argument("--labels", nargs="+",
                 help="one name per workdir (default: the folder names)")
  p.add_argument("--output", required=True, help="PNG path")
  p.set_defaults(func=cmd_curves)

  p = sub.add_parser("gradients", help="per-layer gradient norms of "
                     "LeNet-5-BN, AdderNet vs CNN")
  p.add_argument("--dataset", default="mnist", choices=("mnist", "digits"))
  p.add_argument("--data_dir", help="MNIST IDX files (not needed for digits)")
  p.add_argument("--holdout_examples", type=int, default=0,
                 help="leave the last N training images out (as training "
                 "with --config.holdout_examples does)")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=1,
                 help="1: at initialisation (the paper's first iteration); "
                 "N: the first N training steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--output", required=True, help="PNG path")
  p.set_defaults(func=cmd_gradients)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  from addernet_jax import cli  # pylint: disable=g-import-not-at-top
  cli.quiet_library_logs()
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return cli.print_error("matplotlib is not installed: pip install "
                           "'addernet-jax[figures]'")
  try:
    result = args.func(args)
  except (FigureError, FloatingPointError, *cli.USER_ERRORS) as e:
    return cli.print_error(e)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
