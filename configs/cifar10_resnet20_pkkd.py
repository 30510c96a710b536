"""CIFAR-10, ResNet-20 AdderNet with PKKD (kernel based distillation).

The recipe of configs/cifar10_resnet20.py with config.distill = 'pkkd':
the adder network learns from a CNN twin trained alongside it
(docs/pkkd.md).

Run:
  python train.py --config configs/cifar10_resnet20_pkkd.py \
      --workdir /tmp/cifar10_resnet20_pkkd --config.data_dir=/path/to/data
  python eval.py --config configs/cifar10_resnet20_pkkd.py \
      --checkpoint /tmp/cifar10_resnet20_pkkd --config.data_dir=/path/to/data
  (eval.py evaluates the student)

Expected result: top-1 92.96% for the PKKD ANN against 92.02% for the same ANN
trained without it (paper, CIFAR-10 table). Xu et al., "Kernel Based
Progressive Distillation for Adder Neural Networks", NeurIPS 2020; not yet
measured with this code.
"""

import ml_collections

from configs import cifar10_resnet20


def get_config() -> ml_collections.ConfigDict:
  """configs/cifar10_resnet20.py with PKKD."""
  config = cifar10_resnet20.get_config()
  config.distill = 'pkkd'
  return config
