"""ImageNet (ILSVRC 2012), ResNet-50 AdderNet.

Paper recipe: SGD lr 0.1 with a cosine decay over 150 epochs, momentum 0.9,
weight decay 1e-4, eta 0.2 (adaptive learning rate), global batch 256;
standard ImageNet augmentation (RandomResizedCrop 224 and horizontal flip for
training; resize 256 and center crop 224 for evaluation), streamed from an
ImageFolder (train/ and val/ class folders, as prepared for
pytorch/examples/imagenet) by Grain worker processes. The paper trains with
Nesterov momentum; this application uses the official release's heavy-ball
SGD (docs/design.md §1).

Run:
  python train.py --config configs/imagenet_resnet50.py \
      --workdir /tmp/imagenet_resnet50 --config.data_dir=/path/to/imagenet
  (CNN baseline: add --config.conv=mult; several hosts: see docs/usage.md.)

Expected result: top-1 74.9% / top-5 91.7% (AdderNet), 76.2% / 92.9% (CNN)
on the ImageNet validation set (paper, Table 2); not yet measured with this
code.
"""

import ml_collections

from configs import imagenet_resnet18


def get_config() -> ml_collections.ConfigDict:
  """ImageNet ResNet-50 with the paper's recipe (the ResNet-18 config's recipe)."""
  config = imagenet_resnet18.get_config()
  config.model = 'resnet50'  # Bottlenecks; 25.6M parameters.
  return config
