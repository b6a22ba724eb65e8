"""OpenAI's ``.pt`` UNets (guided-diffusion, improved-diffusion) -> our ADM (`models.adm`).

The released files (``64x64_diffusion.pt``, ``256x256_diffusion_uncond.pt``, ``lsun_bedroom.pt``,
improved-diffusion's ``cifar10_uncond_50M_500K.pt``, ``imagenet64_*.pt``, ...) are plain
``torch.save(model.state_dict())`` files, read with the code-free `lees_jax.torch_archive`. A
state dict does not record heads, attention order or the diffusion, so the network is given as
the repositories' scripts take it: the flags string of their READMEs,
``--model_flags="--attention_resolutions 32,16,8 --class_cond True --image_size 64 ..."``
(model and diffusion flags together; ``--name value`` or ``--name=value``), parsed on the
defaults of ``script_util.model_and_diffusion_defaults`` of ``defaults`` ('guided-diffusion',
or 'improved-diffusion', whose UNetModel has fewer options and whose defaults differ:
``rescale_timesteps=True``, 32x32 channel multipliers). An unknown flag is refused by name.

What the flags become, as ``script_util.create_model`` / ``create_gaussian_diffusion`` do:
channel_mult by image size when empty; attention rates image_size // resolution; 3 input
channels, 6 outputs with ``learn_sigma``; 1000 classes with ``class_cond``; betas of
``get_named_beta_schedule`` (linear 1e-4 -> 0.02 scaled by 1000 / diffusion_steps, or cosine);
``rescale_timesteps`` -> ``time_scale`` = 1000 / diffusion_steps. ``predict_xstart`` is refused
(our backbones predict epsilon); ``timestep_respacing``, ``use_kl``, ``rescale_learned_sigmas``,
``use_fp16``, ``use_checkpoint`` do not change the network and are recorded only.

Strict: flags that contradict what the tensors say (channels, levels, blocks, attention,
scale-shift, ResBlock resampling, classes, outputs) are refused with the flags the file looks
like; then every missing, unexpected, wrongly shaped, non-float or non-finite tensor is reported
together by name (`strict.gather`).
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any, Mapping

import ml_collections
import numpy as np

from lees_jax.convert import layout, sources
from lees_jax.convert.errors import ConversionError
from lees_jax.convert.strict import Wanted, gather

# script_util.model_and_diffusion_defaults() (guided_diffusion and improved_diffusion).
GUIDED_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions='16,8', channel_mult='', dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False, learn_sigma=False, diffusion_steps=1000,
    noise_schedule='linear', timestep_respacing='', use_kl=False, predict_xstart=False,
    rescale_timesteps=False, rescale_learned_sigmas=False)
IMPROVED_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    attention_resolutions='16,8', dropout=0.0, learn_sigma=False, sigma_small=False,
    class_cond=False, diffusion_steps=1000, noise_schedule='linear', timestep_respacing='',
    use_kl=False, predict_xstart=False, rescale_timesteps=True, rescale_learned_sigmas=True,
    use_checkpoint=False, use_scale_shift_norm=True)
DEFAULTS = {'guided-diffusion': GUIDED_DEFAULTS, 'improved-diffusion': IMPROVED_DEFAULTS}
# create_model's channel_mult for an empty --channel_mult, by image size.
CHANNEL_MULT = {
    'guided-diffusion': {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4),
                         128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)},
    'improved-diffusion': {256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}}
NUM_CLASSES = 1000
SUFFIXES = ('.pt', '.pth')


def _to_bool(name: str, text: str) -> bool:
  """guided-diffusion's ``str2bool``."""
  if text.lower() in ('yes', 'true', 't', 'y', '1'):
    return True
  if text.lower() in ('no', 'false', 'f', 'n', '0'):
    return False
  raise ValueError(f'--{name} {text!r}: a boolean value expected')


def parse_flags(flags: str, defaults: str = 'guided-diffusion') -> dict[str, Any]:
  """The flags of ``flags`` on ``defaults``' ``model_and_diffusion_defaults`` (all of them)."""
  if defaults not in DEFAULTS:
    raise ConversionError(f'unknown flag defaults {defaults!r}; choose one of {sorted(DEFAULTS)}')
  known = DEFAULTS[defaults]
  values, problems, unknown = dict(known), [], []
  try:
    tokens = shlex.split(flags or '')
  except ValueError as e:
    raise ConversionError(f'--model_flags: cannot split {flags!r}: {e}') from e
  i = 0
  while i < len(tokens):
    token = tokens[i]
    if not token.startswith('--'):
      problems.append(f'{token!r} is not a --flag')
      i += 1
      continue
    name, eq, text = token[2:].partition('=')
    if not eq:
      if i + 1 >= len(tokens):
        problems.append(f'--{name} has no value')
        break
      text, i = tokens[i + 1], i + 1
    i += 1
    if name not in known:
      other = [k for k, d in DEFAULTS.items() if k != defaults and name in d]
      unknown.append(f'--{name}' + (f' (a {other[0]} flag)' if other else ''))
      continue
    kind = type(known[name])
    try:
      values[name] = (_to_bool(name, text) if kind is bool else kind(text))
    except ValueError as e:
      problems.append(str(e) if kind is bool else f'--{name} {text!r}: expected {kind.__name__}')
  if unknown:
    problems.insert(0, f'unknown flag(s) {", ".join(unknown)}; the {defaults} model and '
                       f'diffusion flags are: {", ".join(sorted(known))}')
  if problems:
    raise ConversionError('--model_flags: ' + '; '.join(problems))
  return values


