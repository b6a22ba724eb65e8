"""A folder of image files as a data set (``config.data.dataset='image_folder'``): CelebA-HQ as
many copies circulate (1024x1024 PNGs), CelebA's ``img_align_celeba/``, or a user's own images.

Every image file under ``config.data.folder`` (recursively; .png, .jpg, .jpeg, .webp, .bmp), in
the order of their paths relative to the folder, is one example of split ``'train'`` (sliced
splits such as ``'train[:162770]'`` select by that order: CelebA's own train split is the first
162,770 files of ``img_align_celeba/``). Images are transformed as ``config.data.crop`` says
(`lees_jax.image_prep`) to ``config.data.image_size``; there are no labels.

Decoding tens of thousands of large PNGs takes minutes, so the transformed uint8 array is cached
once in ``<cache>/<key>.npz`` (``<cache>`` = ``config.data.data_dir`` or ``~/.cache/lees_jax``,
``image_folder/`` below it), the key hashing the folder, every file's name, size and mtime, the
crop and the size: a changed folder gets a new cache entry, and nothing in the folder is written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np

from lees_jax import image_prep

EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
SPLIT = 'train'


def list_images(folder: str) -> list[str]:
  """Relative paths of the image files under ``folder``, sorted."""
  folder = os.path.expanduser(folder)
  if not folder or not os.path.isdir(folder):
    raise FileNotFoundError(f"config.data.folder={folder!r} is not a directory: point it at the "
                            "folder of images (e.g. CelebA-HQ's 1024x1024 PNGs)")
  found = []
  for root, _, names in os.walk(folder):
    for name in names:
      if name.lower().endswith(EXTENSIONS):
        found.append(os.path.relpath(os.path.join(root, name), folder))
  if not found:
    raise FileNotFoundError(f'no image files ({", ".join(EXTENSIONS)}) under {folder}')
  return sorted(found)


def _cache_key(folder: str, names: list[str], crop: str, size: int) -> str:
  h = hashlib.sha256(json.dumps([os.path.realpath(folder), crop, size]).encode())
  for name in names:
    st = os.stat(os.path.join(folder, name))
    h.update(f'{name}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:20]


def cache_dir(data_config) -> str:
  base = data_config.get('data_dir', '') or os.path.join('~', '.cache', 'lees_jax')
  return os.path.join(os.path.expanduser(base), 'image_folder')


def _decode(folder: str, name: str, prepare, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = os.path.join(folder, name)
  try:
    with Image.open(path) as im:
      arr = np.asarray(im.convert('RGB'))
  except OSError as e:
    raise ValueError(f'cannot read image {path} ({e}): remove or replace the file') from None
  if prepare is not None:
    return prepare(arr)
  if arr.shape[:2] != (size, size):
    raise ValueError(f"{path} is {arr.shape[1]}x{arr.shape[0]}, not {size}x{size}, and "
                     "config.data.crop='none': set config.data.crop='box' (centre square, "
                     "area-average resize) or 'uvit_celeba' (U-ViT's CelebA crop)")
  return arr


def load(data_config) -> np.ndarray:
  """Every image of the folder, transformed: uint8 (N, S, S, 3) (from the cache when there)."""
  folder = os.path.expanduser(data_config.get('folder', ''))
  names = list_images(folder)
  crop, size = data_config.get('crop', 'none'), int(data_config.get('image_size', 0))
  image_prep.transform_for(crop, size)  # checks the crop name and size
  if size < 1:
    raise ValueError('config.data.image_size must be set (> 0) for an image folder')
  path = os.path.join(cache_dir(data_config), _cache_key(folder, names, crop, size) + '.npz')
  return _load_cached(folder, tuple(names), crop, size, path)


@functools.lru_cache(maxsize=2)
def _load_cached(folder, names, crop, size, path) -> np.ndarray:
  prepare = image_prep.transform_for(crop, size)
  if os.path.isfile(path):
    with np.load(path) as f:
      return f['images']
  print(f'Reading {len(names)} images of {folder} (once; cached in {path})', flush=True)
  images = np.stack([_decode(folder, n, prepare, size) for n in names])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp.npz'  # processes sharing a cache never share a temporary
  np.savez(tmp, images=images)
  os.replace(tmp, path)  # a half-written cache is never read
  return images


def check_split(split: str):
  if split.split('[')[0] != SPLIT:
    raise ValueError(f"an image folder has one split, 'train' (sliceable: 'train[:1000]'); "
                     f'got {split!r}')
