"""Data parallelism: per-device steps compiled with `jax.pmap` or `jax.jit(jax.shard_map(...))`
over a 1-D mesh, batches placed to match, the state replicated."""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from googlenet_jax.cpu import compile_time
from googlenet_jax.train.state import AXIS

MODES = ("pmap", "shard_map")  # `Parallel`'s modes (config.parallel)


def _name(step: Callable) -> str:
  return getattr(step, "func", step).__name__


class _FirstCallWithoutGC:
  """A jitted/pmapped step whose first call (tracing, lowering and compiling it) runs with
  Python's garbage collector paused; other attributes (`lower`, ...) are the step's own."""

  def __init__(self, fn: Callable):
    self._fn = fn
    self._called = False

  def __call__(self, *args, **kwargs):
    if self._called:
      return self._fn(*args, **kwargs)
    with compile_time.gc_paused():
      out = self._fn(*args, **kwargs)
    self._called = True
    return out

  def __getattr__(self, name):
    return getattr(self._fn, name)


class Parallel:
  """Compiles per-device steps with `jax.pmap` or `jax.jit(jax.shard_map(...))` over a 1-D
  mesh of all devices, and places batches to match. The state is one replicated array tree in
  both modes (so checkpoints restore on any device count)."""

  def __init__(self, mode: str, devices: Optional[list] = None):
    self.mode = mode
    self.devices = list(devices) if devices is not None else jax.devices()
    # Auto axes: the same mesh type pmap builds, so states move between the two without copies.
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS,),
                                  axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def compile(self, step: Callable, donate_state: bool = False) -> Callable:
    if self.mode == "pmap":
      fn = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                    devices=self.devices)
    else:
      mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P())
      fn = jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
    if jax.process_count() == 1:
      return _FirstCallWithoutGC(fn)
    # Across processes, every process must reach the first collective within the CPU
    # collectives' set-up timeout (30 s for gloo), and compiling can take minutes on a loaded
    # machine: compile ahead of time, then wait for every process before the first call.
    if self.mode == "pmap":
      return self._compile_pmap_ahead(step)
    compiled = []

    def run(state, batch):
      if not compiled:
        with compile_time.gc_paused():
          compiled.append(fn.lower(state, batch).compile())
        multihost_utils.sync_global_devices(f"compiled {_name(step)}")
      return compiled[0](state, batch)

    return run

  def _compile_pmap_ahead(self, step: Callable) -> Callable:
    """Multi-process pmap, compiled before its first call. `jax.pmap(...).lower` fails on
    unmapped scalars (JAX 0.10), so the state's scalars travel as shape (1,) and are reshaped
    inside; the compiled program takes global arrays (the pmap axis over all devices)."""
    def unscalar(tree):
      return jax.tree.map(lambda x: jnp.reshape(x, (1,)) if jnp.ndim(x) == 0 else x, tree)

    def step_on_vectors(vector_state, batch, *, scalar_mask):
      state = jax.tree.map(lambda x, is_scalar: x.reshape(()) if is_scalar else x,
                           vector_state, scalar_mask)
      return step(state, batch)

    compiled = []

    def run(state, batch):
      if not compiled:
        mask = jax.tree.map(lambda x: jnp.ndim(x) == 0, state)
        fn = jax.pmap(functools.partial(step_on_vectors, scalar_mask=mask), axis_name=AXIS,
                      in_axes=(None, 0), out_axes=None, devices=self.devices)
        with compile_time.gc_paused():
          compiled.append(fn.lower(unscalar(state), batch).compile())
        multihost_utils.sync_global_devices(f"compiled {_name(step)}")
      batch_sharding = compiled[0].input_shardings[0][1]
      batch = jax.tree.map(
          lambda x, sharding: jax.make_array_from_process_local_data(sharding, x),
          batch, batch_sharding)
      return compiled[0](unscalar(state), batch)

    return run

  def batch(self, local_batch: dict) -> dict:
    """This process's numpy batch -> what the compiled step takes."""
    if self.mode == "pmap":
      n = len([d for d in self.devices if d.process_index == jax.process_index()])
      return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local_batch)

  def prefetch(self, local_batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
    """`self.batch` of each batch, `size` batches ahead of the one the step is running on.
    With shard_map the batches are device arrays, and JAX's copies to the devices are
    asynchronous: they overlap the steps already dispatched. (pmap takes the host arrays and
    copies them when it is called.)"""
    queue = collections.deque()
    for local in local_batches:
      queue.append(self.batch(local))
      if len(queue) > size:
        yield queue.popleft()
    while queue:
      yield queue.popleft()

  def replicate(self, tree: Any) -> Any:
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])
    return jax.tree.map(put, tree)