def configs_from_flags(flags: str, defaults: str = 'guided-diffusion'):
  """(model_config, diffusion_config, flag values) of a flags string, as the scripts build them."""
  f = parse_flags(flags, defaults)
  problems = []
  if f['predict_xstart']:
    problems.append('--predict_xstart True: the network predicts x_0; lees_jax backbones '
                    'predict epsilon')
  if f['noise_schedule'] not in ('linear', 'cosine'):
    problems.append(f"--noise_schedule {f['noise_schedule']!r}: 'linear' or 'cosine'")
  size = f['image_size']
  if f.get('channel_mult'):
    try:
      mult = tuple(int(m) for m in f['channel_mult'].split(','))
    except ValueError:
      problems.append(f"--channel_mult {f['channel_mult']!r}: comma-separated ints expected")
      mult = ()
  else:
    mult = CHANNEL_MULT[defaults].get(size, ())
    if not mult:
      problems.append(f'--image_size {size} has no default channel_mult in {defaults} (it '
                      f'knows {sorted(CHANNEL_MULT[defaults])})'
                      + ('; pass --channel_mult' if defaults == 'guided-diffusion' else ''))
  try:
    rates = tuple(size // int(r) for r in str(f['attention_resolutions']).split(',') if r)
  except ValueError:
    problems.append(f"--attention_resolutions {f['attention_resolutions']!r}: comma-separated "
                    'ints expected')
    rates = ()
  if problems:
    raise ConversionError('--model_flags: ' + '; '.join(problems))
  steps = int(f['diffusion_steps'])
  model_config = ml_collections.ConfigDict(dict(
      name='adm_unet', image_size=size, in_channels=3, model_channels=f['num_channels'],
      num_res_blocks=f['num_res_blocks'], attention_resolutions=rates, channel_mult=mult,
      dropout=float(f['dropout']), num_classes=NUM_CLASSES if f['class_cond'] else 0,
      learn_sigma=f['learn_sigma'], num_heads=f['num_heads'],
      num_head_channels=f.get('num_head_channels', -1),
      num_heads_upsample=f['num_heads_upsample'],
      use_scale_shift_norm=f['use_scale_shift_norm'],
      resblock_updown=f.get('resblock_updown', False),
      use_new_attention_order=f.get('use_new_attention_order', False),
      time_scale=1000.0 / steps if f['rescale_timesteps'] else 1.0,
      num_groups=32, norm_eps=1e-5, dtype='float32'))  # nn.normalization: GroupNorm32(32, .)
  diffusion = dict(num_timesteps=steps, beta_schedule=f['noise_schedule'])
  if f['noise_schedule'] == 'linear':
    diffusion.update(beta_start=1e-4 * 1000 / steps, beta_end=0.02 * 1000 / steps)
  from lees_jax import models
  try:
    models.spec_from_config(model_config)
  except ValueError as e:
    raise ConversionError(f'--model_flags describe an invalid lees_jax ADM: {e}') from e
  return model_config, ml_collections.ConfigDict(diffusion), f


# ---------------------------------------------------------------------------------------------
# Names and what the file says.
# ---------------------------------------------------------------------------------------------

_TOP = {'time_embed_0': 'time_embed.0', 'time_embed_1': 'time_embed.2', 'label_emb': 'label_emb',
        'conv_in': 'input_blocks.0.0', 'norm_out': 'out.0', 'conv_out': 'out.2'}
_SUB = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'temb_proj': 'emb_layers.1',
        'norm2': 'out_layers.0', 'conv2': 'out_layers.3', 'conv_shortcut': 'skip_connection',
        'norm': 'norm', 'qkv': 'qkv', 'proj_out': 'proj_out', 'op': 'op', 'conv': 'conv'}
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def openai_name(path: tuple[str, ...], sources: Mapping[str, str]) -> str:
  """The OpenAI tensor of our parameter at ``path`` (``sources``: module -> its ``Op.source``)."""
  module, *rest, leaf = path
  if module in _TOP:
    return f'{_TOP[module]}.{_LEAF[leaf]}'
  return f'{sources[module]}.{_SUB[rest[0]]}.{_LEAF[leaf]}'


