"""DiT (Peebles & Xie 2023): a class-conditional transformer on patchified latents.

The network: the latent (H = W = input_size, C channels, NHWC) is cut into p x p patches by a
stride-p convolution; a fixed 2-D sin-cos position embedding is added (a constant, not a
parameter); ``depth`` identical adaLN-Zero blocks run on the tokens, conditioned on
c = timestep embedding + label embedding; a final adaLN layer maps every token to its p x p
patch of ``out_channels`` (2C with a learned variance) and the tokens are put back into NHWC.

Gateable units are the ``depth`` transformer blocks, in order. Each runs through the gate form
(`lees_jax.gates`) and a skipped block returns its input: a block is a residual update
x + gate * f(x), so the identity is the block without its update, the skip ASE uses on DiT.

Two conventions differ between the original code and diffusers' port of it; they are spec
fields with the original's values by default, and the diffusers importer sets diffusers' values
so that an imported model is the network diffusers runs:
* ``time_freq_shift``: frequencies exp(-ln(1e4) i / (128 - shift)); the original divides by
  128 (shift 0), diffusers' ``CombinedTimestepLabelEmbeddings`` by 127 (shift 1);
* ``mlp_norm_eps``: epsilon of the LayerNorm before the MLP; 1e-6 in the original, diffusers'
  ``norm_eps`` (1e-5 unless the config says otherwise) there.

FLOPs follow `lees_jax.models.unet`: a multiply-add is 2 FLOPs (XLA's convention) plus
per-element charges for normalisation, activations, softmax and residual adds, calibrated
against XLA's cost analysis (tests/test_dit.py).
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

from lees_jax import gates as gating
from lees_jax.models import backbone, layers

# The paper's model sizes (Table 1): width, depth, heads; each comes with patch 2, 4 or 8.
SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}
PATCH_SIZES = (2, 4, 8)
FREQUENCY_DIM = 256  # the sinusoidal timestep embedding fed to the timestep MLP

# Element-wise FLOPs as XLA's cost analysis counts the ops this module emits (each measured
# alone): tanh-GELU 8 and SiLU 4 per element; a LayerNorm without affine parameters 6 per
# element + 2 per row (rsqrt of variance + eps); a softmax row of n entries 4n - 1 (max,
# subtract, exp, sum, divide; a reduction of n values counts n - 1).
_GELU = 8
_SILU = 4


def _layer_norm_flops(rows: int, d: int) -> float:
  return 6.0 * rows * d + 2.0 * rows


def _softmax_flops(rows: int, n: int) -> float:
  return rows * (4.0 * n - 1)


@dataclasses.dataclass(frozen=True)
class DiTSpec:
  """Architecture hyper-parameters (defaults: DiT-XL/2 on 256x256 images, 32x32x4 latents)."""
  input_size: int = 32
  patch_size: int = 2
  in_channels: int = 4
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000       # label ``num_classes`` is the null class (guidance)
  learn_sigma: bool = True      # outputs 2C: epsilon and the variance interpolation v
  class_dropout_prob: float = 0.1  # training only: labels replaced by the null class
  time_freq_shift: float = 0.0  # see the module docstring (diffusers: 1)
  mlp_norm_eps: float = 1e-6    # see the module docstring (diffusers: its norm_eps)

  # Settings of training, not of the network: ignored when two architectures are compared.
  TRAINING_FIELDS = ('class_dropout_prob',)

  def __post_init__(self):
    problems = []
    if self.input_size % self.patch_size:
      problems.append(f'input_size {self.input_size} is not divisible by patch_size '
                      f'{self.patch_size}')
    if self.hidden_size % self.num_heads:
      problems.append(f'hidden_size {self.hidden_size} is not divisible by num_heads '
                      f'{self.num_heads}')
    if self.hidden_size % 4:
      problems.append(f'hidden_size {self.hidden_size} must be a multiple of 4 (2-D sin-cos '
                      'position embedding: sin and cos of rows and of columns)')
    if self.depth < 1 or self.num_classes < 1 or self.in_channels < 1:
      problems.append('depth, num_classes and in_channels must be >= 1')
    if not 0.0 <= self.class_dropout_prob < 1.0:
      problems.append(f'class_dropout_prob {self.class_dropout_prob} must be in [0, 1)')
    if self.mlp_hidden < 1 or self.mlp_hidden != self.hidden_size * self.mlp_ratio:
      problems.append(f'hidden_size * mlp_ratio = {self.hidden_size * self.mlp_ratio} must be a '
                      'positive integer')
    if problems:
      raise ValueError('invalid DiT architecture: ' + '; '.join(problems))

  @property
  def grid(self) -> int:  # tokens per side
    return self.input_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_size * self.mlp_ratio)

  @classmethod
  def from_config(cls, model_config) -> 'DiTSpec':
    """The spec of a `config.model`; ``size`` (e.g. 'XL/2') names a paper size, and any width,
    depth, heads or patch given next to it must agree with it. Other keys are ignored."""
    values = dict(model_config)
    fields = {f.name for f in dataclasses.fields(cls)}
    named = dataclasses.asdict(dit_size(values['size'])) if values.get('size') else {}
    clashes = [f'{k}={values[k]!r} (size {values["size"]} has {named[k]!r})'
               for k in ('hidden_size', 'depth', 'num_heads', 'patch_size')
               if named and k in values and values[k] != named[k]]
    if clashes:
      raise ValueError('config.model contradicts its size: ' + '; '.join(clashes))
    named.update({k: v for k, v in values.items() if k in fields})
    return cls(**named)


def dit_size(name: str, **overrides) -> DiTSpec:
  """The paper's DiT-<size>/<patch>, e.g. ``dit_size('XL/2')`` (other fields overridable)."""
  size, _, patch = name.removeprefix('DiT-').partition('/')
  if size not in SIZES or not patch.isdigit() or int(patch) not in PATCH_SIZES:
    raise ValueError(f'unknown DiT size {name!r}: choose <{"|".join(SIZES)}>/<'
                     f'{"|".join(map(str, PATCH_SIZES))}>, e.g. XL/2')
  width, depth, heads = SIZES[size]
  return DiTSpec(**{'hidden_size': width, 'depth': depth, 'num_heads': heads,
                    'patch_size': int(patch), **overrides})


