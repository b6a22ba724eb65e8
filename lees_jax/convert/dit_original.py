"""DiT's original checkpoints (facebookresearch/DiT ``models.py``) -> our DiT (`models.dit`).

The released files, ``DiT-XL-2-256x256.pt`` and ``DiT-XL-2-512x512.pt`` (from
`RELEASE_URL`), are plain ``torch.save`` state dicts of the EMA weights; a checkpoint written by
DiT's ``train.py`` is a dict ``{'model', 'ema', 'opt', 'args'}``, of which the ``ema`` weights
are imported (as DiT's own ``download.find_model`` does). Files are read with the code-free
`lees_jax.torch_archive`: nothing in them runs.

A state dict does not say how many attention heads the network has, so the architecture is
given, as DiT's scripts take it: ``arch='DiT-XL/2'`` (any paper size and patch of
`dit.dit_size`, with optional overrides for other sizes, e.g.
``'DiT-S/2,hidden_size=64,depth=3,num_heads=4'``). Everything else comes from the tensors: the
input size from the fixed ``pos_embed`` buffer ((input_size / patch)^2 tokens), the input
channels from the patch convolution, the number of classes from the label table (one row more
than the classes: the null class of classifier-free guidance), ``learn_sigma`` from the rows of
the output layer. The original's conventions are ours: frequencies divided by 128
(``time_freq_shift=0``) and eps 1e-6 in every LayerNorm (``mlp_norm_eps=1e-6``).

Strict: an ``arch`` that contradicts the file's width, depth, patch or MLP width is refused
with what the file looks like; then every missing, unexpected, wrongly shaped, non-float or
non-finite tensor is reported together by name, and a ``pos_embed`` that is not our fixed
sin-cos embedding is refused.

Public API: `original_to_params`, `read_checkpoint`, `convert_file`, `parse_arch`,
`original_name`, `RELEASE_URL`, `RELEASED_FILES`, `SUFFIXES`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import ml_collections
import ml_dtypes
import numpy as np

from lees_jax.convert import layout, sources, strict
from lees_jax.convert.errors import ConversionError, tensor_mismatch

RELEASE_URL = 'https://dl.fbaipublicfiles.com/DiT/models/'
RELEASED_FILES = ('DiT-XL-2-256x256.pt', 'DiT-XL-2-512x512.pt')
SUFFIXES = ('.pt', '.pth')  # a --source ending so is an original DiT checkpoint
# The original's conventions (see lees_jax.models.dit): TimestepEmbedder divides the
# frequencies by 128, and every LayerNorm of DiTBlock has eps 1e-6.
TIME_FREQ_SHIFT = 0.0
MLP_NORM_EPS = 1e-6
# DiT's diffusion (diffusion/__init__.py create_diffusion with its defaults: linear betas,
# 1000 steps; get_named_beta_schedule scales 1e-4 and 0.02 by 1000 / steps = 1), in the form
# `diffusers_scheduler.diffusion_config_from_scheduler` reads.
DIFFUSION = dict(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
POS_EMBED = 'pos_embed'
# Fields an arch string may override after its paper size.
_OVERRIDES = {'hidden_size': int, 'depth': int, 'num_heads': int, 'mlp_ratio': float}

# Our parameter -> the original module (names from models.py; timm's PatchEmbed, Attention and
# Mlp supply ``proj``, ``qkv`` / ``proj`` and ``fc1`` / ``fc2``).
_TOP = {'patch_embed': 'x_embedder.proj', 't_embed_in': 't_embedder.mlp.0',
        't_embed_out': 't_embedder.mlp.2', 'y_embed': 'y_embedder.embedding_table',
        'final_modulation': 'final_layer.adaLN_modulation.1', 'final_linear': 'final_layer.linear'}
_BLOCK = {'modulation': 'adaLN_modulation.1', 'attn_out': 'attn.proj', 'mlp_in': 'mlp.fc1',
          'mlp_out': 'mlp.fc2'}
# timm's Attention computes q, k, v as the first, second and third row blocks of one qkv Linear.
_QKV = ('query', 'key', 'value')
_LEAF = {'kernel': 'weight', 'embedding': 'weight', 'bias': 'bias'}
_BLOCK_RE = re.compile(r'^blocks\.(\d+)\.')


def original_name(path: tuple[str, ...]) -> tuple[str, int | None]:
  """The original tensor of our parameter at ``path`` and, for q / k / v, which third of its
  rows: ('block_3', 'key', 'bias') -> ('blocks.3.attn.qkv.bias', 1)."""
  module, *rest, leaf = path
  if module in _TOP and not rest:
    return f'{_TOP[module]}.{_LEAF[leaf]}', None
  m = re.fullmatch(r'block_(\d+)', module)
  if m and len(rest) == 1 and rest[0] in _QKV:
    return f'blocks.{m.group(1)}.attn.qkv.{_LEAF[leaf]}', _QKV.index(rest[0])
  if m and len(rest) == 1 and rest[0] in _BLOCK:
    return f'blocks.{m.group(1)}.{_BLOCK[rest[0]]}.{_LEAF[leaf]}', None
  raise AssertionError(f'no original DiT name for parameter {"/".join(path)}')


# ---------------------------------------------------------------------------------------------
# The architecture: --arch against what the file looks like.
# ---------------------------------------------------------------------------------------------

def parse_arch(arch: str) -> dict[str, Any]:
  """hidden_size, depth, num_heads, patch_size and mlp_ratio of ``'DiT-XL/2'`` (a paper size,
  'DiT-' optional), or of a paper size with overrides: ``'DiT-S/2,hidden_size=64,depth=3'``."""
  from lees_jax.models import dit
  name, *extra = [part.strip() for part in str(arch).split(',')]
  overrides, problems = {}, []
  for item in extra:
    key, sep, value = item.partition('=')
    if not sep or key not in _OVERRIDES:
      problems.append(f'{item!r} (overrides are <{"|".join(_OVERRIDES)}>=<value>)')
      continue
    try:
      overrides[key] = _OVERRIDES[key](value)
    except ValueError:
      kind = 'an int' if _OVERRIDES[key] is int else 'a number'
      problems.append(f'{item!r} ({key} must be {kind})')
  if problems:
    raise ConversionError(f'--arch={arch}: cannot read ' + '; '.join(problems))
  try:
    spec = dit.dit_size(name, **overrides)
  except ValueError as e:
    raise ConversionError(f'--arch={arch}: {e}') from e
  return dict(hidden_size=spec.hidden_size, depth=spec.depth, num_heads=spec.num_heads,
              patch_size=spec.patch_size, mlp_ratio=spec.mlp_ratio)


def _shape(state_dict: Mapping[str, Any], name: str) -> tuple[int, ...] | None:
  value = state_dict.get(name)
  return tuple(value.shape) if isinstance(value, np.ndarray) else None


def describe_file(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """What the tensors say about the network (each None when the file does not say): width,
  depth, patch, MLP width, input channels, position-embedding tokens, label rows, output rows."""
  conv = _shape(state_dict, 'x_embedder.proj.weight')
  pos = _shape(state_dict, POS_EMBED)
  t_in = _shape(state_dict, 't_embedder.mlp.0.weight')
  width = (conv[0] if conv and len(conv) == 4 else pos[-1] if pos and len(pos) == 3
           else t_in[0] if t_in and len(t_in) == 2 else None)
  blocks = {int(m.group(1)) for name in state_dict if (m := _BLOCK_RE.match(name))}
  fc1 = _shape(state_dict, 'blocks.0.mlp.fc1.weight')
  table = _shape(state_dict, 'y_embedder.embedding_table.weight')
  final = _shape(state_dict, 'final_layer.linear.weight')
  return dict(
      width=width, depth=max(blocks) + 1 if blocks else None,
      patch=conv[2] if conv and len(conv) == 4 and conv[2] == conv[3] else None,
      mlp_hidden=fc1[0] if fc1 and len(fc1) == 2 else None,
      in_channels=conv[1] if conv and len(conv) == 4 else None,
      tokens=pos[1] if pos and len(pos) == 3 and pos[0] == 1 else None,
      label_rows=table[0] if table and len(table) == 2 else None,
      output_rows=final[0] if final and len(final) == 2 else None)


def _file_arch_name(file: Mapping[str, Any]) -> str:
  from lees_jax.models import dit
  for size, (width, depth, _) in dit.SIZES.items():
    if (width, depth) == (file['width'], file['depth']) and file['patch'] in dit.PATCH_SIZES:
      if file['mlp_hidden'] in (None, 4 * width):
        return f'DiT-{size}/{file["patch"]}'
  return 'no paper size'


def _check_arch(arch: str, want: Mapping[str, Any], file: Mapping[str, Any]):
  """Refuses an arch whose width, depth, patch or MLP width the file contradicts."""
  ours = dict(width=want['hidden_size'], depth=want['depth'], patch=want['patch_size'],
              mlp_hidden=int(want['hidden_size'] * want['mlp_ratio']))
  differs = [k for k, v in ours.items() if file[k] is not None and file[k] != v]
  if differs:
    has = ', '.join(f'{k.replace("_", " ")} {file[k]}' for k in ours if file[k] is not None)
    raise ConversionError(
        f'--arch={arch} contradicts the checkpoint: the file has {has}: '
        f'{_file_arch_name(file)}, not {arch} (which has '
        + ', '.join(f'{k.replace("_", " ")} {ours[k]}' for k in differs) + ')')


def _infer(arch: str, want, file, input_size, num_classes) -> ml_collections.ConfigDict:
  """The `config.model` of the file's network (``want``: the parsed arch)."""
  p, d = want['patch_size'], want['hidden_size']
  problems = []
  grid = None
  if file['tokens'] is not None:
    root = int(round(file['tokens'] ** 0.5))
    if root * root == file['tokens']:
      grid = root
    else:
      problems.append(f'{POS_EMBED} has {file["tokens"]} tokens, not a square grid of patches')
  if grid is not None and input_size is not None and grid * p != input_size:
    problems.append(f'input_size={input_size} given, but {POS_EMBED} has {file["tokens"]} tokens '
                    f'= {grid} x {grid} patches of {p}: input_size {grid * p}')
  elif grid is None and input_size is None and not problems:
    problems.append(f'{POS_EMBED} is absent or not (1, tokens, width), so the input size cannot '
                    'be inferred; pass input_size (--input_size, latent pixels per side)')
  if file['label_rows'] is not None:
    rows = file['label_rows']
    if num_classes is not None and rows == num_classes:
      problems.append(f'y_embedder.embedding_table.weight has {rows} rows = num_classes: a model '
                      'trained without label dropout has no null-class row, which our DiT needs')
    elif num_classes is not None and rows != num_classes + 1:
      problems.append(f'y_embedder.embedding_table.weight has {rows} rows, not num_classes + 1 = '
                      f'{num_classes + 1}')
    elif rows < 2:
      problems.append(f'y_embedder.embedding_table.weight has {rows} row(s): need the classes and '
                      'a null class')
  learn_sigma, c = True, file['in_channels'] or 4
  if file['output_rows'] is not None:
    if file['output_rows'] == p * p * c:
      learn_sigma = False
    elif file['output_rows'] != p * p * 2 * c:
      problems.append(f'final_layer.linear.weight has {file["output_rows"]} rows: neither '
                      f'{p}*{p}*{c} (epsilon) nor {p}*{p}*{2 * c} (epsilon and a learned variance)')
  if problems:
    raise ConversionError(f'cannot import the DiT checkpoint as {arch}:\n  - '
                          + '\n  - '.join(problems))
  model_config = ml_collections.ConfigDict(dict(
      name='dit', input_size=grid * p if grid is not None else int(input_size), patch_size=p,
      in_channels=c, hidden_size=d, depth=want['depth'], num_heads=want['num_heads'],
      mlp_ratio=float(want['mlp_ratio']),
      num_classes=(file['label_rows'] - 1 if file['label_rows'] is not None
                   else num_classes or 1000),
      learn_sigma=learn_sigma,
      class_dropout_prob=0.1,  # the original's default; files do not record it
      time_freq_shift=TIME_FREQ_SHIFT, mlp_norm_eps=MLP_NORM_EPS, dtype='float32'))
  from lees_jax import models
  try:
    models.spec_from_config(model_config)
  except ValueError as e:
    raise ConversionError(f'the checkpoint maps to an invalid lees_jax DiT: {e}') from e
  return model_config


