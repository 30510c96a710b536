"""Model zoo: `get_model(name, *, num_classes, conv, dtype)`.

Classification models (`MODEL_NAMES`) and the AdderSR super-resolution models
(`SR_MODEL_NAMES`: `edsr_baseline`, `vdsr`, which take `scale` instead of
`num_classes`; see `addernet_jax.models.sr`)."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from addernet_jax.models import common
from addernet_jax.models import sr
from addernet_jax.models.lenet import LeNet5BN
from addernet_jax.models.resnet_cifar import CifarResNet
from addernet_jax.models.sr import EDSR, VDSR
from addernet_jax.models.resnet_imagenet import (BasicBlock, Bottleneck,
                                                 ImageNetResNet)
from addernet_jax.models.vgg_small import VGGSmall
from addernet_jax.models.nnx_bridge import linen_variables, load_variables, to_nnx

CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7,
                       "resnet56": 9}
IMAGENET_RESNETS = {"resnet18": ((2, 2, 2, 2), BasicBlock),
                    "resnet34": ((3, 4, 6, 3), BasicBlock),
                    "resnet50": ((3, 4, 6, 3), Bottleneck)}
MODEL_NAMES = ("lenet5_bn", "vgg_small", *CIFAR_RESNET_DEPTHS,
               *IMAGENET_RESNETS)
# Super-resolution models (AdderSR): LR image in, HR image out.
SR_MODEL_NAMES = ("edsr_baseline", "vdsr")


def get_sr_model(name: str, *, scale: int, conv: str = "adder",
                 colors: int | None = None, dtype: Any = jnp.float32,
                 bn_axis_name: str | None = None,
                 implementation: str | None = None,
                 self_shortcut: bool = True,
                 power_activation: bool = True,
                 identity_init: bool = True,
                 num_blocks: int | None = None, depth: int | None = None,
                 features: int | None = None) -> nn.Module:
  """An AdderSR super-resolution network (`addernet_jax.models.sr`).

  Args:
    name: "edsr_baseline" (EDSR, 16 blocks of 64 channels) or "vdsr" (20
      layers of 64 channels).
    scale: upscaling factor, 2, 3 or 4.
    conv: "adder" (AdderSR: inner layers are adder units with the
      self-shortcut and the learnable power activation) or "mult" (the
      original CNN).
    colors: 3 (RGB) or 1 (Y channel); default 3 for EDSR, 1 for VDSR.
    dtype: computation dtype (the output is float32).
    bn_axis_name: mesh axis of the adder units' BatchNorm statistics.
    implementation: adder kernel choice passed to `ops.adder_conv`.
    self_shortcut, power_activation: the two AdderSR fixes (ablations; no
      effect with `conv="mult"`).
    identity_init: adder units start as the identity (their BatchNorm scale
      initialised to 0; no effect with `conv="mult"`).
    num_blocks, depth, features: None for the published sizes (EDSR
      baseline: 16 residual blocks of 64 channels; VDSR: 20 layers of 64
      channels); smaller values for tests and smoke runs.

  Returns:
    A module used as `model.apply(variables, lr, train=bool, mutable=...)`
    on NHWC float images in [0, 1]; the output is `scale` times larger.
  """
  common.check_dtype(dtype)
  if conv == "adder":
    conv_layer = common.conv_factory(conv, dtype=dtype,
                                     implementation=implementation)
  elif conv == "mult":
    conv_layer = functools.partial(nn.Conv, use_bias=True, dtype=dtype,
                                   kernel_init=common.torch_default_init)
  else:
    raise ValueError(f"conv must be one of {common.CONV_KINDS}, got {conv!r}")
  kwargs = dict(scale=scale, conv=conv_layer, adder=conv == "adder",
                self_shortcut=self_shortcut,
                power_activation=power_activation,
                identity_init=identity_init, dtype=dtype,
                bn_axis_name=bn_axis_name)
  if features is not None:
    kwargs["features"] = features
  if name == "edsr_baseline":
    if depth is not None:
      raise ValueError("depth= is VDSR's; EDSR takes num_blocks=")
    if num_blocks is not None:
      kwargs["num_blocks"] = num_blocks
    model = EDSR(colors=3 if colors is None else colors, **kwargs)
  elif name == "vdsr":
    if num_blocks is not None:
      raise ValueError("num_blocks= is EDSR's; VDSR takes depth=")
    if depth is not None:
      kwargs["depth"] = depth
    model = VDSR(colors=1 if colors is None else colors, **kwargs)
  else:
    raise ValueError(f"unknown super-resolution model {name!r}; choose one "
                     f"of {SR_MODEL_NAMES}")
  sizes = {"features": model.features}
  sizes.update({"depth": model.depth} if name == "vdsr" else
               {"num_blocks": model.num_blocks})
  sr._check_sr_args(model.scale, model.colors, **sizes)  # pylint: disable=protected-access
  return model


def get_model(name: str, *, num_classes: int | None = None,
              conv: str = "adder", dtype: Any = jnp.float32,
              bn_axis_name: str | None = None,
              implementation: str | None = None,
              gradient: str = "official", scale: int | None = None
              ) -> nn.Module:
  """A Linen model of the paper.

  Args:
    name: one of `MODEL_NAMES`, or of `SR_MODEL_NAMES` (then `scale` is
      required, `num_classes` must be None, and the result is
      `get_sr_model(name, scale=scale, conv=conv, ...)`).
    num_classes: size of the output layer.
    conv: "adder" (AdderNet) or "mult" (the identical CNN baseline).
    dtype: computation dtype (parameters stay float32; logits are float32).
    bn_axis_name: mesh axis over which BatchNorm statistics are averaged in
      data-parallel training (None: local batch statistics).
    implementation: adder kernel choice passed to `ops.adder_conv`.
    gradient: the backward of the adder layers, "official" or "exact" (the
      true derivative; see `ops.adder_conv`). No effect with `conv="mult"`.

    scale: upscaling factor of a super-resolution model (2, 3 or 4).

  Returns:
    A module used as `model.apply(variables, x, train=bool, mutable=...)`,
    with collections `params` and `batch_stats`.
  """
  if name in SR_MODEL_NAMES:
    if scale is None:
      raise ValueError(f"{name} is a super-resolution model: give scale= "
                       "(2, 3 or 4)")
    if num_classes is not None:
      raise ValueError(f"{name} is a super-resolution model: it has no "
                       f"num_classes (got {num_classes!r})")
    if gradient != "official":
      raise ValueError("super-resolution models support only "
                       "gradient='official'")
    return get_sr_model(name, scale=scale, conv=conv, dtype=dtype,
                        bn_axis_name=bn_axis_name,
                        implementation=implementation)
  if scale is not None:
    raise ValueError(f"scale= is for super-resolution models "
                     f"{SR_MODEL_NAMES}, not {name!r}")
  if (isinstance(num_classes, (bool, np.bool_))
      or not isinstance(num_classes, numbers.Integral) or num_classes < 1):
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  num_classes = int(num_classes)
  common.check_dtype(dtype)
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
    if conv == "mult":  # The official ImageNet init of every nn.Conv2d.
      kwargs["conv"] = functools.partial(
          conv_layer, kernel_init=common.kaiming_normal_fan_out)
    return ImageNetResNet(stages, block, **kwargs)
  if name == "vgg_small":
    return VGGSmall(**kwargs)
  if name == "lenet5_bn":
    return LeNet5BN(dense=dense_layer, **kwargs)
  raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES} "
                   f"or, for super-resolution, {SR_MODEL_NAMES}")
