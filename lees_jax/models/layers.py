"""Building blocks of the DDPM UNet (Ho et al. 2020), NHWC, pure Flax linen.

Every gateable unit (``ResBlock``, ``AttnBlock``) has two entry points:
``__call__`` (the unit executed) and ``skip`` (what the network sees when the
unit is not executed). Keeping both on the unit makes the skip semantics a
property of the block rather than of whoever gates it (REFERENCE §1):

* a ResBlock whose channel count is unchanged skips to the identity;
* a ResBlock that changes channels skips to its 1x1 ``conv_shortcut``;
* attention skips to the identity.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Padding spelled out so the convolutions match torch's ``padding=1`` exactly.
_PAD1 = ((1, 1), (1, 1))


def timestep_embedding(timesteps: jax.Array, dim: int, *, freq_shift: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [sin, cos] of integer (or real) timesteps.

  With ``freq_shift=1`` the frequencies are exp(-log(max_period) * i / (half - 1)),
  the layout of the original DDPM code and of diffusers' ``flip_sin_to_cos=False,
  freq_shift=1`` configuration used by google/ddpm-cifar10-32.
  """
  if dim % 2:
    raise ValueError(f'timestep embedding dimension must be even, got {dim}')
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  # The two-pass variance is a little slower but keeps fp32 agreement with
  # torch's GroupNorm at the 1e-6 level, which the checkpoint oracle relies on.
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype,
                      use_fast_variance=False, name=name)


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv3x3 (+ time projection) -> GroupNorm -> swish -> dropout -> conv3x3."""
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  def setup(self):
    self.norm1 = group_norm(self.num_groups, self.norm_eps, self.dtype, 'norm1')
    self.conv1 = nn.Conv(self.out_ch, (3, 3), padding=_PAD1, dtype=self.dtype, name='conv1')
    self.temb_proj = nn.Dense(self.out_ch, dtype=self.dtype, name='temb_proj')
    self.norm2 = group_norm(self.num_groups, self.norm_eps, self.dtype, 'norm2')
    self.drop = nn.Dropout(self.dropout)
    self.conv2 = nn.Conv(self.out_ch, (3, 3), padding=_PAD1, dtype=self.dtype, name='conv2')
    # Declared always, but its parameters exist only when `_shortcut` calls it,
    # i.e. when the block changes the channel count.
    self.conv_shortcut = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='conv_shortcut')

  def _shortcut(self, x):
    if x.shape[-1] == self.out_ch:
      return x
    return self.conv_shortcut(x)

  def skip(self, x, temb=None, train: bool = False):
    del temb, train
    return self._shortcut(x)

  def __call__(self, x, temb, train: bool = False):
    h = self.conv1(nn.swish(self.norm1(x)))
    h = h + self.temb_proj(nn.swish(temb))[:, None, None, :]
    h = nn.swish(self.norm2(h))
    h = self.drop(h, deterministic=not train)
    h = self.conv2(h)
    return self._shortcut(x) + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with a residual connection."""
  channels: int
  num_groups: int = 32
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  def setup(self):
    self.norm = group_norm(self.num_groups, self.norm_eps, self.dtype, 'norm')
    self.q = nn.Dense(self.channels, dtype=self.dtype, name='q')
    self.k = nn.Dense(self.channels, dtype=self.dtype, name='k')
    self.v = nn.Dense(self.channels, dtype=self.dtype, name='v')
    self.proj_out = nn.Dense(self.channels, dtype=self.dtype, name='proj_out')

  def skip(self, x, temb=None, train: bool = False):
    del temb, train
    return x

  def __call__(self, x, temb=None, train: bool = False):
    del temb, train
    b, hgt, wid, c = x.shape
    h = self.norm(x).reshape(b, hgt * wid, c)
    q, k, v = self.q(h), self.k(h), self.v(h)
    logits = jnp.einsum('bqc,bkc->bqk', q, k).astype(jnp.float32) / math.sqrt(c)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bqk,bkc->bqc', weights, v)
    return x + self.proj_out(out).reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Strided 3x3 conv; pads one row/column at the bottom/right as the DDPM code does."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding='VALID', dtype=self.dtype,
                   name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 followed by a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=_PAD1, dtype=self.dtype, name='conv')(x)
