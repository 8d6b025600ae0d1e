"""oneDNN convolutions inside XLA:CPU programs, as XLA FFI custom calls (float32, NHWC / HWIO).

XLA:CPU's convolution kernels (YNNPACK, Eigen) trail oneDNN's, the library PyTorch uses on this
kind of CPU, by 1.3-1.6x in the forward pass and 2.5-4x in the two backward passes (see
`benchmarks/NOTES.md`). `conv2d` here is a convolution whose three passes (forward, input
gradient, weight gradient) are oneDNN primitives called from the compiled XLA program; the rest
of the network (bias, ReLU, pools, concatenation, the optimiser) stays XLA's.

On first use (`available()`, which `googlenet_jax.cpu.ops()` calls) the small C++ shim is built
(`onednn_build`), checked against `lax` in a child process (`onednn_check`: a native crash or a
wrong result there costs the child, never the caller; the verdict is cached per CPU model, ISA
cap and library versions), then loaded and registered here. `available()` says whether all of
that worked; where it did not (no compiler, no wheel, another platform, a failed check) the
callers keep the pure-XLA paths, with one warning saying why. `GOOGLENET_JAX_ONEDNN=0` switches
it off. `python -m googlenet_jax.cpu.onednn` runs the check in the foreground and prints what
oneDNN picks for each pass.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import sys
import warnings
from typing import Optional, Sequence

import jax
import numpy as np

from googlenet_jax.cpu import onednn_check
from googlenet_jax.cpu.onednn_build import DISTRIBUTIONS
from googlenet_jax.cpu.onednn_build import build as _build
from googlenet_jax.cpu.onednn_check import SELF_CHECK_CASES, cpu_model, isa_settings

_TARGETS = {"forward": "GjOnednnConvForward", "backward_data": "GjOnednnConvBackwardData",
            "backward_weights": "GjOnednnConvBackwardWeights"}
_PREFIX = "googlenet_jax_onednn_conv_"
# What the checking child runs (tests replace it with a crash, to test the fallback).
_CHECK_CODE = "from googlenet_jax.cpu import onednn; raise SystemExit(onednn.self_check())"


def _env_disabled() -> bool:
  return os.environ.get("GOOGLENET_JAX_ONEDNN", "").strip().lower() in ("0", "false", "no", "off")


_LIB: Optional[ctypes.CDLL] = None


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
  """Builds, checks (in a child process), loads and registers the custom calls; None on
  success, else the reason."""
  global _LIB
  if _env_disabled():
    return "switched off by GOOGLENET_JAX_ONEDNN"
  try:
    library = _build()
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  if not os.environ.get(onednn_check.CHILD_ENV):
    failure = onednn_check.check(library, _CHECK_CODE)
    if failure is not None:
      settings = ", ".join(f"{k}={v}" for k, v in isa_settings().items()) or "no ISA cap"
      return (f"they failed their check on this machine ({cpu_model().split(' [')[0]}; "
              f"{settings}): {failure}. Please report it to the googlenet_jax maintainers with "
              f"the output of `python -m googlenet_jax.cpu.onednn`")
  try:
    lib = _LIB = ctypes.CDLL(str(library))
    for kind, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_PREFIX + kind, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform="cpu")
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


_WARNED = False


def available() -> bool:
  """Whether the oneDNN convolutions can be used (built and registered on first call)."""
  global _WARNED
  reason = _load()
  if reason is not None and not _WARNED and not _env_disabled():
    _WARNED = True
    warnings.warn(f"oneDNN convolutions unavailable, using XLA's kernels: {reason}",
                  RuntimeWarning, stacklevel=2)
  return reason is None


def stats(reset: bool = False) -> dict:
  """Seconds spent in, and calls of, each oneDNN pass since the last reset (all devices), for
  profiling a step: {"forward": (s, calls), "backward_data": ..., "backward_weights": ...}."""
  if not available():
    return {}
  out = (ctypes.c_int64 * 6)()
  _LIB.GjOnednnStats(out, int(reset))
  return {kind: (out[i] * 1e-9, out[3 + i]) for i, kind in enumerate(_TARGETS)}


def supports(x: jax.Array, w: jax.Array, stride: int, pads: Sequence[tuple[int, int]]) -> bool:
  """Whether `conv2d` can take this convolution (float32, square kernel, a window that fits)."""
  if x.ndim != 4 or w.ndim != 4 or x.dtype != np.float32 or w.dtype != np.float32:
    return False
  return all(n + lo + hi >= k for n, (lo, hi), k in zip(x.shape[1:3], pads, w.shape[:2]))


def _out_hw(x_shape, k_shape, stride, pads):
  return tuple((n + lo + hi - k) // stride + 1
               for n, (lo, hi), k in zip(x_shape[1:3], pads, k_shape[:2]))


def _window(stride: int, pads) -> np.ndarray:
  return np.array([stride, stride, pads[0][0], pads[1][0]], np.int64)


def _vma(x) -> frozenset:
  """The mesh axes a value varies over inside shard_map (`aval.vma` in most JAX releases,
  `aval.manual_axis_type.varying` in 0.10)."""
  aval = jax.typeof(x)
  axes = getattr(aval, "vma", None)
  if axes is None:
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(axes or ())


def _call(kind, shape, *args, stride, pads, like):
  out = jax.ShapeDtypeStruct(tuple(shape), np.float32)
  y = jax.ffi.ffi_call(_PREFIX + kind, out, vmap_method="sequential")(
      *args, window=_window(stride, pads))
  # Inside shard_map the result must vary over the mesh axes `like` varies over (the primal
  # operand a gradient belongs to); the custom call's abstract value does not say so.
  missing = frozenset().union(*map(_vma, like)) - _vma(y)
  if missing:
    y = jax.lax.pcast(y, tuple(sorted(missing)), to="varying")
  return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, stride, pads):
  oh, ow = _out_hw(x.shape, w.shape, stride, pads)
  return _call("forward", (x.shape[0], oh, ow, w.shape[3]), x, w, stride=stride, pads=pads,
               like=(x, w))


def _conv_fwd(x, w, stride, pads):
  return _conv(x, w, stride, pads), (x, w)


def _conv_bwd(stride, pads, res, dy):
  x, w = res
  dx = _call("backward_data", x.shape, dy, w, stride=stride, pads=pads, like=(x,))
  dw = _call("backward_weights", w.shape, x, dy, stride=stride, pads=pads, like=(w,))
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int, pads: Sequence[tuple[int, int]]) -> jax.Array:
  """NHWC x HWIO float32 convolution with explicit (low, high) padding, on oneDNN.

  Differentiable (both backward passes are oneDNN's too). Call `available()` and `supports()`
  first; `googlenet_jax.cpu.ops()` does, and is what the network uses."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"oneDNN convolutions unavailable: {reason}")
  if not supports(x, w, stride, pads):
    raise ValueError(f"oneDNN conv2d takes float32 NHWC x HWIO operands whose padded input "
                     f"covers the kernel; got {x.dtype}{x.shape} x {w.dtype}{w.shape}, "
                     f"padding {tuple(pads)}")
  # As lax does for its own convolution: operands that vary over different mesh axes (a
  # replicated kernel against a sharded batch) are made to vary alike first.
  both = _vma(x) | _vma(w)
  x, w = (jax.lax.pcast(a, tuple(sorted(both - _vma(a))), to="varying") if both - _vma(a) else a
          for a in (x, w))
  return _conv(x, w, int(stride), tuple(tuple(int(v) for v in p) for p in pads))


# --------------------------------------------------------------------------------------------
# What oneDNN picks, and the check itself.


def implementations(x_shape: Sequence[int], w_shape: Sequence[int], stride: int,
                    pads: Sequence[tuple[int, int]]) -> dict:
  """The oneDNN implementation (`ONEDNN_VERBOSE`'s name, e.g. "brg:avx512_core",
  "jit_1x1:avx2", "x64:gemm:jit") of each pass of this NHWC x HWIO convolution on this CPU:
  {"forward": ..., "backward_data": ..., "backward_weights": ...}."""
  reason = _load()
  if reason is not None:
    raise RuntimeError(f"oneDNN convolutions unavailable: {reason}")
  n, h, w, c = x_shape
  kh, kw, _, o = w_shape
  oh, ow = _out_hw(x_shape, w_shape, stride, pads)
  geometry = (ctypes.c_int64 * 13)(n, c, h, w, o, kh, kw, oh, ow, stride, stride, pads[0][0],
                                   pads[1][0])
  out = {}
  for index, kind in enumerate(_TARGETS):
    name = ctypes.create_string_buffer(256)
    if _LIB.GjOnednnImplementation(index, geometry, name, len(name)) != 0:
      raise ValueError(f"oneDNN has no {kind} implementation for {tuple(x_shape)} x "
                       f"{tuple(w_shape)}, stride {stride}, padding {tuple(pads)}")
    out[kind] = name.value.decode()
  return out


def self_check(repeats: int = 3, threads: int = 2) -> int:
  """`onednn_check.compare_with_lax` of `conv2d`: the three passes of `SELF_CHECK_CASES`
  against `lax`, from `threads` threads, `repeats` times; 0 when they match, else 1 (printing
  why). Run in a child process by `available()`: a crash here is a crash of that child."""
  reason = _load()
  if reason is not None:
    print(f"oneDNN convolutions unavailable: {reason}")
    return 1
  return onednn_check.compare_with_lax(conv2d, repeats, threads)


def _main() -> int:
  print(f"CPU: {cpu_model()}")
  print(f"ISA settings: {isa_settings() or 'none'}")
  print("versions: " + ", ".join(f"{d} {importlib.metadata.version(d)}"
                                 for d in (*DISTRIBUTIONS, "jax", "jaxlib")))
  os.environ[onednn_check.CHILD_ENV] = "1"  # check here, in the foreground
  reason = _load()
  if reason is not None:
    print(f"unavailable: {reason}")
    return 1
  for case in SELF_CHECK_CASES:
    n, h, w, ci, co, k, stride, pad = case
    print(f"{case}: {implementations((n, h, w, ci), (k, k, ci, co), stride, ((pad, pad),) * 2)}")
  status = self_check()
  print("check passed" if status == 0 else "check FAILED")
  return status


if __name__ == "__main__":
  sys.exit(_main())
