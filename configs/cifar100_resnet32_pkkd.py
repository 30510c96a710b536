"""CIFAR-100, ResNet-32 AdderNet with PKKD (kernel based distillation).

The recipe of configs/cifar100_resnet32.py with config.distill = 'pkkd':
the adder network learns from a CNN twin trained alongside it
(docs/pkkd.md).

Run:
  python train.py --config configs/cifar100_resnet32_pkkd.py \
      --workdir /tmp/cifar100_resnet32_pkkd --config.data_dir=/path/to/data
  python eval.py --config configs/cifar100_resnet32_pkkd.py \
      --checkpoint /tmp/cifar100_resnet32_pkkd --config.data_dir=/path/to/data
  (eval.py evaluates the student)

Expected result: the paper reports CIFAR-100 ResNet-32 too; its figure is not
quoted here (not checked against the paper's table). Xu et al., "Kernel Based
Progressive Distillation for Adder Neural Networks", NeurIPS 2020; not yet
measured with this code.
"""

import ml_collections

from configs import cifar100_resnet32


def get_config() -> ml_collections.ConfigDict:
  """configs/cifar100_resnet32.py with PKKD."""
  config = cifar100_resnet32.get_config()
  config.distill = 'pkkd'
  return config
