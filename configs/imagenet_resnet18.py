"""ImageNet (ILSVRC 2012), ResNet-18 AdderNet.

Paper recipe: SGD lr 0.1 with a cosine decay over 150 epochs, momentum 0.9,
weight decay 1e-4, eta 0.2 (adaptive learning rate), global batch 256;
standard ImageNet augmentation (RandomResizedCrop 224 and horizontal flip for
training; resize 256 and center crop 224 for evaluation), streamed from an
ImageFolder (train/ and val/ class folders, as prepared for
pytorch/examples/imagenet) by Grain worker processes. The paper trains with
Nesterov momentum; this application uses the official release's heavy-ball
SGD (docs/design.md §1).

Run:
  python train.py --config configs/imagenet_resnet18.py \
      --workdir /tmp/imagenet_resnet18 --config.data_dir=/path/to/imagenet
  (CNN baseline: add --config.conv=mult; several hosts: see docs/usage.md.)

Expected result: top-1 66.8% / top-5 87.4% (AdderNet; the official model zoo later reports 67.0% / 87.6%), 69.8% / 89.1% (CNN)
on the ImageNet validation set (paper, Table 2); not yet measured with this
code.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """ImageNet ResNet-18 with the paper's recipe."""
  config = default.get_base_config()
  config.dataset = 'imagenet2012'  # 1,281,167 train / 50,000 val, 224x224x3.
  config.model = 'resnet18'
  config.num_classes = 1000
  config.num_epochs = 150
  config.weight_decay = 1e-4  # Paper's ImageNet value (CIFAR: 5e-4).
  config.eval_batch_size = 250  # Divides the 50,000 validation images.
  # Checkpoint every 2,000 steps (an epoch is 5,004 steps at batch 256).
  config.checkpoint_every_steps = 2000
  config.log_every_steps = 100
  # BN re-estimation is only implemented for in-memory datasets.
  config.recalibrate_bn_batches = 0
  return config
