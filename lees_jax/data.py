"""Input pipelines: CIFAR-10 / ImageNet / CelebA-HQ / CelebA through TFDS, a folder of images
(`lees_jax.image_folder`), the shipped real-CIFAR-10 subset, or precomputed autoencoder latents (`lees_jax.latents`, when ``config.data.latents_dir`` is set:
a latent backbone's training examples); device sharding.

One interface (`train_iterator`), yielding this process's part of each global batch as
``{'image': float32 (local_batch, H, W, C), 'label': int32 (local_batch,)}``: images in
[-1, 1], or a latent backbone's scaled latents (its x0); the class labels a conditional backbone
trains on (an unconditional one never reads them, and the images do not depend on them):

* ``config.data.dataset='cifar10'`` -- ``tfds.load`` with a per-process split
  (`tfds.split_for_jax_process`), seeded file and example shuffling, optional random
  horizontal flip (stateless, keyed by the example's position in the stream), prefetch.
  Resuming at step s skips the first ``s * local_batch`` examples of the same seeded stream,
  so the order is reproducible given a deterministic TFDS read (same data files, same TF
  version); skipping reads and discards those examples, which takes seconds for CIFAR-10.
  The same for ``'imagenet2012'``, ``'celeb_a_hq'`` (TFDS ``celeb_a_hq/<image_size>``, a manual
  download; its 30,000 images form split 'train') and ``'celeb_a'`` (TFDS ``celeb_a``, train /
  validation / test), each image transformed as ``config.data.crop`` says
  (`lees_jax.image_prep`: e.g. U-ViT's CelebA crop) before it is scaled and flipped.
* ``config.data.dataset='cifar10_subset'`` -- the real CIFAR-10 images shipped in
  ``lees_jax/data/cifar10_subset.npz`` (offline runs and tests). Batch s of the global stream
  is a pure function of (seed, s): the stream concatenates one numpy permutation per epoch
  seeded by (seed, epoch), and flips are drawn per (seed, s). Every process builds only its
  own rows of the global batch, so the global batch is the same for any number of hosts and
  devices.
* ``config.data.dataset='image_folder'`` -- the image files under ``config.data.folder``,
  transformed and cached once (`lees_jax.image_folder`), streamed as the subset is.

TensorFlow is imported inside the functions that need it and never sees an accelerator
(``tf.config.set_visible_devices([], 'GPU')``): models and samplers import no TF.

Sharding: a 1-D `Mesh` over all devices with axis ``'batch'``; batches are sharded along
it (`shard_batch` builds the global array from each process's local rows with
``jax.make_array_from_process_local_data``) and parameters are replicated.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lees_jax import image_prep

BATCH_AXIS = 'batch'
SUBSET = 'cifar10_subset'
SUBSET_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'cifar10_subset.npz')
IMAGENET = 'imagenet2012'
CELEBA_HQ = 'celeb_a_hq'
CELEBA = 'celeb_a'
FOLDER = 'image_folder'
DATASETS = ('cifar10', SUBSET, IMAGENET, CELEBA_HQ, CELEBA, FOLDER)
IN_MEMORY = (SUBSET, FOLDER)  # held as uint8 arrays; every other data set is read through TFDS
# Used when TFDS has no metadata for a split (e.g. under tfds.testing.mock_data).
_KNOWN_SIZES = {('cifar10', 'train'): 50_000, ('cifar10', 'test'): 10_000}
# The value range and ADM's crop live in lees_jax.image_prep; callers also reach them here.
to_model_range, to_uint8 = image_prep.to_model_range, image_prep.to_uint8
adm_center_crop, CROPS = image_prep.adm_center_crop, image_prep.CROPS


# ---------------------------------------------------------------------------
# TensorFlow, kept off the accelerators.
# ---------------------------------------------------------------------------


def configure_tensorflow():
  """Imports TensorFlow with every GPU hidden from it; returns the module.

  Call before anything (TFDS, CLU's TensorBoard writer) makes TF touch the devices.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # devices already initialised: they were hidden by an earlier call
    pass
  return tf


# ---------------------------------------------------------------------------
# Images.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _load_subset(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'the shipped CIFAR-10 subset is missing: expected {path} (keys '
                            'train_images/train_labels/test_images/test_labels, uint8 NHWC)')
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def load_subset(split: str = 'train', path: str = '') -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, 32, 32, 3), labels (N,)) of the shipped subset's ``split``."""
  d = _load_subset(path or SUBSET_PATH)
  key = split.split('[')[0]
  if f'{key}_images' not in d:
    raise ValueError(f'unknown split {split!r} of {SUBSET}; available: train, test')
  return d[f'{key}_images'], d[f'{key}_labels']


