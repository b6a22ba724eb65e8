"""The DDPM CIFAR-10 UNet with gateable units.

The network is described once, as a *layout*: an ordered list of operations
(`unet_layout`). The Flax module executes the layout, and cost accounting and
the `describe` mode read the same layout, so the list of gateable units, their
order and their shapes can never disagree between the model and its reports.

Gateable units are every ResBlock and every attention block, in execution
order (down path, middle, up path). The published network has 28 of them
(22 ResBlocks + 6 attention blocks); the LEES paper speaks of "K=24", which
matches no partition of the real network, so we gate all 28 (see README).

How a unit is executed is chosen per call by the ``gates`` argument, a gate form of
`lees_jax.gates` (``None``: every unit runs); the UNet hands each unit's call and its skip to
the form and never inspects it. A skipped ResBlock returns its shortcut (the identity, or its
1x1 projection where channels change), skipped attention its input; every skip tensor still
flows through the U, so shapes never change.

The analytic per-image FLOPs of the units (a multiply-add is 2 FLOPs, XLA's convention, plus a
per-element charge for normalisation, activations and residual adds) are part of the unit
description; tests compare them with XLA's cost analysis.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lees_jax import gates as gating
from lees_jax.models import backbone, layers

# Element-wise FLOPs per activation element: GroupNorm (~8: mean, variance, normalise, scale,
# shift) and swish (~4: sigmoid and product); a residual add is 1.
_GROUPNORM = 8
_SWISH = 4
_ELEMENTWISE = _GROUPNORM + _SWISH


@dataclasses.dataclass(frozen=True)
class UNetSpec:
  """Architecture hyper-parameters (defaults: the published DDPM CIFAR-10 model)."""
  resolution: int = 32
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = (16,)
  dropout: float = 0.1
  num_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, 'ch_mult', tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, 'attn_resolutions', tuple(int(r) for r in self.attn_resolutions))
    problems = []
    if self.resolution % (2 ** (len(self.ch_mult) - 1)):
      problems.append(f'resolution {self.resolution} is not divisible by 2**{len(self.ch_mult) - 1} '
                      f'(one halving per level after the first)')
    for m in self.ch_mult:
      if (self.ch * m) % self.num_groups:
        problems.append(f'channels {self.ch}*{m} are not divisible by num_groups={self.num_groups}')
    if self.num_res_blocks < 1:
      problems.append('num_res_blocks must be >= 1')
    if self.ch % 2:
      problems.append(f'ch={self.ch} must be even (sinusoidal time embedding)')
    if problems:
      raise ValueError('invalid UNet architecture: ' + '; '.join(problems))

  @classmethod
  def from_config(cls, model_config) -> 'UNetSpec':
    """Builds the spec from a `config.model` ConfigDict (extra keys are ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in dict(model_config).items() if k in fields}
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class Op:
  """One step of the layout.

  kind: 'res' | 'attn' (gateable units), 'down' | 'up' (resampling), 'push' (save
  a skip tensor), 'pop' (concatenate the newest skip tensor onto the input).
  """
  kind: str
  name: str = ''
  in_ch: int = 0
  out_ch: int = 0
  resolution: int = 0

  @property
  def gateable(self) -> bool:
    return self.kind in ('res', 'attn')


def unet_layout(spec: UNetSpec) -> list[Op]:
  """The ordered operations of the UNet between `conv_in` and the output head."""
  ops: list[Op] = [Op('push')]
  res, ch = spec.resolution, spec.ch
  skip_chs = [ch]
  levels = len(spec.ch_mult)
  for level, mult in enumerate(spec.ch_mult):
    out = spec.ch * mult
    for i in range(spec.num_res_blocks):
      ops.append(Op('res', f'down_{level}_res_{i}', ch, out, res))
      ch = out
      if res in spec.attn_resolutions:
        ops.append(Op('attn', f'down_{level}_attn_{i}', ch, ch, res))
      ops.append(Op('push'))
      skip_chs.append(ch)
    if level != levels - 1:
      ops.append(Op('down', f'down_{level}_downsample', ch, ch, res))
      res //= 2
      ops.append(Op('push'))
      skip_chs.append(ch)
  ops.append(Op('res', 'mid_res_0', ch, ch, res))
  ops.append(Op('attn', 'mid_attn', ch, ch, res))
  ops.append(Op('res', 'mid_res_1', ch, ch, res))
  for level in reversed(range(levels)):
    out = spec.ch * spec.ch_mult[level]
    for i in range(spec.num_res_blocks + 1):
      ops.append(Op('pop'))
      ops.append(Op('res', f'up_{level}_res_{i}', ch + skip_chs.pop(), out, res))
      ch = out
      if res in spec.attn_resolutions:
        ops.append(Op('attn', f'up_{level}_attn_{i}', ch, ch, res))
    if level != 0:
      ops.append(Op('up', f'up_{level}_upsample', ch, ch, res))
      res *= 2
  assert not skip_chs, 'layout bug: unmatched skip tensors'
  return ops


