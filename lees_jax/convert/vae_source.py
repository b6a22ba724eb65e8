"""The autoencoder of a latent backbone's conversion: where it is, and reading it.

A DiT backbone directory holds its VAE (`lees_jax.autoencoder`). Where it comes from:

* a diffusers pipeline (``DiTPipeline.save_pretrained`` layout, or the Hub's
  facebook/DiT-XL-2-256): its ``vae/`` folder, next to ``transformer/``;
* ``--vae=S`` (any source, and the only way for an original ``.pt`` file): a local directory
  holding an ``AutoencoderKL`` ``config.json`` and weights (or a pipeline holding ``vae/``), or
  a Hub id such as ``stabilityai/sd-vae-ft-mse`` (DiT's sampling default) or ``-ft-ema``;
* ``--vae=none``: no VAE (the backbone then needs ``config.vae.source`` at run time).

A source that is itself an ``AutoencoderKL`` converts to a VAE directory on its own.
"""

from __future__ import annotations

import os

from lees_jax.convert import diffusers_vae
from lees_jax.convert.errors import ConversionError, MissingOnHubError, SourceUnavailableError
from lees_jax.convert.sources import (_dtype_counts, _hub_files, _local_files, _looks_like_hub_id,
                                      _read_json, _revision, _sha256, read_state_dict)

VAE_SUBFOLDER = 'vae'
NONE = 'none'


def pipeline_vae_dir(source: str) -> str | None:
  """The ``vae/`` folder of a local pipeline snapshot (``source`` or, when ``source`` is its
  ``transformer/`` folder, the parent's), or None."""
  source = os.path.normpath(source)
  for base in (source, os.path.dirname(source)):
    cand = os.path.join(base, VAE_SUBFOLDER)
    if os.path.isfile(os.path.join(cand, 'config.json')):
      return cand
  return None


def _files(source: str, out: str) -> tuple[dict, str]:
  if os.path.isdir(source):
    return _local_files(source, subfolders=(VAE_SUBFOLDER,)), os.path.abspath(source)
  if _looks_like_hub_id(source):
    return _hub_files(source, out, subfolders=(None, VAE_SUBFOLDER)), source
  raise SourceUnavailableError(f'VAE source {source!r}: no such directory, and not a Hugging '
                               'Face Hub id (e.g. stabilityai/sd-vae-ft-mse)')


def read_vae(source: str, out: str = 'OUT', *, files: dict | None = None) -> tuple:
  """(params, model config, metadata) of the ``AutoencoderKL`` at ``source`` -- the
  ``vae=`` argument of `checkpoints.save_backbone`. ``files``: already located files."""
  if files is None:
    files, desc = _files(source, out)
  else:
    desc = source
  config = _read_json(files['config'])
  if not diffusers_vae.is_vae_config(config):
    raise ConversionError(f'{files["config"]} is a {config.get("_class_name")!r}, not the '
                          'AutoencoderKL a latent backbone decodes with')
  diffusers_vae.model_config_from_diffusers(config)  # refuses by name before reading weights
  state_dict = read_state_dict(files['weights'])
  dtypes = _dtype_counts(state_dict)
  model_config, params = diffusers_vae.diffusers_to_params(state_dict, config)
  del state_dict
  meta = dict(source=desc, source_revision=_revision(files['weights']),
              weights_sha256=_sha256(files['weights']), diffusers_config=config,
              source_dtypes=dtypes, ignored_config_keys=diffusers_vae.ignored_config_keys(config),
              converted_by='lees_jax.convert')
  return params, model_config, meta


def backbone_vae(source: str, vae: str | None, out: str, *, latent: bool) -> tuple | None:
  """The VAE to store with a backbone converted from ``source``: ``vae`` when given ('none':
  no VAE), else a local pipeline's own ``vae/`` folder, else the Hub repository's (latent
  backbones only; an absent one is not an error: the run can name a VAE itself)."""
  if vae is not None and not latent:
    raise ConversionError('--vae is for a latent backbone (DiT); this source is a pixel-space '
                          'model')
  if not latent or vae == NONE:
    return None
  if vae is not None:
    return read_vae(vae, out)
  if os.path.isdir(source):
    local = pipeline_vae_dir(source)
    return read_vae(local, out) if local else None
  if _looks_like_hub_id(source):
    try:
      files = _hub_files(source, out, subfolders=(VAE_SUBFOLDER,))
    except MissingOnHubError:
      return None  # reached the repository: it has no vae/ folder
    return read_vae(source, out, files=files)
  return None
