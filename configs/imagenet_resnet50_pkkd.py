"""ImageNet, ResNet-50 AdderNet with PKKD (kernel based distillation).

The recipe of configs/imagenet_resnet50.py with config.distill = 'pkkd':
the adder network learns from a CNN twin trained alongside it
(docs/pkkd.md).

Only the last adder layer of every block is distilled ('layer*_*/conv3'): each
distilled layer carries a CxC linear transformation (up to 2048x2048 on
ResNet-50), and the paper does not say which layers it uses (docs/pkkd.md).

Run:
  python train.py --config configs/imagenet_resnet50_pkkd.py \
      --workdir /tmp/imagenet_resnet50_pkkd --config.data_dir=/path/to/data
  python eval.py --config configs/imagenet_resnet50_pkkd.py \
      --checkpoint /tmp/imagenet_resnet50_pkkd --config.data_dir=/path/to/data
  (eval.py evaluates the student)

Expected result: top-1 76.8% for the PKKD ANN-50, 0.6% above the CNN
ResNet-50's 76.2% (paper, abstract and ImageNet table). Xu et al., "Kernel
Based Progressive Distillation for Adder Neural Networks", NeurIPS 2020; not
yet measured with this code.
"""

import ml_collections

from configs import imagenet_resnet50


def get_config() -> ml_collections.ConfigDict:
  """configs/imagenet_resnet50.py with PKKD."""
  config = imagenet_resnet50.get_config()
  config.distill = 'pkkd'
  config.pkkd.layers = 'layer*_*/conv3'  # Last adder layer of each block.
  return config
