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


def collect_tensors(abstract, tensors, name_of, *, shown=lambda name: name,
                    missing_note=lambda name: '', shape_note=lambda want, array: ''):
  """Every leaf of our parameter tree ``abstract`` from the checkpoint's ``tensors``.

  ``name_of(path)`` is the checkpoint's name of our leaf ``path``. Each tensor must exist,
  have the torch shape of our leaf, be floating-point (float16 / bfloat16 / float64 become
  float32, exact for the half types) and be finite. Returns (flat params {path: array}, the
  names used, missing, wrong), the last two as messages naming each tensor; ``shown(name)`` is
  how a message spells a name, ``missing_note`` / ``shape_note`` add a hint.
  """
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  flat, used, missing, wrong = {}, set(), [], []
  for path, leaf in sorted(traverse_util.flatten_dict(abstract).items()):
    name, ours = name_of(path), '/'.join(path)
    want = torch_shape(tuple(leaf.shape), path[-1])
    if name not in tensors:
      missing.append(f'{name}{missing_note(name)} (shape {want}, for {ours})')
      continue
    used.add(name)
    array = np.asarray(tensors[name])
    if tuple(array.shape) != want:
      wrong.append(f'{shown(name)}: shape {tuple(array.shape)}, expected {want}'
                   f'{shape_note(want, array)} (for {ours})')
    elif not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
      wrong.append(f'{shown(name)}: dtype {array.dtype}, expected a floating-point tensor '
                   f'(for {ours})')
    elif not np.isfinite(converted := to_flax(array, path[-1])).all():
      n_nan = int(np.isnan(converted).sum())
      n_inf = int((~np.isfinite(converted)).sum()) - n_nan
      wrong.append(f'{shown(name)}: {n_nan} NaN and {n_inf} Inf value(s) of {converted.size} '
                   f'(dtype {array.dtype}), expected finite values (for {ours})')
    else:
      flat[path] = converted
  return flat, used, missing, wrong
