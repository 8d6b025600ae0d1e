"""Test set-up: 8 simulated CPU devices (for the data-parallel tests) before JAX starts."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # torch/TF stay on the CPU in tests
sys.path.insert(0, os.path.dirname(__file__))
