"""scikit-learn's bundled handwritten digits as a TFDS dataset (works offline).

1,797 real 8x8 grey images of the digits 0-9 (UCI optdigits test set), pixel values 0-16 scaled
to 0-255. A fixed, seeded 80/20 split into `train` and `test`.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

_TEST_FRACTION = 0.2
_SPLIT_SEED = 0


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (images uint8 [N, 8, 8, 1], labels int64 [N])}, the same split as the builder."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  order = np.random.RandomState(_SPLIT_SEED).permutation(len(labels))
  n_test = int(round(len(labels) * _TEST_FRACTION))
  test, train = order[:n_test], order[n_test:]
  return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (8x8, 10 classes), registered as `sklearn_digits`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "80/20 split of sklearn.datasets.load_digits, seed 0."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the data ships with scikit-learn
    arrays = load_arrays()
    return {split: self._generate_examples(*arrays[split]) for split in arrays}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
