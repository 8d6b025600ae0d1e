"""Test set-up: 8 simulated CPU devices (for the data-parallel tests) before JAX starts."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # torch/TF stay on the CPU in tests
sys.path.insert(0, os.path.dirname(__file__))

# PyTorch (and torchvision's triton import) must load before TensorFlow: the other order
# crashes the process with a segmentation fault (clashing native libraries).
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

import jax  # noqa: E402,F401

from googlenet_jax.tools import cli  # noqa: E402

# Compiled programs are cached on disk (cli.default_cache_dir(), outside the checkout): the suite,
# the train.py and tool subprocesses it starts (tests/helpers.subprocess_env) and the next run
# of the suite compile the same networks many times.
cli.enable_compilation_cache()


# Seconds each file takes in each tier (cold compilation cache, 2 workers, 2-core host): files
# are handed to the xdist workers in this order, longest first (Makefile: --dist loadfile
# --no-loadscope-reorder), so that no worker starts a long file when the other is nearly done.
# Files not listed come last. Rough values do: only the order matters.
FAST_SECONDS = {
    "test_parity_torch.py": 120, "test_training.py": 110, "test_cli.py": 105,
    "test_nnx.py": 70, "test_dali.py": 65, "test_features.py": 60, "test_model.py": 60,
    "test_accelerator.py": 50, "test_onednn_isa.py": 50, "test_train_step.py": 42,
    "test_fidelity.py": 40, "test_reliability.py": 40, "test_compilation_cache.py": 40,
    "test_pipeline_benchmark.py": 37, "test_export.py": 35, "test_boundaries.py": 31,
    "test_onednn.py": 30, "test_fast_ops.py": 25, "test_parity_keras.py": 25,
}
SLOW_SECONDS = {
    "test_multihost.py": 960, "test_reliability.py": 700, "test_end_to_end.py": 460,
    "test_fidelity.py": 330, "test_onednn_isa.py": 190, "test_benchmark.py": 200,
    "test_nnx.py": 95, "test_readme.py": 270, "test_checkpoints.py": 145,
    "test_compile_time.py": 150, "test_training.py": 170, "test_parity_torch.py": 110,
    "test_gpu_benchmark.py": 105, "test_cli.py": 90, "test_features.py": 55,
    "test_train_step.py": 70, "test_boundaries.py": 60, "test_fast_ops.py": 55,
    "test_export.py": 95, "test_dali.py": 80,
}


def pytest_collection_modifyitems(config, items):
  del config
  weight = {}
  for item in items:
    name = os.path.basename(str(item.fspath))
    table = SLOW_SECONDS if item.get_closest_marker("slow") else FAST_SECONDS
    weight.setdefault(name, set()).add(table.get(name, 0))
  # stable: the tests of a file keep their order
  items.sort(key=lambda item: -sum(weight[os.path.basename(str(item.fspath))]))
