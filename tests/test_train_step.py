"""The training step as train.py builds it, in the corners the other tests leave: the aux heads
(classic and paper layouts) with dropout on, Polyak/EMA weights and their evaluation, and every
config in configs/ loading and validating."""

import functools
import importlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from googlenet_jax import GoogLeNetOutputs
from googlenet_jax import train as training

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _one_step(config, batch, num_classes=10):
  """(state before, state after, metrics) of one train_step on one device, as loop.py builds
  it (its model, optimiser and step partial)."""
  model = training.create_model(config, num_classes)
  tx = training.create_optimizer(config, steps_per_epoch=10, num_steps=10)
  shape = (1, *batch["image"].shape[1:])
  state = training.create_train_state(model, tx, config, shape, fast_init=True)
  parallel = training.Parallel("shard_map", jax.devices()[:1])
  step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                            aux_loss_weight=config.aux_loss_weight,
                                            ema_decay=config.ema_decay))
  new, metrics = step(parallel.replicate(state), parallel.batch(batch))
  return model, state, jax.device_get(new), jax.device_get(metrics)


def _expected_loss(model, state, batch, aux_loss_weight):
  """The training loss recomputed from the model's outputs, with the dropout key the step
  draws (`steps.train_step`: the state's key folded with the step and the device index)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0), 0)
  variables = {"params": state.params, **({"batch_stats": state.batch_stats}
                                          if state.batch_stats else {})}
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": key}))(variables, batch["image"])
  assert isinstance(out, GoogLeNetOutputs)
  ce = lambda z: float(optax.softmax_cross_entropy_with_integer_labels(
      z, batch["label"]).mean())
  no_dropout, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, deterministic=True,
                                                   mutable=["batch_stats"]))(
      variables, batch["image"])
  return (ce(out.logits) + aux_loss_weight * (ce(out.aux1) + ce(out.aux2)),
          ce(no_dropout.logits))


def _check_aux_step(variant):
  config = default.get_config()
  config.update(dict(variant=variant, image_size=224, batch_size=2, learning_rate=0.01,
                     aux_loss_weight=0.3, lr_schedule="constant"))
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(2, 224, 224, 3).astype(np.float32),
           "label": np.array([3, 8], np.int32)}
  model, before, after, metrics = _one_step(config, batch)
  assert model.has_aux and model.dropout is None  # the layout's own rates
  loss, main_without_dropout = _expected_loss(model, before, batch, 0.3)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  assert abs(loss - main_without_dropout) > 1e-3  # dropout was on, aux losses were added
  # Both heads and the trunk below them learn from the step.
  for name in ("aux_after_4a", "aux_after_4d", "inception_4a", "classifier"):
    moved = [float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(after.params[name]),
                                                        jax.tree.leaves(before.params[name]))]
    assert min(moved) > 0, (name, moved)


def test_classic_layout_trains_its_aux_heads_with_dropout():
  _check_aux_step("classic")


@pytest.mark.slow  # another full compile of a 224x224 step with aux heads
def test_paper_layout_trains_its_aux_heads_with_dropout():
  _check_aux_step("paper")


class _Tiny(nn.Module):  # train_step with any model: compiles in a second, unlike GoogLeNet

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_ema_weights_follow_the_parameters_and_evaluate_as_their_own_model():
  decay, steps = 0.9, 3
  config = default.get_config()
  config.update(dict(image_size=8, batch_size=4, ema_decay=decay, learning_rate=0.5))
  model = _Tiny()
  tx = training.create_optimizer(config, 10, 10)
  state = training.create_train_state(model, tx, config, (1, 8, 8, 3))
  assert state.ema_params is not None
  one = training.Parallel("shard_map", jax.devices()[:1])
  step = one.compile(functools.partial(training.train_step, model=model, tx=tx,
                                       aux_loss_weight=0.3, ema_decay=decay))
  rng = np.random.RandomState(0)
  expected = jax.tree.map(np.asarray, jax.device_get(state.params))  # EMA starts at the weights
  state = one.replicate(state)
  for _ in range(steps):
    batch = {"image": rng.randn(4, 8, 8, 3).astype(np.float32),
             "label": rng.randint(0, 10, 4).astype(np.int32)}
    state, _ = step(state, one.batch(batch))
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
  got = jax.device_get(state.ema_params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), got, expected)
  assert not np.allclose(got["Dense_0"]["kernel"], params["Dense_0"]["kernel"], atol=1e-4)

  batch = {"image": rng.randn(4, 8, 8, 3).astype(np.float32),
           "label": rng.randint(0, 10, 4).astype(np.int32), "mask": np.ones(4, np.int32)}
  evaluate = lambda use_ema: one.compile(functools.partial(training.eval_step, model=model,
                                                           use_ema=use_ema))
  with_ema = jax.device_get(evaluate(True)(state, one.batch(batch)))
  plain = jax.device_get(evaluate(False)(state, one.batch(batch)))
  as_params = jax.device_get(evaluate(False)(state.replace(params=state.ema_params),
                                             one.batch(batch)))
  assert float(with_ema["loss"]) == float(as_params["loss"])
  assert float(with_ema["loss"]) != float(plain["loss"])


@pytest.mark.parametrize("name", sorted(f[:-3] for f in os.listdir(CONFIGS)
                                        if f.endswith(".py") and f != "__init__.py"))
def test_every_config_loads_and_validates(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  assert set(default.get_config()) <= set(config), "a config starts from configs/default.py"
  devices = max(d for d in (8, 4, 2, 1) if config.batch_size % d == 0)
  training.validate_config(config, devices)
  model = training.create_model(config, config.num_classes or 10)
  size = config.image_size
  model.check_input(jax.ShapeDtypeStruct((1, size, size, config.channels), jnp.float32),
                    train=True)
