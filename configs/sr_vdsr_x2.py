"""AdderSR VDSR, x2 (Song et al., CVPR 2021; docs/addersr.md).

VDSR (20 layers of 3x3, 64 channels, on the Y channel, global residual over
the bicubic-interpolated input) whose 18 inner convolutions are adder units
(self-shortcut, BatchNorm, learnable power activation); the first and last
convolutions multiply. Same data, loss and optimiser as configs/sr_edsr_x2.py
(L1, Adam); LR patches of 24 (HR 48, about VDSR's 41x41).

Run:
  python train.py --config configs/sr_vdsr_x2.py --workdir DIR \
      --config.data_dir=/path/DIV2K_train_HR --config.eval_data_dir=/path/Set5
  CNN baseline: add --config.conv=mult.

Expected result (paper, x2, Set5 PSNR): AdderSR VDSR 37.37 dB, the CNN
(VDSR) 37.53 dB. Not reproduced here.
"""

import ml_collections

from configs import sr_edsr_x2


def get_config() -> ml_collections.ConfigDict:
  """sr_edsr_x2's recipe for VDSR on the Y channel."""
  config = sr_edsr_x2.get_config()
  config.model = 'vdsr'
  config.patch_size = 24
  return config
