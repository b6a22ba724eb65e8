"""The diffusers ``AutoencoderKL`` config and tensors -> our VAE (`lees_jax.models.vae`).

The layout is the ``vae/`` folder of a pipeline (e.g. ``facebook/DiT-XL-2-256``) or a VAE repo
(``stabilityai/sd-vae-ft-ema`` / ``-mse``) as ``save_pretrained`` writes it.

Attention names: diffusers' current ``to_q/to_k/to_v/to_out.0`` and the legacy
``query/key/value/proj_attn`` of the pre-0.13 ``AttentionBlock`` (which the hub's older VAE
files still carry) both import; diffusers' loader renames the legacy names at the two mid-block
attention paths (``_fix_state_dict_keys_on_load``) and so do we, there only. A tensor under both
names is refused. Attention weights stored as 1x1 conv kernels ((C, C, 1, 1)) are refused as
wrongly shaped, as ``AutoencoderKL.from_pretrained`` refuses them (only diffusers' converter of
original-SD single files, whose names differ entirely, squeezes them).

Config: every field of ``AutoencoderKL.__init__`` is checked (absent keys at diffusers'
default); a value our `VAESpec` cannot represent is refused by field name, all together.
``force_upcast`` (a half-precision pipeline hint) and keys ``AutoencoderKL`` does not take
(diffusers ignores those too) change nothing in the network: `ignored_config_keys` lists them
for the caller to record. Tensors: strict like the DiT importer, every missing, unexpected,
wrongly shaped, non-floating or non-finite tensor is reported by name, together.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import strict
from lees_jax.convert.errors import ConversionError, tensor_mismatch

# Defaults of AutoencoderKL.__init__ (diffusers 0.42): what an absent key means.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',),
    up_block_types=('UpDecoderBlock2D',), block_out_channels=(64,), layers_per_block=1,
    act_fn='silu', latent_channels=4, norm_num_groups=32, sample_size=32, scaling_factor=0.18215,
    shift_factor=None, latents_mean=None, latents_std=None, force_upcast=True,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
# Known fields that do not change the float32 network we build.
IGNORED_FIELDS = ('force_upcast',)
ATTENTION_PATHS = ('encoder.mid_block.attentions.0', 'decoder.mid_block.attentions.0')
_LEGACY = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def is_vae_config(config: Mapping[str, Any]) -> bool:
  return config.get('_class_name') == 'AutoencoderKL'


def ignored_config_keys(config: Mapping[str, Any]) -> list[str]:
  """Keys of ``config`` present but without effect on our model (to record with the import)."""
  return sorted(k for k in config if not k.startswith('_')
                and (k not in DIFFUSERS_DEFAULTS or k in IGNORED_FIELDS))


def model_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The model ConfigDict (``name='sd_vae'``, `VAESpec` fields, dtype) of a diffusers
  ``AutoencoderKL`` config; `ConversionError` naming every field it cannot represent."""
  from lees_jax.models import vae

  c = dict(diffusers_config)
  problems: list[str] = []

  def get(key):
    return c[key] if key in c else DIFFUSERS_DEFAULTS[key]

  def bad(key, why):
    origin = '' if key in c else ' (absent from config.json: diffusers default)'
    problems.append(f'{key}={get(key)!r}{origin}: {why}')

  if '_class_name' in c and c['_class_name'] != 'AutoencoderKL':
    problems.append(f"_class_name={c['_class_name']!r}: only 'AutoencoderKL' is supported")
  boc = get('block_out_channels')
  levels = len(boc) if isinstance(boc, (list, tuple)) else None
  for key, kind in (('down_block_types', 'DownEncoderBlock2D'),
                    ('up_block_types', 'UpDecoderBlock2D')):
    types = get(key)
    if not isinstance(types, (list, tuple)) or any(t != kind for t in types):
      bad(key, f'only a list of {kind!r} blocks (one per level) is supported')
    elif levels is not None and len(types) != levels:
      bad(key, f'{len(types)} entries, but block_out_channels has {levels}: one {kind} per level '
               'is supported')
  act = get('act_fn')
  if not isinstance(act, str) or act.lower() not in ('silu', 'swish'):
    bad('act_fn', "only 'silu' (or 'swish', the same) is supported")
  for key in ('shift_factor', 'latents_mean', 'latents_std'):
    if get(key) is not None:
      bad(key, 'only None is supported (latents are mean * scaling_factor here)')
  sf = get('scaling_factor')  # VAESpec checks it (and the ints, bools and GroupNorm widths)
  size = get('sample_size')
  fields = dict(
      in_channels=get('in_channels'), out_channels=get('out_channels'),
      latent_channels=get('latent_channels'),
      block_out_channels=tuple(boc) if isinstance(boc, (list, tuple)) else boc,
      layers_per_block=get('layers_per_block'), norm_num_groups=get('norm_num_groups'),
      sample_size=tuple(size) if isinstance(size, list) else size,
      scaling_factor=float(sf) if type(sf) is int else sf,
      use_quant_conv=get('use_quant_conv'), use_post_quant_conv=get('use_post_quant_conv'),
      mid_block_add_attention=get('mid_block_add_attention'))
  try:
    spec = vae.VAESpec(**fields)
  except ValueError as e:  # names the fields (positive ints, group divisibility, bools, ...)
    problems.extend(str(e).removeprefix('invalid VAE architecture: ').split('; '))
    spec = None
  if problems:
    raise ConversionError("unsupported diffusers AutoencoderKL config; lees_jax's VAE cannot "
                          'represent:\n  - ' + '\n  - '.join(problems))
  return spec.to_config()


