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

import jax  # noqa: E402

# Compiled programs are cached on disk: the suite and the train.py subprocesses it starts
# compile the same network many times.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                               ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
