"""What the PyTorch and Keras converters share: the variables a model expects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import traverse_util

from googlenet_jax import models
from googlenet_jax import variants as V


def expected_shapes(variant: str, num_classes: int, aux: bool) -> dict:
  """{(collection, *path): shape} of every variable of `GoogLeNet(variant=...)`."""
  layout = V.get_layout(variant)
  model = models.GoogLeNet(variant=variant, num_classes=num_classes, aux_logits=aux)
  size = layout.default_size
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, layout.in_channels), jnp.float32))
  return {(coll,) + path: tuple(leaf.shape)
          for coll, tree in shapes.items()
          for path, leaf in traverse_util.flatten_dict(tree).items()}
