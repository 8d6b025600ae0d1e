"""Shared set-up of the command-line programs (the tools and train.py): absl flags, quiet logs,
the compilation cache, host-memory reuse, and user errors as one line on stderr with exit
status 2."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Optional, Sequence

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


def default_cache_dir() -> str:
  """$JAX_CACHE_DIR, or else ~/.cache/googlenet_jax/xla: outside any checkout, so the next run,
  the next clone and the test suite's subprocesses share one cache."""
  cache = os.environ.get("JAX_CACHE_DIR")
  if cache is None:
    cache = os.path.join(os.path.expanduser("~"), ".cache", "googlenet_jax", "xla")
  return cache


def enable_compilation_cache(min_compile_secs: float = 1.0) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `default_cache_dir()` (`JAX_CACHE_DIR=off`
  leaves it off), for programs that took at least `min_compile_secs` to compile. A resumed or
  repeated run then loads its compiled steps instead of compiling them again (classic 224x224
  train step on XLA:CPU: ~25 s cold, ~1 s from the cache). Entries are written whole or not at
  all (`_install_atomic_cache_writes`), so several processes may share the directory and one
  killed mid-write leaves nothing behind that a later run would read. Returns the directory
  used, or None."""
  cache = default_cache_dir()
  if cache.strip().lower() in ("", "0", "off", "none"):
    return None
  import jax  # pylint: disable=import-outside-toplevel
  _install_atomic_cache_writes()
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  _remove_stale_partial_writes(cache)
  return cache


_PARTIAL = ".partial"


def _install_atomic_cache_writes() -> bool:
  """JAX writes a cache entry in place (`Path.write_bytes`) and never replaces one that
  exists: a process killed mid-write (or a full disk) leaves a truncated entry that every later
  run fails to read, warns about and compiles again. This swaps JAX's file cache for one that
  writes each entry to a temporary file in the same directory and renames it into place (readers
  see the whole entry or none), and that deletes an entry it finds unreadable so that the next
  compile rewrites it. Returns False where this JAX's cache has another shape (left as it is)."""
  try:
    from jax._src import compilation_cache, lru_cache  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  base = getattr(compilation_cache, "LRUCache", None)
  suffix = getattr(lru_cache, "_CACHE_SUFFIX", None)
  decompress = getattr(compilation_cache, "decompress_executable", None)
  if base is None or suffix is None or decompress is None:
    return False
  if getattr(base, "writes_atomically", False):
    return True

  class AtomicLRUCache(base):  # pylint: disable=too-few-public-methods
    """JAX's LRUCache with whole-entry writes and unreadable entries dropped."""
    writes_atomically = True

    def _local(self) -> bool:
      return (not getattr(self, "eviction_enabled", False)
              and lru_cache._is_local_filesystem(str(self.path)))  # pylint: disable=protected-access

    def get(self, key):
      value = super().get(key)
      if value is None or not self._local():
        return value
      try:
        decompress(value)
      except Exception:  # pylint: disable=broad-except
        logging.getLogger("googlenet_jax").warning(
            "compilation cache: dropping the unreadable entry %s", key)
        (self.path / f"{key}{suffix}").unlink(missing_ok=True)
        return None
      return value

    def put(self, key, value):
      if not key or not self._local():
        return super().put(key, value)
      path = self.path / f"{key}{suffix}"
      if path.exists():
        return None
      partial = self.path / f".{key}.{os.getpid()}.{threading.get_ident()}{_PARTIAL}"
      try:
        partial.write_bytes(value)
        os.replace(partial, path)
      finally:
        partial.unlink(missing_ok=True)
      return None

  compilation_cache.LRUCache = AtomicLRUCache
  compilation_cache.reset_cache()  # a cache opened before uses the new class from now on
  return True


