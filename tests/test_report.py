"""Every number in report.md is what the cells' result files say, recomputed here independently.

The study's summary and report are built from files only, so this test fabricates those files
(three seeds of four policies with chosen numbers), runs `cells.summarize` and
`report.write_report`, parses the markdown tables and checks each figure against numpy / scipy
computed from the fabricated values -- no model, no sampling (fast).
"""

import json
import os
import re

import numpy as np
import pytest
from scipy import stats

from configs import cifar10
from lees_jax import cells
from lees_jax import report

SEEDS = (0, 1, 2)
UNITS = [f'u{k}' for k in range(4)]
TIMESTEPS = [0, 499, 999]
# label -> (cell prefix, group, kind, lam, per-seed fid, latency, block ratio, flop fraction, ΔFID)
POLICIES = {
    'B1 full': ('b1_full', 'baseline', 'full', None,
                [3.10, 3.02, 3.07], [312.0, 309.5, 314.25], [1.0] * 3, [1.0] * 3, [1.40, 1.62, 1.51]),
    'B2 ASE-default': ('b2_ase_default', 'baseline', 'ase', None,
                       [3.31, 3.22, 3.27], [219.0, 221.5, 216.0], [0.714] * 3, [0.66] * 3,
                       [1.91, 1.85, 1.97]),
    'LEES λ=0.05': ('lees_lam0.05', 'lees', 'lees', 0.05,
                    [3.05, 3.11, 3.04], [190.0, 188.0, 193.5], [0.61, 0.6, 0.59],
                    [0.55, 0.52, 0.5], [1.52, 1.58, 1.49]),
    'A2 λ=0': ('a2_lam0', 'ablation', 'lees', 0.0,
               [3.06, 3.09, 3.01], [250.0, 262.0, 255.0], [0.82, 0.8, 0.84], [0.78, 0.75, 0.8],
               [1.5, 1.55, 1.6]),
}
GATE_SECONDS = {'LEES λ=0.05': [60.0, 63.0, 66.0], 'A2 λ=0': [61.0, 62.0, 70.0]}
CONVERGED = {'LEES λ=0.05': [0.5, 0.25, 0.75], 'A2 λ=0': [0.4, 0.6, 0.5]}
EPOCH = {'step_seconds': 0.05, 'measured_steps': 10, 'batch_size': 128, 'first_step_seconds': 9.0,
         'device': 'cpu', 'num_devices': 1, 'train_examples': 50000, 'steps_per_epoch': 390.625,
         'epoch_seconds': 390.625 * 0.05, 'dataset': 'cifar10', 'method': 'fabricated'}


SCHEDULES = [{'name': 'D4', 'table5_kept_of_28': [28, 28, 26, 24, 20, 18, 12, 10, 8, 8],
              'kept_uncapped': [28, 28, 26, 24, 20, 18, 12, 10, 8, 8],
              'kept': [28, 28, 26, 24, 20, 18, 12, 12, 12, 12], 'cut_by_cap': True, 'num_units': 28,
              'executed_block_ratio': 0.7071, 'flop_fraction': 0.6543}]


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f)


def _fabricate(workdir):
  for label, (prefix, group, kind, lam, fid, lat, blocks, flops, dfid) in POLICIES.items():
    for i, seed in enumerate(SEEDS):
      cid = f'{prefix}_s{seed}'
      rec = dict(cell=cid, label=label, group=group, kind=kind, lam=lam, form='hard', seed=seed,
                 fid=fid[i], latency_ms_per_100=lat[i], images_per_s=100.0 / (lat[i] / 1e3),
                 block_ratio=blocks[i], flop_fraction=flops[i], delta_fid=dfid[i],
                 robustness={'per_corruption': {'fog': dfid[i] - 0.25, 'snow': dfid[i] + 0.25}},
                 unit_names=UNITS, num_timesteps=1000, timesteps=TIMESTEPS,
                 masks=np.ones((len(TIMESTEPS), len(UNITS)), int).tolist(),
                 num_samples=100, reference='cifar10/train', reference_count=500, sampler='ddpm',
                 sampler_description='ddpm, 3 steps, variance fixed_small',
                 sampler_variance='fixed_small',
                 steps=len(TIMESTEPS), device='cpu', num_devices=1, dtype='float32',
                 latency_batch=100, fid_method='sqrtm')
      if kind == 'lees':
        rec.update(gate_alpha=[1.0, -1.0, 2.0, -2.0], gate_beta=[0.1, 0.2, -0.5, 1.5],
                   gate_train_seconds=GATE_SECONDS[label][i], gate_train_steps=100,
                   converged_fraction=CONVERGED[label][i],
                   gate_convergence={'fractions': [0.5, 1.0], 'steps': [50, 100], 'kl': [0.2, 0.01],
                                     'stable': [0.75, 1.0]})
      _write(os.path.join(cells.cell_dir(workdir, cid), cells.RESULT_FILE), rec)
  _write(os.path.join(cells.experiment_dir(workdir), cells.OVERHEAD_FILE), EPOCH)
  _write(os.path.join(cells.experiment_dir(workdir), cells.ASE_SCHEDULES_FILE), SCHEDULES)


