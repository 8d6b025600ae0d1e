"""oneDNN convolutions inside XLA:CPU programs, as XLA FFI custom calls (float32, NHWC / HWIO).

XLA:CPU's convolution kernels (YNNPACK, Eigen) trail oneDNN's, the library PyTorch uses on this
kind of CPU, by 1.3-1.6x in the forward pass and 2.5-4x in the two backward passes (see
`benchmarks/NOTES.md`). `conv2d` here is a convolution whose three passes (forward, input
gradient, weight gradient) are oneDNN primitives called from the compiled XLA program; the rest
of the network (bias, ReLU, pools, concatenation, the optimiser) stays XLA's.

The small C++ shim (`csrc/onednn_conv.cc`) is compiled on first use (`available()`, which
`googlenet_jax.cpu.ops()` calls) against the oneDNN wheel (`onednn-cpu-gomp`, the `cpu` extra,
Linux x86-64) and jaxlib's FFI headers, into
`$GOOGLENET_JAX_CACHE` (default `~/.cache/googlenet_jax`), keyed by the source and the
versions. Before a process uses it, a child process checks the three passes against `lax`
on this machine (several threads, the implementations oneDNN picks for this CPU and
`ONEDNN_MAX_CPU_ISA`); the verdict is cached per CPU model, ISA cap and library versions, so a
native crash or a wrong result there costs the child, never the caller. `available()` says
whether all of that worked; where it did not (no compiler, no wheel, another platform, a failed
check) the callers keep the pure-XLA paths, with one warning saying why.
`GOOGLENET_JAX_ONEDNN=0` switches it off. `python -m googlenet_jax.cpu.onednn` runs the check in the
foreground and prints what oneDNN picks for each pass.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from typing import Optional, Sequence

import jax
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("csrc") / "onednn_conv.cc"
_TARGETS = {"forward": "GjOnednnConvForward", "backward_data": "GjOnednnConvBackwardData",
            "backward_weights": "GjOnednnConvBackwardWeights"}
_PREFIX = "googlenet_jax_onednn_conv_"
_DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")


def _env_disabled() -> bool:
  return os.environ.get("GOOGLENET_JAX_ONEDNN", "").strip().lower() in ("0", "false", "no", "off")


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
    raise RuntimeError(f"the oneDNN wheels are not installed ({', '.join(_DISTRIBUTIONS)}): "
                       "install googlenet_jax[cpu] (pip install 'googlenet_jax[cpu]')")
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


# --------------------------------------------------------------------------------------------
# The check in a child process.

# Set in the checking child, which must not check itself again.
_CHILD_ENV = "_GOOGLENET_JAX_ONEDNN_CHECKING"
# What the child runs (tests replace it with a crash, to test the fallback).
_CHECK_CODE = "from googlenet_jax.cpu import onednn; raise SystemExit(onednn.self_check())"
_CHECK_TIMEOUT_S = 300


def _cpu_model() -> str:
  """The CPU's model name and instruction-set flags (what oneDNN's dispatch depends on)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    import platform  # pylint: disable=import-outside-toplevel
    return platform.processor() or platform.machine()
  fields = {}
  for line in text.split("\n\n")[0].splitlines():
    key, _, value = line.partition(":")
    fields[key.strip()] = value.strip()
  return f"{fields.get('model name', '?')} [{fields.get('flags', '')}]"


def _isa_settings() -> dict:
  """The environment variables that change which kernels oneDNN dispatches to."""
  return {k: v for k, v in sorted(os.environ.items())
          if k.startswith(("ONEDNN_", "DNNL_")) and "VERBOSE" not in k}


def _check_path(library: pathlib.Path) -> pathlib.Path:
  key = repr((library.name, _cpu_model(), _isa_settings(), sys.version_info[:2]))
  return library.with_name(f"{library.stem}.check-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json")