# ---------------------------------------------------------------------------------------------
# Tensor names.
# ---------------------------------------------------------------------------------------------

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
_ATTN = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v', 'proj_out': 'to_out.0'}


def diffusers_name(path: tuple[str, ...]) -> str:
  """The diffusers tensor name of our parameter at ``path``, e.g. ('encoder', 'down_1',
  'downsample', 'conv', 'kernel') -> 'encoder.down_blocks.1.downsamplers.0.conv.weight'."""
  *modules, leaf = path
  out = []
  for m in modules:
    if (g := re.fullmatch(r'(down|up)_(\d+)', m)):
      out.append(f'{g.group(1)}_blocks.{g.group(2)}')
    elif (g := re.fullmatch(r'res_(\d+)', m)):
      out.append(f'resnets.{g.group(1)}')
    elif m == 'mid':
      out.append('mid_block')
    elif m == 'attn':
      out.append('attentions.0')
    elif m == 'downsample':
      out.append('downsamplers.0')
    elif m == 'upsample':
      out.append('upsamplers.0')
    elif m == 'norm_out':
      out.append('conv_norm_out')
    elif out and out[-1] == 'attentions.0':
      out.append(_ATTN[m])
    else:
      out.append(m)
  return '.'.join(out + [_LEAF[leaf]])


def _normalize(state_dict: Mapping[str, Any]):
  """Legacy attention names -> current ones, at the mid-block attention paths only.

  Returns (renamed dict, {new name: stored name}, scheme 'old' | 'new' | 'mixed' | 'none')."""
  out: dict[str, Any] = {}
  stored_as: dict[str, str] = {}
  clashes, n_old, n_new = [], 0, 0
  pattern = re.compile(r'^(' + '|'.join(re.escape(p) for p in ATTENTION_PATHS)
                       + r')\.(query|key|value|proj_attn|to_q|to_k|to_v|to_out\.0)\.(weight|bias)$')
  for name, value in state_dict.items():
    m = pattern.match(name)
    if m and m.group(2) in _LEGACY:
      new = f'{m.group(1)}.{_LEGACY[m.group(2)]}.{m.group(3)}'
      n_old += 1
      if new in state_dict:
        clashes.append(f'{name} and {new}')
      out[new], stored_as[new] = value, name
    else:
      n_new += bool(m)
      out.setdefault(name, value)
  if clashes:
    raise ConversionError('the checkpoint holds attention tensors under both the legacy and the '
                          'current name:\n  - ' + '\n  - '.join(clashes))
  scheme = 'mixed' if n_old and n_new else 'old' if n_old else 'new' if n_new else 'none'
  return out, stored_as, scheme


def attention_names(state_dict: Mapping[str, Any]) -> str:
  """Which attention naming the checkpoint uses: 'old' (query/key/value/proj_attn), 'new'
  (to_q/to_k/to_v/to_out.0), 'mixed' or 'none' (no mid-block attention)."""
  return _normalize(state_dict)[2]


def diffusers_to_params(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]):
  """Maps a diffusers AutoencoderKL state dict onto our parameter tree.

  Returns (model_config, params): the ``name='sd_vae'`` ConfigDict (`build_vae` builds the
  module) and a nested dict of float32 numpy arrays with exactly the structure of
  `vae.init_vae_params`. Raises `ConversionError` for an unsupported config, or listing every
  missing / unexpected / wrongly shaped / non-floating / non-finite tensor.
  """
  import jax
  from flax import traverse_util

  from lees_jax.models import vae

  model_config = model_config_from_diffusers(diffusers_config)
  model = vae.build_vae(model_config)
  abstract = jax.eval_shape(lambda: vae.init_vae_params(model, jax.random.PRNGKey(0)))
  tensors, stored_as, _ = _normalize(state_dict)

  def shown(name):  # as the checkpoint spells it
    return f'{stored_as[name]} (= {name})' if name in stored_as else name

  flat, used, missing, wrong = strict.collect_leaves(
      abstract, tensors, diffusers_name, shown=shown,
      shape_note=lambda want, array: (' (a 1x1 conv kernel: diffusers, too, loads attention '
                                      'projections only as Linear weights)'
                                      if len(want) == 2 and array.ndim > 2 else ''))
  unexpected = sorted(set(tensors) - used)
  if missing or wrong or unexpected:
    raise tensor_mismatch(
        f'VAE (block_out_channels={tuple(model_config.block_out_channels)}, layers_per_block='
        f'{model_config.layers_per_block}, latent_channels={model_config.latent_channels}, '
        f'mid_block_add_attention={model_config.mid_block_add_attention})',
        missing=missing, wrong=wrong,
        unexpected=[f'{shown(n)} (shape {tuple(np.shape(tensors[n]))})' for n in unexpected])
  return model_config, traverse_util.unflatten_dict(flat)
