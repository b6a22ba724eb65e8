"""ASE schedules against Table 5 of the ASE paper, the documented grid, and resumption."""

import json

import numpy as np
import pytest

from lees_jax import ase, policies
from lees_jax.models import unet

UNITS = unet.UNet(unet.UNetSpec()).units


# ASE paper (Moon et al. 2024), Appendix A, Table 5: blocks used per interval of t, [0, 0.1]
# first, copied from the paper's text (/work/shared/papers/ase.txt), not from lees_jax.
TABLE5_DIT = {
    'D2': (28, 28, 25, 25, 22, 22, 19, 19, 16, 16),
    'D3': (28, 28, 24, 24, 20, 20, 16, 16, 12, 12),
    'D4': (28, 28, 26, 24, 20, 18, 12, 10, 8, 8),
    'D7': (28, 28, 24, 21, 18, 15, 10, 10, 8, 8),
}
# Units dropped per interval on the 28-unit DDPM UNet, by hand: round(fraction * 28) =
# 28 - Table 5's count, capped at 16 (the 15 up-path units + mid_res_1).
UNET_DROPPED = {
    'D2': (0, 0, 3, 3, 6, 6, 9, 9, 12, 12),
    'D3': (0, 0, 4, 4, 8, 8, 12, 12, 16, 16),
    'D4': (0, 0, 2, 4, 8, 10, 16, 16, 16, 16),     # Table 5: 20 dropped at the end, capped
    'D7': (0, 0, 4, 7, 10, 13, 16, 16, 16, 16),    # Table 5: 18, 18, 20, 20, capped
}


@pytest.mark.parametrize('name', sorted(TABLE5_DIT))
def test_schedules_are_table5_rows(name):
  assert ase.DIT_KEPT[name] == TABLE5_DIT[name]
  np.testing.assert_allclose(np.asarray(ase.D_FRACTIONS[name]) * 28,
                             28 - np.asarray(TABLE5_DIT[name]), atol=1e-9)
  keep = ase.schedule_matrix(ase.D_FRACTIONS[name], 28)
  assert tuple(keep.sum(axis=0)) == TABLE5_DIT[name]
  # DiT keeps the first N blocks.
  for i, n in enumerate(TABLE5_DIT[name]):
    assert keep[:n, i].all() and not keep[n:, i].any()


def test_table5_d4_and_d7_are_not_paired():
  """Only D2 and D3 drop in pairs of equal intervals; D4 and D7 change within pairs."""
  for name, kept in TABLE5_DIT.items():
    paired = kept[0::2] == kept[1::2]
    assert paired == (name in ('D2', 'D3')), name


@pytest.mark.parametrize('name', sorted(UNET_DROPPED))
def test_unet_drop_counts_per_interval(name):
  pol = ase.named_schedule(name, UNITS)
  dropped = (~pol.matrix).sum(axis=0)
  assert tuple(dropped) == UNET_DROPPED[name]
  # The dropped units are the last ones of the network, in execution order.
  names = [u.name for u in UNITS]
  for i, n in enumerate(UNET_DROPPED[name]):
    assert [names[k] for k in np.flatnonzero(~pol.matrix[:, i])] == names[28 - n:]
  last16 = names[12:]
  assert last16[0] == 'mid_res_1' and all(n.startswith('up_') for n in last16[1:])


@pytest.mark.parametrize('name', ['ase_default', 'D2', 'D3', 'D4', 'D7'])
def test_unet_schedules_are_monotone_and_keep_everything_near_data(name):
  pol = ase.named_schedule(name, UNITS)
  m = pol.matrix
  assert m.shape == (28, 10)
  assert m[:, 0].all()                                  # all units near t = 0
  assert (np.diff(m.astype(int), axis=1) <= 0).all()    # once dropped, stays dropped towards noise
  # Only up-path units and the last middle unit are ever dropped.
  dropped = {UNITS[k].name for k in np.flatnonzero(~m.all(axis=1))}
  assert all(n.startswith('up_') or n == 'mid_res_1' for n in dropped)


def test_ase_default_is_d3_with_paper_block_ratio():
  pol = ase.named_schedule('ase_default', UNITS)
  np.testing.assert_array_equal(pol.matrix, ase.named_schedule('D3', UNITS).matrix)
  # 50 DDPM steps (improved-diffusion's "50": round(i * 999 / 49)) put exactly 5 steps in each
  # interval of t = (s + 1) / 1000, so the executed-block ratio is
  # 1 - mean(0,0,4,4,8,8,12,12,16,16)/28 = 1 - 80/280 = 71.4 %.
  ts = [round(i * 999 / 49) for i in range(50)]
  ratio = policies.executed_block_ratio(pol.step_masks(ts, 1000, 28))
  assert ratio == pytest.approx(1 - 80 / 280, abs=1e-12)


