"""Train an LCM: python train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...]

LCD (distil a diffusion teacher) or LCF (fine-tune an LCM), chosen by config.mode. Resumes
automatically from DIR/checkpoints; writes DIR/final (diffusers layout) at the end.
configs/digits.py (config.reproduce = "digits") runs the whole Table 1 reproduction instead.
"""
import logging
import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "output folder: checkpoints, tensorboard, samples, final/")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: this process's index")
flags.DEFINE_bool("multihost", False, "multi-host: let JAX detect the cluster (Cloud TPU, SLURM, MPI)")
flags.DEFINE_bool("verbose", False, "full tracebacks for user errors (a bad config, path, file or data)")
flags.DEFINE_string("compile_cache", None, "JAX's persistent compilation cache folder, or 'off' (default: "
                    "$LCM_JAX_COMPILE_CACHE, $JAX_COMPILATION_CACHE_DIR, else ~/.cache/lcm_jax/jax)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


class _DropLibraryInfo(logging.Filter):
    """orbax/jax log every checkpoint file at INFO; keep their warnings, drop the chatter."""

    def filter(self, record):
        noisy = any(p in record.pathname for p in ("/orbax/", "/jax/_src/"))
        return record.levelno >= logging.WARNING or not noisy


class _HoldWriteErrors(logging.Filter):
    """orbax and asyncio log each failure of a background checkpoint write with its traceback
    (1,474 lines for one full disk) before the same error reaches the loop as one
    CheckpointWriteError. Hold their ERROR records: dropped when that error is what the run
    reports (its one line says it; --verbose shows them), printed at the end otherwise."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []
        self.mode = "hold"  # then "drop" (after a reported write error) or "pass"

    def filter(self, record):
        if record.levelno < logging.ERROR or not ("/orbax/" in record.pathname or record.name == "asyncio"):
            return True
        if self.mode == "hold":
            self.held.append(record)
        return self.mode == "pass"

    def release(self, drop: bool) -> None:
        held, self.held, self.mode = self.held, [], "drop" if drop else "pass"
        for record in [] if drop else held:
            for handler in logging.getLogger().handlers:
                handler.handle(record)


def resume_command(argv: list[str], learning_rate: float) -> str:
    """The command line ``argv`` with ``--config.learning_rate`` set to ``learning_rate``."""
    kept = [a for a in argv[1:] if not a.startswith("--config.learning_rate")]
    return shlex.join(["python", "train.py", *kept, f"--config.learning_rate={learning_rate:g}"])


def _nonfinite_hint(e) -> str:
    from lcm_jax.loop import NonFiniteError
    if not isinstance(e, NonFiniteError):
        return ""
    start = f"step {e.last_good_step}" if e.last_good_step is not None else "step 0"
    return f"to resume from {start} with a 10x lower learning rate: " + resume_command(
        sys.argv, FLAGS.config.learning_rate / 10)


def main(argv):
    filters = [_DropLibraryInfo()] + ([] if FLAGS.verbose else [_HoldWriteErrors()])
    for target in [logging.getLogger(), *logging.getLogger().handlers]:
        for f in filters:
            target.addFilter(f)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from lcm_jax import compile_cache, errors, sharding, trainer
    from lcm_jax.digits.run import run as run_digits
    from lcm_jax.checkpoint import CheckpointWriteError

    def run():
        compile_cache.enable(FLAGS.compile_cache)
        sharding.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                  auto=FLAGS.multihost)
        reproduce = FLAGS.config.get("reproduce", "")
        if reproduce not in ("", "digits"):
            raise errors.ConfigError(f"config.reproduce {reproduce!r}: expected '' or 'digits'")
        write_failed = False
        try:
            out = run_digits(FLAGS.config, FLAGS.workdir) if reproduce else trainer.train(FLAGS.config, FLAGS.workdir)
        except CheckpointWriteError:
            write_failed = True
            raise
        finally:
            for f in filters[1:]:
                f.release(drop=write_failed)
        logging.info("done: %s", out)
        print(f"exported {out}")

    errors.run_cli("train.py", run, FLAGS.verbose, _nonfinite_hint)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, plus one line (not a traceback) for a config file or ``--config.key`` that
    ml_collections cannot load or override."""
    try:
        rest = app.parse_flags_with_usage(argv)
        FLAGS.config.get("mode")  # ml_collections reports a config file it could not load on first use
        return rest
    except (AttributeError, KeyError, OSError, TypeError, ValueError) as e:
        if "--verbose" in argv:
            raise
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        missing = [o for o in overrides if isinstance(e, (AttributeError, KeyError)) and str(e).strip("\"'")
                   in o.split(".")]
        what = (f"{missing[0]}: the config has no such key" if missing
                else f"{type(e).__name__}: {str(e).strip().splitlines()[-1].strip()}" if str(e).strip() else type(e).__name__)
        print(f"train.py: error: cannot load the config ({what}); --verbose for the traceback", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
