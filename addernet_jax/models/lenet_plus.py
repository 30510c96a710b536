"""LeNet++ with a 2-D feature layer, for the feature visualisation figure.

The network of Wen et al., "A Discriminative Feature Learning Approach for
Deep Face Recognition" (ECCV 2016, the center-loss paper), which the AdderNet
paper uses for its feature visualisation: conv5x5(32)x2 - MP2 - conv5x5(64)x2
- MP2 - conv5x5(128)x2 - MP2 - FC(2) - FC(classes), convolutions with stride
1 and 2 pixels of zero padding (28x28 MNIST -> 14 -> 7 -> 3).

Differences from the original, all shared by the AdderNet and the CNN twin:
BatchNorm after every convolution and after the 2-D layer (adder outputs are
large negative sums that need it, as in every model of the paper), PReLU with
one learned slope per layer (initial 0.25) instead of one per channel, and
`widths` lets the figure train a narrower trunk on a CPU.

`conv="adder"`: every convolution and both fully connected layers are adder
layers (as in the LeNet-5-BN AdderNet, which has no multiplication layer), so
the 2-D features are the (batch-normalised) output of an adder layer and the
logits are minus the L1 distances of the features to ten learned class
centres, the classifier's filters. `conv="mult"`: ordinary convolutions, a linear
2-D layer and a linear classifier with a bias (a softmax classifier on the
features, as in Wen et al.).

Not part of `models.MODEL_NAMES` (it is not a model of the paper's tables);
`LeNetPlusPlus(...)` is built directly or through `lenet_plus_plus(...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from addernet_jax.models import common

WIDTHS = (32, 32, 64, 64, 128, 128)  # Wen et al. 2016


class LeNetPlusPlus(nn.Module):
  """Returns `(logits, features)`; `features` is [batch, feature_dim]."""
  num_classes: int
  conv: common.ModuleDef
  dense: common.ModuleDef
  classifier: common.ModuleDef
  widths: Sequence[int] = WIDTHS
  feature_dim: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    if len(self.widths) != 6:
      raise ValueError(f"LeNet++ has 6 convolutions, got widths "
                       f"{tuple(self.widths)}")
    bn = lambda name: common.batch_norm(train, dtype=self.dtype,
                                        axis_name=None, name=name)
    for i, width in enumerate(self.widths):
      x = self.conv(width, (5, 5), padding=((2, 2), (2, 2)),
                    name=f"conv{i + 1}")(x)
      x = nn.PReLU(negative_slope_init=0.25, name=f"prelu{i + 1}")(
          bn(f"bn{i + 1}")(x))
      if i % 2 == 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    features = bn("bn_features")(self.dense(self.feature_dim,
                                            name="fc_features")(x))
    logits = self.classifier(self.num_classes, name="classifier")(features)
    return logits.astype(jnp.float32), features.astype(jnp.float32)


def lenet_plus_plus(*, num_classes: int = 10, conv: str = "adder",
                    widths: Sequence[int] = WIDTHS, feature_dim: int = 2,
                    dtype: Any = jnp.float32,
                    implementation: str | None = None) -> LeNetPlusPlus:
  """LeNet++ with adder (`conv="adder"`) or multiplication layers."""
  conv_layer = common.conv_factory(conv, dtype=dtype,
                                   implementation=implementation)
  dense = common.dense_factory(conv, dtype=dtype,
                               implementation=implementation)
  if conv == "adder":
    classifier = dense
  else:
    classifier = lambda features, name: nn.Dense(
        features, use_bias=True, dtype=dtype,
        kernel_init=common.torch_default_init, name=name)
  return LeNetPlusPlus(num_classes=num_classes, conv=conv_layer, dense=dense,
                       classifier=classifier, widths=tuple(widths),
                       feature_dim=feature_dim, dtype=dtype)
