"""The Stable-Diffusion VAE (diffusers ``AutoencoderKL``) in Flax, NHWC, for latent diffusion (DiT).

Not a diffusion backbone: it is not registered in `lees_jax.models.backbone` (nothing in it is
gateable); build it with `build_vae` from a ``config.model``-like ConfigDict (``name='sd_vae'``,
what `lees_jax.convert.diffusers_vae` returns) or directly as ``AutoencoderKL(VAESpec(...))``.

Image convention: NHWC float images in **[-1, 1]** (``x = uint8 / 127.5 - 1``), the convention
of diffusers' VAE image processor. Latents are NHWC with ``latent_channels`` channels at 1/8 of
the image size for four levels (one halving per level after the first).

* ``model.apply({'params': p}, x, method=AutoencoderKL.encode)`` -> (mean, logvar) of the
  diagonal Gaussian posterior (after ``quant_conv``; logvar clipped to [-30, 20] as diffusers'
  ``DiagonalGaussianDistribution`` does): diffusers' ``vae.encode(x).latent_dist.mean/.logvar``.
* ``model.apply({'params': p}, z, method=AutoencoderKL.decode)`` -> image (``post_quant_conv``
  then the decoder): diffusers' ``vae.decode(z).sample``. Both take *unscaled* latents.
* `latents_from_images` / `images_from_latents`: the latent-diffusion convention, latents
  times ``scaling_factor`` (0.18215 for the SD VAE; DiT decodes ``vae.decode(z / 0.18215)``).

Architecture (diffusers' ``Encoder``/``Decoder`` with ``DownEncoderBlock2D``/``UpDecoderBlock2D``):
ResnetBlock2D = GroupNorm(eps 1e-6) -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3, plus a
1x1 ``conv_shortcut`` where channels change (no time embedding); each encoder level has
``layers_per_block`` resnets and, except the last, a stride-2 conv3x3 after zero-padding one
row/column at the bottom/right; each decoder level has ``layers_per_block + 1`` resnets and,
except the last, nearest x2 + conv3x3; the mid block is resnet, single-head attention (GroupNorm,
q/k/v, softmax(q k^T / sqrt(C)) v, output projection, residual; optional), resnet; the heads are
GroupNorm -> SiLU -> conv3x3.

Parameter names (ours -> diffusers ``AutoencoderKL`` state dict; ``kernel``/``scale`` ->
``weight``; `diffusers_vae.diffusers_name` implements it):

  encoder/conv_in                     encoder.conv_in
  encoder/down_{i}/res_{j}/{norm1,conv1,norm2,conv2,conv_shortcut}
                                      encoder.down_blocks.{i}.resnets.{j}.<same>
  encoder/down_{i}/downsample/conv    encoder.down_blocks.{i}.downsamplers.0.conv
  {encoder,decoder}/mid/res_{0,1}     {encoder,decoder}.mid_block.resnets.{0,1}
  {encoder,decoder}/mid/attn/{norm,q,k,v,proj_out}
                                    ….mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
  {encoder,decoder}/norm_out          {encoder,decoder}.conv_norm_out
  {encoder,decoder}/conv_out          {encoder,decoder}.conv_out
  quant_conv, post_quant_conv         quant_conv, post_quant_conv
  decoder/conv_in                     decoder.conv_in
  decoder/up_{i}/res_{j}/…            decoder.up_blocks.{i}.resnets.{j}.…
  decoder/up_{i}/upsample/conv        decoder.up_blocks.{i}.upsamplers.0.conv

Decoder level ``up_i`` is diffusers' ``up_blocks.i``: i = 0 is the lowest resolution
(``block_out_channels[-1]`` channels), i.e. execution order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lees_jax.models import layers

Dtype = Any
NAME = 'sd_vae'
NORM_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code it for every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp
_PAD1 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class VAESpec:
  """Architecture of an ``AutoencoderKL`` (defaults: stabilityai/sd-vae-ft-ema / -mse)."""
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  sample_size: int | tuple[int, int] = 256  # the training image size (informational)
  scaling_factor: float = 0.18215
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    problems = []

    def positive_int(name, v):
      if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 1:
        problems.append(f'{name}={v!r}: must be a positive int')
        return False
      return True

    boc = self.block_out_channels
    if isinstance(boc, (list, tuple)) and boc:
      if all(positive_int(f'block_out_channels[{i}]', c) for i, c in enumerate(boc)):
        object.__setattr__(self, 'block_out_channels', tuple(int(c) for c in boc))
    else:
      problems.append(f'block_out_channels={boc!r}: must be a non-empty sequence of positive ints')
    for name in ('in_channels', 'out_channels', 'latent_channels', 'layers_per_block',
                 'norm_num_groups'):
      positive_int(name, getattr(self, name))
    if not problems:
      for i, c in enumerate(self.block_out_channels):
        if c % self.norm_num_groups:
          problems.append(f'block_out_channels[{i}]={c} is not divisible by norm_num_groups='
                          f'{self.norm_num_groups} (GroupNorm)')
    size = self.sample_size
    if isinstance(size, (list, tuple)):
      if len(size) == 2 and all(positive_int('sample_size', s) for s in size):
        object.__setattr__(self, 'sample_size', tuple(int(s) for s in size))
      elif len(size) != 2:
        problems.append(f'sample_size={size!r}: must be an int or a (height, width) pair')
    elif positive_int('sample_size', size):
      object.__setattr__(self, 'sample_size', int(size))
    sf = self.scaling_factor
    if isinstance(sf, bool) or not isinstance(sf, (int, float, np.floating)) or not (
        math.isfinite(sf) and sf > 0):
      problems.append(f'scaling_factor={sf!r}: must be a positive finite number')
    for name in ('use_quant_conv', 'use_post_quant_conv', 'mid_block_add_attention'):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        problems.append(f'{name}={getattr(self, name)!r}: must be a bool')
    if problems:
      raise ValueError('invalid VAE architecture: ' + '; '.join(problems))
    for name, kind in (('in_channels', int), ('out_channels', int), ('latent_channels', int),
                       ('layers_per_block', int), ('norm_num_groups', int),
                       ('scaling_factor', float), ('use_quant_conv', bool),
                       ('use_post_quant_conv', bool), ('mid_block_add_attention', bool)):
      object.__setattr__(self, name, kind(getattr(self, name)))  # numpy scalars -> Python

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_config(cls, model_config) -> 'VAESpec':
    """The spec of a ``config.model``-like mapping (extra keys such as name, dtype ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model_config).items() if k in fields}
    return cls(**values)

  def to_config(self, dtype: str = 'float32'):
    import ml_collections
    d = dataclasses.asdict(self)
    return ml_collections.ConfigDict(dict(name=NAME, **d, dtype=dtype))


