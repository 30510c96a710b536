"""ImageNet, ResNet-18 AdderNet with PKKD (kernel based distillation).

The recipe of configs/imagenet_resnet18.py with config.distill = 'pkkd':
the adder network learns from a CNN twin trained alongside it
(docs/pkkd.md).

Only the last adder layer of every block is distilled ('layer*_*/conv2'): each
distilled layer carries a CxC linear transformation (up to 2048x2048 on
ResNet-50), and the paper does not say which layers it uses (docs/pkkd.md).

Run:
  python train.py --config configs/imagenet_resnet18_pkkd.py \
      --workdir /tmp/imagenet_resnet18_pkkd --config.data_dir=/path/to/data
  python eval.py --config configs/imagenet_resnet18_pkkd.py \
      --checkpoint /tmp/imagenet_resnet18_pkkd --config.data_dir=/path/to/data
  (eval.py evaluates the student)

Expected result: the paper reports ImageNet ResNet-18 too; its figure is not
quoted here (not checked against the paper's table). Xu et al., "Kernel Based
Progressive Distillation for Adder Neural Networks", NeurIPS 2020; not yet
measured with this code.
"""

import ml_collections

from configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  """configs/imagenet_resnet18.py with PKKD."""
  config = imagenet_resnet18.get_config()
  config.distill = 'pkkd'
  config.pkkd.layers = 'layer*_*/conv2'  # Last adder layer of each block.
  return config
