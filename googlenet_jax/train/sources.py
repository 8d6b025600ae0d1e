"""Datasets: the bundled digits, folders of class subfolders and TFDS datasets, as `Source`s of
random-access splits (in-memory images or image files) or of a TFDS builder (streamed)."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Optional

import numpy as np
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class DatasetError(ValueError):
  """A dataset that cannot be found, read or prepared; the message says how to fix it."""


@dataclasses.dataclass
class Split:
  """A random-access split: in-memory images (uint8, NHWC) or image file paths, and labels."""
  labels: np.ndarray
  images: Optional[np.ndarray] = None
  paths: Optional[list[str]] = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Source:
  name: str
  class_names: list[str]
  splits: dict[str, Split] = dataclasses.field(default_factory=dict)  # random access
  builder: Any = None  # a TFDS builder (streamed)
  train_split: str = "train"
  eval_split: str = "test"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def num_examples(self, split: str) -> Optional[int]:
    """The split's size; None where TFDS has no metadata for it (mock data)."""
    if split in self.splits:
      return len(self.splits[split])
    if split not in self.builder.info.splits:
      return None
    return self.builder.info.splits[split].num_examples


def open_source(config) -> Source:
  """The dataset named by `config.dataset`: "sklearn_digits", "folder:/path" or a TFDS name."""
  name = config.dataset
  if name == "sklearn_digits":
    return _digits_source(config)
  if name.startswith("folder:"):
    return _folder_source(name[len("folder:"):], config)
  return _tfds_source(name, config)


def _digits_source(config) -> Source:
  from googlenet_jax.train import digits  # pylint: disable=import-outside-toplevel
  builder = digits.SklearnDigits(data_dir=config.data_dir or None)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except FileExistsError:  # another process (multi-host on one machine) prepared it first
      builder = digits.SklearnDigits(data_dir=config.data_dir or None)
  splits = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, batch_size=-1)  # 1,797 examples: read it all
    arrays = tfds.as_numpy(ds)
    splits[split] = Split(labels=arrays["label"].astype(np.int64), images=arrays["image"])
  return Source("sklearn_digits", builder.info.features["label"].names, splits,
                train_split="train", eval_split="test")


def _list_images(root: str) -> tuple[list[str], list[int], list[str]]:
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise DatasetError(f"{os.path.join(root, cls)}: class folder {cls!r} has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    paths += [os.path.join(root, cls, f) for f in files]
    labels += [label] * len(files)
  return paths, labels, classes


def _readable(paths: list[str]) -> list[bool]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  ok = []
  for path in paths:
    try:
      with Image.open(path) as im:
        im.verify()
      ok.append(True)
    except Exception:  # pylint: disable=broad-except
      ok.append(False)
  return ok


def _folder_split(paths, labels, what: str) -> Split:
  ok = _readable(paths)
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.getLogger("googlenet_jax").warning(
        "skipping %d unreadable image file(s) in %s: %s", len(bad), what,
        ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
  keep = [i for i, good in enumerate(ok) if good]
  if not keep:
    raise DatasetError(f"{what}: no readable images")
  return Split(labels=np.asarray(labels, np.int64)[keep], paths=[paths[i] for i in keep])


def _folder_source(root: str, config) -> Source:
  """`root/train/<class>/*` and `root/val/<class>/*`, or `root/<class>/*` split by
  `config.val_fraction` (a fixed, seeded split)."""
  if not os.path.isdir(root):
    raise DatasetError(f"dataset folder {root!r} does not exist")
  if os.path.isdir(os.path.join(root, "train")):
    paths, labels, classes = _list_images(os.path.join(root, "train"))
    splits = {"train": _folder_split(paths, labels, os.path.join(root, "train"))}
    for val in ("val", "validation", "test"):
      if os.path.isdir(os.path.join(root, val)):
        vpaths, vlabels, vclasses = _list_images(os.path.join(root, val))
        if vclasses != classes:
          raise DatasetError(f"{root}: classes of {val}/ {vclasses} differ from train/ {classes}")
        splits["val"] = _folder_split(vpaths, vlabels, os.path.join(root, val))
        break
    else:
      raise DatasetError(f"{root}: has train/ but no val/ (or validation/, test/) folder")
  else:
    paths, labels, classes = _list_images(root)
    fraction = config.val_fraction
    if not 0 < fraction < 1:
      raise DatasetError(f"val_fraction must be in (0, 1) for a folder without train/ and val/, "
                         f"got {fraction}")
    order = np.random.RandomState(0).permutation(len(paths))
    n_val = max(1, int(round(len(paths) * fraction)))
    pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])
    splits = {"val": _folder_split(*pick(sorted(order[:n_val])), f"{root} (val)"),
              "train": _folder_split(*pick(sorted(order[n_val:])), f"{root} (train)")}
  return Source(f"folder:{root}", classes, splits, train_split="train", eval_split="val")


def _tfds_source(name: str, config) -> Source:
  try:
    builder = tfds.builder(name, data_dir=config.data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"unknown dataset {name!r}: expected 'sklearn_digits', 'folder:/path' or "
                       f"a TFDS name ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=config.manual_dir or None))
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and could not be "
          f"downloaded or built ({e.__class__.__name__}: {str(e).splitlines()[0][:300]}).\n"
          f"Prepare it on a machine with the data: `tfds build {name} --data_dir DIR "
          f"[--manual_dir DIR_WITH_ARCHIVES]` (ImageNet needs its archives in the manual dir), "
          f"then pass --config.data_dir=DIR.") from None
  available = list(builder.info.splits)
  train = config.train_split or "train"
  evals = [config.eval_split] if config.eval_split else [
      s for s in ("validation", "test") if s in available]
  if not evals:
    if available:
      raise DatasetError(f"TFDS dataset {name!r} has no validation or test split: {available}; "
                         "set --config.eval_split")
    evals = ["test"]  # split metadata unknown (e.g. under tfds.testing.mock_data)
  names = builder.info.features["label"].names
  return Source(name, list(names), builder=builder, train_split=train, eval_split=evals[0])
