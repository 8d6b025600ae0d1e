"""XLA:CPU's faster kernels for the network, and the process set-up of the entry points.

    from googlenet_jax import GoogLeNet, cpu
    model = GoogLeNet(variant="torchvision", ops=cpu.ops())

`ops()` is the network's convolution and pools (`googlenet_jax.ops.Ops`) on XLA:CPU's fastest
paths: oneDNN convolutions inside the compiled program (`onednn`, built and checked in a child
process on the first call: a few seconds, once per machine) where they work, matrix-product
gradients (`fast_ops`) otherwise. Nothing here runs on import; `setup_process()` is the
process-wide part (environment, malloc, JAX's CPU dispatch), for a program's `main`.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

from googlenet_jax.cpu import fast_ops, host_memory, onednn
from googlenet_jax.ops import LAX, Ops, Pads

FAST_XLA = Ops("cpu-xla", fast_ops.conv2d, fast_ops.max_pool, fast_ops.avg_pool)


def _onednn_or_xla_conv2d(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
  if onednn.supports(x, w, stride, pads):  # float32 (bfloat16 and float64 stay on XLA's paths)
    return onednn.conv2d(x, w, stride, pads)
  return fast_ops.conv2d(x, w, stride, pads)


ONEDNN = Ops("cpu-onednn", _onednn_or_xla_conv2d, fast_ops.max_pool, fast_ops.avg_pool)


def ops(use_onednn: bool = True) -> Ops:
  """`ONEDNN` where the oneDNN convolutions work on this machine (`onednn.available()`: the
  first call builds and checks them; `GOOGLENET_JAX_ONEDNN=0` says no), else `FAST_XLA`. For
  models compiled for the CPU backend (oneDNN's custom calls exist only there)."""
  if use_onednn and onednn.available():
    return ONEDNN
  return FAST_XLA


def ops_for_backend(backend: Optional[str] = None) -> Ops:
  """`ops()` for the CPU backend, `LAX` for any other (cuDNN & co. are the fast path there).
  `backend` defaults to `jax.default_backend()`."""
  return ops() if (backend or jax.default_backend()) == "cpu" else LAX


_NAMED = {"lax": LAX, "cpu-xla": FAST_XLA, "cpu-onednn": ONEDNN}
# The names `ops_named` takes (`config.ops`, benchmarks/throughput.py's --ops).
OPS_NAMES = ("auto", *_NAMED)


def ops_named(name: str) -> Ops:
  """The Ops a name of `OPS_NAMES` stands for: "auto" = `ops_for_backend()`, "lax" = `LAX`,
  "cpu-xla" = `FAST_XLA`, "cpu-onednn" = `ONEDNN` (whether or not oneDNN works here)."""
  if name == "auto":
    return ops_for_backend()
  if name not in _NAMED:
    raise ValueError(f"ops must be one of {', '.join(OPS_NAMES)}, got {name!r}")
  return _NAMED[name]


def setup_process() -> dict:
  """What `train.py`, the tools and the benchmark do for themselves on CPU, before JAX starts
  its CPU backend: GNU OpenMP waits passively between oneDNN calls (`OMP_WAIT_POLICY=PASSIVE`
  unless set: its spinning threads take the cores XLA's own kernels need in between, +5-9%
  measured), and freed host memory is reused (`host_memory.reuse_freed_memory`). Returns what
  is in effect."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  return {"OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
          "reuse_freed_memory": host_memory.reuse_freed_memory()}


__all__ = ["FAST_XLA", "ONEDNN", "OPS_NAMES", "fast_ops", "host_memory", "onednn", "ops",
           "ops_for_backend", "ops_named", "setup_process"]