# ---------------------------------------------------------------------------------------------
# Cost.
# ---------------------------------------------------------------------------------------------

def _dense(n: int, cin: int, cout: int) -> float:
  return 2.0 * n * cin * cout + n * cout


def _modulated_norm(n: int, d: int) -> float:
  """LayerNorm, then x * (1 + scale) + shift (1 + scale once per image)."""
  return _layer_norm_flops(n, d) + 2.0 * n * d + d


def block_flops(spec: DiTSpec) -> float:
  """Per-image FLOPs of one adaLN-Zero block (SiLU(c) is shared by all blocks: always-run)."""
  n, d, m, heads = spec.num_tokens, spec.hidden_size, spec.mlp_hidden, spec.num_heads
  modulation = _dense(1, d, 6 * d)
  attention = (3 * _dense(n, d, d) + n * d          # q, k, v; q scaled by 1/sqrt(head dim)
               + 2 * (2.0 * n * n * d)              # q k^T and weights @ v, all heads
               + _softmax_flops(heads * n, n) + _dense(n, d, d))
  mlp = _dense(n, d, m) + _GELU * n * m + _dense(n, m, d)
  gated_residuals = 2 * 2.0 * n * d                 # x + gate * update, twice
  return modulation + 2 * _modulated_norm(n, d) + attention + mlp + gated_residuals


def always_flops(spec: DiTSpec) -> float:
  """Per-image FLOPs no gate skips: patch and position embedding, timestep and label
  embedding, SiLU(c), final layer."""
  n, d, p = spec.num_tokens, spec.hidden_size, spec.patch_size
  patch_embed = _dense(n, p * p * spec.in_channels, d) + n * d  # stride-p conv + positions
  frequencies = 3 * (FREQUENCY_DIM // 2)                        # t * w, then sin and cos
  timestep = frequencies + _dense(1, FREQUENCY_DIM, d) + _SILU * d + _dense(1, d, d)
  conditioning = d + _SILU * d                                  # t_emb + y_emb, SiLU(c)
  final = _dense(1, d, 2 * d) + _modulated_norm(n, d) + _dense(n, d, p * p * spec.out_channels)
  return patch_embed + timestep + conditioning + final


def dit_units(spec: DiTSpec) -> tuple[backbone.Unit, ...]:
  # Every block is 'middle': DiT is an isotropic stack without long skips or resolution changes,
  # so no block is structurally an encoder or a decoder one; a split at depth / 2 would invent a
  # boundary the network does not have. ASE may drop every block (from the last one backwards).
  run = block_flops(spec)
  return tuple(backbone.Unit(
      index=k, name=f'block_{k}', kind='transformer', position='middle', block=k,
      run_flops=run, skip_flops=0.0, skip='identity', ase_droppable=True, resolution=spec.grid,
      in_ch=spec.hidden_size, out_ch=spec.hidden_size) for k in range(spec.depth))


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def position_embedding(grid: int, dim: int) -> np.ndarray:
  """(grid * grid, dim) fixed 2-D sin-cos embedding, tokens in row-major order.

  The first dim/2 channels encode the token's column, the last dim/2 its row, each as
  [sin(pos * w), cos(pos * w)] with w_i = 10000^(-i / (dim/4)); computed in float64, stored in
  float32, as both reference implementations do.
  """
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

  def one_axis(pos):
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                           indexing='ij')
  return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  # No affine parameters: adaLN supplies scale and shift. The two-pass variance keeps fp32
  # agreement with torch's LayerNorm.
  return nn.LayerNorm(epsilon=eps, use_bias=False, use_scale=False, use_fast_variance=False,
                      dtype=dtype, name=name)


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# The original initialisation: Xavier-uniform linear layers with zero biases; the adaLN
# modulations and the output layer zero (adaLN-Zero: every block starts as the identity).
_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


