"""Building the oneDNN shim (`csrc/onednn_conv.cc`) on first use, against the oneDNN wheels
(`onednn-cpu-gomp`, the `cpu` extra, Linux x86-64) and jaxlib's FFI headers, into
`$GOOGLENET_JAX_CACHE` (default `~/.cache/googlenet_jax`), keyed by the source and the versions."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import pathlib
import subprocess
import tempfile
from typing import Optional

import jax

SOURCE = pathlib.Path(__file__).with_name("csrc") / "onednn_conv.cc"
DISTRIBUTIONS = ("onednn-cpu-gomp", "onednn-devel-cpu-gomp")


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
    raise RuntimeError(f"the oneDNN wheels are not installed ({', '.join(DISTRIBUTIONS)}): "
                       "install googlenet_jax[cpu] (pip install 'googlenet_jax[cpu]')")
  return header.parent.parent.parent, library.parent


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("GOOGLENET_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "googlenet_jax")
  return pathlib.Path(root)


def build() -> pathlib.Path:
  """The path of the built shared library (built here unless the cache has it)."""
  include, libdir = _locate()
  ffi_include = pathlib.Path(jax.ffi.include_dir())
  versions = [importlib.metadata.version(d) for d in DISTRIBUTIONS]
  versions.append(importlib.metadata.version("jaxlib"))
  digest = hashlib.sha256(SOURCE.read_bytes() + repr((versions, str(libdir))).encode())
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
    cmd = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", str(SOURCE),
           f"-I{ffi_include}", f"-I{include}", f"-L{libdir}", "-l:libdnnl.so.3",
           f"-Wl,-rpath,{libdir}", "-o", str(out)]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise RuntimeError(f"could not run the C++ compiler {compiler!r}: {e}") from None
    if proc.returncode != 0:
      raise RuntimeError(f"compiling {SOURCE.name} failed:\n{proc.stderr[-2000:]}")
    os.replace(out, target)  # atomic: concurrent builders each install a complete file
  return target
