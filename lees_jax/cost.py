"""Compute accounting: FLOPs per gateable unit and the FLOP fraction a policy executes.

FLOPs are counted analytically from the model layout (`unet_layout`), per image,
with a multiply-add counted as 2 FLOPs (XLA's convention), for convolutions,
dense layers and the attention matmuls, plus a per-element charge for normalisation,
activations and residual adds (see `_ELEMENTWISE`). `xla_flops` gives XLA's own count
for a cross-check (tests compare both).

A skipped ResBlock that changes channels still runs its 1x1 projection, so every unit
has a *run* cost and a *skip* cost; the executed fraction of a policy is
sum over steps of (always-run + sum_k [run_k or skip_k]) / (steps * full cost).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax.models import unet as unet_lib

# Element-wise FLOPs per activation element: GroupNorm (~8: mean, variance,
# normalise, scale, shift) and swish (~4: sigmoid and product), residual add (1).
_GROUPNORM = 8
_SWISH = 4
_ELEMENTWISE = _GROUPNORM + _SWISH


def _conv(res_out: int, k: int, cin: int, cout: int, same_padding: bool = True) -> float:
  """A k x k convolution producing res_out x res_out outputs.

  With 'same' zero padding, taps that fall on the padding multiply zeros and are
  not counted (XLA does the same): per axis k * r - 2 * (k // 2) real taps.
  """
  taps = k * res_out - 2 * (k // 2) if same_padding else k * res_out
  return 2.0 * taps * taps * cin * cout + res_out * res_out * cout


def _dense(n: int, cin: int, cout: int) -> float:
  return 2.0 * n * cin * cout + n * cout


@dataclasses.dataclass(frozen=True)
class UnitCost:
  index: int
  name: str
  kind: str
  resolution: int
  in_ch: int
  out_ch: int
  run_flops: float   # FLOPs when the unit executes
  skip_flops: float  # FLOPs when it is skipped (its 1x1 shortcut, if any)


@dataclasses.dataclass(frozen=True)
class ModelCost:
  units: tuple[UnitCost, ...]
  always_flops: float  # stem, time embedding, resampling, output head: never skipped

  @property
  def total_flops(self) -> float:
    return self.always_flops + sum(u.run_flops for u in self.units)

  def shares(self) -> dict[str, float]:
    """Share of the full forward pass of each unit, plus 'always'; sums to 1."""
    total = self.total_flops
    out = {u.name: u.run_flops / total for u in self.units}
    out['always'] = self.always_flops / total
    return out

  def flops_for_mask(self, keep) -> float:
    keep = np.asarray(keep, bool)
    run = np.array([u.run_flops for u in self.units])
    skip = np.array([u.skip_flops for u in self.units])
    return float(self.always_flops + np.where(keep, run, skip).sum())

  def flop_fraction(self, masks: np.ndarray) -> float:
    """Executed FLOPs of a (steps, K) mask matrix relative to the full model."""
    masks = np.asarray(masks, bool)
    if masks.ndim != 2 or masks.shape[1] != len(self.units):
      raise ValueError(f'masks must be (steps, {len(self.units)}), got {masks.shape}')
    return float(np.mean([self.flops_for_mask(m) for m in masks]) / self.total_flops)


def _res_cost(op: unet_lib.Op, temb_dim: int) -> tuple[float, float]:
  n = op.resolution * op.resolution
  shortcut = _conv(op.resolution, 1, op.in_ch, op.out_ch) if op.in_ch != op.out_ch else 0.0
  run = (_ELEMENTWISE * n * op.in_ch + _conv(op.resolution, 3, op.in_ch, op.out_ch)
         + _SWISH * temb_dim + _dense(1, temb_dim, op.out_ch) + n * op.out_ch
         + _ELEMENTWISE * n * op.out_ch + _conv(op.resolution, 3, op.out_ch, op.out_ch)
         + shortcut + n * op.out_ch)
  return run, shortcut


def _attn_cost(op: unet_lib.Op) -> float:
  n, c = op.resolution * op.resolution, op.out_ch
  projections = 4 * _dense(n, c, c)
  scores = 2.0 * n * n * c * 2  # q k^T and weights @ v
  softmax = 5.0 * n * n
  return _GROUPNORM * n * c + projections + scores + softmax + n * c


def model_cost(spec: unet_lib.UNetSpec) -> ModelCost:
  """Analytic per-image FLOPs of every unit and of the always-run remainder."""
  temb_dim = 4 * spec.ch
  r = spec.resolution
  always = (_dense(1, spec.ch, temb_dim) + _SWISH * temb_dim + _dense(1, temb_dim, temb_dim)
            + _conv(r, 3, spec.in_channels, spec.ch)
            + _ELEMENTWISE * r * r * spec.ch + _conv(r, 3, spec.ch, spec.out_channels))
  units = []
  for op in unet_lib.unet_layout(spec):
    if op.kind == 'down':
      # Padded explicitly with jnp.pad (bottom/right), then a VALID strided conv.
      always += _conv(op.resolution // 2, 3, op.in_ch, op.out_ch, same_padding=False)
    elif op.kind == 'up':
      always += _conv(op.resolution * 2, 3, op.in_ch, op.out_ch)
    elif op.kind == 'res':
      run, skip = _res_cost(op, temb_dim)
      units.append(UnitCost(len(units), op.name, op.kind, op.resolution, op.in_ch, op.out_ch, run, skip))
    elif op.kind == 'attn':
      units.append(UnitCost(len(units), op.name, op.kind, op.resolution, op.in_ch, op.out_ch,
                            _attn_cost(op), 0.0))
  return ModelCost(tuple(units), always)


def xla_flops(model: unet_lib.UNet, params, keep=None, batch_size: int = 1) -> float:
  """XLA's FLOP count of one forward pass per image (optionally under a static mask)."""
  from lees_jax import gates as gating  # local import: gates imports nothing from here

  spec = model.spec
  x = jnp.zeros((batch_size, spec.resolution, spec.resolution, spec.in_channels), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  fn = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, gates=mask))
  analysis = fn.lower(params, x, t).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device
    analysis = analysis[0]
  return float(analysis['flops']) / batch_size


