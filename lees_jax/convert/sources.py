"""Reading a checkpoint source: a local directory or a Hugging Face Hub id, and its files.

Kept apart from the architecture mappings (`diffusers_unet`, ...) because what is done here does
not depend on the architecture: read tensors without torch (``.safetensors`` with safetensors'
numpy API, or a plain reader for bfloat16; ``.bin`` with the code-free `lees_jax.torch_archive`),
fingerprint what was read (sha256, Hub revision, dtypes) for the backbone's metadata, and find a
model's files in a local directory or download them from the Hub, with offline advice when the
Hub cannot be reached. The files looked for are those of a diffusers model directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from lees_jax.convert.errors import ConversionError, MissingOnHubError, SourceUnavailableError

# The file layout of a diffusers model directory (or of its unet/ or transformer/ and
# scheduler/ sub-folders in a pipeline snapshot).
CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'diffusion_pytorch_model.safetensors'
BIN_FILE = 'diffusion_pytorch_model.bin'
SCHEDULER_FILE = 'scheduler_config.json'
HUB_URL = 'https://huggingface.co'
# Where a pipeline snapshot keeps its denoising network: unet/ (DDPM), transformer/ (DiT).
MODEL_SUBFOLDERS = ('unet', 'transformer')


def _dtype_counts(state_dict: Mapping[str, Any]) -> dict[str, int]:
  counts: dict[str, int] = {}
  for v in state_dict.values():
    name = str(np.asarray(v).dtype)
    counts[name] = counts.get(name, 0) + 1
  return dict(sorted(counts.items()))


# safetensors dtype codes -> numpy (bfloat16 through ml_dtypes, which jax ships).
_SAFETENSORS_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16',
                       'I64': 'int64', 'I32': 'int32', 'I16': 'int16', 'I8': 'int8',
                       'U8': 'uint8', 'BOOL': 'bool'}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
  """A plain safetensors reader (little-endian u64 header size, JSON header, raw data) for the
  dtypes safetensors' numpy API cannot represent (bfloat16)."""
  import struct

  import ml_dtypes
  with open(path, 'rb') as f:
    data = f.read()
  (n,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + n])
  body = memoryview(data)[8 + n:]
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    code = info['dtype']
    if code not in _SAFETENSORS_DTYPES:
      raise ValueError(f'tensor {name}: unsupported safetensors dtype {code}')
    dtype = (np.dtype(ml_dtypes.bfloat16) if code == 'BF16'
             else np.dtype(_SAFETENSORS_DTYPES[code]).newbyteorder('<'))
    start, stop = info['data_offsets']
    shape = tuple(info['shape'])
    if stop - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or stop > len(body):
      raise ValueError(f'tensor {name}: data offsets {start}..{stop} do not fit shape {shape} '
                       f'of {code} in the file')
    out[name] = np.frombuffer(body[start:stop], dtype=dtype).reshape(shape).copy()
  return out


