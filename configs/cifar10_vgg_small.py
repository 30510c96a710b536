"""CIFAR-10, VGG-small AdderNet (the CIFAR VGG of LQ-Nets).

The official CIFAR recipe (as configs/cifar10_resnet20.py): SGD lr 0.1 with a
per-epoch cosine of 400 epochs, 399 trained, momentum 0.9, weight decay 5e-4, eta 0.2,
global batch 256, pad-4 random crop and horizontal flip.

Run:
  python train.py --config configs/cifar10_vgg_small.py \
      --workdir /tmp/cifar10_vgg_small --config.data_dir=/path/to/cifar10
  (CNN baseline: add --config.conv=mult)

Expected result: top-1 93.72% (AdderNet) / 93.80% (CNN) on the CIFAR-10 test set
(paper, Table 1); not yet measured with this code.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """CIFAR-10 VGG-small with the official recipe."""
  config = default.get_base_config()
  config.dataset = 'cifar10'
  config.model = 'vgg_small'
  config.num_classes = 10
  return config
