"""GoogLeNet (Inception v1) in JAX/Flax linen.

The network is this package's top level (`models`, `layers`, `variants`, `ops`, `convert`) and
needs only jax, flax and numpy. The other layers are subpackages: `cpu` (XLA:CPU kernels and
process set-up), `train` (the training system) and `tools` (the command-line programs).
"""

from googlenet_jax.models import (GoogLeNet, GoogLeNetOutputs, count_params, feature_names,
                                  init_variables, probabilities)
from googlenet_jax.ops import LAX, Ops
from googlenet_jax.variants import LAYOUTS, TABLE_1, Layout, get_layout

VARIANTS = tuple(LAYOUTS)

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "LAX", "LAYOUTS", "Layout", "Ops", "TABLE_1",
           "VARIANTS", "count_params", "feature_names", "get_layout", "init_variables",
           "probabilities"]
__version__ = "0.1.0"
