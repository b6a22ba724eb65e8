"""Import a diffusers ``UNet2DModel`` checkpoint (e.g. google/ddpm-cifar10-32) as a lees_jax backbone.

Usage:
  python -m lees_jax.convert --source=google/ddpm-cifar10-32 --out=checkpoints/ddpm-cifar10-32
  python -m lees_jax.convert --source=/path/to/D --out=checkpoints/ddpm-cifar10-32   # offline

``--source`` is a local directory holding ``config.json`` and
``diffusion_pytorch_model.safetensors`` (preferred) or ``diffusion_pytorch_model.bin``
(directly or in a ``unet/`` sub-folder, as in a pipeline snapshot), or a Hugging Face Hub id
whose files are downloaded with ``huggingface_hub.hf_hub_download``. A ``scheduler_config.json``
next to them (or in ``scheduler/``) supplies the diffusion schedule; without one the DDPM
linear schedule (1e-4 -> 0.02, T = 1000) is recorded.

Nothing here imports torch or diffusers: ``.safetensors`` are read with safetensors' numpy API,
``.bin`` with the code-free reader `lees_jax.torch_archive`. The conversion is strict: the
diffusers architecture config must be one our `UNetSpec` represents exactly (every unsupported
field is reported), and every tensor must map one-to-one onto our parameter tree with the right
shape (every missing, unexpected or wrongly shaped tensor is reported). The output is written
with `checkpoints.save_backbone`, atomically: a failed conversion leaves nothing at ``--out``.

Public API: `convert`, `diffusers_to_params`, `model_config_from_diffusers`,
`diffusion_config_from_scheduler`, `read_state_dict`, `ConversionError`, `SourceUnavailableError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from typing import Any, Mapping

import ml_collections
import numpy as np

CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'diffusion_pytorch_model.safetensors'
BIN_FILE = 'diffusion_pytorch_model.bin'
SCHEDULER_FILE = 'scheduler_config.json'
HUB_URL = 'https://huggingface.co'

# Defaults of diffusers' UNet2DModel.__init__ (diffusers 0.42): a key absent from config.json
# means diffusers builds the model with these, so they are checked like explicit values.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type='positional', time_embedding_dim=None, freq_shift=0,
    flip_sin_to_cos=True,
    down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'),
    mid_block_type='UNetMidBlock2D',
    up_block_types=('AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=1, downsample_type='conv', upsample_type='conv', dropout=0.0,
    act_fn='silu', attention_head_dim=8, norm_num_groups=32, attn_norm_num_groups=None,
    norm_eps=1e-5, resnet_time_scale_shift='default', add_attention=True, class_embed_type=None,
    num_class_embeds=None, num_train_timesteps=None)

# The dropout of the DDPM CIFAR-10 training recipe (REFERENCE §1). diffusers' inference configs
# do not record training dropout (their `dropout` is 0.0), so it is the recorded default.
DDPM_DROPOUT = 0.1

# DDPMScheduler defaults, which are also the DDPM schedule of Ho et al. (2020).
SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, prediction_type='epsilon', variance_type='fixed_small')
# The scheduler variances our DDPM sampler can reproduce (config.sampler.variance); the others
# need a model that predicts its variance (out_channels = 2 x in_channels), which we refuse.
SUPPORTED_VARIANCE_TYPES = ('fixed_small', 'fixed_large')


class ConversionError(ValueError):
  """The diffusers checkpoint cannot be represented exactly by our backbone."""


class SourceUnavailableError(ConversionError):
  """The checkpoint files could not be found or downloaded; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Architecture config.
# ---------------------------------------------------------------------------------------------

def _cfg(config: Mapping[str, Any], key: str):
  return config[key] if key in config else DIFFUSERS_DEFAULTS[key]


def _require(problems: list, config, key: str, allowed: tuple, why: str = ''):
  value = _cfg(config, key)
  if value not in allowed:
    origin = '' if key in config else ' (absent from config.json: diffusers default)'
    want = ' or '.join(repr(a) for a in allowed)
    problems.append(f'{key}={value!r}{origin}: only {want} is supported{why}')