def _config():
  c = cifar10.get_config('tiny')
  c.experiment.update(lams=(0.05,), main_lam=0.05, seeds=SEEDS,
                      baselines=('full', 'ase_default'), ablations=('lam0',), robustness=True,
                      corruptions=('fog', 'snow'))
  return c


def _table(md: str, heading: str) -> dict[str, list[str]]:
  """The first markdown table after ``heading``: first column -> the row's cells."""
  rest = md[md.index(heading):]
  block = []
  for l in rest.split('\n')[1:]:
    if l.startswith('|'):
      block.append(l)
    elif block:
      break
  rows = {}
  for l in block[2:]:  # header, separator
    c = [x.strip() for x in l.strip('|').split('|')]
    rows.setdefault(c[0], []).append(c[1:])
  return rows


def _ms(values, digits, scale=1.0, pct=False):
  v = np.asarray(values, np.float64) * scale
  unit = ' %' if pct else ''
  return f'{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}{unit}'


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  w = str(tmp_path_factory.mktemp('study'))
  _fabricate(w)
  summary = cells.summarize(w, _config())
  with open(report.write_report(w)) as f:
    return summary, f.read()


def test_main_table_is_the_files_numbers(built):
  _, md = built
  rows = _table(md, '## Main results')
  assert set(rows) == {'B1 full', 'B2 ASE-default', 'LEES λ=0.05'}
  full_lat = np.mean(POLICIES['B1 full'][5])
  for label, cols in rows.items():
    (n, fid, _, lat, _, ips, blocks, _, flops, speed, _), = cols
    _, _, _, _, f, l, b, fl, _ = POLICIES[label]
    assert n == '3'
    assert fid == _ms(f, 3)
    assert lat == _ms(l, 1)
    assert ips == _ms([1e5 / x for x in l], 1)
    assert blocks == _ms(b, 1, 100, True)
    assert flops == _ms(fl, 1, 100, True)
    assert speed == f'{(1 - np.mean(l) / full_lat) * 100:.0f} %'


def test_ttests_are_scipys_on_the_paired_seeds(built):
  summary, md = built
  rows = _table(md, '### Paired t-tests')
  main = POLICIES['LEES λ=0.05']
  assert set(rows) == {'B1 full', 'B2 ASE-default', 'A2 λ=0'}
  pvalues = {}
  for label, cols in rows.items():
    other = POLICIES[label]
    by_metric = {c[0]: c for c in cols}
    for metric, idx in (('FID', 4), ('latency', 5)):
      a, b = np.asarray(main[idx]), np.asarray(other[idx])
      res = stats.ttest_rel(a, b)
      _, n, diff, t, p, _, _ = by_metric[metric]
      assert n == '3'
      assert diff == f'{np.mean(a - b):+.4g}'
      assert t == f'{res.statistic:.3f}'
      assert p == f'{res.pvalue:.3g}'
      pvalues[(label, metric)] = res.pvalue
  # Holm over the table's six comparisons, written out: the i-th smallest p times (6 - i),
  # made monotone, capped at 1.
  ranked = sorted(pvalues, key=pvalues.get)
  want, running = {}, 0.0
  for i, key in enumerate(ranked):
    running = max(running, min(1.0, (len(ranked) - i) * pvalues[key]))
    want[key] = running
  for (label, metric), adj in want.items():
    holm_cell = next(c for c in rows[label] if c[0] == metric)[5]
    assert holm_cell == f'{adj:.3g}', (label, metric)


