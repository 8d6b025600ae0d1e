"""Train GoogLeNet: python train.py --config configs/default.py --workdir DIR [--config.x=y].

Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the cluster's
environment, which jax.distributed.initialize() reads, with --distributed).
"""

import logging
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
try:  # (the --config.x=y overrides are applied here, at definition)
  config_flags.DEFINE_config_file("config", "configs/default.py", "Training configuration.",
                                  lock_config=True)
except (AttributeError, KeyError, TypeError, ValueError) as e:
  msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
  print(f"error: bad --config override ({msg}); the fields are those of the --config file",
        file=sys.stderr)
  sys.exit(2)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and plots go.", required=True)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's "
                  "environment (SLURM, TPU pods, ...).")
flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices (testing).")
flags.DEFINE_string("cpu_collectives", None, "CPU collectives for multi-process CPU runs "
                    "(e.g. gloo).")


def _stop_before_training(signum, frame):
  del frame
  print(f"stopped by signal {signum} before training started; nothing to save", file=sys.stderr)
  sys.exit(0)


def _configure_jax():
  """--cpu_devices, --config.float64, --cpu_collectives and the multi-host set-up, before JAX
  initialises."""
  import jax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.tools import cli  # pylint: disable=import-outside-toplevel
  cli.simulate_cpu_devices(FLAGS.cpu_devices)
  if FLAGS.config.float64:
    jax.config.update("jax_enable_x64", True)
  if FLAGS.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", FLAGS.cpu_collectives)
  if FLAGS.coordinator_address or FLAGS.distributed:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def _missing_fields(config) -> list[str]:
  """The fields configs/default.py sets that `config` lacks (the defaults live there alone)."""
  from configs import default  # pylint: disable=import-outside-toplevel
  return sorted(set(default.get_config()) - set(config))


def main(argv):
  del argv
  # SIGTERM/SIGINT: until the training loop takes over (and saves), stop without a traceback.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _stop_before_training)
  try:
    missing = _missing_fields(FLAGS.config)  # a --config file that failed to load raises here
  except (OSError, SyntaxError, AttributeError) as e:
    print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()),
          file=sys.stderr)
    sys.exit(2)
  if missing:
    print(f"error: the config has no field {', '.join(map(repr, missing))}: start from "
          "configs/default.py's get_config(), which sets every field", file=sys.stderr)
    sys.exit(2)
  from googlenet_jax.tools import cli  # pylint: disable=import-outside-toplevel
  # Our progress at INFO; the libraries' (Orbax, TFDS) INFO chatter stays out of the way.
  cli.setup(_configure_jax, log_format="%(asctime)s %(levelname)s %(message)s",
            libraries=logging.WARNING)
  import jax  # pylint: disable=import-outside-toplevel
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train.sources import DatasetError  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train.checkpointing import WorkdirLocked  # pylint: disable=import-outside-toplevel
  on_cpu = jax.default_backend() == "cpu"
  try:
    # The network's kernels: by default XLA:CPU's faster ones on CPU, plain lax elsewhere.
    ops = cpu.ops_named(FLAGS.config.ops)
    if ops is cpu.ONEDNN and not cpu.onednn.available():
      ops = cpu.FAST_XLA  # (onednn.available() warned why)
    result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir, ops=ops,
                                         fast_init=on_cpu)
  except (ValueError, DatasetError, FloatingPointError, WorkdirLocked) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_index() == 0:
    if result.get("stopped_early"):
      print(f"stopped at step {result['step']} by a signal; checkpoint saved in "
            f"{FLAGS.workdir}/checkpoints; run the same command to resume")
    else:
      print(f"final eval at step {result['step']}: top-1 {result.get('top1', float('nan')):.4f}"
            f" top-5 {result.get('top5', float('nan')):.4f} loss "
            f"{result.get('loss', float('nan')):.4f} on {int(result.get('count', 0))} examples")


if __name__ == "__main__":
  app.run(main)