def model_config_from_diffusers(diffusers_config: Mapping[str, Any], *,
                                dropout: float | None = None) -> ml_collections.ConfigDict:
  """The `config.model` equivalent to a diffusers ``UNet2DModel`` config (clear error if none).

  ``dropout``: recorded training dropout; by default the config's ``dropout`` if non-zero, else
  the DDPM CIFAR-10 value 0.1 (diffusers configs of DDPM checkpoints store 0.0 or nothing).
  """
  c = dict(diffusers_config)
  problems: list[str] = []
  cls = c.get('_class_name', 'UNet2DModel')
  if cls != 'UNet2DModel':
    problems.append(f"_class_name={cls!r}: only 'UNet2DModel' is supported")

  # Fixed features of the DDPM UNet that diffusers makes configurable.
  _require(problems, c, 'center_input_sample', (False,))
  _require(problems, c, 'time_embedding_type', ('positional',))
  _require(problems, c, 'flip_sin_to_cos', (False,), ' (embedding order [sin, cos])')
  _require(problems, c, 'freq_shift', (1,), ' (frequencies exp(-ln(1e4) i / (d/2 - 1)))')
  _require(problems, c, 'mid_block_type', ('UNetMidBlock2D',))
  _require(problems, c, 'mid_block_scale_factor', (1,))
  _require(problems, c, 'downsample_padding', (0,), ' (pad bottom/right by one, stride-2 conv)')
  _require(problems, c, 'downsample_type', ('conv',))
  _require(problems, c, 'upsample_type', ('conv',))
  _require(problems, c, 'act_fn', ('silu', 'swish'))
  _require(problems, c, 'resnet_time_scale_shift', ('default',))
  _require(problems, c, 'add_attention', (True,), ' (the middle block has attention)')
  _require(problems, c, 'class_embed_type', (None,))
  _require(problems, c, 'num_class_embeds', (None,))

  channels = list(_cfg(c, 'block_out_channels'))
  down = list(_cfg(c, 'down_block_types'))
  up = list(_cfg(c, 'up_block_types'))
  levels = len(channels)
  ch = int(channels[0]) if channels else 0
  if not channels or any(not isinstance(v, int) or v <= 0 for v in channels):
    problems.append(f'block_out_channels={channels!r}: must be a non-empty list of positive ints')
  elif any(v % ch for v in channels):
    problems.append(f'block_out_channels={channels!r}: every entry must be a multiple of the first '
                    f'({ch}), our UNet uses ch * ch_mult')
  if len(down) != levels or len(up) != levels:
    problems.append(f'down_block_types ({len(down)}), up_block_types ({len(up)}) and '
                    f'block_out_channels ({levels}) must have the same length')
  bad_down = [b for b in down if b not in ('DownBlock2D', 'AttnDownBlock2D')]
  bad_up = [b for b in up if b not in ('UpBlock2D', 'AttnUpBlock2D')]
  if bad_down:
    problems.append(f'down_block_types contains {bad_down}: only DownBlock2D and AttnDownBlock2D '
                    'are supported')
  if bad_up:
    problems.append(f'up_block_types contains {bad_up}: only UpBlock2D and AttnUpBlock2D are '
                    'supported')
  down_attn = [b == 'AttnDownBlock2D' for b in down]
  up_attn = [b == 'AttnUpBlock2D' for b in reversed(up)]  # up_blocks[i] is level levels-1-i
  if len(down) == len(up) == levels and not bad_down and not bad_up and down_attn != up_attn:
    problems.append(f'attention levels differ between down_block_types {down} and up_block_types '
                    f'{up}: our UNet has attention at the same resolutions on both paths')

  sample_size = raw_size = _cfg(c, 'sample_size')
  if isinstance(raw_size, (list, tuple)) and len(raw_size) == 2 and raw_size[0] == raw_size[1]:
    sample_size = raw_size[0]
  if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size <= 0:
    problems.append(f'sample_size={raw_size!r}: a positive int (square inputs of that resolution) '
                    'is required')
    sample_size = None

  layers = _cfg(c, 'layers_per_block')
  if not isinstance(layers, int) or layers < 1:
    problems.append(f'layers_per_block={layers!r}: must be an int >= 1')

  groups = _cfg(c, 'norm_num_groups')
  if not isinstance(groups, int) or groups < 1:
    problems.append(f'norm_num_groups={groups!r}: must be an int (None is not supported)')
  attn_groups = _cfg(c, 'attn_norm_num_groups')
  if attn_groups not in (None, groups):
    problems.append(f'attn_norm_num_groups={attn_groups!r}: only None (= norm_num_groups) is supported')

  head_dim = _cfg(c, 'attention_head_dim')
  if head_dim is not None and channels and not bad_down:
    attn_channels = sorted({channels[i] for i, a in enumerate(down_attn) if a} | {channels[-1]})
    if any(head_dim != v for v in attn_channels):
      origin = '' if 'attention_head_dim' in c else ' (absent from config.json: diffusers default)'
      problems.append(f'attention_head_dim={head_dim!r}{origin}: only single-head attention is '
                      f'supported (None, or the channel count of every attention block: {attn_channels})')

  temb_dim = _cfg(c, 'time_embedding_dim')
  if temb_dim not in (None, 4 * ch):
    problems.append(f'time_embedding_dim={temb_dim!r}: only None (= 4 * block_out_channels[0] = '
                    f'{4 * ch}) is supported')

  for key in ('in_channels', 'out_channels'):
    v = _cfg(c, key)
    if not isinstance(v, int) or v < 1:
      problems.append(f'{key}={v!r}: must be a positive int')
  eps = _cfg(c, 'norm_eps')
  if not isinstance(eps, (int, float)) or eps <= 0:
    problems.append(f'norm_eps={eps!r}: must be a positive number')

  if problems:
    raise ConversionError('unsupported diffusers UNet2DModel config; lees_jax\'s DDPM UNet cannot '
                          'represent:\n  - ' + '\n  - '.join(problems))

  if dropout is None:
    dropout = float(_cfg(c, 'dropout') or 0.0) or DDPM_DROPOUT
  model_config = ml_collections.ConfigDict(dict(
      name='ddpm_unet', resolution=int(sample_size), in_channels=int(_cfg(c, 'in_channels')),
      out_channels=int(_cfg(c, 'out_channels')), ch=ch,
      ch_mult=tuple(v // ch for v in channels), num_res_blocks=int(layers),
      attn_resolutions=tuple(sample_size // 2 ** i for i, a in enumerate(down_attn) if a),
      dropout=float(dropout), num_groups=int(groups), norm_eps=float(eps), dtype='float32'))
  from lees_jax import models
  try:
    models.UNetSpec.from_config(model_config)
  except ValueError as e:
    raise ConversionError(f'the diffusers config maps to an invalid lees_jax UNet: {e}') from e
  return model_config


def scheduler_variance_type(scheduler_config: Mapping[str, Any] | None) -> str:
  """The DDPM variance the checkpoint's scheduler samples with (diffusers' default when the
  scheduler config is absent or does not say: 'fixed_small')."""
  return str(dict(scheduler_config or {}).get('variance_type', SCHEDULER_DEFAULTS['variance_type']))


def diffusion_config_from_scheduler(scheduler_config: Mapping[str, Any] | None
                                    ) -> ml_collections.ConfigDict:
  """`config.diffusion` from a diffusers ``scheduler_config.json`` (None: the DDPM schedule)."""
  s = dict(scheduler_config or {})
  get = lambda k: s[k] if k in s else SCHEDULER_DEFAULTS[k]  # noqa: E731
  problems = []
  if get('beta_schedule') != 'linear':
    problems.append(f"beta_schedule={get('beta_schedule')!r}: only 'linear' is supported")
  if get('trained_betas') is not None:
    problems.append('trained_betas is set: only the linear schedule from beta_start/beta_end is supported')
  if get('prediction_type') != 'epsilon':
    problems.append(f"prediction_type={get('prediction_type')!r}: only 'epsilon' is supported")
  if get('variance_type') not in SUPPORTED_VARIANCE_TYPES:
    problems.append(f"variance_type={get('variance_type')!r}: only {SUPPORTED_VARIANCE_TYPES} "
                    '(fixed variances of an epsilon-only model) are supported')
  if problems:
    raise ConversionError('unsupported diffusers scheduler config:\n  - ' + '\n  - '.join(problems))
  return ml_collections.ConfigDict(dict(
      num_timesteps=int(get('num_train_timesteps')), beta_schedule='linear',
      beta_start=float(get('beta_start')), beta_end=float(get('beta_end'))))


# ---------------------------------------------------------------------------------------------
# Tensor names.
# ---------------------------------------------------------------------------------------------

# Old (pre-0.13 diffusers AttentionBlock) attention parameter names -> current names.
_OLD_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}
_OLD_ATTN_RE = re.compile(r'^(.*\battentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$')

_RES_SUB = {'norm1': 'norm1', 'conv1': 'conv1', 'temb_proj': 'time_emb_proj', 'norm2': 'norm2',
            'conv2': 'conv2', 'conv_shortcut': 'conv_shortcut'}
_ATTN_SUB = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}
_TOP = {'conv_in': 'conv_in', 'conv_out': 'conv_out', 'norm_out': 'conv_norm_out',
        'temb_dense_0': 'time_embedding.linear_1', 'temb_dense_1': 'time_embedding.linear_2'}
