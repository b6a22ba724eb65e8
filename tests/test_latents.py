"""Latents computed once into shards: contents, resume, refusals, the training stream, and
ADM's centre crop.

The encoder here is a known function of the images (no VAE), so every stored row can be checked
exactly against the image it came from.
"""

import os

import ml_collections
import numpy as np
import pytest

from lees_jax import data, latents

N, SHARD, BATCH = 23, 8, 3  # 3 shards, the last one short; batches cross no shard edge


def _images(start, stop):
  idx = np.arange(start, stop)
  x = (idx[:, None, None, None] * 7 + np.arange(4 * 4 * 3).reshape(1, 4, 4, 3)) % 256
  return x.astype(np.uint8), (idx % 10).astype(np.int32)


def _encode(x):
  """'Posterior' of float images: mean = first two channels at half resolution, logvar = -mean."""
  mean = x[:, ::2, ::2, :2]
  return mean, -mean


IDENTITY = dict(dataset='toy', split='train', image_size=4, crop='none', vae='v1',
                latent_shape=[2, 2, 2], scaling_factor=0.5)


def _write(directory, encode=_encode, **kw):
  return latents.encode_split(_images, N, encode, str(directory),
                              identity=dict(IDENTITY, **kw), batch_size=BATCH, shard_size=SHARD,
                              log=lambda s: None)


def test_shards_hold_every_example_and_the_stream_samples_the_posterior(tmp_path):
  manifest = _write(tmp_path)
  assert manifest['num_shards'] == 3 and manifest['complete']
  ds = latents.LatentSet(str(tmp_path))
  idx = np.array([22, 0, 9, 8, 15])
  mean, logvar, labels = ds.rows(idx)
  want = data.to_model_range(_images(0, N)[0])[idx][:, ::2, ::2, :2]
  np.testing.assert_allclose(mean, want, atol=1e-3)  # float16 storage
  np.testing.assert_allclose(logvar, -want, atol=1e-3)
  np.testing.assert_array_equal(labels, idx % 10)

  # Batch s of the global stream: per-epoch permutation rows, z = (mean + e^(logvar/2) eps) * s,
  # the rows split between processes; the same for any process layout.
  whole = next(latents.train_iterator(str(tmp_path), global_batch_size=6, seed=3, start_step=4,
                                      process_index=0, process_count=1))
  halves = [next(latents.train_iterator(str(tmp_path), global_batch_size=6, seed=3, start_step=4,
                                        process_index=p, process_count=2)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), whole['image'])
  rows = data.subset_batch_indices(N, 3, 4, 6)
  m, lv, lab = ds.rows(rows)
  eps = np.random.default_rng(np.random.SeedSequence([3, 4, 2])).standard_normal(
      (6, 2, 2, 2), dtype=np.float32)
  np.testing.assert_allclose(whole['image'], (m + np.exp(0.5 * lv) * eps) * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(whole['label'], lab)


def test_a_killed_run_resumes_at_the_missing_shard(tmp_path):
  _write(tmp_path)
  os.remove(os.path.join(tmp_path, 'shard_00001.label.npy'))  # shard 1 unfinished
  calls = []
  _write(tmp_path, encode=lambda x: calls.append(len(x)) or _encode(x))
  assert sum(calls) == SHARD  # only shard 1 was encoded again
  assert latents.LatentSet(str(tmp_path)).num == N


def test_refusals_name_the_problem(tmp_path):
  _write(tmp_path)
  with pytest.raises(latents.LatentsError, match="vae: directory has 'v1', asked 'v2'"):
    _write(tmp_path, vae='v2')
  os.remove(os.path.join(tmp_path, 'shard_00002.mean.npy'))
  latents.open_latents.cache_clear()
  with pytest.raises(latents.LatentsError, match='missing 1 shard file'):
    latents.LatentSet(str(tmp_path))
  with pytest.raises(latents.LatentsError, match='no latents at .*run the `latents` mode'):
    latents.LatentSet(str(tmp_path / 'nothing'))


def test_a_latent_split_is_the_training_split_only():
  dc = ml_collections.ConfigDict(dict(dataset='cifar10_subset', train_split='train',
                                      latents_dir='/somewhere'))
  with pytest.raises(ValueError, match="latents of the 'train' split; split 'test' has none"):
    data.num_examples(dc, 'test')


def test_adm_center_crop():
  # An image exactly the target size is unchanged.
  img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(data.adm_center_crop(img, 16), img)
  # 40 x 64 to 8: box-halved while the short side >= 16 (40 -> 20 -> 10), bicubic to 8 x 13,
  # centre crop: columns 2..9. A bright square over rows 30-70 % and columns 37.5-62.5 % lands
  # on rows 2.4-5.6 and columns 2.9-6.1 of the crop.
  big = np.zeros((40, 64, 3), np.uint8)
  big[12:28, 24:40] = 255
  out = data.adm_center_crop(big, 8)
  assert out.shape == (8, 8, 3)
  assert out[4, 4, 0] > 200 and out[0, 0, 0] < 30 and out[7, 7, 0] < 30 and out[4, 0, 0] < 30


def test_a_latent_backbone_never_trains_on_images():
  import types
  from configs import imagenet256_dit
  from lees_jax import train
  c = imagenet256_dit.get_config('tiny')
  with pytest.raises(ValueError, match='DiT denoises VAE latents: set config.data.latents_dir'):
    train.training_batches(c, types.SimpleNamespace(random_flip=False), global_batch_size=8,
                           seed=0)
