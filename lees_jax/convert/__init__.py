"""Import a diffusers ``UNet2DModel`` checkpoint (DDPM-style, e.g. google/ddpm-cifar10-32, or
ADM-style, e.g. the consistency-model conversion's), a diffusers DiT (``DiTTransformer2DModel``,
e.g. the ``transformer/`` folder of facebook/DiT-XL-2-256), an original DiT checkpoint
(facebookresearch/DiT's ``DiT-XL-2-256x256.pt``) or an OpenAI UNet (guided-diffusion's
``64x64_diffusion.pt``, improved-diffusion's ``cifar10_uncond_50M_500K.pt``, ...) as a lees_jax
backbone.

Usage:
  python -m lees_jax.convert --source=google/ddpm-cifar10-32 --out=checkpoints/ddpm-cifar10-32
  python -m lees_jax.convert --source=/path/to/D --out=checkpoints/ddpm-cifar10-32   # offline
  python -m lees_jax.convert --source=/path/DiT-XL-2-256x256.pt --arch=DiT-XL/2 --out=checkpoints/dit-xl-2-256
  python -m lees_jax.convert --source=/path/celeba64_uvit_small.pth --arch=uvit
      --model_config=celeba64_uvit_small --out=checkpoints/celeba64-uvit-s4   # (one command)
  python -m lees_jax.convert --source=/path/64x64_diffusion.pt --out=checkpoints/adm-64 \
    --model_flags="--attention_resolutions 32,16,8 --class_cond True --image_size 64 ..."

An original DiT file is a local ``.pt`` / ``.pth`` (never downloaded; `dit_original` says where
the released ones are) and needs ``--arch``, since a state dict does not record the number of
attention heads; everything else is read from its tensors (see `dit_original`). An OpenAI UNet
file needs ``--model_flags``, the flags string of its README (`guided_diffusion`; with
``--model_defaults=improved-diffusion`` for improved-diffusion's files, whose defaults differ).

``--source`` is a local directory holding ``config.json`` and
``diffusion_pytorch_model.safetensors`` (preferred) or ``diffusion_pytorch_model.bin``
(directly or in a ``unet/`` or ``transformer/`` sub-folder, as in a pipeline snapshot), or a
Hugging Face Hub id whose files are downloaded with ``huggingface_hub.hf_hub_download``. A
``scheduler_config.json`` next to them (or in ``scheduler/``) supplies the diffusion schedule;
without one the DDPM linear schedule (1e-4 -> 0.02, T = 1000) is recorded.

Nothing here imports torch or diffusers: ``.safetensors`` are read with safetensors' numpy API,
``.bin`` and ``.pt`` with the code-free reader `lees_jax.torch_archive`. The conversion is strict: the
diffusers architecture config must be one our `UNetSpec` / `DiTSpec` represents exactly (every
unsupported field is reported), and every tensor must map one-to-one onto our parameter tree
with the right shape (every missing, unexpected or wrongly shaped tensor is reported). The
output is written with `checkpoints.save_backbone`, atomically: a failed conversion leaves
nothing at ``--out``.

The package is split by concern, so that importers of other architectures reuse what is not
specific to one: `sources` finds and reads a source (local directory or Hub, safetensors / .bin,
fingerprints), `diffusers_unet` maps the UNet2DModel config and tensors onto our UNet,
`diffusers_adm` an ADM-style UNet2DModel's onto our ADM, `diffusers_dit` the
DiTTransformer2DModel ones onto our DiT and `dit_original` the original DiT's state dict onto it,
`guided_diffusion` an OpenAI UNet's state dict and flags onto our ADM, `uvit_original` an
original U-ViT state dict (baofff/U-ViT's ``.pth``, with ``--arch=uvit`` and
``--model_config``) onto our U-ViT, `strict` checks a state dict against the tensors wanted,
`diffusers_scheduler` maps the
scheduler config onto `config.diffusion`, `errors` holds the errors they share, ``__main__``
the command line. This module orchestrates one conversion and
re-exports the public names, so ``convert.<name>`` works whichever module defines it.

Public API: `convert`, `diffusers_to_params`, `model_config_from_diffusers` (the UNet's; the
DiT's are `diffusers_dit.diffusers_to_params` and `diffusers_dit.model_config_from_diffusers`,
the original DiT's `dit_original.original_to_params`, the ADM's
`diffusers_adm.diffusers_to_params` and `guided_diffusion.original_to_params`),
`diffusion_config_from_scheduler`, `read_state_dict`, `ConversionError`, `SourceUnavailableError`.
"""

