"""Counting the multiplications and additions of one forward pass.

`count_ops(model_name, input_shape, conv=...)` traces the model with
`jax.eval_shape` (no arithmetic runs) while `flax.linen.intercept_methods`
records every call of a convolution or dense layer (`nn.Conv`, `nn.Dense`,
`layers.AdderConv`, `layers.AdderDense`) with its input and output shapes.

Accounting, as in the paper's #Mul/#Add columns:
* a layer's MACs = output elements x (kernel height x kernel width x input
  channels per group) for a convolution, output elements x input features for
  a dense layer;
* a multiplication MAC is one multiplication and one addition;
* an adder MAC (|x - w| accumulated) is two additions (the subtraction and
  the accumulation; the absolute value is free);
* BatchNorm, biases, pooling and activations are not counted.

Energy and latency are estimates from those counts, not measurements:
`estimate_energy_pj` weighs each multiplication and addition by a published
per-operation energy (`ENERGY_PJ`: Horowitz, "Computing's energy problem (and
what we can do about it)", ISSCC 2014, 45 nm), and `estimate_cycles` by a
processor's per-operation latency in cycles (`CYCLES`: the AdderNet paper's
VIA Nano 2000 example), one operation after another (no parallelism, no
memory traffic).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax import layers
from addernet_jax import models as models_lib

CIFAR_MODELS = ("lenet5_bn", "vgg_small",
                *models_lib.CIFAR_RESNET_DEPTHS)
IMAGENET_MODELS = tuple(models_lib.IMAGENET_RESNETS)
_COUNTED = (nn.Conv, nn.Dense, layers.AdderConv, layers.AdderDense)


def default_num_classes(model_name: str) -> int:
  """10 for the CIFAR/MNIST models, 1000 for the ImageNet ResNets."""
  if model_name in IMAGENET_MODELS:
    return 1000
  if model_name in CIFAR_MODELS:
    return 10
  raise ValueError(f"unknown model {model_name!r}; choose one of "
                   f"{models_lib.MODEL_NAMES}")


def _kernel_taps(module: nn.Module) -> int:
  size = module.kernel_size
  if isinstance(size, int):
    size = (size, size)
  return math.prod(size)


def _layer_record(module: nn.Module, x_shape: tuple[int, ...],
                  y_shape: tuple[int, ...]) -> dict[str, Any]:
  adder = isinstance(module, (layers.AdderConv, layers.AdderDense))
  out_elements = math.prod(y_shape)
  if isinstance(module, (nn.Conv, layers.AdderConv)):
    groups = getattr(module, "feature_group_count", 1)
    macs = out_elements * _kernel_taps(module) * (x_shape[-1] // groups)
  else:
    macs = out_elements * x_shape[-1]
  return {
      "name": "/".join(module.path),
      "kind": "adder" if adder else "mult",
      "macs": macs,
      "mul": 0 if adder else macs,
      "add": 2 * macs if adder else macs,
      "input_shape": tuple(x_shape),
      "output_shape": tuple(y_shape),
  }


def count_ops(model_name: str, input_shape: Sequence[int], conv: str = "adder",
              num_classes: int | None = None, scale: int | None = None,
              **sr_sizes: int | None) -> dict[str, Any]:
  """#Mul and #Add of one forward pass of `get_model(model_name, ...)`.

  Args:
    model_name: one of `addernet_jax.models.MODEL_NAMES`, or of
      `SR_MODEL_NAMES` (then `scale` is required and `input_shape` is the LR
      input, e.g. `sr_input_shape(name, scale)` for a 1280x720 output).
    input_shape: NHWC `(n, h, w, c)`, or `(h, w, c)` for one image (n = 1).
      Counts cover the whole input: they scale with n.
    conv: "adder" (AdderNet) or "mult" (the identical CNN).
    num_classes: classifier size; default `default_num_classes(model_name)`.
    scale: upscaling factor of a super-resolution model. Its adder units'
      self-shortcut additions, power activations and BatchNorms, and VDSR's
      bicubic interpolation, are not counted (like BatchNorm and activations
      elsewhere).
    **sr_sizes: a super-resolution model's `num_blocks` (EDSR), `depth`
      (VDSR) and `features` (None: the published sizes), as
      `models.get_sr_model` takes them.

  Returns:
    `{"total": {"mul": int, "add": int, "macs": int}, "layers": [...]}`, one
    record per convolution or dense layer in call order with `name` (module
    path), `kind` ("adder" or "mult"), `macs`, `mul`, `add`, `input_shape`
    and `output_shape`.
  """
  sr = model_name in models_lib.SR_MODEL_NAMES
  if not sr and model_name not in models_lib.MODEL_NAMES:
    raise ValueError(f"unknown model {model_name!r}; choose one of "
                     f"{models_lib.MODEL_NAMES} or {models_lib.SR_MODEL_NAMES}")
  if sr and scale is None:
    raise ValueError(f"{model_name} is a super-resolution model: give scale=")
  if sr and num_classes is not None:
    raise ValueError(f"{model_name} is a super-resolution model: it takes no "
                     f"num_classes=")
  if not sr and scale is not None:
    raise ValueError(f"scale= is for the super-resolution models "
                     f"{models_lib.SR_MODEL_NAMES}, not {model_name!r}")
  unknown = sorted(set(sr_sizes) - {"num_blocks", "depth", "features"})
  if unknown or (not sr and any(v is not None for v in sr_sizes.values())):
    raise ValueError(f"unexpected argument(s) {unknown or sorted(sr_sizes)}"
                     f" for {model_name!r}: num_blocks=, depth= and features="
                     f" size the super-resolution models")
  try:
    shape = tuple(operator.index(s) for s in input_shape)  # 32.5 is refused
  except TypeError:
    shape = ()
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4 or any(s <= 0 for s in shape):
    raise ValueError(f"input_shape must be (h, w, c) or (n, h, w, c) with "
                     f"positive sizes, got {tuple(input_shape)}")
  if sr:
    model = models_lib.get_sr_model(model_name, scale=scale, conv=conv,
                                    colors=shape[-1], **sr_sizes)
  else:
    if num_classes is None:
      num_classes = default_num_classes(model_name)
    model = models_lib.get_model(model_name, num_classes=num_classes,
                                 conv=conv)
  records: list[dict[str, Any]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == "__call__"
        and isinstance(context.module, _COUNTED)):
      records.append(_layer_record(context.module, tuple(args[0].shape),
                                   tuple(out.shape)))
    return out

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False))
  total = {"mul": sum(r["mul"] for r in records),
           "add": sum(r["add"] for r in records),
           "macs": sum(r["macs"] for r in records)}
  return {"total": total, "layers": records}


def format_count(n: int) -> str:
  """1234567 -> '1.23M' (K, M, G as in the paper's tables)."""
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(n)


# Energy per operation in picojoules, 45 nm process: M. Horowitz, "Computing's
# energy problem (and what we can do about it)", ISSCC 2014, Figure 1.1.9
# (the figures the AdderNet papers use).
ENERGY_PJ = {
    "fp32": {"mul": 3.7, "add": 0.9},
    "fp16": {"mul": 1.1, "add": 0.4},
    "int8": {"mul": 0.2, "add": 0.03},
}

# Latency per operation in clock cycles. "via_nano_2000": the example of the
# AdderNet paper (Chen et al., CVPR 2020, section 3.3): float multiplication 4
# cycles, addition 2, so LeNet-5 takes about 1.7M cycles as an AdderNet
# against 2.6M as a CNN.
CYCLES = {
    "via_nano_2000": {"mul": 4, "add": 2},
}


def _check_key(table: dict[str, Any], key: str, what: str) -> dict[str, Any]:
  if key not in table:
    raise ValueError(f"unknown {what} {key!r}; choose one of {sorted(table)}")
  return table[key]


def estimate_energy_pj(totals: dict[str, int], precision: str = "fp32"
                       ) -> float:
  """Energy of `totals` ({"mul", "add"} counts) in picojoules, at the 45 nm
  per-operation energies of `ENERGY_PJ[precision]` ("fp32", "fp16",
  "int8"). An estimate of the arithmetic only: memory access, which often
  dominates, is not included."""
  cost = _check_key(ENERGY_PJ, precision, "precision")
  totals = _check_totals(totals)
  return totals["mul"] * cost["mul"] + totals["add"] * cost["add"]


def estimate_cycles(totals: dict[str, int], processor: str = "via_nano_2000"
                    ) -> int:
  """Latency of `totals` in clock cycles with the per-operation latencies of
  `CYCLES[processor]`, every operation after the previous one (the
  accounting of the AdderNet paper's example)."""
  cost = _check_key(CYCLES, processor, "processor")
  totals = _check_totals(totals)
  return totals["mul"] * cost["mul"] + totals["add"] * cost["add"]


def _check_totals(totals: Any) -> dict[str, int]:
  """`totals` if it holds "mul" and "add" counts; the whole `count_ops`
  result gives a ValueError pointing at its "total"."""
  if isinstance(totals, dict) and "mul" in totals and "add" in totals:
    return totals
  hint = (': pass count_ops(...)["total"], not the whole result'
          if isinstance(totals, dict) and "total" in totals else "")
  raise ValueError(f'totals must be a dict with "mul" and "add" counts{hint}')


def format_energy(pj: float) -> str:
  """Picojoules -> '1.23 uJ' (pJ, nJ, uJ, mJ)."""
  for unit, scale in (("mJ", 1e9), ("uJ", 1e6), ("nJ", 1e3)):
    if pj >= scale:
      return f"{pj / scale:.2f} {unit}"
  return f"{pj:.1f} pJ"


# Input sizes of the paper's experiments (MNIST 28x28, CIFAR 32x32,
# ImageNet 224x224).
PAPER_INPUTS = {"lenet5_bn": (28, 28, 1), "vgg_small": (32, 32, 3),
                **{n: (32, 32, 3) for n in models_lib.CIFAR_RESNET_DEPTHS},
                **{n: (224, 224, 3) for n in IMAGENET_MODELS}}


# AdderSR's accounting: one image whose OUTPUT is 1280x720 (height 720).
SR_OUTPUT_HW = (720, 1280)
# The SR rows of the tables: (model, scale).
SR_ROWS = (("edsr_baseline", 2), ("edsr_baseline", 3), ("edsr_baseline", 4),
           ("vdsr", 2))


def sr_input_shape(model_name: str, scale: int,
                   output_hw: Sequence[int] = SR_OUTPUT_HW
                   ) -> tuple[int, int, int]:
  """The LR input `(h, w, colors)` of an SR model whose output is
  `output_hw` (default 1280x720): each side divided by `scale`, rounded up
  (x3: 240x427 -> a 720x1281 output); EDSR sees RGB, VDSR the Y channel."""
  colors = 1 if model_name == "vdsr" else 3
  return (math.ceil(output_hw[0] / scale), math.ceil(output_hw[1] / scale),
          colors)


def sr_markdown_table(precision: str = "fp32") -> str:
  """#Mul, #Add and estimated energy of the AdderSR models (`SR_ROWS`) for
  one 1280x720 output, ANN vs CNN."""
  rows = ["| model | scale | LR input | ANN #Mul | ANN #Add | CNN #Mul | "
          f"CNN #Add | ANN energy ({precision}) | CNN energy ({precision}) | "
          "ANN / CNN energy |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, scale in SR_ROWS:
    shape = sr_input_shape(name, scale)
    ann = count_ops(name, shape, conv="adder", scale=scale)["total"]
    cnn = count_ops(name, shape, conv="mult", scale=scale)["total"]
    e_ann, e_cnn = (estimate_energy_pj(t, precision) for t in (ann, cnn))
    rows.append(
        f"| {name} | x{scale} | {'x'.join(map(str, shape))} | "
        f"{format_count(ann['mul'])} | {format_count(ann['add'])} | "
        f"{format_count(cnn['mul'])} | {format_count(cnn['add'])} | "
        f"{format_energy(e_ann)} | {format_energy(e_cnn)} | "
        f"{e_ann / e_cnn:.2f} |")
  return "\n".join(rows)


def markdown_table() -> str:
  """Our #Mul/#Add for every model at its paper input size (one image)."""
  rows = ["| model | input | ANN #Mul | ANN #Add | CNN #Mul | CNN #Add |",
          "| --- | --- | --- | --- | --- | --- |"]
  for name in models_lib.MODEL_NAMES:
    shape = PAPER_INPUTS[name]
    ann = count_ops(name, shape, conv="adder")["total"]
    cnn = count_ops(name, shape, conv="mult")["total"]
    rows.append(
        f"| {name} | {'x'.join(map(str, shape))} | {format_count(ann['mul'])} "
        f"| {format_count(ann['add'])} | {format_count(cnn['mul'])} | "
        f"{format_count(cnn['add'])} |")
  return "\n".join(rows)


def markdown_energy_table(precision: str = "fp32",
                          processor: str = "via_nano_2000",
                          sr: bool = False) -> str:
  """Estimated energy (`estimate_energy_pj` at `precision`) and latency
  (`estimate_cycles` on `processor`) of one forward pass of one image, ANN
  vs CNN, for every model at its paper input size; with `sr`, also the
  AdderSR rows (`SR_ROWS`, one 1280x720 output, input "LR -> output")."""
  rows = [f"| model | input | ANN energy ({precision}) | CNN energy "
          f"({precision}) | ANN / CNN energy | ANN cycles ({processor}) | "
          "CNN cycles | ANN / CNN cycles |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name in models_lib.MODEL_NAMES:
    shape = PAPER_INPUTS[name]
    ann = count_ops(name, shape, conv="adder")["total"]
    cnn = count_ops(name, shape, conv="mult")["total"]
    e_ann, e_cnn = (estimate_energy_pj(t, precision) for t in (ann, cnn))
    c_ann, c_cnn = (estimate_cycles(t, processor) for t in (ann, cnn))
    rows.append(
        f"| {name} | {'x'.join(map(str, shape))} | {format_energy(e_ann)} | "
        f"{format_energy(e_cnn)} | {e_ann / e_cnn:.2f} | "
        f"{format_count(c_ann)} | {format_count(c_cnn)} | "
        f"{c_ann / c_cnn:.2f} |")
  for name, scale in (SR_ROWS if sr else ()):
    shape = sr_input_shape(name, scale)
    ann = count_ops(name, shape, conv="adder", scale=scale)["total"]
    cnn = count_ops(name, shape, conv="mult", scale=scale)["total"]
    e_ann, e_cnn = (estimate_energy_pj(t, precision) for t in (ann, cnn))
    c_ann, c_cnn = (estimate_cycles(t, processor) for t in (ann, cnn))
    io = (f"{shape[1]}x{shape[0]}x{shape[2]} -> {shape[1] * scale}x"
          f"{shape[0] * scale}")
    rows.append(
        f"| {name} x{scale} | {io} | {format_energy(e_ann)} | "
        f"{format_energy(e_cnn)} | {e_ann / e_cnn:.2f} | "
        f"{format_count(c_ann)} | {format_count(c_cnn)} | "
        f"{c_ann / c_cnn:.2f} |")
  return "\n".join(rows)


def config_counts(config: Any, precision: str = "fp32",
                  processor: str = "via_nano_2000") -> dict[str, Any]:
  """The counts of one training config's network, AdderNet and its CNN twin:
  at the dataset's image size with its classes, or for an AdderSR config
  (`task="sr"`) at its scale, colors and sizes for one 1280x720 output.
  Returns `{"model", "input_shape", "adder": {...}, "mult": {...}}`, each
  with `mul`, `add`, `macs`, `energy_pj` and `cycles`."""
  if config.get("task", "classification") == "sr":
    from addernet_jax.sr import train as sr_train  # pylint: disable=g-import-not-at-top
    sr_train.validate_model_config(config)
    colors = sr_train.model_colors(config)
    shape = (*sr_input_shape(config.model, config.scale)[:2], colors)
    kwargs = {"scale": config.scale, "num_blocks": config.get("num_blocks"),
              "depth": config.get("depth"),
              "features": config.get("features")}
  else:
    from addernet_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    info = data_lib.dataset_info(config.dataset)
    shape = tuple(info.image_shape)
    kwargs = {"num_classes": info.num_classes}
  out: dict[str, Any] = {"model": config.model, "input_shape": list(shape)}
  if config.model == "lenet5_bn" and min(shape[:2]) < 32:
    out["note"] = ("LeNet-5-BN pads its input to 32x32: the first layer's "
                   "counts include the padding")
  for conv in ("adder", "mult"):
    totals = count_ops(config.model, shape, conv=conv, **kwargs)["total"]
    out[conv] = {**totals, "energy_pj": estimate_energy_pj(totals, precision),
                 "cycles": estimate_cycles(totals, processor)}
  return out


def _load_config_file(path: str) -> Any:
  """`get_config()` of a config file (ValueError naming a bad one)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise ValueError(f"--config {path!r}: no such file")
  # Shipped configs import their siblings as `configs.<name>`.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("opcount_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"--config {path!r} has no get_config() function")
  return module.get_config()


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m addernet_jax.opcount [--table ops|energy|sr|all] [--sr] [--precision
  fp32|fp16|int8] [--processor via_nano_2000]`: markdown tables;
  `--config FILE`: one config's counts as a JSON line."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m addernet_jax.opcount",
      description="#Mul/#Add, energy and latency estimates of every model.")
  parser.add_argument("--table", choices=("ops", "energy", "sr", "all"),
                      default="all")
  parser.add_argument("--precision", choices=sorted(ENERGY_PJ),
                      default="fp32")
  parser.add_argument("--processor", choices=sorted(CYCLES),
                      default="via_nano_2000")
  parser.add_argument("--sr", action="store_true",
                      help="add the AdderSR rows (1280x720 outputs) to the "
                      "energy table")
  parser.add_argument("--config", default=None,
                      help="instead of the tables: the counts, energy and "
                      "cycles of one training config's network (one JSON "
                      "line)")
  args = parser.parse_args(argv)
  if args.config is not None:
    import json  # pylint: disable=g-import-not-at-top
    try:
      counts = config_counts(_load_config_file(args.config), args.precision,
                             args.processor)
    except (ValueError, KeyError) as e:
      parser.exit(1, f"error: {e}\n")
    print(json.dumps(counts))
    return
  if args.table in ("ops", "all"):
    print(markdown_table())
  if args.table == "all":
    print()
  if args.table in ("energy", "all"):
    print(markdown_energy_table(args.precision, args.processor, sr=args.sr))
  if args.table == "sr":  # slower (1280x720 images): not part of "all"
    print(sr_markdown_table(args.precision))


if __name__ == "__main__":
  main()
