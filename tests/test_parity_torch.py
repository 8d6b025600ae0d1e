"""Parity with real PyTorch models: torchvision's googlenet itself, and the classic and d2l
models written after the reference PyTorch implementations of those layouts
(tests/torch_reference.py), on random weights and random inputs, with weights moved by the
project's own converters."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torch.nn import functional as F

from googlenet_jax import GoogLeNet, GoogLeNetOutputs
from googlenet_jax import cpu
from googlenet_jax.convert import flax_to_torch, torch_to_flax
from helpers import dropout_calls, nchw_to_nhwc, rel_err, torch_dropout_calls
import torch_reference

torch.set_num_threads(2)
TOL = 1e-5
TOL_TRAIN_BN = 5e-5
NUM_CLASSES = 10


def make_torch(variant, transform_input=False, dtype=torch.float32, seed=0):
  torch.manual_seed(seed)
  if variant == "torchvision":
    model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                         transform_input=transform_input,
                                         num_classes=NUM_CLASSES, dropout=0.0, dropout_aux=0.0)
    with torch.no_grad():  # torchvision's init zeroes biases and fixes BN: randomise them
      for m in model.modules():
        if isinstance(m, torch.nn.Linear):
          m.bias.uniform_(-0.1, 0.1)
    torch_reference.randomize_batchnorm(model, torch.Generator().manual_seed(seed))
  elif variant == "classic":
    model = torch_reference.ClassicGoogLeNet(NUM_CLASSES, dropout=0.0, aux_dropout=0.0)
  else:
    model = torch_reference.d2l_googlenet(NUM_CLASSES)
  return model.to(dtype)


def jax_model(variant, **kw):
  return GoogLeNet(variant=variant, num_classes=NUM_CLASSES, dropout=0.0, aux_dropout=0.0, **kw)


def random_images(variant, size, batch=2, seed=1, dtype=np.float32):
  channels = 1 if variant == "d2l" else 3
  return np.random.RandomState(seed).randn(batch, channels, size, size).astype(dtype)


# The default size and an odd one in the fast tier; another size in the slow one.
EVAL_CASES = [("torchvision", 224), pytest.param("torchvision", 160, marks=pytest.mark.slow),
              ("torchvision", 193), ("classic", 224),
              pytest.param("classic", 160, marks=pytest.mark.slow), ("classic", 193),
              ("d2l", 96), pytest.param("d2l", 64, marks=pytest.mark.slow), ("d2l", 97)]


@pytest.mark.parametrize("variant,size", EVAL_CASES)
def test_eval_logits_match_pytorch(variant, size):
  tmodel = make_torch(variant, transform_input=(variant == "torchvision" and size == 224)).eval()
  variables = torch_to_flax(tmodel.state_dict(), variant)
  x = random_images(variant, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  model = jax_model(variant, transform_input=(variant == "torchvision" and size == 224))
  got = jax.jit(model.apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  chex.assert_shape(got, (2, NUM_CLASSES))
  chex.assert_type(got, jnp.float32)
  assert rel_err(got, ref) <= TOL


@pytest.mark.parametrize("variant,size", [("torchvision", 193), ("classic", 224), ("d2l", 97)])
def test_cpu_kernels_eval_logits_match_pytorch(variant, size):
  """The same comparison with `ops=googlenet_jax.cpu.ops()` (oneDNN where it works)."""
  tmodel = make_torch(variant).eval()
  variables = torch_to_flax(tmodel.state_dict(), variant)
  x = random_images(variant, size)
  with torch.no_grad():
    ref = tmodel(torch.from_numpy(x)).numpy()
  got = jax.jit(jax_model(variant, ops=cpu.ops()).apply)(variables, jnp.asarray(nchw_to_nhwc(x)))
  assert rel_err(got, ref) <= TOL


def _check_train_outputs(variant, tmodel, torch_out, out, updates, variables):
  """JAX's train-mode outputs and BatchNorm updates against PyTorch's, after `tmodel` (train
  mode) produced `torch_out` from the same images and `variables`."""
  assert isinstance(out, GoogLeNetOutputs)
  if variant == "d2l":  # no aux heads, no BatchNorm
    assert out.aux1 is None and out.aux2 is None
    assert rel_err(out.logits, torch_out.detach().numpy()) <= TOL
    return
  logits, aux_4d, aux_4a = torch_out  # both return (logits, aux2, aux1)
  tol = TOL_TRAIN_BN if variant == "torchvision" else TOL
  for got, ref in ((out.logits, logits), (out.aux1, aux_4a), (out.aux2, aux_4d)):
    assert rel_err(got, ref.detach().numpy()) <= tol
  if variant == "torchvision":
    updated = torch_to_flax(tmodel.state_dict(), variant)["batch_stats"]
    chex.assert_trees_all_close(updates["batch_stats"], updated, rtol=1e-5, atol=1e-6)
    # ...and the statistics did move, so the comparison above is not vacuous.
    assert rel_err(updated["conv1"]["bn"]["var"], variables["batch_stats"]["conv1"]["bn"]["var"]) > 1e-3


# (classic, 224) and the other gradient cases below check the train outputs too.
@pytest.mark.parametrize("variant,size", [("torchvision", 224), ("torchvision", 177),
                                          ("classic", 239)])
def test_train_outputs_and_running_stats_match_pytorch(variant, size):
  tmodel = make_torch(variant).train()
  variables = torch_to_flax(tmodel.state_dict(), variant)
  x = random_images(variant, size, batch=4)
  torch_out = tmodel(torch.from_numpy(x))
  model = jax_model(variant)
  out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, jnp.asarray(nchw_to_nhwc(x)))
  _check_train_outputs(variant, tmodel, torch_out, out, updates, variables)


def _torch_loss_and_grads(tmodel, x, labels):
  """(outputs, {name: gradient}) of the training loss (aux heads weighted 0.3)."""
  out = tmodel(torch.from_numpy(x))
  if isinstance(out, tuple):
    logits, aux_4d, aux_4a = out
    loss = (F.cross_entropy(logits, labels) + 0.3 * F.cross_entropy(aux_4a, labels)
            + 0.3 * F.cross_entropy(aux_4d, labels))
  else:
    loss = F.cross_entropy(out, labels)
  tmodel.zero_grad()
  loss.backward()
  return out, {k: p.grad.detach().numpy() for k, p in tmodel.named_parameters()}


def _jax_outputs_and_grads(model, variables, x, labels):
  """((outputs, BatchNorm updates), gradients) of the same loss: one compiled program."""
  def loss_fn(params):
    out, updates = model.apply({**variables, "params": params}, x, train=True,
                               mutable=["batch_stats"])
    ce = lambda z: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], 1))
    if out.aux1 is not None:
      return ce(out.logits) + 0.3 * ce(out.aux1) + 0.3 * ce(out.aux2), (out, updates)
    return ce(out.logits), (out, updates)
  (_, outputs), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  return outputs, grads


def _flat(grads: dict, keys):
  return np.concatenate([np.asarray(grads[k], np.float64).ravel() for k in keys])


# (classic, 224) in the fast tier; the others in the slow one.
GRAD_CASES = [("classic", 224),
              pytest.param("torchvision", 128, marks=pytest.mark.slow),
              pytest.param("d2l", 96, marks=pytest.mark.slow)]


@pytest.mark.parametrize("variant,size", GRAD_CASES)
def test_gradients_match_pytorch_in_float64_and_float32(variant, size):
  """Gradients against PyTorch's float64 ones; the float32 pass also checks the train-mode
  outputs and running statistics against PyTorch's float32 model on the same images."""
  x64 = random_images(variant, size, batch=3, dtype=np.float64)
  labels = np.array([1, 7, 3])
  t64 = make_torch(variant, dtype=torch.float64).train()
  _, ref = _torch_loss_and_grads(t64, x64, torch.from_numpy(labels))
  keys = sorted(ref)
  with jax.enable_x64(True):
    variables = torch_to_flax(make_torch(variant, dtype=torch.float64).state_dict(), variant)
    model = jax_model(variant, dtype=jnp.float64, param_dtype=jnp.float64)
    _, grads = _jax_outputs_and_grads(model, variables, jnp.asarray(nchw_to_nhwc(x64)),
                                      jnp.asarray(labels))
    chex.assert_trees_all_equal_dtypes(grads, variables["params"])
    got64 = flax_to_torch(grads, variant, as_numpy=True)
  assert sorted(got64) == keys  # every parameter has a gradient, named as PyTorch names it
  assert rel_err(_flat(got64, keys), _flat(ref, keys)) <= 1e-10
  # float32 rounding in a net this deep is ~1e-4; all gradients together within 1e-3 of float64.
  # BatchNorm on batch statistics of a 3-image batch amplifies rounding: there PyTorch's own
  # float32 gradients are ~5e-3 from float64 (near-ties in max pools flip between float32 and
  # float64 and route gradients differently); JAX must stay within 3x of PyTorch's own error.
  t32 = make_torch(variant).train()
  variables32 = torch_to_flax(t32.state_dict(), variant)
  x32 = x64.astype(np.float32)
  torch_out32, torch_grads32 = _torch_loss_and_grads(t32, x32, torch.from_numpy(labels))
  torch_err32 = rel_err(_flat(torch_grads32, keys), _flat(ref, keys))
  tol32 = max(1e-3, 3 * torch_err32) if variant == "torchvision" else 1e-3
  (out32, updates32), grads32 = _jax_outputs_and_grads(
      jax_model(variant), variables32, jnp.asarray(nchw_to_nhwc(x32)), jnp.asarray(labels))
  got32 = flax_to_torch(grads32, variant, as_numpy=True)
  assert rel_err(_flat(got32, keys), _flat(ref, keys)) <= tol32
  _check_train_outputs(variant, t32, torch_out32, out32, updates32, variables32)


