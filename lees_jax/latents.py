"""Autoencoder latents of an image dataset, computed once into shards (a latent backbone's data).

DiT trains and is fine-tuned on SD-VAE latents of ImageNet images. Encoding 1.28M images at
every step of every gate-training or fine-tuning run would cost more than the runs themselves,
so the ``latents`` mode encodes a split once into ``<dir>/``:

  manifest.json           -- what was encoded: dataset, split, image size and crop, the VAE's
                             fingerprint, latent shape, scaling factor, shard size, count
  shard_<i>.mean.npy      -- float16 (n, h, w, c) posterior means of the shard's images
  shard_<i>.logvar.npy    -- float16 (n, h, w, c) posterior log-variances
  shard_<i>.label.npy     -- int32 (n,) class labels

Each shard is written atomically (temporary name, then rename), so a killed run resumes at the
first missing shard; a directory encoded from another dataset, split or VAE is refused by name,
never mixed. Training reads the shards memory-mapped and draws z = (mean + exp(logvar / 2) * e)
* scaling_factor with e keyed by (seed, step) -- DiT's ``latent_dist.sample() * 0.18215``, the
sample fresh at every step as when DiT encodes on the fly. The stored images are not flipped
(DiT's training flips images before encoding; gate training and ASE fine-tuning here use no
augmentation, and pretraining a latent backbone reads no flips).

Batch s of the stream is a pure function of (seed, s), as for the CIFAR-10 subset (`data`):
per-epoch permutations seeded by (seed, epoch), each process reading only its own rows.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable, Iterator

import numpy as np

from lees_jax import data, files

MANIFEST = 'manifest.json'
FORMAT = 'lees_jax.latents'
# Fields of the manifest that say what was encoded; a resumed or reused directory must match.
IDENTITY = ('dataset', 'split', 'image_size', 'crop', 'vae', 'latent_shape', 'scaling_factor',
            'shard_size', 'num_examples')


class LatentsError(ValueError):
  """A latents directory is missing, incomplete, or encodes something other than asked."""


def _shard(directory: str, i: int, what: str) -> str:
  return os.path.join(directory, f'shard_{i:05d}.{what}.npy')


def _save_atomic(path: str, array: np.ndarray):
  tmp = path + '.tmp.npy'  # np.save keeps a name ending in .npy as it is
  np.save(tmp, array)
  os.replace(tmp, path)


def _shard_done(directory: str, i: int) -> bool:
  return all(os.path.isfile(_shard(directory, i, w)) for w in ('mean', 'logvar', 'label'))


def _check_manifest(directory: str, want: dict) -> None:
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    return
  have = files.read_json(path)
  diffs = [f'{k}: directory has {have.get(k)!r}, asked {want.get(k)!r}' for k in IDENTITY
           if have.get(k) != want.get(k)]
  if diffs:
    raise LatentsError(f'{directory} holds latents of something else ({"; ".join(diffs)}); choose '
                       'another config.data.latents_dir or move that directory away')


def encode_split(images: Callable[[int, int], tuple[np.ndarray, np.ndarray]], num: int,
                 encode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], directory: str, *,
                 identity: dict, batch_size: int, shard_size: int,
                 log: Callable[[str], None] = print) -> dict:
  """Encodes examples [0, num) into ``directory`` shard by shard, skipping finished shards.

  ``images(start, stop)`` returns (uint8 NHWC images, labels) of those examples;
  ``encode(float images in [-1, 1])`` the posterior (mean, logvar) of a batch. ``identity``
  (the `IDENTITY` fields but ``shard_size`` and ``num_examples``) goes into the manifest.
  """
  if num < 1:
    raise LatentsError(f'nothing to encode: {identity.get("dataset")}/{identity.get("split")} '
                       'is empty')
  os.makedirs(directory, exist_ok=True)
  want = dict(format=FORMAT, **identity, shard_size=int(shard_size), num_examples=int(num))
  _check_manifest(directory, want)
  # The manifest goes first, so that a second run (or another process) sees what is in progress.
  files.write_json(os.path.join(directory, MANIFEST), dict(want, complete=False))
  num_shards = -(-num // shard_size)
  todo = [i for i in range(num_shards) if not _shard_done(directory, i)]
  if len(todo) < num_shards:
    log(f'latents: {num_shards - len(todo)} of {num_shards} shards already in {directory}')
  t0, done = time.perf_counter(), 0
  for i in todo:
    start, stop = i * shard_size, min((i + 1) * shard_size, num)
    means, logvars, labels = [], [], []
    for b in range(start, stop, batch_size):
      x, y = images(b, min(b + batch_size, stop))
      mean, logvar = encode(data.to_model_range(x))
      means.append(np.asarray(mean, np.float16))
      logvars.append(np.asarray(logvar, np.float16))
      labels.append(np.asarray(y, np.int32))
    # Labels last: a shard counts as done only when all three files exist.
    _save_atomic(_shard(directory, i, 'mean'), np.concatenate(means))
    _save_atomic(_shard(directory, i, 'logvar'), np.concatenate(logvars))
    _save_atomic(_shard(directory, i, 'label'), np.concatenate(labels))
    done += stop - start
    elapsed = time.perf_counter() - t0
    left = sum(min((j + 1) * shard_size, num) - j * shard_size for j in todo) - done
    log(f'latents: shard {i + 1}/{num_shards} ({stop}/{num} images), {elapsed:.0f}s elapsed, '
        f'ETA {elapsed / done * left:.0f}s')
  manifest = dict(want, complete=True, num_shards=num_shards)
  files.write_json(os.path.join(directory, MANIFEST), manifest)
  return manifest


class LatentSet:
  """A complete latents directory, memory-mapped: ``rows(idx) -> (mean, logvar, labels)``."""

  def __init__(self, directory: str):
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
      raise LatentsError(f'no latents at {directory!r} (no {MANIFEST}): run the `latents` mode '
                         'first (python -m lees_jax.main --config=... --config.mode=latents '
                         '--workdir=W), or set config.data.latents_dir to a directory it wrote')
    self.manifest = files.read_json(path)
    if self.manifest.get('format') != FORMAT:
      raise LatentsError(f'{path} is not a lees_jax latents manifest')
    if not self.manifest.get('complete'):
      raise LatentsError(f'the latents in {directory} are incomplete (a `latents` run was '
                         'stopped): run the `latents` mode again to finish them')
    self.directory = directory
    self.num = int(self.manifest['num_examples'])
    self.shard_size = int(self.manifest['shard_size'])
    self.scaling_factor = float(self.manifest['scaling_factor'])
    self.shape = tuple(self.manifest['latent_shape'])
    n = int(self.manifest['num_shards'])
    missing = [_shard(directory, i, w) for i in range(n) for w in ('mean', 'logvar', 'label')
               if not os.path.isfile(_shard(directory, i, w))]
    if missing:
      raise LatentsError(f'{directory} is missing {len(missing)} shard file(s), e.g. '
                         f'{missing[0]}: run the `latents` mode again to rewrite them')
    self._shards = [tuple(np.load(_shard(directory, i, w), mmap_mode='r')
                          for w in ('mean', 'logvar', 'label')) for i in range(n)]

  def __len__(self) -> int:
    return self.num

  def rows(self, idx: np.ndarray):
    idx = np.asarray(idx)
    out = [np.empty((len(idx),) + self.shape, np.float32) for _ in range(2)]
    labels = np.empty((len(idx),), np.int32)
    shard, offset = np.divmod(idx, self.shard_size)
    for s in np.unique(shard):
      where = np.nonzero(shard == s)[0]
      mean, logvar, label = self._shards[s]
      out[0][where] = mean[offset[where]]
      out[1][where] = logvar[offset[where]]
      labels[where] = label[offset[where]]
    return out[0], out[1], labels


@functools.lru_cache(maxsize=2)
def open_latents(directory: str) -> LatentSet:
  return LatentSet(os.path.abspath(directory))


def _noise(seed: int, step: int, shape) -> np.ndarray:
  return np.random.default_rng(np.random.SeedSequence([seed, step, 2])).standard_normal(
      shape, dtype=np.float32)


def train_iterator(directory: str, *, global_batch_size: int, seed: int, start_step: int,
                   process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
  """This process's rows of global batches start_step, ...: ``{'image': scaled latents
  (the network's x0), 'label': int32}``."""
  ds = open_latents(directory)
  rows = data.process_rows(global_batch_size, process_index, process_count)
  step = start_step
  while True:
    idx = data.subset_batch_indices(len(ds), seed, step, global_batch_size)
    mean, logvar, labels = ds.rows(idx[rows])
    eps = _noise(seed, step, (global_batch_size,) + ds.shape)[rows]
    z = (mean + np.exp(0.5 * logvar) * eps) * np.float32(ds.scaling_factor)
    yield {'image': z.astype(np.float32), 'label': labels}
    step += 1


class _SequentialImages:
  """``images(start, stop)`` for `encode_split` over a stream: reopened only where a resumed
  run starts (a TFDS split is read in order, not by index)."""

  def __init__(self, data_config, split: str, image_shape: tuple[int, int, int]):
    self.data_config, self.split, self.shape = data_config, split, image_shape
    self._stream, self._pos = None, None

  def __call__(self, start: int, stop: int):
    if self._pos != start:
      self._stream, self._pos = data.iter_examples(self.data_config, self.split, start), start
    batch = [next(self._stream) for _ in range(stop - start)]
    self._pos = stop
    images = np.stack([image for image, _ in batch])
    if images.shape[1:] != self.shape:
      raise LatentsError(f'{self.data_config.dataset}/{self.split} gives {images.shape[1:]} images, '
                         f'config.data.image_size says {self.shape}: set image_size (and '
                         "config.data.crop='adm' for images of other sizes)")
    return images, np.array([label for _, label in batch], np.int32)


def run(config, workdir: str) -> dict:
  """``config.mode=latents``: encodes ``config.data``'s training split with the VAE of
  ``config.vae`` into ``config.data.latents_dir`` ('' = ``<workdir>/latents``); resumable.
  Returns the manifest."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from lees_jax import autoencoder, models  # pylint: disable=g-import-not-at-top
  model = models.build_model(config.model)
  if model.input.kind != 'latents':
    raise LatentsError(f'config.mode=latents: {type(model).__name__} denoises {model.input.kind}, '
                       'not latents; nothing to encode')
  if jax.process_count() > 1:
    raise LatentsError('the latents mode runs in one process: run it once on one host, then '
                       'point every host to the directory (config.data.latents_dir)')
  vae = autoencoder.load_vae(config)
  size = int(config.data.image_size)
  image_shape = (size, size, vae.model.spec.in_channels)
  autoencoder.check_fits(vae.model, model, image_shape)
  directory = config.data.latents_dir or files.join(workdir, 'latents')
  images_config = ml_collections.ConfigDict(config.data.to_dict())
  images_config.latents_dir = ''  # count and read the images themselves
  split = config.data.train_split
  identity = dict(dataset=config.data.dataset, split=split, image_size=size,
                  crop=config.data.get('crop', 'none'), vae=vae.fingerprint,
                  latent_shape=list(model.input.shape),
                  scaling_factor=float(vae.model.spec.scaling_factor))
  print(f'latents: encoding {config.data.dataset}/{split} at {size}x{size} into {directory} '
        f'(VAE {vae.meta.get("source")}, fingerprint {vae.fingerprint[:12]})', flush=True)
  manifest = encode_split(_SequentialImages(images_config, split, image_shape),
                          data.num_examples(images_config, split),
                          autoencoder.encoder(vae.model, vae.params), directory,
                          identity=identity, batch_size=int(config.vae.batch_size),
                          shard_size=int(config.data.latents_shard_size))
  print(f'latents: {manifest["num_examples"]} examples in {manifest["num_shards"]} shards at '
        f'{directory}', flush=True)
  return manifest
