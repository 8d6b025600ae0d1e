"""A Keras 3 model of the keras layout, after the reference TF2/Keras model of that layout, for
parity tests.

Layer names are the reference model's (conv2d_1.., inception_3a.., aux_1, aux_2, output_dense);
the model outputs softmax probabilities, as the reference model does: [aux_1, aux_2, main] with
aux heads.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
from keras import layers  # noqa: E402


class Inception(layers.Layer):
  def __init__(self, c1, c3r, c3, c5r, c5, pool_proj, **kwargs):
    super().__init__(**kwargs)
    self.branch1 = layers.Conv2D(c1, 1, activation="relu")
    self.branch2 = keras.Sequential([layers.Conv2D(c3r, 1, activation="relu"),
                                     layers.Conv2D(c3, 3, padding="same", activation="relu")])
    self.branch3 = keras.Sequential([layers.Conv2D(c5r, 1, activation="relu"),
                                     layers.Conv2D(c5, 5, padding="same", activation="relu")])
    self.branch4 = keras.Sequential([layers.MaxPool2D(3, strides=1, padding="same"),
                                     layers.Conv2D(pool_proj, 1, activation="relu")])

  def call(self, x):
    return layers.concatenate([self.branch1(x), self.branch2(x), self.branch3(x),
                               self.branch4(x)])


class InceptionAux(layers.Layer):
  def __init__(self, num_classes, dropout=0.5, **kwargs):
    super().__init__(**kwargs)
    self.pool = layers.AvgPool2D(5, strides=3)
    self.conv = layers.Conv2D(128, 1, activation="relu")
    self.flatten = layers.Flatten()
    self.drop1 = layers.Dropout(dropout)
    self.fc1 = layers.Dense(1024, activation="relu")
    self.drop2 = layers.Dropout(dropout)
    self.fc2 = layers.Dense(num_classes)
    self.softmax = layers.Softmax()

  def call(self, x, training=None):
    x = self.flatten(self.conv(self.pool(x)))
    x = self.fc1(self.drop1(x, training=training))
    return self.softmax(self.fc2(self.drop2(x, training=training)))


def keras_googlenet(size=224, num_classes=1000, aux_logits=True):
  inputs = layers.Input((size, size, 3))
  x = layers.Conv2D(64, 7, strides=2, padding="same", activation="relu", name="conv2d_1")(inputs)
  x = layers.MaxPool2D(3, strides=2, padding="same", name="maxpool_1")(x)
  x = layers.Conv2D(64, 1, activation="relu", name="conv2d_2")(x)
  x = layers.Conv2D(192, 3, padding="same", activation="relu", name="conv2d_3")(x)
  x = layers.MaxPool2D(3, strides=2, padding="same", name="maxpool_2")(x)
  x = Inception(64, 96, 128, 16, 32, 32, name="inception_3a")(x)
  x = Inception(128, 128, 192, 32, 96, 64, name="inception_3b")(x)
  x = layers.MaxPool2D(3, strides=2, padding="same", name="maxpool_3")(x)
  x = Inception(192, 96, 208, 16, 48, 64, name="inception_4a")(x)
  if aux_logits:
    aux1 = InceptionAux(num_classes, name="aux_1")(x)
  x = Inception(160, 112, 224, 24, 64, 64, name="inception_4b")(x)
  x = Inception(128, 128, 256, 24, 64, 64, name="inception_4c")(x)
  x = Inception(112, 144, 288, 32, 64, 64, name="inception_4d")(x)
  if aux_logits:
    aux2 = InceptionAux(num_classes, name="aux_2")(x)
  x = Inception(256, 160, 320, 32, 128, 128, name="inception_4e")(x)
  x = layers.MaxPool2D(3, strides=2, padding="same", name="maxpool_4")(x)
  x = Inception(256, 160, 320, 32, 128, 128, name="inception_5a")(x)
  x = Inception(384, 192, 384, 48, 128, 128, name="inception_5b")(x)
  x = layers.AvgPool2D(7, strides=1, name="avgpool_1")(x)
  x = layers.Flatten(name="output_flatten")(x)
  x = layers.Dropout(0.4, name="output_dropout")(x)
  x = layers.Dense(num_classes, name="output_dense")(x)
  main = layers.Softmax(name="aux_3")(x)
  return keras.Model(inputs, [aux1, aux2, main] if aux_logits else main)
