"""An ImageNet-like JPEG set made offline, for timing input pipelines (benchmarks/pipeline.py).

  python benchmarks/jpeg_set.py --out runs/jpeg_set [--train 2000 --val 500]

writes OUT/train/<class>/*.jpg, OUT/val/<class>/*.jpg and OUT/manifest.json (the parameters
and the set's measured statistics). The same images as a TFDS dataset, `jpeg_benchmark_set`
(registered when this module is imported; its records hold the files' bytes unchanged), are
built by `prepare_tfds(OUT)` into OUT/tfds.

What makes the decoding cost ImageNet's: the pixel count, the compressed bytes per pixel
(entropy decoding dominates a JPEG decode) and the encoding. Each image is a random crop of
one of the photographs installed packages ship (scikit-learn's two sample images, and
scikit-image's colour photographs when it is installed), resized to a size drawn from an
ImageNet-like distribution (most images 500 px on the long side at 4:3 or 3:2, a tail from
~180 to ~700 px; mean about 415 x 365), flipped, colour-shifted, sharpened and given
sensor-like luminance noise (resizing the same few photographs smooths them; this restores the
fine texture of camera images, so that the files carry ~0.54 compressed bytes per pixel, near
ImageNet's ~0.6-0.8: 138 GB for 1.28 M training images), about 2% turned grey, and encoded as
baseline JPEG, quality 85-95, 4:2:0 chroma.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

NUM_CLASSES = 10
CLASS_NAMES = [f"class_{i:02d}" for i in range(NUM_CLASSES)]
# Bump when the images change: a manifest of another version is regenerated.
GENERATOR_VERSION = 1


def source_photos() -> list[np.ndarray]:
  """uint8 RGB photographs from installed packages (scikit-learn's always)."""
  from sklearn.datasets import load_sample_images  # pylint: disable=import-outside-toplevel
  photos = list(load_sample_images().images)
  try:
    from skimage import data  # pylint: disable=import-outside-toplevel
    for name in ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry"):
      try:
        image = getattr(data, name)()
      except Exception:  # pylint: disable=broad-except  (a missing data file)
        continue
      if image.ndim == 3 and image.shape[2] == 3 and min(image.shape[:2]) >= 256:
        photos.append(np.asarray(image, np.uint8))
  except ImportError:
    pass
  return photos


def sample_size(rng: np.random.RandomState) -> tuple[int, int]:
  """(width, height) of one image."""
  if rng.rand() < 0.5:  # the common Flickr sizes
    long, short = 500, int(rng.choice([333, 375]))
  else:  # the tail
    long = int(np.exp(rng.uniform(np.log(180), np.log(700))))
    short = int(long * rng.uniform(0.6, 1.0))
  return (long, short) if rng.rand() < 0.75 else (short, long)


def make_image(photos, rng: np.random.RandomState):
  """One PIL image and its JPEG quality."""
  from PIL import Image, ImageFilter  # pylint: disable=import-outside-toplevel
  photo = photos[rng.randint(len(photos))]
  h, w = photo.shape[:2]
  width, height = sample_size(rng)
  # A crop of 30-100% of the photo's area with the target aspect ratio.
  aspect = width / height
  area = rng.uniform(0.3, 1.0) * h * w
  cw = int(min(w, np.sqrt(area * aspect)))
  ch = int(min(h, cw / aspect))
  cw = int(min(cw, ch * aspect))
  x, y = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
  image = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height), Image.BICUBIC)
  image = image.filter(ImageFilter.UnsharpMask(radius=rng.uniform(1.0, 2.5), percent=200,
                                               threshold=0))
  pixels = np.asarray(image, np.float32)
  if rng.rand() < 0.5:
    pixels = pixels[:, ::-1]
  gain = rng.uniform(0.8, 1.2, 3) * rng.uniform(0.85, 1.15)
  gamma = rng.uniform(0.8, 1.25)
  pixels = 255 * (np.clip(pixels * gain, 0, 255) / 255) ** gamma
  sigma = rng.uniform(6.0, 11.0)  # luminance noise, and a third of it per channel
  pixels += rng.normal(0, sigma, pixels.shape[:2] + (1,))
  pixels += rng.normal(0, sigma / 3, pixels.shape)
  image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
  if rng.rand() < 0.02:
    image = image.convert("L")
  return image, int(rng.randint(85, 96))