def _latents_dir(data_config, split: str) -> str:
  """The latents directory that stands for ``split`` (the training split of a latent
  backbone, `lees_jax.latents`), or '' when examples are the dataset's images."""
  directory = data_config.get('latents_dir', '')
  if directory and split != data_config.train_split:
    raise ValueError(f'config.data.latents_dir holds latents of the {data_config.train_split!r} '
                     f'split; split {split!r} has none')
  return directory


def _check_dataset(name: str):
  if name not in DATASETS:
    raise ValueError(f'unknown config.data.dataset {name!r}; choose one of {DATASETS}')


def tfds_name(data_config) -> str:
  """The TFDS name a TFDS-backed config reads: CelebA-HQ's resolution is a TFDS config
  (``celeb_a_hq/64``: the dataset tool's box-downsampled images, no crop needed)."""
  _check_dataset(data_config.dataset)
  if data_config.dataset in IN_MEMORY:
    raise ValueError(f'{data_config.dataset} is not a TFDS data set')
  if data_config.dataset == CELEBA_HQ:
    size = int(data_config.get('image_size', 0) or 0)
    if size not in [2 ** i for i in range(11)]:
      raise ValueError(f'celeb_a_hq comes in power-of-two sizes up to 1024 (TFDS celeb_a_hq/64, '
                       f'...); config.data.image_size is {size}')
    return f'{CELEBA_HQ}/{size}'
  return data_config.dataset


def dataset_tag(data_config) -> str:
  """The data set and its transform in a file name: 'cifar10', 'celeb_a_uvit_celeba64'."""
  crop = data_config.get('crop', 'none')
  return data_config.dataset + ('' if crop == 'none' else f'_{crop}{int(data_config.image_size)}')


def memory_images(data_config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, int32 labels, -1 = none) of ``split`` of an in-memory data set, sliced and
  transformed as ``data_config.crop`` says."""
  if data_config.dataset == SUBSET:
    images, labels = load_subset(split, data_config.get('subset_path', ''))
    sl = _split_slice(split, images.shape[0])
    transform = image_prep.transform(data_config)
    if transform is None:
      return images[sl], labels[sl]
    return np.stack([transform(im) for im in images[sl]]), labels[sl]
  from lees_jax import image_folder  # pylint: disable=g-import-not-at-top
  image_folder.check_split(split)
  images = image_folder.load(data_config)  # transformed before it was cached
  labels = np.full((images.shape[0],), -1, np.int32)
  sl = _split_slice(split, images.shape[0])
  return images[sl], labels[sl]


def num_examples(data_config, split: str | None = None) -> int:
  """Number of examples in ``split`` (default: the training split) of the configured dataset."""
  split = split or data_config.train_split
  _check_dataset(data_config.dataset)
  if _latents_dir(data_config, split):
    from lees_jax import latents  # pylint: disable=g-import-not-at-top
    return len(latents.open_latents(_latents_dir(data_config, split)))
  if data_config.dataset in IN_MEMORY:
    return int(memory_images(data_config, split)[0].shape[0])
  from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
  splits = data_prep.prepare(tfds_name(data_config), data_config.data_dir or None).info.splits
  if split in splits:
    return int(splits[split].num_examples)
  if (data_config.dataset, split) in _KNOWN_SIZES:  # no split metadata (tfds.testing.mock_data)
    return _KNOWN_SIZES[(data_config.dataset, split)]
  raise ValueError(f'{data_config.dataset} has no split {split!r}; it has {sorted(splits)}')


# ---------------------------------------------------------------------------
# Per-process shares of a global batch.
# ---------------------------------------------------------------------------


def local_batch_size(global_batch_size: int, process_count: int | None = None) -> int:
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the number of '
                     f'processes ({process_count})')
  return global_batch_size // process_count


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows of a global batch that process ``process_index`` provides."""
  n = local_batch_size(global_batch_size, process_count)
  return slice(process_index * n, (process_index + 1) * n)


