"""The training step on 8 simulated devices: pmap, shard_map and one device agree."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from googlenet_jax import train as training


from googlenet_jax import GoogLeNet




def _config(**overrides):
  config = default.get_config()
  config.update(dict(variant="classic", aux_logits=False, image_size=64, batch_size=16,
                     dropout=0.0, aux_dropout=0.0, learning_rate=1e-3, momentum=0.9))
  config.update(overrides)
  return config


def _run(mode, devices, config, batches):
  # Plain lax convolutions: this checks the parallel reduction. These 3 steps diverge (loss
  # 31 -> 29,000), which amplifies rounding; fast_ops' chunked weight-gradient sums round
  # differently per per-device batch size (8 devices vs 1: 3e-3 per tensor instead of 1e-3).
  # fast_ops itself is checked against lax in test_fast_ops.py.
  return _run_steps(mode, devices, config, batches)  # GoogLeNet's default ops: plain lax


def _run_steps(mode, devices, config, batches):
  parallel = training.Parallel(mode, devices)
  model = training.create_model(config, num_classes=10)
  tx = training.create_optimizer(config, steps_per_epoch=10, num_steps=10)
  state = training.create_train_state(model, tx, config, (1, 64, 64, 3))
  state = parallel.replicate(state)
  step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                            aux_loss_weight=0.3), donate_state=True)
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.batch(batch))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


@pytest.fixture(scope="module")
def batches():
  rng = np.random.RandomState(0)
  return [{"image": rng.randn(16, 64, 64, 3).astype(np.float32),
           "label": rng.randint(0, 10, 16).astype(np.int32)} for _ in range(3)]


@pytest.fixture(scope="module")
def single_device(batches):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  return _run("shard_map", jax.devices()[:1], _config(), batches)


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_eight_devices_match_one_device_with_the_full_batch(mode, batches, single_device):
  state, losses = _run(mode, jax.devices(), _config(), batches)
  ref_state, ref_losses = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  # fp32 tolerance, per tensor as a relative L2 error (a near-tie in a max pool can move a few
  # elements by more than an elementwise tolerance)
  errors = jax.tree.map(lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                        state.params, ref_state.params)
  assert max(jax.tree.leaves(errors)) < 1e-3, errors  # small biases: larger relative error
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  total = np.linalg.norm(flat(state.params) - flat(ref_state.params))
  assert total / np.linalg.norm(flat(ref_state.params)) < 2e-4
  assert int(state.step) == 3
  assert np.all(np.isfinite(losses))
  # and training did move the parameters
  init = training.create_train_state(
      training.create_model(_config(), 10), optax.sgd(0.1), _config(), (1, 64, 64, 3))
  assert not np.allclose(state.params["classifier"]["kernel"], init.params["classifier"]["kernel"])


@pytest.mark.parametrize("overrides,match", [
    (dict(batch_size=12), "multiple of the device count 8"),
    (dict(learning_rate=-0.1), "learning_rate must be > 0"),
    (dict(variant="googlenet"), "variant 'googlenet'"),
    (dict(parallel="pjit"), "parallel must be"),
])
def test_impossible_config_is_refused_before_work(overrides, match):
  with pytest.raises(ValueError, match=match):
    training.validate_config(_config(**overrides), jax.device_count())


@pytest.mark.slow
def test_cross_replica_batchnorm_gradients_match_one_device_in_float64():
  """With BatchNorm on batch statistics, float32 gradients of this net at initialisation are
  ill-conditioned (~5e-3 from float64, in PyTorch too), so 8-device and 1-device float32 runs
  drift apart by ~1e-3; in float64 they agree to ~1e-9 (float64 rounding, amplified alike)."""
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(16, 64, 64, 3), "label": rng.randint(0, 10, 16).astype(np.int32)}
  with jax.enable_x64(True):
    model = GoogLeNet(variant="torchvision", num_classes=10, dropout=0.0, aux_dropout=0.0,
                      dtype=jnp.float64, param_dtype=jnp.float64, bn_axis_name=training.AXIS)
    tx = optax.sgd(1.0)
    state = training.create_train_state(model, tx, _config(), (1, 64, 64, 3))
    deltas = {}
    for mode, n in (("shard_map", 1), ("pmap", 8), ("shard_map", 8)):
      parallel = training.Parallel(mode, jax.devices()[:n])
      step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                                aux_loss_weight=0.3))
      new, _ = step(parallel.replicate(state), parallel.batch(batch))
      new = jax.device_get(new)
      deltas[(mode, n)] = (jax.tree.map(np.subtract, new.params, state.params), new.batch_stats)
  ref_grads, ref_stats = deltas[("shard_map", 1)]
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  for key in (("pmap", 8), ("shard_map", 8)):
    grads, stats = deltas[key]
    assert np.linalg.norm(flat(grads) - flat(ref_grads)) <= 1e-8 * np.linalg.norm(flat(ref_grads))
    assert np.linalg.norm(flat(stats) - flat(ref_stats)) <= 1e-8 * np.linalg.norm(flat(ref_stats))


@pytest.mark.slow  # two more compilations of the step (about a minute each)
def test_half_precision_computes_in_bfloat16_and_keeps_float32_params(batches):
  config = _config(half_precision=True)
  model = training.create_model(config, num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
  jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.zeros((2, 64, 64, 3))))
  assert "bf16[2,32,32,64]" in jaxpr, "the stem should run in bfloat16"
  # One step: these random-label steps diverge (loss 31 -> 29,000 in three), which would
  # amplify bfloat16's rounding far beyond what it is.
  state, losses = _run("pmap", jax.devices(), config, batches[:1])
  ref_state, ref_losses = _run("pmap", jax.devices(), _config(), batches[:1])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating))
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # bf16: 8 bits of mantissa
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  init = training.create_train_state(model, optax.sgd(0.1), config, (1, 64, 64, 3))
  moved = flat(ref_state.params) - flat(init.params)
  # the bf16 step's update follows the float32 step's
  diff = flat(state.params) - flat(ref_state.params)
  assert np.linalg.norm(diff) < 0.1 * np.linalg.norm(moved)
