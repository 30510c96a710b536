"""CIFAR-10, ResNet-32 AdderNet.

The official CIFAR recipe (as configs/cifar10_resnet20.py): SGD lr 0.1 with a
per-epoch cosine of 400 epochs, 399 trained, momentum 0.9, weight decay 5e-4, eta 0.2,
global batch 256, pad-4 random crop and horizontal flip.

Run:
  python train.py --config configs/cifar10_resnet32.py \
      --workdir /tmp/cifar10_resnet32 --config.data_dir=/path/to/cifar10
  (CNN baseline: add --config.conv=mult)

Expected result: top-1 93.01% (AdderNet) / 93.29% (CNN) on the CIFAR-10 test set
(paper, Table 1); not yet measured with this code.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """CIFAR-10 ResNet-32 with the official recipe."""
  config = default.get_base_config()
  config.dataset = 'cifar10'
  config.model = 'resnet32'  # 5 basic blocks per stage.
  config.num_classes = 10
  return config