class DiTBlock(nn.Module):
  """x += gate_msa * Attn(modulate(LN(x))); x += gate_mlp * MLP(modulate(LN(x))), with shift,
  scale and gate of both from Linear(SiLU(c))."""
  hidden_size: int
  num_heads: int
  mlp_hidden: int
  mlp_norm_eps: float = 1e-6
  dtype: Any = jnp.float32

  def setup(self):
    d = self.hidden_size
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=_xavier, bias_init=_zeros)
    self.modulation = nn.Dense(6 * d, dtype=self.dtype, kernel_init=_zeros, bias_init=_zeros,
                               name='modulation')
    self.attn_norm = _layer_norm(1e-6, self.dtype, 'attn_norm')
    self.query, self.key, self.value = (dense(d, name=n) for n in ('query', 'key', 'value'))
    self.attn_out = dense(d, name='attn_out')
    self.mlp_norm = _layer_norm(self.mlp_norm_eps, self.dtype, 'mlp_norm')
    self.mlp_in = dense(self.mlp_hidden, name='mlp_in')
    self.mlp_out = dense(d, name='mlp_out')

  def _attention(self, x):
    b, n, d = x.shape
    heads = lambda h: h.reshape(b, n, self.num_heads, d // self.num_heads)  # noqa: E731
    q = heads(self.query(x)) * (1.0 / math.sqrt(d // self.num_heads))
    k, v = heads(self.key(x)), heads(self.value(x))
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.attn_out(jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, n, d))

  def __call__(self, x, silu_c):
    (shift_msa, scale_msa, gate_msa,
     shift_mlp, scale_mlp, gate_mlp) = jnp.split(self.modulation(silu_c), 6, axis=-1)
    h = self._attention(_modulate(self.attn_norm(x), shift_msa, scale_msa))
    x = x + gate_msa[:, None, :] * h
    h = _modulate(self.mlp_norm(x), shift_mlp, scale_mlp)
    h = self.mlp_out(nn.gelu(self.mlp_in(h), approximate=True))
    return x + gate_mlp[:, None, :] * h

  def skip(self, x, silu_c):
    del silu_c
    return x


def _block(spec: DiTSpec, dtype, name: str | None = None) -> DiTBlock:
  return DiTBlock(spec.hidden_size, spec.num_heads, spec.mlp_hidden, spec.mlp_norm_eps,
                  dtype=dtype, name=name)


class DiT(nn.Module):
  """Class-conditional DiT: ``apply({'params': p}, x, t, y)`` with x NHWC latents, integer
  timesteps t and labels y (``num_classes`` = unconditional); returns (B, H, W, out_channels).

  The forward pass is `embed` (patches, positions and the conditioning SiLU(c)), the ``depth``
  blocks ``block_k`` through the gate form, then `head` (final adaLN layer, unpatchify); the
  'stacked' sampling path runs the same three pieces (`stack`)."""
  spec: DiTSpec = DiTSpec()
  dtype: Any = jnp.float32

  # The backbone interface (lees_jax.models.backbone).
  @property
  def units(self) -> tuple[backbone.Unit, ...]:
    return dit_units(self.spec)

  @property
  def num_units(self) -> int:
    return self.spec.depth

  @property
  def always_flops(self) -> float:
    return always_flops(self.spec)

  @property
  def input(self) -> backbone.InputSpec:
    s = self.spec
    return backbone.InputSpec('latents', (s.input_size, s.input_size, s.in_channels),
                              decoder='sd_vae')

  @property
  def conditioning(self) -> backbone.ClassConditioning:
    return backbone.ClassConditioning(self.spec.num_classes, null_class=self.spec.num_classes)

  time_embedding = ('t_embed_in', 't_embed_out')  # the timestep MLP's parameter subtrees

  @property
  def output(self) -> str:
    # learn_sigma: channels [:C] are epsilon, [C:] the variance interpolation v (REFERENCE §9).
    return 'eps_variance' if self.spec.learn_sigma else 'eps'

  @property
  def stack(self) -> backbone.Stack:
    """The blocks as one stack of identical `DiTBlock`s (the 'stacked' sampling path): the
    prologue is `embed` (context SiLU(c)), the epilogue `head`, both with the full params."""
    block = _block(self.spec, self.dtype)
    blocks = backbone.BlockStack(
        'blocks', tuple(f'block_{k}' for k in range(self.spec.depth)),
        block=lambda block_params, h, silu_c: block.apply({'params': block_params}, h, silu_c))
    return backbone.Stack(
        lambda params, x, t, y: self.apply({'params': params}, x, t, y, method=DiT.embed),
        (blocks,),
        lambda params, h, silu_c: self.apply({'params': params}, h, silu_c, method=DiT.head))

  def setup(self):
    spec, d, p = self.spec, self.spec.hidden_size, self.spec.patch_size
    # Patches: a stride-p convolution (fan-in p*p*C, fan-out width for its Xavier init).
    patch_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2))
    self.patch_embed = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                               kernel_init=patch_init, bias_init=_zeros)
    normal = nn.initializers.normal(0.02)
    self.t_embed_in = nn.Dense(d, dtype=self.dtype, kernel_init=normal)
    self.t_embed_out = nn.Dense(d, dtype=self.dtype, kernel_init=normal)
    self.y_embed = nn.Embed(spec.num_classes + 1, d, dtype=self.dtype, embedding_init=normal)
    self.blocks = [_block(spec, self.dtype, name=f'block_{k}') for k in range(spec.depth)]
    self.final_modulation = nn.Dense(2 * d, dtype=self.dtype, kernel_init=_zeros)
    self.final_norm = _layer_norm(1e-6, self.dtype, 'final_norm')
    self.final_linear = nn.Dense(p * p * spec.out_channels, dtype=self.dtype, kernel_init=_zeros)

  def embed(self, x, t, y, train: bool = False):
    """(h, silu_c): the tokens (B, N, width) with positions, and SiLU(c), c = timestep
    embedding + label embedding (labels dropped to the null class in training)."""
    spec = self.spec
    want = (spec.input_size, spec.input_size, spec.in_channels)
    if x.ndim != 4 or x.shape[1:] != want:
      raise ValueError(f'expected x of shape (batch, {", ".join(map(str, want))}) in NHWC, '
                       f'got {x.shape}')
    batch, d, g = x.shape[0], spec.hidden_size, spec.grid
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (batch,))
    h = self.patch_embed(x.astype(self.dtype))
    h = h.reshape(batch, g * g, d) + jnp.asarray(position_embedding(g, d), self.dtype)

    # c = MLP(frequencies of t) + label embedding; the frequencies in the [cos, sin] order.
    freqs = layers.timestep_embedding(t, FREQUENCY_DIM, freq_shift=spec.time_freq_shift)
    freqs = jnp.concatenate([freqs[:, FREQUENCY_DIM // 2:], freqs[:, :FREQUENCY_DIM // 2]], -1)
    t_emb = self.t_embed_out(nn.silu(self.t_embed_in(freqs)))
    if train and spec.class_dropout_prob > 0:  # classifier-free guidance: learn the null class
      drop = jax.random.uniform(self.make_rng('dropout'), (batch,)) < spec.class_dropout_prob
      y = jnp.where(drop, spec.num_classes, y)
    return h, nn.silu(t_emb + self.y_embed(y))  # every adaLN modulation starts with SiLU(c)

  def head(self, h, silu_c):
    """The final adaLN layer and unpatchify: tokens -> (B, H, W, out_channels) float32."""
    spec, p, g = self.spec, self.spec.patch_size, self.spec.grid
    shift, scale = jnp.split(self.final_modulation(silu_c), 2, axis=-1)
    h = self.final_linear(_modulate(self.final_norm(h), shift, scale))
    # Unpatchify: token (i, j) holds its patch as (row, column, channel).
    h = h.reshape(h.shape[0], g, g, p, p, spec.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(h.shape[0], g * p, g * p, spec.out_channels).astype(jnp.float32)

  def __call__(self, x, t, y, *, gates=None, train: bool = False):
    gates = gating.ALL_UNITS if gates is None else gates
    gates.check(self.num_units)
    h, silu_c = self.embed(x, t, y, train)
    run_block = lambda blk, h, c: blk(h, c)  # noqa: E731
    skip_block = lambda blk, h, c: blk.skip(h, c)  # noqa: E731
    for k, block in enumerate(self.blocks):
      h = gates.run(k, block, run_block, skip_block, h, silu_c)
    return self.head(h, silu_c)


def _build(model_config, dtype) -> DiT:
  return DiT(DiTSpec.from_config(model_config), dtype=dtype)


backbone.register(backbone.Family(
    'dit', _build, 'DiT (Peebles & Xie 2023) on SD-VAE latents, e.g. facebook/DiT-XL-2-256',
    spec_from_config=DiTSpec.from_config, training_fields=DiTSpec.TRAINING_FIELDS))
