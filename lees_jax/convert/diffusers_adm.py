"""A diffusers ``UNet2DModel`` in ADM style -> our ADM (`lees_jax.models.adm`).

The configs diffusers' ``scripts/convert_consistency_to_diffusers.py`` writes for OpenAI's UNets
(and any UNet2DModel of the same family): ADM's timestep embedding (``flip_sin_to_cos=True``,
``freq_shift=0``: [cos, sin] of t exp(-ln(1e4) i / (C/2))), ResBlock resampling
(``ResnetDownsampleBlock2D`` / ``ResnetUpsampleBlock2D``, ``downsample_type`` /
``upsample_type`` 'resnet') or learned convolutions (``DownBlock2D`` / ``UpBlock2D``, 'conv',
``downsample_padding=1``), ``resnet_time_scale_shift`` 'scale_shift' (ADM's
``use_scale_shift_norm``) or 'default', heads of ``attention_head_dim`` channels
(``num_head_channels``; None: one head), ``num_class_embeds`` labels added to the time
embedding, and 2C outputs for a learned variance. diffusers' attention splits q, k and v before
the heads, i.e. ``use_new_attention_order=True``; its three projections become our fused
``qkv`` in that order.

`is_adm_config` tells `lees_jax.convert.convert` which UNet2DModel importer to use: a config
with any ADM-only feature (the timestep convention above, resnet resampling, scale-shift norm,
class embeddings) is ADM; the DDPM-style rest goes to `diffusers_unet`. Strict like it: every
config field our ADM cannot represent is reported (defaults of absent keys included), then
every missing, unexpected, wrongly shaped, non-float or non-finite tensor, by name.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import layout
from lees_jax.convert.diffusers_unet import DIFFUSERS_DEFAULTS, normalize_names
from lees_jax.convert.errors import ConversionError
from lees_jax.convert.strict import Wanted, gather

_DOWN = {'DownBlock2D': (False, 'conv'), 'AttnDownBlock2D': (True, None),
         'ResnetDownsampleBlock2D': (False, 'resnet')}
_UP = {'UpBlock2D': (False, 'conv'), 'AttnUpBlock2D': (True, None),
       'ResnetUpsampleBlock2D': (False, 'resnet')}
_RES = {'norm1': 'norm1', 'conv1': 'conv1', 'temb_proj': 'time_emb_proj', 'norm2': 'norm2',
        'conv2': 'conv2', 'conv_shortcut': 'conv_shortcut'}
_TOP = {'conv_in': 'conv_in', 'conv_out': 'conv_out', 'norm_out': 'conv_norm_out',
        'time_embed_0': 'time_embedding.linear_1', 'time_embed_1': 'time_embedding.linear_2',
        'label_emb': 'class_embedding'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def _cfg(config: Mapping[str, Any], key: str):
  return config[key] if key in config else DIFFUSERS_DEFAULTS[key]


def is_adm_config(config: Mapping[str, Any]) -> bool:
  """A UNet2DModel config with a feature only ADM has (see the module docstring)."""
  c = dict(config)
  if c.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    return False
  blocks = list(_cfg(c, 'down_block_types')) + list(_cfg(c, 'up_block_types'))
  return ((_cfg(c, 'flip_sin_to_cos'), _cfg(c, 'freq_shift')) == (True, 0)
          or _cfg(c, 'resnet_time_scale_shift') == 'scale_shift'
          or 'resnet' in (_cfg(c, 'downsample_type'), _cfg(c, 'upsample_type'))
          or any(b.startswith('Resnet') for b in blocks)
          or _cfg(c, 'num_class_embeds') is not None or _cfg(c, 'class_embed_type') is not None)


def _require(problems, c, key, allowed, why=''):
  value = _cfg(c, key)
  if value not in allowed:
    origin = '' if key in c else ' (absent from config.json: diffusers default)'
    problems.append(f'{key}={value!r}{origin}: only {" or ".join(map(repr, allowed))} is '
                    f'supported{why}')


def model_config_from_diffusers(diffusers_config: Mapping[str, Any]
                                ) -> ml_collections.ConfigDict:
  """The `config.model` (``adm_unet``) of an ADM-style UNet2DModel config (every field it cannot
  represent reported in one ConversionError)."""
  c = dict(diffusers_config)
  problems: list[str] = []
  if c.get('_class_name', 'UNet2DModel') != 'UNet2DModel':
    problems.append(f"_class_name={c['_class_name']!r}: only 'UNet2DModel' is supported")
  _require(problems, c, 'center_input_sample', (False,))
  _require(problems, c, 'time_embedding_type', ('positional',))
  _require(problems, c, 'flip_sin_to_cos', (True,), " (ADM's embedding order [cos, sin])")
  _require(problems, c, 'freq_shift', (0,), " (ADM's frequencies exp(-ln(1e4) i / (C/2)))")
  _require(problems, c, 'mid_block_type', ('UNetMidBlock2D',))
  _require(problems, c, 'mid_block_scale_factor', (1,))
  _require(problems, c, 'add_attention', (True,), ' (the middle block has attention)')
  _require(problems, c, 'act_fn', ('silu', 'swish'))
  _require(problems, c, 'resnet_time_scale_shift', ('default', 'scale_shift'))
  _require(problems, c, 'class_embed_type', (None,), ' (labels through an nn.Embedding)')
  _require(problems, c, 'downsample_type', ('conv', 'resnet'))
  _require(problems, c, 'upsample_type', ('conv', 'resnet'))

  channels = list(_cfg(c, 'block_out_channels'))
  down, up = list(_cfg(c, 'down_block_types')), list(_cfg(c, 'up_block_types'))
  levels = len(channels)
  if not channels or any(not isinstance(v, int) or v <= 0 for v in channels):
    problems.append(f'block_out_channels={channels!r}: must be a non-empty list of positive ints')
    channels = []
  if len(down) != levels or len(up) != levels:
    problems.append(f'down_block_types ({len(down)}), up_block_types ({len(up)}) and '
                    f'block_out_channels ({levels}) must have the same length')
  bad = [b for b in down if b not in _DOWN] + [b for b in up if b not in _UP]
  if bad:
    problems.append(f'block types {bad}: only {sorted(_DOWN)} and {sorted(_UP)} are supported')
  resampling, down_attn, up_attn = set(), [], []
  if not bad and len(down) == len(up) == levels:
    for i, b in enumerate(down):
      has_attn, kind = _DOWN[b]
      down_attn.append(has_attn)
      if i < levels - 1:
        resampling.add(f'{b}: {kind or _cfg(c, "downsample_type")}')
    for j, b in enumerate(up):  # up_blocks[j] is level levels - 1 - j
      has_attn, kind = _UP[b]
      up_attn.insert(0, has_attn)
      if j < levels - 1:
        resampling.add(f'{b}: {kind or _cfg(c, "upsample_type")}')
    if down_attn != up_attn:
      problems.append(f'attention levels differ between down_block_types {down} and '
                      f'up_block_types {up}: ADM has attention at the same rates on both paths')
  kinds = {r.split(': ')[1] for r in resampling}
  if len(kinds) > 1:
    problems.append(f'resampling mixes ResBlocks and convolutions ({sorted(resampling)}): '
                    'ADM resamples one way everywhere (resblock_updown)')
  updown = kinds == {'resnet'} or (not kinds and _cfg(c, 'downsample_type') == 'resnet')
  if 'conv' in kinds:
    _require(problems, c, 'downsample_padding', (1,), ' (a stride-2 conv padded on every side)')

  size = _cfg(c, 'sample_size')
  if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
    size = size[0]
  if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
    problems.append(f'sample_size={_cfg(c, "sample_size")!r}: a positive int (square inputs) '
                    'is required')
  in_ch, out_ch = _cfg(c, 'in_channels'), _cfg(c, 'out_channels')
  if out_ch not in (in_ch, 2 * in_ch):
    problems.append(f'out_channels={out_ch!r}: must be in_channels ({in_ch}, epsilon) or twice '
                    'it (epsilon and a learned variance)')
  layers_ = _cfg(c, 'layers_per_block')
  if not isinstance(layers_, int) or layers_ < 1:
    problems.append(f'layers_per_block={layers_!r}: must be an int >= 1')
  groups = _cfg(c, 'norm_num_groups')
  if not isinstance(groups, int) or groups < 1:
    problems.append(f'norm_num_groups={groups!r}: must be an int')
  attn_groups = _cfg(c, 'attn_norm_num_groups')
  mid_groups = attn_groups if attn_groups is not None else (
      groups if _cfg(c, 'resnet_time_scale_shift') == 'default' else None)
  if mid_groups != groups:
    problems.append(f'attn_norm_num_groups={attn_groups!r}: the middle attention would normalise '
                    f'with {mid_groups!r} groups, ADM with norm_num_groups={groups!r} (with '
                    "'scale_shift' diffusers needs it set explicitly)")
  c0 = channels[0] if channels else 0
  if _cfg(c, 'time_embedding_dim') not in (None, 4 * c0):
    problems.append(f'time_embedding_dim={_cfg(c, "time_embedding_dim")!r}: only None (= 4 x '
                    f'{c0}) is supported')
  mult = [_number(v / c0) for v in channels] if c0 else []
  if any(int(m * c0) != v for m, v in zip(mult, channels)):
    problems.append(f'block_out_channels={channels}: not int(mult * {c0}) for any multipliers')
  head_dim = _cfg(c, 'attention_head_dim')
  if problems:
    raise ConversionError("unsupported diffusers UNet2DModel config; lees_jax's ADM "
                          '(lees_jax.convert.diffusers_adm) cannot represent:\n  - '
                          + '\n  - '.join(problems))
  model_config = ml_collections.ConfigDict(dict(
      name='adm_unet', image_size=int(size), in_channels=int(in_ch), model_channels=int(c0),
      num_res_blocks=int(layers_),
      attention_resolutions=tuple(2 ** i for i, a in enumerate(down_attn) if a),
      channel_mult=tuple(mult), dropout=float(_cfg(c, 'dropout') or 0.0),
      num_classes=int(_cfg(c, 'num_class_embeds') or 0), learn_sigma=out_ch == 2 * in_ch,
      num_heads=1, num_head_channels=-1 if head_dim is None else int(head_dim),
      num_heads_upsample=-1,
      use_scale_shift_norm=_cfg(c, 'resnet_time_scale_shift') == 'scale_shift',
      resblock_updown=bool(updown), use_new_attention_order=True, time_scale=1.0,
      num_groups=int(groups), norm_eps=float(_cfg(c, 'norm_eps')), dtype='float32'))
  from lees_jax import models
  try:
    models.spec_from_config(model_config)
  except ValueError as e:  # e.g. attention_head_dim does not divide a level's channels
    raise ConversionError(f'the diffusers config maps to an invalid lees_jax ADM: {e}') from e
  return model_config


def _number(v: float):
  return int(v) if float(v).is_integer() else float(v)


def diffusers_modules(spec) -> dict[str, str]:
  """Our module name -> the diffusers module it comes from (``down_blocks.1.attentions.0``)."""
  from lees_jax.models import adm
  levels = len(spec.channel_mult)
  out = {}
  for op in adm.adm_layout(spec):
    if not op.name:
      continue
    if op.name.startswith('mid_'):
      out[op.name] = {'mid_res_0': 'mid_block.resnets.0', 'mid_attn': 'mid_block.attentions.0',
                      'mid_res_1': 'mid_block.resnets.1'}[op.name]
      continue
    side = 'down' if op.name.startswith('down_') else 'up'
    block = f'{side}_blocks.{op.level if side == "down" else levels - 1 - op.level}'
    if op.resample or op.kind in ('down', 'up'):
      out[op.name] = f'{block}.{side}samplers.0'
    else:
      out[op.name] = f'{block}.{"resnets" if op.kind == "res" else "attentions"}.{op.index}'
  return out


def diffusers_to_params(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]):
  """(model_config, params) of an ADM-style UNet2DModel: params a nested dict of float32 numpy
  arrays with exactly the structure of ``models.init_params``. Raises `ConversionError` naming
  every unsupported config field, or every offending tensor."""
  import jax
  from flax import traverse_util

  from lees_jax import models

  model_config = model_config_from_diffusers(diffusers_config)
  spec = models.spec_from_config(model_config)
  model = models.build_model(model_config)
  abstract = traverse_util.flatten_dict(
      jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0))))
  modules = diffusers_modules(spec)
  tensors, _ = normalize_names(state_dict)
  wanted, sources = {}, {}
  for path, leaf in sorted(abstract.items()):
    module, *rest, name = path
    ours = '/'.join(path)
    shape = layout.torch_shape(tuple(leaf.shape), name)
    if module in _TOP:
      sources[path] = [f'{_TOP[module]}.{_LEAF[name]}']
    elif rest == ['qkv']:  # to_q, to_k, to_v -> our fused qkv, [q | k | v]
      shape = (shape[0] // 3,) + shape[1:]
      sources[path] = [f'{modules[module]}.{p}.{_LEAF[name]}' for p in ('to_q', 'to_k', 'to_v')]
    else:
      sub = {'norm': 'group_norm', 'proj_out': 'to_out.0', 'op': 'conv', 'conv': 'conv',
             **_RES}[rest[0]]
      sources[path] = [f'{modules[module]}.{sub}.{_LEAF[name]}']
    for src in sources[path]:
      wanted[src] = Wanted(shape, ours)
  good = gather(tensors, wanted, f'ADM ({_summary(spec)})')
  flat = {}
  for path, names in sources.items():
    arrays = [layout.to_flax(good[n], path[-1]) for n in names]
    flat[path] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)
  return model_config, traverse_util.unflatten_dict(flat)


def _summary(spec) -> str:
  return (f'model_channels={spec.model_channels}, channel_mult={spec.channel_mult}, '
          f'num_res_blocks={spec.num_res_blocks}, attention at rates '
          f'{spec.attention_resolutions}, {spec.num_classes} classes')
