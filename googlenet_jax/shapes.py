"""Static shapes: each stage's spatial size, and the checks that an input and a set of variables
fit a layout, raised with the fix before anything is traced."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp
import numpy as np

from googlenet_jax import layers
from googlenet_jax import variants as V

EMBEDDING = "embedding"  # the last of the `features`: the pooled vector the classifier reads

# --------------------------------------------------------------------------------------------
# Shape arithmetic (also used by the summary tool).


def stage_pool(layout: V.Layout, name: str) -> tuple[int, int, layers.Padding, bool]:
  """(window, stride, padding, ceil_mode) of one of the stride-2 max pools."""
  window = layout.maxpool4_window if name == "maxpool4" else 3
  if layout.pool is V.Pool.CEIL:
    return window, 2, 0, True
  if layout.pool is V.Pool.FLOOR_PAD1:
    return window, 2, 1, False
  return window, 2, "SAME", False


def feature_map_sizes(layout: V.Layout, height: int, width: int) -> dict[str, tuple[int, int]]:
  """Spatial size after every row of Table 1 for an input of `height` x `width`."""
  sizes, hw = {}, (height, width)
  for row in V.TABLE_1:
    if isinstance(row, V.Conv):
      pad = "SAME" if layout.same_padding else row.kernel // 2
      hw = tuple(layers.out_size(n, row.kernel, row.stride, pad) for n in hw)
    elif isinstance(row, V.MaxPool):
      hw = tuple(layers.out_size(n, *stage_pool(layout, row.name)) for n in hw)
    sizes[row.name] = hw
  return sizes


def aux_input_ok(layout: V.Layout, hw: tuple[int, int]) -> bool:
  """Whether an aux head's pool turns an `hw` map into the 4x4 its fc1 expects."""
  if layout.aux_pool is V.AuxPool.ADAPTIVE4:
    return min(hw) >= 1
  return all(n >= 5 and layers.out_size(n, 5, 3, 0) == 4 for n in hw)


def _input_sizes_that(ok: Callable[[dict], bool], layout: V.Layout) -> str:
  good = [n for n in range(1, 513) if ok(feature_map_sizes(layout, n, n))]
  if not good:
    return "none up to 512"
  return f"{good[0]}-{good[-1]}" if good[-1] - good[0] + 1 == len(good) else f"from {good[0]}"


# --------------------------------------------------------------------------------------------
# Checks.


def check_input(layout: V.Layout, x: Any, upto: Optional[str] = None, aux: bool = False) -> None:
  """Raise a ValueError naming what was expected. `upto`: the last stage computed
  (`features`); None: the whole network. `aux`: the aux heads run (train mode)."""
  desc = f"GoogLeNet(variant={layout.name!r})"
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    got = type(x).__name__ if shape is None else f"shape {tuple(shape)}"
    raise ValueError(f"{desc} expects NHWC images of rank 4 (batch, height, width, "
                     f"{layout.in_channels}), got {got}")
  if shape[-1] != layout.in_channels:
    fix = ("; if it is NCHW, transpose it: x.transpose(0, 2, 3, 1)"
           if shape[1] == layout.in_channels else "")
    raise ValueError(f"{desc} expects {layout.in_channels} input channel(s) in the last (NHWC) "
                     f"axis, got shape {tuple(shape)}{fix}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{desc} expects floating-point images, got dtype {x.dtype}; convert "
                     "(and normalise) them first, e.g. x.astype(jnp.float32) / 255")
  sizes = feature_map_sizes(layout, shape[1], shape[2])
  if upto not in (None, EMBEDDING):  # only the stages up to `upto` run
    names = [row.name for row in V.TABLE_1]
    sizes = {k: v for k, v in sizes.items() if names.index(k) <= names.index(upto)}
  size_msg = f"{shape[1]}x{shape[2]}"
  if min(min(hw) for hw in sizes.values()) < 1:
    ok = lambda s: min(min(hw) for k, hw in s.items() if k in sizes) >= 1
    stages = "stride-32 network" if upto in (None, EMBEDDING) else f"stages up to {upto}"
    raise ValueError(f"{desc}: a {size_msg} input is too small for the {stages}; "
                     f"it needs at least {_input_sizes_that(ok, layout).split('-')[0]} pixels")
  if upto not in (None, EMBEDDING):
    return
  if layout.head_pool is V.HeadPool.AVG7 and sizes["inception_5b"] != (7, 7):
    ok = lambda s: s["inception_5b"] == (7, 7)
    raise ValueError(f"{desc} ends in a 7x7/1 average pool and needs a 7x7 map at "
                     f"inception_5b; a {size_msg} input gives {sizes['inception_5b']}. "
                     f"Square inputs that fit: {_input_sizes_that(ok, layout)}")
  if aux and upto is None:
    for tap, source in (("aux_after_4a", "inception_4a"), ("aux_after_4d", "inception_4d")):
      if not aux_input_ok(layout, sizes[source]):
        ok = lambda s: aux_input_ok(layout, s["inception_4a"])
        raise ValueError(
            f"{desc} in train mode feeds {tap} a {sizes[source]} map from a {size_msg} input; "
            "its 5x5/3 average pool needs 14-16 pixels to give the 4x4 that fc1 expects. "
            f"Square inputs that fit: {_input_sizes_that(ok, layout)}; or aux_logits=False")


def check_variables(layout: V.Layout, num_classes: int, variables: Mapping[str, Any],
                    aux: bool = False) -> None:
  """Raise a ValueError with the fix when `variables` do not fit the model: a classifier for
  another number of classes, or no aux heads where they run (`aux`). Shapes only."""
  desc = f"GoogLeNet(variant={layout.name!r}, num_classes={num_classes})"
  params = variables.get("params", {})
  if "classifier" not in params:
    return  # Flax names what is missing
  # np.shape: a static shape (jax2onnx traces jnp.shape).
  classes = np.shape(params["classifier"]["kernel"])[-1]
  if classes != num_classes:
    raise ValueError(
        f"{desc} was given variables for {classes} classes; build the model with "
        f"num_classes={classes}, or reuse the trunk for {num_classes} classes with "
        "googlenet_jax.model_dir.merge_pretrained(fresh_variables, pretrained)")
  if aux and not all(name in params for name in V.AUX_TAPS):
    raise ValueError(
        f"{desc} runs its auxiliary heads in train mode, but the variables have no auxiliary "
        "heads (aux_after_4a, aux_after_4d; e.g. a torchvision state_dict saved with "
        "aux_logits=False): build the model with aux_logits=False")
