"""FID statistics files and the resumable, fingerprinted reference-statistics cache.

Apart from `fid` because it is storage, not arithmetic: the .npz format of statistics (mu,
sigma, count and string fingerprints), and `load_or_compute_reference_stats`, which serves a
reference's statistics from that cache only when the image bytes and the weights file are the
ones it was computed from, and saves running moments after each chunk so that an interrupted
run resumes with bitwise the same result. Local or gs:// paths (`lees_jax.files`).
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from lees_jax import files
from lees_jax.fid import inception
from lees_jax.fid.fid import (
    DEFAULT_BATCH_SIZE,
    FeatureExtractor,
    Statistics,
    _Moments,
    check_images,
    images_fingerprint,
)


def save_statistics(path: str | os.PathLike, stats: Statistics, **fingerprints: str) -> None:
  """Writes mu, sigma, count, the low-rank factor when the statistics have one (few images:
  `Statistics.factor`) (+ string fingerprints such as data_sha1) to an .npz, atomically
  (local or gs://, `lees_jax.files`)."""
  extra = {k: np.asarray(str(v)) for k, v in fingerprints.items() if v is not None}
  if stats.factor is not None:
    extra["factor"] = np.asarray(stats.factor, np.float64)
  files.save_npz(os.fspath(path), mu=stats.mu, sigma=stats.sigma,
                 count=np.asarray(stats.count, np.int64), **extra)


def is_statistics_file(npz) -> bool:
  files_ = npz.files if hasattr(npz, "files") else npz
  return "mu" in files_ and "sigma" in files_


def load_statistics(path: str | os.PathLike) -> tuple[Statistics, dict[str, str]]:
  """Reads a statistics .npz (local or gs://); returns (stats, string fingerprints stored
  alongside)."""
  z = files.load_npz(os.fspath(path))
  if not is_statistics_file(z):
    raise ValueError(f"{path} is not a statistics file: it needs keys 'mu' and 'sigma' "
                     f"(found {sorted(z)})")
  mu = np.asarray(z["mu"], np.float64)
  sigma = np.asarray(z["sigma"], np.float64)
  count = int(z["count"]) if "count" in z else 0
  factor = np.asarray(z["factor"], np.float64) if "factor" in z else None
  meta = {k: str(z[k]) for k in z
          if k not in ("mu", "sigma", "count") and z[k].dtype.kind == "U" and z[k].ndim == 0}
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: bad statistics shapes mu {mu.shape}, sigma {sigma.shape}")
  if factor is not None and (factor.ndim != 2 or factor.shape[1] != mu.shape[0]):
    raise ValueError(f"{path}: bad statistics factor shape {factor.shape} (want (count, "
                     f"{mu.shape[0]})); delete the file to recompute it")
  return Statistics(mu=mu, sigma=sigma, count=count, factor=factor), meta


def load_or_compute_reference_stats(images: np.ndarray, cache_path: str | os.PathLike, *,
                                    extractor: FeatureExtractor | None = None,
                                    weights_path: str | os.PathLike | None = None,
                                    batch_size: int = DEFAULT_BATCH_SIZE,
                                    chunk_size: int = 5000) -> Statistics:
  """Reference statistics of ``images``, cached at ``cache_path``; resumable, with progress.

  The cache is reused only if it was computed from the same image bytes (``data_sha1``) with the
  same weights file (``weights_sha1``); otherwise it is recomputed and overwritten. (An
  extractor built from caller-supplied ``variables`` has no weights fingerprint, so its
  statistics are never served from the cache.) Images are processed in chunks of about
  ``chunk_size`` (a multiple of the extractor's batch): after each, the running moments are
  saved to ``<cache_path>.partial.npz``, so an interrupted run (e.g. 50k CIFAR-10 training
  images) resumes where it stopped and gives bitwise the same statistics.
  """
  images = check_images(images)
  data_sha1 = images_fingerprint(images)
  if extractor is not None:
    weights_sha1 = extractor.weights_sha1
  else:
    weights_sha1 = inception.verify_weights(inception.resolve_weights_path(weights_path))
  cache_path = os.fspath(cache_path)
  if files.exists(cache_path):
    try:
      stats, meta = load_statistics(cache_path)
      if meta.get("data_sha1") == data_sha1 and meta.get("weights_sha1") == weights_sha1:
        return stats
      logging.info("FID cache %s is stale (data or weights changed); recomputing", cache_path)
    except (ValueError, OSError) as e:  # unreadable cache: recompute rather than fail
      logging.warning("FID cache %s unreadable (%s); recomputing", cache_path, e)
  if extractor is None:
    extractor = FeatureExtractor(weights_path, batch_size=batch_size)
  fingerprints = dict(data_sha1=data_sha1, weights_sha1=weights_sha1)
  partial = cache_path + ".partial.npz"
  moments, done = _load_partial(partial, fingerprints) if weights_sha1 else (_Moments(), 0)
  n = images.shape[0]
  chunk = max(1, chunk_size // extractor.batch_size) * extractor.batch_size
  start_time, start_done = time.perf_counter(), done
  while done < n:
    for block in extractor.iter_features(images[done:done + chunk]):
      moments.update(block)
    done = min(n, done + chunk)
    if done < n:
      _save_partial(partial, moments, done, fingerprints)
      rate = (done - start_done) / max(time.perf_counter() - start_time, 1e-9)
      print(f"FID reference statistics {os.path.basename(cache_path)}: {done}/{n} images, "
            f"ETA {(n - done) / rate:.0f} s", flush=True)
  stats = moments.result()
  save_statistics(cache_path, stats, **fingerprints)
  files.remove(partial)
  return stats


def _save_partial(path: str, m: _Moments, done: int, fingerprints: dict) -> None:
  files.save_npz(path, shift=m.shift, s=m.s, ss=m.ss, n=np.asarray(m.n), done=np.asarray(done),
                 **{k: np.asarray(str(v)) for k, v in fingerprints.items()})


def _load_partial(path: str, fingerprints: dict) -> tuple[_Moments, int]:
  """The saved moments of an interrupted run over the same data and weights, else a fresh start."""
  m = _Moments()
  if not files.exists(path):
    return m, 0
  try:
    z = files.load_npz(path)
    if any(str(z[k]) != str(v) for k, v in fingerprints.items()):
      return m, 0
    m.shift, m.s, m.ss, m.n = z["shift"], z["s"], z["ss"], int(z["n"])
    done = int(z["done"])
  except (ValueError, OSError, KeyError) as e:
    logging.warning("ignoring unreadable partial FID statistics %s (%s)", path, e)
    return _Moments(), 0
  print(f"FID reference statistics: resuming after {done} images ({path})", flush=True)
  return m, done
