"""ImageNet ResNets (18/34/50) as in the official AdderNet `resnet50.py`.

7x7 multiplication stem (stride 2, padding 3)-BN-ReLU-maxpool(3, 2, 1), four
stages of torchvision-style blocks whose convolutions (1x1 and 3x3, and the
1x1 downsample) are adder layers, global average pool, a 1x1 multiplication
classifier with bias, and BatchNorm over the logits. The stride of a
bottleneck sits on its 3x3 layer, as in the official code. Initialisation as
the official code's: every multiplication convolution (stem, classifier, and
all layers of the CNN twin, as in torchvision) Kaiming-normal over fan-out,
the classifier's bias PyTorch's default, adder filters N(0, 1).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common


class BasicBlock(nn.Module):
  """Two 3x3 layers (ResNet-18/34)."""
  planes: int
  stride: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    pad = common.pad_same_as_torch(3)
    y = self.conv(self.planes, (3, 3), strides=self.stride, padding=pad,
                  name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = self.conv(self.planes, (3, 3), padding=pad, name="conv2")(y)
    y = bn("bn2")(y)
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """1x1-3x3(stride)-1x1 with expansion 4 (ResNet-50)."""
  planes: int
  stride: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    y = self.conv(self.planes, (1, 1), padding="VALID", name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = self.conv(self.planes, (3, 3), strides=self.stride,
                  padding=common.pad_same_as_torch(3), name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = self.conv(self.planes * 4, (1, 1), padding="VALID", name="conv3")(y)
    y = bn("bn3")(y)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x: jax.Array, train: bool) -> jax.Array:
  out_channels = block.planes * block.expansion
  if block.stride == 1 and x.shape[-1] == out_channels:
    return x
  x = block.conv(out_channels, (1, 1), strides=block.stride, padding="VALID",
                 name="downsample_conv")(x)
  return common.batch_norm(train, dtype=block.dtype,
                           axis_name=block.bn_axis_name,
                           name="downsample_bn")(x)


class ImageNetResNet(nn.Module):
  """ResNet for 224x224 inputs; `conv` builds every adder-able layer."""
  stage_sizes: tuple[int, ...]
  block_cls: Any
  num_classes: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    common.check_images(x, "ImageNetResNet", module=self)
    x = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype,
                kernel_init=common.kaiming_normal_fan_out, name="conv1")(x)
    x = nn.relu(bn("bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = self.block_cls(64 * 2**stage, stride, self.conv, self.dtype,
                           self.bn_axis_name,
                           name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = nn.Conv(self.num_classes, (1, 1), use_bias=True, dtype=self.dtype,
                kernel_init=common.kaiming_normal_fan_out,
                bias_init=common.torch_default_bias_init(x.shape[-1]),
                name="fc")(x)
    x = bn("bn2")(x)
    return x.reshape((x.shape[0], -1)).astype(jnp.float32)
