"""Small helpers shared by the tests."""

import numpy as np


def rel_err(got, ref) -> float:
  """Relative L2 error ||got - ref|| / ||ref||, in float64."""
  got = np.asarray(got, np.float64)
  ref = np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def nchw_to_nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))
