"""The diffusers ``UNet2DModel`` (DDPM) architecture config and tensors -> our UNet.

Strict on purpose: the diffusers config must be one our `UNetSpec` represents exactly (every
unsupported field is reported, defaults of absent keys included), and every tensor must map
one-to-one onto our parameter tree with the right shape and finite values (every missing,
unexpected or wrong tensor is reported), so that an import either reproduces the source network
or fails saying why.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import strict
from lees_jax.convert.errors import ConversionError, tensor_mismatch

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
  tensors, stored_as, scheme = _normalize(state_dict)

  def shown(name: str) -> str:  # the name as the checkpoint spells it
    return f'{stored_as[name]} (= {name})' if name in stored_as else name

  flat, used, missing, wrong = strict.collect_leaves(
      abstract, tensors, lambda path: diffusers_name(path, levels), shown=shown,
      missing_note=lambda name: (f' (old name {_old_form(name)})'
                                 if scheme == 'old' and _old_form(name) != name else ''))
  unexpected = sorted(set(tensors) - used)
  if missing or wrong or unexpected:
    raise tensor_mismatch(
        f'UNet (ch={model_config.ch}, ch_mult={tuple(model_config.ch_mult)}, '
        f'num_res_blocks={model_config.num_res_blocks}, '
        f'attn_resolutions={tuple(model_config.attn_resolutions)})',
        missing=missing, wrong=wrong,
        unexpected=[f'{shown(n)} (shape {tuple(np.shape(tensors[n]))})' for n in unexpected])
  params = traverse_util.unflatten_dict(flat)
  return model_config, params
