"""torch <-> Flax tensor layouts, shared by every importer.

Conv kernels: torch OIHW, Flax HWIO. Linear kernels: torch (out, in), Flax (in, out). Biases,
norm scales and embedding tables have the same layout in both.
"""

from __future__ import annotations

import numpy as np


def torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """The torch shape of our parameter ``leaf`` ('kernel', 'bias', ...) of ``flax_shape``."""
  if leaf == 'kernel' and len(flax_shape) == 4:  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if leaf == 'kernel' and len(flax_shape) == 2:  # (in, out) -> (out, in)
    return flax_shape[::-1]
  return tuple(flax_shape)


def to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  """A torch tensor (numpy) in our layout, float32 and contiguous."""
  if leaf == 'kernel' and array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
  elif leaf == 'kernel' and array.ndim == 2:
    array = array.T
  return np.ascontiguousarray(array, dtype=np.float32)

