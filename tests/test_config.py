"""Config fields and their allowed values: configs/default.py sets every field, and each set
of names is defined once, where the code dispatches on it."""

import re

import pytest

from configs import default
from googlenet_jax import cpu
from googlenet_jax import train as training
from googlenet_jax.ops import LAX


def test_ops_names_name_the_ops(monkeypatch):
  monkeypatch.setattr(cpu.onednn, "available", lambda: False)
  assert [cpu.ops_named(n) for n in cpu.OPS_NAMES] == [cpu.FAST_XLA, LAX, cpu.FAST_XLA,
                                                       cpu.ONEDNN]
  with pytest.raises(ValueError, match="ops must be one of auto, lax, cpu-xla, cpu-onednn, "
                     "got 'onednn'"):
    cpu.ops_named("onednn")


@pytest.mark.parametrize("field", ["lr_schedule", "eval_batch_size", "momentum",
                                   "label_smoothing"])
def test_a_config_without_a_field_is_refused_with_the_fix(field):
  config = default.get_config()
  del config[field]
  with pytest.raises(ValueError, match=re.escape(
      f"config has no field '{field}': start from configs/default.py's get_config(), which "
      "sets every field")):
    training.validate_config(config, 1)


@pytest.mark.parametrize("field,names", [
    ("optimizer", training.state.OPTIMIZERS), ("lr_schedule", training.state.LR_SCHEDULES),
    ("rmsprop_style", training.state.RMSPROP_STYLES), ("parallel", training.parallel.MODES),
    ("data_loader", training.loop.LOADERS), ("ops", cpu.OPS_NAMES)])
def test_each_allowed_name_is_accepted_and_others_are_named(field, names):
  config = default.get_config()
  for name in names:
    config[field] = name
    training.validate_config(config, 1)
  config[field] = "other"
  with pytest.raises(ValueError, match=f"{field} must be '{list(names)[0]}'.* got 'other'"):
    training.validate_config(config, 1)