from __future__ import annotations

import os

from lees_jax.convert import diffusers_adm, diffusers_dit, guided_diffusion
from lees_jax.convert import diffusers_vae
from lees_jax.convert import vae_source, dit_original, uvit_original
from lees_jax.convert.diffusers_scheduler import (
    SCHEDULER_DEFAULTS,
    SUPPORTED_VARIANCE_TYPES,
    diffusion_config_from_scheduler,
    scheduler_variance_type,
)
from lees_jax.convert.diffusers_unet import (
    DDPM_DROPOUT,
    DIFFUSERS_DEFAULTS,
    diffusers_name,
    diffusers_to_params,
    model_config_from_diffusers,
    normalize_names,
)
from lees_jax.convert.errors import ConversionError, SourceUnavailableError
from lees_jax.convert.sources import (
    BIN_FILE,
    CONFIG_FILE,
    HUB_URL,
    SAFETENSORS_FILE,
    SCHEDULER_FILE,
    _dtype_counts,  # the private helpers are those `convert` below uses
    _hub_files,
    _local_files,
    _looks_like_hub_id,
    _read_json,
    _revision,
    _sha256,
    read_state_dict,
)

__all__ = [
    'BIN_FILE', 'CONFIG_FILE', 'DDPM_DROPOUT', 'DIFFUSERS_DEFAULTS', 'HUB_URL', 'SAFETENSORS_FILE',
    'SCHEDULER_DEFAULTS', 'SCHEDULER_FILE', 'SUPPORTED_VARIANCE_TYPES', 'ConversionError',
    'SourceUnavailableError', 'convert', 'diffusers_name', 'diffusers_to_params',
    'diffusion_config_from_scheduler', 'main', 'model_config_from_diffusers', 'normalize_names',
    'read_state_dict', 'scheduler_variance_type',
]