def subset_batch_indices(num: int, seed: int, step: int, global_batch_size: int) -> np.ndarray:
  """Example indices of global batch ``step``: an infinite stream of per-epoch permutations."""
  start, end = step * global_batch_size, (step + 1) * global_batch_size
  out, pos = [], start
  while pos < end:
    epoch, offset = divmod(pos, num)
    perm = _permutation(num, seed, epoch)
    take = min(end - pos, num - offset)
    out.append(perm[offset:offset + take])
    pos += take
  return np.concatenate(out)


@functools.lru_cache(maxsize=4)
def _permutation(num: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng(np.random.SeedSequence([seed, epoch, 0])).permutation(num)


def _subset_flips(seed: int, step: int, global_batch_size: int) -> np.ndarray:
  return np.random.default_rng(np.random.SeedSequence([seed, step, 1])).random(global_batch_size) < 0.5


def _memory_iterator(data_config, split, global_batch_size, seed, start_step, random_flip,
                     process_index, process_count) -> Iterator[dict[str, np.ndarray]]:
  images, labels = memory_images(data_config, split)
  if images.shape[0] < 1:
    raise ValueError(f'split {split!r} of {data_config.dataset} is empty')
  rows = process_rows(global_batch_size, process_index, process_count)
  step = start_step
  while True:
    idx = subset_batch_indices(images.shape[0], seed, step, global_batch_size)[rows]
    x = images[idx]
    if random_flip:
      flip = _subset_flips(seed, step, global_batch_size)[rows]
      x = np.where(flip[:, None, None, None], x[:, :, ::-1], x)
    yield {'image': to_model_range(x), 'label': labels[idx].astype(np.int32)}
    step += 1


def _tfds_iterator(data_config, split, global_batch_size, seed, start_step, random_flip,
                   process_index, process_count) -> Iterator[dict[str, np.ndarray]]:
  from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
  builder = data_prep.prepare(tfds_name(data_config), data_config.data_dir or None)
  tf = configure_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  transform = image_prep.transform(data_config)
  size = int(data_config.get('image_size', 0) or 0)

  local = local_batch_size(global_batch_size, process_count)
  process_split = tfds.split_for_jax_process(split, process_index=process_index,
                                             process_count=process_count)
  ds = builder.as_dataset(split=process_split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=seed))
  # (image, label): the label rides along through shuffling and flips (a dataset without
  # labels gets -1), so the image stream is that of the images alone.
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32) if 'label' in ex
                          else tf.constant(-1, tf.int32)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.shuffle_buffer > 1:
    ds = ds.shuffle(data_config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  ds = ds.repeat().enumerate()
  if start_step:
    ds = ds.skip(start_step * local)
  flip_seed = np.int64(seed) * 1000 + process_index  # distinct streams per process

  def prepare(i, example):
    image, label = example
    if transform is not None:  # the crop in numpy/PIL: the same pixels as FID references
      image = tf.numpy_function(transform, [image], tf.uint8, stateful=False)
      image.set_shape((size, size, 3))
    x = tf.cast(image, tf.float32) / 127.5 - 1.0
    if random_flip:
      x = tf.image.stateless_random_flip_left_right(x, seed=tf.stack([flip_seed, i]))
    return {'image': x, 'label': label}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds.as_numpy_iterator()


def train_iterator(data_config, *, global_batch_size: int, seed: int, start_step: int = 0,
                   random_flip: bool | None = None, split: str | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator of this process's rows of global batches ``start_step, start_step+1, ...``.

  ``random_flip`` defaults to ``data_config.random_flip``.
  """
  _check_dataset(data_config.dataset)
  split = split or data_config.train_split
  random_flip = data_config.random_flip if random_flip is None else random_flip
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if _latents_dir(data_config, split):
    from lees_jax import latents  # pylint: disable=g-import-not-at-top
    return latents.train_iterator(_latents_dir(data_config, split),
                                  global_batch_size=global_batch_size, seed=int(seed),
                                  start_step=int(start_step), process_index=process_index,
                                  process_count=process_count)
  args = (data_config, split, global_batch_size, int(seed), int(start_step), bool(random_flip),
          process_index, process_count)
  if data_config.dataset in IN_MEMORY:
    return _memory_iterator(*args)
  return _tfds_iterator(*args)


# ---------------------------------------------------------------------------
# Device mesh and sharding.
# ---------------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: every device of every process), axis 'batch'."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh):
  if global_batch_size % mesh.size:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'{mesh.size} devices of the mesh')


def shard_batch(local_batch: Any, mesh: Mesh):
  """This process's rows -> global arrays sharded over the mesh's batch axis."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def replicate(tree: Any, mesh: Mesh):
  """Host values (identical on every process) -> arrays replicated on every device of the mesh."""
  sharding = replicated_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree_util.tree_map(put, tree)


def split_images(data_config, split: str) -> np.ndarray:
  """Every image of ``split`` as uint8 NHWC, in dataset order (FID references), transformed as
  ``data_config.crop`` says (`lees_jax.image_prep`)."""
  _check_dataset(data_config.dataset)
  if data_config.dataset in IN_MEMORY:
    return memory_images(data_config, split)[0]
  if image_prep.transform(data_config) is not None:
    return np.stack([image for image, _ in iter_examples(data_config, split)])
  return tfds_images(tfds_name(data_config), split, data_config.data_dir)


def iter_examples(data_config, split: str, start: int = 0) -> Iterator[tuple[np.ndarray, int]]:
  """(uint8 image, label) of ``split`` from example ``start`` on, in dataset order, transformed
  as ``data_config.crop`` says (`lees_jax.image_prep`)."""
  _check_dataset(data_config.dataset)
  if data_config.dataset in IN_MEMORY:
    images, labels = memory_images(data_config, split)
    for image, label in zip(images[start:], labels[start:]):
      yield image, int(label)
    return
  transform = image_prep.transform(data_config)
  from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
  builder = data_prep.prepare(tfds_name(data_config), data_config.data_dir or None)
  configure_tensorflow()
  sub = split if not start else f'{split}[{start}:]' if '[' not in split else None
  if sub is None:
    raise ValueError(f'cannot resume inside the sliced split {split!r}; use a whole split')
  for ex in builder.as_dataset(split=sub, shuffle_files=False).as_numpy_iterator():
    yield (ex['image'] if transform is None else transform(ex['image'])), int(ex.get('label', -1))


def tfds_images(name: str, split: str, data_dir: str = '') -> np.ndarray:
  """Every image of TFDS ``name``'s ``split`` as uint8 NHWC, in dataset order (prepared first)."""
  from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
  builder = data_prep.prepare(name, data_dir or None)
  tf = configure_tensorflow()
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: ex['image'], num_parallel_calls=tf.data.AUTOTUNE).batch(1000)
  return np.concatenate([np.asarray(b, np.uint8) for b in ds.as_numpy_iterator()])


def _split_slice(split: str, n: int) -> slice:
  """The slice of a TFDS-style split string: 'test' -> all, 'test[:64]', 'train[100:200]'."""
  if '[' not in split:
    return slice(None)
  inner = split[split.index('[') + 1:split.rindex(']')]
  try:
    a, _, b = inner.partition(':')
    return slice(int(a) if a else None, int(b) if b else None)
  except ValueError:
    raise ValueError(f'unsupported split slice {split!r}; use e.g. test[:64] or train[100:200]') from None
