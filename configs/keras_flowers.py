"""The Keras recipe (that of the reference TF2/Keras model of the keras layout): the keras
layout on a folder of flowers, inputs scaled to [-1, 1], Adam 3e-4, batch 32, 30 epochs, aux
loss weight 0.3."""

from configs import flowers_classic


def get_config():
  config = flowers_classic.get_config()
  config.variant = "keras"
  config.augment = "none"
  config.random_flip = False
  return config