# ---------------------------------------------------------------------------------------------
# The tensors.
# ---------------------------------------------------------------------------------------------

def _describe_value(value) -> str:
  return f'shape {tuple(value.shape)}' if isinstance(value, np.ndarray) else type(value).__name__


def original_to_params(state_dict: Mapping[str, Any], arch: str, *, input_size: int | None = None,
                       num_classes: int | None = None):
  """Maps an original DiT state dict (``models.DiT().state_dict()``, numpy arrays) onto our tree.

  ``arch`` names the network (see `parse_arch`); ``input_size`` (latent pixels per side) is
  inferred from ``pos_embed`` and, if given, checked against it; ``num_classes``, if given, is
  checked against the label table (num_classes + 1 rows).

  Returns (model_config, params): the `config.model` ConfigDict and a nested dict of float32
  numpy arrays with exactly the structure of ``models.init_params`` for it. Raises
  `ConversionError` for an arch the file contradicts, and one naming every missing / unexpected
  / wrongly shaped / non-floating / non-finite tensor and a ``pos_embed`` that is not ours.
  """
  import jax
  from flax import traverse_util

  from lees_jax import models
  from lees_jax.models import dit

  want = parse_arch(arch)
  file = describe_file(state_dict)
  _check_arch(arch, want, file)
  model_config = _infer(arch, want, file, input_size, num_classes)
  spec = models.spec_from_config(model_config)
  model = models.build_model(model_config)
  abstract = traverse_util.flatten_dict(
      jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0))))

  # The torch shape of every original tensor and the parameters read from it.
  wanted: dict[str, tuple[int, ...]] = {}
  readers: dict[str, list[tuple[tuple[str, ...], int | None]]] = {}
  for path, leaf in sorted(abstract.items()):
    name, third = original_name(path)
    shape = layout.torch_shape(tuple(leaf.shape), path[-1])
    wanted[name] = (3 * shape[0],) + shape[1:] if third is not None else shape
    readers.setdefault(name, []).append((path, third))
  wanted[POS_EMBED] = (1, spec.num_tokens, spec.hidden_size)

  missing, wrong, good = [], [], {}
  for name, shape in wanted.items():
    ours = (', '.join('/'.join(path) for path, _ in readers.get(name, []))
            or 'the fixed position embedding')
    if name not in state_dict:
      missing.append(f'{name} (shape {shape}, for {ours})')
      continue
    value, problem = strict.check(name, state_dict[name], shape, ours)
    if problem:
      wrong.append(problem)
    else:
      good[name] = value
  if POS_EMBED in good:
    # Stored in float32, it is ours to ~1e-7 (both are float64 sin-cos rounded once); a file
    # saved in half precision holds it rounded to that precision (|values| <= 1).
    tolerance = max(1e-6, float(ml_dtypes.finfo(state_dict[POS_EMBED].dtype).eps))
    fixed = dit.position_embedding(spec.grid, spec.hidden_size)[None]
    error = float(np.abs(good[POS_EMBED] - fixed).max())
    if error > tolerance:
      wrong.append(f'{POS_EMBED}: differs from the fixed 2-D sin-cos position embedding our DiT '
                   f'adds (max |difference| {error:.3g} > {tolerance:.3g}); the original never '
                   'trains it')
  unexpected = sorted(set(state_dict) - set(wanted))
  if missing or wrong or unexpected:
    raise tensor_mismatch(
        f'{arch} (hidden_size {spec.hidden_size}, depth {spec.depth}, patch {spec.patch_size}, '
        f'input {spec.input_size}, {spec.num_classes} classes; from --arch and the file)',
        missing=missing, wrong=wrong,
        unexpected=[f'{n} ({_describe_value(state_dict[n])})' for n in unexpected])

  flat = {}
  d = spec.hidden_size
  for name, paths in readers.items():
    for path, third in paths:
      value = good[name] if third is None else good[name][third * d:(third + 1) * d]
      flat[path] = layout.to_flax(value, path[-1])
  return model_config, traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------------