def test_ablation_robustness_overhead_and_lambda_tables(built):
  _, md = built
  abl = _table(md, '## Ablations')
  assert set(abl) == {'LEES λ=0.05', 'A2 λ=0'}  # the main row for comparison, then A2
  assert abl['A2 λ=0'][0][1] == _ms(POLICIES['A2 λ=0'][4], 3)

  rob = _table(md, '## Robustness')
  for label, cols in rob.items():
    (n, dfid, _), = cols
    assert n == '3' and dfid == _ms(POLICIES[label][8], 3)
  per_c = _table(md, 'Per corruption')
  labels = list(rob)
  for corruption, shift in (('fog', -0.25), ('snow', 0.25)):
    (cols,) = per_c[corruption]
    for label, cell in zip(labels, cols):
      assert cell == _ms(np.asarray(POLICIES[label][8]) + shift, 2)

  over = _table(md, '## Training overhead')
  for label in GATE_SECONDS:
    (steps, secs, ratio, kl), = over[label]
    assert steps == '100'
    assert secs == _ms(GATE_SECONDS[label], 1)
    assert ratio == f'{np.mean(GATE_SECONDS[label]) / EPOCH["epoch_seconds"] * 100:.1f} %'
    assert kl == _ms(CONVERGED[label], 2, 100, True)
  epoch_line = re.search(r'One backbone training epoch: ([\d.]+) steps × ([\d.]+) ms = ([\d.]+) s', md)
  assert epoch_line.groups() == (f'{EPOCH["steps_per_epoch"]:.1f}', f'{EPOCH["step_seconds"] * 1e3:.1f}',
                                 f'{EPOCH["epoch_seconds"]:.1f}')

  lam = _table(md, '## Learned gates')
  assert set(lam) == {'mean'} and [r[0] for r in lam['mean']] == ['0', '0.05']
  for (x, blocks, flops), key in zip(lam['mean'], ('A2 λ=0', 'LEES λ=0.05')):
    assert blocks == _ms(POLICIES[key][6], 1, 100, True)
    assert flops == _ms(POLICIES[key][7], 1, 100, True)


def test_summary_json_is_the_same_statistics(built):
  summary, _ = built
  per = summary['per_label']
  for label, (_, _, _, _, fid, lat, _, _, dfid) in POLICIES.items():
    assert per[label]['fid']['mean'] == pytest.approx(np.mean(fid), abs=1e-12)
    assert per[label]['fid']['std'] == pytest.approx(np.std(fid, ddof=1), abs=1e-12)
    assert per[label]['latency_ms_per_100']['n'] == 3
    assert per[label]['delta_fid']['mean'] == pytest.approx(np.mean(dfid), abs=1e-12)
  assert summary['training']['gate_train_over_backbone_epoch'] == pytest.approx(
      np.mean(GATE_SECONDS['LEES λ=0.05']) / EPOCH['epoch_seconds'], abs=1e-12)
  assert summary['cells_finished'] == 12 and summary['failed_cells'] == []


def test_ase_schedules_as_run(built):
  _, md = built
  rows = _table(md, "ASE's Table 5 rows as this backbone runs them")
  (cols,) = rows['D4']
  assert cols == ['28 28 26 24 20 18 12 10 8 8', '28 28 26 24 20 18 12 12 12 12 (of 28)', 'yes',
                  '70.7%', '65.4%']


def test_run_table_names_the_sampler_and_its_literature_fid(built):
  _, md = built
  rows = _table(md, '## Run size')
  assert rows['sampler'] == [['ddpm, 3 steps, variance fixed_small']]
  # 3 steps is not tabulated; the 50-step DDPM values are.
  assert rows['full-model FID in the literature for this sampler (CIFAR-10)'] == [['not tabulated here']]
  assert report.literature_fid('ddpm', 'fixed_large', 50).startswith('32.72')
  assert report.literature_fid('ddpm', 'fixed_small', 50).startswith('8.01')
  assert report.literature_fid('ddim', 0.0, 50).startswith('4.67')


# --- few-step solvers and extra policies (experiment.few_step, experiment.extra_policies) ----

FEW_STEP = (('ddim', 10), ('dpm_solver++', 20))
EXTRA = ('deepcache:2', 'deepcache:3:nonuniform')


def _few_step_config():
  c = _config()
  c.experiment.update(few_step=FEW_STEP, extra_policies=EXTRA)
  return c


def _record(cell, seed, k):
  """A finished cell's record with numbers that differ per cell and seed (k: the cell's index)."""
  lat = 100.0 + 7.5 * k + 1.25 * seed
  return dict(cell=f'{cell.id}', label=cell.label, group=cell.group, kind=cell.kind, lam=cell.lam,
              form=cell.form, seed=seed, fid=4.0 + 0.37 * k + 0.11 * seed, latency_ms_per_100=lat,
              images_per_s=1e5 / lat, block_ratio=0.5 + 0.01 * k + 0.002 * seed,
              flop_fraction=0.4 + 0.013 * k + 0.003 * seed, unit_names=UNITS, num_timesteps=1000,
              timesteps=TIMESTEPS, masks=np.ones((len(TIMESTEPS), len(UNITS)), int).tolist(),
              sampler=cell.sampler or 'ddpm', steps=cell.steps or len(TIMESTEPS),
              spec=cell.spec or None, gate_timesteps=cell.gate_timesteps,
              num_samples=100, reference='cifar10/train', reference_count=500, device='cpu',
              num_devices=1, dtype='float32', latency_batch=100, fid_method='sqrtm')


