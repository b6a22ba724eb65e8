"""One backbone directory holding DiT and its VAE: conversions of a diffusers pipeline folder,
an original ``.pt`` with ``--vae``, a VAE on its own, the Hub path up to the network, and the
VAE a run then decodes with (oracle: diffusers' AutoencoderKL on CPU torch)."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from conftest import diffusers_dit_reference
from lees_jax import autoencoder, checkpoints, convert, data

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from test_vae import diffusers_vae_model, small_config  # noqa: E402

DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
VAE = small_config((32, 64), 1, 8)  # down factor 2: 16 x 16 images <-> 8 x 8 x 4 latents


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
  """A DiTPipeline.save_pretrained-style folder: transformer/, vae/, scheduler/."""
  root = tmp_path_factory.mktemp('pipe') / 'DiT-tiny'
  dit, vae = diffusers_dit_reference(DIT), diffusers_vae_model(VAE, seed=1)
  dit.save_pretrained(str(root / 'transformer'))
  vae.save_pretrained(str(root / 'vae'))
  (root / 'scheduler').mkdir()
  (root / 'scheduler' / convert.SCHEDULER_FILE).write_text(json.dumps(dict(
      _class_name='DDIMScheduler', beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
      num_train_timesteps=1000)))
  return root, vae


def _decodes_like_diffusers(backbone_or_vae_dir, vae, source=''):
  config = ml_collections.ConfigDict(dict(backbone=str(backbone_or_vae_dir),
                                          vae=dict(source=source)))
  loaded = autoencoder.load_vae(config)
  z = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
  ours = np.asarray(autoencoder.decoder(loaded.model, loaded.params)(z))
  with torch.no_grad():
    theirs = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2) / VAE['scaling_factor'])).sample
  np.testing.assert_allclose(ours, np.clip(theirs.numpy().transpose(0, 2, 3, 1), -1, 1),
                             atol=2e-5)
  images = (np.random.default_rng(1).random((2, 16, 16, 3)) * 255).astype(np.uint8)
  mean, logvar = autoencoder.encoder(loaded.model, loaded.params)(data.to_model_range(images))
  with torch.no_grad():
    dist = vae.encode(torch.from_numpy(data.to_model_range(images).transpose(0, 3, 1, 2))).latent_dist
  np.testing.assert_allclose(mean, dist.mean.numpy().transpose(0, 2, 3, 1), atol=2e-5)
  np.testing.assert_allclose(logvar, dist.logvar.numpy().transpose(0, 2, 3, 1), atol=2e-5)
  return loaded


def test_pipeline_folder_gives_one_backbone_with_its_vae(pipeline, tmp_path):
  root, vae = pipeline
  out = convert.convert(str(root), str(tmp_path / 'bb'))
  assert checkpoints.read_backbone_meta(out)['model']['name'] == 'dit'
  loaded = _decodes_like_diffusers(out, vae)  # config.vae.source '' = the backbone's vae/
  assert loaded.meta['source'].endswith('vae') and len(loaded.meta['weights_sha256']) == 64
  # Found from the transformer/ folder too; --vae=none stores none.
  out2 = convert.convert(str(root / 'transformer'), str(tmp_path / 'bb2'))
  assert autoencoder.load_vae(ml_collections.ConfigDict(dict(
      backbone=out2, vae=dict(source='')))).fingerprint == loaded.fingerprint
  bare = convert.convert(str(root), str(tmp_path / 'bare'), vae='none')
  with pytest.raises(autoencoder.VAEError, match='no VAE at .*--config.vae.source'):
    autoencoder.load_vae(ml_collections.ConfigDict(dict(backbone=bare, vae=dict(source=''))))
  # A VAE on its own becomes a VAE directory, usable as config.vae.source.
  alone = convert.convert(str(root / 'vae'), str(tmp_path / 'vae_alone'))
  assert _decodes_like_diffusers('', vae, source=alone).fingerprint == loaded.fingerprint
  assert convert.main(['--source', str(root), '--out', str(tmp_path / 'cli')]) == 0


def test_original_pt_with_vae_flag(pipeline, tmp_path):
  from test_dit_original import to_original
  root, vae = pipeline
  path = tmp_path / 'DiT-tiny.pt'
  torch.save(to_original(diffusers_dit_reference(DIT)), str(path))
  arch = 'DiT-S/2,hidden_size=32,depth=2,num_heads=2'
  out = convert.convert(str(path), str(tmp_path / 'bb'), arch=arch, vae=str(root / 'vae'))
  _decodes_like_diffusers(out, vae)
  with pytest.raises(convert.ConversionError, match='--vae is for a latent backbone'):
    convert.vae_source.backbone_vae('google/ddpm-cifar10-32', str(root / 'vae'), 'o', latent=False)
  with pytest.raises(convert.ConversionError, match="is a 'DiTTransformer2DModel', not the "
                                                    'AutoencoderKL'):
    convert.convert(str(path), str(tmp_path / 'bad'), arch=arch, vae=str(root / 'transformer'))


def test_hub_vae_is_fetched_from_the_pipeline_repo_and_offline_says_what_to_do(
    pipeline, tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub import errors
  root, vae = pipeline
  calls = []

  def hub(repo_id, filename, subfolder=None, **kwargs):
    calls.append((repo_id, subfolder, filename))
    path = root / (subfolder or '') / filename
    if not path.is_file():
      raise errors.EntryNotFoundError(f'{filename} not in {subfolder}')
    return str(path)

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', hub)
  out = convert.convert('facebook/DiT-tiny', str(tmp_path / 'bb'))
  assert ('facebook/DiT-tiny', 'vae', 'config.json') in calls
  _decodes_like_diffusers(out, vae)

  def offline(repo_id, filename, subfolder=None, **kwargs):
    raise errors.LocalEntryNotFoundError('cannot reach the Hub and the file is not in the cache')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
  with pytest.raises(convert.SourceUnavailableError, match='--source=D'):
    convert.convert('stabilityai/sd-vae-ft-mse', str(tmp_path / 'vae'))
  with pytest.raises(convert.SourceUnavailableError, match='cannot be downloaded'):
    convert.vae_source.read_vae('stabilityai/sd-vae-ft-mse', str(tmp_path / 'v'))
