"""Backbone checkpoints: the one on-disk format every mode loads a frozen backbone from.

A *backbone directory* holds
  backbone.json  -- {"format": "lees_jax.backbone", "version": 1, "model": {...config.model...},
                     "diffusion": {...}, "source": "...", free-form metadata}
  params/        -- an orbax checkpoint of the parameter pytree.

  vae/           -- a latent backbone's autoencoder (`lees_jax.autoencoder`), when it has one.

It is written by `convert` (from a diffusers checkpoint) and by `pretrain` (its EMA
parameters, exported to ``<workdir>/backbone``). `load_backbone` accepts either a backbone
directory or a workdir that contains one.

Writes are atomic: everything goes to a temporary sibling directory that is renamed into
place only when complete, so a failing run never leaves a partial or overwritten backbone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lees_jax import files, models

FORMAT = 'lees_jax.backbone'
VERSION = 1
META_FILE = 'backbone.json'


class BackboneError(ValueError):
  """A backbone checkpoint is missing, corrupt or does not match what was expected."""


def plain(value):
  """ConfigDicts, tuples and nested containers as plain JSON-able dicts and lists."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: plain(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [plain(v) for v in value]
  return value


def save_tree(directory: str, params, meta_file: str, meta: dict, *, overwrite: bool = False,
              before_rename=None) -> str:
  """``params`` (orbax, ``params/``) and ``meta`` (JSON, ``meta_file``) written to ``directory``
  atomically: into a temporary sibling, renamed into place when complete. ``before_rename(tmp)``
  may add more to the directory first (a backbone's ``vae/``)."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f'{directory} already exists; choose another output directory or remove it '
                          'first (nothing was written)')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(directory) + '.tmp-', dir=parent)
  try:
    params = jax.tree_util.tree_map(np.asarray, params)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, 'params'), params)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, meta_file), 'w') as f:
      json.dump(meta, f, indent=1)
    if before_rename is not None:
      before_rename(tmp)
    if os.path.exists(directory):
      old = directory + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.replace(directory, old)
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def save_backbone(directory: str, params, model_config, *, diffusion_config=None,
                  overwrite: bool = False, vae=None, **metadata: Any) -> str:
  """Writes ``params`` and their model config to ``directory`` atomically.

  ``vae``: a latent backbone's autoencoder as (params, model config, metadata dict), written
  to ``directory/vae`` in the same atomic step (`lees_jax.autoencoder`).
  """
  models.spec_from_config(model_config)  # validates the architecture (of its family)
  meta = {'format': FORMAT, 'version': VERSION, 'model': plain(model_config),
          'diffusion': plain(diffusion_config) if diffusion_config is not None else None,
          **plain(metadata)}

  def add_vae(tmp):
    from lees_jax import autoencoder  # pylint: disable=g-import-not-at-top
    vae_params, vae_config, vae_meta = vae
    autoencoder.save_vae(os.path.join(tmp, autoencoder.VAE_DIR), vae_params, vae_config, **vae_meta)

  return save_tree(directory, params, META_FILE, meta, overwrite=overwrite,
                   before_rename=add_vae if vae is not None else None)


def find_backbone_dir(path: str) -> str:
  """``path`` itself if it is a backbone directory, else ``path/backbone`` (a local path made
  absolute: orbax restores only from absolute paths)."""
  if not path:
    raise BackboneError('no backbone given: set config.backbone '
                        'to a directory written by `python -m lees_jax.convert` or a pretrain workdir')
  if not files.is_remote(path):
    path = os.path.abspath(path)
  for cand in (path, os.path.join(path, 'backbone')):
    if files.isfile(files.join(cand, META_FILE)):
      return cand
  raise BackboneError(f'no backbone checkpoint at {path!r}: expected {META_FILE} and params/ in it or '
                      f'in {os.path.join(path, "backbone")!r}. Create one with '
                      '`python -m lees_jax.convert --source=... --out=...` or a `pretrain` run.')


def read_backbone_meta(path: str) -> dict:
  directory = find_backbone_dir(path)
  meta_path = os.path.join(directory, META_FILE)
  try:
    meta = files.read_json(meta_path)
  except (OSError, json.JSONDecodeError) as e:
    raise BackboneError(f'cannot read {meta_path}: {e}') from e
  if meta.get('format') != FORMAT or 'model' not in meta:
    raise BackboneError(f'{meta_path} is not a lees_jax backbone description (format {meta.get("format")!r})')
  return meta


def load_backbone_params(path: str, expected_model_config=None, expected_diffusion=None):
  """Returns (model_config as ConfigDict, params). Checks the architecture if one is expected,
  and with ``expected_diffusion`` (a config.diffusion) that the backbone's recorded diffusion
  process is the one the config trains and samples (`processes.backbone_mismatch`)."""
  directory = find_backbone_dir(path)
  meta = read_backbone_meta(directory)
  if expected_diffusion is not None:
    from lees_jax import processes  # pylint: disable=g-import-not-at-top
    problem = processes.backbone_mismatch(meta.get('diffusion'), expected_diffusion)
    if problem:
      raise BackboneError(f'backbone at {directory} does not match config.diffusion: {problem}')
  model_config = ml_collections.ConfigDict(meta['model'])
  if expected_model_config is not None:
    # Training settings (the UNet's dropout, DiT's label dropout) are not the architecture.
    diffs = models.architecture_differences(expected_model_config, model_config)
    if diffs:
      raise BackboneError(f'backbone at {directory} does not match config.model: ' + '; '.join(
          f'{field}: checkpoint {have!r} vs config {want!r}' for field, have, want in diffs))
  model = models.build_model(model_config)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), abstract)
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(directory, 'params'), target)
  except Exception as e:  # orbax raises many types for corrupt / mismatched trees
    raise BackboneError(f'cannot restore backbone parameters from {directory}/params '
                        f'(expected the tree of a {models.count_params(abstract):,}-parameter '
                        f'{model_config.name} {_architecture(model_config)}): '
                        f'{type(e).__name__}: {e}') from e
  return model_config, params


def _architecture(model_config) -> str:
  """The network's fields as 'with a=1, b=(1, 2)' (training settings left out)."""
  fam = models.backbone.family(model_config.name)
  spec = fam.spec_from_config(model_config)
  return 'with ' + ', '.join(f'{f.name}={getattr(spec, f.name)!r}' for f in dataclasses.fields(spec)
                             if f.name not in fam.training_fields)