_UNIT_RE = re.compile(r'^(down|up)_(\d+)_(res|attn)_(\d+)$')
_RESAMPLE_RE = re.compile(r'^(down|up)_(\d+)_(downsample|upsample)$')


def _normalize(state_dict: Mapping[str, Any]):
  out: dict[str, Any] = {}
  stored_as: dict[str, str] = {}
  n_old = n_new = 0
  clashes = []
  for name, value in state_dict.items():
    m = _OLD_ATTN_RE.match(name)
    if m:
      new = f'{m.group(1)}.{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}'
      n_old += 1
      if new in state_dict:
        clashes.append(f'{name} and {new}')
      out[new] = value
      stored_as[new] = name
    else:
      if re.search(r'\battentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.', name):
        n_new += 1
      out.setdefault(name, value)
  if clashes:
    raise ConversionError('the checkpoint holds attention tensors under both the old and the new '
                          'name:\n  - ' + '\n  - '.join(clashes))
  scheme = 'mixed' if n_old and n_new else 'old' if n_old else 'new' if n_new else 'none'
  return out, stored_as, scheme


def normalize_names(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """Renames old attention names (query/key/value/proj_attn) to the current ones.

  Returns (renamed dict, 'old' | 'new' | 'mixed' | 'none'); a tensor present under both names
  is an error.
  """
  out, _, scheme = _normalize(state_dict)
  return out, scheme


def _old_form(name: str) -> str:
  for old, new in _OLD_ATTENTION.items():
    marker = f'.{new}.'
    if '.attentions.' in name and marker in name:
      return name.replace(marker, f'.{old}.')
  return name


def diffusers_name(path: tuple[str, ...], levels: int) -> str:
  """The diffusers tensor name of our parameter at ``path`` (e.g. ('up_3_upsample','conv','kernel'))."""
  module, *rest, leaf = path
  torch_leaf = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]
  if module in _TOP:
    assert not rest, path
    return f'{_TOP[module]}.{torch_leaf}'
  if module.startswith('mid_'):
    block = 'mid_block.resnets.0' if module == 'mid_res_0' else (
        'mid_block.resnets.1' if module == 'mid_res_1' else 'mid_block.attentions.0')
    subs = _ATTN_SUB if module == 'mid_attn' else _RES_SUB
    return f'{block}.{subs[rest[0]]}.{torch_leaf}'
  m = _UNIT_RE.match(module)
  if m:
    side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
    idx = level if side == 'down' else levels - 1 - level
    group = 'resnets' if kind == 'res' else 'attentions'
    subs = _RES_SUB if kind == 'res' else _ATTN_SUB
    return f'{side}_blocks.{idx}.{group}.{i}.{subs[rest[0]]}.{torch_leaf}'
  m = _RESAMPLE_RE.match(module)
  if m:
    side, level = m.group(1), int(m.group(2))
    idx = level if side == 'down' else levels - 1 - level
    which = 'downsamplers' if side == 'down' else 'upsamplers'
    return f'{side}_blocks.{idx}.{which}.0.{rest[0]}.{torch_leaf}'
  raise AssertionError(f'no diffusers name for parameter {"/".join(path)}')