def _describe_exit(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"the check process was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"the check process was killed by signal {-returncode}"
  return f"the check process exited with status {returncode}"


def _check(library: pathlib.Path) -> Optional[str]:
  """Runs `self_check` in a child process (once per machine, ISA cap and library); None when
  it passed, else what went wrong. The verdict is cached next to the library."""
  path = _check_path(library)
  try:
    verdict = json.loads(path.read_text())
    return verdict.get("failure")
  except (OSError, ValueError, AttributeError):
    pass
  env = dict(os.environ, **{_CHILD_ENV: "1"})
  try:
    proc = subprocess.run([sys.executable, "-c", _CHECK_CODE], env=env, capture_output=True,
                          text=True, timeout=_CHECK_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return f"the check did not finish in {_CHECK_TIMEOUT_S} s (not cached: tried again next time)"
  except OSError as e:
    return f"could not start the check process: {e}"
  failure = None
  if proc.returncode != 0:
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    failure = _describe_exit(proc.returncode) + (": " + " | ".join(tail) if tail else "")
  record = {"failure": failure, "cpu": _cpu_model(), "isa_settings": _isa_settings(),
            "library": library.name}
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
  except OSError:
    pass  # an unwritable cache: the check runs again in the next process
  return failure


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
  if not os.environ.get(_CHILD_ENV):
    failure = _check(library)
    if failure is not None:
      settings = ", ".join(f"{k}={v}" for k, v in _isa_settings().items()) or "no ISA cap"
      return (f"they failed their check on this machine ({_cpu_model().split(' [')[0]}; "
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


# (batch, height, width, c_in, c_out, kernel, stride, padding): the kinds of convolution the
# five layouts have (1x1, 3x3, 5x5, the 7x7/2 stem, stride 2 without padding, small maps with
# many channels, where oneDNN turns to its gemm-based kernels), at batch 1 and 8.
SELF_CHECK_CASES = (
    (8, 9, 9, 32, 16, 1, 1, 0),
    (1, 8, 8, 16, 24, 3, 1, 1),
    (8, 7, 7, 8, 16, 5, 1, 2),
    (8, 23, 23, 3, 16, 7, 2, 3),
    (1, 11, 11, 12, 8, 3, 2, 0),
    (8, 2, 2, 192, 96, 3, 1, 1),
    (8, 4, 4, 512, 64, 1, 1, 0),
    (1, 4, 4, 160, 32, 3, 1, 1),
)


def self_check(repeats: int = 3, threads: int = 2) -> int:
  """The three passes of `SELF_CHECK_CASES` against `lax`, in one jitted program (XLA runs its
  custom calls on several threads) called from `threads` threads at once, `repeats` times.
  Prints what differs and returns 1, or returns 0. Run in a child process by `available()`:
  a crash here is a crash of that child."""
  from jax import lax  # pylint: disable=import-outside-toplevel
  reason = _load()
  if reason is not None:
    print(f"oneDNN convolutions unavailable: {reason}")
    return 1
  rng = np.random.RandomState(0)
  operands, configs = [], []
  for n, h, w, ci, co, k, stride, pad in SELF_CHECK_CASES:
    x = rng.randn(n, h, w, ci).astype(np.float32)
    kernel = rng.randn(k, k, ci, co).astype(np.float32)
    pads = ((pad, pad), (pad, pad))
    dy = rng.randn(n, *_out_hw(x.shape, kernel.shape, stride, pads), co).astype(np.float32)
    operands.append((x, kernel, dy))
    configs.append((stride, pads))

  def passes(conv):
    def run(all_operands):
      out = []
      for (x, kernel, dy), (stride, pads) in zip(all_operands, configs):
        y, vjp = jax.vjp(lambda a, b, s=stride, p=pads: conv(a, b, s, p), x, kernel)
        out.append((y, *vjp(dy)))
      return out
    return jax.jit(run)

  reference = passes(lambda a, b, s, p: lax.conv_general_dilated(
      a, b, (s, s), p, dimension_numbers=("NHWC", "HWIO", "NHWC")))(operands)
  check = passes(conv2d)
  failures = []

  def worker():
    for _ in range(repeats):
      got = jax.block_until_ready(check(operands))
      for case, outs, refs in zip(SELF_CHECK_CASES, got, reference):
        for name, g, r in zip(("forward", "input gradient", "weight gradient"), outs, refs):
          r = np.asarray(r, np.float64)
          err = float(np.linalg.norm(np.asarray(g, np.float64) - r) / np.linalg.norm(r))
          if not err <= 1e-4:
            failures.append(f"{name} of case {case}: relative error {err:.2e}")

  pool = [threading.Thread(target=worker) for _ in range(threads)]
  for t in pool:
    t.start()
  for t in pool:
    t.join()
  if failures:
    print("oneDNN convolutions differ from lax: " + "; ".join(sorted(set(failures))[:5]))
    return 1
  return 0


def _main() -> int:
  print(f"CPU: {_cpu_model()}")
  print(f"ISA settings: {_isa_settings() or 'none'}")
  print("versions: " + ", ".join(f"{d} {importlib.metadata.version(d)}"
                                 for d in (*_DISTRIBUTIONS, "jax", "jaxlib")))
  os.environ[_CHILD_ENV] = "1"  # check here, in the foreground
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
