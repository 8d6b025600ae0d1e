"""The training and evaluation steps as train.py builds them for a GPU or TPU, checked from this
CPU host: lowered with `jax.export` for cuda and tpu over abstract inputs (`jax.eval_shape`, no
initialisation, nothing compiled or run), they hold no CPU-only custom call; in bfloat16
(`half_precision`) every convolution runs in bfloat16 while the parameters, the BatchNorm
statistics, the optimiser state and the loss stay float32. And `googlenet-jax export --format
jax --platforms cuda,tpu` writes an artifact that loads and lists both platforms."""

import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from googlenet_jax import cpu
from googlenet_jax.cpu import onednn
from googlenet_jax import model_dir
from googlenet_jax.train.parallel import Parallel
from googlenet_jax.train.state import create_model, create_optimizer, create_train_state
from googlenet_jax.train.steps import step_functions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORMS = ("cuda", "tpu")
NUM_CLASSES = 10
BATCH = 16  # global: 2 examples on each of the suite's 8 simulated devices
# Custom calls that every platform lowers (sharding annotations, the checks of symbolic
# shapes); any other is a kernel of one backend. The project's CPU kernels are FFI targets
# registered for "cpu" only (`cpu.onednn`, named with its prefix).
PORTABLE_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
                    "shape_assertion"}
CPU_ONLY_PREFIXES = (onednn._PREFIX, "lapack_", "ducc_", "xla_cpu_")  # pylint: disable=protected-access
# (variant, image size, half_precision): the classic layout's aux heads need >= 224 px.
CASES = {"torchvision-f32": ("torchvision", 64, False),
         "torchvision-bf16": ("torchvision", 64, True),
         "classic-bf16": ("classic", 224, True)}

Lowered = collections.namedtuple("Lowered", "train eval config")


def accelerator_config(variant, size, half_precision):
  config = default.get_config()
  config.variant, config.image_size, config.half_precision = variant, size, half_precision
  config.batch_size = config.eval_batch_size = BATCH
  config.num_classes = NUM_CLASSES
  return config


def lower_steps(config, platforms=PLATFORMS) -> Lowered:
  """The loop's steps (`step_functions` through `Parallel.compile`, the model on the ops that
  train.py's `ops="auto"` picks off the CPU backend), exported for `platforms`."""
  ops = cpu.ops_for_backend(platforms[0])
  assert all(cpu.ops_for_backend(p) is ops for p in platforms)
  model = create_model(config, NUM_CLASSES, ops)
  tx = create_optimizer(config, 10, 100)
  size = config.image_size
  state = jax.eval_shape(lambda: create_train_state(model, tx, config, (1, size, size, 3)))
  parallel = Parallel(config.parallel)
  train_fn, eval_fn = step_functions(config, model, tx)
  image = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
  label = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  # jax.export refuses custom calls without a compatibility guarantee; let the project's CPU
  # kernels through, so that the tests below name them if they appear.
  cpu_kernels = [jax.export.DisabledSafetyCheck.custom_call(onednn._PREFIX + kind)  # pylint: disable=protected-access
                 for kind in onednn._TARGETS]  # pylint: disable=protected-access
  export = lambda step, *args: jax.export.export(
      jax.jit(step), platforms=platforms, disabled_checks=cpu_kernels)(*args)
  train = export(parallel.compile(train_fn, donate_state=True), state,
                 {"image": image, "label": label})
  evaluate = export(parallel.compile(eval_fn), state,
                    {"image": image, "label": label, "mask": jax.ShapeDtypeStruct((BATCH,), bool)})
  return Lowered(train, evaluate, config)


def custom_call_targets(mlir: str) -> set:
  return (set(re.findall(r"custom_call @([\w.$-]+)", mlir))
          | set(re.findall(r'call_target_name = "([^"]+)"', mlir)))


