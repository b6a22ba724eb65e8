"""The diffusers ``DiTTransformer2DModel`` config and tensors -> our DiT (`lees_jax.models.dit`).

The layout is the ``transformer/`` folder of ``facebook/DiT-XL-2-256`` as ``save_pretrained``
writes it. Its config may name the class ``DiTTransformer2DModel`` or the older
``Transformer2DModel`` with ``norm_type='ada_norm_zero'`` (diffusers builds a
DiTTransformer2DModel from either, with DiTTransformer2DModel's defaults for absent keys).

diffusers keeps a copy of the timestep and label embedding in every block
(``transformer_blocks.<i>.norm1.emb``; the final layer uses block 0's); the original network,
and ours, has one. The copies must be equal -- diffusers' conversion script writes one tensor
28 times -- and block 0's is imported; a copy that differs is refused by name, since our
network could not reproduce it.

Strict like the UNet importer: every unsupported config field, and every missing, unexpected,
wrongly shaped or non-finite tensor, is reported together.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import strict
from lees_jax.convert.errors import ConversionError, tensor_mismatch

# Defaults of DiTTransformer2DModel.__init__ (diffusers 0.42): what an absent key means.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=None,
    num_layers=28, dropout=0.0, norm_num_groups=32, attention_bias=True, sample_size=32,
    patch_size=2, activation_fn='gelu-approximate', num_embeds_ada_norm=1000,
    upcast_attention=False, norm_type='ada_norm_zero', norm_elementwise_affine=False,
    norm_eps=1e-5)
# Keys of the older Transformer2DModel config that DiTTransformer2DModel does not take: the
# features they switch on are absent from DiT, so only their 'off' values are accepted.
LEGACY_OFF = dict(cross_attention_dim=None, num_vector_embeds=None, only_cross_attention=False,
                  double_self_attention=False, caption_channels=None,
                  use_additional_conditions=None)
# Other keys change nothing in the network diffusers builds (norm_num_groups is unused by DiT,
# upcast_attention matters only in half precision; Transformer2DModel options such as
# use_linear_projection or interpolation_scale are not passed to DiT); `convert` records the
# keys it ignored.

# What diffusers' DiT uses where the original code differs (see lees_jax.models.dit).
DIFFUSERS_TIME_FREQ_SHIFT = 1


def is_dit_config(config: Mapping[str, Any]) -> bool:
  """Whether diffusers would build a DiTTransformer2DModel from this config.json."""
  cls = config.get('_class_name')
  return cls == 'DiTTransformer2DModel' or (
      cls == 'Transformer2DModel' and config.get('norm_type') == 'ada_norm_zero')


def _positive_int(problems: list, key: str, value) -> bool:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    problems.append(f'{key}={value!r}: must be a positive int')
    return False
  return True


def model_config_from_diffusers(diffusers_config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The `config.model` of the DiT a diffusers config describes (every problem reported)."""
  c = dict(diffusers_config)
  get = lambda k: c[k] if k in c else DIFFUSERS_DEFAULTS[k]  # noqa: E731
  problems: list[str] = []
  if not is_dit_config(c):
    problems.append(f"_class_name={c.get('_class_name')!r} (norm_type={c.get('norm_type')!r}): "
                    "only DiTTransformer2DModel, or Transformer2DModel with norm_type "
                    "'ada_norm_zero', is a DiT")
  # The original block: tanh-GELU MLP, biased q/k/v, LayerNorms without affine parameters, and
  # no dropout (our blocks have none to train with).
  fixed = dict(norm_type='ada_norm_zero', activation_fn='gelu-approximate', attention_bias=True,
               norm_elementwise_affine=False, dropout=0.0)
  for key, want in fixed.items():
    if get(key) != want:
      origin = '' if key in c else ' (absent from config.json: diffusers default)'
      problems.append(f'{key}={get(key)!r}{origin}: only {want!r} is supported (DiT)')
  for key, off in LEGACY_OFF.items():
    if c.get(key, off) != off:
      problems.append(f'{key}={c[key]!r}: only {off!r} is supported (DiT has no such feature)')

  ints = {k: get(k) for k in ('num_attention_heads', 'attention_head_dim', 'in_channels',
                              'num_layers', 'sample_size', 'patch_size', 'num_embeds_ada_norm')}
  ok = all([_positive_int(problems, k, v) for k, v in ints.items()])
  out_channels = get('out_channels')
  learn_sigma = None
  if ok:
    if out_channels in (None, ints['in_channels']):
      learn_sigma = False
    elif out_channels == 2 * ints['in_channels']:
      learn_sigma = True
    else:
      problems.append(f'out_channels={out_channels!r}: only in_channels ({ints["in_channels"]}) or '
                      f'2 * in_channels (epsilon and a learned variance) is supported')
  eps = get('norm_eps')
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
    problems.append(f'norm_eps={eps!r}: must be a positive number')
  if problems:
    raise ConversionError("unsupported diffusers DiT config; lees_jax's DiT cannot represent:\n  - "
                          + '\n  - '.join(problems))

  model_config = ml_collections.ConfigDict(dict(
      name='dit', input_size=ints['sample_size'], patch_size=ints['patch_size'],
      in_channels=ints['in_channels'],
      hidden_size=ints['num_attention_heads'] * ints['attention_head_dim'],
      depth=ints['num_layers'], num_heads=ints['num_attention_heads'], mlp_ratio=4.0,
      num_classes=ints['num_embeds_ada_norm'], learn_sigma=learn_sigma,
      class_dropout_prob=0.1,  # LabelEmbedding's: diffusers configs do not record it
      time_freq_shift=float(DIFFUSERS_TIME_FREQ_SHIFT), mlp_norm_eps=float(eps), dtype='float32'))
  from lees_jax import models
  try:
    models.spec_from_config(model_config)
  except ValueError as e:
    raise ConversionError(f'the diffusers config maps to an invalid lees_jax DiT: {e}') from e
  return model_config


