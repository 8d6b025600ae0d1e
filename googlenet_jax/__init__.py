"""GoogLeNet (Inception v1) in JAX/Flax linen."""

from googlenet_jax.models import GoogLeNet, GoogLeNetOutputs, count_params, probabilities
from googlenet_jax.variants import LAYOUTS, TABLE_1, Layout, get_layout

VARIANTS = tuple(LAYOUTS)

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "LAYOUTS", "Layout", "TABLE_1", "VARIANTS",
           "count_params", "get_layout", "probabilities"]
__version__ = "0.1.0"
