"""LeNet-5-BN: LeNet-5 with BatchNorm after every layer.

conv5x5(6)-BN-ReLU-MP2-conv5x5(16)-BN-ReLU-MP2-FC120-BN-ReLU-FC84-BN-ReLU-
FC(classes)-BN. With `conv="adder"` every convolution and fully connected
layer is an adder layer (the paper's ANN has no multiplication at all).
Inputs of 28x28 (MNIST) get 2 pixels of zero padding on the first layer, as in
the classic MNIST LeNet; 32x32 inputs none; in general each side shorter than
32 is padded (symmetrically) towards 32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common


class LeNet5BN(nn.Module):
  num_classes: int
  conv: common.ModuleDef
  dense: common.ModuleDef
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=self.bn_axis_name, name=name)
    common.check_images(x, "LeNet5BN", module=self)
    ph, pw = (max(0, (32 - side) // 2) for side in x.shape[1:3])
    x = self.conv(6, (5, 5), padding=((ph, ph), (pw, pw)), name="conv1")(x)
    x = nn.max_pool(nn.relu(bn("bn1")(x)), (2, 2), strides=(2, 2))
    x = self.conv(16, (5, 5), padding="VALID", name="conv2")(x)
    x = nn.max_pool(nn.relu(bn("bn2")(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(bn("bn3")(self.dense(120, name="fc1")(x)))
    x = nn.relu(bn("bn4")(self.dense(84, name="fc2")(x)))
    x = bn("bn5")(self.dense(self.num_classes, name="fc3")(x))
    return x.astype(jnp.float32)