def gateable_units(spec: UNetSpec) -> list[Op]:
  """The layout ops of the K gateable units in execution order; gate index k refers to this list."""
  return [op for op in unet_layout(spec) if op.gateable]


def _conv(res_out: int, k: int, cin: int, cout: int, same_padding: bool = True) -> float:
  """FLOPs of a k x k convolution producing res_out x res_out outputs.

  With 'same' zero padding, taps that fall on the padding multiply zeros and are
  not counted (XLA does the same): per axis k * r - 2 * (k // 2) real taps.
  """
  taps = k * res_out - 2 * (k // 2) if same_padding else k * res_out
  return 2.0 * taps * taps * cin * cout + res_out * res_out * cout


def _dense(n: int, cin: int, cout: int) -> float:
  return 2.0 * n * cin * cout + n * cout


def _res_cost(op: Op, temb_dim: int) -> tuple[float, float]:
  n = op.resolution * op.resolution
  shortcut = _conv(op.resolution, 1, op.in_ch, op.out_ch) if op.in_ch != op.out_ch else 0.0
  run = (_ELEMENTWISE * n * op.in_ch + _conv(op.resolution, 3, op.in_ch, op.out_ch)
         + _SWISH * temb_dim + _dense(1, temb_dim, op.out_ch) + n * op.out_ch
         + _ELEMENTWISE * n * op.out_ch + _conv(op.resolution, 3, op.out_ch, op.out_ch)
         + shortcut + n * op.out_ch)
  return run, shortcut


def _attn_cost(op: Op) -> float:
  n, c = op.resolution * op.resolution, op.out_ch
  projections = 4 * _dense(n, c, c)
  scores = 2.0 * n * n * c * 2  # q k^T and weights @ v
  softmax = 5.0 * n * n
  return _GROUPNORM * n * c + projections + scores + softmax + n * c


def _position(name: str) -> str:
  return {'down': 'encoder', 'mid': 'middle', 'up': 'decoder'}[name.split('_')[0]]


def unet_units(spec: UNetSpec) -> tuple[backbone.Unit, ...]:
  """The gateable units with their costs. ASE may drop the up path and the last middle unit
  (the D-n maximum on the UNet, see `lees_jax.ase`)."""
  temb_dim = 4 * spec.ch
  units, per_position = [], {}
  for op in gateable_units(spec):
    if op.kind == 'res':
      run, skip_flops = _res_cost(op, temb_dim)
    else:
      run, skip_flops = _attn_cost(op), 0.0
    position = _position(op.name)
    block = per_position.get(position, 0)
    per_position[position] = block + 1
    units.append(backbone.Unit(
        index=len(units), name=op.name, kind=op.kind, position=position, block=block,
        run_flops=run, skip_flops=skip_flops,
        skip='shortcut_projection' if op.kind == 'res' and op.in_ch != op.out_ch else 'identity',
        ase_droppable=position == 'decoder' or op.name == 'mid_res_1',
        resolution=op.resolution, in_ch=op.in_ch, out_ch=op.out_ch))
  return tuple(units)


def unet_always_flops(spec: UNetSpec) -> float:
  """Per-image FLOPs never skipped: time embedding, stem, resampling, output head."""
  temb_dim = 4 * spec.ch
  r = spec.resolution
  always = (_dense(1, spec.ch, temb_dim) + _SWISH * temb_dim + _dense(1, temb_dim, temb_dim)
            + _conv(r, 3, spec.in_channels, spec.ch)
            + _ELEMENTWISE * r * r * spec.ch + _conv(r, 3, spec.ch, spec.out_channels))
  for op in unet_layout(spec):
    if op.kind == 'down':
      # Padded explicitly with jnp.pad (bottom/right), then a VALID strided conv.
      always += _conv(op.resolution // 2, 3, op.in_ch, op.out_ch, same_padding=False)
    elif op.kind == 'up':
      always += _conv(op.resolution * 2, 3, op.in_ch, op.out_ch)
  return always


class UNet(nn.Module):
  """DDPM UNet predicting epsilon from (x_t in NHWC [-1, 1], integer t)."""
  spec: UNetSpec = UNetSpec()
  dtype: Any = jnp.float32

  # The backbone interface (lees_jax.models.backbone).
  @property
  def units(self) -> tuple[backbone.Unit, ...]:
    return unet_units(self.spec)

  @property
  def num_units(self) -> int:
    return len(gateable_units(self.spec))

  @property
  def always_flops(self) -> float:
    return unet_always_flops(self.spec)

  @property
  def skip_connections(self) -> tuple[backbone.SkipConnection, ...]:
    return backbone.skip_connections_of_layout(unet_layout(self.spec))

  @property
  def input(self) -> backbone.InputSpec:
    s = self.spec
    return backbone.InputSpec('pixels', (s.resolution, s.resolution, s.in_channels))

  conditioning = None  # unconditional
  output = 'eps'
  time_embedding = ('temb_dense_0', 'temb_dense_1')  # the timestep MLP's parameter subtrees

  @nn.compact
  def __call__(self, x, t, *, gates=None, train: bool = False):
    spec = self.spec
    if x.ndim != 4 or x.shape[1:] != (spec.resolution, spec.resolution, spec.in_channels):
      raise ValueError(f'expected x of shape (batch, {spec.resolution}, {spec.resolution}, '
                       f'{spec.in_channels}) in NHWC, got {x.shape}')
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    gates = gating.ALL_UNITS if gates is None else gates
    gates.check(self.num_units)
    run_unit = lambda mdl, x, e: mdl(x, e, train)  # noqa: E731
    skip_unit = lambda mdl, x, e: mdl.skip(x)  # noqa: E731

    temb = layers.timestep_embedding(t, spec.ch)
    temb = nn.Dense(4 * spec.ch, dtype=self.dtype, name='temb_dense_0')(temb)
    temb = nn.Dense(4 * spec.ch, dtype=self.dtype, name='temb_dense_1')(nn.swish(temb))

    h = nn.Conv(spec.ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_in')(x.astype(self.dtype))
    skips: list = []
    k = 0
    common = dict(num_groups=spec.num_groups, norm_eps=spec.norm_eps, dtype=self.dtype)
    for op in unet_layout(spec):
      if op.kind == 'push':
        skips.append(h)
      elif op.kind == 'pop':
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      elif op.kind == 'down':
        h = layers.Downsample(op.out_ch, dtype=self.dtype, name=op.name)(h)
      elif op.kind == 'up':
        h = layers.Upsample(op.out_ch, dtype=self.dtype, name=op.name)(h)
      elif op.kind == 'res':
        unit = layers.ResBlock(op.out_ch, dropout=spec.dropout, name=op.name, **common)
        h = gates.run(k, unit, run_unit, skip_unit, h, temb)
        k += 1
      elif op.kind == 'attn':
        unit = layers.AttnBlock(op.out_ch, name=op.name, **common)
        h = gates.run(k, unit, run_unit, skip_unit, h, temb)
        k += 1
    h = nn.swish(layers.group_norm(spec.num_groups, spec.norm_eps, self.dtype, 'norm_out')(h))
    h = nn.Conv(spec.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_out')(h)
    return h.astype(jnp.float32)


def _build(model_config, dtype) -> UNet:
  return UNet(UNetSpec.from_config(model_config), dtype=dtype)


backbone.register(backbone.Family(
    'ddpm_unet', _build, 'the DDPM UNet of Ho et al. (2020), e.g. google/ddpm-cifar10-32',
    spec_from_config=UNetSpec.from_config, training_fields=('dropout',)))
