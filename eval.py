"""Evaluates a checkpoint (ours or an official PyTorch one) on the test split.

  python eval.py --config configs/cifar10_resnet20.py --checkpoint WORKDIR \
      [--which=best] --config.data_dir=/path/to/cifar10
  python eval.py --config configs/cifar10_resnet20.py \
      --torch_checkpoint ResNet20-AdderNet.pth --config.data_dir=...

The last line printed is one JSON object with top1, top5 (fractions), loss
and num_examples. With `--config.holdout_examples=N` the evaluation set is
the last N training examples, as in training.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from addernet_jax import train_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "The training config of the model (configs/*.py).",
    lock_config=True)
flags.DEFINE_string("checkpoint", None, "A training workdir (its "
                    "checkpoints/ folder is read).")
flags.DEFINE_enum("which", "latest", ["latest", "best"], "With --checkpoint: "
                  "the latest checkpoint or the best by eval_top1.")
flags.DEFINE_string("torch_checkpoint", None, "An official-layout PyTorch "
                    ".pth file (converted with addernet_jax.convert).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    return train_lib.cli_error(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.checkpoint is None) == (FLAGS.torch_checkpoint is None):
    return train_lib.cli_error("give exactly one of --checkpoint WORKDIR "
                               "and --torch_checkpoint FILE")
  try:
    if FLAGS.torch_checkpoint is not None:
      result = train_lib.evaluate_torch_checkpoint(FLAGS.config,
                                                   FLAGS.torch_checkpoint)
    else:
      result = train_lib.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint,
                                             which=FLAGS.which)
  except train_lib.USER_ERRORS as e:
    return train_lib.cli_error(e)
  print(json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=train_lib.cli_parse_flags)