def _torch_shape(flax_shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == 'kernel' and len(flax_shape) == 4:  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if leaf == 'kernel' and len(flax_shape) == 2:  # (in, out) -> (out, in)
    return flax_shape[::-1]
  return tuple(flax_shape)


def _to_flax(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and array.ndim == 4:
    array = array.transpose(2, 3, 1, 0)
  elif leaf == 'kernel' and array.ndim == 2:
    array = array.T
  return np.ascontiguousarray(array, dtype=np.float32)


def diffusers_to_params(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any], *,
                        dropout: float | None = None):
  """Maps a diffusers UNet2DModel state dict onto our parameter tree.

  Args:
    state_dict: tensor name -> array (numpy, or anything ``np.asarray`` accepts); old
      (query/key/value/proj_attn) and new (to_q/to_k/to_v/to_out.0) attention names both work.
    diffusers_config: the model's ``config.json`` as a dict.
    dropout: see `model_config_from_diffusers`.

  Returns:
    (model_config, params): the `config.model` ConfigDict and a nested dict of float32 numpy
    arrays with exactly the structure of ``models.init_params`` for that config.

  Raises:
    ConversionError: unsupported config, or any missing / unexpected / wrongly shaped /
      non-floating tensor or one holding NaN or Inf (all of them are listed, by name).
      float16, bfloat16 and float64 tensors are converted to float32.
  """
  import jax
  from flax import traverse_util

  from lees_jax import models

  model_config = model_config_from_diffusers(diffusers_config, dropout=dropout)
  levels = len(model_config.ch_mult)
  model = models.build_model(model_config)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  expected = traverse_util.flatten_dict(abstract)
  tensors, stored_as, scheme = _normalize(state_dict)

  def shown(name: str) -> str:  # the name as the checkpoint spells it
    return f'{stored_as[name]} (= {name})' if name in stored_as else name

  flat: dict[tuple[str, ...], np.ndarray] = {}
  used: set[str] = set()
  missing, wrong = [], []
  for path, leaf in sorted(expected.items()):
    name = diffusers_name(path, levels)
    want = _torch_shape(tuple(leaf.shape), path[-1])
    ours = '/'.join(path)
    if name not in tensors:
      alias = f' (old name {_old_form(name)})' if scheme == 'old' and _old_form(name) != name else ''
      missing.append(f'{name}{alias} (shape {want}, for {ours})')
      continue
    used.add(name)
    array = np.asarray(tensors[name])
    if tuple(array.shape) != want:
      wrong.append(f'{shown(name)}: shape {tuple(array.shape)}, expected {want} (for {ours})')
      continue
    if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
      wrong.append(f'{shown(name)}: dtype {array.dtype}, expected a floating-point tensor '
                   f'(for {ours})')
      continue
    # float16 / bfloat16 / float64 are converted to float32 (exact for the half types).
    converted = _to_flax(array, path[-1])
    finite = np.isfinite(converted)
    if not finite.all():
      n_nan = int(np.isnan(converted).sum())
      n_inf = int(converted.size - finite.sum()) - n_nan
      wrong.append(f'{shown(name)}: {n_nan} NaN and {n_inf} Inf value(s) of {converted.size} '
                   f'(dtype {array.dtype}), expected finite values (for {ours})')
      continue
    flat[path] = converted
  unexpected = sorted(set(tensors) - used)
  if missing or wrong or unexpected:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing tensor(s):\n    ' + '\n    '.join(missing))
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected tensor(s):\n    ' + '\n    '.join(
          f'{shown(n)} (shape {tuple(np.shape(tensors[n]))})' for n in unexpected))
    if wrong:
      parts.append(f'{len(wrong)} tensor(s) with the wrong shape or dtype, or non-finite values:'
                   '\n    ' + '\n    '.join(wrong))
    raise ConversionError(
        f'the checkpoint does not match the UNet its config describes (ch={model_config.ch}, '
        f'ch_mult={tuple(model_config.ch_mult)}, num_res_blocks={model_config.num_res_blocks}, '
        f'attn_resolutions={tuple(model_config.attn_resolutions)}):\n  ' + '\n  '.join(parts))
  params = traverse_util.unflatten_dict(flat)
  return model_config, params


