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
    array = state_dict[name]
    if not isinstance(array, np.ndarray):
      wrong.append(f'{name}: a {type(array).__name__}, not a tensor (for {want.used_for})')
    elif tuple(array.shape) != want.shape:
      wrong.append(f'{name}: shape {tuple(array.shape)}, expected {want.shape} '
                   f'(for {want.used_for})')
    elif not _is_float(array):
      wrong.append(f'{name}: dtype {array.dtype}, expected a floating-point tensor '
                   f'(for {want.used_for})')
    else:
      value = np.asarray(array, np.float32)
      finite = np.isfinite(value)
      if not finite.all():
        n_nan = int(np.isnan(value).sum())
        wrong.append(f'{name}: {n_nan} NaN and {int(value.size - finite.sum()) - n_nan} Inf '
                     f'value(s) of {value.size} (dtype {array.dtype}), expected finite values '
                     f'(for {want.used_for})')
      else:
        good[name] = value
  unexpected = sorted(set(state_dict) - set(wanted))
  if missing or wrong or unexpected:
    raise tensor_mismatch(model, missing=missing, wrong=wrong,
                          unexpected=[f'{n} ({_describe(state_dict[n])})' for n in unexpected])
  return good
