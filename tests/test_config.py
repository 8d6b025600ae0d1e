"""Config fields and their allowed values: configs/default.py sets every field, and each set
of names is defined once, where the code dispatches on it."""

import pytest

from googlenet_jax import cpu
from googlenet_jax.ops import LAX


def test_ops_names_name_the_ops(monkeypatch):
  monkeypatch.setattr(cpu.onednn, "available", lambda: False)
  assert [cpu.ops_named(n) for n in cpu.OPS_NAMES] == [cpu.FAST_XLA, LAX, cpu.FAST_XLA,
                                                       cpu.ONEDNN]
  with pytest.raises(ValueError, match="ops must be one of auto, lax, cpu-xla, cpu-onednn, "
                     "got 'onednn'"):
    cpu.ops_named("onednn")
