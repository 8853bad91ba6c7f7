"""Train an LCM: python train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...]

LCD (distil a diffusion teacher) or LCF (fine-tune an LCM), chosen by config.mode. Resumes
automatically from DIR/checkpoints; writes DIR/final (diffusers layout) at the end.
configs/digits.py (config.reproduce = "digits") runs the whole Table 1 reproduction instead.
"""
import logging

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder: checkpoints, tensorboard, samples, final/")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_bool("multihost", False, "multi-host: let JAX detect the cluster (Cloud TPU, SLURM, MPI)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _DropLibraryInfo(logging.Filter):
    """orbax/jax log every checkpoint file at INFO; keep their warnings, drop the chatter."""

    def filter(self, record):
        noisy = any(p in record.pathname for p in ("/orbax/", "/jax/_src/"))
        return record.levelno >= logging.WARNING or not noisy


def main(argv):
    logging.getLogger().addFilter(_DropLibraryInfo())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropLibraryInfo())
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lcm_jax import digits, sharding, trainer
    sharding.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                              auto=FLAGS.multihost)
    reproduce = FLAGS.config.get("reproduce", "")
    if reproduce not in ("", "digits"):
        raise app.UsageError(f"config.reproduce {reproduce!r}: expected '' or 'digits'")
    out = digits.run(FLAGS.config, FLAGS.workdir) if reproduce else trainer.train(FLAGS.config, FLAGS.workdir)
    if out:
        logging.info("done: %s", out)
        print(f"exported {out}")


if __name__ == "__main__":
    app.run(main)
