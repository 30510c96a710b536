"""CIFAR-100, ResNet-20 AdderNet.

The official CIFAR recipe (as configs/cifar10_resnet20.py): SGD lr 0.1 with a
per-epoch cosine of 400 epochs, 399 trained, momentum 0.9, weight decay 5e-4, eta 0.2,
global batch 256, pad-4 random crop and horizontal flip.

Run:
  python train.py --config configs/cifar100_resnet20.py \
      --workdir /tmp/cifar100_resnet20 --config.data_dir=/path/to/cifar100
  (CNN baseline: add --config.conv=mult)

Expected result: top-1 67.60% (AdderNet) / 68.14% (CNN) on the CIFAR-100 test set
(paper, Table 1); not yet measured with this code.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """CIFAR-100 ResNet-20 with the official recipe."""
  config = default.get_base_config()
  config.dataset = 'cifar100'
  config.model = 'resnet20'
  config.num_classes = 100
  return config