def test_ramp_and_grid_are_what_the_docs_say():
  np.testing.assert_allclose(ase.ramp(2, 4 / 7), ase.D_FRACTIONS['D3'])
  grid = ase.drop_grid()
  assert len(grid) == len(ase.GRID_STARTS) * len(ase.GRID_FINAL) == 16
  assert len({p.name for p in grid}) == len(grid)
  for p in grid:
    fr = np.array(p.drop_fractions)
    assert (fr[:p.start] == 0).all() and fr[p.start] > 0
    assert fr[-1] == pytest.approx(p.final)
    assert (fr[0::2] == fr[1::2]).all()  # pairs of intervals share a count
    assert (np.diff(fr) >= 0).all()
  with pytest.raises(ValueError, match='non-decreasing'):
    ase.schedule_matrix([0.5] + [0.0] * 9, 28)


def test_pareto_and_budget():
  recs = [{'name': 'a', 'flop_fraction': 0.9, 'fid': 3.0}, {'name': 'b', 'flop_fraction': 0.7, 'fid': 3.5},
          {'name': 'c', 'flop_fraction': 0.8, 'fid': 3.6}, {'name': 'd', 'flop_fraction': 0.6, 'fid': 5.0}]
  assert [r['name'] for r in ase.pareto_front(recs)] == ['d', 'b', 'a']
  assert ase.pick_for_budget(recs, 0.85)['name'] == 'b'
  with pytest.raises(ValueError, match='budget'):
    ase.pick_for_budget(recs, 0.5)


def test_killed_grid_search_resumes_without_reevaluating(tmp_path):
  points = ase.drop_grid()[:6]
  fake_fid = {p.name: 3 + p.final * 5 - p.start * 0.1 for p in points}
  calls = []

  class Killed(Exception):
    pass

  def evaluate(p, die_after=None):
    if die_after is not None and len(calls) == die_after:
      raise Killed()
    calls.append(p.name)
    return {'fid': fake_fid[p.name], 'flop_fraction': 1 - p.final / 2}

  path = str(tmp_path / 'grid.jsonl')
  with pytest.raises(Killed):
    ase.run_grid(points, lambda p: evaluate(p, die_after=3), path, log=lambda s: None)
  with open(path, 'a') as f:
    f.write('{"name": "partial')  # a write cut off by the kill
  first = list(calls)
  recs = ase.run_grid(points, evaluate, path, log=lambda s: None)
  assert calls[:3] == first and len(calls) == 6  # the 3 finished points were not redone
  uninterrupted = ase.run_grid(points, evaluate, str(tmp_path / 'other.jsonl'), log=lambda s: None)
  assert [r['name'] for r in ase.pareto_front(recs)] == [r['name'] for r in ase.pareto_front(uninterrupted)]
  with open(path) as f:
    assert [json.loads(line)['name'] for line in f] == [p.name for p in points]


def test_table5_as_run_on_the_unet_reports_the_cut_and_its_cost():
  from lees_jax import cost
  timesteps = list(range(999, -1, -20))[::-1]  # any grid; 50 steps
  rows = {r['name']: r for r in ase.table5_as_run(UNITS, cost.model_cost(unet.UNet(unet.UNetSpec())),
                                                   timesteps, 1000)}
  assert sorted(rows) == ['D2', 'D3', 'D4', 'D7']
  for name, dropped in UNET_DROPPED.items():
    r = rows[name]
    assert r['table5_kept_of_28'] == list(TABLE5_DIT[name])
    assert r['kept'] == [28 - d for d in dropped]
    assert r['kept_uncapped'] == list(TABLE5_DIT[name])  # 28 units: the row itself
    # The up-path cap cuts exactly the rows that drop more than 16 somewhere.
    assert r['cut_by_cap'] == (min(TABLE5_DIT[name]) < 12)
    masks = ase.named_schedule(name, UNITS).step_masks(timesteps, 1000, 28)
    assert r['executed_block_ratio'] == masks.mean()
    assert 0 < r['flop_fraction'] < 1
  assert not rows['D3']['cut_by_cap'] and rows['D4']['cut_by_cap'] and rows['D7']['cut_by_cap']
  assert rows['D4']['kept'][-2:] == [12, 12]  # Table 5 keeps 8 of 28 there