def _conv3(features: int, dtype: Dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (3, 3), padding=_PAD1, dtype=dtype, name=name)


class ResnetBlock(layers.ResBlock):
  """diffusers' ResnetBlock2D without a time embedding (`layers.ResBlock`'s ``temb_proj``,
  declared there, is never called, so it has no parameters)."""

  def __call__(self, x, temb=None, train: bool = False):
    del temb, train
    h = self.conv1(nn.swish(self.norm1(x)))
    h = self.conv2(nn.swish(self.norm2(h)))
    return self._shortcut(x) + h


class MidBlock(nn.Module):
  """ResnetBlock -> (single-head attention) -> ResnetBlock at constant width."""
  channels: int
  num_groups: int
  attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(num_groups=self.num_groups, norm_eps=NORM_EPS, dtype=self.dtype)
    x = ResnetBlock(self.channels, name='res_0', **kw)(x)
    if self.attention:
      x = layers.AttnBlock(self.channels, name='attn', **kw)(x)
    return ResnetBlock(self.channels, name='res_1', **kw)(x)


class DownBlock(nn.Module):
  """DownEncoderBlock2D: ``num_layers`` resnets, then (unless last) a stride-2 conv."""
  channels: int
  num_layers: int
  num_groups: int
  downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, num_groups=self.num_groups, norm_eps=NORM_EPS,
                      dtype=self.dtype, name=f'res_{j}')(x)
    if self.downsample:  # pads (0, 1, 0, 1), then a VALID stride-2 conv3x3
      x = layers.Downsample(self.channels, self.dtype, name='downsample')(x)
    return x


class UpBlock(nn.Module):
  """UpDecoderBlock2D: ``num_layers`` resnets, then (unless last) nearest x2 + conv3x3."""
  channels: int
  num_layers: int
  num_groups: int
  upsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, num_groups=self.num_groups, norm_eps=NORM_EPS,
                      dtype=self.dtype, name=f'res_{j}')(x)
    if self.upsample:
      x = layers.Upsample(self.channels, self.dtype, name='upsample')(x)
    return x


def _head(h, channels: int, groups: int, dtype: Dtype):
  """conv_norm_out -> SiLU -> conv_out (called inside a compact method)."""
  h = nn.swish(layers.group_norm(groups, NORM_EPS, dtype, 'norm_out')(h))
  return _conv3(channels, dtype, 'conv_out')(h)


class Encoder(nn.Module):
  """Image (NHWC, [-1, 1]) -> 2 * latent_channels moments (before quant_conv)."""
  spec: VAESpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    s, g = self.spec, self.spec.norm_num_groups
    h = _conv3(s.block_out_channels[0], self.dtype, 'conv_in')(x)
    last = len(s.block_out_channels) - 1
    for i, ch in enumerate(s.block_out_channels):
      h = DownBlock(ch, s.layers_per_block, g, i < last, self.dtype, name=f'down_{i}')(h)
    h = MidBlock(s.block_out_channels[-1], g, s.mid_block_add_attention, self.dtype, name='mid')(h)
    return _head(h, 2 * s.latent_channels, g, self.dtype)


