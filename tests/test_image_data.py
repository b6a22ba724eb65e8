"""CelebA-HQ, CelebA and image folders: the crops and resizes against hand-computed oracles, the
folder data set (order, cache, errors), the TFDS names and the CelebA training stream."""

import os

import ml_collections
import numpy as np
import pytest

from configs import cifar10
from lees_jax import data, data_prep, image_folder, image_prep


def _data_config(**kw):
  c = ml_collections.ConfigDict(cifar10.get_config('tiny').data.to_dict())
  c.update(kw)
  return c


def _bilinear_half(x: np.ndarray) -> np.ndarray:
  """A 2x bilinear (triangle, antialiased: support scaled by 2) downsample, in float: PIL's and
  so torchvision-on-PIL's. Output pixel i is centred on source 2i + 1; its taps at 2i - 1 .. 2i + 2
  weigh (1, 3, 3, 1) / 8, renormalised where they leave the image."""
  w = np.array([1, 3, 3, 1], np.float64)

  def along(a, axis):
    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n = a.shape[0] // 2
    out = np.zeros((n,) + a.shape[1:])
    for i in range(n):
      taps = [(j, wj) for j, wj in zip(range(2 * i - 1, 2 * i + 3), w) if 0 <= j < a.shape[0]]
      out[i] = sum(a[j] * wj for j, wj in taps) / sum(wj for _, wj in taps)
    return np.moveaxis(out, 0, axis)

  return along(along(x, 0), 1)