_RES_PARTS = ('in_layers.0', 'in_layers.2', 'emb_layers.1', 'out_layers.0', 'out_layers.3')


def _shape(sd, name):
  v = sd.get(name)
  return tuple(v.shape) if isinstance(v, np.ndarray) else None


def describe_file(sd: Mapping[str, Any]) -> dict[str, Any]:
  """What the tensors say (None where they do not): model_channels, channel_mult,
  num_res_blocks, attention rates, class_cond, learn_sigma, scale-shift, ResBlock resampling."""
  t0, out = _shape(sd, 'time_embed.0.weight'), _shape(sd, 'out.2.weight')
  stem = _shape(sd, 'input_blocks.0.0.weight')
  mc = t0[1] if t0 and len(t0) == 2 else None
  # Output blocks 0, 1, ... that hold a whole ResBlock (a stray tensor does not make a block).
  n_out = 0
  while all(f'output_blocks.{n_out}.0.{s}.weight' in sd for s in _RES_PARTS):
    n_out += 1
  # The output blocks of level > 0 end in an upsampler: block j holds one iff it has a module
  # after its ResBlock (and attention): spacing num_res_blocks + 1.
  def modules(j):
    return {int(m.group(1)) for k in sd if (m := re.match(rf'output_blocks\.{j}\.(\d+)\.', k))}
  ups = [j for j in range(n_out) if any(
      i > 0 and not any(k.startswith(f'output_blocks.{j}.{i}.qkv') for k in sd) for i in modules(j))]
  nrb = ups[0] if ups else (n_out - 1 if n_out else None)
  levels = n_out // (nrb + 1) if nrb is not None and n_out % (nrb + 1) == 0 else None
  mult = attn = updown = None
  if levels and mc:
    chans = [_shape(sd, f'output_blocks.{(levels - 1 - lvl) * (nrb + 1)}.0.out_layers.3.weight')
             for lvl in range(levels)]
    if all(chans):
      mult = tuple(int(s[0] / mc) if s[0] % mc == 0 else s[0] / mc for s in chans)
    attn = tuple(2 ** lvl for lvl in range(levels) if
                 f'output_blocks.{(levels - 1 - lvl) * (nrb + 1)}.1.qkv.weight' in sd)
    if ups:
      updown = any(k.startswith(f'output_blocks.{ups[0]}.') and '.in_layers.' in k and
                   not k.startswith(f'output_blocks.{ups[0]}.0.') for k in sd)
  mid, mid_ch = _shape(sd, 'middle_block.0.emb_layers.1.weight'), _shape(
      sd, 'middle_block.0.out_layers.3.weight')
  label = _shape(sd, 'label_emb.weight')
  return dict(model_channels=mc, in_channels=stem[1] if stem and len(stem) == 4 else None,
              out_channels=out[0] if out else None, channel_mult=mult, num_res_blocks=nrb,
              attention_resolutions=attn, resblock_updown=updown,
              use_scale_shift_norm=(mid[0] == 2 * mid_ch[0]) if mid and mid_ch else None,
              num_classes=label[0] if label else 0)


