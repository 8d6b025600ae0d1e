"""Parity with a real Keras 3 model of the seed's TF2 layout (tests/keras_reference.py)."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest

import keras_reference
from googlenet_jax import GoogLeNet, GoogLeNetOutputs, probabilities
from googlenet_jax.convert import keras_to_flax
from helpers import dropout_calls, rel_err

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


def test_dropout_rates_and_places_match_keras(keras_model):
  """Each dropout of a train-mode pass (rate, width of what it drops) against the Keras
  model's Dropout layers, called in training mode."""
  calls, real = [], keras.layers.Dropout.call

  def record(self, inputs, training=False):
    if training and self.rate > 0:
      calls.append((round(float(self.rate), 6), int(inputs.shape[-1])))
    return real(self, inputs, training=training)

  keras.layers.Dropout.call = record
  try:
    keras_model(np.zeros((2, 224, 224, 3), np.float32), training=True)
  finally:
    keras.layers.Dropout.call = real
  got = dropout_calls(GoogLeNet(variant="keras", num_classes=NUM_CLASSES), (2, 224, 224, 3))
  assert got == sorted(calls) and len(got) == 5, (got, sorted(calls))


def test_keras_conversion_errors_lead_with_the_fix(keras_model):
  with pytest.raises(ValueError) as err:
    keras_to_flax(keras_model, num_classes=1000)
  msg = str(err.value)
  assert msg.startswith(f"these Keras weights have a {NUM_CLASSES}-class classifier, not 1000:")
  assert "merge_pretrained" in msg.splitlines()[0] and len(msg) <= 600, msg

  class WithoutAux:  # the same Keras layers, aux heads left out
    layers = [layer for layer in keras_model.layers if not layer.name.startswith("aux_")]

  with pytest.raises(ValueError) as err:
    keras_to_flax(WithoutAux(), aux_logits=True)
  msg = str(err.value)
  assert msg.startswith("these Keras weights have no auxiliary heads: pass aux_logits=False")
  assert len(msg) <= 600, msg
  assert "aux1" not in keras_to_flax(WithoutAux())["params"]