class Decoder(nn.Module):
  """Latent (after post_quant_conv) -> image (NHWC, about [-1, 1])."""
  spec: VAESpec
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    s, g = self.spec, self.spec.norm_num_groups
    h = _conv3(s.block_out_channels[-1], self.dtype, 'conv_in')(z)
    h = MidBlock(s.block_out_channels[-1], g, s.mid_block_add_attention, self.dtype, name='mid')(h)
    widths = s.block_out_channels[::-1]
    for i, ch in enumerate(widths):
      h = UpBlock(ch, s.layers_per_block + 1, g, i < len(widths) - 1, self.dtype,
                  name=f'up_{i}')(h)
    return _head(h, s.out_channels, g, self.dtype)


class AutoencoderKL(nn.Module):
  """The KL autoencoder; ``__call__`` (used by `init_vae_params`) reconstructs from the mean,
  or from a posterior sample when an ``rng`` is given."""
  spec: VAESpec
  dtype: Dtype = jnp.float32

  def setup(self):
    s = self.spec
    self.encoder = Encoder(s, self.dtype)
    self.decoder = Decoder(s, self.dtype)
    if s.use_quant_conv:
      self.quant_conv = nn.Conv(2 * s.latent_channels, (1, 1), dtype=self.dtype)
    if s.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(s.latent_channels, (1, 1), dtype=self.dtype)

  def _check(self, x, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f'{what} must be NHWC with {channels} channels, got shape {x.shape}')

  def encode(self, x):
    """(mean, logvar), float32, of the posterior of images ``x`` (NHWC, in [-1, 1])."""
    self._check(x, self.spec.in_channels, 'images')
    h = self.encoder(x.astype(self.dtype))
    if self.spec.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def decode(self, z):
    """Images (NHWC, float32, about [-1, 1]; not clipped) of *unscaled* latents ``z``."""
    self._check(z, self.spec.latent_channels, 'latents')
    z = z.astype(self.dtype)
    if self.spec.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x, rng=None):
    mean, logvar = self.encode(x)
    return self.decode(mean if rng is None else sample_posterior(mean, logvar, rng))


def sample_posterior(mean, logvar, rng):
  """mean + exp(logvar / 2) * N(0, 1)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def build_vae(model_config, dtype: str | None = None) -> AutoencoderKL:
  """The module of a ``config.model``-like mapping with ``name='sd_vae'``."""
  name = dict(model_config).get('name', NAME)
  if name != NAME:
    raise ValueError(f"model config name={name!r}: a VAE config has name={NAME!r}")
  dtype = dtype or dict(model_config).get('dtype', 'float32')
  return AutoencoderKL(VAESpec.from_config(model_config), jnp.dtype(dtype))


def init_vae_params(model: AutoencoderKL, rng):
  """Random parameters (the tree the importer fills; shapes do not depend on the image size)."""
  s = model.spec.downsample_factor
  return model.init(rng, jnp.zeros((1, s, s, model.spec.in_channels), jnp.float32))['params']


@functools.partial(jax.jit, static_argnums=0)
def _encode(model, params, x):
  return model.apply({'params': params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(model, params, z):
  return model.apply({'params': params}, z, method=AutoencoderKL.decode)


def images_to_model_range(images) -> jax.Array:
  """uint8 images [0, 255] -> float32 [-1, 1]; float images are taken to be in [-1, 1] already."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f'images must be uint8 in [0, 255] or float in [-1, 1], got {images.dtype}')
  return images.astype(jnp.float32)


def latents_from_images(model: AutoencoderKL, params, images, rng=None) -> jax.Array:
  """Scaled latents (what a latent diffusion model sees) of NHWC images.

  ``images``: uint8 in [0, 255], or float in [-1, 1]. Returns the posterior mean, or a posterior
  sample when ``rng`` is given, times ``scaling_factor``.
  """
  mean, logvar = _encode(model, params, images_to_model_range(images))
  z = mean if rng is None else sample_posterior(mean, logvar, rng)
  return z * model.spec.scaling_factor


def images_from_latents(model: AutoencoderKL, params, z) -> jax.Array:
  """uint8 NHWC images of scaled latents: decode(z / scaling_factor), clipped to [-1, 1],
  mapped to [0, 255] and rounded (diffusers' image post-processing)."""
  x = _decode(model, params, jnp.asarray(z, jnp.float32) / model.spec.scaling_factor)
  return jnp.round((jnp.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8)