@pytest.fixture(scope='module')
def few_step_study(tmp_path_factory):
  w = str(tmp_path_factory.mktemp('fewstep'))
  _fabricate(w)
  c = _few_step_config()
  new = [x for x in cells.plan_cells(c.experiment) if x.kind == 'spec' or x.group == 'few_step']
  records = {}
  for k, cell in enumerate(new):
    rec = _record(cell, cell.seed, k % (len(new) // len(SEEDS)))
    records.setdefault(cell.label, []).append(rec)
    _write(os.path.join(cells.cell_dir(w, cell.id), cells.RESULT_FILE), rec)
  summary = cells.summarize(w, c)
  drawn = {}
  real_plot = report.results_pareto_plot

  def recording_plot(per_label, points, **kw):  # what the Pareto plot was given
    drawn.update(per_label=per_label, points=points, **kw)
    return real_plot(per_label, points, **kw)

  mp = pytest.MonkeyPatch()
  mp.setattr(report, 'results_pareto_plot', recording_plot)
  try:
    path = report.write_report(w)
  finally:
    mp.undo()
  with open(path) as f:
    return w, summary, f.read(), records, drawn


def test_plan_labels_of_the_new_rows():
  ex = _few_step_config().experiment
  assert cells.solver_label('dpm_solver++', 20) == 'DPM-Solver++-20'
  assert list(cells.few_step_labels(ex, 'ddim', 10).values()) == [
      'B1 full @ DDIM-10', 'B2 ASE-default @ DDIM-10', 'LEES λ=0.05 main gates @ DDIM-10',
      'LEES λ=0.05 solver-trained @ DDIM-10']
  assert cells.label_order(ex)[2:4] == list(EXTRA)


def test_few_step_tables_are_the_files_numbers(few_step_study):
  _, summary, md, records, _ = few_step_study
  for name, steps in FEW_STEP:
    setting = cells.solver_label(name, steps)
    rows = _table(md, f'### {setting}\n')
    labels = list(cells.few_step_labels(_few_step_config().experiment, name, steps).values())
    assert list(rows) == labels
    full_lat = np.mean([r['latency_ms_per_100'] for r in records[labels[0]]])
    for label in labels:
      (n, fid, lat, flops, blocks, speed), = rows[label]
      recs = records[label]
      assert all((r['sampler'], r['steps']) == (name, steps) for r in recs)
      assert n == '3'
      assert fid == _ms([r['fid'] for r in recs], 3)
      assert lat == _ms([r['latency_ms_per_100'] for r in recs], 1)
      assert flops == _ms([r['flop_fraction'] for r in recs], 1, 100, True)
      assert blocks == _ms([r['block_ratio'] for r in recs], 1, 100, True)
      assert speed == f'{(1 - np.mean([r["latency_ms_per_100"] for r in recs]) / full_lat) * 100:.0f} %'
      assert (summary['per_label'][label]['sampler'], summary['per_label'][label]['steps']) == (name, steps)
  # The configured sampler stays the run's; the few-step rows are not paired with the main cell.
  assert summary['run']['sampler'] == 'ddpm'
  assert set(_table(md, '### Paired t-tests')) == {'B1 full', 'B2 ASE-default', 'A2 λ=0', *EXTRA}
  # ... nor rows of the λ table (their gates are the main cell's or trained at the main λ).
  lam = _table(md, '## Learned gates')
  assert [r[0] for r in lam['mean']] == ['0', '0.05']


def test_extra_policies_are_main_table_rows(few_step_study):
  _, _, md, records, _ = few_step_study
  rows = _table(md, '## Main results')
  assert set(rows) == {'B1 full', 'B2 ASE-default', 'LEES λ=0.05', *EXTRA}
  full_lat = np.mean(POLICIES['B1 full'][5])
  for spec in EXTRA:
    (n, fid, _, lat, _, _, blocks, _, flops, speed, _), = rows[spec]
    recs = records[spec]
    assert n == '3' and fid == _ms([r['fid'] for r in recs], 3)
    assert lat == _ms([r['latency_ms_per_100'] for r in recs], 1)
    assert blocks == _ms([r['block_ratio'] for r in recs], 1, 100, True)
    assert flops == _ms([r['flop_fraction'] for r in recs], 1, 100, True)
    assert speed == f'{(1 - np.mean([r["latency_ms_per_100"] for r in recs]) / full_lat) * 100:.0f} %'


def test_pareto_plot_has_every_method(few_step_study):
  w, _, _, records, drawn = few_step_study
  assert os.path.isfile(os.path.join(w, 'report', 'pareto.png'))
  every = set(POLICIES) | set(records)
  assert set(drawn['per_label']) == every
  for label, recs in records.items():  # each seed's point is the file's (latency, FID)
    assert drawn['points'][label] == [(r['latency_ms_per_100'], r['fid']) for r in recs]
  few = {l for l, recs in records.items() if recs[0]['group'] == 'few_step'}
  assert drawn['settings'] == {l: cells.solver_label(records[l][0]['sampler'], records[l][0]['steps'])
                               for l in few}
