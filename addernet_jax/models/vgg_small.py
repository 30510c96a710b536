"""VGG-small of LQ-Nets for CIFAR, as used in the AdderNet paper.

(2x128C3)-MP2-(2x256C3)-MP2-(2x512C3)-MP2-FC. The first convolution and the
classifier are multiplication layers; the five other convolutions are adder
layers. Every convolution is followed by BatchNorm and ReLU (pooling before
the BatchNorm where a stage ends, as in LQ-Nets), and BN normalises the logits.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common


class VGGSmall(nn.Module):
  num_classes: int
  conv: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    # Three 2x2 max-pools: anything smaller than 8x8 leaves no pixel.
    common.check_images(x, "VGGSmall", min_size=8, module=self,
                        stem="conv0")
    pad = common.pad_same_as_torch(3)
    x = nn.Conv(128, (3, 3), padding=pad, use_bias=False, dtype=self.dtype,
                kernel_init=common.torch_default_init, name="conv0")(x)
    x = nn.relu(bn("bn0")(x))
    widths = (128, 256, 256, 512, 512)
    for index, width in enumerate(widths, start=1):
      x = self.conv(width, (3, 3), padding=pad, name=f"conv{index}")(x)
      if index % 2 == 1:  # conv1, conv3, conv5 end a stage
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = nn.relu(bn(f"bn{index}")(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                 kernel_init=common.torch_default_init, name="fc")(x)
    x = bn("bn_fc")(x)
    return x.astype(jnp.float32)
