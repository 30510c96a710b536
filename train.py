r"""Trains an AdderNet (or its CNN baseline) from an ml_collections config.

  python train.py --config configs/digits_lenet5.py --workdir /tmp/digits
  python train.py --config configs/cifar10_resnet20.py --workdir DIR \
      --config.data_dir=/path/to/cifar10 [--config.KEY=VALUE ...]

Rerunning the same command with the same --workdir resumes from the last
checkpoint. Several hosts: add --coordinator_address=HOST:PORT
--num_processes=N --process_id=I on every host (or none of them where JAX
detects the cluster, e.g. TPU pods, SLURM). The last line printed is one JSON
object (step, epoch, train_loss, eval_top1, ...). This file is intentionally
thin: the work is in `addernet_jax.train_lib.train_and_evaluate`.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from addernet_jax import cli
from addernet_jax import train_lib
import configs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics "
                    "(rerun with the same one to resume).")
config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of "
                    "process 0 (jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    return cli.print_error(f"unexpected arguments: {argv[1:]}")
  train_lib.preemption_lib.exit_at_second_interrupt()
  try:
    with cli.stdout_kept_for_the_result():
      train_lib.parallel.initialize_distributed(
          coordinator_address=FLAGS.coordinator_address,
          num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
      cli.warn_unknown_config_fields(
          FLAGS.config, configs.shipped_configs().values())
      with cli.missing_config_fields_named():
        summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (*cli.USER_ERRORS, train_lib.NonFiniteLossError) as e:
    return cli.print_error(e)
  except Exception as e:  # pylint: disable=broad-except
    cli.exit_if_peer_failed(e)  # another host died: one line, exit 1
    raise
  print(cli.json_line(summary), flush=True)
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