def describe(config, workdir: str) -> dict:
  """Prints the gateable units of ``config.model`` and writes ``workdir/blocks.json``."""
  import json
  import os

  from lees_jax import models

  model = models.build_model(config.model)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  params = models.count_params(shapes)
  mc = model_cost(model.spec)
  total = mc.total_flops
  rows = []
  print(f'{"idx":>3}  {"name":<16} {"kind":<5} {"res":>4} {"channels":>10} {"GFLOPs":>8} {"share":>7}')
  for u in mc.units:
    rows.append({'index': u.index, 'name': u.name, 'kind': u.kind, 'resolution': u.resolution,
                 'in_channels': u.in_ch, 'out_channels': u.out_ch, 'gflops': u.run_flops / 1e9,
                 'skip_gflops': u.skip_flops / 1e9, 'share': u.run_flops / total})
    print(f'{u.index:>3}  {u.name:<16} {u.kind:<5} {u.resolution:>4} {f"{u.in_ch}->{u.out_ch}":>10} '
          f'{u.run_flops / 1e9:>8.4f} {u.run_flops / total:>7.2%}')
  print(f'     {"always-run (stem, time embedding, resampling, head)":<44} '
        f'{mc.always_flops / 1e9:>8.4f} {mc.always_flops / total:>7.2%}')
  print(f'gateable units: {len(mc.units)}   parameters: {params:,}   '
        f'GFLOPs per image: {total / 1e9:.3f}')
  out = {'params': params, 'total_gflops': total / 1e9, 'always_gflops': mc.always_flops / 1e9,
         'units': rows}
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'blocks.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(out, f, indent=1)
  os.replace(path + '.tmp', path)
  print(f'wrote {path}')
  return out
