"""Feature maps (`GoogLeNet.features`): every Table 1 stage and the pooled embedding in one
pass, against torchvision's own `create_feature_extractor` on the same (converted, random)
weights; stopping early; and use as a backbone under jit, grad and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from googlenet_jax import GoogLeNet, feature_names
from googlenet_jax.convert import torch_to_flax
from helpers import init_variables, nchw_to_nhwc, rel_err
import torch_reference

torch.set_num_threads(2)
TOL = 1e-5
NUM_CLASSES = 10


def _torchvision(transform_input):
  torch.manual_seed(0)
  model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                       transform_input=transform_input, num_classes=NUM_CLASSES)
  torch_reference.randomize_batchnorm(model, torch.Generator().manual_seed(0))
  return model.eval()


def _torch_node(name):
  """torchvision's module name for one of ours (inception_3a -> inception3a)."""
  return {"embedding": "flatten"}.get(name, name.replace("inception_", "inception"))


@pytest.fixture(scope="module")
def converted():
  model = _torchvision(transform_input=True)
  variables = torch_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, "torchvision")
  return model, variables


@pytest.mark.parametrize("size", [64, 97])
def test_every_stage_matches_torchvision_feature_extractor(converted, size):
  torch_model, variables = converted
  names = feature_names("torchvision")
  extractor = create_feature_extractor(torch_model, {_torch_node(n): n for n in names})
  x = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
  with torch.no_grad():
    ref = {k: v.numpy() for k, v in extractor(torch.from_numpy(x)).items()}
  model = GoogLeNet(variant="torchvision", num_classes=NUM_CLASSES, transform_input=True)
  got = jax.jit(lambda v, x: model.apply(v, x, method="features"))(variables, nchw_to_nhwc(x))
  assert list(got) == list(names)  # network order, through jax.jit
  errors = {}
  for name in names:
    want = ref[name] if ref[name].ndim == 2 else nchw_to_nhwc(ref[name])
    assert got[name].shape == want.shape, (name, got[name].shape, want.shape)
    errors[name] = rel_err(got[name], want)
  print(f"{size}x{size}: worst stage {max(errors, key=errors.get)} "
        f"{max(errors.values()):.1e} relative")
  assert max(errors.values()) < TOL, errors
  # The embedding is what the classifier reads: the logits follow from it.
  logits = model.apply(variables, nchw_to_nhwc(x))
  dense = variables["params"]["classifier"]
  np.testing.assert_allclose(got["embedding"] @ dense["kernel"] + dense["bias"], logits,
                             rtol=1e-5, atol=1e-5)


def test_upto_stops_there():
  """Nothing after `upto` is computed: the traced program holds the convolutions up to it
  and no more; its maps equal the full pass's."""
  model = GoogLeNet(variant="torchvision", num_classes=NUM_CLASSES)
  x = jnp.asarray(np.random.RandomState(0).randn(1, 32, 32, 3), jnp.float32)
  variables = init_variables(model, x.shape)

  def convs(upto):
    jaxpr = jax.make_jaxpr(lambda v: model.apply(v, x, method="features", upto=upto))(variables)
    return sum(e.primitive.name == "conv_general_dilated" for e in jaxpr.jaxpr.eqns)

  assert convs("conv1") == 1
  assert convs("conv3") == 3
  assert convs("inception_3a") == 3 + 6  # six convolutions per Inception block
  assert convs("embedding") == 3 + 6 * 9
  early = model.apply(variables, x, method="features", upto="inception_3b")
  assert list(early) == list(feature_names("torchvision")[:7])
  full = model.apply(variables, x, method="features")
  for name, value in early.items():
    np.testing.assert_array_equal(value, full[name])
  # Early stages take inputs the whole network cannot: only what runs is checked.
  tiny = jnp.zeros((1, 8, 8, 3))
  assert model.apply(variables, tiny, method="features", upto="conv3")["conv3"].shape == (
      1, 2, 2, 192)
  with pytest.raises(ValueError, match="too small for the stages up to inception_4a"):
    model.apply(variables, tiny, method="features", upto="inception_4a")
  with pytest.raises(ValueError, match="stages are conv1, maxpool1, conv2"):
    model.apply(variables, x, method="features", upto="inception3a")


@pytest.mark.slow  # (the fast tier's time: make test runs in <= 8 minutes)
def test_backbone_under_jit_grad_and_vmap():
  """A head on the inception_4e features, trained through the backbone: gradients reach the
  stages that ran (and no others), per-example under vmap as in a batch."""
  model = GoogLeNet(variant="torchvision", num_classes=NUM_CLASSES, dropout=0.0)
  x = jnp.asarray(np.random.RandomState(1).randn(4, 32, 32, 3), jnp.float32)
  variables = init_variables(model, x.shape)
  head = jnp.asarray(np.random.RandomState(2).randn(832), jnp.float32)

  def loss(params, x):
    feats, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                           train=True, method="features", upto="inception_4e",
                           mutable=["batch_stats"])
    return jnp.mean(feats["inception_4e"].mean(axis=(1, 2)) @ head)

  grads = jax.jit(jax.grad(loss))(variables["params"], x)
  norms = {k: float(sum(jnp.linalg.norm(g) for g in jax.tree.leaves(v)))
           for k, v in grads.items()}
  assert all(norms[k] > 0 for k in ("conv1", "inception_3a", "inception_4e")), norms
  assert all(norms[k] == 0 for k in ("inception_5a", "inception_5b", "classifier",
                                     "aux_after_4a")), norms
  # Eval-mode features per example (vmap over single-image batches) equal the batched pass.
  feats = jax.jit(lambda v, x: model.apply(v, x, method="features", upto="inception_4e"))
  batched = feats(variables, x)["inception_4e"]
  per_example = jax.jit(jax.vmap(lambda xi: feats(variables, xi[None])["inception_4e"][0]))(x)
  assert rel_err(per_example, batched) < TOL
