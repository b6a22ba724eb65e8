"""U-ViT (Bao et al. 2023): a ViT with long skip connections, on pixels (baofff/U-ViT).

The network, as ``libs/uvit.py``'s ``UViT`` computes it (NHWC here, NCHW there):

* patches: a p x p stride-p convolution, tokens in row-major order;
* the time token: ``timestep_embedding(t, width)`` of the network time (U-ViT's continuous
  VP SDE feeds 999 t, `lees_jax.sde`; floats allowed): [cos, sin] of t * exp(-ln(1e4) i / half),
  i < half = width / 2, optionally through Linear(width, 4 width) -> SiLU -> Linear
  (``mlp_time_embed``);
* the tokens are [label token, time token, patches] for a class-conditional network
  (``num_classes > 0``: ``torch.cat((label_emb, x))`` comes after ``torch.cat((time_token,
  x))``) and [time token, patches] otherwise; a learned position embedding over all of them;
* ``depth // 2`` in-blocks, one mid-block, ``depth // 2`` out-blocks (``depth`` 12 is 6 + 1 + 6
  blocks; an odd depth rounds down). In-block outputs are pushed on a stack; out-block i pops
  the last one: x = skip_linear(concat(x, skip)), a Linear(2 width -> width), then the block;
* a block is pre-norm: x += proj(attention(LN(x))), x += fc2(GELU(fc1(LN(x)))), attention
  scaled by head_dim^-0.5, ``qkv`` one Linear (bias iff ``qkv_bias``) whose outputs are
  (q, k, v) x heads x head_dim, torch's LayerNorm (eps 1e-5, affine) and exact (erf) GELU
  (``nn.GELU()``, timm's ``Mlp`` default) -- `lees_jax.models.uvit_blocks.UViTBlock`;
* the head: LayerNorm, Linear(width -> p^2 C) on the patch tokens (the original applies both to
  every token and drops the extra ones after: per token, the same numbers), unpatchify
  (``B (h w) (p1 p2 C) -> B C (h p1) (w p2)``), and a 3 x 3 convolution if ``conv``.

Gateable units are the blocks in execution order: in-blocks ('encoder'), the mid-block
('middle'), out-blocks ('decoder'). A skipped in- or mid-block returns its input (so an
in-block pushes its input on the skip stack); a skipped out-block still applies its
skip_linear to (x, skip) -- ASE's rule: it keeps the linear layer on the long skip -- and
skips the attention and MLP. ASE drops decoder blocks only.

FLOPs follow `lees_jax.models.dit` (a multiply-add is 2, plus per-element charges measured
from XLA's cost analysis: exact GELU 64, SiLU 4, a LayerNorm with scale and bias 8 per
element + 2 per row, a softmax row of n entries 4n - 1); tests/test_uvit.py checks them against XLA.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lees_jax import gates as gating
from lees_jax.models import backbone, layers
from lees_jax.models.uvit_blocks import (UViTBlock, conv_init, layer_norm,  # noqa: F401
                                         normal_init, zeros_init)

_GELU = 64  # exact (erf) GELU, per element, as XLA counts it
_SILU = 4

# The public checkpoints' networks: ``config.nnet`` of baofff/U-ViT's configs/<name>.py (all
# with mlp_ratio=4, qkv_bias=False, mlp_time_embed=False; the fields no config sets take
# UViT.__init__'s defaults, in_chans=3 and conv=True).
_COMMON = dict(mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
PUBLIC_CONFIGS = {
    'cifar10_uvit_small': dict(_COMMON, img_size=32, patch_size=2, embed_dim=512, depth=12,
                               num_heads=8, num_classes=-1),
    'celeba64_uvit_small': dict(_COMMON, img_size=64, patch_size=4, embed_dim=512, depth=12,
                                num_heads=8, num_classes=-1),
    'imagenet64_uvit_mid': dict(_COMMON, img_size=64, patch_size=4, embed_dim=768, depth=16,
                                num_heads=12, num_classes=1000),
    'imagenet64_uvit_large': dict(_COMMON, img_size=64, patch_size=4, embed_dim=1024, depth=20,
                                  num_heads=16, num_classes=1000),
}


def _layer_norm_flops(rows: int, d: int) -> float:
  return 8.0 * rows * d + 2.0 * rows  # with scale and bias


def _dense(n: int, cin: int, cout: int, bias: bool = True) -> float:
  return 2.0 * n * cin * cout + (n * cout if bias else 0)


@dataclasses.dataclass(frozen=True)
class UViTSpec:
  """``UViT.__init__``'s arguments (its names; defaults: U-ViT-S/4 on CelebA 64).

  ``num_classes`` <= 0 is an unconditional network (the original's -1). ``null_label``: the
  last of the ``num_classes`` label rows is the null class of classifier-free guidance (the
  latent ImageNet configs' 1001 rows); False (the pixel models): no null class.
  """
  img_size: int = 64
  patch_size: int = 4
  in_chans: int = 3
  embed_dim: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qkv_bias: bool = False
  mlp_time_embed: bool = False
  num_classes: int = -1
  conv: bool = True
  null_label: bool = False

  TRAINING_FIELDS = ()

  def __post_init__(self):
    problems = []
    if self.patch_size < 1 or self.img_size % self.patch_size:
      problems.append(f'img_size {self.img_size} is not divisible by patch_size {self.patch_size}')
    if self.embed_dim % self.num_heads:
      problems.append(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
    if self.embed_dim % 2:
      problems.append(f'embed_dim {self.embed_dim} must be even (the time token is [cos, sin])')
    if self.depth < 1 or self.in_chans < 1:
      problems.append('depth and in_chans must be >= 1')
    if self.mlp_hidden < 1:
      problems.append(f'embed_dim * mlp_ratio = {self.embed_dim * self.mlp_ratio} must be >= 1')
    if self.null_label and self.num_classes < 2:
      problems.append('null_label needs num_classes >= 2 (the classes and the null class)')
    if problems:
      raise ValueError('invalid U-ViT architecture: ' + '; '.join(problems))

  @property
  def conditional(self) -> bool:
    return self.num_classes > 0

  @property
  def num_side(self) -> int:  # in-blocks = out-blocks
    return self.depth // 2

  @property
  def num_blocks(self) -> int:
    return 2 * self.num_side + 1

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def extras(self) -> int:  # the time token, and the label token of a conditional network
    return 2 if self.conditional else 1

  @property
  def num_tokens(self) -> int:
    return self.extras + self.num_patches

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.in_chans

  @property
  def mlp_hidden(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  def block_names(self) -> tuple[str, ...]:
    """The blocks' parameter subtrees in execution order (unit k = block k)."""
    return (tuple(f'in_blocks_{i}' for i in range(self.num_side)) + ('mid_block',)
            + tuple(f'out_blocks_{i}' for i in range(self.num_side)))

  @classmethod
  def from_config(cls, model_config) -> 'UViTSpec':
    """The spec of a ``config.model``; ``preset`` names a `PUBLIC_CONFIGS` network, and fields
    given next to it override it. Other keys (``name``, ``dtype``) are ignored."""
    values = dict(model_config)
    preset = values.get('preset')
    if preset and preset not in PUBLIC_CONFIGS:
      raise ValueError(f'unknown U-ViT preset {preset!r}; choose one of {sorted(PUBLIC_CONFIGS)}')
    fields = {f.name for f in dataclasses.fields(cls)}
    named = dict(PUBLIC_CONFIGS[preset]) if preset else {}
    named.update({k: v for k, v in values.items() if k in fields})
    return cls(**named)


# ---------------------------------------------------------------------------------------------
# Cost.
# ---------------------------------------------------------------------------------------------

def body_flops(spec: UViTSpec) -> float:
  """Per-image FLOPs of one block's attention and MLP (what a skipped block saves)."""
  n, d, m, heads = spec.num_tokens, spec.embed_dim, spec.mlp_hidden, spec.num_heads
  attention = (_dense(n, d, 3 * d, spec.qkv_bias) + n * d     # qkv; q scaled by head_dim^-0.5
               + 2 * (2.0 * n * n * d)                        # q k^T and weights @ v
               + heads * n * (4.0 * n - 1) + _dense(n, d, d))  # softmax rows, proj
  mlp = _dense(n, d, m) + _GELU * n * m + _dense(n, m, d)
  return 2 * _layer_norm_flops(n, d) + attention + mlp + 2.0 * n * d  # two residual adds


def skip_linear_flops(spec: UViTSpec) -> float:
  return _dense(spec.num_tokens, 2 * spec.embed_dim, spec.embed_dim)


def always_flops(spec: UViTSpec) -> float:
  """Per-image FLOPs no gate skips: patch embedding, time token, positions, head."""
  d, c, hw = spec.embed_dim, spec.in_chans, spec.img_size ** 2
  patches = _dense(spec.num_patches, spec.patch_dim, d)
  time = 3 * (d // 2)  # t * w, cos, sin
  if spec.mlp_time_embed:
    time += _dense(1, d, 4 * d) + _SILU * 4 * d + _dense(1, 4 * d, d)
  positions = spec.num_tokens * d
  head = _layer_norm_flops(spec.num_patches, d) + _dense(spec.num_patches, d, spec.patch_dim)
  if spec.conv:  # 3 x 3, zero padding: the taps on the padding are not counted (as XLA)
    taps = 3 * spec.img_size - 2
    head += 2.0 * taps * taps * c * c + hw * c
  return patches + time + positions + head


def uvit_units(spec: UViTSpec) -> tuple[backbone.Unit, ...]:
  body, linear, d = body_flops(spec), skip_linear_flops(spec), spec.embed_dim
  out = []
  n = spec.num_side
  for k, name in enumerate(spec.block_names()):
    position, block = (('encoder', k) if k < n else ('middle', 0) if k == n
                       else ('decoder', k - n - 1))
    decoder = position == 'decoder'
    out.append(backbone.Unit(
        index=k, name=name, kind='transformer', position=position, block=block,
        run_flops=body + (linear if decoder else 0.0), skip_flops=linear if decoder else 0.0,
        skip='skip_linear' if decoder else 'identity', ase_droppable=decoder,
        resolution=spec.grid, in_ch=d, out_ch=d))
  return tuple(out)


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------

class UViT(nn.Module):
  """``apply({'params': p}, x, t[, y])``: x NHWC pixels, t the network time (999 t of the VP
  SDE), y labels of a conditional network; returns epsilon (B, H, W, C), float32."""
  spec: UViTSpec = UViTSpec()
  dtype: Any = jnp.float32

  # The backbone interface (lees_jax.models.backbone).
  @property
  def units(self) -> tuple[backbone.Unit, ...]:
    return uvit_units(self.spec)

  @property
  def num_units(self) -> int:
    return self.spec.num_blocks

  @property
  def always_flops(self) -> float:
    return always_flops(self.spec)

  @property
  def input(self) -> backbone.InputSpec:
    s = self.spec
    return backbone.InputSpec('pixels', (s.img_size, s.img_size, s.in_chans))

  @property
  def conditioning(self) -> backbone.ClassConditioning | None:
    s = self.spec
    if not s.conditional:
      return None
    if s.null_label:
      return backbone.ClassConditioning(s.num_classes - 1, null_class=s.num_classes - 1)
    return backbone.ClassConditioning(s.num_classes, null_class=None)

  @property
  def time_embedding(self) -> tuple[str, ...]:
    return ('time_embed_0', 'time_embed_2') if self.spec.mlp_time_embed else ()

  output = 'eps'

  @property
  def stack(self) -> backbone.Stack:
    """The blocks as two stacks of identical `UViTBlock`s (the 'stacked' sampling path):

    * the in-blocks and the mid-block (units 0..n, blocks without a skip linear), whose outputs
      -- a skipped block's: its input, as the plain forward pass pushes it -- are recorded as
      the long skips;
    * the out-blocks (units n+1..2n): out-block i applies its skip linear to (h, skip of
      in-block n-1-i) whether kept or not (ASE's rule), and its attention and MLP if kept.

    The prologue is `embed`, the epilogue `head`, both with the full params."""
    s, n = self.spec, self.spec.num_side
    make = functools.partial(UViTBlock, s.embed_dim, s.num_heads, s.mlp_hidden, s.qkv_bias,
                             dtype=self.dtype)
    plain, out = make(), make(skip=True)
    names = s.block_names()
    in_and_mid = backbone.BlockStack(
        'in_and_mid_blocks', names[:n + 1],
        block=lambda block_params, h, ctx: plain.apply({'params': block_params}, h),
        record=lambda ctx, outputs: outputs)  # the context of the out-blocks: the skips
    out_blocks = backbone.BlockStack(
        'out_blocks', names[n + 1:],
        block=lambda block_params, h, skips: out.apply({'params': block_params}, h,
                                                       method=UViTBlock.body),
        mix=lambda block_params, h, skips, i: out.apply(
            {'params': block_params}, h, skips.at(n - 1 - i), method=UViTBlock.mix_skip))
    return backbone.Stack(
        prologue=lambda params, x, t, y: (self.apply({'params': params}, x, t, y,
                                                     method=UViT.embed), None),
        stacks=(in_and_mid, out_blocks),
        epilogue=lambda params, h, ctx: self.apply({'params': params}, h, method=UViT.head))

  def setup(self):
    s, d = self.spec, self.spec.embed_dim
    p = s.patch_size
    self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                               kernel_init=conv_init, bias_init=zeros_init, name='patch_embed')
    if s.mlp_time_embed:  # torch's nn.Sequential(Linear, SiLU, Linear): modules 0 and 2
      dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=normal_init)
      self.time_embed_0 = dense(4 * d, name='time_embed_0')
      self.time_embed_2 = dense(d, name='time_embed_2')
    if s.conditional:
      self.label_emb = nn.Embed(s.num_classes, d, dtype=self.dtype,
                                embedding_init=nn.initializers.normal(1.0), name='label_emb')
    self.pos_embed = self.param('pos_embed', normal_init, (1, s.num_tokens, d))
    block = functools.partial(UViTBlock, d, s.num_heads, s.mlp_hidden, s.qkv_bias,
                              dtype=self.dtype)
    self.in_blocks = [block(name=f'in_blocks_{i}') for i in range(s.num_side)]
    self.mid_block = block(name='mid_block')
    self.out_blocks = [block(skip=True, name=f'out_blocks_{i}') for i in range(s.num_side)]
    self.norm = layer_norm(self.dtype, 'norm')
    self.decoder_pred = nn.Dense(s.patch_dim, dtype=self.dtype, kernel_init=normal_init,
                                 name='decoder_pred')
    if s.conv:
      self.final_layer = nn.Conv(s.in_chans, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                 kernel_init=conv_init, bias_init=zeros_init, name='final_layer')

  def time_token(self, t, batch: int):
    """(B, 1, width): U-ViT's ``timestep_embedding`` ([cos, sin], frequencies exp(-ln(1e4) i /
    half)), through the time MLP if ``mlp_time_embed``."""
    d = self.spec.embed_dim
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    emb = layers.timestep_embedding(t, d, freq_shift=0.0)  # [sin, cos]
    emb = jnp.concatenate([emb[:, d // 2:], emb[:, :d // 2]], axis=-1).astype(self.dtype)
    if self.spec.mlp_time_embed:
      emb = self.time_embed_2(nn.silu(self.time_embed_0(emb)))
    return emb[:, None, :]

  def embed(self, x, t, y):
    """The tokens (B, extras + patches, width) with their position embedding."""
    s = self.spec
    want = (s.img_size, s.img_size, s.in_chans)
    if x.ndim != 4 or x.shape[1:] != want:
      raise ValueError(f'expected x of shape (batch, {", ".join(map(str, want))}) in NHWC, '
                       f'got {x.shape}')
    if s.conditional != (y is not None):
      raise ValueError('U-ViT with num_classes > 0 needs labels y, an unconditional one none '
                       f'(num_classes={s.num_classes}, y given: {y is not None})')
    b = x.shape[0]
    h = self.patch_embed(x.astype(self.dtype)).reshape(b, s.num_patches, s.embed_dim)
    tokens = [self.time_token(t, b), h]
    if s.conditional:  # the label token goes in front of the time token
      y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (b,))
      tokens.insert(0, self.label_emb(y)[:, None, :])
    return jnp.concatenate(tokens, axis=1) + self.pos_embed.astype(self.dtype)

  def head(self, h):
    """Final norm, the per-patch prediction, unpatchify, the 3 x 3 convolution."""
    s = self.spec
    p, g, c = s.patch_size, s.grid, s.in_chans
    h = self.decoder_pred(self.norm(h[:, s.extras:]))  # per token: the extra ones dropped first
    h = h.reshape(h.shape[0], g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    h = h.reshape(h.shape[0], g * p, g * p, c)
    if s.conv:
      h = self.final_layer(h)
    return h.astype(jnp.float32)

  def __call__(self, x, t, y=None, *, gates=None, train: bool = False):
    del train  # U-ViT has no dropout
    gates = gating.ALL_UNITS if gates is None else gates
    gates.check(self.num_units)
    h = self.embed(x, t, y)
    run = lambda blk, h: blk(h)  # noqa: E731
    identity = lambda blk, h: h  # noqa: E731
    skips = []
    for k, block in enumerate(self.in_blocks):
      h = gates.run(k, block, run, identity, h)
      skips.append(h)
    h = gates.run(self.spec.num_side, self.mid_block, run, identity, h)
    run_out = lambda blk, h, skip: blk(h, skip)  # noqa: E731
    linear_only = lambda blk, h, skip: blk.mix_skip(h, skip)  # noqa: E731
    for i, block in enumerate(self.out_blocks):
      h = gates.run(self.spec.num_side + 1 + i, block, run_out, linear_only, h, skips.pop())
    return self.head(h)


def _build(model_config, dtype) -> UViT:
  return UViT(UViTSpec.from_config(model_config), dtype=dtype)


backbone.register(backbone.Family(
    'uvit', _build, 'U-ViT (Bao et al. 2023) on pixels, e.g. celeba64_uvit_small.pth',
    spec_from_config=UViTSpec.from_config, training_fields=UViTSpec.TRAINING_FIELDS))
