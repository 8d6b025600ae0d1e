"""Random access to a TFDS split's TFRecord files without TensorFlow: an index of record
offsets (from the records' length headers), and a reader of each record's `tf.train.Example`
that takes out its encoded image bytes and integer label (protobuf wire format, parsed here).

TFRecord framing: uint64 length, uint32 masked CRC of the length, the data, uint32 masked CRC
of the data (the CRCs are not checked: a truncated file is caught by the length).
Example: Features (field 1) -> map entries (field 1) of key (1) and Feature (2); a Feature holds
a BytesList (1), FloatList (2) or Int64List (3), each a repeated field 1.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from googlenet_jax.train.sources import DatasetError


def index(path: str) -> np.ndarray:
  """(offset, length) of the data of each record in the TFRecord file `path`, int64 (n, 2)."""
  rows, size = [], os.path.getsize(path)
  with open(path, "rb") as f:
    offset = 0
    while offset < size:
      header = f.read(12)
      if len(header) < 12:
        raise DatasetError(f"{path}: truncated TFRecord header at byte {offset}")
      (length,) = struct.unpack("<Q", header[:8])
      if offset + 12 + length + 4 > size:
        raise DatasetError(f"{path}: truncated TFRecord at byte {offset}")
      rows.append((offset + 12, length))
      offset += 12 + length + 4
      f.seek(offset)
  return np.asarray(rows, np.int64).reshape(-1, 2)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, pos
    shift += 7


def _fields(buf: bytes):
  """(field number, wire type, value) of a protobuf message: value is bytes for
  length-delimited fields, an int for varints."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 2:
      n, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + n], pos + n
    elif wire == 1:
      value, pos = buf[pos:pos + 8], pos + 8
    elif wire == 5:
      value, pos = buf[pos:pos + 4], pos + 4
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    yield number, wire, value


def parse_example(record: bytes) -> dict:
  """A serialized tf.train.Example -> {key: list of bytes | list of ints | list of floats}."""
  out = {}
  for number, _, features in _fields(record):
    if number != 1:
      continue
    for fnum, _, entry in _fields(features):
      if fnum != 1:
        continue
      key, feature = None, b""
      for enum, _, value in _fields(entry):
        if enum == 1:
          key = value.decode()
        elif enum == 2:
          feature = value
      values: list = []
      for kind, _, lst in _fields(feature):
        for vnum, wire, v in _fields(lst):
          if vnum != 1:
            continue
          if kind == 1:
            values.append(bytes(v))
          elif kind == 3 and wire == 2:  # packed int64s
            pos = 0
            while pos < len(v):
              x, pos = _varint(v, pos)
              values.append(x - (1 << 64) if x >= 1 << 63 else x)
          elif kind == 3:
            values.append(v - (1 << 64) if v >= 1 << 63 else v)
          elif kind == 2 and wire == 2:
            values += list(np.frombuffer(v, "<f4"))
          elif kind == 2:
            values.append(struct.unpack("<f", v)[0])
      out[key] = values
  return out


class TfdsRecords:
  """A TFDS split's records in file order: `image(i)` -> (encoded bytes, label)."""

  def __init__(self, builder, split: str, image_key: str = "image", label_key: str = "label"):
    if split not in builder.info.splits:
      raise DatasetError(f"{builder.name}: no split {split!r} in {list(builder.info.splits)}")
    info = builder.info.splits[split]
    if str(getattr(builder.info, "file_format", "tfrecord")).lower().split(".")[-1] != "tfrecord":
      raise DatasetError(f"{builder.name}: data_loader='dali' reads TFRecord files, not "
                         f"{builder.info.file_format}; use data_loader='tfdata'")
    self.paths = [os.fspath(p) for p in info.filepaths]
    self.keys = image_key, label_key
    parts = [index(p) for p in self.paths]
    self._file = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    self._rows = np.concatenate(parts)
    self._handles: dict = {}

  def __len__(self) -> int:
    return len(self._rows)

  def name(self, i: int) -> str:
    return f"{self.paths[self._file[i]]} record {i}"

  def image(self, i: int) -> tuple[bytes, int]:
    path = self.paths[self._file[i]]
    offset, length = self._rows[i]
    if path not in self._handles:
      self._handles[path] = open(path, "rb")  # pylint: disable=consider-using-with
    f = self._handles[path]
    f.seek(int(offset))
    example = parse_example(f.read(int(length)))
    image_key, label_key = self.keys
    if not example.get(image_key) or not example.get(label_key):
      raise DatasetError(f"{self.name(i)}: no {image_key!r} bytes or {label_key!r} label")
    return example[image_key][0], int(example[label_key][0])
