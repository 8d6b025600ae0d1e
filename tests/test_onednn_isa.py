"""The oneDNN convolutions under every instruction set the library can meet.

oneDNN dispatches at run time on the CPU's instruction sets, and `ONEDNN_MAX_CPU_ISA` caps that
choice, so one host runs the kernels an SSE4.1, an AVX2 and an AVX-512 machine would (an AMX
host adds kernels the cap hides; `host` runs them where present). Each cap is a fresh process
(`onednn_isa_worker.py`): oneDNN reads the cap when it loads.

Which cases: every convolution of the five layouts, in train mode (aux heads included where
the input size allows), at three input sizes per layout (the smallest it accepts, an odd one,
224) and batch 1 and 8, is asked which implementation oneDNN picks for each pass; the cheapest
case for every (pass, implementation, batch, size) then runs against `lax` (value and both
gradients). So every implementation oneDNN uses for these networks on this CPU, under this
cap, runs at every batch size and input size that reaches it, and nothing runs twice for the
same reason. The worker also runs `onednn.self_check` (several threads, the gemm kernels'
scratchpads), which crashed the process on every try before the scratchpads were the shim's.

Training steps (slow): classic and torchvision, pmap and shard_map, 1 and 8 devices, as a
pairwise cover (`STEP_RUNS`), one run per cap, each against the same step on XLA's kernels.
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore

from googlenet_jax import GoogLeNet, LAYOUTS

from googlenet_jax.cpu import onednn

HERE = os.path.dirname(os.path.abspath(__file__))
ISA_CAPS = ["SSE41", "AVX2", "AVX512_CORE", None]  # None: the host's own
# The training-step runs (layout, parallel mode, devices), one per cap: every pair of (layout,
# mode), (layout, devices) and (mode, devices) values occurs once.
STEP_RUNS = (("classic", "pmap", 1), ("classic", "shard_map", 8),
             ("torchvision", "pmap", 8), ("torchvision", "shard_map", 1))

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN convolutions unavailable")


def _accepts(model, size, train):
  try:
    model.check_input(jax.ShapeDtypeStruct((1, size, size, model.layout.in_channels),
                                           jnp.float32), train)
  except ValueError:
    return False
  return True


def _sizes(model):
  """{label: size}: the smallest input the layout accepts, an odd one, 224."""
  smallest = next(s for s in range(16, 257) if _accepts(model, s, False))
  odd = next(s for s in range(smallest + 21 | 1, 257, 2) if _accepts(model, s, False))
  return {"smallest": smallest, "odd": odd, "224": 224}


def _convolutions(jaxpr, found):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      x, w = (v.aval.shape for v in eqn.invars)
      strides = eqn.params["window_strides"]
      assert strides[0] == strides[1], strides
      found.add((tuple(x[1:]), tuple(w), strides[0], tuple(map(tuple, eqn.params["padding"]))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jcore.ClosedJaxpr):
          _convolutions(sub.jaxpr, found)
        elif isinstance(sub, jcore.Jaxpr):
          _convolutions(sub, found)


def network_convolutions() -> list:
  """Every distinct convolution (per-example input shape, HWIO kernel, stride, padding) of the
  five layouts at their three test sizes, with the size labels that produce it."""
  cases = {}
  for name in LAYOUTS:
    model = GoogLeNet(variant=name, num_classes=10)  # plain lax: the convolutions are visible
    for label, size in _sizes(model).items():
      train = model.has_aux and _accepts(model, size, True)
      x = jax.ShapeDtypeStruct((1, size, size, model.layout.in_channels), jnp.float32)
      init = lambda x, m=model, t=train: m.init(
          {"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=t)
      found = set()
      _convolutions(jax.make_jaxpr(init)(x).jaxpr, found)
      for conv in found:
        cases.setdefault(conv, set()).add(label)
  return [{"x": x, "w": w, "stride": s, "pads": p, "sizes": sorted(labels)}
          for (x, w, s, p), labels in sorted(cases.items())]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("onednn_isa") / "cases.json"
  path.write_text(json.dumps({"cases": network_convolutions(), "batches": [1, 8]}))
  return str(path)


def _worker(isa, *args, timeout):
  env = dict(os.environ)
  env.pop("ONEDNN_MAX_CPU_ISA", None)
  if isa:
    env["ONEDNN_MAX_CPU_ISA"] = isa
  proc = subprocess.run([sys.executable, os.path.join(HERE, "onednn_isa_worker.py"), *args],
                        env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (f"ONEDNN_MAX_CPU_ISA={isa}: exit status {proc.returncode}\n"
                                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_layouts_convolutions_are_all_enumerated(cases_file):
  cases = json.loads(open(cases_file).read())["cases"]
  kernels = {tuple(c["w"][:2]) for c in cases}
  assert {(1, 1), (3, 3), (5, 5), (7, 7)} <= kernels, kernels
  assert any(c["stride"] == 2 for c in cases)
  assert {"smallest", "odd", "224"} <= {s for c in cases for s in c["sizes"]}
  assert len(cases) > 150, len(cases)


# oneDNN's kernel names end in the instruction set they are written for ("jit:avx2",
# "brgconv_1x1:avx512_core", "x64:gemm:jit" for its ISA-independent gemm path).
ISA_LEVELS = {"sse41": 1, "avx": 2, "avx2": 3, "avx512_core": 4, "amx": 5}


def _isa_level(name: str):
  """The level of the instruction set a kernel name says it uses, or None for none."""
  found = None
  for part in re.split(r"[+:]", name):
    for isa, level in ISA_LEVELS.items():
      if part == isa or part.startswith(isa + "_"):  # avx2_vnni, avx512_core_bf16, ...
        level = ISA_LEVELS["amx"] if "amx" in part else level
        found = max(found or 0, level)
  return found


def _host_level() -> int:
  flags = set()
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("flags"):
        flags |= set(line.split(":", 1)[1].split())
  if "amx_tile" in flags:
    return ISA_LEVELS["amx"]
  if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
    return ISA_LEVELS["avx512_core"]
  return ISA_LEVELS["avx2"] if "avx2" in flags else ISA_LEVELS["sse41"]


def test_kernel_names_give_their_instruction_set():
  assert _isa_level("jit:sse41") == 1 and _isa_level("jit_1x1:avx2") == 3
  assert _isa_level("brg_fwd:avx512_core+brgconv:avx512_core") == 4
  assert _isa_level("brgconv:avx512_core_amx") == 5 and _isa_level("x64:gemm:jit") is None


# SSE4.1 and the host's own in the fast tier, the caps between them in the slow one.
@pytest.mark.parametrize("isa", [isa if isa in ("SSE41", None) else
                                 pytest.param(isa, marks=pytest.mark.slow) for isa in ISA_CAPS],
                         ids=lambda v: v or "host")
def test_every_implementation_matches_lax(isa, cases_file):
  report = _worker(isa, "passes", cases_file, timeout=900)
  seen = report["implementations"]
  assert all(seen.get(p) for p in ("forward", "backward_data", "backward_weights")), seen
  # The cap took effect: no kernel above it, and the best the cap and this CPU allow is used.
  levels = {name: _isa_level(name) for names in seen.values() for name in names}
  used = max(level for level in levels.values() if level is not None)
  expected = _host_level() if isa is None else min(ISA_LEVELS[isa.lower()], _host_level())
  assert used == expected, (isa, levels)
  print(json.dumps(report))


@pytest.mark.slow
@pytest.mark.parametrize("isa,run", list(zip(ISA_CAPS, STEP_RUNS)),
                         ids=lambda v: v if isinstance(v, str) else "host" if v is None
                         else "-".join(map(str, v)))
def test_training_step_matches_xla_kernels(isa, run):
  """One step per cap; together the caps cover the pairs of layout, mode and device count."""
  report = _worker(isa, "steps", *map(str, run), timeout=1200)
  assert report["run"] == "/".join(map(str, run)) and report["isa"] == (isa or "host"), report
  print(json.dumps(report))
