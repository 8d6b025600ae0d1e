"""oneDNN convolutions inside XLA:CPU programs, as XLA FFI custom calls (float32, NHWC / HWIO).

XLA:CPU's convolution kernels (YNNPACK, Eigen) trail oneDNN's, the library PyTorch uses on this
kind of CPU, by 1.3-1.6x in the forward pass and 2.5-4x in the two backward passes (see
`benchmarks/NOTES.md`). `conv2d` here is a convolution whose three passes (forward, input
gradient, weight gradient) are oneDNN primitives called from the compiled XLA program; the rest
of the network (bias, ReLU, pools, concatenation, the optimiser) stays XLA's.

The small C++ shim (`csrc/onednn_conv.cc`) is compiled on first use against the oneDNN wheel
(`onednn-cpu-gomp`, a project dependency on Linux x86-64) and jaxlib's FFI headers, into
`$GOOGLENET_JAX_CACHE` (default `~/.cache/googlenet_jax`), keyed by the source and the
versions. `available()` says whether that worked; where it did not (no compiler, no wheel,
another platform) the callers keep the pure-XLA paths, with one warning saying why.
`GOOGLENET_JAX_ONEDNN=0` switches it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
import tempfile
import warnings
from typing import Optional, Sequence

import jax
import numpy as np

from googlenet_jax import switches

_SOURCE = pathlib.Path(__file__).with_name("csrc") / "onednn_conv.cc"
_TARGETS = {"forward": "GjOnednnConvForward", "backward_data": "GjOnednnConvBackwardData",
            "backward_weights": "GjOnednnConvBackwardWeights"}
_PREFIX = "googlenet_jax_onednn_conv_"
_DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")


_SWITCH = switches.Switch("GOOGLENET_JAX_ONEDNN")


def _env_disabled() -> bool:
  return _SWITCH.from_env() is False


def set_enabled(value: Optional[bool]) -> None:
  """False keeps `fast_ops.conv2d` on XLA's kernels; None restores the default (on where
  available). Takes effect when a function is traced."""
  _SWITCH.set(value)


def use_onednn(value: Optional[bool]):
  """Context manager form of `set_enabled`."""
  return _SWITCH.use(value)


def enabled() -> bool:
  """Whether the oneDNN convolutions are wanted: `set_enabled`, else `GOOGLENET_JAX_ONEDNN`."""
  return _SWITCH.value() is not False


def _dist_file(dist: str, name: str) -> Optional[pathlib.Path]:
  try:
    files = importlib.metadata.distribution(dist).files or ()
  except importlib.metadata.PackageNotFoundError:
    return None
  for f in files:
    if f.name == name or str(f).endswith(name):
      return pathlib.Path(f.locate()).resolve()
  return None


def _locate() -> tuple[pathlib.Path, pathlib.Path]:
  """(include dir, lib dir) of the oneDNN wheels."""
  header = _dist_file("onednn-devel-cpu-gomp", "oneapi/dnnl/dnnl.hpp")
  library = _dist_file("onednn-cpu-gomp", "libdnnl.so.3")
  if header is None or library is None:
    raise RuntimeError(f"the oneDNN wheels are not installed ({', '.join(_DISTRIBUTIONS)})")
  return header.parent.parent.parent, library.parent


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("GOOGLENET_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "googlenet_jax")
  return pathlib.Path(root)


def _build() -> pathlib.Path:
  include, libdir = _locate()
  ffi_include = pathlib.Path(jax.ffi.include_dir())
  versions = [importlib.metadata.version(d) for d in _DISTRIBUTIONS]
  versions.append(importlib.metadata.version("jaxlib"))
  digest = hashlib.sha256(_SOURCE.read_bytes() + repr((versions, str(libdir))).encode())
  target = _cache_dir() / f"onednn_conv-{digest.hexdigest()[:16]}.so"
  if target.exists():
    return target
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(target.parent, os.W_OK):
      raise PermissionError(target.parent)
  except OSError:  # a read-only home: build in the temporary directory instead
    fallback = pathlib.Path(tempfile.gettempdir()) / f"googlenet_jax-{os.getuid()}"
    fallback.mkdir(parents=True, exist_ok=True)
    target = fallback / target.name
    if target.exists():
      return target
  compiler = os.environ.get("CXX", "g++")
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = pathlib.Path(tmp) / target.name
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(_SOURCE),
           f"-I{ffi_include}", f"-I{include}", f"-L{libdir}", "-l:libdnnl.so.3",
           f"-Wl,-rpath,{libdir}", "-o", str(out)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f"could not run the C++ compiler {compiler!r}: {e}") from None
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{proc.stderr[-2000:]}")
    os.replace(out, target)  # atomic: concurrent builders each install a complete file
  return target


_LIB: Optional[ctypes.CDLL] = None


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
  """Builds, loads and registers the custom calls; None on success, else the reason."""
  global _LIB
  if _env_disabled():
    return "switched off by GOOGLENET_JAX_ONEDNN"
  # GNU OpenMP's threads spin between oneDNN calls by default, on the cores XLA's own threads
  # need for the kernels in between: passive waiting measured +5-9% (train and inference, two
  # alternating runs each). Read when libgomp loads, so only before the first oneDNN call.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    lib = _LIB = ctypes.CDLL(str(_build()))
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
  first; `fast_ops.conv2d` does, and is what the network uses."""
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