def load_backbone(path: str):
  """Public API: ``model, params = load_backbone(path)``.

  ``model.apply({'params': params}, x, t)`` with x NHWC in [-1, 1] and integer timesteps t
  returns the predicted noise; ``gates=`` (see `lees_jax.gates`) optionally skips units.
  """
  model_config, params = load_backbone_params(path)
  return models.build_model(model_config), params


# ---------------------------------------------------------------------------
# Backbones of training jobs: read one (local or gs://) and export EMA parameters.
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def quiet():
  """Orbax logs every save at INFO level; keep the console to our progress lines."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))  # absl: larger is more verbose
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _localize(path: str) -> str:
  """Copies a remote (gs://) backbone directory to a local temporary directory."""
  for cand in (path, f'{path.rstrip("/")}/backbone'):
    if files.exists(files.join(cand, META_FILE)):
      local = os.path.join(tempfile.mkdtemp(prefix='lees_backbone_'), 'backbone')
      files.copy_tree(cand, local)
      return local
  raise BackboneError(
      f'no backbone checkpoint at {path!r}: expected {META_FILE} and params/ in it or '
      f'in {path.rstrip("/")}/backbone')


def read_backbone(path: str, model_config, diffusion_config=None) -> tuple[Any, str]:
  """(params, backbone directory) of a local or gs:// backbone checked against config.model
  (and, when given, its diffusion process against config.diffusion).

  Fails (naming the path and what was expected) before anything touches the workdir.
  """
  source = _localize(path) if files.is_remote(path) else path
  with quiet():
    _, params = load_backbone_params(source, expected_model_config=model_config,
                                     expected_diffusion=diffusion_config)
  backbone_dir = find_backbone_dir(source)
  if source != path:
    shutil.rmtree(os.path.dirname(source), ignore_errors=True)
    backbone_dir = path
  return params, backbone_dir


def export_backbone(workdir: str, mode: str, step: int, params, config, checkpoint_dir: str,
                    **metadata) -> str | None:
  """Writes ``params`` (EMA parameters) as the backbone directory ``<workdir>/backbone``.

  Atomic (`save_backbone`); a gs:// workdir is written locally, then copied up. Returns the
  path, or None in a multi-process run (see below; ``checkpoint_dir`` is where the run's
  checkpoints are, named in the message).
  """
  if jax.process_count() > 1:
    # save_backbone's orbax checkpointer synchronises all processes, so it cannot run on
    # process 0 alone; the EMA parameters are safe in the last checkpoint.
    if jax.process_index() == 0:
      print(f'multi-process run: the EMA parameters are in the step-{step} '
            f'checkpoint under {checkpoint_dir}. Export them to '
            f'{files.join(workdir, "backbone")} by running the same {mode} command once in a single '
            'process (it restores the final checkpoint, trains no further and exports).',
            flush=True)
    return None
  target = files.join(workdir, 'backbone')
  local = tempfile.mkdtemp(prefix='lees_backbone_') if files.is_remote(workdir) else None
  vae = None
  if models.build_model(config.model).input.kind == 'latents':
    # The export carries the VAE it was trained with, so that it samples images on its own.
    from lees_jax import autoencoder  # pylint: disable=g-import-not-at-top
    vae = autoencoder.load_vae(config).save_args()
  with quiet():
    path = save_backbone(
        os.path.join(local, 'backbone') if local else target, params, config.model,
        diffusion_config=config.diffusion, overwrite=True, vae=vae, step=step,
        seed=int(config.seed), params_kind='ema', **metadata)
  if local:  # gs://...: written locally (atomically), then copied up
    files.copy_tree(path, target, replace=True)
    shutil.rmtree(local, ignore_errors=True)
    path = target
  print(f'exported EMA parameters (step {step}) to {path}', flush=True)
  return path
