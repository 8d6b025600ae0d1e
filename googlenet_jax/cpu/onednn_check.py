"""The oneDNN shim's check on this machine: the three passes against `lax` (`compare_with_lax`,
several threads, the implementations oneDNN picks for this CPU and `ONEDNN_MAX_CPU_ISA`), run in
a child process (`check`) whose verdict is cached per CPU model, ISA cap and library versions, so
that a native crash or a wrong result there costs the child, never the caller."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional

import jax
import numpy as np

# Set in the checking child, which must not check itself again.
CHILD_ENV = "_GOOGLENET_JAX_ONEDNN_CHECKING"
_CHECK_TIMEOUT_S = 300


def cpu_model() -> str:
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


def isa_settings() -> dict:
  """The environment variables that change which kernels oneDNN dispatches to."""
  return {k: v for k, v in sorted(os.environ.items())
          if k.startswith(("ONEDNN_", "DNNL_")) and "VERBOSE" not in k}


def check_path(library: pathlib.Path) -> pathlib.Path:
  """Where the verdict for `library` on this CPU and ISA cap is cached (next to the library)."""
  key = repr((library.name, cpu_model(), isa_settings(), sys.version_info[:2]))
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return library.with_name(f"{library.stem}.check-{digest}.json")


def _describe_exit(returncode: int) -> str:
  if returncode < 0:
    try:
      return f"the check process was killed by {signal.Signals(-returncode).name}"
    except ValueError:
      return f"the check process was killed by signal {-returncode}"
  return f"the check process exited with status {returncode}"


def check(library: pathlib.Path, code: str) -> Optional[str]:
  """Runs `code` (Python that exits 0 when the check passes) in a child process, once per
  machine, ISA cap and library; None when it passed, else what went wrong. The verdict is
  cached next to the library."""
  path = check_path(library)
  try:
    verdict = json.loads(path.read_text())
    return verdict.get("failure")
  except (OSError, ValueError, AttributeError):
    pass
  env = dict(os.environ, **{CHILD_ENV: "1"})
  try:
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=_CHECK_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return f"the check did not finish in {_CHECK_TIMEOUT_S} s (not cached: tried again next time)"
  except OSError as e:
    return f"could not start the check process: {e}"
  failure = None
  if proc.returncode != 0:
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    failure = _describe_exit(proc.returncode) + (": " + " | ".join(tail) if tail else "")
  record = {"failure": failure, "cpu": cpu_model(), "isa_settings": isa_settings(),
            "library": library.name}
  tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
  try:
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
  except OSError:
    pass  # an unwritable cache: the check runs again in the next process
  return failure


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


def compare_with_lax(conv2d: Callable, repeats: int = 3, threads: int = 2) -> int:
  """The three passes of `conv2d` on `SELF_CHECK_CASES` against `lax`, in one jitted program
  (XLA runs its custom calls on several threads) called from `threads` threads at once,
  `repeats` times. Prints what differs and returns 1, or returns 0."""
  from jax import lax  # pylint: disable=import-outside-toplevel

  def lax_conv(a, b, s, p):
    return lax.conv_general_dilated(a, b, (s, s), p, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  rng = np.random.RandomState(0)
  operands, configs = [], []
  for n, h, w, ci, co, k, stride, pad in SELF_CHECK_CASES:
    x = rng.randn(n, h, w, ci).astype(np.float32)
    kernel = rng.randn(k, k, ci, co).astype(np.float32)
    pads = ((pad, pad), (pad, pad))
    y = jax.eval_shape(lambda a, b, s=stride, p=pads: lax_conv(a, b, s, p), x, kernel)
    dy = rng.randn(*y.shape).astype(np.float32)
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

  reference = passes(lax_conv)(operands)
  ours = passes(conv2d)
  failures = []

  def worker():
    for _ in range(repeats):
      got = jax.block_until_ready(ours(operands))
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
