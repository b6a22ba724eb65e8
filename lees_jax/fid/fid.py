"""FID: Inception features, Gaussian statistics and the Fréchet distance.

Everything numerical that defines the score is float64 on the host (statistics, sqrtm); only the
network runs in float32 on the accelerator, at HIGHEST matmul precision. This module imports
neither torch nor tensorflow. Statistics files and the cached reference statistics are in
`lees_jax.fid.reference`.

Typical use (all names are also in the package, `lees_jax.fid`)::

    extractor = FeatureExtractor()                       # finds + checks the weights, compiles
    ref = reference.load_or_compute_reference_stats(train_images,
                                                    "workdir/cifar10_train_stats.npz",
                                                    extractor=extractor)
    gen = compute_statistics(samples, extractor=extractor)
    score = fid_from_statistics(gen, ref)
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import warnings
from typing import Iterable, Iterator

import jax
import numpy as np
import scipy.linalg
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lees_jax import torch_archive
from lees_jax.fid import inception

DEFAULT_BATCH_SIZE = 100


# --------------------------------------------------------------------------------------------
# Input checking.
# --------------------------------------------------------------------------------------------

def check_images(images, what: str = "images") -> np.ndarray:
  """Returns ``images`` as a uint8 (N, H, W, 3) array, or raises a ValueError saying what is wrong.

  We refuse rather than guess: a float array in [0, 1] or [-1, 1], NCHW layout or grayscale
  would each give a silently wrong FID.
  """
  arr = np.asarray(images)
  if arr.dtype != np.uint8:
    hint = ""
    if np.issubdtype(arr.dtype, np.floating):
      hint = (" Float images are ambiguous ([0, 1]? [-1, 1]? [0, 255]?): convert them yourself, "
              "e.g. np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for [0, 1] data.")
    raise ValueError(f"{what} must be uint8 RGB in [0, 255], got dtype {arr.dtype}.{hint}")
  if arr.ndim != 4:
    raise ValueError(f"{what} must have shape (N, H, W, 3), got {arr.shape}"
                     + (" (a single image? add a batch axis)" if arr.ndim == 3 else ""))
  if arr.shape[-1] != 3:
    if arr.shape[-1] == 1:
      hint = " (grayscale: FID's Inception expects RGB; replicate the channel if you really mean it)"
    elif arr.shape[1] == 3:
      hint = " (looks like NCHW: transpose to NHWC with x.transpose(0, 2, 3, 1))"
    elif arr.shape[-1] == 4:
      hint = " (RGBA: drop or composite the alpha channel first)"
    else:
      hint = ""
    raise ValueError(f"{what} must be NHWC with 3 channels, got shape {arr.shape}{hint}")
  if arr.shape[0] == 0 or arr.shape[1] < 1 or arr.shape[2] < 1:
    raise ValueError(f"{what} is empty: shape {arr.shape}")
  return arr


def images_fingerprint(images: np.ndarray) -> str:
  """sha1 of an image array's shape, dtype and bytes: identifies the data behind cached stats."""
  arr = np.ascontiguousarray(images)
  h = hashlib.sha1(f"{arr.shape}|{arr.dtype.str}|".encode())
  h.update(memoryview(arr).cast("B"))
  return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Features.
# --------------------------------------------------------------------------------------------

def _features(variables, images):
  return inception.InceptionV3().apply(variables, inception.preprocess(images))


@functools.lru_cache(maxsize=None)
def _features_fn(devices: tuple):
  """One jitted feature function per device set, shared by every extractor: jit caches
  compilations per function object, so a fresh closure per extractor would compile the
  Inception network again for every evaluation (tens of seconds on a CPU)."""
  if len(devices) == 1:
    return jax.jit(_features)
  mesh = Mesh(np.array(devices), ("batch",))
  batch = NamedSharding(mesh, P("batch"))
  return jax.jit(_features, in_shardings=(NamedSharding(mesh, P()), batch), out_shardings=batch)


