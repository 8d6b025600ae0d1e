"""Shared set-up of the command-line tools (predict, evaluate, convert, summary): quiet logs,
the compilation cache, host-memory reuse, and user errors as one line on stderr with exit
status 2."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Optional

USAGE_ERROR = 2


def configure_logging(fmt: str = "%(levelname)s %(message)s", libraries: int = logging.ERROR
                      ) -> None:
  """Our messages (logger "googlenet_jax") at INFO on stderr; absl's (Orbax, TFDS) at
  `libraries` and above."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity({logging.WARNING: absl_logging.WARNING}.get(
      libraries, absl_logging.ERROR))
  ours = logging.getLogger("googlenet_jax")
  ours.setLevel(logging.INFO)
  if not ours.handlers:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    ours.addHandler(handler)
    ours.propagate = False


def enable_compilation_cache() -> Optional[str]:
  """Turns on JAX's persistent compilation cache, in $JAX_CACHE_DIR or else
  ~/.cache/googlenet_jax/xla (`JAX_CACHE_DIR=off` leaves it off). A resumed or repeated run
  then loads its compiled steps instead of compiling them again (classic 224x224 train step on
  XLA:CPU: ~25 s cold, ~1 s from the cache). Returns the directory used, or None."""
  cache = os.environ.get("JAX_CACHE_DIR")
  if cache is None:
    cache = os.path.join(os.path.expanduser("~"), ".cache", "googlenet_jax", "xla")
  if cache.strip().lower() in ("", "0", "off", "none"):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return cache


def setup() -> None:
  """A tool's process set-up, first thing in its `main`: TensorFlow's C++ logs quiet and off
  the accelerators, our messages at INFO, the libraries' (Orbax, TFDS, absl) at ERROR,
  compilation cache on, and on CPU `googlenet_jax.cpu.setup_process()`."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  cpu.setup_process()
  configure_logging()
  enable_compilation_cache()
  from googlenet_jax.train import input_pipeline  # pylint: disable=import-outside-toplevel
  input_pipeline.keep_tensorflow_off_accelerators()


def model_ops():
  """The ops the tools build their model with: `googlenet_jax.cpu.ops_for_backend()`."""
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  return cpu.ops_for_backend()


def define_model_flags(flags) -> None:
  """--workdir / --checkpoint: the model directory a tool reads (absl `flags` module)."""
  flags.DEFINE_string("workdir", None, "Model directory (train.py's --workdir, or "
                      "googlenet_jax.tools.convert's --out): its newest checkpoint.")
  flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (DIR/checkpoints/STEP, "
                      "DIR/best/STEP) instead of --workdir.")


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_ERROR)


@contextlib.contextmanager
def user_errors():
  """ValueError (ModelDirError, DatasetError, config problems) and missing files become
  `error: ...` and exit status 2, without a traceback."""
  try:
    yield
  except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
    fail(str(e))
