"""The persistent compilation cache (`cli.enable_compilation_cache`) across processes: what one
process compiles the next loads (this JAX does keep CPU executables), a writer killed
mid-write leaves nothing a later run reads, and an unreadable entry is dropped and rewritten."""

import json
import os
import subprocess
import sys

from helpers import subprocess_env

# One jitted program (compiled, or loaded from the cache), and the cache's hit / miss events.
PROGRAM = r"""
import json, os, pathlib, sys
import jax, jax.numpy as jnp, numpy as np
from googlenet_jax.tools import cli
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
cli.enable_compilation_cache(min_compile_secs=0.0)
if sys.argv[1] == "killed":  # the process dies half way through writing the entry
  def half_then_exit(self, data):
    with open(self, "wb") as f:
      f.write(data[:len(data) // 2])
    os._exit(9)
  from jax._src import path as jax_path  # JAX's cache files: etils' epath where installed
  pathlib.Path.write_bytes = type(jax_path.Path(os.getcwd())).write_bytes = half_then_exit
x = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
value = float(jax.jit(lambda x: jnp.tanh(jnp.sin(x) @ x.T).sum())(x))
print(json.dumps({"value": value,
                  "hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses")}))
"""


def _run(cache, mode="normal"):
  proc = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                        env=subprocess_env(JAX_CACHE_DIR=str(cache)), timeout=300)
  return proc


def _ok(cache):
  proc = _run(cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Error reading persistent compilation cache" not in proc.stderr, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _entries(cache):
  return sorted(n for n in os.listdir(cache) if n.endswith("-cache"))


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
  first, _ = _ok(tmp_path)
  assert first["misses"] >= 1 and first["hits"] == 0, first
  assert _entries(tmp_path)
  second, _ = _ok(tmp_path)
  assert second["hits"] >= 1 and second["misses"] == 0, second
  assert second["value"] == first["value"]


def test_a_writer_killed_mid_write_leaves_no_entry_and_the_next_run_rewrites_it(tmp_path):
  killed = _run(tmp_path, "killed")
  assert killed.returncode == 9, killed.stderr[-3000:]
  assert not _entries(tmp_path)  # only the temporary file, which nothing reads
  after, _ = _ok(tmp_path)
  assert after["misses"] >= 1 and after["hits"] == 0, after
  again, _ = _ok(tmp_path)
  assert again["hits"] >= 1 and again["misses"] == 0, again


def test_an_unreadable_entry_is_dropped_and_rewritten(tmp_path):
  _ok(tmp_path)
  for name in _entries(tmp_path):  # e.g. written by another tool, cut short by a full disk
    path = tmp_path / name
    path.write_bytes(path.read_bytes()[:100])
  healed, stderr = _ok(tmp_path)
  assert healed["hits"] == 0 and "dropping the unreadable entry" in stderr, (healed, stderr)
  again, _ = _ok(tmp_path)
  assert again["hits"] >= 1 and again["misses"] == 0, again
