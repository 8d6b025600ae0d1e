"""The oneDNN convolutions (XLA FFI custom calls) against lax: values and both gradients on
random inputs for every kernel/stride/padding the layouts use, inside jit, shard_map over 8
devices and the whole network; and the fallbacks (switch, dtypes)."""

import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from googlenet_jax import cpu
from googlenet_jax.cpu import onednn, onednn_build, onednn_check
from googlenet_jax.ops import LAX, conv_pads
from helpers import assert_conv_matches_lax, rel_err


def _wheel_installed() -> bool:
  try:
    importlib.metadata.version("onednn-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def test_available_where_the_wheel_is_installed():
  """The project's own install (Linux x86-64) must build the shim: a silent fallback would
  lose the speed without failing anything else."""
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    pytest.skip("the oneDNN wheel is a Linux x86-64 dependency")
  assert _wheel_installed(), "onednn-cpu-gomp missing: pyproject.toml lists it for this platform"
  assert onednn.available(), onednn._load()


needs_onednn = pytest.mark.skipif(not (_wheel_installed() and onednn.available()),
                                  reason="oneDNN convolutions unavailable")


def _rand(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _lax_conv(x, w, stride, pads):
  return lax.conv_general_dilated(x, w, (stride, stride), pads,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


CASES = [  # (batch, height, width, c_in, c_out, kernel, stride, padding)
    (2, 9, 9, 16, 8, 1, 1, 0),        # 1x1
    (3, 8, 8, 5, 7, 3, 1, 1),         # 3x3
    (2, 7, 7, 4, 6, 5, 1, 2),         # 5x5
    (2, 23, 23, 3, 8, 7, 2, 3),       # the stem, 7x7/2 on an odd size (padding not all used)
    (2, 24, 24, 3, 8, 7, 2, "SAME"),  # keras: SAME, asymmetric at stride 2
    (2, 10, 12, 4, 5, 5, 1, "SAME"),  # non-square map
    (1, 11, 11, 6, 4, 3, 2, 0),       # strided, no padding, last row unread
    (2, 5, 5, 6, 4, 1, 1, "SAME"),
]


@needs_onednn
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_lax(case):
  n, h, wd, ci, co, k, stride, padding = case
  pads = conv_pads(padding, k, stride, (h, wd))
  x, w = _rand((n, h, wd, ci), 0), _rand((k, k, ci, co), 1)
  assert_conv_matches_lax(lambda a, b: onednn.conv2d(a, b, stride, pads), x, w, stride, pads)


@needs_onednn
def test_cpu_ops_take_onednn_for_float32_only():
  x, w = _rand((2, 8, 8, 4), 0), _rand((3, 3, 4, 5), 1)
  assert cpu.ops() is cpu.ONEDNN and cpu.ops(use_onednn=False) is cpu.FAST_XLA
  pads = ((1, 1), (1, 1))
  hlo = lambda ops, x, w: jax.jit(lambda a, b: ops.conv2d(a, b, 1, pads)).lower(x, w).as_text()
  assert "googlenet_jax_onednn_conv_forward" in hlo(cpu.ONEDNN, x, w)
  assert "onednn" not in hlo(cpu.ONEDNN, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert "onednn" not in hlo(cpu.FAST_XLA, x, w)
  assert "onednn" not in hlo(LAX, x, w)


@needs_onednn
def test_data_parallel_gradients_match_one_device():
  """shard_map over 8 devices, replicated kernel made per-device as the train step does: the
  averaged gradient equals the whole batch's on one device."""
  mesh = jax.make_mesh((8,), ("batch",))
  x, w = _rand((16, 9, 9, 6), 0), _rand((3, 3, 6, 5), 1)
  loss = lambda conv, w, x: (conv(x, w) ** 2).mean()
  ours = lambda x, w: onednn.conv2d(x, w, 1, ((1, 1), (1, 1)))
  theirs = lambda x, w: _lax_conv(x, w, 1, ((1, 1), (1, 1)))

  def step(w, x):
    w = lax.pcast(w, "batch", to="varying") if hasattr(lax, "pcast") else w
    return lax.pmean(jax.grad(lambda w: loss(ours, w, x))(w), "batch")

  sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
  got = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("batch")), out_specs=P()))(
      w, sharded)
  ref = jax.grad(lambda w: loss(theirs, w, x))(w)
  assert rel_err(got, ref) <= 1e-5


# The whole network on oneDNN against XLA's kernels: tests/test_fast_ops.py
# (test_network_same_parameters_outputs_and_gradients_on_every_kernel_set).


def test_failed_build_falls_back_with_one_warning(tmp_path):
  """No compiler (or no wheel): one RuntimeWarning naming the cause, XLA's kernels, same values."""
  script = (
      "import warnings, numpy as np, jax.numpy as jnp\n"
      "from jax import lax\n"
      "from googlenet_jax import cpu\n"
      "x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 4).astype(np.float32))\n"
      "w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 4, 5).astype(np.float32))\n"
      "with warnings.catch_warnings(record=True) as caught:\n"
      "  warnings.simplefilter('always')\n"
      "  ops = cpu.ops()\n"
      "  ops = cpu.ops()\n"
      "  assert ops is cpu.FAST_XLA, ops\n"
      "  y = ops.conv2d(x, w, 1, ((1, 1), (1, 1)))\n"
      "ref = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),\n"
      "                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))\n"
      "msgs = [str(c.message) for c in caught if 'oneDNN' in str(c.message)]\n"
      "assert len(msgs) == 1, msgs\n"
      "assert 'compiler' in msgs[0] or 'compiling' in msgs[0], msgs[0]\n"
      "assert float(jnp.max(jnp.abs(y - ref))) < 1e-4\n"
      "print('fallback ok')\n")
  env = dict(os.environ, GOOGLENET_JAX_CACHE=str(tmp_path), CXX="/nonexistent/g++",
             XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0 and "fallback ok" in proc.stdout, proc.stderr[-3000:]


@needs_onednn
def test_stats_count_each_pass():
  x, w = _rand((2, 6, 6, 3), 0), _rand((3, 3, 3, 4), 1)
  f = jax.jit(lambda x, w: jax.value_and_grad(  # the value, so that the forward is not dropped
      lambda a, b: onednn.conv2d(a, b, 1, ((1, 1), (1, 1))).sum(),
      argnums=(0, 1))(x, w))
  jax.block_until_ready(f(x, w))
  onednn.stats(reset=True)
  jax.block_until_ready(f(x, w))
  got = onednn.stats(reset=True)
  assert {k: v[1] for k, v in got.items()} == {
      "forward": 1, "backward_data": 1, "backward_weights": 1}
  assert all(v[0] > 0 for v in got.values())
  assert all(v == (0.0, 0) for v in onednn.stats().values())


@needs_onednn
def test_direct_call_in_a_fresh_process():
  """`onednn.conv2d` used on its own (no `available()` first) registers its custom calls."""
  script = (
      "import jax, jax.numpy as jnp\n"
      "from googlenet_jax.cpu import onednn\n"
      "x, w = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))\n"
      "g = jax.jit(jax.grad(lambda x: onednn.conv2d(x, w, 1, ((1, 1), (1, 1))).sum()))(x)\n"
      "assert float(g[0, 2, 2, 0]) == 36.0, g[0, 2, 2, 0]\n"
      "print('direct ok')\n")
  proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, XLA_FLAGS=""),
                        capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0 and "direct ok" in proc.stdout, proc.stderr[-3000:]


@needs_onednn
def test_vmap_over_kernels():
  x, ws = _rand((2, 6, 6, 3), 0), _rand((4, 3, 3, 3, 5), 1)
  pads = ((1, 1), (1, 1))
  got = jax.jit(jax.vmap(lambda w: onednn.conv2d(x, w, 1, pads)))(ws)
  ref = jax.vmap(lambda w: _lax_conv(x, w, 1, pads))(ws)
  assert rel_err(got, ref) <= 1e-5


@needs_onednn
def test_unwritable_cache_builds_in_the_temporary_directory(tmp_path, monkeypatch):
  blocked = tmp_path / "not_a_dir"
  blocked.write_text("a file where the cache directory should be")
  monkeypatch.setenv("GOOGLENET_JAX_CACHE", str(blocked / "cache"))
  monkeypatch.setattr(onednn_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
  built = onednn._build()
  assert built.parent == tmp_path / "tmp" / f"googlenet_jax-{os.getuid()}" and built.exists()


_CHECKED_NETWORK = (  # a convolution and its gradient through the network's path
    "import json, sys, warnings, numpy as np, jax, jax.numpy as jnp\n"
    "from googlenet_jax import cpu\n"
    "from googlenet_jax.cpu import onednn\n"
    "onednn._CHECK_CODE = sys.argv[1] or onednn._CHECK_CODE\n"
    "x = jnp.asarray(np.random.RandomState(0).randn(2, 12, 12, 8).astype(np.float32))\n"
    "w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 8, 4).astype(np.float32))\n"
    "conv = lambda ops: lambda x, w: jax.value_and_grad(\n"
    "    lambda w: (ops.conv2d(x, w, 1, ((1, 1), (1, 1))) ** 2).sum())(w)\n"
    "with warnings.catch_warnings(record=True) as caught:\n"
    "  warnings.simplefilter('always')\n"
    "  f = conv(cpu.ops())\n"
    "  y = jax.jit(f)(x, w)\n"
    "  y = jax.jit(f)(x, w)\n"
    "  hlo = jax.jit(f).lower(x, w).as_text()\n"
    "ref = jax.jit(conv(cpu.FAST_XLA))(x, w)\n"
    "print(json.dumps({'warnings': [str(c.message) for c in caught if 'oneDNN' in str(c.message)],\n"
    "                  'available': onednn.available(), 'uses_onednn': 'onednn_conv' in hlo,\n"
    "                  'max_diff': max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))\n"
    "                                  for a, b in zip(y, ref))}))\n")


def _checked_network(tmp_path, check_code=""):
  proc = subprocess.run([sys.executable, "-c", _CHECKED_NETWORK, check_code],
                        env=dict(os.environ, GOOGLENET_JAX_CACHE=str(tmp_path), XLA_FLAGS=""),
                        capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_onednn
def test_a_crashing_check_keeps_the_run_on_xla_kernels(tmp_path):
  """The check's child process dies of SIGSEGV: the caller lives on, on XLA's kernels, with one
  warning naming the crash and how to report it; the verdict is cached for this machine."""
  crash = "import ctypes; ctypes.string_at(0)"  # a native crash in the child
  got = _checked_network(tmp_path, crash)
  assert not got["available"] and not got["uses_onednn"]
  assert len(got["warnings"]) == 1, got["warnings"]
  assert "SIGSEGV" in got["warnings"][0] and "report" in got["warnings"][0], got["warnings"]
  assert got["max_diff"] == 0.0  # both are XLA's kernels
  verdicts = list(tmp_path.glob("*.check-*.json"))
  assert len(verdicts) == 1 and "SIGSEGV" in json.loads(verdicts[0].read_text())["failure"]
  # The next process trusts the cached verdict (the real check would pass) ...
  assert not _checked_network(tmp_path)["available"]
  # ... until the verdict is removed.
  verdicts[0].unlink()
  got = _checked_network(tmp_path)
  assert got["available"] and got["uses_onednn"] and got["warnings"] == []
  assert got["max_diff"] < 1e-4
  assert json.loads(verdicts[0].read_text())["failure"] is None


@needs_onednn
def test_a_check_that_finds_wrong_values_is_reported(tmp_path):
  wrong = "print('oneDNN convolutions differ from lax: forward of case X'); raise SystemExit(1)"
  got = _checked_network(tmp_path, wrong)
  assert not got["available"] and len(got["warnings"]) == 1
  assert "exited with status 1" in got["warnings"][0] and "differ from lax" in got["warnings"][0]


def test_the_check_is_cached_per_isa_cap(monkeypatch, tmp_path):
  library = tmp_path / "onednn_conv-0123.so"
  monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
  host = onednn_check.check_path(library)
  monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")
  capped = onednn_check.check_path(library)
  monkeypatch.setenv("ONEDNN_VERBOSE", "1")  # logging only: the same kernels
  assert onednn_check.check_path(library) == capped != host
  assert capped.parent == tmp_path and capped.name.startswith("onednn_conv-0123.check-")
