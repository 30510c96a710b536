"""CIFAR ResNets (ResNet-20/32/44/56) of the official AdderNet release.

conv3x3(3->16)-BN-ReLU, three stages of basic blocks (16, 32, 64 channels),
global average pool, a 1x1 multiplication conv (no bias) and BN over the
logits. Parameter names follow the official PyTorch module names with dots
replaced by underscores (`layer2_0.downsample_conv`), which the converter uses.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common


class BasicBlock(nn.Module):
  """adder3x3-BN-ReLU-adder3x3-BN (+ identity or adder1x1-BN shortcut) -ReLU."""
  planes: int
  stride: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    pad = common.pad_same_as_torch(3)
    y = self.conv(self.planes, (3, 3), strides=self.stride, padding=pad,
                  name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = self.conv(self.planes, (3, 3), strides=1, padding=pad, name="conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = self.conv(self.planes, (1, 1), strides=self.stride, padding="VALID",
                    name="downsample_conv")(x)
      x = bn("downsample_bn")(x)
    return nn.relu(y + x)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs; `conv` builds every adder-able layer."""
  blocks_per_stage: int
  num_classes: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    common.check_images(x, "CifarResNet", module=self)
    x = nn.Conv(16, (3, 3), padding=common.pad_same_as_torch(3), use_bias=False,
                dtype=self.dtype, kernel_init=common.torch_default_init,
                name="conv1")(x)
    x = nn.relu(bn("bn1")(x))
    for stage, planes in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(planes, stride, self.conv, self.dtype,
                       self.bn_axis_name,
                       name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = nn.Conv(self.num_classes, (1, 1), use_bias=False, dtype=self.dtype,
                kernel_init=common.torch_default_init, name="fc")(x)
    x = bn("bn2")(x)
    return x.reshape((x.shape[0], -1)).astype(jnp.float32)
