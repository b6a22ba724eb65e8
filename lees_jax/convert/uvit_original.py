"""U-ViT's original checkpoints (baofff/U-ViT ``libs/uvit.py``) -> our U-ViT (`models.uvit`).

The released files (``cifar10_uvit_small.pth``, ``celeba64_uvit_small.pth``,
``imagenet64_uvit_mid.pth``, ``imagenet64_uvit_large.pth``; Google Drive links in U-ViT's
README) are plain ``torch.save`` state dicts of ``UViT`` (eval.py loads them with
``nnet.load_state_dict(torch.load(path))``); a train.py checkpoint directory
(``<step>.ckpt/``) holds ``nnet.pth`` and ``nnet_ema.pth`` of the same form. Files are read
with the code-free `lees_jax.torch_archive`: nothing in them runs.

A state dict does not record everything (the heads, ``mlp_ratio`` is visible but heads are
not), so the network is given as U-ViT's configs give it (``config.nnet``): the name of a
public configuration (`models.uvit.PUBLIC_CONFIGS`, e.g. ``celeba64_uvit_small``) or a JSON /
dict of ``UViT.__init__``'s arguments (``img_size, patch_size, in_chans, embed_dim, depth,
num_heads, mlp_ratio, qkv_bias, mlp_time_embed, num_classes, conv``; ``name='uvit'`` and the
memory setting ``use_checkpoint`` are accepted and ignored). Strict: unknown or unsupported
arguments are refused by name, then every missing, unexpected, wrongly shaped, non-float or
non-finite tensor is reported together.

Public API: `original_name`, `parse_model_config`, `original_to_params`, `convert_file`,
`UVIT_ARCH`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import layout, sources, strict
from lees_jax.convert.errors import ConversionError, tensor_mismatch

UVIT_ARCH = 'uvit'  # --arch of an original U-ViT file
SUFFIXES = ('.pt', '.pth')
# UViT.__init__ arguments we represent; the others must keep the values every config uses.
_FIELDS = ('img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'num_heads', 'mlp_ratio',
           'qkv_bias', 'mlp_time_embed', 'num_classes', 'conv', 'null_label')
_FIXED = {'qk_scale': None, 'skip': True, 'norm_layer': None}  # None: torch's nn.LayerNorm
_IGNORED = ('name', 'use_checkpoint')  # get_nnet's key; gradient checkpointing (memory only)

# Our top-level parameter -> the original module; block sub-modules likewise.
_TOP = {'patch_embed': 'patch_embed.proj', 'time_embed_0': 'time_embed.0',
        'time_embed_2': 'time_embed.2', 'label_emb': 'label_emb', 'norm': 'norm',
        'decoder_pred': 'decoder_pred', 'final_layer': 'final_layer'}
_BLOCK = {'norm1': 'norm1', 'qkv': 'attn.qkv', 'proj': 'attn.proj', 'norm2': 'norm2',
          'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2', 'skip_linear': 'skip_linear'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def original_name(path: tuple[str, ...]) -> str:
  """The original tensor of our parameter at ``path``:
  ('out_blocks_2', 'qkv', 'kernel') -> 'out_blocks.2.attn.qkv.weight'."""
  if path == ('pos_embed',):
    return 'pos_embed'
  module, *rest, leaf = path
  if module in _TOP and not rest:
    return f'{_TOP[module]}.{_LEAF[leaf]}'
  if len(rest) == 1 and rest[0] in _BLOCK:
    if module == 'mid_block':
      block = 'mid_block'
    elif module.startswith(('in_blocks_', 'out_blocks_')):
      side, _, index = module.rpartition('_')
      block = f'{side}.{index}'
    else:
      block = None
    if block is not None:
      return f'{block}.{_BLOCK[rest[0]]}.{_LEAF[leaf]}'
  raise AssertionError(f'no original U-ViT name for parameter {"/".join(path)}')


def parse_model_config(model_config) -> ml_collections.ConfigDict:
  """Our ``config.model`` of ``--model_config``: a `PUBLIC_CONFIGS` name, a JSON object or a
  mapping of U-ViT's ``config.nnet`` fields (missing fields: ``UViT.__init__``'s defaults)."""
  from lees_jax.models import uvit
  if isinstance(model_config, str):
    text = model_config.strip()
    if text in uvit.PUBLIC_CONFIGS:
      values = dict(uvit.PUBLIC_CONFIGS[text])
    else:
      try:
        values = json.loads(text)
      except json.JSONDecodeError as e:
        raise ConversionError(
            f'--model_config={model_config!r} is neither a public U-ViT configuration '
            f'({", ".join(sorted(uvit.PUBLIC_CONFIGS))}) nor a JSON object of config.nnet fields '
            f'({e})') from e
  else:
    values = dict(model_config or {})
  if not isinstance(values, dict):
    raise ConversionError(f'--model_config must be a JSON object, got {type(values).__name__}')
  problems = []
  if values.get('name', 'uvit') != 'uvit':
    problems.append(f"name={values['name']!r} (only U-ViT's 'uvit' network; 'uvit_t2i' is not "
                    'supported)')
  for key, want in _FIXED.items():
    if key in values and values[key] != want:
      problems.append(f'{key}={values[key]!r} (only {want!r} is supported)')
  unknown = sorted(k for k in values if k not in _FIELDS + tuple(_FIXED) + _IGNORED)
  if unknown:
    problems.append(f'unknown field(s) {unknown} (U-ViT config.nnet fields: {list(_FIELDS)})')
  if problems:
    raise ConversionError('cannot import a U-ViT with --model_config:\n  - '
                          + '\n  - '.join(problems))
  fields = dataclasses.asdict(uvit.UViTSpec()) | {k: values[k] for k in _FIELDS if k in values}
  config = ml_collections.ConfigDict(dict(name='uvit', **fields, dtype='float32'))
  try:
    uvit.UViTSpec.from_config(config)
  except (TypeError, ValueError) as e:
    raise ConversionError(f'--model_config describes an invalid U-ViT: {e}') from e
  return config


def original_to_params(state_dict: Mapping[str, Any], model_config):
  """Maps an original ``UViT().state_dict()`` (numpy arrays) onto our parameter tree.

  Returns (config.model, params): params a nested dict of float32 numpy arrays with exactly
  the structure of ``models.init_params`` for the network ``model_config`` describes (see
  `parse_model_config`). Raises `ConversionError` naming every missing / unexpected / wrongly
  shaped / non-float / non-finite tensor.
  """
  import jax
  from flax import traverse_util

  from lees_jax import models

  config = parse_model_config(model_config)
  spec = models.spec_from_config(config)
  model = models.build_model(config)
  abstract = traverse_util.flatten_dict(
      jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0))))
  wanted = {original_name(path): (path, layout.torch_shape(tuple(leaf.shape), path[-1]))
            for path, leaf in abstract.items()}

  missing, wrong, flat = [], [], {}
  for name, (path, shape) in sorted(wanted.items()):
    ours = '/'.join(path)
    if name not in state_dict:
      missing.append(f'{name} (shape {shape}, for {ours})')
      continue
    value, problem = strict.check(name, state_dict[name], shape, ours)
    if problem:
      wrong.append(problem)
    else:
      flat[path] = layout.to_flax(value, path[-1])
  unexpected = sorted(set(state_dict) - set(wanted))
  if missing or wrong or unexpected:
    def described(n):
      v = state_dict[n]
      return f'{n} ({f"shape {tuple(v.shape)}" if isinstance(v, np.ndarray) else type(v).__name__})'
    raise tensor_mismatch(
        f'U-ViT (img_size {spec.img_size}, patch_size {spec.patch_size}, embed_dim '
        f'{spec.embed_dim}, depth {spec.depth}: {spec.num_side} + 1 + {spec.num_side} blocks, '
        f'num_classes {spec.num_classes}, mlp_time_embed {spec.mlp_time_embed}, qkv_bias '
        f'{spec.qkv_bias}, conv {spec.conv}; from --model_config)',
        missing=missing, wrong=wrong, unexpected=[described(n) for n in unexpected])
  return config, traverse_util.unflatten_dict(flat)


def read_state_dict(path: str) -> dict[str, Any]:
  """The state dict in an original U-ViT file (nnet.pth, nnet_ema.pth or a released .pth)."""
  return dict(sources.load_original_file(
      path, what='a U-ViT state dict',
      where_to_get='. The released U-ViT checkpoints (e.g. celeba64_uvit_small.pth) are linked '
                   'from https://github.com/baofff/U-ViT#pretrained-models; download one and '
                   'pass its local path'))


def convert_file(path: str, model_config):
  """Reads and converts an original U-ViT file: (config.model, params, diffusion config,
  metadata) for `checkpoints.save_backbone`."""
  from lees_jax import models, sde
  from lees_jax.convert import sources

  if not str(path).endswith(SUFFIXES):
    raise ConversionError(f'--source={path}: an original U-ViT checkpoint is a '
                          f'{" or ".join(SUFFIXES)} file')
  state_dict = read_state_dict(path)
  source_dtypes = sources._dtype_counts(  # pylint: disable=protected-access
      {k: v for k, v in state_dict.items() if isinstance(v, np.ndarray)})
  config, params = original_to_params(state_dict, model_config)
  del state_dict
  metadata = dict(
      source=os.path.abspath(path),
      source_format='baofff/U-ViT libs/uvit.py UViT state dict',
      source_revision=None,
      source_files=dict(weights=os.path.basename(path)),
      source_model_config=(model_config if isinstance(model_config, str)
                           else json.dumps(dict(model_config))),
      weights_sha256=sources._sha256(path),  # pylint: disable=protected-access
      model_output='eps',
      diffusion_from="U-ViT's sde.VPSDE (beta 0.1 -> 20 over t in [0, 1]; the network sees 999 t)",
      source_dtypes=source_dtypes,
      num_params=models.count_params(params),
      converted_by='lees_jax.convert')
  return config, params, ml_collections.ConfigDict(sde.DIFFUSION_CONFIG), metadata
