"""Strict reading of a state dict against the tensors a network needs (shared by importers).

An importer says which source tensors it needs, with their torch shapes and the parameters they
feed (`Wanted`); `gather` checks each one -- present, a tensor, that shape, floating point,
finite -- and lists every problem by name, together with the tensors nobody asked for, in one
`errors.tensor_mismatch`. Half-precision and float64 tensors come back as float32 (exact for the
half types).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lees_jax.convert.errors import tensor_mismatch


@dataclasses.dataclass(frozen=True)
class Wanted:
  shape: tuple[int, ...]  # the torch shape
  used_for: str           # our parameters it feeds, for the messages


def _is_float(array: np.ndarray) -> bool:
  return np.issubdtype(array.dtype, np.floating) or array.dtype.name == 'bfloat16'


def _describe(value) -> str:
  return f'shape {tuple(value.shape)}' if isinstance(value, np.ndarray) else type(value).__name__


def check(name: str, array, shape: tuple[int, ...], used_for: str, *, shown: str | None = None,
          shape_note: str = ''):
  """(float32 array, None) for a good tensor, else (None, the problem naming it): present as a
  tensor, of torch ``shape``, floating point, finite."""
  shown = shown or name
  if not isinstance(array, np.ndarray):
    return None, f'{shown}: a {type(array).__name__}, not a tensor (for {used_for})'
  if tuple(array.shape) != shape:
    return None, f'{shown}: shape {tuple(array.shape)}, expected {shape}{shape_note} (for {used_for})'
  if not _is_float(array):
    return None, f'{shown}: dtype {array.dtype}, expected a floating-point tensor (for {used_for})'
  value = np.asarray(array, np.float32)
  finite = np.isfinite(value)
  if not finite.all():
    n_nan = int(np.isnan(value).sum())
    return None, (f'{shown}: {n_nan} NaN and {int(value.size - finite.sum()) - n_nan} Inf '
                  f'value(s) of {value.size} (dtype {array.dtype}), expected finite values '
                  f'(for {used_for})')
  return value, None


def gather(state_dict: Mapping[str, Any], wanted: Mapping[str, Wanted], model: str
           ) -> dict[str, np.ndarray]:
  """{name: float32 array} of every wanted tensor, or a ConversionError naming every missing,
  unexpected, wrongly shaped, non-float or non-finite one (``model`` describes the network the
  tensors were checked against)."""
  missing, wrong, good = [], [], {}
  for name, want in wanted.items():
    if name not in state_dict:
      missing.append(f'{name} (shape {want.shape}, for {want.used_for})')
      continue
    value, problem = check(name, state_dict[name], want.shape, want.used_for)
    if problem:
      wrong.append(problem)
    else:
      good[name] = value
  unexpected = sorted(set(state_dict) - set(wanted))
  if missing or wrong or unexpected:
    raise tensor_mismatch(model, missing=missing, wrong=wrong,
                          unexpected=[f'{n} ({_describe(state_dict[n])})' for n in unexpected])
  return good


def collect_leaves(abstract, tensors, name_of, *, shown=lambda name: name,
                   missing_note=lambda name: '', shape_note=lambda want, array: ''):
  """Every leaf of our parameter tree ``abstract`` from the checkpoint's ``tensors`` (each
  `check`ed, in our layout: `layout.to_flax`), for importers whose names map one leaf to one
  tensor. Returns (flat params {path: array}, the names used, missing, wrong) -- the importer
  adds its own checks before `errors.tensor_mismatch`. ``shown(name)`` is how a message spells
  a name; ``missing_note`` / ``shape_note`` add hints."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from lees_jax.convert import layout  # pylint: disable=g-import-not-at-top
  flat, used, missing, wrong = {}, set(), [], []
  for path, leaf in sorted(traverse_util.flatten_dict(abstract).items()):
    name, ours = name_of(path), '/'.join(path)
    want = layout.torch_shape(tuple(leaf.shape), path[-1])
    if name not in tensors:
      missing.append(f'{name}{missing_note(name)} (shape {want}, for {ours})')
      continue
    used.add(name)
    array = np.asarray(tensors[name]) if not isinstance(tensors[name], np.ndarray) else tensors[name]
    value, problem = check(name, array, want, ours, shown=shown(name),
                           shape_note=shape_note(want, array))
    if problem:
      wrong.append(problem)
    else:
      flat[path] = layout.to_flax(value, path[-1])
  return flat, used, missing, wrong