def _remove_stale_partial_writes(cache: str, older_than_secs: float = 3600.0) -> None:
  """The temporary files of writers that were killed (an hour old: no writer takes that long)."""
  now = time.time()
  try:
    names = os.listdir(cache)
  except OSError:
    return
  for name in names:
    if name.endswith(_PARTIAL):
      path = os.path.join(cache, name)
      with contextlib.suppress(OSError):
        if now - os.path.getmtime(path) > older_than_secs:
          os.unlink(path)


def setup(configure_jax: Optional[Callable[[], None]] = None, *,
          log_format: str = "%(levelname)s %(message)s", libraries: int = logging.ERROR) -> None:
  """A program's process set-up (the tools' and train.py's), first thing in its `main`, in this
  order: TensorFlow's C++ logs quiet; `googlenet_jax.cpu.setup_process()`, before JAX starts its
  threads (oneDNN's OpenMP threads wait passively; freed host memory is reused, so XLA:CPU's
  per-step temporaries are not page-faulted in anew every step; GOOGLENET_JAX_HOST_MALLOC=system:
  off); `configure_jax()`, the program's JAX configuration, before JAX initialises; the
  compilation cache; our messages at INFO in `log_format` and the libraries' (Orbax, TFDS, absl)
  at `libraries`; TensorFlow off the accelerators."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  cpu.setup_process()
  if configure_jax is not None:
    configure_jax()
  enable_compilation_cache()
  configure_logging(log_format, libraries)
  from googlenet_jax.train import input_pipeline  # pylint: disable=import-outside-toplevel
  input_pipeline.keep_tensorflow_off_accelerators()


def simulate_cpu_devices(count: Optional[int]) -> None:
  """JAX's CPU backend with `count` devices (a --cpu_devices flag; None: as configured), before
  JAX initialises."""
  if count:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update("jax_num_cpu_devices", count)


def model_ops():
  """The ops the tools build their model with: `googlenet_jax.cpu.ops_for_backend()`."""
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  return cpu.ops_for_backend()


def define_model_flags(values, argv: Sequence[str], config_help: str) -> None:
  """--workdir / --checkpoint, the model directory a tool reads, and --config FILE (with
  --config.field=value overrides, which ml_collections reads from `argv` here), in the absl
  FlagValues `values`."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Model directory (train.py's --workdir, or "
                      "googlenet_jax.tools.convert's --out): its newest checkpoint.",
                      flag_values=values)
  flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (DIR/checkpoints/STEP, "
                      "DIR/best/STEP) instead of --workdir.", flag_values=values)
  config_flags.DEFINE_config_file("config", None, config_help, flag_values=values,
                                  lock_config=False, sys_argv=list(argv))


def parse_flags(define: Callable[[Any, list[str]], None], argv: Optional[Sequence[str]] = None,
                doc: str = "", *, positional: bool = False) -> tuple[Any, list[str]]:
  """A tool's absl flags, in a FlagValues of their own (a tool can run twice in one process):
  `define(flag_values, command_line)` defines them, `argv` (default: sys.argv's arguments) is
  parsed. --help / -h prints `doc` and the flags on stdout and exits 0; an unknown flag, a bad
  value, a --config.x=y override of no field or (unless `positional`) an argument that is no flag
  is `error: ...` and exit status 2. Returns (the flag values, the other arguments)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  command_line = list(sys.argv if argv is None else [sys.argv[0], *argv])
  values = flags.FlagValues()
  flags.DEFINE_bool("help", False, "Show this help.", short_name="h", flag_values=values)
  try:
    define(values, command_line)
    rest = values(command_line)
  except flags.Error as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.x=y override
    msg = str(e.args[0] if e.args else e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    fail(f"bad --config override ({msg}); the fields are those of the --config file")
  if values.help:
    lines = values.get_help(include_special_flags=False).splitlines()
    print(doc.rstrip() + "\n\nflags:\n" + "\n".join(l for l in lines if l.startswith(" ")))
    sys.exit(0)
  if len(rest) > 1 and not positional:
    fail(f"unexpected arguments: {' '.join(rest[1:])}")
  return values, rest[1:]


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
