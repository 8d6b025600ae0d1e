"""Host-memory set-up for XLA:CPU: keep freed memory for reuse instead of faulting it in anew.

XLA:CPU allocates each execution's temporaries as one block (the classic train step at batch
32, 224x224: 1.9 GiB). By default JAX runs CPU executions on a worker thread, glibc serves a
block that large to such a thread from a fresh `mmap` and unmaps it when the step ends, so every
step touches its temporaries through ~530,000 page faults (4 KiB each, zero-filled by the
kernel): ~15-20% of the train step on the 2-core test VM (benchmarks/NOTES.md).
`reuse_freed_memory()` makes glibc serve large blocks from its main heap and never trim it, and
runs CPU executions on the calling (main) thread (`jax_cpu_enable_async_dispatch=False`), whose
allocations come from that heap. From the second step on the same pages are reused (measured:
~530,000 -> ~20,000 faults per step).

The costs: the process keeps its peak heap (freed memory is not returned to the system), and
JAX's CPU dispatch is synchronous (a CPU computation returns when it is done; the accelerator
backends are not affected). Both suit a process that runs one model step after step (train.py,
the benchmark, evaluation). Call it before JAX creates its CPU backend (the first computation
or `jax.devices()`). `GOOGLENET_JAX_HOST_MALLOC=system` (or `0`/`off`) leaves glibc and JAX at
their defaults. Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "GOOGLENET_JAX_HOST_MALLOC"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_applied = False


def reuse_freed_memory() -> bool:
  """glibc's malloc without mmap'd blocks or trimming, and JAX's CPU executions on the calling
  thread (see the module doc).
  Returns whether the settings are in effect (False: not glibc, or turned off by
  $GOOGLENET_JAX_HOST_MALLOC)."""
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV, "").strip().lower() in ("system", "0", "off", "false", "no"):
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  # Trim threshold -1 is SIZE_MAX inside glibc: the heap is never trimmed. mallopt returns 1 on
  # success.
  ok = all(mallopt(param, value) == 1 for param, value in
           ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  if ok:
    import jax  # pylint: disable=import-outside-toplevel
    try:  # (worker threads get their own glibc arenas, which mmap large blocks regardless)
      jax.config.update("jax_cpu_enable_async_dispatch", False)
    except (AttributeError, KeyError):  # a JAX without the option: the heap settings still help
      pass
  _applied = ok
  return ok


def applied() -> bool:
  """Whether `reuse_freed_memory()` has taken effect in this process."""
  return _applied
