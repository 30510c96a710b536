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
"""

from __future__ import annotations

import math
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
              num_classes: int | None = None) -> dict[str, Any]:
  """#Mul and #Add of one forward pass of `get_model(model_name, ...)`.

  Args:
    model_name: one of `addernet_jax.models.MODEL_NAMES`.
    input_shape: NHWC `(n, h, w, c)`, or `(h, w, c)` for one image (n = 1).
      Counts cover the whole input: they scale with n.
    conv: "adder" (AdderNet) or "mult" (the identical CNN).
    num_classes: classifier size; default `default_num_classes(model_name)`.

  Returns:
    `{"total": {"mul": int, "add": int, "macs": int}, "layers": [...]}`, one
    record per convolution or dense layer in call order with `name` (module
    path), `kind` ("adder" or "mult"), `macs`, `mul`, `add`, `input_shape`
    and `output_shape`.
  """
  if model_name not in models_lib.MODEL_NAMES:
    raise ValueError(f"unknown model {model_name!r}; choose one of "
                     f"{models_lib.MODEL_NAMES}")
  shape = tuple(int(s) for s in input_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4 or any(s <= 0 for s in shape):
    raise ValueError(f"input_shape must be (h, w, c) or (n, h, w, c) with "
                     f"positive sizes, got {tuple(input_shape)}")
  if num_classes is None:
    num_classes = default_num_classes(model_name)
  model = models_lib.get_model(model_name, num_classes=num_classes, conv=conv)
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


# Input sizes of the paper's experiments (MNIST 28x28, CIFAR 32x32,
# ImageNet 224x224).
PAPER_INPUTS = {"lenet5_bn": (28, 28, 1), "vgg_small": (32, 32, 3),
                **{n: (32, 32, 3) for n in models_lib.CIFAR_RESNET_DEPTHS},
                **{n: (224, 224, 3) for n in IMAGENET_MODELS}}


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


if __name__ == "__main__":
  print(markdown_table())