@pytest.mark.parametrize("variant,size", [("torchvision", 224), ("classic", 224), ("d2l", 96)])
def test_dropout_rates_and_places_match_pytorch(variant, size):
  """Each dropout of a train-mode pass (rate, and the width of what it drops: before which
  layer), with the layout's own rates, against the PyTorch model's defaults."""
  if variant == "torchvision":
    tmodel = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                          num_classes=NUM_CLASSES)
  elif variant == "classic":
    tmodel = torch_reference.ClassicGoogLeNet(NUM_CLASSES)
  else:
    tmodel = torch_reference.d2l_googlenet(NUM_CLASSES)
  x = random_images(variant, size)
  expected = torch_dropout_calls(tmodel, torch.from_numpy(x))
  got = dropout_calls(GoogLeNet(variant=variant, num_classes=NUM_CLASSES),
                      nchw_to_nhwc(x).shape)
  assert got == expected, (got, expected)
  assert variant == "d2l" or len(got) >= 3  # the main head and both aux heads


@pytest.mark.parametrize("variant", ["classic", "torchvision", "d2l"])
def test_round_trip_is_exact_and_loads_strictly(variant):
  tmodel = make_torch(variant)
  sd = tmodel.state_dict()
  back = flax_to_torch(torch_to_flax(sd, variant), variant)
  assert set(back) == set(sd)  # key order follows Table 1, PyTorch's its module order
  for key in sd:
    assert torch.equal(back[key], sd[key]) or key.endswith("num_batches_tracked"), key
  make_torch(variant, seed=5).load_state_dict(back, strict=True)


def test_converted_torchvision_default_model_has_expected_parameter_count():
  sd = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True).state_dict()
  variables = torch_to_flax(sd, "torchvision")
  n = sum(int(x.size) for x in jax.tree_util.tree_leaves(variables["params"]))
  assert n == 13_004_888
