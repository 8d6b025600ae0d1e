"""Start-up settings that shorten tracing and compiling without changing a computed value:
unrolled threefry for initialisation, the garbage collector paused while a step is traced, the
finiteness check as one reduction, and the flat optimiser state (with resume of checkpoints
that keep per-parameter state)."""

import functools
import gc

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default
from googlenet_jax import train as training


from googlenet_jax.train import checkpointing


from googlenet_jax.cpu import compile_time


def _draw(key):
  key = jax.random.fold_in(key, 3)
  a, b = jax.random.split(key)
  return jax.random.truncated_normal(a, -2.0, 2.0, (5, 7)), jax.random.uniform(b, (11,))


def test_unrolled_threefry_gives_the_same_bits_without_while_loops():
  if not compile_time.unrolled_threefry_available():
    pytest.skip("this JAX keeps its threefry lowering elsewhere: the default is used")
  key = jax.random.key(42)
  # A new function object each time: JAX caches a function's lowering.
  rolled = jax.jit(lambda k: _draw(k)).lower(key).as_text()
  assert "stablehlo.while" in rolled  # JAX's CPU default: a rolled loop per hash
  with compile_time.unrolled_threefry():
    lowered = jax.jit(lambda k: _draw(k)).lower(key)
    unrolled = lowered.as_text()
    inside = lowered.compile()(key)
  assert "stablehlo.while" not in unrolled
  after = jax.jit(lambda k: _draw(k))
  assert "stablehlo.while" in after.lower(key).as_text()  # restored afterwards
  for a, b in zip(inside, after(key)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # two compiles of the whole initialisation (~40 s)
def test_create_train_state_draws_what_model_init_draws():
  config = default.get_config()
  config.update(dict(variant="classic", image_size=64))
  model = training.create_model(config, 10)
  state = training.create_train_state(model, optax.sgd(0.1), config, (1, 64, 64, 3))
  plain = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, 64, 64, 3)))
  jax.tree.map(np.testing.assert_array_equal, state.params, plain["params"])


@pytest.mark.parametrize("was_enabled", [True, False])
def test_gc_paused_restores_the_collector_as_it_was(was_enabled):
  (gc.enable if was_enabled else gc.disable)()
  try:
    with compile_time.gc_paused():
      assert not gc.isenabled()
    assert gc.isenabled() == was_enabled
    with pytest.raises(RuntimeError):
      with compile_time.gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled() == was_enabled
  finally:
    gc.enable()


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_a_compiled_step_is_traced_with_the_collector_paused(mode):
  seen = []

  def step(state, batch):
    seen.append(gc.isenabled())  # runs while tracing, i.e. during the first call
    return state + jax.lax.psum(batch.sum(), training.AXIS), {}

  parallel = training.Parallel(mode, jax.devices()[:1])
  fn = parallel.compile(step)
  state = parallel.replicate(jnp.zeros(()))
  out, _ = fn(state, parallel.batch(np.ones((2, 3), np.float32)))
  assert seen == [False] and gc.isenabled()
  out, _ = fn(out, parallel.batch(np.ones((2, 3), np.float32)))
  assert float(out) == 12.0 and seen == [False]  # no retrace
  assert hasattr(fn, "lower")  # the jitted function's own attributes stay reachable


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
def test_all_finite_is_one_check_over_every_leaf(bad):
  tree = {"a": jnp.ones((3, 4)), "b": {"c": jnp.zeros((5,)), "d": jnp.ones((2, 2, 2))}}
  if bad is not None:
    tree["b"]["d"] = tree["b"]["d"].at[1, 0, 1].set(bad)
  assert bool(jax.jit(training.steps._all_finite)(tree)) == (bad is None)
  assert bool(training.steps._all_finite({}))


def _small_config(**overrides):
  config = default.get_config()
  config.update(dict(variant="classic", aux_logits=False, image_size=64, batch_size=8,
                     dropout=0.0, momentum=0.9, weight_decay=1e-4, async_checkpointing=False))
  config.update(overrides)
  return config


@pytest.mark.slow  # two full train-step compiles (the fast tier's time: make test runs in <= 8 minutes)
def test_flat_and_per_parameter_optimiser_state_train_alike():
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(8, 64, 64, 3).astype(np.float32),
           "label": rng.randint(0, 10, 8).astype(np.int32)}
  results = {}
  for flat in (True, False):
    config = _small_config(flat_optimizer_state=flat)
    model = training.create_model(config, 10)
    tx = training.create_optimizer(config, 10, 10)
    parallel = training.Parallel("shard_map", jax.devices()[:1])
    state = parallel.replicate(training.create_train_state(model, tx, config, (1, 64, 64, 3),
                                                              fast_init=True))
    step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                              aux_loss_weight=0.3))
    for _ in range(2):
      state, _ = step(state, parallel.batch(batch))
    results[flat] = jax.device_get(state)
  assert len(jax.tree.leaves(results[True].opt_state)) < 5  # one vector (+ counters)
  assert len(jax.tree.leaves(results[False].opt_state)) > 50  # one per parameter
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               results[True].params, results[False].params)
  assert not np.allclose(results[True].params["classifier"]["kernel"],
                         training.create_train_state(
                             training.create_model(_small_config(), 10), optax.sgd(0.1),
                             _small_config(), (1, 64, 64, 3),
                             fast_init=True).params["classifier"]["kernel"])


@pytest.mark.parametrize("saved_flat", [False, True])
def test_a_checkpoint_resumes_in_the_optimiser_state_form_it_was_saved_in(tmp_path, saved_flat):
  """A per-parameter checkpoint (runs from before flat state existed) under the flat default,
  and a flat checkpoint under flat_optimizer_state=False: each resumes in its own form."""
  config = _small_config(flat_optimizer_state=not saved_flat)
  old = ml_collections.ConfigDict(config.to_dict())
  old.flat_optimizer_state = saved_flat
  model = training.create_model(config, 10)
  shape = (1, 64, 64, 3)
  saved = training.create_train_state(model, training.create_optimizer(old, 10, 10), old, shape,
                                     fast_init=True)
  assert (len(jax.tree.leaves(saved.opt_state)) < 5) == saved_flat
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  ckpt.save(4, saved, force=True)
  ckpt.close()

  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  configured_tx = training.create_optimizer(config, 10, 10)
  tx = training.loop._optimizer_as_saved(ckpt, configured_tx, config, 10, 10, model, shape)
  assert tx is not configured_tx
  parallel = training.Parallel("shard_map", jax.devices()[:1])
  state, step = ckpt.restore_or(
      lambda: training.create_train_state(model, tx, config, shape, fast_init=True),
      parallel.replicated)
  ckpt.close()
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state),
               jax.device_get(saved.opt_state))

  fresh = checkpointing.Checkpointer(str(tmp_path / "fresh"), config)
  assert training.loop._optimizer_as_saved(fresh, configured_tx, config, 10, 10, model,
                                      shape) is configured_tx
  fresh.close()