def _as_flags(file: Mapping[str, Any], size: int) -> str:
  """The flags the file looks like (what it says)."""
  parts = []
  if file['model_channels']:
    parts.append(f"--num_channels {file['model_channels']}")
  if file['num_res_blocks'] is not None:
    parts.append(f"--num_res_blocks {file['num_res_blocks']}")
  if file['channel_mult']:
    parts.append('--channel_mult ' + ','.join(str(m) for m in file['channel_mult']))
  if file['attention_resolutions'] is not None:
    parts.append('--attention_resolutions ' + (','.join(
        str(size // r) for r in sorted(file['attention_resolutions'], reverse=True)) or '(none)'))
  parts.append(f"--class_cond {bool(file['num_classes'])}")
  if file['out_channels'] and file['in_channels']:
    parts.append(f"--learn_sigma {file['out_channels'] == 2 * file['in_channels']}")
  for key in ('use_scale_shift_norm', 'resblock_updown'):
    if file[key] is not None:
      parts.append(f'--{key} {file[key]}')
  return ' '.join(parts)


def check_flags_against_file(model_config, sd: Mapping[str, Any]):
  """Refuses flags that contradict the file, saying what the file looks like."""
  file = describe_file(sd)
  c = model_config
  ours = dict(model_channels=c.model_channels, in_channels=c.in_channels,
              out_channels=2 * c.in_channels if c.learn_sigma else c.in_channels,
              channel_mult=tuple(c.channel_mult), num_res_blocks=c.num_res_blocks,
              attention_resolutions=tuple(sorted(c.attention_resolutions)),
              resblock_updown=c.resblock_updown, use_scale_shift_norm=c.use_scale_shift_norm,
              num_classes=c.num_classes)
  differs = [f'{k}: flags {v!r}, file {file[k]!r}' for k, v in ours.items()
             if file[k] is not None and file[k] != v]
  if differs:
    raise ConversionError(
        '--model_flags contradict the checkpoint (' + '; '.join(differs) + '). The file looks '
        f'like: {_as_flags(file, c.image_size)} (--image_size {c.image_size} assumed; heads and '
        'attention order are not in the file)')


# ---------------------------------------------------------------------------------------------
# Tensors and files.
# ---------------------------------------------------------------------------------------------

def original_to_params(state_dict: Mapping[str, Any], flags: str,
                       defaults: str = 'guided-diffusion'):
  """(model_config, diffusion_config, params) of an OpenAI UNet state dict and its flags."""
  import jax
  from flax import traverse_util

  from lees_jax import models
  from lees_jax.models import adm

  model_config, diffusion_config, _ = configs_from_flags(flags, defaults)
  check_flags_against_file(model_config, state_dict)
  spec = models.spec_from_config(model_config)
  model = models.build_model(model_config)
  abstract = traverse_util.flatten_dict(
      jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0))))
  sources = {op.name: op.source for op in adm.adm_layout(spec) if op.name}
  wanted, names = {}, {}
  for path, leaf in sorted(abstract.items()):
    name = openai_name(path, sources)
    shape = layout.torch_shape(tuple(leaf.shape), path[-1])
    if path[-1] == 'kernel' and path[-2] in ('qkv', 'proj_out'):
      shape = shape + (1,)  # conv_nd(1, ...): (out, in, 1)
    wanted[name], names[path] = Wanted(shape, '/'.join(path)), name
  good = gather(state_dict, wanted, f'ADM of --model_flags ({_summary(spec)})')
  flat = {path: layout.to_flax(good[n][..., 0] if good[n].ndim == 3 else good[n], path[-1])
          for path, n in names.items()}
  return model_config, diffusion_config, traverse_util.unflatten_dict(flat)


def _summary(spec) -> str:
  return (f'model_channels={spec.model_channels}, channel_mult={spec.channel_mult}, '
          f'num_res_blocks={spec.num_res_blocks}, attention at rates '
          f'{spec.attention_resolutions}, {spec.num_classes} classes')


def read_checkpoint(path: str) -> dict[str, Any]:
  return dict(sources.load_original_file(
      path, what='a UNetModel state dict',
      where_to_get=" (download the .pt from the guided-diffusion / improved-diffusion README's "
                   'links)'))


def convert_file(path: str, flags: str, defaults: str = 'guided-diffusion'):
  """(model_config, params, diffusion_config, metadata) of an OpenAI ``.pt`` for
  `checkpoints.save_backbone`."""
  from lees_jax import models
  from lees_jax.convert import sources

  state_dict = read_checkpoint(path)
  source_dtypes = sources._dtype_counts(  # pylint: disable=protected-access
      {k: v for k, v in state_dict.items() if isinstance(v, np.ndarray)})
  model_config, diffusion_config, params = original_to_params(state_dict, flags, defaults)
  del state_dict
  f = parse_flags(flags, defaults)
  learn_sigma = bool(model_config.learn_sigma)
  metadata = dict(
      source=os.path.abspath(path), source_format=f'openai/{defaults} UNetModel state dict',
      source_revision=None, source_files=dict(weights=os.path.basename(path)),
      model_flags=flags, flag_defaults=defaults, flags=f,
      weights_sha256=sources._sha256(path),  # pylint: disable=protected-access
      model_output='eps_variance' if learn_sigma else 'eps',
      diffusion_from=f'--model_flags (diffusion_steps {f["diffusion_steps"]}, noise_schedule '
                     f'{f["noise_schedule"]})',
      # create_gaussian_diffusion: LEARNED_RANGE with learn_sigma, else FIXED_LARGE (FIXED_SMALL
      # with improved-diffusion's sigma_small). Not applied automatically (config.sampler).
      variance_type=('learned_range' if learn_sigma else
                     'fixed_small' if f.get('sigma_small') else 'fixed_large'),
      variance_type_from=f"{defaults}'s create_gaussian_diffusion",
      timestep_respacing=f['timestep_respacing'], source_dtypes=source_dtypes,
      num_params=models.count_params(params), converted_by='lees_jax.convert')
  return model_config, params, diffusion_config, metadata
