"""Host-memory set-up for XLA:CPU: keep freed memory for reuse instead of faulting it in anew.

XLA:CPU allocates each execution's temporaries as one block (the classic train step at batch
32, 224x224: 1.9 GiB) on one of its worker threads. glibc serves a block that large from a
fresh `mmap` and unmaps it when the step ends, so every step touches its temporaries through
~500,000 page faults (4 KiB each, zero-filled by the kernel): about a fifth of the train step
on the 2-core test VM (benchmarks/NOTES.md). `reuse_freed_memory()` tells glibc to serve every
allocation from its main heap and never to trim it, so from the second or third step on the
same pages are reused and the faults stop (measured: 527,000 -> 0 faults per step).

The cost: the process keeps its peak heap (freed memory is not returned to the system), and
all threads allocate from one arena. Both suit a process that runs one model step after step
(train.py, the benchmark, evaluation). Call it before JAX starts its backend (the first
computation or `jax.devices()`): threads that have already allocated keep their own arenas.
`GOOGLENET_JAX_HOST_MALLOC=system` (or `0`/`off`) leaves glibc's defaults. Not glibc (macOS,
musl): nothing to do.
"""

from __future__ import annotations

import ctypes
import os
import platform

ENV = "GOOGLENET_JAX_HOST_MALLOC"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to one heap, no mmap'd blocks, no trimming (see the module doc).
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
           ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
  _applied = ok
  return ok


def applied() -> bool:
  """Whether `reuse_freed_memory()` has taken effect in this process."""
  return _applied