# ---------------------------------------------------------------------------------------------
# Files: local directories and the Hugging Face Hub.
# ---------------------------------------------------------------------------------------------

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


def _local_files(source: str) -> dict[str, str | None]:
  """config / weights / scheduler paths inside a local directory (or its unet/ sub-folder)."""
  base = source
  if not os.path.isfile(os.path.join(source, CONFIG_FILE)) and os.path.isfile(
      os.path.join(source, 'unet', CONFIG_FILE)):
    base = os.path.join(source, 'unet')  # a pipeline snapshot: model files under unet/
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
  if os.path.basename(os.path.normpath(source)) == 'unet':
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
          f'versions" tab; from its unet/ and scheduler/ folders if it has them) into a directory '
          f'D, then run: python -m lees_jax.convert --source=D --out={out}')


def _hub_files(repo: str, out: str) -> dict[str, str | None]:
  """Downloads config, weights (safetensors, else .bin) and scheduler config from the Hub."""
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
  for sub in (None, 'unet'):
    try:
      config = download(CONFIG_FILE, sub)
      subfolder = sub
      break
    except Exception as e:  # noqa: BLE001 - classified below
      if not absent_on_hub(e):
        fail(e)
  if config is None:
    raise SourceUnavailableError(f'{HUB_URL}/{repo} has no {CONFIG_FILE} (at its root or in unet/); '
                                 'is it a diffusers UNet2DModel repository?')
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


