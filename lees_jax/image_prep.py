"""What happens to a data set's images before a network sees them: value range, and the crops and
resizes each benchmark's original code applies (stated once here, used for training streams,
FID references and latents alike).

``config.data.crop`` names the transform of each uint8 image:

* ``'none'``        -- the image as stored (CIFAR-10; CelebA-HQ from TFDS ``celeb_a_hq/64``, which
  the progressive_growing_of_gans dataset tool already box-downsampled to 64);
* ``'adm'``         -- ADM's ImageNet preprocessing (`adm_center_crop`);
* ``'uvit_celeba'`` -- U-ViT's (and DDIM's) CelebA transform (`uvit_celeba_crop`): the 128x128
  box with top-left (57, 25) of the 218x178 aligned image, then a bilinear resize;
* ``'box'``         -- centre square, then a box (area-average) resize: a folder of CelebA-HQ
  1024x1024 images becomes the average of each 16x16 block, what the dataset tool's repeated 2x2
  halving computes up to its per-level rounding.

Each resizes to ``config.data.image_size``. PIL does the resampling: torchvision's ``Resize`` on
a PIL image (U-ViT's pipeline) is PIL's ``resize`` with the same filter, so the pixels match.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

CROPS = ('none', 'adm', 'uvit_celeba', 'box')
# U-ViT datasets.py CelebA: cx = 89, cy = 121, a 128 box centred on (cx, cy); torchvision's
# F.crop(img, top=cy - 64, left=cx - 64, height=128, width=128).
UVIT_CELEBA_BOX = (57, 25, 128)  # top, left, side


def to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images, np.float32) / np.float32(127.5) - np.float32(1.0)


def to_uint8(x) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (rounding, clipped)."""
  x = np.asarray(x, np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _pil(image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = np.asarray(image, np.uint8)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  return Image.fromarray(arr).convert('RGB')


def adm_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's ImageNet preprocessing (guided-diffusion's ``center_crop_arr``): halve with a box
  filter while the short side is >= 2 * size, resize the short side to ``size`` (bicubic), crop
  the centre ``size`` x ``size``. uint8 HWC in, uint8 (size, size, 3) out."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pil = _pil(image)
  while min(pil.size) >= 2 * size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = np.asarray(pil)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def uvit_celeba_crop(image: np.ndarray, size: int) -> np.ndarray:
  """U-ViT's CelebA transform: crop the 128x128 box at (top 57, left 25), resize to ``size``
  (torchvision ``Resize(size)`` = PIL bilinear on the square). uint8 HWC in, (size, size, 3) out."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  top, left, side = UVIT_CELEBA_BOX
  arr = np.asarray(image, np.uint8)
  if arr.shape[0] < top + side or arr.shape[1] < left + side:
    raise ValueError(f"crop 'uvit_celeba' needs CelebA's aligned 218x178 images (the box reaches "
                     f'row {top + side}, column {left + side}); got an image of {arr.shape[:2]}')
  box = _pil(arr[top:top + side, left:left + side])
  return np.asarray(box.resize((size, size), resample=Image.BILINEAR))


def box_resize(image: np.ndarray, size: int) -> np.ndarray:
  """Centre square (short side), then a box-filter resize to ``size``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = np.asarray(_pil(image))
  side = min(arr.shape[:2])
  top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
  square = _pil(arr[top:top + side, left:left + side])
  return np.asarray(square.resize((size, size), resample=Image.BOX))


_TRANSFORMS = {'adm': adm_center_crop, 'uvit_celeba': uvit_celeba_crop, 'box': box_resize}


def transform(data_config) -> Callable[[np.ndarray], np.ndarray] | None:
  """The uint8 -> uint8 transform ``data_config.crop`` names, or None for 'none'."""
  return transform_for(data_config.get('crop', 'none'), int(data_config.get('image_size', 0)))


def transform_for(crop: str, size: int) -> Callable[[np.ndarray], np.ndarray] | None:
  """The transform of crop name ``crop`` to ``size`` (None for 'none')."""
  if crop not in CROPS:
    raise ValueError(f'unknown config.data.crop {crop!r}; choose one of {CROPS}')
  if crop == 'none':
    return None
  if size < 1:
    raise ValueError(f"config.data.crop={crop!r} resizes to config.data.image_size; set it "
                     f'(> 0), got {size}')
  fn = _TRANSFORMS[crop]
  return lambda image: fn(image, size)