class FeatureExtractor:
  """Batched, jitted Inception pool3 features of uint8 NHWC images.

  Loads (and sha1-checks) the weights once and compiles once per input image size. With more
  than one local device the batch is sharded over all of them (a 1-D ``Mesh``, parameters
  replicated). The last partial batch is zero-padded to the fixed batch size, so there is one
  compiled program, and the padding rows are dropped from the output.
  """

  def __init__(self, weights_path: str | os.PathLike | None = None, *,
               variables: dict | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               devices: list | None = None):
    if batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {batch_size}")
    if variables is None:
      path = inception.resolve_weights_path(weights_path)
      self.weights_sha1 = inception.verify_weights(path)
      variables = inception.params_from_torch(torch_archive.load_tensors(path))
    else:
      self.weights_sha1 = None  # caller-supplied parameters: nothing to fingerprint
    self.devices = list(devices) if devices is not None else jax.local_devices()
    n = len(self.devices)
    # Every device gets the same number of rows.
    self.batch_size = -(-batch_size // n) * n
    if n > 1:
      mesh = Mesh(np.array(self.devices), ("batch",))
      self._batch_sharding = NamedSharding(mesh, P("batch"))
      self._variables = jax.device_put(variables, NamedSharding(mesh, P()))
    else:
      self._batch_sharding = self.devices[0]
      self._variables = jax.device_put(variables, self.devices[0])
    self._fn = _features_fn(tuple(self.devices))

  def _run(self, batch: np.ndarray) -> jax.Array:
    n = batch.shape[0]
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + batch.shape[1:], batch.dtype)
      batch = np.concatenate([batch, pad])
    return self._fn(self._variables, jax.device_put(batch, self._batch_sharding))

  def iter_features(self, images: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    """Yields float32 (n, 2048) feature blocks for an array or an iterable of image batches."""
    batches = (images,) if isinstance(images, np.ndarray) or hasattr(images, "__array__") else images
    pending = None  # (device result, true rows): dispatch batch i+1 before waiting on batch i
    for i, chunk in enumerate(batches):
      chunk = check_images(chunk, what="images" if i == 0 else f"image batch {i}")
      for start in range(0, chunk.shape[0], self.batch_size):
        part = chunk[start:start + self.batch_size]
        out = self._run(part)
        if pending is not None:
          yield np.asarray(pending[0])[:pending[1]]
        pending = (out, part.shape[0])
    if pending is not None:
      yield np.asarray(pending[0])[:pending[1]]

  def __call__(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
    """float32 (N, 2048) features of all images."""
    blocks = list(self.iter_features(images))
    if not blocks:
      raise ValueError("no images given")
    return np.concatenate(blocks)


# --------------------------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean and covariance (float64) of Inception features over ``count`` images.

  The 'svd' Fréchet method needs each covariance's symmetric eigendecomposition; it is
  computed on first use and kept with the statistics (`sqrt_eigh`), so comparing one sample
  against many references, or many samples against one reference, decomposes each covariance
  once (the experiment's ΔFID over corruptions relies on it). Treat statistics as immutable.

  ``factor`` (optional, (count, D)): the centred features over sqrt(count - 1), so that
  sigma = factor^T factor, kept when there are no more images than feature dimensions. Its thin
  SVD gives sigma's eigendecomposition exactly in O(count^2 D) instead of eigh's O(D^3)
  (64 images of 2048-d features: ~1 ms instead of seconds), and more accurately, since the
  singular values are not squared by forming sigma first.
  """
  mu: np.ndarray
  sigma: np.ndarray
  count: int
  factor: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

  @functools.cached_property
  def sqrt_eigh(self) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt of the kept eigenvalues, eigenvectors) of sigma, cached: from ``factor`` when
    present (`_factor_eig`), else `_psd_eig` of sigma."""
    if self.factor is not None:
      return _factor_eig(np.asarray(self.factor, np.float64), self.sigma.shape[0])
    return _psd_eig(np.atleast_2d(np.asarray(self.sigma, np.float64)), "sigma")


class _Moments:
  """Streaming float64 mean / covariance. Features are shifted by the first batch's mean before
  accumulating sums of outer products, which avoids the cancellation of E[xx^T] - mu mu^T."""

  def __init__(self):
    self.n = 0
    self.shift = self.s = self.ss = None
    self.rows = []  # the features themselves while there are at most D of them (`factor`)

  def update(self, f: np.ndarray):
    f = np.asarray(f, np.float64)
    if self.shift is None:
      self.shift = f.mean(axis=0)
      self.s = np.zeros_like(self.shift)
      self.ss = np.zeros((f.shape[1], f.shape[1]))
    c = f - self.shift
    self.s += c.sum(axis=0)
    self.ss += c.T @ c
    self.n += f.shape[0]
    if self.rows is not None:  # kept while n <= D (`Statistics.factor`), dropped after
      if self.n <= f.shape[1]:
        self.rows.append(f)
      else:
        self.rows = None

  def result(self) -> Statistics:
    if self.n < 2:
      raise ValueError(f"need at least 2 images for a covariance, got {self.n}")
    m = self.s / self.n
    sigma = (self.ss - self.n * np.outer(m, m)) / (self.n - 1)  # unbiased, as np.cov
    sigma = (sigma + sigma.T) / 2  # exact symmetry; rounding may break it slightly
    mu = self.shift + m
    factor = None
    if self.rows is not None:
      factor = (np.concatenate(self.rows) - mu) / np.sqrt(self.n - 1)
    return Statistics(mu=mu, sigma=sigma, count=self.n, factor=factor)


def statistics_from_features(features: np.ndarray) -> Statistics:
  """mu, sigma (np.cov convention, float64) of an (N, D) feature array."""
  features = np.asarray(features)
  if features.ndim != 2:
    raise ValueError(f"features must be (N, D), got shape {features.shape}")
  m = _Moments()
  m.update(features)
  return m.result()


def compute_statistics(images: np.ndarray | Iterable[np.ndarray], *,
                       extractor: FeatureExtractor | None = None,
                       weights_path: str | os.PathLike | None = None,
                       batch_size: int = DEFAULT_BATCH_SIZE) -> Statistics:
  """FID statistics of uint8 NHWC images (an array, or an iterable of batches to stream)."""
  if extractor is None:
    extractor = FeatureExtractor(weights_path, batch_size=batch_size)
  m = _Moments()
  for block in extractor.iter_features(images):
    m.update(block)
  return m.result()


# --------------------------------------------------------------------------------------------
# The Fréchet distance.
# --------------------------------------------------------------------------------------------

def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6,
                     imag_atol: float = 1e-3, method: str = "sqrtm", *,
                     sqrt_eighs: tuple | None = None) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

  d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^{1/2}).

  ``method="sqrtm"`` (default) is the reference computation (TTUR, pytorch-fid): the matrix
  square root of the product by ``scipy.linalg.sqrtm``; if it is not finite (a near-singular
  product, e.g. fewer images than feature dimensions), retry with ``eps`` added to both
  diagonals; small imaginary parts from rounding are dropped, large ones (> ``imag_atol`` on the
  diagonal) raise, since they mean the statistics are broken. It is slow for 2048-d features
  (Schur decomposition: ~10 s on 2 CPU cores, more when rank-deficient).

  ``method="svd"`` uses tr((S1 S2)^{1/2}) = nuclear norm of S2^{1/2} S1^{1/2} (exact for
  symmetric PSD covariances), from two symmetric eigendecompositions and one SVD no larger than
  the covariances' ranks: no complex Schur form, and accurate for rank-deficient covariances,
  where sqrtm's result carries ~1e-4 of noise (identical statistics of 4 images give
  |FID| ~ 3e-4 with sqrtm, ~1e-12 with svd).
  For full-rank statistics both agree to ~1e-12 relative; published numbers used sqrtm.
  ``sqrt_eighs`` (svd only): the two covariances' (sqrt eigenvalues, eigenvectors), when
  already known (`Statistics.sqrt_eigh`); with `_psd_eig`'s the result is bitwise the one
  computed without them, with `_factor_eig`'s it agrees to rounding (~1e-12 relative).
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,):
    raise ValueError(f"mean vectors must be 1-D and equal length, got {mu1.shape}, {mu2.shape}")
  if sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape}, {sigma2.shape}")
  for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} contains NaN or inf")

  diff = mu1 - mu2
  if method == "sqrtm":
    tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, imag_atol)
  elif method == "svd":
    tr_covmean = _trace_sqrt_product_svd(sigma1, sigma2, sqrt_eighs)
  else:
    raise ValueError(f"method must be 'sqrtm' or 'svd', got {method!r}")
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps, imag_atol) -> float:
  with warnings.catch_warnings():
    # sqrtm warns on singular products, which are routine with < 2048 images; we check below.
    warnings.simplefilter("ignore")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
      logging.warning("FID: sqrtm of the covariance product is not finite; adding %g to the "
                      "diagonals (near-singular covariances: too few images?)", eps)
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    max_imag = np.max(np.abs(np.diagonal(covmean).imag))
    if max_imag > imag_atol:
      raise ValueError(f"FID: sqrtm has a large imaginary component ({max_imag:.3g} > "
                       f"{imag_atol}); the covariances are probably not valid (PSD) statistics")
    covmean = covmean.real
  return float(np.trace(covmean))