def convert(source: str, out: str, overwrite: bool = False, *, dropout: float | None = None,
            arch: str | None = None, input_size: int | None = None,
            vae: str | None = None, model_config=None, model_flags: str | None = None,
            model_defaults: str | None = None) -> str:
  """Converts a diffusers UNet2DModel (DDPM or ADM style), DiT or AutoencoderKL (local directory
  or Hub id), or an original DiT, OpenAI UNet or U-ViT checkpoint (a local ``.pt`` / ``.pth``
  file), into a backbone at ``out``.

  For a diffusers source the config's ``_class_name`` says which: a ``DiTTransformer2DModel``
  (or ``Transformer2DModel`` with ``norm_type='ada_norm_zero'``) goes through `diffusers_dit`,
  anything else through `diffusers_unet` (which refuses what is not a UNet2DModel).
  A UNet2DModel with ADM features (`diffusers_adm.is_adm_config`: e.g. the consistency-model
  conversion's configs) goes through `diffusers_adm`. ``dropout`` is the DDPM UNet's only.

  A ``.pt`` / ``.pth`` file is an original checkpoint, and what it holds is said by a flag:
  ``arch`` (e.g. 'DiT-XL/2') for facebookresearch/DiT's (`dit_original`; ``input_size``,
  inferred from the file, is optional there), ``model_flags`` (the guided-diffusion flags
  string, e.g. '--image_size 64 --num_channels 192 ...', on the defaults ``model_defaults``:
  'guided-diffusion' or 'improved-diffusion') for OpenAI's UNets (`guided_diffusion`), and
  ``arch='uvit'`` with ``model_config`` (a public configuration's name, e.g.
  'celeba64_uvit_small', or a JSON / dict of U-ViT's ``config.nnet`` fields) for baofff/U-ViT's
  (`uvit_original`). These flags are refused for other sources.

  A latent backbone (DiT) is written with its VAE in ``out/vae`` (`vae_source.backbone_vae`):
  ``vae`` names one (a directory or Hub id; 'none' for none), else a pipeline's own ``vae/``
  is used. A source that is itself an ``AutoencoderKL`` becomes a VAE directory.

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
  is_uvit = arch is not None and str(arch).strip().lower() == uvit_original.UVIT_ARCH
  if model_config is not None and not is_uvit:
    raise ConversionError(f'--model_config describes an original U-ViT checkpoint: pass '
                          f'--arch={uvit_original.UVIT_ARCH} with it (got --arch={arch})')
  if is_uvit:
    if model_config is None:
      raise ConversionError('--arch=uvit needs --model_config: a public configuration (e.g. '
                            'celeba64_uvit_small) or a JSON object of config.nnet fields (a '
                            'state dict does not record the number of heads)')
    if dropout is not None or input_size is not None or vae is not None:
      raise ConversionError('--dropout, --input_size and --vae are not settings of a U-ViT '
                            'checkpoint (a pixel-space network without dropout)')
    model_config_out, params, diffusion_config, metadata = uvit_original.convert_file(
        str(source), model_config)
    return checkpoints.save_backbone(out_abs, params, model_config_out,
                                     diffusion_config=diffusion_config, overwrite=overwrite,
                                     **metadata)
  is_file = str(source).endswith(dit_original.SUFFIXES)
  if model_defaults is not None and model_flags is None:
    raise ConversionError('--model_defaults goes with --model_flags (an OpenAI UNet .pt)')
  if model_flags is not None and (not is_file or arch is not None or input_size is not None):
    raise ConversionError(
        f'--model_flags are for an OpenAI guided-/improved-diffusion UNet (a '
        f'{" or ".join(dit_original.SUFFIXES)} file)' + (
            '; --arch and --input_size are for a DiT file: give one kind' if is_file else
            f'; --source={source} is not one (a diffusers source records its architecture in '
            'config.json)'))
  if is_file and model_flags is not None:
    if dropout is not None or vae is not None:
      raise ConversionError('--dropout and --vae do not apply to an OpenAI UNet file (its '
                            'dropout is the --dropout of --model_flags; it works on pixels)')
    model_config, params, diffusion_config, metadata = guided_diffusion.convert_file(
        str(source), model_flags, model_defaults or 'guided-diffusion')
    return checkpoints.save_backbone(out_abs, params, model_config,
                                     diffusion_config=diffusion_config, overwrite=overwrite,
                                     **metadata)
  if is_file:
    if arch is None:
      raise ConversionError(
          f'--source={source} is an original checkpoint: say which kind, pass --arch for a '
          'facebookresearch/DiT file (e.g. --arch=DiT-XL/2; the file does not record its number '
          'of heads), --model_flags for an OpenAI guided-/improved-diffusion UNet (the flags '
          'string of its README, e.g. --model_flags="--image_size 64 --num_channels 192 ..."), '
          'or --arch=uvit --model_config=<name or JSON> for a baofff/U-ViT file')
    if dropout is not None:
      raise ConversionError('dropout is a setting of the DDPM UNet; a DiT has none')
    model_config, params, diffusion_config, metadata = dit_original.convert_file(
        str(source), arch, input_size=input_size)
    return checkpoints.save_backbone(
        out_abs, params, model_config, diffusion_config=diffusion_config, overwrite=overwrite,
        vae=vae_source.backbone_vae(str(source), vae, out, latent=True), **metadata)
  if arch is not None or input_size is not None:
    raise ConversionError(f'--arch and --input_size are for an original DiT checkpoint (a '
                          f'{" or ".join(dit_original.SUFFIXES)} file); --source={source} is not '
                          'one (a diffusers source records its architecture in config.json)')
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
  if diffusers_vae.is_vae_config(diffusers_config):  # a VAE on its own: a VAE directory
    from lees_jax import autoencoder  # pylint: disable=g-import-not-at-top
    if vae is not None or dropout is not None:
      raise ConversionError(f'--source={source} is an AutoencoderKL; --vae and --dropout are for '
                            'diffusion backbones')
    vae_params, vae_config, vae_meta = vae_source.read_vae(source_desc, out, files=files)
    return autoencoder.save_vae(out_abs, vae_params, vae_config, overwrite=overwrite, **vae_meta)
  scheduler_config = _read_json(files['scheduler']) if files['scheduler'] else None
  # The architecture is the config's `_class_name`: a DiT, or else (the default) a UNet2DModel.
  # It is checked before the weights (~140 MB for the UNet, ~3 GB for DiT-XL/2) are read.
  is_dit = diffusers_dit.is_dit_config(diffusers_config)
  if is_dit and dropout is not None:
    raise ConversionError('dropout is a setting of the DDPM UNet; a DiT has none (its training '
                          'label dropout is config.model.class_dropout_prob)')
  learned_variance = is_adm = False
  if is_dit:
    diffusers_dit.model_config_from_diffusers(diffusers_config)
  else:
    is_adm, learned_variance = _unet_family(diffusers_config, dropout)
  diffusion_config = diffusion_config_from_scheduler(scheduler_config,
                                                     learned_variance=learned_variance)
  state_dict = read_state_dict(files['weights'])
  source_dtypes = _dtype_counts(state_dict)
  if is_dit:
    model_config, params = diffusers_dit.diffusers_to_params(state_dict, diffusers_config)
    known = set(diffusers_dit.DIFFUSERS_DEFAULTS) | set(diffusers_dit.LEGACY_OFF)
    specific = dict(model_output='eps_variance' if model_config.learn_sigma else 'eps')
  elif is_adm:
    model_config, params = diffusers_adm.diffusers_to_params(state_dict, diffusers_config)
    known = set(DIFFUSERS_DEFAULTS)
    specific = dict(model_output='eps_variance' if model_config.learn_sigma else 'eps')
  else:
    _, attention_names = normalize_names(state_dict)
    model_config, params = diffusers_to_params(state_dict, diffusers_config, dropout=dropout)
    known = set(DIFFUSERS_DEFAULTS)
    specific = dict(attention_names=attention_names)
  del state_dict

  ignored = sorted(k for k in diffusers_config if not k.startswith('_') and k not in known)
  metadata = dict(
      source=source_desc,
      source_revision=_revision(files['weights']),
      source_files={k: (os.path.basename(v) if v else None) for k, v in files.items()},
      weights_sha256=_sha256(files['weights']),
      **specific,
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
  return checkpoints.save_backbone(
      out_abs, params, model_config, diffusion_config=diffusion_config, overwrite=overwrite,
      vae=vae_source.backbone_vae(source, vae, out, latent=is_dit), **metadata)


def _unet_family(diffusers_config, dropout) -> tuple[bool, bool]:
  """(is ADM, learns its variance) of a UNet2DModel config: the DDPM UNet and ADM differ in the
  timestep embedding, so at most one represents it; if neither does, both say why (the family
  `diffusers_adm.is_adm_config` suggests first)."""
  errors = {}
  try:
    adm_config = diffusers_adm.model_config_from_diffusers(diffusers_config)
  except ConversionError as e:
    errors['adm'] = e
  else:
    if dropout is not None:
      raise ConversionError("--dropout is the DDPM UNet's; an ADM-style UNet2DModel records its "
                            'dropout in config.json')
    return True, bool(adm_config.learn_sigma)
  try:
    model_config_from_diffusers(diffusers_config, dropout=dropout)
  except ConversionError as e:
    errors['ddpm'] = e
  else:
    return False, False
  order = ('adm', 'ddpm') if diffusers_adm.is_adm_config(diffusers_config) else ('ddpm', 'adm')
  raise ConversionError('\n'.join(str(errors[k]) for k in order))


def __getattr__(name: str):
  # `main` lives in __main__ (the command line). Importing that module here, eagerly, would
  # make ``python -m lees_jax.convert`` warn that it was imported before being run as a script,
  # so `convert.main` is resolved on first use.
  if name == 'main':
    from lees_jax.convert.__main__ import main  # pylint: disable=g-import-not-at-top
    return main
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