def _where_to_get_it() -> str:
  urls = ' and '.join(RELEASE_URL + f for f in RELEASED_FILES)
  return (f'The released DiT checkpoints are {urls}'
          + ' (download one, e.g. curl -LO ' + RELEASE_URL + RELEASED_FILES[0]
          + ', and pass its local path as --source)')


def _json_value(value):
  """A training argument as backbone.json can hold it (anything else as its repr)."""
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (list, tuple)):
    return [_json_value(v) for v in value]
  return repr(value)


def read_checkpoint(path: str) -> tuple[dict[str, Any], str, dict[str, Any] | None]:
  """(state dict, which, training args) of an original DiT file: ``which`` is 'state_dict' for a
  plain state dict (the released files), 'ema' (preferred) or 'model' for a ``train.py``
  checkpoint, whose ``args`` (an argparse.Namespace) come back as a dict (else None)."""
  from lees_jax import torch_archive
  obj = sources.load_original_file(
      path, where_to_get=f'. {_where_to_get_it()}',
      what="a DiT state dict (nor a train.py checkpoint {'model', 'ema', 'opt', 'args'})")
  args = obj.get('args')
  args = ({k: _json_value(v) for k, v in args.attributes.items()}
          if isinstance(args, torch_archive.NamespaceRecord) else None)
  for which in ('ema', 'model'):  # DiT's download.find_model takes 'ema' when it is there
    if isinstance(obj.get(which), dict):
      return dict(obj[which]), which, args
  return dict(obj), 'state_dict', None


