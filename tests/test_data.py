"""Input pipelines: shapes, range, flips, determinism/resume, per-process splits, sharding."""

import jax
import ml_collections
import numpy as np
import pytest

from configs import cifar10
from lees_jax import data


def _data_config(dataset):
  c = cifar10.get_config('tiny').data
  c = ml_collections.ConfigDict(c.to_dict())
  c.dataset = dataset
  c.shuffle_buffer = 64
  return c


def _take(it, n):
  return [next(it)['image'] for _ in range(n)]


def _flipped_or_equal(a, b):
  """Per image: 1 if b == a, -1 if b is a mirrored, 0 otherwise."""
  out = []
  for x, y in zip(a, b):
    out.append(1 if np.array_equal(x, y) else (-1 if np.array_equal(x[:, ::-1], y) else 0))
  return np.array(out)


# --- the shipped subset ------------------------------------------------------------------


def test_subset_shapes_range_and_values():
  c = _data_config('cifar10_subset')
  images, labels = data.load_subset('train')
  assert images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3)
  assert labels.shape == (images.shape[0],)
  assert data.num_examples(c) == images.shape[0]
  batch = next(data.train_iterator(c, global_batch_size=16, seed=0, random_flip=False))['image']
  assert batch.shape == (16, 32, 32, 3) and batch.dtype == np.float32
  assert -1.0 <= batch.min() and batch.max() <= 1.0
  # Each image is an unmodified (rescaled) training image.
  idx = data.subset_batch_indices(images.shape[0], 0, 0, 16)
  np.testing.assert_array_equal(data.to_uint8(batch), images[idx])
  np.testing.assert_array_equal(batch, images[idx].astype(np.float32) / 127.5 - 1.0)


def test_subset_determinism_resume_and_epochs():
  c = _data_config('cifar10_subset')
  n = data.num_examples(c)
  a = _take(data.train_iterator(c, global_batch_size=32, seed=3), 6)
  b = _take(data.train_iterator(c, global_batch_size=32, seed=3), 6)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  resumed = _take(data.train_iterator(c, global_batch_size=32, seed=3, start_step=4), 2)
  np.testing.assert_array_equal(resumed[0], a[4])
  np.testing.assert_array_equal(resumed[1], a[5])
  other = _take(data.train_iterator(c, global_batch_size=32, seed=4), 1)
  assert not np.array_equal(other[0], a[0])
  # One epoch visits every example exactly once; batches straddle epoch boundaries.
  steps = -(-n // 32)
  idx = np.concatenate([data.subset_batch_indices(n, 3, s, 32) for s in range(steps)])
  np.testing.assert_array_equal(np.sort(idx[:n]), np.arange(n))
  assert len(set(idx[n:])) == len(idx[n:])  # the start of epoch 2, no repeats within it


def test_subset_random_flip():
  c = _data_config('cifar10_subset')
  plain = _take(data.train_iterator(c, global_batch_size=64, seed=1, random_flip=False), 2)
  flip = _take(data.train_iterator(c, global_batch_size=64, seed=1, random_flip=True), 2)
  rel = np.concatenate([_flipped_or_equal(p, f) for p, f in zip(plain, flip)])
  assert set(rel) <= {1, -1}  # every image either unchanged or mirrored left-right
  assert 0.25 < np.mean(rel == -1) < 0.75
  # Flips are part of the deterministic stream too.
  again = _take(data.train_iterator(c, global_batch_size=64, seed=1, random_flip=True), 2)
  np.testing.assert_array_equal(again[1], flip[1])


def test_subset_per_process_rows_compose_the_global_batch():
  c = _data_config('cifar10_subset')
  full = _take(data.train_iterator(c, global_batch_size=24, seed=2, process_index=0,
                                   process_count=1), 3)
  parts = [_take(data.train_iterator(c, global_batch_size=24, seed=2, process_index=p,
                                     process_count=3), 3) for p in range(3)]
  for s in range(3):
    np.testing.assert_array_equal(np.concatenate([parts[p][s] for p in range(3)]), full[s])
  with pytest.raises(ValueError, match='not divisible'):
    data.local_batch_size(10, 3)


# --- TFDS cifar10 (mocked: offline) -------------------------------------------------------


@pytest.fixture
def mocked_tfds(tfds_mock):
  with tfds_mock(num_examples=40):
    yield


def test_tfds_shapes_range_determinism_resume(mocked_tfds):
  del mocked_tfds
  c = _data_config('cifar10')
  assert data.num_examples(c) == 50_000  # published size when TFDS has no metadata
  a = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=False), 7)
  assert a[0].shape == (8, 32, 32, 3) and a[0].dtype == np.float32
  assert all(-1.0 <= x.min() and x.max() <= 1.0 for x in a)
  b = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=False), 7)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  resumed = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=False,
                                      start_step=5), 2)
  np.testing.assert_array_equal(resumed[0], a[5])
  np.testing.assert_array_equal(resumed[1], a[6])
  # 40 examples at batch 8: the stream wraps around into a reshuffled second epoch.
  assert not np.array_equal(a[5], a[0])


def test_tfds_random_flip(mocked_tfds):
  del mocked_tfds
  c = _data_config('cifar10')
  plain = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=False), 5)
  flip = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=True), 5)
  rel = np.concatenate([_flipped_or_equal(p, f) for p, f in zip(plain, flip)])
  assert set(rel) <= {1, -1}
  assert 0.15 < np.mean(rel == -1) < 0.85
  again = _take(data.train_iterator(c, global_batch_size=8, seed=5, random_flip=True,
                                    start_step=3), 1)
  np.testing.assert_array_equal(again[0], flip[3])


def test_tfds_process_splits_are_disjoint_and_cover():
  import tensorflow_datasets as tfds
  splits = [tfds.split_for_jax_process('train', process_index=p, process_count=4)
            for p in range(4)]
  # Resolved against CIFAR-10's 50,000 training examples: disjoint, contiguous, complete.
  bounds = []
  for s in splits:
    (instr,) = s.to_absolute({'train': tfds.core.SplitInfo(
        name='train', shard_lengths=[50_000], num_bytes=0)})
    bounds.append((instr.from_ or 0, 50_000 if instr.to is None else instr.to))
  assert bounds[0][0] == 0 and bounds[-1][1] == 50_000
  for (_, end), (start, _) in zip(bounds, bounds[1:]):
    assert end == start
  assert len({e - s for s, e in bounds}) == 1


def test_tf_does_not_see_gpus():
  tf = data.configure_tensorflow()
  assert tf.config.get_visible_devices('GPU') == []


# --- sharding -------------------------------------------------------------------------------


def test_shard_batch_and_replicate():
  mesh = data.make_mesh()
  x = np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)
  arr = data.shard_batch({'image': x}, mesh)['image']
  assert arr.shape == x.shape
  assert arr.sharding.spec == jax.sharding.PartitionSpec('batch')
  np.testing.assert_array_equal(np.asarray(arr), x)
  rep = data.replicate({'w': np.ones((2, 2), np.float32)}, mesh)['w']
  assert rep.sharding.is_fully_replicated
