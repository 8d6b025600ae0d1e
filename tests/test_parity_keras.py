"""Parity with a real Keras 3 model of the seed's TF2 layout (tests/keras_reference.py)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_reference
from googlenet_jax import GoogLeNet, GoogLeNetOutputs, probabilities
from googlenet_jax.convert import keras_to_flax
from helpers import rel_err

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def keras_model():
  keras.utils.set_random_seed(0)
  model = keras_reference.keras_googlenet(224, NUM_CLASSES)
  rng = np.random.RandomState(0)  # Keras zero-initialises biases: make them random too
  for layer_weights in model.weights:
    if len(layer_weights.shape) == 1:
      layer_weights.assign(rng.uniform(-0.1, 0.1, layer_weights.shape).astype(np.float32))
  return model


def _keras_outputs(model, x):
  """(main logits, aux_1 probabilities, aux_2 probabilities) of a Keras model."""
  logits_model = keras.Model(model.inputs, model.get_layer("output_dense").output)
  aux1, aux2, _ = model(x, training=False)
  return np.asarray(logits_model(x, training=False)), np.asarray(aux1), np.asarray(aux2)


@pytest.mark.parametrize("size", [224, 210, 217])
def test_keras_outputs_match(keras_model, size):
  model_at_size = keras_reference.keras_googlenet(size, NUM_CLASSES)
  model_at_size.set_weights(keras_model.get_weights())
  x = np.random.RandomState(size).randn(2, size, size, 3).astype(np.float32)
  ref_logits, ref_aux1, ref_aux2 = _keras_outputs(model_at_size, x)
  variables = keras_to_flax(keras_model)
  model = GoogLeNet(variant="keras", num_classes=NUM_CLASSES)
  logits = jax.jit(model.apply)(variables, jnp.asarray(x))
  assert rel_err(logits, ref_logits) <= 1e-5
  out = jax.jit(lambda v, x: model.apply(v, x, train=True, deterministic=True))(
      variables, jnp.asarray(x))
  assert isinstance(out, GoogLeNetOutputs)
  assert rel_err(out.logits, ref_logits) <= 1e-5
  assert rel_err(probabilities(out.aux1), ref_aux1) <= 1e-5
  assert rel_err(probabilities(out.aux2), ref_aux2) <= 1e-5


def test_keras_weights_file_converts_like_the_model(keras_model, tmp_path):
  path = tmp_path / "googlenet.weights.h5"
  keras_model.save_weights(str(path))
  from_model = keras_to_flax(keras_model)
  from_file = keras_to_flax(path)
  jax.tree.map(np.testing.assert_array_equal, from_file, from_model)


def test_keras_layout_rejects_sizes_its_pooling_cannot_take():
  model = GoogLeNet(variant="keras", num_classes=NUM_CLASSES)
  with pytest.raises(ValueError, match="7x7"):
    model.init(jax.random.key(0), jnp.zeros((1, 160, 160, 3)))
