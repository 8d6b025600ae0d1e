"""Shorter cold starts: the two places where start-up time goes to something other than XLA
compiling the network (numbers from the 2-core test VM, benchmarks/NOTES.md, session 5).

- `unrolled_threefry()`: parameter initialisation is ~60 threefry hashes (one per key split and
  one per random tensor). On CPU, JAX lowers each as a rolled 5-iteration `while` loop, which
  XLA:CPU compiles into ~13 separate kernels: ~850 kernels and ~20 s to compile `model.init`,
  against ~10 s when the hash is emitted unrolled (one fused kernel per call). The values are
  the same bits either way (tested). JAX keeps the rolled form on CPU because it compiles
  faster inside large programs; in the train step (dropout masks) it does, so only the
  initialisation uses the unrolled one.
- `gc_paused()`: tracing and lowering a step allocates millions of short-lived Python
  objects; the cyclic garbage collector's passes over them are ~20% of the lowering time
  (3.4 -> 2.7 s for the classic train step).

Both are start-up settings only; neither changes a computed value.
"""

from __future__ import annotations

import contextlib
import gc


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


def _threefry_cpu_rules():
  """(registry, primitive, unrolled rule), or None where this JAX keeps them elsewhere. These
  are JAX internals; a JAX that moves them simply gets the default (rolled) lowering."""
  try:
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
    registry = mlir._platform_specific_lowerings["cpu"]  # pylint: disable=protected-access
    primitive = threefry2x32.threefry2x32_p
    unrolled = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    if primitive not in registry:
      return None
    return registry, primitive, unrolled, mlir
  except (ImportError, AttributeError, KeyError, TypeError):
    return None


@contextlib.contextmanager
def unrolled_threefry():
  """Programs lowered inside this block emit the threefry hash unrolled on CPU (the form JAX
  uses on GPU/TPU). Only lowering is affected: a program compiled inside and called later
  keeps its form, and programs lowered outside keep the default."""
  found = _threefry_cpu_rules()
  if found is None:
    yield
    return
  registry, primitive, unrolled, mlir = found
  saved = registry[primitive]
  mlir.register_lowering(primitive, unrolled, platform="cpu")
  try:
    yield
  finally:
    registry[primitive] = saved


def unrolled_threefry_available() -> bool:
  return _threefry_cpu_rules() is not None