def load_original_file(path: str, *, what: str, where_to_get: str) -> dict:
  """The top-level dict of an original repository's ``.pt`` / ``.pth`` file (DiT, OpenAI's
  UNets, U-ViT), read code-free by `torch_archive`. A missing file names ``where_to_get`` it;
  an unsafe or malformed archive, or an object that is not a dict (``what`` says what it should
  be), is refused naming the file."""
  from lees_jax import torch_archive  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise SourceUnavailableError(f'--source={path}: no such file{where_to_get}')
  try:
    obj = torch_archive.load_object(path)
  except torch_archive.UnsafeArchiveError as e:
    raise torch_archive.UnsafeArchiveError(f'{path}: {e}') from e
  except torch_archive.ArchiveFormatError as e:
    raise ConversionError(str(e)) from e
  if not isinstance(obj, dict):
    raise ConversionError(f'{path} holds a {type(obj).__name__}, not {what}')
  return obj


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads ``.safetensors`` (safetensors' numpy API; bfloat16 files by a plain reader) or
  ``.bin`` (`torch_archive`, code-free)."""
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except TypeError as e:  # numpy has no bfloat16: "data type 'bfloat16' not understood"
      if 'bfloat16' not in str(e):
        raise ConversionError(f'cannot read {path}: {type(e).__name__}: {e}') from e
      try:
        return _read_safetensors_raw(path)
      except Exception as e2:  # noqa: BLE001
        raise ConversionError(f'cannot read {path}: {type(e2).__name__}: {e2}') from e2
    except Exception as e:  # SafetensorError, OSError, ...
      raise ConversionError(f'cannot read {path}: {type(e).__name__}: {e}') from e
  from lees_jax import torch_archive
  # torch_archive never executes the pickle: it raises UnsafeArchiveError for a forbidden
  # global (re-raised here naming the file) or ArchiveFormatError (which names it already).
  try:
    return torch_archive.load_tensors(path)
  except torch_archive.UnsafeArchiveError as e:
    raise torch_archive.UnsafeArchiveError(f'{path}: {e}') from e


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConversionError(f'cannot read {path}: {e}') from e
  if not isinstance(value, dict):
    raise ConversionError(f'{path} does not hold a JSON object')
  return value


def _local_files(source: str, subfolders=MODEL_SUBFOLDERS) -> dict[str, str | None]:
  """config / weights / scheduler paths inside a local directory (or one of its
  ``subfolders``: unet/ or transformer/ by default, vae/ for an autoencoder)."""
  base = source
  if not os.path.isfile(os.path.join(source, CONFIG_FILE)):
    for sub in subfolders:  # a pipeline snapshot: model files under unet/ or transformer/
      if os.path.isfile(os.path.join(source, sub, CONFIG_FILE)):
        base = os.path.join(source, sub)
        break
  weights = None
  for name in (SAFETENSORS_FILE, BIN_FILE):
    if os.path.isfile(os.path.join(base, name)):
      weights = os.path.join(base, name)
      break
  config = os.path.join(base, CONFIG_FILE)
  if not os.path.isfile(config) or weights is None:
    absent = ([CONFIG_FILE] if not os.path.isfile(config) else []) + (
        [f'{SAFETENSORS_FILE} (or {BIN_FILE})'] if weights is None else [])
    present = sorted(os.listdir(base))
    raise SourceUnavailableError(
        f'{base} lacks {" and ".join(absent)} (it holds: {present or "nothing"}). A diffusers '
        f'UNet2DModel directory holds {CONFIG_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}, e.g. '
        f'from {HUB_URL}/google/ddpm-cifar10-32.')
  candidates = [os.path.join(base, SCHEDULER_FILE), os.path.join(source, SCHEDULER_FILE),
                os.path.join(source, 'scheduler', SCHEDULER_FILE)]
  if os.path.basename(os.path.normpath(source)) in MODEL_SUBFOLDERS:
    parent = os.path.dirname(os.path.normpath(source))
    candidates += [os.path.join(parent, SCHEDULER_FILE),
                   os.path.join(parent, 'scheduler', SCHEDULER_FILE)]
  scheduler = next((p for p in candidates if os.path.isfile(p)), None)
  return dict(config=config, weights=weights, scheduler=scheduler)


def _looks_like_hub_id(source: str) -> bool:
  return bool(re.fullmatch(r'[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?', source)) and \
      not source.endswith(('.json', '.bin', '.safetensors'))


def _offline_help(repo: str, out: str) -> str:
  return (f'To convert without a network: download {CONFIG_FILE} and {SAFETENSORS_FILE} (or '
          f'{BIN_FILE}), and optionally {SCHEDULER_FILE}, from {HUB_URL}/{repo} (the "Files and '
          f'versions" tab; from its unet/ or transformer/ and scheduler/ folders if it has them) '
          f'into a directory D, then run: python -m lees_jax.convert --source=D --out={out}')


def _hub_files(repo: str, out: str, subfolders=(None,) + MODEL_SUBFOLDERS
               ) -> dict[str, str | None]:
  """Downloads config, weights (safetensors, else .bin) and scheduler config from the Hub, from
  the first of ``subfolders`` (None: the repository's root) that has a config."""
  import huggingface_hub
  from huggingface_hub import errors as hf_errors

  local_missing = getattr(hf_errors, 'LocalEntryNotFoundError', ())
  repo_missing = (getattr(hf_errors, 'RepositoryNotFoundError', ()),
                  getattr(hf_errors, 'RevisionNotFoundError', ()))

  def absent_on_hub(e: BaseException) -> bool:
    return isinstance(e, hf_errors.EntryNotFoundError) and not isinstance(e, local_missing)

  def fail(e: BaseException):
    if isinstance(e, repo_missing):
      raise SourceUnavailableError(
          f'{repo!r} is neither a local directory nor a Hugging Face Hub model repository '
          f'({type(e).__name__}: {e})') from e
    raise SourceUnavailableError(
        f'--source={repo} is not a local directory, and it cannot be downloaded from the Hugging '
        f'Face Hub ({type(e).__name__}: '
        f'{str(e).splitlines()[0] if str(e) else ""}).\n{_offline_help(repo, out)}') from e

  def download(filename: str, subfolder: str | None):
    return huggingface_hub.hf_hub_download(repo, filename, subfolder=subfolder)

  config = subfolder = None
  for sub in subfolders:
    try:
      config = download(CONFIG_FILE, sub)
      subfolder = sub
      break
    except Exception as e:  # noqa: BLE001 - classified below
      if not absent_on_hub(e):
        fail(e)
  if config is None:
    where = ', '.join('its root' if s is None else f'{s}/' for s in subfolders)
    raise MissingOnHubError(f'{HUB_URL}/{repo} has no {CONFIG_FILE} (looked in {where}); is it '
                                 'a diffusers UNet2DModel, DiT or AutoencoderKL repository?')
  weights = None
  for name in (SAFETENSORS_FILE, BIN_FILE):
    try:
      weights = download(name, subfolder)
      break
    except Exception as e:  # noqa: BLE001
      if not absent_on_hub(e):
        fail(e)
  if weights is None:
    raise SourceUnavailableError(f'{HUB_URL}/{repo} has neither {SAFETENSORS_FILE} nor {BIN_FILE} '
                                 f'next to its {CONFIG_FILE}')
  scheduler = None
  for sub in ([subfolder] if subfolder is None else []) + ['scheduler']:
    try:
      scheduler = download(SCHEDULER_FILE, sub)
      break
    except Exception:  # noqa: BLE001 - optional file: fall back to the DDPM schedule
      continue
  return dict(config=config, weights=weights, scheduler=scheduler)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _revision(path: str) -> str | None:
  m = re.search(r'[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]', path)
  return m.group(1) if m else None