def generate(out: str, train: int = 2000, val: int = 500, seed: int = 0,
             quiet: bool = False) -> dict:
  """Writes the set into `out` unless a manifest with the same parameters is there already;
  returns the manifest."""
  params = {"train": train, "val": val, "seed": seed, "version": GENERATOR_VERSION}
  manifest_path = os.path.join(out, "manifest.json")
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    if manifest.get("params") == params:
      return manifest
  for sub in ("train", "val", "tfds"):
    shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
  photos = source_photos()
  sizes, nbytes = [], []
  for split_id, (split, count) in enumerate((("train", train), ("val", val))):
    for name in CLASS_NAMES:
      os.makedirs(os.path.join(out, split, name), exist_ok=True)
    for i in range(count):
      rng = np.random.RandomState([seed, split_id, i])
      image, quality = make_image(photos, rng)
      path = os.path.join(out, split, CLASS_NAMES[i % NUM_CLASSES], f"{split}_{i:06d}.jpg")
      image.save(path, "JPEG", quality=quality, subsampling=2)
      sizes.append(image.size)
      nbytes.append(os.path.getsize(path))
    if not quiet:
      print(f"{split}: {count} images", file=sys.stderr)
  sizes, nbytes = np.asarray(sizes, np.float64), np.asarray(nbytes, np.float64)
  manifest = {
      "params": params,
      "source_photos": len(photos),
      "mean_width": float(sizes[:, 0].mean()), "mean_height": float(sizes[:, 1].mean()),
      "mean_megapixels": float((sizes[:, 0] * sizes[:, 1]).mean() / 1e6),
      "mean_kbytes": float(nbytes.mean() / 1e3),
      "bytes_per_pixel": float(nbytes.sum() / (sizes[:, 0] * sizes[:, 1]).sum()),
  }
  with open(manifest_path, "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


# --------------------------------------------------------------------------------------------
# The same images as a TFDS dataset.

import tensorflow_datasets as tfds  # noqa: E402  (after the generator, which does not need it)


class JpegBenchmarkSet(tfds.core.GeneratorBasedBuilder):
  """The folder written by `generate` as TFDS records (splits train and validation); the
  JPEG bytes are stored as they are in the files."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = ("Write the folder with `python benchmarks/jpeg_set.py --out "
                                  "DIR` and pass DIR as the manual dir.")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    return {"train": self._generate_examples(root / "train"),
            "validation": self._generate_examples(root / "val")}

  def _generate_examples(self, folder):
    for name in CLASS_NAMES:
      for path in sorted((folder / name).iterdir()):
        with path.open("rb") as f:
          data = f.read()
        yield f"{name}/{path.name}", {"image": data, "label": name}


def prepare_tfds(out: str) -> str:
  """Builds `jpeg_benchmark_set` from the folder `out` into OUT/tfds (once); returns that
  data_dir."""
  data_dir = os.path.join(out, "tfds")
  builder = JpegBenchmarkSet(data_dir=data_dir)
  if not builder.is_prepared():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=out))
  return data_dir


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="runs/jpeg_set")
  p.add_argument("--train", type=int, default=2000)
  p.add_argument("--val", type=int, default=500)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tfds", action="store_true", help="also build the TFDS records")
  args = p.parse_args(argv)
  manifest = generate(args.out, args.train, args.val, args.seed)
  if args.tfds:
    prepare_tfds(args.out)
  print(json.dumps(manifest, indent=1))


if __name__ == "__main__":
  main()
