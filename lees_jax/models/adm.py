"""ADM: guided-diffusion's (and improved-diffusion's) ``UNetModel`` with gateable units.

The network of Dhariwal & Nichol (2021), ``guided_diffusion/unet.py``, NHWC: a 3x3 stem; per
level ``num_res_blocks`` ResBlocks (each followed by attention where the level's downsample rate
is in ``attention_resolutions``) and, between levels, a downsampling step; a middle ResBlock,
attention, ResBlock; per level, coarsest first, ``num_res_blocks + 1`` ResBlocks on the
concatenation with the matching input-path tensor (attention likewise) and an upsampling step;
GroupNorm, SiLU, 3x3 conv. The timestep embedding is [cos, sin] of t * exp(-ln(1e4) i / (C/2))
through Linear, SiLU, Linear; a class-conditional model adds a label embedding to it. With
``learn_sigma`` the output has 2C channels: epsilon and the variance interpolation v.
``time_scale`` multiplies t before the embedding (improved-diffusion's ``rescale_timesteps``
calls its network with t * 1000 / T); the network always takes the original integer t.

The network is described once as a layout (`adm_layout`): the module executes it, and the
units, FLOPs, ``describe`` and the importers (`lees_jax.convert.guided_diffusion`,
`lees_jax.convert.diffusers_adm`) read it, so names and order cannot disagree.

Gateable units: every ResBlock and attention block in execution order -- input blocks
('encoder'), middle ('middle'), output blocks ('decoder'). A skipped ResBlock returns its skip
connection (identity, or the 1x1 projection where channels change), skipped attention its
input (`adm_blocks`). ASE may drop the decoder units and the last middle unit (as on the DDPM
UNet), from the end.

Resampling ResBlocks (``resblock_updown``) are gateable too, skipped to their own skip path: a
parameter-free 2x2 average pool (down) or nearest-neighbour x2 (up) of the input. That is
exactly the original block without its residual branch -- the same rule as for every other
ResBlock, since the original computes ``skip_connection(x_upd(x)) + branch`` with the identity
as ``skip_connection`` there -- and it keeps every shape (the resolution changes with or
without the branch), so the U's skip tensors and later units are unaffected. Making them
ungateable would put up to 2 (levels - 1) ResBlocks out of LEES's reach for no structural
reason; a gate that keeps them costs nothing. Without ``resblock_updown`` the learned
convolutions (``Downsample``/``Upsample``) always run.

FLOPs follow `lees_jax.models.unet`: a multiply-add is 2 FLOPs (XLA's convention) plus per-
element charges for normalisation, activations, softmax and residual adds; tests compare them
with XLA's cost analysis (tests/test_adm.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lees_jax import gates as gating
from lees_jax.models import adm_blocks, backbone, layers, unet

_GROUPNORM, _SWISH = unet._GROUPNORM, unet._SWISH  # pylint: disable=protected-access
_ELEMENTWISE = _GROUPNORM + _SWISH


def _number(v):
  v = float(v)
  return int(v) if v.is_integer() else v


@dataclasses.dataclass(frozen=True)
class ADMSpec:
  """``UNetModel``'s arguments (defaults: its own, ``num_classes`` 0 = unconditional)."""
  image_size: int = 64
  in_channels: int = 3
  model_channels: int = 128
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (2, 4)  # downsample rates, e.g. 64 // 32 = 2
  channel_mult: tuple[float, ...] = (1, 2, 4, 8)
  dropout: float = 0.0
  num_classes: int = 0           # > 0: class-conditional (labels 0..num_classes-1, no null class)
  learn_sigma: bool = False      # outputs 2C: epsilon and the variance interpolation v
  num_heads: int = 1
  num_head_channels: int = -1    # > 0: heads of this width (num_heads ignored)
  num_heads_upsample: int = -1   # -1: num_heads (output blocks; unused with num_head_channels)
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_new_attention_order: bool = False
  time_scale: float = 1.0        # t * time_scale enters the embedding (see the module docstring)
  num_groups: int = 32
  norm_eps: float = 1e-5

  TRAINING_FIELDS = ('dropout',)

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    set_('channel_mult', tuple(_number(m) for m in self.channel_mult))
    set_('attention_resolutions', tuple(sorted({int(r) for r in self.attention_resolutions})))
    problems = []
    levels = len(self.channel_mult)
    if levels < 1 or self.image_size % (2 ** (levels - 1)):
      problems.append(f'image_size {self.image_size} is not divisible by 2**{levels - 1} (one '
                      'halving per level after the first)')
    rates = [2 ** i for i in range(levels)]
    unused = [r for r in self.attention_resolutions if r not in rates]
    if unused:
      problems.append(f'attention_resolutions {unused} are not downsample rates of the levels '
                      f'({rates})')
    for m in self.channel_mult:
      c = int(m * self.model_channels)
      if c < 1 or c % self.num_groups:
        problems.append(f'channels int({m} * {self.model_channels}) = {c} are not a positive '
                        f'multiple of num_groups={self.num_groups}')
    if self.model_channels % 2 or self.model_channels < 2:
      problems.append(f'model_channels={self.model_channels} must be even (sinusoidal embedding)')
    if self.num_res_blocks < 1 or self.in_channels < 1 or self.num_classes < 0:
      problems.append('num_res_blocks and in_channels must be >= 1, num_classes >= 0')
    if not problems:
      for op in adm_layout(self):
        if op.kind == 'attn' and (op.heads < 1 or op.out_ch % op.heads):
          problems.append(f'{op.name}: {op.out_ch} channels do not split into {op.heads} heads')
    if problems:
      raise ValueError('invalid ADM architecture: ' + '; '.join(problems))

  @property
  def out_channels(self) -> int:
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def temb_dim(self) -> int:
    return 4 * self.model_channels

  @classmethod
  def from_config(cls, model_config) -> 'ADMSpec':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(model_config).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Op:
  """One step of the layout: 'res' | 'attn' (units), 'down' | 'up' (learned resampling),
  'push' (save a skip tensor), 'pop' (concatenate the newest onto the input). ``source`` is
  the original module (``input_blocks.4.0``); ``level`` and ``index`` place it in its path."""
  kind: str
  name: str = ''
  in_ch: int = 0
  out_ch: int = 0
  resolution: int = 0  # input resolution
  resample: str | None = None  # a resampling ResBlock: 'down' | 'up'
  heads: int = 0
  source: str = ''
  level: int = 0
  index: int = 0

  @property
  def gateable(self) -> bool:
    return self.kind in ('res', 'attn')

  @property
  def out_resolution(self) -> int:
    r = self.resolution
    return r // 2 if 'down' in (self.kind, self.resample) else (
        2 * r if 'up' in (self.kind, self.resample) else r)


