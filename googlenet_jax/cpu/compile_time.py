"""Shorter cold starts: the two places where start-up time goes to something other than XLA
compiling the network (numbers from the 2-core test VM, benchmarks/NOTES.md).

- `unrolled_threefry()`: parameter initialisation is ~60 threefry hashes (one per key split and
  one per random tensor). On CPU, JAX lowers each as a rolled 5-iteration `while` loop, which
  XLA:CPU compiles into ~13 separate kernels: ~850 kernels and ~20 s to compile `model.init`,
  against ~10 s when the hash is emitted unrolled (one fused kernel per call). The values are
  the same bits either way (tested). JAX keeps the rolled form on CPU because it compiles
  faster inside large programs; in the train step (dropout masks) it does, so only the
  initialisation uses the unrolled one. Defined in `googlenet_jax.models` (the network's
  `init_variables` uses it) and re-exported here.
- `gc_paused()`: tracing and lowering a step allocates millions of short-lived Python
  objects; the cyclic garbage collector's passes over them are ~20% of the lowering time
  (3.4 -> 2.7 s for the classic train step).

Both are start-up settings only; neither changes a computed value.
"""

from __future__ import annotations

import contextlib
import gc

# The threefry lowering lives with the network's `init_variables`, which uses it.
from googlenet_jax.models import unrolled_threefry, unrolled_threefry_available


@contextlib.contextmanager
def gc_paused():
  """Python's cyclic garbage collector off for the duration (reference counting still frees
  almost everything); restored as it was afterwards."""
  enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if enabled:
      gc.enable()


__all__ = ["gc_paused", "unrolled_threefry", "unrolled_threefry_available"]