def _psd_eig(a: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
  """sqrt of the eigenvalues and the eigenvectors of a covariance, numerically-zero ones dropped.

  The truncation matters: the ~2000 zero eigenvalues of a rank-deficient covariance come out of
  eigh as +-1e-14 noise, and their square roots (~1e-7 each) would add up to ~1e-3 of FID.
  The tolerance is the one np.linalg.matrix_rank uses.
  """
  w, v = np.linalg.eigh((a + a.T) / 2)
  top = float(np.abs(w).max()) if w.size else 0.0
  if w.size and w.min() < -1e-8 * max(1.0, top):  # clearly negative: not a covariance
    raise ValueError(f"FID: {name} is not positive semi-definite (eigenvalue {w.min():.3g})")
  keep = w > top * a.shape[0] * np.finfo(np.float64).eps
  return np.sqrt(w[keep]), v[:, keep]


def _factor_eig(factor: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """`_psd_eig` of sigma = factor^T factor from the thin SVD factor = U diag(s) V^T: sigma's
  eigenvalues are s^2 with eigenvectors V; the same truncation rule on s^2."""
  if factor.ndim != 2 or factor.shape[1] != dim:
    raise ValueError(f"FID: statistics factor must be (count, {dim}), got {factor.shape}")
  _, s, vt = np.linalg.svd(factor, full_matrices=False)
  w = s * s
  top = float(w.max()) if w.size else 0.0
  keep = w > top * dim * np.finfo(np.float64).eps
  return s[keep], vt[keep].T


def _trace_sqrt_product_svd(sigma1, sigma2, sqrt_eighs=None) -> float:
  # S1^1/2 S2 S1^1/2 = M^T M with M = S2^1/2 S1^1/2, so tr((S1 S2)^1/2) = sum of the singular
  # values of M (its nuclear norm), with no square roots of rounding noise. Writing
  # S_k^1/2 = V_k diag(r_k) V_k^T over the kept eigenpairs, M's singular values are those of the
  # small r2 x r1 matrix diag(r2) V2^T V1 diag(r1): cheap when there are few images.
  if sqrt_eighs is None:
    sqrt_eighs = (_psd_eig(sigma1, "sigma1"), _psd_eig(sigma2, "sigma2"))
  (r1, v1), (r2, v2) = sqrt_eighs
  core = (r2[:, None] * (v2.T @ v1)) * r1[None, :]
  if core.size == 0:
    return 0.0
  return float(np.sum(np.linalg.svd(core, compute_uv=False)))


def fid_from_statistics(a: Statistics, b: Statistics, method: str = "sqrtm") -> float:
  """FID between two statistics; 'svd' uses (and fills) their cached eigendecompositions."""
  eighs = (a.sqrt_eigh, b.sqrt_eigh) if method == "svd" else None
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, method=method, sqrt_eighs=eighs)


# The statistics files and the reference cache live in `reference`, which builds on this module.
# They are still reachable as ``fid.load_statistics`` etc. for code written before the split;
# resolved on first use, because importing `reference` here would be circular.
_IN_REFERENCE = ("save_statistics", "is_statistics_file", "load_statistics",
                 "load_or_compute_reference_stats")


def __getattr__(name: str):
  if name in _IN_REFERENCE:
    from lees_jax.fid import reference  # pylint: disable=g-import-not-at-top
    return getattr(reference, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
