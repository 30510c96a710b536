"""CIFAR-10, VGG-small AdderNet with PKKD (kernel based distillation).

The recipe of configs/cifar10_vgg_small.py with config.distill = 'pkkd':
the adder network learns from a CNN twin trained alongside it
(docs/pkkd.md).

Run:
  python train.py --config configs/cifar10_vgg_small_pkkd.py \
      --workdir /tmp/cifar10_vgg_small_pkkd --config.data_dir=/path/to/data
  python eval.py --config configs/cifar10_vgg_small_pkkd.py \
      --checkpoint /tmp/cifar10_vgg_small_pkkd --config.data_dir=/path/to/data
  (eval.py evaluates the student)

Expected result: top-1 95.03% for the PKKD ANN (paper, CIFAR-10 table). Xu et
al., "Kernel Based Progressive Distillation for Adder Neural Networks",
NeurIPS 2020; not yet measured with this code.
"""

import ml_collections

from configs import cifar10_vgg_small


def get_config() -> ml_collections.ConfigDict:
  """configs/cifar10_vgg_small.py with PKKD."""
  config = cifar10_vgg_small.get_config()
  config.distill = 'pkkd'
  return config
