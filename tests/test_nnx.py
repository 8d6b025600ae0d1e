"""The network from Flax NNX (`googlenet_jax.nnx_bridge`): the same bits as the linen path.

Init, eval / train outputs, dropout keys, BatchNorm running statistics and optimiser steps
(`nnx.Optimizer`) are compared with the linen module used directly (`model.init`,
`model.apply`, `jax.grad` + optax), float32, torchvision layout at 64x64, batch 3.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx

import googlenet_jax
from googlenet_jax import GoogLeNet, GoogLeNetOutputs, models, nnx_bridge
from jax._src.interpreters import mlir
from googlenet_jax.convert import torch_to_flax

MODEL = GoogLeNet(variant="torchvision", num_classes=10)
X = jnp.asarray(np.random.RandomState(0).randn(3, 64, 64, 3), jnp.float32)
LABELS = jnp.asarray([1, 4, 7])


def tree_rel_err(got, ref) -> float:
  """Relative L2 error over all leaves of two trees of the same structure, in float64."""
  chex.assert_trees_all_equal_shapes(got, ref)
  num = sum(float(np.sum((np.asarray(g, np.float64) - np.asarray(r, np.float64)) ** 2))
            for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)))
  den = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in jax.tree.leaves(ref))
  return float(np.sqrt(num / den))


def loss_of(out, labels):
  ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
  return ce(out.logits) + 0.3 * (ce(out.aux1) + ce(out.aux2))


@pytest.fixture(scope="module")
def linen_variables():
  # What to_nnx draws for the parameters from nnx.Rngs(params=0, ...).
  return jax.jit(MODEL.init)(nnx.Rngs(params=0).params(), X)


INIT_CALLS = []


@pytest.fixture(scope="module")
def net0():
  real = nnx_bridge.init_variables  # to_nnx initialises through the fast jitted init

  def recorded(*args):
    INIT_CALLS.append(args)
    return real(*args)

  nnx_bridge.init_variables = recorded
  try:
    return nnx_bridge.to_nnx(MODEL, rngs=nnx.Rngs(params=0, dropout=1), sample_shape=X.shape)
  finally:
    nnx_bridge.init_variables = real


@pytest.fixture
def net(net0):
  return nnx.clone(net0)  # each test mutates its own copy


# One compilation each, shared by the tests (nnx.jit caches on the module's structure).
nnx_eval = nnx.jit(lambda net, x: net(x))
nnx_train_no_dropout = nnx.jit(lambda net, x: net(x, train=True, deterministic=True))


def test_init_is_the_linen_init(net0, linen_variables):
  chex.assert_trees_all_equal(nnx_bridge.to_linen_variables(net0), linen_variables)
  params = nnx.state(net0, nnx.Param)
  stats = nnx.state(net0, nnx.BatchStat)
  assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(linen_variables["params"]))
  assert len(jax.tree.leaves(stats)) == len(jax.tree.leaves(linen_variables["batch_stats"]))
  assert (net0.deterministic, net0.use_running_average) == (True, True)  # eval, as linen


def test_to_nnx_uses_init_variables_which_is_model_init_bit_for_bit(net0, linen_variables):
  assert [(a[0], tuple(a[2])) for a in INIT_CALLS] == [(MODEL, X.shape)]
  # The program to_nnx compiled (one per model and shape), against jax.jit(model.init).
  got = googlenet_jax.init_variables(MODEL, nnx.Rngs(params=0).params(), X.shape)
  assert set(got) == {"params", "batch_stats"}
  chex.assert_trees_all_equal(got, linen_variables)
  if models.unrolled_threefry_available():  # the lowering rule is restored, on errors too
    rules = dict(mlir._platform_specific_lowerings["cpu"])  # pylint: disable=protected-access
    with pytest.raises(ValueError, match="too small"):
      googlenet_jax.init_variables(MODEL, 0, (1, 8, 8, 3))
    assert dict(mlir._platform_specific_lowerings["cpu"]) == rules  # pylint: disable=protected-access


def test_given_variables_are_loaded_as_they_are(linen_variables):
  torch.manual_seed(0)
  weights = torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=True,
                                         init_weights=True)
  converted = torch_to_flax(weights.state_dict(), "torchvision")
  net = nnx_bridge.to_nnx(MODEL, converted, sample_shape=X.shape)
  chex.assert_trees_all_close(nnx_bridge.to_linen_variables(net), converted, rtol=0, atol=0)
  with pytest.raises(ValueError, match=r"wrongly shaped \(6\): aux_after_4a/fc2/bias \(10,\) != \(7,\)"):
    nnx_bridge.to_nnx(GoogLeNet(variant="torchvision", num_classes=7), linen_variables,
                      sample_shape=X.shape)
  no_aux = {c: {k: v for k, v in t.items() if not k.startswith("aux")}
            for c, t in linen_variables.items()}
  with pytest.raises(ValueError, match=r"missing \(\d+\): aux_after_4a/"):
    nnx_bridge.to_nnx(MODEL, no_aux, sample_shape=X.shape)


def test_mode_attributes(net):
  net.train()
  assert (net.deterministic, net.use_running_average) == (False, False)
  net.eval()
  assert (net.deterministic, net.use_running_average) == (True, True)
  net.set_attributes(use_running_average=False)  # batch statistics, no dropout
  assert (net.deterministic, net.use_running_average) == (True, False)
  if hasattr(nnx, "view"):  # flax >= 0.12
    view = nnx.view(net, deterministic=False)
    assert (view.deterministic, net.deterministic) == (False, True)


def test_eval_is_linen_apply_and_changes_nothing(net, linen_variables):
  got = nnx_eval(net, X)
  ref = jax.jit(MODEL.apply)(linen_variables, X)
  chex.assert_shape(got, (3, 10))
  chex.assert_trees_all_equal(got, ref)
  chex.assert_trees_all_equal(nnx_bridge.to_linen_variables(net), linen_variables)
  assert int(net.rngs.count[...]) == 0  # no dropout key drawn


def test_train_call_uses_batch_stats_and_updates_the_running_stats(net, linen_variables):
  got = nnx_train_no_dropout(net, X)
  ref, updates = jax.jit(lambda v, x: MODEL.apply(v, x, train=True, deterministic=True,
                                                  mutable=["batch_stats"]))(linen_variables, X)
  assert isinstance(got, GoogLeNetOutputs)
  chex.assert_shape(list(got), (3, 10))
  chex.assert_trees_all_equal(tuple(got), tuple(ref))
  stats = nnx_bridge.to_linen_variables(net)["batch_stats"]
  chex.assert_trees_all_equal(stats, updates["batch_stats"])
  assert tree_rel_err(stats, linen_variables["batch_stats"]) > 1e-3  # they moved
  # Again: the outputs (batch statistics) are the same, the running stats move on.
  again = nnx_train_no_dropout(net, X)
  chex.assert_trees_all_equal(tuple(again), tuple(got))
  assert tree_rel_err(nnx_bridge.to_linen_variables(net)["batch_stats"], stats) > 1e-4


def test_dropout_keys_come_from_the_rngs_stream(net):
  net.train()  # dropout on
  step = nnx.jit(lambda net, x: net(x))
  first, second = step(net, X), step(net, X)
  assert int(net.rngs.count[...]) == 2
  for a, b in zip(first, second):  # logits, aux1, aux2
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  net.set_attributes(deterministic=True)
  chex.assert_trees_all_equal(tuple(nnx_train_no_dropout(net, X)),
                              tuple(nnx_train_no_dropout(net, X)))
  with pytest.raises(ValueError, match="no dropout rngs"):
    nnx_bridge.to_nnx(MODEL, nnx_bridge.to_linen_variables(net), sample_shape=X.shape)(
        X, train=True)


@pytest.mark.slow  # (the fast tier's time: make test runs in <= 8 minutes)
def test_optimizer_steps_match_linen(net, linen_variables):
  steps, tx = 3, optax.sgd(0.05, momentum=0.9)

  # NNX: nnx.Optimizer, nnx.value_and_grad, the BatchNorm update inside the loss.
  net.set_attributes(deterministic=True, use_running_average=False)  # train, dropout off
  optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)

  @nnx.jit
  def nnx_step(net, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(lambda net: loss_of(net(x), labels))(net)
    optimizer.update(net, grads)
    return loss

  # linen: the same step on the variables dict.
  @jax.jit
  def linen_step(params, batch_stats, opt_state, x, labels):
    def loss_fn(params):
      out, updates = MODEL.apply({"params": params, "batch_stats": batch_stats}, x,
                                 train=True, deterministic=True, mutable=["batch_stats"])
      return loss_of(out, labels), updates["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = linen_variables["params"], linen_variables["batch_stats"]
  opt_state = tx.init(params)
  for _ in range(steps):
    nnx_loss = nnx_step(net, optimizer, X, LABELS)
    params, batch_stats, opt_state, loss = linen_step(params, batch_stats, opt_state, X, LABELS)
    assert float(nnx_loss) == float(loss)
  got = jax.tree.map(np.asarray, nnx_bridge.to_linen_variables(net))
  start = jax.tree.map(np.asarray, linen_variables["params"])
  moved = jax.tree.map(lambda a, b: np.asarray(a) - b, params, start)
  got_moved = jax.tree.map(lambda a, b: a - b, got["params"], start)
  chex.assert_trees_all_equal(got["params"], params)
  chex.assert_trees_all_equal(got_moved, moved)  # the steps themselves, not only the sums
  chex.assert_trees_all_equal(got["batch_stats"], batch_stats)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(moved)) > 1e-3  # they trained
  assert int(optimizer.step[...]) == steps
