"""The DDPM CIFAR-10 UNet with gateable units.

The network is described once, as a *layout*: an ordered list of operations
(`unet_layout`). The Flax module executes the layout, and cost accounting and
the `describe` mode read the same layout, so the list of gateable units, their
order and their shapes can never disagree between the model and its reports.

Gateable units are every ResBlock and every attention block, in execution
order (down path, middle, up path). The published network has 28 of them
(22 ResBlocks + 6 attention blocks); the LEES paper speaks of "K=24", which
matches no partition of the real network, so we gate all 28 (see README).

How a unit is executed is chosen per call by the ``gates`` argument
(see `lees_jax.gates`):

* ``None`` -- every unit runs;
* `gates.StaticMask` -- a tuple of Python bools baked into the traced
  program: a skipped unit is never traced;
* `gates.CondMask` -- a traced boolean vector; each unit sits behind
  ``lax.cond`` (one compilation for every mask);
* `gates.TrainingGates` -- gate logits per sample; hard gates with a
  straight-through gradient, or soft gates that blend the unit with its skip.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lees_jax import gates as gating
from lees_jax.models import layers


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
  """The K gateable units in execution order; gate index k refers to this list."""
  return [op for op in unet_layout(spec) if op.gateable]


def _blend(skip, full, weight):
  """skip + w * (full - skip), with w a scalar or one weight per sample."""
  weight = jnp.asarray(weight, full.dtype)
  if weight.ndim == 1:
    weight = weight[:, None, None, None]
  return skip + weight * (full - skip)


class UNet(nn.Module):
  """DDPM UNet predicting epsilon from (x_t in NHWC [-1, 1], integer t)."""
  spec: UNetSpec = UNetSpec()
  dtype: Any = jnp.float32

  @property
  def units(self) -> list[Op]:
    return gateable_units(self.spec)

  @property
  def num_units(self) -> int:
    return len(self.units)

  def _run_unit(self, k: int, unit: nn.Module, h, temb, gates, train: bool):
    if gates is None:
      return unit(h, temb, train)
    if isinstance(gates, gating.StaticMask):
      return unit(h, temb, train) if gates.keep[k] else unit.skip(h)
    if isinstance(gates, gating.CondMask):
      return nn.cond(gates.keep[k],
                     lambda mdl, x, e: mdl(x, e, train),
                     lambda mdl, x, e: mdl.skip(x),
                     unit, h, temb)
    if isinstance(gates, gating.TrainingGates):
      # Training needs d(out)/d(gate) = unit(h) - skip(h), so both are computed
      # here; real skipping is for sampling (StaticMask / CondMask).
      full = unit(h, temb, train)
      skip = unit.skip(h)
      return _blend(skip, full, gates.weights()[..., k])
    raise TypeError(f'unsupported gates argument of type {type(gates).__name__}; expected None, '
                    'gates.StaticMask, gates.CondMask or gates.TrainingGates')

  @nn.compact
  def __call__(self, x, t, *, gates=None, train: bool = False):
    spec = self.spec
    if x.ndim != 4 or x.shape[1:] != (spec.resolution, spec.resolution, spec.in_channels):
      raise ValueError(f'expected x of shape (batch, {spec.resolution}, {spec.resolution}, '
                       f'{spec.in_channels}) in NHWC, got {x.shape}')
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if gates is not None:
      gates.check(self.num_units)

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
        h = self._run_unit(k, unit, h, temb, gates, train)
        k += 1
      elif op.kind == 'attn':
        unit = layers.AttnBlock(op.out_ch, name=op.name, **common)
        h = self._run_unit(k, unit, h, temb, gates, train)
        k += 1
    h = nn.swish(layers.group_norm(spec.num_groups, spec.norm_eps, self.dtype, 'norm_out')(h))
    h = nn.Conv(spec.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_out')(h)
    return h.astype(jnp.float32)


def init_params(model: UNet, rng: jax.Array, batch_size: int = 1):
  """Initialises parameters with all units executed (every parameter exists)."""
  spec = model.spec
  x = jnp.zeros((batch_size, spec.resolution, spec.resolution, spec.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  return model.init({'params': rng}, x, t)['params']


def count_params(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))


def units_in(spec: UNetSpec, names: Sequence[str]) -> list[int]:
  """Indices of the named units (clear error for unknown names)."""
  index = {op.name: k for k, op in enumerate(gateable_units(spec))}
  missing = [n for n in names if n not in index]
  if missing:
    raise KeyError(f'unknown unit names {missing}; known units: {sorted(index)}')
  return [index[n] for n in names]