def _heads(spec: ADMSpec, channels: int, upsample: bool) -> int:
  if spec.num_head_channels != -1:
    return channels // spec.num_head_channels if spec.num_head_channels > 0 else 0
  if upsample and spec.num_heads_upsample != -1:
    return spec.num_heads_upsample
  return spec.num_heads


def adm_layout(spec: ADMSpec) -> list[Op]:
  """The ordered operations between the stem (``input_blocks.0``) and the output head."""
  mc, attn = spec.model_channels, spec.attention_resolutions
  ch = int(spec.channel_mult[0] * mc)
  ops, chans, ds, res, src = [Op('push')], [ch], 1, spec.image_size, 1
  last = len(spec.channel_mult) - 1
  for level, mult in enumerate(spec.channel_mult):
    for i in range(spec.num_res_blocks):
      out = int(mult * mc)
      ops.append(Op('res', f'down_{level}_res_{i}', ch, out, res, source=f'input_blocks.{src}.0',
                    level=level, index=i))
      ch = out
      if ds in attn:
        ops.append(Op('attn', f'down_{level}_attn_{i}', ch, ch, res, heads=_heads(spec, ch, False),
                      source=f'input_blocks.{src}.1', level=level, index=i))
      ops += [Op('push')]
      chans.append(ch)
      src += 1
    if level != last:
      kind, resample = ('res', 'down') if spec.resblock_updown else ('down', None)
      ops += [Op(kind, f'down_{level}_downsample', ch, ch, res, resample=resample,
                 source=f'input_blocks.{src}.0', level=level, index=spec.num_res_blocks),
              Op('push')]
      chans.append(ch)
      src, ds, res = src + 1, ds * 2, res // 2
  ops += [Op('res', 'mid_res_0', ch, ch, res, source='middle_block.0'),
          Op('attn', 'mid_attn', ch, ch, res, heads=_heads(spec, ch, False),
             source='middle_block.1'),
          Op('res', 'mid_res_1', ch, ch, res, source='middle_block.2', index=1)]
  src = 0
  for level in reversed(range(last + 1)):
    out = int(spec.channel_mult[level] * mc)
    for i in range(spec.num_res_blocks + 1):
      ops += [Op('pop'), Op('res', f'up_{level}_res_{i}', ch + chans.pop(), out, res,
                            source=f'output_blocks.{src}.0', level=level, index=i)]
      ch, sub = out, 1
      if ds in attn:
        ops.append(Op('attn', f'up_{level}_attn_{i}', ch, ch, res, heads=_heads(spec, ch, True),
                      source=f'output_blocks.{src}.1', level=level, index=i))
        sub = 2
      if level and i == spec.num_res_blocks:
        kind, resample = ('res', 'up') if spec.resblock_updown else ('up', None)
        ops.append(Op(kind, f'up_{level}_upsample', ch, ch, res, resample=resample,
                      source=f'output_blocks.{src}.{sub}', level=level, index=i + 1))
        ds, res = ds // 2, res * 2
      src += 1
  assert not chans, 'layout bug: unmatched skip tensors'
  return ops


