"""A tiny, fast config for tests and smoke checks (not an experiment).

LeNet-5-BN on the bundled scikit-learn digits for a handful of steps, with a
small evaluation subset.

Run:
  python train.py --config configs/smoke.py --workdir /tmp/addernet-smoke

Expected result: finishes in seconds on a CPU; the accuracy is meaningless
(a few steps).
"""

import ml_collections

from configs import digits_lenet5


def get_config() -> ml_collections.ConfigDict:
  """Three steps of digits LeNet-5-BN with batch 16."""
  config = digits_lenet5.get_config()
  config.batch_size = 16
  config.num_train_steps = 3  # Overrides num_epochs.
  config.num_epochs = 1
  config.eval_batch_size = 32
  config.eval_max_examples = 40  # Two evaluation batches, the last padded.
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.recalibrate_bn_batches = 2
  config.progress_bar = False
  return config