def test_uvit_celeba_crop_is_the_box_then_bilinear():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
  out = image_prep.uvit_celeba_crop(image, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  want = _bilinear_half(image[57:185, 25:153])  # F.crop(top=121-64, left=89-64, 128, 128)
  assert np.abs(out.astype(np.float64) - want).max() <= 1.0  # PIL's 8-bit fixed point
  with pytest.raises(ValueError, match="needs CelebA's aligned 218x178"):
    image_prep.uvit_celeba_crop(image[:150], 64)


def test_box_resize_averages_blocks_of_the_centre_square():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
  out = image_prep.box_resize(image, 16)
  square = image[:, 32:288].astype(np.float64)
  want = square.reshape(16, 16, 16, 16, 3).mean(axis=(1, 3))
  assert np.abs(out - want).max() <= 1.0


def test_transform_names_and_errors():
  assert image_prep.transform(_data_config()) is None
  with pytest.raises(ValueError, match="unknown config.data.crop 'center'"):
    image_prep.transform(_data_config(crop='center'))
  with pytest.raises(ValueError, match='set it'):
    image_prep.transform(_data_config(crop='box', image_size=0))


def _write_images(folder, sizes, seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  arrays = []
  for i, (h, w) in enumerate(sizes):
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sub = os.path.join(folder, 'b' if i % 2 else 'a')
    os.makedirs(sub, exist_ok=True)
    Image.fromarray(a).save(os.path.join(sub, f'{i:03d}.png'))
    arrays.append(a)
  return arrays


def test_image_folder_order_transform_cache_and_stream(tmp_path):
  folder = str(tmp_path / 'faces')
  arrays = _write_images(folder, [(64, 64), (80, 64), (64, 96), (128, 128), (64, 64)])
  c = _data_config(dataset='image_folder', folder=folder, image_size=32, crop='box',
                   data_dir=str(tmp_path / 'cache'))
  # Sorted relative paths: a/000, a/002, a/004, b/001, b/003.
  order = [0, 2, 4, 1, 3]
  assert image_folder.list_images(folder) == [f'{"b" if i % 2 else "a"}/{i:03d}.png' for i in order]
  images = data.split_images(c, 'train')
  assert images.shape == (5, 32, 32, 3)
  for got, i in zip(images, order):
    np.testing.assert_array_equal(got, image_prep.box_resize(arrays[i], 32))
  cached = os.listdir(image_folder.cache_dir(c))
  assert len(cached) == 1 and cached[0].endswith('.npz')
  assert data.num_examples(c) == 5 and data.num_examples(c, 'train[1:3]') == 2
  # The stream: in [-1, 1], per-epoch permutations of the five, labels -1, resumable.
  it = data.train_iterator(c, global_batch_size=5, seed=0, random_flip=False)
  batch = next(it)
  assert batch['image'].shape == (5, 32, 32, 3) and set(batch['label']) == {-1}
  np.testing.assert_array_equal(np.sort(batch['image'].reshape(5, -1), axis=0),
                                np.sort(data.to_model_range(images).reshape(5, -1), axis=0))
  second = next(it)['image']
  np.testing.assert_array_equal(next(data.train_iterator(c, global_batch_size=5, seed=0,
                                                         random_flip=False, start_step=1))['image'],
                                second)
  # A new file is a new cache entry; the folder itself is never written.
  _write_images(str(tmp_path / 'faces' / 'c'), [(64, 64)], seed=3)
  assert data.num_examples(c) == 6 and len(os.listdir(image_folder.cache_dir(c))) == 2
  assert all(n.endswith('.png') for _, _, ns in os.walk(folder) for n in ns)


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    data.num_examples(_data_config(dataset='image_folder', folder=str(tmp_path / 'nope')))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='no image files'):
    data.num_examples(_data_config(dataset='image_folder', folder=str(tmp_path / 'empty')))
  folder = str(tmp_path / 'faces')
  _write_images(folder, [(48, 48)])
  c = _data_config(dataset='image_folder', folder=folder, image_size=32,
                   data_dir=str(tmp_path / 'cache'))
  with pytest.raises(ValueError, match=r"is 48x48, not 32x32, and config.data.crop='none'"):
    data.num_examples(c)
  with pytest.raises(ValueError, match="one split, 'train'"):
    data.num_examples(c, 'test')
  with open(os.path.join(folder, 'a', 'broken.png'), 'wb') as f:
    f.write(b'not a png')
  c.crop = 'box'
  with pytest.raises(ValueError, match='cannot read image .*broken.png'):
    data.num_examples(c)


def test_tfds_names_of_a_config():
  assert data.tfds_name(_data_config(dataset='celeb_a_hq', image_size=64)) == 'celeb_a_hq/64'
  with pytest.raises(ValueError, match='power-of-two sizes up to 1024'):
    data.tfds_name(_data_config(dataset='celeb_a_hq', image_size=48))
  assert data.tfds_name(_data_config(dataset='celeb_a', crop='uvit_celeba', image_size=64)) == 'celeb_a'
  config = cifar10.get_config('tiny')
  config.data.update(dataset='celeb_a_hq', image_size=64)
  assert data_prep.config_datasets(config) == ['celeb_a_hq/64']
  config.data.update(dataset='image_folder')
  assert data_prep.config_datasets(config) == []
  assert data.dataset_tag(_data_config(dataset='celeb_a', crop='uvit_celeba', image_size=64)
                          ) == 'celeb_a_uvit_celeba64'


def test_celeb_a_stream_applies_the_crop(tfds_mock):
  """TFDS celeb_a (218x178 under mock_data): the training stream and the FID reference images
  are U-ViT's crop of the same examples."""
  c = _data_config(dataset='celeb_a', crop='uvit_celeba', image_size=16, shuffle_buffer=1)
  with tfds_mock(num_examples=6):
    reference = data.split_images(c, 'train')
    assert reference.shape == (6, 16, 16, 3)
    raw = np.stack([ex['image'] for ex in data_prep.prepare('celeb_a').as_dataset(
        split='train', shuffle_files=False).as_numpy_iterator()])
    np.testing.assert_array_equal(reference, [image_prep.uvit_celeba_crop(x, 16) for x in raw])
    batch = next(data.train_iterator(c, global_batch_size=6, seed=0, random_flip=False))
  assert batch['image'].shape == (6, 16, 16, 3) and set(batch['label']) == {-1}
  got = {data.to_uint8(x).tobytes() for x in batch['image']}
  assert got <= {x.tobytes() for x in reference}
