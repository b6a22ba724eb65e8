"""Compute accounting: the FLOP fraction a policy executes, XLA's count, and ``describe``.

Each backbone declares its units' per-image FLOPs when run and when skipped (a skipped
ResBlock that changes channels still runs its 1x1 projection) and the FLOPs no gate can skip
(`lees_jax.models.backbone`). The executed fraction of a policy is
sum over steps of (always-run + sum_k [run_k or skip_k]) / (steps * full cost).
A unit that *reuses* its cached output (`lees_jax.reuse`) costs 0 FLOPs at that step: nothing of
it is computed; one that reuses its cached *residual* costs its skip FLOPs, the skip it adds the
residual to (`flop_fraction_of_actions`).
`xla_flops` gives XLA's own count for a cross-check (tests compare both).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lees_jax import gates as gating
from lees_jax.models import backbone


@dataclasses.dataclass(frozen=True)
class ModelCost:
  units: tuple[backbone.Unit, ...]
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

  def savings(self) -> np.ndarray:
    """(K,) FLOPs saved by skipping each unit (run - skip): the weights of LEES's FLOP-weighted
    compute term."""
    return np.array([u.run_flops - u.skip_flops for u in self.units], np.float64)

  def flops_for_mask(self, keep) -> float:
    keep = np.asarray(keep, bool)
    run = np.array([u.run_flops for u in self.units])
    skip = np.array([u.skip_flops for u in self.units])
    return float(self.always_flops + np.where(keep, run, skip).sum())

  def flop_fraction(self, masks: np.ndarray) -> float:
    """Executed FLOPs of a (steps, K) mask matrix relative to the full model."""
    return self.flop_fraction_of_actions(np.asarray(masks, bool).astype(np.int8))

  def flops_for_actions(self, actions) -> float:
    """FLOPs of one forward pass under actions (K,) (`lees_jax.gates.ACTIONS` codes): a run
    unit costs its run FLOPs, a skipped one its skip FLOPs, a reused one nothing, a
    residual-reused one its skip FLOPs (the fresh skip; the addition is not counted)."""
    actions = np.asarray(actions)
    per_action = np.zeros((len(gating.ACTIONS), len(self.units)))  # reuse: 0
    per_action[gating.SKIP] = [u.skip_flops for u in self.units]
    per_action[gating.RUN] = [u.run_flops for u in self.units]
    per_action[gating.REUSE_RESIDUAL] = per_action[gating.SKIP]
    return float(self.always_flops + per_action[actions, np.arange(len(self.units))].sum())

  def flop_fraction_of_actions(self, actions: np.ndarray) -> float:
    """Executed FLOPs of a (steps, K) action matrix relative to the full model."""
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != len(self.units):
      raise ValueError(f'masks must be (steps, {len(self.units)}), got {actions.shape}')
    return float(np.mean([self.flops_for_actions(a) for a in actions]) / self.total_flops)


def model_cost(model) -> ModelCost:
  """Per-image FLOPs of every unit of a backbone and of its always-run remainder."""
  return ModelCost(tuple(model.units), float(model.always_flops))


def xla_flops(model, params, keep=None, batch_size: int = 1) -> float:
  """XLA's FLOP count of one forward pass per image (optionally under a static mask)."""
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(model.input.shape), np.float32)
  t = jax.ShapeDtypeStruct((batch_size,), np.int32)
  # Class labels for a conditional backbone (their values do not change the count).
  y = None if model.conditioning is None else jax.ShapeDtypeStruct((batch_size,), np.int32)
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  fn = jax.jit(lambda p, x, t, y: backbone.call(model, p, x, t, y, gates=mask))
  analysis = fn.lower(params, x, t, y).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returns one dict per device
    analysis = analysis[0]
  return float(analysis['flops']) / batch_size


def describe(config, workdir: str) -> dict:
  """Prints the gateable units of ``config.model`` and writes ``workdir/blocks.json``."""
  from lees_jax import files, models

  model = models.build_model(config.model)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  params = models.count_params(shapes)
  mc = model_cost(model)
  total = mc.total_flops
  rows = []
  # Column widths from the contents: names and kinds differ per backbone (DiT: 'transformer').
  name_w = max(16, *(len(u.name) for u in mc.units))
  kind_w = max(5, *(len(u.kind) for u in mc.units))
  chan_w = max(10, *(len(f'{u.in_ch}->{u.out_ch}') for u in mc.units))
  print(f'{"idx":>3}  {"name":<{name_w}} {"kind":<{kind_w}} {"res":>4} {"channels":>{chan_w}} '
        f'{"GFLOPs":>8} {"share":>7}')
  for u in mc.units:
    rows.append({'index': u.index, 'name': u.name, 'kind': u.kind, 'position': u.position,
                 'skip': u.skip, 'ase_droppable': u.ase_droppable, 'resolution': u.resolution,
                 'in_channels': u.in_ch, 'out_channels': u.out_ch, 'gflops': u.run_flops / 1e9,
                 'skip_gflops': u.skip_flops / 1e9, 'share': u.run_flops / total})
    print(f'{u.index:>3}  {u.name:<{name_w}} {u.kind:<{kind_w}} {u.resolution:>4} '
          f'{f"{u.in_ch}->{u.out_ch}":>{chan_w}} {u.run_flops / 1e9:>8.4f} {u.run_flops / total:>7.2%}')
  label = 'always-run (what no gate skips: embeddings, resampling, head)'
  print(f'     {label:<{name_w + kind_w + chan_w + 7}} {mc.always_flops / 1e9:>8.4f} '
        f'{mc.always_flops / total:>7.2%}')
  print(f'gateable units: {len(mc.units)}   parameters: {params:,}   '
        f'GFLOPs per image: {total / 1e9:.3f}')
  out = {'params': params, 'total_gflops': total / 1e9, 'always_gflops': mc.always_flops / 1e9,
         'units': rows}
  # What the backbone trains and samples on (`lees_jax.processes`), when the config says (a
  # config of the network alone, e.g. a converted backbone's model section, does not).
  if 'diffusion' in config and 'sampler' in config:
    from lees_jax import processes  # pylint: disable=g-import-not-at-top
    process = processes.for_model(config.diffusion, model)
    sampler = process.solver(config.sampler).describe()
    print(f'diffusion: {process.describe()}\nsampler: {sampler}')
    out.update(diffusion=process.describe(), sampler=sampler)
  path = files.join(workdir, 'blocks.json')
  files.write_json(path, out)
  print(f'wrote {path}')
  return out
