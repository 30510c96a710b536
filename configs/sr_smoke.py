"""A tiny, fast super-resolution config for tests and smoke checks (not an
experiment).

A 1-block, 8-channel AdderSR EDSR x2 for a few steps on 8x8 LR patches.
data_dir and eval_data_dir must be given (any folders of images, e.g. a few
of scikit-image's sample images; tests/test_sr.py writes some).

Run:
  python train.py --config configs/sr_smoke.py --workdir /tmp/sr-smoke \
      --config.data_dir=HR_TRAIN --config.eval_data_dir=HR_TEST

Expected result: finishes in seconds on a CPU; PSNR is meaningless (a few
steps).
"""

import ml_collections

from configs import sr_edsr_x2


def get_config() -> ml_collections.ConfigDict:
  """Four steps of a 1-block, 8-channel EDSR x2, batch 8."""
  config = sr_edsr_x2.get_config()
  config.num_blocks = 1
  config.features = 8
  config.patch_size = 8
  config.batch_size = 8
  config.num_train_steps = 4
  config.num_epochs = 1
  config.steps_per_epoch = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.progress_bar = False
  return config