def convert(source: str, out: str, overwrite: bool = False, *, dropout: float | None = None) -> str:
  """Converts a diffusers UNet2DModel (local directory or Hub id) into a backbone at ``out``.

  Returns the absolute backbone directory, loadable with `lees_jax.load_backbone`. Raises
  `ConversionError` (a ValueError; `SourceUnavailableError` when files cannot be found or
  downloaded, with instructions), `torch_archive.UnsafeArchiveError` for a ``.bin`` whose pickle
  would run code, or FileExistsError if ``out`` exists and not ``overwrite``. Nothing is written
  to ``out`` unless the conversion succeeds.
  """
  from lees_jax import checkpoints, models

  out_abs = os.path.abspath(out)
  if os.path.exists(out_abs) and not overwrite:
    raise FileExistsError(f'{out_abs} already exists; pass --overwrite (overwrite=True) to replace '
                          'it, or choose another --out (nothing was written)')
  if os.path.isdir(source):
    files = _local_files(source)
    source_desc = os.path.abspath(source)
  elif os.path.exists(source):
    raise SourceUnavailableError(f'--source={source} is a file; pass the directory holding '
                                 f'{CONFIG_FILE} and {SAFETENSORS_FILE} (or {BIN_FILE})')
  elif _looks_like_hub_id(source):
    files = _hub_files(source, out)
    source_desc = source
  else:
    raise SourceUnavailableError(f'--source={source}: no such directory, and not a Hugging Face '
                                 'Hub id (owner/name)')

  diffusers_config = _read_json(files['config'])
  scheduler_config = _read_json(files['scheduler']) if files['scheduler'] else None
  # Check the architecture before reading ~140 MB of weights.
  model_config_from_diffusers(diffusers_config, dropout=dropout)
  diffusion_config = diffusion_config_from_scheduler(scheduler_config)
  state_dict = read_state_dict(files['weights'])
  _, attention_names = normalize_names(state_dict)
  source_dtypes = _dtype_counts(state_dict)
  model_config, params = diffusers_to_params(state_dict, diffusers_config, dropout=dropout)
  del state_dict

  ignored = sorted(k for k in diffusers_config
                   if not k.startswith('_') and k not in DIFFUSERS_DEFAULTS)
  metadata = dict(
      source=source_desc,
      source_revision=_revision(files['weights']),
      source_files={k: (os.path.basename(v) if v else None) for k, v in files.items()},
      weights_sha256=_sha256(files['weights']),
      attention_names=attention_names,
      diffusers_config=diffusers_config,
      scheduler_config=scheduler_config,
      diffusion_from=('scheduler_config.json' if scheduler_config is not None
                      else 'default DDPM linear schedule (no scheduler_config.json found)'),
      # The variance the source's DDPMScheduler samples with. lees_jax's DDPM sampler uses
      # config.sampler.variance (default 'fixed_large', the paper's); not applied automatically.
      variance_type=scheduler_variance_type(scheduler_config),
      variance_type_from=('scheduler_config.json' if scheduler_config is not None
                          and 'variance_type' in scheduler_config
                          else "diffusers' DDPMScheduler default"),
      source_dtypes=source_dtypes,
      ignored_config_keys=ignored,
      num_params=models.count_params(params),
      converted_by='lees_jax.convert')
  return checkpoints.save_backbone(out_abs, params, model_config, diffusion_config=diffusion_config,
                                   overwrite=overwrite, **metadata)


