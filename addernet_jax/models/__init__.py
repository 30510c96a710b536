"""Model zoo: `get_model(name, *, num_classes, conv, dtype)`."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from addernet_jax.models import common
from addernet_jax.models.lenet import LeNet5BN
from addernet_jax.models.resnet_cifar import CifarResNet
from addernet_jax.models.resnet_imagenet import (BasicBlock, Bottleneck,
                                                 ImageNetResNet)
from addernet_jax.models.vgg_small import VGGSmall

CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7,
                       "resnet56": 9}
IMAGENET_RESNETS = {"resnet18": ((2, 2, 2, 2), BasicBlock),
                    "resnet34": ((3, 4, 6, 3), BasicBlock),
                    "resnet50": ((3, 4, 6, 3), Bottleneck)}
MODEL_NAMES = ("lenet5_bn", "vgg_small", *CIFAR_RESNET_DEPTHS,
               *IMAGENET_RESNETS)


def get_model(name: str, *, num_classes: int, conv: str = "adder",
              dtype: Any = jnp.float32, bn_axis_name: str | None = None,
              implementation: str | None = None,
              gradient: str = "official") -> nn.Module:
  """A Linen model of the paper.

  Args:
    name: one of `MODEL_NAMES`.
    num_classes: size of the output layer.
    conv: "adder" (AdderNet) or "mult" (the identical CNN baseline).
    dtype: computation dtype (parameters stay float32; logits are float32).
    bn_axis_name: mesh axis over which BatchNorm statistics are averaged in
      data-parallel training (None: local batch statistics).
    implementation: adder kernel choice passed to `ops.adder_conv`.
    gradient: the backward of the adder layers, "official" or "exact" (the
      true derivative; see `ops.adder_conv`). No effect with `conv="mult"`.

  Returns:
    A module used as `model.apply(variables, x, train=bool, mutable=...)`,
    with collections `params` and `batch_stats`.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if gradient not in ("official", "exact"):
    raise ValueError(f"gradient must be 'official' or 'exact', got "
                     f"{gradient!r}")
  conv_layer = common.conv_factory(conv, dtype=dtype,
                                   implementation=implementation)
  dense_layer = common.dense_factory(conv, dtype=dtype,
                                     implementation=implementation)
  if conv == "adder" and gradient != "official":
    conv_layer = functools.partial(conv_layer, gradient=gradient)
    dense_layer = functools.partial(dense_layer, gradient=gradient)
  kwargs = dict(num_classes=num_classes, conv=conv_layer, dtype=dtype,
                bn_axis_name=bn_axis_name)
  if name in CIFAR_RESNET_DEPTHS:
    return CifarResNet(CIFAR_RESNET_DEPTHS[name], **kwargs)
  if name in IMAGENET_RESNETS:
    stages, block = IMAGENET_RESNETS[name]
    return ImageNetResNet(stages, block, **kwargs)
  if name == "vgg_small":
    return VGGSmall(**kwargs)
  if name == "lenet5_bn":
    return LeNet5BN(dense=dense_layer, **kwargs)
  raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
