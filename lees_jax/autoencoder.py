"""The autoencoder of a latent backbone (DiT's SD VAE): where its weights are, and the encode /
decode functions the modes use.

A latent backbone's directory holds its VAE in ``vae/`` (``vae.json`` + an orbax ``params/``),
written by `lees_jax.convert` (from a diffusers pipeline's ``vae/`` folder, or a VAE converted
on its own) and copied into a pretrain export. ``config.vae.source`` says which VAE a run uses:

* ``''`` -- the one in the backbone directory (``config.backbone``);
* a directory -- a ``vae/`` folder or a backbone directory holding one;
* ``'init:<seed>'`` -- random weights of the spec in ``config.vae`` (tests and the `tiny`
  presets: the latents mean nothing, the pipeline runs).

Every VAE has a fingerprint (its source, weights hash and architecture), recorded with the
latents it encoded, so latents of one VAE are never decoded or trained on with another.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lees_jax import checkpoints, files
from lees_jax.models import vae as vae_lib

VAE_DIR = 'vae'
META_FILE = 'vae.json'
FORMAT = 'lees_jax.vae'
INIT_PREFIX = 'init:'


class VAEError(ValueError):
  """The VAE a run needs is missing or does not fit the backbone."""


def spec_config(vae_config) -> ml_collections.ConfigDict:
  """The architecture fields of ``config.vae`` as a VAE model config (name 'sd_vae')."""
  fields = {k: v for k, v in dict(vae_config).items()
            if k in {f for f in vae_lib.VAESpec.__dataclass_fields__}}
  return vae_lib.VAESpec(**fields).to_config()


def save_vae(directory: str, params, model_config, *, overwrite: bool = False, **metadata) -> str:
  """Writes a VAE directory (``vae.json`` + ``params/``) atomically; returns its path."""
  vae_lib.VAESpec.from_config(model_config)  # validates
  meta = {'format': FORMAT, 'model': checkpoints.plain(model_config), **checkpoints.plain(metadata)}
  return checkpoints.save_tree(directory, params, META_FILE, meta, overwrite=overwrite)


def _find(path: str) -> str:
  for cand in (path, os.path.join(path, VAE_DIR), os.path.join(path, 'backbone', VAE_DIR)):
    if os.path.isfile(os.path.join(cand, META_FILE)):
      return cand
  raise VAEError(f'no VAE at {path!r}: expected {META_FILE} and params/ there or in its {VAE_DIR}/ '
                 'folder. A latent backbone converted from a diffusers pipeline (e.g. '
                 'facebook/DiT-XL-2-256) holds one; or convert one on its own with `python -m '
                 'lees_jax.convert --source=stabilityai/sd-vae-ft-mse --out=D` and pass '
                 '--config.vae.source=D')


# What identifies a VAE's weights: copies (a pretrain export's vae/) keep these fields.
IDENTITY = ('source', 'weights_sha256', 'model')


@dataclasses.dataclass(frozen=True)
class LoadedVAE:
  model: vae_lib.AutoencoderKL
  params: object
  meta: dict  # the IDENTITY fields (and whatever else its vae.json says)

  @property
  def fingerprint(self) -> str:
    key = json.dumps({k: self.meta.get(k) for k in IDENTITY}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()

  def save_args(self) -> tuple:
    """The ``vae=`` argument of `checkpoints.save_backbone` for a copy of this VAE."""
    meta = {k: v for k, v in self.meta.items() if k not in ('format', 'model')}
    return self.params, self.meta['model'], meta


def load_vae(config) -> LoadedVAE:
  """The VAE ``config.vae.source`` names (see the module docstring)."""
  source = config.vae.source
  if source.startswith(INIT_PREFIX):
    seed = int(source[len(INIT_PREFIX):] or 0)
    model_config = spec_config(config.vae)
    model = vae_lib.build_vae(model_config)
    params = vae_lib.init_vae_params(model, jax.random.PRNGKey(seed))
    return LoadedVAE(model, params, {'source': source, 'model': plain_model(model_config)})
  if not source:
    if not config.backbone:
      raise VAEError('config.vae.source is empty (the backbone\'s VAE) but config.backbone is '
                     'not set: pass --config.backbone=<a converted latent backbone> or '
                     '--config.vae.source=<a VAE directory>')
    source = checkpoints.find_backbone_dir(config.backbone)
  directory = _find(os.path.abspath(source))
  meta = files.read_json(os.path.join(directory, META_FILE))
  if meta.get('format') != FORMAT:
    raise VAEError(f'{directory}/{META_FILE} is not a lees_jax VAE description')
  model = vae_lib.build_vae(ml_collections.ConfigDict(meta['model']))
  abstract = jax.eval_shape(lambda: vae_lib.init_vae_params(model, jax.random.PRNGKey(0)))
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  try:
    with checkpoints.quiet():
      params = ocp.StandardCheckpointer().restore(os.path.join(directory, 'params'), target)
  except Exception as e:  # orbax raises many types for corrupt / mismatched trees
    raise VAEError(f'cannot restore the VAE parameters from {directory}/params: '
                   f'{type(e).__name__}: {e}') from e
  return LoadedVAE(model, params, meta)


def plain_model(model_config) -> dict:
  return checkpoints.plain(model_config)


def check_fits(vae_model, backbone_model, image_shape) -> None:
  """The VAE turns ``image_shape`` images into the latents the backbone denoises."""
  h, w, c = image_shape
  f = vae_model.spec.downsample_factor
  want = tuple(backbone_model.input.shape)
  have = (h // f, w // f, vae_model.spec.latent_channels)
  if h % f or w % f or have != want or c != vae_model.spec.in_channels:
    raise VAEError(f'the VAE maps {h}x{w}x{c} images to {have} latents (down factor {f}, '
                   f'{vae_model.spec.latent_channels} channels), but the backbone denoises {want}: '
                   'set config.data.image_size (and config.model.input_size) to agree')


def encoder(model, params):
  """``fn(float images in [-1, 1]) -> (mean, logvar)`` as numpy (unscaled posterior)."""
  fn = jax.jit(functools.partial(model.apply, method=vae_lib.AutoencoderKL.encode))
  return lambda x: tuple(np.asarray(a) for a in fn({'params': params}, jnp.asarray(x)))


def decoder(model, params):
  """``fn(scaled latents) -> float images in [-1, 1]`` (decode(z / scaling_factor), clipped)."""
  scale = float(model.spec.scaling_factor)
  fn = jax.jit(lambda p, z: jnp.clip(model.apply({'params': p}, z / scale,
                                                 method=vae_lib.AutoencoderKL.decode), -1.0, 1.0))
  return lambda z: fn(params, jnp.asarray(z, jnp.float32))