# ---------------------------------------------------------------------------------------------
# CLI.
# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
  import argparse

  parser = argparse.ArgumentParser(
      prog='python -m lees_jax.convert',
      description='Import a diffusers UNet2DModel checkpoint (e.g. google/ddpm-cifar10-32) as a '
                  'lees_jax backbone directory (load it with lees_jax.load_backbone).')
  parser.add_argument('--source', required=True,
                      help='Hugging Face Hub id (e.g. google/ddpm-cifar10-32) or a local directory '
                           f'holding {CONFIG_FILE} and {SAFETENSORS_FILE} or {BIN_FILE}')
  parser.add_argument('--out', required=True, help='output backbone directory (must not exist)')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  parser.add_argument('--dropout', type=float, default=None,
                      help=f'training dropout recorded in the model config (default: the config\'s '
                           f'non-zero dropout, else {DDPM_DROPOUT} as in DDPM CIFAR-10)')
  args = parser.parse_args(argv)
  try:
    directory = convert(args.source, args.out, overwrite=args.overwrite, dropout=args.dropout)
  except (ValueError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  with open(os.path.join(directory, 'backbone.json')) as f:
    meta = json.load(f)
  m = meta['model']
  print(f'wrote {directory}: {meta["num_params"]:,} parameters, ch={m["ch"]}, '
        f'ch_mult={tuple(m["ch_mult"])}, attn_resolutions={tuple(m["attn_resolutions"])}, '
        f'from {meta["source"]} ({meta["source_files"]["weights"]}, {meta["attention_names"]} '
        f'attention names); diffusion: {meta["diffusion"]}')
  print(f'note: the source scheduler samples with variance_type={meta["variance_type"]!r} '
        f'({meta["variance_type_from"]}); lees_jax\'s DDPM sampler uses config.sampler.variance '
        "(default 'fixed_large', the paper's)")
  if meta['ignored_config_keys']:
    print(f'note: config.json keys not used by diffusers\' UNet2DModel were ignored: '
          f'{meta["ignored_config_keys"]}')
  print(f'load it with: model, params = lees_jax.load_backbone({directory!r})')
  return 0


if __name__ == '__main__':
  sys.exit(main())
