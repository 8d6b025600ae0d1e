"""Weight exchange with PyTorch (classic, torchvision, d2l state_dicts) and Keras (keras layout).

The name mapping is derived from the same Table 1 the network is built from, so the two cannot
drift apart. Tensor layouts: conv OIHW <-> HWIO, linear (out, in) <-> (in, out), and the aux
heads' fc1, whose 2048 inputs PyTorch flattens in (c, h, w) order and this NHWC model in (h, w, c).

`pytorch.py` holds the PyTorch half, `keras.py` the Keras half; neither imports PyTorch or
TensorFlow until a conversion needs it. Files and model directories (a state_dict file to a model
directory and back): `googlenet_jax.tools.convert`, `python -m googlenet_jax.tools.convert --help`.
"""

from googlenet_jax.convert.keras import keras_to_flax
from googlenet_jax.convert.pytorch import (check_torch_layout, detect_variant, flax_to_torch,
                                           torch_to_flax)

__all__ = ["check_torch_layout", "detect_variant", "flax_to_torch", "keras_to_flax",
           "torch_to_flax"]