# ---------------------------------------------------------------------------------------------
# Tensor names.
# ---------------------------------------------------------------------------------------------

_EMB = 'transformer_blocks.0.norm1.emb'
_TOP = {'patch_embed': 'pos_embed.proj', 't_embed_in': f'{_EMB}.timestep_embedder.linear_1',
        't_embed_out': f'{_EMB}.timestep_embedder.linear_2',
        'y_embed': f'{_EMB}.class_embedder.embedding_table', 'final_modulation': 'proj_out_1',
        'final_linear': 'proj_out_2'}
_BLOCK = {'modulation': 'norm1.linear', 'query': 'attn1.to_q', 'key': 'attn1.to_k',
          'value': 'attn1.to_v', 'attn_out': 'attn1.to_out.0', 'mlp_in': 'ff.net.0.proj',
          'mlp_out': 'ff.net.2'}
_LEAF = {'kernel': 'weight', 'embedding': 'weight', 'bias': 'bias'}
_EMB_COPY_RE = re.compile(r'^transformer_blocks\.(\d+)\.norm1\.emb\.(.+)$')
# diffusers' PatchEmbed keeps the fixed position embedding as a non-persistent buffer; a file
# that holds it anyway must hold ours.
POS_EMBED_KEY = 'pos_embed.pos_embed'


def diffusers_name(path: tuple[str, ...]) -> str:
  """The diffusers tensor name of our parameter at ``path``, e.g. ('block_3', 'query', 'kernel')
  -> 'transformer_blocks.3.attn1.to_q.weight'."""
  module, *rest, leaf = path
  if module in _TOP and not rest:
    return f'{_TOP[module]}.{_LEAF[leaf]}'
  m = re.fullmatch(r'block_(\d+)', module)
  if m and len(rest) == 1 and rest[0] in _BLOCK:
    return f'transformer_blocks.{m.group(1)}.{_BLOCK[rest[0]]}.{_LEAF[leaf]}'
  raise AssertionError(f'no diffusers name for parameter {"/".join(path)}')


def _check_embedding_copies(tensors: Mapping[str, Any], depth: int, problems: list, used: set):
  """Every block's copy of the timestep / label embedding must equal block 0's (imported)."""
  for name in sorted(tensors):
    m = _EMB_COPY_RE.match(name)
    if not m or m.group(1) == '0' or int(m.group(1)) >= depth:
      continue
    reference = f'{_EMB}.{m.group(2)}'
    if reference not in tensors:
      continue  # reported as missing
    used.add(name)
    a, b = np.asarray(tensors[name]), np.asarray(tensors[reference])
    if a.shape != b.shape or not np.array_equal(a, b):
      problems.append(f'{name}: differs from {reference} (diffusers keeps one copy of the timestep '
                      'and label embedding per block; our DiT, like the original, has one)')


def diffusers_to_params(state_dict: Mapping[str, Any], diffusers_config: Mapping[str, Any]):
  """Maps a diffusers DiTTransformer2DModel state dict onto our parameter tree.

  Returns (model_config, params): the `config.model` ConfigDict and a nested dict of float32
  numpy arrays with exactly the structure of ``models.init_params`` for that config. Raises
  `ConversionError` listing every missing / unexpected / wrongly shaped / non-floating /
  non-finite tensor and every embedding copy that differs from block 0's.
  """
  import jax
  from flax import traverse_util

  from lees_jax import models
  from lees_jax.models import dit

  model_config = model_config_from_diffusers(diffusers_config)
  spec = models.spec_from_config(model_config)
  model = models.build_model(model_config)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  flat, used, missing, wrong = strict.collect_leaves(abstract, state_dict, diffusers_name)
  copies = []
  _check_embedding_copies(state_dict, spec.depth, copies, used)
  if POS_EMBED_KEY in state_dict:
    used.add(POS_EMBED_KEY)
    stored = np.asarray(state_dict[POS_EMBED_KEY], np.float32)
    fixed = dit.position_embedding(spec.grid, spec.hidden_size)[None]
    if stored.shape != fixed.shape or not np.allclose(stored, fixed, atol=1e-6):
      wrong.append(f'{POS_EMBED_KEY}: shape {stored.shape}, not the fixed 2-D sin-cos embedding '
                   f'{fixed.shape} our DiT adds')
  unexpected = sorted(set(state_dict) - used)
  if missing or wrong or copies or unexpected:
    raise tensor_mismatch(
        f'DiT (hidden_size {spec.hidden_size}, depth {spec.depth}, patch {spec.patch_size}, '
        f'input {spec.input_size}, {spec.num_classes} classes)',
        missing=missing, wrong=wrong, extra=[('embedding copies that differ', copies)],
        unexpected=[f'{n} (shape {tuple(np.shape(state_dict[n]))})' for n in unexpected])
  return model_config, traverse_util.unflatten_dict(flat)