def gateable_units(spec: ADMSpec) -> list[Op]:
  return [op for op in adm_layout(spec) if op.gateable]


# ---------------------------------------------------------------------------------------------
# Cost (per image).
# ---------------------------------------------------------------------------------------------

def _conv(r_in: int, r_out: int, k: int, cin: int, cout: int, stride: int = 1) -> float:
  """A k x k convolution with (k // 2) zero padding per side: taps on the padding are not
  counted (XLA does the same)."""
  pad = k // 2
  taps = sum(sum(0 <= o * stride + d - pad < r_in for d in range(k)) for o in range(r_out))
  return 2.0 * taps * taps * cin * cout + r_out * r_out * cout


def _dense(n: int, cin: int, cout: int) -> float:
  return 2.0 * n * cin * cout + n * cout


def _resample_flops(op: Op, channels: int) -> float:
  """The parameter-free resample of one tensor: 2x2 mean (3 adds and a divide per output);
  nearest-neighbour copies cost nothing."""
  return 4.0 * op.out_resolution ** 2 * channels if op.resample == 'down' else 0.0


def res_flops(spec: ADMSpec, op: Op) -> tuple[float, float]:
  """(run, skip) FLOPs of a ResBlock; SiLU(emb) is shared (always-run)."""
  n_in, n = op.resolution ** 2, op.out_resolution ** 2
  r_out = op.out_resolution
  skip = _resample_flops(op, op.in_ch)
  if op.in_ch != op.out_ch:
    skip += _conv(r_out, r_out, 1, op.in_ch, op.out_ch)
  run = (_ELEMENTWISE * n_in * op.in_ch + _resample_flops(op, op.in_ch)
         + _conv(r_out, r_out, 3, op.in_ch, op.out_ch)
         + _dense(1, spec.temb_dim, (2 if spec.use_scale_shift_norm else 1) * op.out_ch)
         + (2.0 * n * op.out_ch + op.out_ch if spec.use_scale_shift_norm else n * op.out_ch)
         + _ELEMENTWISE * n * op.out_ch + _conv(r_out, r_out, 3, op.out_ch, op.out_ch)
         + skip + n * op.out_ch)
  return run, skip


