"""googlenet_jax.cpu.host_memory: with glibc kept from trimming and mmap-ing and the CPU
executions on the main thread, an XLA program's temporary buffer is reused from call to call
instead of being page-faulted in anew."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program with a 64 MiB temporary (jnp.sin(x) materialised for the transposed dot), allocated
# on XLA's worker thread like the train step's; minor page faults per call after warm-up.
_PROBE = textwrap.dedent("""
    import json, resource, sys
    from googlenet_jax.cpu import host_memory
    applied = host_memory.reuse_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((8192, 2048), jnp.float32)
    f = jax.jit(lambda x: jnp.sin(x).T @ jnp.cos(x)[:, :16])
    for _ in range(20):  # glibc's heap settles within a few calls
      f(x).block_until_ready()
    faults = []
    for _ in range(7):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    print(json.dumps({"applied": applied, "faults": sorted(faults), "temp": temp,
                      "async": jax.config.values["jax_cpu_enable_async_dispatch"]}))
""")


def _probe(malloc_env):
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": "", "GOOGLENET_JAX_HOST_MALLOC": malloc_env}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's mallopt only")
def test_temporaries_are_reused_instead_of_faulted_in():
  system = _probe("system")
  tuned = _probe("")
  assert not system["applied"] and tuned["applied"]
  assert system["async"] and not tuned["async"]
  assert system["temp"] >= 60 * 2**20
  pages = system["temp"] // 4096
  # glibc's default: every call faults the whole temporary in again.
  assert system["faults"][3] > 0.8 * pages, system
  # Reused: the median call takes (almost) no faults.
  assert tuned["faults"][3] < 0.05 * pages, tuned


def test_switched_off_by_the_environment(monkeypatch):
  from googlenet_jax.cpu import host_memory  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(host_memory, "_applied", False)
  for value in ("system", "0", "off"):
    monkeypatch.setenv(host_memory.ENV, value)
    assert host_memory.reuse_freed_memory() is False
    assert not host_memory.applied()