def convert_file(path: str, arch: str, *, input_size: int | None = None,
                 num_classes: int | None = None):
  """Reads and converts an original DiT file: (model_config, params, diffusion_config,
  metadata) for `checkpoints.save_backbone`."""
  from lees_jax import models
  from lees_jax.convert import sources
  from lees_jax.convert.diffusers_scheduler import diffusion_config_from_scheduler

  if not path.endswith(SUFFIXES):
    raise ConversionError(f'--source={path}: an original DiT checkpoint is a '
                          f'{" or ".join(SUFFIXES)} file')
  state_dict, which, args = read_checkpoint(path)
  if args and isinstance(args.get('model'), str):  # a train.py checkpoint names its model
    given = parse_arch(arch)
    try:
      named = parse_arch(args['model'])
    except ConversionError:
      named = None  # not a name we know: the tensors decide
    if named is not None and named != given:
      raise ConversionError(f'--arch={arch} contradicts the checkpoint: its training args say '
                            f"model={args['model']!r}")
  source_dtypes = sources._dtype_counts(  # pylint: disable=protected-access
      {k: v for k, v in state_dict.items() if isinstance(v, np.ndarray)})
  model_config, params = original_to_params(state_dict, arch, input_size=input_size,
                                            num_classes=num_classes)
  del state_dict
  learn_sigma = bool(model_config.learn_sigma)
  metadata = dict(
      source=os.path.abspath(path),
      source_format='facebookresearch/DiT models.py state dict',
      source_revision=None,
      source_files=dict(weights=os.path.basename(path)),
      source_weights=which,
      source_arch=arch,
      training_args=args,
      weights_sha256=sources._sha256(path),  # pylint: disable=protected-access
      model_output='eps_variance' if learn_sigma else 'eps',
      diffusion_from="DiT's diffusion.create_diffusion defaults (linear betas 1e-4 -> 0.02, "
                     'T = 1000)',
      # What DiT's sampler uses: create_diffusion(learn_sigma=True) -> LEARNED_RANGE, else
      # FIXED_LARGE (sigma_small=False). Not applied automatically (config.sampler.variance).
      variance_type='learned_range' if learn_sigma else 'fixed_large',
      variance_type_from="DiT's diffusion.create_diffusion",
      source_dtypes=source_dtypes,
      num_params=models.count_params(params),
      converted_by='lees_jax.convert')
  return model_config, params, diffusion_config_from_scheduler(DIFFUSION), metadata
