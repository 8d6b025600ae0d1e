"""PyTorch state_dict files <-> model directories (config.json + an Orbax checkpoint).

    python -m googlenet_jax.tools.convert --torch FILE.pth [--variant V] --out DIR
    python -m googlenet_jax.tools.convert --checkpoint DIR --to-torch FILE.pth

The tensor mapping itself is `googlenet_jax.convert` (no PyTorch needed there).
"""

from __future__ import annotations

import os
import re
import sys
from typing import Optional

from googlenet_jax import model_dir
from googlenet_jax import variants as V
from googlenet_jax.convert import (check_torch_layout, detect_variant, flax_to_torch,
                                   torch_to_flax)
from googlenet_jax.tools import cli

# How a converted model is fed, per variant (overridable by flags): input size, channels,
# normalisation and the eval crop (torchvision's ImageNet weights: resize 256, centre 224,
# ImageNet mean/std, transform_input on).
_FEEDING = {
    "classic": dict(image_size=224, channels=3, normalize="imagenet", eval_crop_fraction=0.875,
                    transform_input=False),
    "torchvision": dict(image_size=224, channels=3, normalize="imagenet",
                        eval_crop_fraction=0.875, transform_input=True),
    "d2l": dict(image_size=96, channels=1, normalize="unit", eval_crop_fraction=1.0,
                transform_input=False),
}


def _load_torch_file(path: str) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a PyTorch state_dict file ({e.__class__.__name__}: "
                     f"{str(e).splitlines()[0][:200]})") from None
  for key in ("state_dict", "model", "model_state_dict"):  # training-script checkpoints
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
    raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
  if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def torch_file_to_model_dir(path: str, variant: Optional[str], out: str, *,
                            num_classes: Optional[int] = None,
                            class_names: Optional[list[str]] = None, **feeding) -> str:
  """Convert a PyTorch state_dict file into a model directory (config.json + an Orbax
  checkpoint) that predict, evaluate and `init_from` read; `variant` None: the layout the
  state_dict fits (`convert.detect_variant`). Returns the checkpoint path."""
  state_dict = _load_torch_file(path)
  variant = variant or detect_variant(state_dict)
  variables = torch_to_flax(state_dict, variant, num_classes=num_classes)
  n = int(variables["params"]["classifier"]["kernel"].shape[-1])
  if class_names is not None and len(class_names) != n:
    raise ValueError(f"{len(class_names)} class names for a {n}-class model")
  if class_names is None and n == 1000:
    class_names = model_dir.imagenet_class_names()
  record = dict(_FEEDING.get(variant, _FEEDING["classic"]))
  record.update({k: v for k, v in feeding.items() if v is not None})
  record.update(variant=variant, aux_logits=V.AUX_TAPS[0] in variables["params"],
                converted_from=os.path.abspath(path))
  if os.path.isdir(os.path.join(out, model_dir.CHECKPOINTS)):
    raise ValueError(f"{out} already holds checkpoints; choose a new --out directory")
  step_dir = model_dir.save_variables(out, variables)
  model_dir.write_config(out, record, num_classes=n, class_names=class_names)
  return step_dir


def model_dir_to_torch_file(checkpoint: str, out: str, variant: Optional[str] = None,
                            use_ema: bool = False) -> str:
  """A model directory or checkpoint step directory -> a PyTorch state_dict file."""
  import torch  # pylint: disable=import-outside-toplevel
  step_dir, directory = model_dir.locate(checkpoint=checkpoint)
  record = model_dir.read_config(directory) or {}
  variant = variant or record.get("variant")
  if variant is None:
    raise ValueError(f"{directory} has no config.json: pass --variant")
  if record.get("variant", variant) != variant:
    raise ValueError(f"{directory} holds a {record['variant']!r} model, not {variant!r}")
  if V.get_layout(variant).torch_names is None:
    check_torch_layout(variant)
  variables = model_dir.restore_variables(step_dir, use_ema=use_ema)
  state_dict = flax_to_torch(variables, variant)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  torch.save(state_dict, out)
  return step_dir


def define_flags(values, argv) -> None:
  """The command's flags, in the absl FlagValues `values` (`cli.parse_flags`)."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  define = dict(flag_values=values)
  flags.DEFINE_string("torch", None, "PyTorch state_dict to convert (FILE.pth).", **define)
  flags.DEFINE_enum("variant", None, sorted(k for k, l in V.LAYOUTS.items()
                                            if l.torch_names is not None),
                    "Layout of the state_dict (default with --torch: the one it fits).", **define)
  flags.DEFINE_string("out", None, "New model directory (with --torch).", **define)
  flags.DEFINE_integer("num_classes", None, "Default: the state_dict's.", **define)
  flags.DEFINE_string("class_names", None, "Class names, one a line (default: ImageNet's for "
                      "1000 classes).", **define)
  flags.DEFINE_integer("image_size", None, "Input size predict/evaluate use.", **define)
  flags.DEFINE_enum("normalize", None, ["imagenet", "half", "unit"],
                    "Input normalisation the weights expect.", **define)
  flags.DEFINE_float("eval_crop_fraction", None, "Centre crop fraction (0.875: resize 256, crop "
                     "224; 1: no crop).", **define)
  flags.DEFINE_enum("transform_input", None, ["true", "false"], "torchvision's input "
                    "re-normalisation (default: on for torchvision, as its ImageNet weights "
                    "expect).", **define)
  flags.DEFINE_string("checkpoint", None, "Model directory or checkpoint step to export (with "
                      "--to-torch).", **define)
  flags.DEFINE_string("to-torch", None, "Write the checkpoint's weights as a PyTorch state_dict "
                      "(FILE.pth).", **define)
  flags.DEFINE_bool("use_ema", False, "Export the EMA weights.", **define)


def main(argv: Optional[list[str]] = None) -> None:
  """The command on `argv` (default: sys.argv's arguments); usage errors exit with status 2."""
  args, _ = cli.parse_flags(define_flags, argv, __doc__)
  to_torch = args["to-torch"].value
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    cli.fail("converting PyTorch files needs PyTorch: install googlenet_jax[convert] "
             "(pip install 'googlenet_jax[convert]')")
  try:
    if args.torch:
      if args.checkpoint or to_torch:
        cli.fail("--torch goes with --variant and --out; --checkpoint with --to-torch")
      if not args.out:
        cli.fail("--torch needs --out (and --variant, unless the file's layout is to be "
                 "detected)")
      names = None
      if args.class_names:
        with open(args.class_names) as f:
          names = [line.strip() for line in f if line.strip()]
      step_dir = torch_file_to_model_dir(
          args.torch, args.variant, args.out, num_classes=args.num_classes, class_names=names,
          image_size=args.image_size, normalize=args.normalize,
          eval_crop_fraction=args.eval_crop_fraction,
          transform_input=None if args.transform_input is None else args.transform_input == "true")
      print(f"wrote {step_dir} and {os.path.join(args.out, 'config.json')}")
    elif args.checkpoint and to_torch:
      step_dir = model_dir_to_torch_file(args.checkpoint, to_torch, args.variant, args.use_ema)
      print(f"wrote {to_torch} from {step_dir}")
    else:
      cli.fail("give --torch FILE --variant V --out DIR, or --checkpoint DIR --to-torch FILE")
  except (ValueError, OSError) as e:
    # The library's fixes name keyword arguments; here the flag is what the user passes.
    msg = re.sub(r"\bpass variant='(\w+)'", r"pass --variant \1", str(e))
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