def attn_flops(op: Op) -> float:
  n, c, heads = op.resolution ** 2, op.out_ch, op.heads
  return (_GROUPNORM * n * c + _dense(n, c, 3 * c) + 2.0 * n * c  # norm, qkv, q and k scaled
          + 2 * (2.0 * n * n * c) + heads * n * (4.0 * n - 1)    # q k^T, weights @ v, softmax
          + _dense(n, c, c) + n * c)                             # proj_out, residual


def adm_units(spec: ADMSpec) -> tuple[backbone.Unit, ...]:
  units, per_position = [], {}
  for op in gateable_units(spec):
    if op.kind == 'res':
      run, skip_flops = res_flops(spec, op)
      skip = ('resample' if op.resample else
              'shortcut_projection' if op.in_ch != op.out_ch else 'identity')
    else:
      run, skip_flops, skip = attn_flops(op), 0.0, 'identity'
    position = {'down': 'encoder', 'mid': 'middle', 'up': 'decoder'}[op.name.split('_')[0]]
    block = per_position.get(position, 0)
    per_position[position] = block + 1
    units.append(backbone.Unit(
        index=len(units), name=op.name, kind=op.kind, position=position, block=block,
        run_flops=run, skip_flops=skip_flops, skip=skip,
        ase_droppable=position == 'decoder' or op.name == 'mid_res_1',
        resolution=op.resolution, in_ch=op.in_ch, out_ch=op.out_ch))
  return tuple(units)


