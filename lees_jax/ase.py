"""ASE (Moon et al. 2024) drop schedules on our backbones, and the drop-length grid search.

An ASE schedule says, for each of 10 equal intervals of normalised time t (interval i
covers (i/10, (i+1)/10]), how many units are *dropped*; all units run near the data
(t -> 0) and more are dropped towards the noise (t -> 1).

Mapping to the DDPM UNet (ASE never defined one; this is ours):
  * Units are dropped from the **end of the network backwards**, as ASE does for DiT
    ("keep the first N blocks"). On the UNet this drops decoder (up-path) units first --
    the 15 up-path units come last -- which is also ASE's rule for U-ViT, whose long skip
    connections make encoder units essential. The maximum drop is capped at
    ``max_drop_fraction`` (default: the up-path plus the last middle unit, 16 of 28).
  * A dropped ResBlock keeps its 1x1 shortcut projection (the UNet's "linear layer on the
    long skip", as ASE keeps for U-ViT); dropped attention is the identity.
  * Table 5's D-n rows are stored as *drop fractions* of a 28-block DiT so that they transfer
    to any depth: dropped_i = round(fraction_i * num_droppable).
  * ``ase_default`` (the LEES paper's B2, "default linear drop") is D3 -- the linear
    schedule and the released code's only one: 0, 0, 4, 4, 8, 8, 12, 12, 16, 16 of 28.
    On the 28-unit UNet it executes 71.4 % of the (step, unit) pairs (the LEES paper reports
    70 % for ASE-default).

The grid (B3) -- "exhaustive search over drop lengths" -- is, as documented in `drop_grid`,
the family of piecewise-constant ramps that keep everything up to a start interval and
then drop linearly more, in pairs of intervals as Table 5's D2 and D3 rows do (D4 and D7 are
not paired).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Callable, Sequence

import numpy as np

from lees_jax import files
from lees_jax import policies

NUM_INTERVALS = 10

# Table 5 of the ASE paper: blocks kept per interval for a 28-block DiT, [0, 0.1] first.
DIT_KEPT = {
    'D2': (28, 28, 25, 25, 22, 22, 19, 19, 16, 16),
    'D3': (28, 28, 24, 24, 20, 20, 16, 16, 12, 12),
    'D4': (28, 28, 26, 24, 20, 18, 12, 10, 8, 8),
    'D7': (28, 28, 24, 21, 18, 15, 10, 10, 8, 8),
}
DIT_BLOCKS = 28
# Drop fractions of each D-n row: what transfers to other depths.
D_FRACTIONS = {name: tuple((DIT_BLOCKS - k) / DIT_BLOCKS for k in kept)
               for name, kept in DIT_KEPT.items()}
DEFAULT_SCHEDULE = 'D3'
# Table 5's U-ViT rows: decoder (out-)blocks kept of U-ViT-S's 6 per interval, [0, 0.1] first.
# A dropped out-block keeps its skip_linear (the backbone's skip). ASE's U-ViT code is not
# released; as for DiT, the blocks are dropped from the last one backwards (the first N
# decoder blocks are kept).
UVIT_KEPT = {
    'D1-U-ViT': (6, 6, 4, 4, 2, 2, 2, 2, 1, 1),
    'D2-U-ViT': (5, 5, 4, 4, 2, 2, 1, 1, 1, 1),
    'D3-U-ViT': (3, 3, 2, 2, 2, 2, 1, 1, 1, 1),
    'D6-U-ViT': (2, 2, 2, 2, 1, 1, 1, 1, 1, 1),
}
UVIT_DECODER_BLOCKS = 6


def drop_order(num_units: int) -> list[int]:
  """Units in the order they are dropped: from the last unit of the network backwards."""
  return list(reversed(range(num_units)))


def schedule_matrix(drop_fractions: Sequence[float], num_units: int,
                    max_drop_fraction: float | None = None) -> np.ndarray:
  """(num_units, 10) keep matrix for per-interval drop fractions (monotone check included)."""
  fr = np.asarray(drop_fractions, np.float64)
  if fr.shape != (NUM_INTERVALS,):
    raise ValueError(f'an ASE schedule has {NUM_INTERVALS} drop fractions, got {fr.shape}')
  if (fr < 0).any() or (fr > 1).any():
    raise ValueError(f'drop fractions must be in [0, 1], got {fr.tolist()}')
  if (np.diff(fr) < 0).any():
    raise ValueError(f'ASE schedules drop more towards the noise: fractions must be '
                     f'non-decreasing in t, got {fr.tolist()}')
  dropped = np.floor(fr * num_units + 0.5).astype(int)  # round half up: 16/28 * 28 = 16 exactly
  if max_drop_fraction is not None:
    dropped = np.minimum(dropped, int(np.floor(max_drop_fraction * num_units + 0.5)))
  order = drop_order(num_units)
  keep = np.ones((num_units, NUM_INTERVALS), bool)
  for i, n in enumerate(dropped):
    keep[order[:n], i] = False
  return keep


def max_drop_fraction_for(units) -> float:
  """Default cap: the backbone's ASE-droppable units (on the UNet: every up-path unit plus the
  last middle unit, the D-n maximum; on DiT: every block)."""
  return min(1.0, sum(u.ase_droppable for u in units) / len(units))


def decoder_schedule_matrix(kept: Sequence[int], units,
                            num_blocks: int = UVIT_DECODER_BLOCKS) -> np.ndarray:
  """(num_units, 10) keep matrix running, in interval i, the first ``kept[i]`` of the
  ``num_blocks`` ASE-droppable units (U-ViT's decoder blocks) and every other unit. A decoder
  of another size keeps round(kept[i] / num_blocks * its size) of its blocks."""
  kept = np.asarray(kept, int)
  if kept.shape != (NUM_INTERVALS,) or (kept < 0).any() or (kept > num_blocks).any():
    raise ValueError(f'a decoder schedule keeps 0..{num_blocks} blocks in each of '
                     f'{NUM_INTERVALS} intervals, got {kept.tolist()}')
  if (np.diff(kept) > 0).any():
    raise ValueError(f'ASE schedules keep fewer blocks towards the noise, got {kept.tolist()}')
  droppable = [u.index for u in units if u.ase_droppable]
  if not droppable:
    raise ValueError('a decoder schedule needs ASE-droppable (decoder) units; this backbone has '
                     'none')
  n = len(droppable)
  keep = np.ones((len(units), NUM_INTERVALS), bool)
  for i, k in enumerate(np.floor(kept * n / num_blocks + 0.5).astype(int)):
    keep[droppable[k:], i] = False
  return keep


def named_schedule(name: str, units, max_drop_fraction: float | None = None) -> policies.SchedulePolicy:
  """'ase_default', a Table 5 DiT row ('D2', 'D3', 'D4', 'D7', rescaled to ``units``) or a U-ViT
  row ('D1-U-ViT', 'D2-U-ViT', 'D3-U-ViT', 'D6-U-ViT': decoder blocks kept, `UVIT_KEPT`) as a
  policy for ``units``."""
  if name in UVIT_KEPT:
    if max_drop_fraction is not None:
      raise ValueError(f'{name} keeps decoder blocks by count; max_drop_fraction does not apply')
    return policies.SchedulePolicy(decoder_schedule_matrix(UVIT_KEPT[name], units), name=name)
  key = DEFAULT_SCHEDULE if name == 'ase_default' else name
  if key not in D_FRACTIONS:
    raise ValueError(f'unknown ASE schedule {name!r}; choose ase_default or one of '
                     f'{sorted(D_FRACTIONS) + sorted(UVIT_KEPT)}')
  cap = max_drop_fraction_for(units) if max_drop_fraction is None else max_drop_fraction
  return policies.SchedulePolicy(schedule_matrix(D_FRACTIONS[key], len(units), cap), name=name)


def table5_as_run(units, model_cost, timesteps, num_timesteps: int,
                  uvit_rows: Sequence[str] = ()) -> list[dict]:
  """Each Table 5 row as this backbone runs it: kept units per interval (the paper's DiT row
  rescaled, then capped by `max_drop_fraction_for`), executed-block ratio and FLOP fraction on
  the sampler's ``timesteps`` (integer or a continuous sampler's real-valued ones), and where the
  cap cut the row. ``uvit_rows`` adds those U-ViT rows (`UVIT_KEPT`: decoder blocks kept, no cap).

  On the DDPM UNet the cap (16 of 28 droppable) cuts D4 and D7, whose last intervals keep 8 of
  28 DiT blocks: they run with 12 kept units there, so they are lighter drops than the paper's.
  ``table5_kept`` is the row as Table 5 prints it, of ``table5_of`` blocks.
  """
  n = len(units)
  rows = []

  def row(name, policy, table5, table5_of, uncapped):
    kept = policy.matrix.sum(axis=0)
    masks = policy.step_masks(timesteps, num_timesteps, n)
    return {'name': name, 'table5_kept': list(table5), 'table5_of': table5_of,
            'kept_uncapped': uncapped.astype(int).tolist(), 'kept': kept.astype(int).tolist(),
            'cut_by_cap': bool((kept != uncapped).any()), 'num_units': n,
            'executed_block_ratio': policies.executed_block_ratio(masks),
            'flop_fraction': model_cost.flop_fraction(masks)}

  for name in sorted(D_FRACTIONS):
    r = row(name, named_schedule(name, units), DIT_KEPT[name], f'{DIT_BLOCKS} DiT blocks',
            schedule_matrix(D_FRACTIONS[name], n).sum(axis=0))
    rows.append(dict(r, table5_kept_of_28=r['table5_kept']))  # the name earlier files used
  for name in uvit_rows:
    if name not in UVIT_KEPT:
      raise ValueError(f'unknown U-ViT row {name!r}; Table 5 has {sorted(UVIT_KEPT)}')
    policy = named_schedule(name, units)
    rows.append(row(name, policy, UVIT_KEPT[name],
                    f'{UVIT_DECODER_BLOCKS} U-ViT-S decoder blocks', policy.matrix.sum(axis=0)))
  return rows


# ---------------------------------------------------------------------------
# The drop-length grid (B3).
# ---------------------------------------------------------------------------

GRID_STARTS = (0, 2, 4, 6)                       # first interval pair that drops anything
GRID_FINAL = (1 / 7, 2 / 7, 3 / 7, 4 / 7)  # drop fraction of the last pair (4 of 28 per step, as Table 5)


def ramp(start: int, final: float) -> tuple[float, ...]:
  """Drop nothing before interval ``start``; then rise linearly, in pairs of intervals,
  to ``final`` at the last pair (D3 is ramp(2, 4/7))."""
  if start % 2 or not 0 <= start < NUM_INTERVALS:
    raise ValueError(f'start must be an even interval index in [0, {NUM_INTERVALS}), got {start}')
  pairs = (NUM_INTERVALS - start) // 2
  out = []
  for i in range(NUM_INTERVALS):
    if i < start:
      out.append(0.0)
    else:
      out.append(final * ((i - start) // 2 + 1) / pairs)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class GridPoint:
  start: int
  final: float

  @property
  def name(self) -> str:
    return f'ase_s{self.start}_f{self.final:.2f}'

  @property
  def drop_fractions(self) -> tuple[float, ...]:
    return ramp(self.start, self.final)


def drop_grid(starts: Sequence[int] = GRID_STARTS,
              finals: Sequence[float] = GRID_FINAL) -> list[GridPoint]:
  """Every (start, final) ramp: len(starts) * len(finals) schedules, in this order."""
  return [GridPoint(int(s), float(f)) for s, f in itertools.product(starts, finals)]


def grid_policy(point: GridPoint, units, max_drop_fraction: float | None = None) -> policies.SchedulePolicy:
  cap = max_drop_fraction_for(units) if max_drop_fraction is None else max_drop_fraction
  return policies.SchedulePolicy(schedule_matrix(point.drop_fractions, len(units), cap), name=point.name)


def pareto_front(records: Sequence[dict], cost_key: str = 'flop_fraction',
                 quality_key: str = 'fid') -> list[dict]:
  """Records not dominated in (lower cost, lower FID), sorted by cost."""
  front = []
  for r in records:
    dominated = any(o[cost_key] <= r[cost_key] and o[quality_key] <= r[quality_key] and
                    (o[cost_key] < r[cost_key] or o[quality_key] < r[quality_key]) for o in records)
    if not dominated:
      front.append(r)
  return sorted(front, key=lambda r: r[cost_key])


def pick_for_budget(records: Sequence[dict], budget: float, cost_key: str = 'flop_fraction',
                    quality_key: str = 'fid') -> dict:
  """The best-FID record whose cost is within ``budget`` (clear error if none is)."""
  ok = [r for r in records if r[cost_key] <= budget + 1e-12]
  if not ok:
    cheapest = min(r[cost_key] for r in records)
    raise ValueError(f'no grid schedule fits a compute budget of {budget:.3f} (cheapest: {cheapest:.3f}); '
                     'raise the budget or extend the grid with larger drop fractions')
  return min(ok, key=lambda r: (r[quality_key], r[cost_key]))


def run_grid(points: Sequence[GridPoint], evaluate_point: Callable[[GridPoint], dict],
             results_path: str, log: Callable[[str], None] = print) -> list[dict]:
  """Evaluates every grid point once; finished points are kept in ``results_path`` (JSON
  lines, appended durably per point; local or gs://, `lees_jax.files`) and skipped when the
  search is restarted."""
  done: dict[str, dict] = {}
  if files.exists(results_path):
    for line_no, line in enumerate(files.read_text(results_path).splitlines(), 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        # A run killed mid-write leaves at most one partial last line: re-evaluate it.
        log(f'ignoring an incomplete record at {results_path}:{line_no}')
        continue
      done[rec['name']] = rec
    # Rewrite only the complete records, so new ones never append to a partial line.
    files.write_text(results_path, ''.join(json.dumps(r) + '\n' for r in done.values()))
  out = []
  for n, p in enumerate(points, 1):
    if p.name in done:
      out.append(done[p.name])
      continue
    log(f'[grid {n}/{len(points)}] {p.name}: drop fractions {[round(x, 3) for x in p.drop_fractions]}')
    rec = dict(evaluate_point(p), name=p.name, start=p.start, final=p.final,
               drop_fractions=list(p.drop_fractions))
    files.append_line(results_path, json.dumps(rec))
    out.append(rec)
  return out


def resolve_schedule(spec: str, units, config=None) -> policies.SchedulePolicy:
  """``config.ase_ft.schedule`` -> the fixed schedule the backbone is fine-tuned under.

  Accepted specs:
    ase_default | D2 | D3 | D4 | D7   a Table 5 row mapped to the UNet (`ase.named_schedule`);
    D1-U-ViT | D2-U-ViT | ...         a Table 5 U-ViT row (decoder blocks kept, `UVIT_KEPT`);
    ase_s<start>_f<final>             a drop-length grid point by name (`GridPoint.name`,
                                      e.g. ase_s2_f0.57), from the default grid or the one in
                                      config.ase (grid_starts x grid_finals);
    <path/grid.jsonl>[@budget]        the best-FID schedule of an `ase_grid` run within a FLOP
                                      budget (default config.eval.ase_budget), as evaluate's
                                      ``ase_grid:`` policy picks it;
    <path.json>                       a schedule written as a policy dict ({"matrix": (K, n)
                                      0/1 rows, "name": ...}), e.g. another run's
                                      ase_schedule.json: custom schedules.
  """
  spec = str(spec).strip()
  named = ['ase_default', *sorted(D_FRACTIONS), *sorted(UVIT_KEPT)]
  if spec in named:
    return named_schedule(spec, units)
  grid = list(drop_grid())
  if config is not None and 'ase' in config:
    grid += drop_grid(config.ase.grid_starts, config.ase.grid_finals)
  points = {p.name: p for p in grid}
  if spec in points:
    return grid_policy(points[spec], units)
  path, _, budget = spec.partition('@')
  if path.endswith('.jsonl') or path.endswith('.json'):
    if not files.isfile(path):
      raise FileNotFoundError(f'config.ase_ft.schedule={spec!r}: no file at {path!r}')
    if path.endswith('.jsonl'):
      records = files.read_json_lines(path)
      default_budget = config.eval.ase_budget if config is not None and 'eval' in config else 0.75
      best = pick_for_budget(records, float(budget) if budget else float(default_budget))
      return grid_policy(GridPoint(int(best['start']), float(best['final'])), units)
    d = files.read_json(path)
    if 'matrix' not in d:
      raise ValueError(f'config.ase_ft.schedule={spec!r}: {path} has no "matrix" (a (units, '
                       'intervals) 0/1 keep matrix)')
    policy = policies.SchedulePolicy(np.asarray(d['matrix'], bool),
                                   name=d.get('name', os.path.splitext(os.path.basename(path))[0]))
    if policy.matrix.shape[0] != len(units):
      raise ValueError(f'config.ase_ft.schedule={spec!r}: the matrix has {policy.matrix.shape[0]} '
                       f'rows but the model has {len(units)} gateable units')
    return policy
  raise ValueError(
      f'unknown ASE schedule config.ase_ft.schedule={spec!r}; use one of {named}, a grid point '
      f'name ({", ".join(sorted(points))}), <grid.jsonl>[@budget] from an ase_grid run, or a '
      '.json file holding a schedule matrix')
