"""The blocks of guided-diffusion's ``UNetModel`` (`lees_jax.models.adm`), NHWC, Flax linen.

Each gateable block has ``__call__`` (the unit run) and ``skip`` (what the network sees when it
does not run), as `lees_jax.models.layers` does for the DDPM UNet:

* `ResBlock` is ``skip_connection(x_upd(x)) + branch(x)`` (guided_diffusion/unet.py
  ``ResBlock._forward``) and skips to ``skip_connection(x_upd(x))``: the identity, the 1x1
  projection where channels change (``use_conv`` is never set by ``UNetModel``, so the 3x3
  variant does not occur), or, in a resampling block (``resblock_updown``), the parameter-free
  resample ``x_upd`` -- 2x2 average pooling or nearest-neighbour x2;
* `AttentionBlock` is ``x + proj_out(attention(qkv(norm(x))))`` and skips to ``x``.

Parameter names follow `layers.ResBlock` (``norm1``, ``conv1``, ``temb_proj``, ``norm2``,
``conv2``, ``conv_shortcut``) and the original attention (``norm``, ``qkv``, ``proj_out``): the
last layer of every residual branch is ``conv2`` or ``proj_out``. The attention keeps the
original's fused ``qkv`` projection with its row order, so ``use_new_attention_order`` is a
property of the network, not of an importer: QKVAttention splits q, k, v before the heads
(channels ``[q | k | v]``, each ``heads x head_channels``), QKVAttentionLegacy splits the heads
first (channels ``heads x [q | k | v]``). Both scale q and k by head_channels^(-1/4) each.

Zero initialisation as the original's ``zero_module``: ``conv2`` and ``proj_out`` start at zero,
so every block starts as its skip.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lees_jax.models import layers

_PAD1 = ((1, 1), (1, 1))
_zeros = nn.initializers.zeros


def avg_pool2(x):
  """2x2 average pooling, stride 2 (torch ``AvgPool2d(2)``, guided-diffusion's ``Downsample``
  without a convolution); even sizes only (the layout guarantees them)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def nearest_up2(x):
  """Nearest-neighbour x2 (``F.interpolate(scale_factor=2, mode='nearest')``)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Downsample(nn.Module):
  """A stride-2 3x3 convolution with one pixel of zero padding on every side (``op``)."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=_PAD1, dtype=self.dtype,
                   name='op')(x)


class ResBlock(nn.Module):
  """GroupNorm, SiLU, [resample], conv3x3; time embedding added (or, with scale-shift norm,
  GroupNorm(h) (1 + scale) + shift); GroupNorm (unless scale-shift), SiLU, dropout, conv3x3;
  plus the skip connection. ``emb`` is SiLU(time embedding), shared by every block."""
  out_ch: int
  use_scale_shift_norm: bool = False
  resample: str | None = None  # None | 'down' | 'up'
  dropout: float = 0.0
  num_groups: int = 32
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  def setup(self):
    gn = lambda name: layers.group_norm(self.num_groups, self.norm_eps, self.dtype, name)  # noqa: E731
    self.norm1 = gn('norm1')
    self.conv1 = nn.Conv(self.out_ch, (3, 3), padding=_PAD1, dtype=self.dtype, name='conv1')
    width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
    self.temb_proj = nn.Dense(width, dtype=self.dtype, name='temb_proj')
    self.norm2 = gn('norm2')
    self.drop = nn.Dropout(self.dropout)
    self.conv2 = nn.Conv(self.out_ch, (3, 3), padding=_PAD1, dtype=self.dtype,
                         kernel_init=_zeros, name='conv2')
    # Parameters exist only where `_shortcut` calls it (channels change).
    self.conv_shortcut = nn.Conv(self.out_ch, (1, 1), dtype=self.dtype, name='conv_shortcut')

  def _resample(self, x):
    if self.resample == 'down':
      return avg_pool2(x)
    if self.resample == 'up':
      return nearest_up2(x)
    return x

  def _shortcut(self, x):
    x = self._resample(x)
    return x if x.shape[-1] == self.out_ch else self.conv_shortcut(x)

  def skip(self, x, emb=None, train: bool = False):
    del emb, train
    return self._shortcut(x)

  def __call__(self, x, emb, train: bool = False):
    h = self.conv1(self._resample(nn.silu(self.norm1(x))))
    e = self.temb_proj(emb)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = self.norm2(h) * (1 + scale) + shift
    else:
      h = self.norm2(h + e)
    h = self.conv2(self.drop(nn.silu(h), deterministic=not train))
    return self._shortcut(x) + h


class AttentionBlock(nn.Module):
  """Multi-head spatial self-attention with a residual connection (``num_heads`` heads of
  ``channels / num_heads``; ``new_order``: QKVAttention, else QKVAttentionLegacy)."""
  channels: int
  num_heads: int = 1
  new_order: bool = False
  num_groups: int = 32
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  def setup(self):
    self.norm = layers.group_norm(self.num_groups, self.norm_eps, self.dtype, 'norm')
    self.qkv = nn.Dense(3 * self.channels, dtype=self.dtype, name='qkv')
    self.proj_out = nn.Dense(self.channels, dtype=self.dtype, kernel_init=_zeros,
                             name='proj_out')

  def skip(self, x, emb=None, train: bool = False):
    del emb, train
    return x

  def __call__(self, x, emb=None, train: bool = False):
    del emb, train
    b, hgt, wid, c = x.shape
    heads, t = self.num_heads, hgt * wid
    ch = c // heads
    qkv = self.qkv(self.norm(x).reshape(b, t, c))
    if self.new_order:  # [q | k | v], each heads x ch
      q, k, v = (a.reshape(b, t, heads, ch) for a in jnp.split(qkv, 3, axis=-1))
    else:  # heads x [q | k | v]
      qkv = qkv.reshape(b, t, heads, 3, ch)
      q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    scale = 1.0 / math.sqrt(math.sqrt(ch))
    logits = jnp.einsum('bthc,bshc->bhts', q * scale, k * scale).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhts,bshc->bthc', weights, v).reshape(b, t, c)
    return x + self.proj_out(out).reshape(b, hgt, wid, c)
