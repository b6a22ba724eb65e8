"""U-ViT's transformer block (baofff/U-ViT ``libs/uvit.py`` ``Block``) on tokens (B, N, width).

A block is pre-norm: x += proj(attention(LN(x))), x += fc2(GELU(fc1(LN(x)))), attention scaled by
head_dim^-0.5, ``qkv`` one Linear (bias iff ``qkv_bias``) whose outputs are (q, k, v) x heads x
head_dim, torch's LayerNorm (eps 1e-5, affine) and exact (erf) GELU. An out-block (``skip``)
first mixes in its long skip: x = skip_linear(concat(x, skip)), a Linear(2 width -> width).

The two halves are separate methods because a skipped out-block keeps one of them (ASE's rule:
`mix_skip` runs, `body` does not); the network (`lees_jax.models.uvit`) and its stacked form
call them apart.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The original's init (UViT._init_weights): Linear weights N(0, 0.02) truncated at +-2 (i.e.
# at 100 standard deviations: a normal), zero biases; LayerNorms 1 and 0; the label table
# N(0, 1) and the convolutions torch's default (uniform, bound 1 / sqrt(fan_in)).
normal_init = nn.initializers.normal(0.02)
zeros_init = nn.initializers.zeros
conv_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def layer_norm(dtype, name: str) -> nn.LayerNorm:
  """torch's nn.LayerNorm: eps 1e-5, scale and bias, the two-pass variance."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


class UViTBlock(nn.Module):
  """A pre-norm transformer block; an out-block (``skip``) first mixes in its long skip."""
  dim: int
  num_heads: int
  mlp_hidden: int
  qkv_bias: bool = False
  skip: bool = False
  dtype: Any = jnp.float32

  def setup(self):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=normal_init,
                              bias_init=zeros_init)
    self.norm1 = layer_norm(self.dtype, 'norm1')
    self.qkv = dense(3 * self.dim, use_bias=self.qkv_bias, name='qkv')
    self.proj = dense(self.dim, name='proj')
    self.norm2 = layer_norm(self.dtype, 'norm2')
    self.fc1 = dense(self.mlp_hidden, name='fc1')
    self.fc2 = dense(self.dim, name='fc2')
    if self.skip:
      self.skip_linear = dense(self.dim, name='skip_linear')

  def _attention(self, x):
    b, n, d = x.shape
    h = self.num_heads
    qkv = self.qkv(x).reshape(b, n, 3, h, d // h)  # 'B L (K H D)'
    q = qkv[:, :, 0] * (1.0 / math.sqrt(d // h))
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, qkv[:, :, 1]).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
    return self.proj(jnp.einsum('bhqk,bkhc->bqhc', weights, qkv[:, :, 2]).reshape(b, n, d))

  def body(self, x):
    """Attention and MLP, each a residual update (what a skipped block leaves out)."""
    x = x + self._attention(self.norm1(x))
    return x + self.fc2(nn.gelu(self.fc1(self.norm2(x)), approximate=False))

  def mix_skip(self, x, skip):
    """An out-block's skip_linear(concat(x, skip)); the input itself for other blocks."""
    return self.skip_linear(jnp.concatenate([x, skip], axis=-1)) if self.skip else x

  def __call__(self, x, skip=None):
    return self.body(self.mix_skip(x, skip))