def convolution_types(mlir: str) -> list:
  """(lhs, rhs, result) element types of every `stablehlo.convolution`."""
  tensor = r"tensor<[^>]*x([a-z]+\d*)>"  # the element type follows the last "x"
  pattern = rf"stablehlo\.convolution\(.*?:\s*\({tensor}, {tensor}\)\s*->\s*{tensor}"
  types = re.findall(pattern, mlir)
  assert len(types) == mlir.count("stablehlo.convolution("), "a convolution was not parsed"
  return types


@pytest.fixture(scope="module", params=list(CASES))
def lowered(request) -> Lowered:
  return lower_steps(accelerator_config(*CASES[request.param]))


def test_steps_lower_for_cuda_and_tpu_without_cpu_only_custom_calls(lowered):
  for exported in (lowered.train, lowered.eval):
    assert exported.platforms == PLATFORMS
    assert exported.nr_devices == jax.device_count()  # data parallel over every device
    targets = custom_call_targets(exported.mlir_module())
    assert not [t for t in targets if t.startswith(CPU_ONLY_PREFIXES)], targets
    assert targets <= PORTABLE_TARGETS, targets


def test_convolutions_run_in_the_compute_dtype(lowered):
  want = "bf16" if lowered.config.half_precision else "f32"
  for exported in (lowered.train, lowered.eval):
    types = convolution_types(exported.mlir_module())
    assert len(types) >= 57, len(types)  # at least the torchvision layout's forward convs
    assert {t for triple in types for t in triple} == {want}, collections.Counter(types)


def test_parameters_statistics_optimizer_state_and_loss_stay_float32(lowered):
  state, metrics = jax.tree.unflatten(lowered.train.out_tree, lowered.train.out_avals)
  has_batch_norm = lowered.config.variant == "torchvision"  # the classic layout has LRN
  assert bool(jax.tree.leaves(state.batch_stats)) == has_batch_norm
  for name, tree in [("params", state.params), ("batch_stats", state.batch_stats),
                     ("opt_state", state.opt_state)]:
    dtypes = {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)}
    assert dtypes <= {np.dtype(np.float32)} and (dtypes or name == "batch_stats"), (name, dtypes)
  assert {k: a.dtype for k, a in metrics.items()} == {
      k: np.dtype(np.float32) for k in ("loss", "top1", "top5", "finite")}
  (state_in, _), _ = jax.tree.unflatten(lowered.train.in_tree, lowered.train.in_avals)
  assert {a.dtype for a in jax.tree.leaves(state_in.params)} == {np.dtype(np.float32)}
  sums = jax.tree.unflatten(lowered.eval.out_tree, lowered.eval.out_avals)
  assert {a.dtype for a in sums.values()} == {np.dtype(np.float32)}


def test_export_command_writes_an_artifact_for_cuda_and_tpu(tmp_path):
  config = accelerator_config("torchvision", 64, False)
  model = create_model(config, NUM_CLASSES)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  workdir = str(tmp_path / "model")
  model_dir.save_variables(workdir, jax.tree.map(lambda a: np.ones(a.shape, a.dtype), variables))
  model_dir.write_config(workdir, dict(variant="torchvision", aux_logits=False, image_size=64,
                                       channels=3, normalize="imagenet", eval_crop_fraction=1.0),
                         num_classes=NUM_CLASSES, class_names=[str(i) for i in range(10)])
  out = str(tmp_path / "googlenet.jax")
  script = os.path.join(os.path.dirname(sys.executable), "googlenet-jax")
  command = [script] if os.path.exists(script) else [sys.executable, "-m",
                                                     "googlenet_jax.tools.main"]
  run = subprocess.run(command + ["export", "--workdir", workdir, "--format", "jax",
                                  "--platforms", "cuda,tpu", "--out", out],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT})
  assert run.returncode == 0, run.stderr[-3000:]
  with open(out, "rb") as f:
    exported = jax.export.deserialize(f.read())
  assert exported.platforms == PLATFORMS
  assert str(exported.in_avals[0].shape[0]) == "b" and exported.in_avals[0].shape[1:] == (64, 64, 3)
  assert exported.out_avals[0].dtype == np.float32
  assert custom_call_targets(exported.mlir_module()) <= PORTABLE_TARGETS
