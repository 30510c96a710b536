"""CIFAR-10, ResNet-20 AdderNet: the official recipe (DESIGN.md §1), exact.

SGD lr 0.1 (per-epoch cosine over 400 epochs), momentum 0.9, weight decay
5e-4 on all parameters, adaptive learning rate eta 0.2 on the adder filters,
global batch 256, random crop 32 (4-pixel zero padding) and horizontal flip.

Run:
  python train.py --config configs/cifar10_resnet20.py \
      --workdir /tmp/cifar10_resnet20 --config.data_dir=/path/to/cifar10
  (CNN baseline: add --config.conv=mult)

Expected result: top-1 91.84% (AdderNet) / 92.25% (CNN) on the CIFAR-10 test
set after 400 epochs (paper, Table 1); not yet measured with this code.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The official CIFAR-10 ResNet-20 recipe."""
  config = default.get_base_config()
  config.dataset = 'cifar10'  # 50,000 train / 10,000 test, 32x32x3.
  config.model = 'resnet20'
  config.num_classes = 10
  return config