def adm_always_flops(spec: ADMSpec) -> float:
  """Time (and label) embedding, SiLU(emb) shared by the ResBlocks, stem, learned resampling,
  output head."""
  mc, d, r = spec.model_channels, spec.temb_dim, spec.image_size
  c0 = int(spec.channel_mult[0] * mc)
  always = (3 * (mc // 2) + (spec.time_scale != 1.0) + _dense(1, mc, d) + _SWISH * d
            + _dense(1, d, d) + (d if spec.num_classes else 0) + _SWISH * d
            + _conv(r, r, 3, spec.in_channels, c0)
            + _ELEMENTWISE * r * r * c0 + _conv(r, r, 3, c0, spec.out_channels))
  for op in adm_layout(spec):
    r_in, r_out = op.resolution, op.out_resolution
    if op.kind == 'down':  # stride-2 conv
      always += _conv(r_in, r_out, 3, op.in_ch, op.out_ch, stride=2)
    elif op.kind == 'up':  # nearest x2 (free), then a 3x3 conv
      always += _conv(r_out, r_out, 3, op.in_ch, op.out_ch)
  return always


# ---------------------------------------------------------------------------------------------
# The network.
# ---------------------------------------------------------------------------------------------

class ADM(nn.Module):
  """``apply({'params': p}, x, t[, y])``: x NHWC in [-1, 1], integer timesteps t, labels y (a
  class-conditional spec only); returns (B, H, W, out_channels) float32."""
  spec: ADMSpec = ADMSpec()
  dtype: Any = jnp.float32

  # The backbone interface (lees_jax.models.backbone).
  @property
  def units(self) -> tuple[backbone.Unit, ...]:
    return adm_units(self.spec)

  @property
  def num_units(self) -> int:
    return len(gateable_units(self.spec))

  @property
  def always_flops(self) -> float:
    return adm_always_flops(self.spec)

  @property
  def skip_connections(self) -> tuple[backbone.SkipConnection, ...]:
    return backbone.skip_connections_of_layout(adm_layout(self.spec))

  @property
  def input(self) -> backbone.InputSpec:
    s = self.spec
    return backbone.InputSpec('pixels', (s.image_size, s.image_size, s.in_channels))

  @property
  def conditioning(self) -> backbone.ClassConditioning | None:
    # ADM's label table has no null class (it is guided by a classifier, not classifier-free).
    n = self.spec.num_classes
    return backbone.ClassConditioning(n, null_class=None) if n else None

  @property
  def output(self) -> str:
    return 'eps_variance' if self.spec.learn_sigma else 'eps'

  time_embedding = ('time_embed_0', 'time_embed_1')  # the timestep MLP's parameter subtrees

  @nn.compact
  def __call__(self, x, t, y=None, *, gates=None, train: bool = False):
    spec, dt = self.spec, self.dtype
    want = (spec.image_size, spec.image_size, spec.in_channels)
    if x.ndim != 4 or x.shape[1:] != want:
      raise ValueError(f'expected x of shape (batch, {", ".join(map(str, want))}) in NHWC, '
                       f'got {x.shape}')
    if (y is None) != (spec.num_classes == 0):
      raise ValueError('class labels y are required by a class-conditional ADM and refused by '
                       f'an unconditional one (num_classes={spec.num_classes})')
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    gates = gating.ALL_UNITS if gates is None else gates
    gates.check(self.num_units)

    tt = jnp.asarray(t, jnp.float32)
    if spec.time_scale != 1.0:
      tt = tt * spec.time_scale
    half = spec.model_channels // 2
    freqs = layers.timestep_embedding(tt, spec.model_channels, freq_shift=0.0)
    freqs = jnp.concatenate([freqs[:, half:], freqs[:, :half]], axis=-1)  # [cos, sin]
    emb = nn.Dense(spec.temb_dim, dtype=dt, name='time_embed_0')(freqs)
    emb = nn.Dense(spec.temb_dim, dtype=dt, name='time_embed_1')(nn.silu(emb))
    if spec.num_classes:
      y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), (x.shape[0],))
      emb = emb + nn.Embed(spec.num_classes, spec.temb_dim, dtype=dt, name='label_emb')(y)
    emb = nn.silu(emb)  # every ResBlock's emb_layers start with SiLU: computed once

    c0 = int(spec.channel_mult[0] * spec.model_channels)
    h = nn.Conv(c0, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name='conv_in')(x.astype(dt))
    run_unit = lambda mdl, h, e: mdl(h, e, train)  # noqa: E731
    skip_unit = lambda mdl, h, e: mdl.skip(h, e)  # noqa: E731
    norm = dict(num_groups=spec.num_groups, norm_eps=spec.norm_eps, dtype=dt)
    skips, k = [], 0
    for op in adm_layout(spec):
      if op.kind == 'push':
        skips.append(h)
      elif op.kind == 'pop':
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      elif op.kind == 'down':
        h = adm_blocks.Downsample(op.out_ch, dtype=dt, name=op.name)(h)
      elif op.kind == 'up':
        h = layers.Upsample(op.out_ch, dtype=dt, name=op.name)(h)
      else:
        if op.kind == 'res':
          unit = adm_blocks.ResBlock(op.out_ch, spec.use_scale_shift_norm, op.resample,
                                     spec.dropout, name=op.name, **norm)
        else:
          unit = adm_blocks.AttentionBlock(op.out_ch, op.heads, spec.use_new_attention_order,
                                           name=op.name, **norm)
        h = gates.run(k, unit, run_unit, skip_unit, h, emb)
        k += 1
    h = nn.silu(layers.group_norm(spec.num_groups, spec.norm_eps, dt, 'norm_out')(h))
    h = nn.Conv(spec.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt,
                kernel_init=nn.initializers.zeros, name='conv_out')(h)
    return h.astype(jnp.float32)


def _build(model_config, dtype) -> ADM:
  return ADM(ADMSpec.from_config(model_config), dtype=dtype)


backbone.register(backbone.Family(
    'adm_unet', _build, "guided-diffusion's ADM UNet (Dhariwal & Nichol 2021), e.g. "
    '64x64_diffusion.pt', spec_from_config=ADMSpec.from_config,
    training_fields=ADMSpec.TRAINING_FIELDS))
