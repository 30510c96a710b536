r"""Evaluates a checkpoint (ours or an official PyTorch one) on the test split.

  python eval.py --config configs/cifar10_resnet20.py --checkpoint WORKDIR \
      [--which=best] --config.data_dir=/path/to/cifar10
      (--workdir WORKDIR, as train.py names it, is the same)
  python eval.py --config configs/cifar10_resnet20.py \
      --torch_checkpoint ResNet20-AdderNet.pth --config.data_dir=...

The last line printed is one JSON object with top1, top5 (fractions), loss
and num_examples; with --checkpoint and an in-memory dataset also
top1_recalibrated, the top-1 after re-estimating the BatchNorm statistics on
config.recalibrate_bn_batches training batches, as training reports it
(`--config.recalibrate_bn_batches=0` skips it and the loading of the
training split); for a super-resolution config (`config.task = "sr"`,
docs/addersr.md) psnr, ssim, num_images, bicubic_psnr and bicubic_ssim. With `--config.holdout_examples=N` the evaluation set is
the last N training examples, as in training.

Adversarial robustness (white-box, untargeted, L-infinity, pixels in [0, 1];
see addernet_jax/attacks.py):

  python eval.py --config configs/cifar10_resnet20.py \
      --torch_checkpoint ResNet20-AdderNet.pth --config.data_dir=... \
      --attacks=fgsm,bim7,pgd7,mim5,rfgsm5 [--attack_grad=both] \
      [--attack_eps=8/255] [--attack_step=2/255] [--attack_seed=0] \
      [--attack_max_examples=1000]

prints one table row per attack and gradient (clean and attacked top-1 on
the attacked examples) before the JSON line, which then also has an
"attacks" object with the rows.
"""

import os
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from addernet_jax import attacks as attacks_lib
from addernet_jax import cli
from addernet_jax import parallel
from addernet_jax import train_lib
import configs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "The training config of the model (configs/*.py).",
    lock_config=True)
flags.DEFINE_string("checkpoint", None, "A training workdir (its "
                    "checkpoints/ folder is read).")
flags.DEFINE_alias("workdir", "checkpoint")  # the name train.py gives it
flags.DEFINE_enum("which", "latest", ["latest", "best"], "With --checkpoint: "
                  "the latest checkpoint or the best by eval_top1.")
flags.DEFINE_string("torch_checkpoint", None, "An official-layout PyTorch "
                    ".pth file (converted with addernet_jax.convert).")
flags.DEFINE_list("attacks", [], "Adversarial attacks to run after the "
                  "evaluation, e.g. fgsm,bim7,pgd7,mim5,rfgsm5 (fgsm, bimN, "
                  "pgdN, mimN, rfgsmN: N gradient steps).")
flags.DEFINE_string("attack_eps", "8/255", "L-infinity radius in [0, 1] "
                    "pixel units (a number or a fraction like 8/255).")
flags.DEFINE_string("attack_step", "2/255", "Step size of the iterative "
                    "attacks (FGSM's step is eps).")
flags.DEFINE_enum("attack_grad", "both", ["official", "exact", "both"],
                  "The adder layers' gradient the attacker follows: the "
                  "official HardTanh-clipped backward, the exact derivative "
                  "of the forward, or both (one row each).")
flags.DEFINE_integer("attack_seed", 0, "Seed of the random starts (pgdN, "
                     "rfgsmN).")
flags.DEFINE_integer("attack_max_examples", -1, "> 0: attack only this "
                     "many evenly spaced examples of the evaluation split.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of "
                    "process 0 (jax.distributed), as for train.py.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    return cli.print_error(f"unexpected arguments: {argv[1:]}")
  if (FLAGS.checkpoint is None) == (FLAGS.torch_checkpoint is None):
    return cli.print_error("give exactly one of --checkpoint WORKDIR "
                           "and --torch_checkpoint FILE")
  cli.warn_unknown_config_fields(FLAGS.config,
                                 configs.shipped_configs().values())
  try:
    with cli.stdout_kept_for_the_result() as print_line:
      parallel.initialize_distributed(
          coordinator_address=FLAGS.coordinator_address,
          num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
      with cli.missing_config_fields_named():
        result = evaluate(print_line)
  except cli.USER_ERRORS as e:
    return cli.print_error(e)
  except KeyboardInterrupt:
    # Evaluation writes nothing, so nothing is lost by leaving at once; a
    # normal exit with computations in flight aborted in XLA's threads.
    cli.print_error("interrupted")
    sys.stdout.flush()
    os._exit(130)  # pylint: disable=protected-access
  except Exception as e:  # pylint: disable=broad-except
    cli.exit_if_peer_failed(e)  # another host died: one line, exit 1
    raise
  print(cli.json_line(result), flush=True)
  return 0


def evaluate(print_line: Callable[[str], None] = print) -> dict:
  """The evaluation (and attacks) the flags ask for, as the JSON line's
  object; the attack table's lines go to `print_line` as they come."""
  if train_lib.is_sr_task(FLAGS.config) and (FLAGS.torch_checkpoint
                                             or FLAGS.attacks):
    raise ValueError("--torch_checkpoint and --attacks are for "
                     "classification configs, not config.task='sr'")
  if FLAGS.attacks:  # Fail on a bad flag before the evaluation runs.
    attacks_lib.parse_attacks(FLAGS.attacks)
    attacks_lib.parse_size(FLAGS.attack_eps)
    attacks_lib.parse_size(FLAGS.attack_step)
  logging.info("evaluating on %s",
               parallel.describe_devices(parallel.make_mesh()))
  if FLAGS.torch_checkpoint is not None:
    result = train_lib.evaluate_torch_checkpoint(FLAGS.config,
                                                 FLAGS.torch_checkpoint)
  else:
    result = train_lib.evaluate_checkpoint(FLAGS.config, FLAGS.checkpoint,
                                           which=FLAGS.which)
  if FLAGS.attacks:
    caveat = attacks_lib.running_statistics_caveat(result)
    if caveat:
      logging.warning("%s", caveat)
    print_line(attacks_lib.TABLE_HEADER)
    result["attacks"] = attacks_lib.evaluate_attacks(
        FLAGS.config, FLAGS.attacks, checkpoint=FLAGS.checkpoint,
        which=FLAGS.which, torch_checkpoint=FLAGS.torch_checkpoint,
        gradient=FLAGS.attack_grad, eps=FLAGS.attack_eps,
        step=FLAGS.attack_step, seed=FLAGS.attack_seed,
        max_examples=FLAGS.attack_max_examples,
        on_row=lambda row: print_line(attacks_lib.format_row(row)))
  return result


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
