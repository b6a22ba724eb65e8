"""experiment mode: the plan of cells, and the whole grid end to end on the tiny config (kill and
restart, a failing cell, the report). The end-to-end test needs the FID weights. (Its statistics:
test_stats.py.)"""

import json
import os

import numpy as np
import pytest

from configs import cifar10
from lees_jax import evaluate, experiment


def test_plan_cells_and_config():
  c = cifar10.get_config('paper')
  assert c.mode == 'experiment'
  cells = experiment.plan_cells(c.experiment)
  # Per seed: B1, B2, 3 LEES, A1, A2, A3; then B3 for every seed.
  assert len(cells) == 5 * 8 + 5 and len({x.id for x in cells}) == len(cells)
  assert [x.id for x in cells[:8]] == ['b1_full_s0', 'b2_ase_default_s0', 'lees_lam0.01_s0',
                                       'lees_lam0.05_s0', 'lees_lam0.1_s0', 'a1_soft_s0',
                                       'a2_lam0_s0', 'a3_random_s0']
  assert all(x.kind == 'ase_grid' for x in cells[-5:])
  assert experiment.label_order(c.experiment) == [
      'B1 full', 'B2 ASE-default', 'B3 ASE-grid', 'LEES λ=0.01', 'LEES λ=0.05', 'LEES λ=0.1',
      'A1 soft', 'A2 λ=0', 'A3 random']
  c.experiment.main_lam = 0.2
  with pytest.raises(ValueError, match='main_lam'):
    experiment.plan_cells(c.experiment)
  c.experiment.main_lam = 0.05
  c.experiment.baselines = ('full', 'ddim')
  with pytest.raises(ValueError, match='unknown'):
    experiment.plan_cells(c.experiment)
  q = cifar10.get_config('quickstart')
  assert [x.id for x in experiment.plan_cells(q.experiment)] == [
      'b1_full_s0', 'b2_ase_default_s0', 'lees_lam0.05_s0']


# --- the whole grid -------------------------------------------------------------------------


class _Kill(BaseException):
  """Stands in for SIGKILL: not an Exception, so the harness does not catch it."""


def _tiny_study(backbone):
  c = cifar10.get_config('tiny')
  c.mode = 'experiment'
  c.gates.update(backbone=backbone, num_train_steps=4, log_every=1, checkpoint_every=4,
                 heatmap_every=0)
  c.sampler.update(steps=2, batch_size=4)
  c.eval.update(num_samples=4, latency_batch=4, fid_batch_size=4)
  c.ase.update(grid_starts=(2,), grid_finals=(2 / 7, 4 / 7), grid_num_samples=4)
  c.experiment.update(lams=(0.05,), seeds=(0, 1), reference_split='test[:8]', robustness=True,
                      corruptions=('fog',), robustness_reference_size=8, fid_method='svd',
                      overhead_steps=1, sample_grid=4)
  return c


@pytest.mark.needs_fid_weights
def test_study_end_to_end_kill_restart_failure_report(tiny_backbone, tmp_path, monkeypatch, tfds_mock):
  c = _tiny_study(tiny_backbone)
  w = str(tmp_path)
  ids = [x.id for x in experiment.plan_cells(c.experiment)]
  assert len(ids) == 14

  def result(cid):
    return os.path.join(experiment.cell_dir(w, cid), experiment.RESULT_FILE)

  runs = []
  real_run = evaluate.Evaluator.run

  def counting_run(self, resolved, seed, num_samples, **kw):
    runs.append((resolved.name, seed))
    return real_run(self, resolved, seed, num_samples, **kw)

  monkeypatch.setattr(evaluate.Evaluator, 'run', counting_run)

  with tfds_mock(num_examples=8):  # cifar10_corrupted offline (the clean data: shipped subset)
    # 1. Killed after the third cell (the first LEES cell; its gates are trained).
    def kill_after_three(cell, rec):
      if cell.id == ids[2]:
        raise _Kill()
    with pytest.raises(_Kill):
      experiment.experiment(c, w, after_cell=kill_after_three)
    assert [i for i in ids if os.path.isfile(result(i))] == ids[:3]
    before = {i: open(result(i)).read() for i in ids[:3]}

    # 2. Restart with one cell failing (a bad policy): the others finish; it is reported.
    runs.clear()
    real_policy_spec = experiment._Runner.policy_spec

    def bad_policy(self, cell, cdir, extra):
      if cell.id == 'b2_ase_default_s1':
        return 'ase:D9'
      return real_policy_spec(self, cell, cdir, extra)

    monkeypatch.setattr(experiment._Runner, 'policy_spec', bad_policy)
    with pytest.raises(experiment.CellsFailed, match='b2_ase_default_s1'):
      experiment.experiment(c, w)
    assert 'unknown ASE schedule' in open(os.path.join(experiment.cell_dir(w, 'b2_ase_default_s1'),
                                                       experiment.ERROR_FILE)).read()
    assert {i for i in ids if not os.path.isfile(result(i))} == {'b2_ase_default_s1'}
    assert {i: open(result(i)).read() for i in ids[:3]} == before  # not redone
    grid_runs = sum(1 for name, _ in runs if name.startswith('ase_s'))
    assert grid_runs == 2 and len(runs) == 2 + (len(ids) - 3 - 1)
    report_md = open(os.path.join(w, 'report', 'report.md')).read()
    assert 'b2_ase_default_s1' in report_md  # listed as failed

    # 3. Fixed: only the failed cell runs.
    monkeypatch.setattr(experiment._Runner, 'policy_spec', real_policy_spec)
    runs.clear()
    summary = experiment.experiment(c, w)
  assert runs == [('ase_default', 1)]
  assert summary['failed_cells'] == [] and summary['cells_finished'] == 14
  assert not os.path.exists(os.path.join(experiment.cell_dir(w, 'b2_ase_default_s1'),
                                         experiment.ERROR_FILE))

  # Records and statistics.
  recs = {r['cell']: r for r in experiment.load_cell_results(w)}
  lees = recs['lees_lam0.05_s0']
  assert lees['group'] == 'lees' and lees['lam'] == 0.05 and lees['seed'] == 0
  assert lees['gate_train_seconds'] > 0 and os.path.isfile(os.path.join(lees['gates_dir'], 'gates.json'))
  assert lees['gate_convergence']['steps'] == [1, 2, 3, 4]  # one snapshot per logging step
  assert recs['a3_random_s1']['random_keep_fraction'] == recs['lees_lam0.05_s1']['block_ratio']
  assert recs['a1_soft_s0']['path'] == 'soft' and recs['a1_soft_s0']['block_ratio'] == 1.0
  assert recs['b1_full_s0']['block_ratio'] == 1.0
  for r in recs.values():
    assert np.isfinite(r['fid']) and np.isfinite(r['delta_fid'])
    assert set(r['robustness']['per_corruption']) == {'fog'}
  per = summary['per_label']
  assert per['B1 full']['fid']['n'] == 2
  assert per['B1 full']['fid']['mean'] == pytest.approx(np.mean([recs['b1_full_s0']['fid'],
                                                                  recs['b1_full_s1']['fid']]))
  tt = summary['ttests_vs_main']['B1 full']['fid']
  from scipy import stats
  a = [recs[f'lees_lam0.05_s{s}']['fid'] for s in (0, 1)]
  b = [recs[f'b1_full_s{s}']['fid'] for s in (0, 1)]
  assert tt['p'] == pytest.approx(stats.ttest_rel(a, b).pvalue)
  assert summary['training']['backbone_epoch']['epoch_seconds'] > 0
  on_disk = json.load(open(os.path.join(w, 'experiment', 'summary.json')))
  assert on_disk['labels'] == summary['labels']

  # The report: every table and plot, images present.
  report_dir = os.path.join(w, 'report')
  md = open(os.path.join(report_dir, 'report.md')).read()
  for heading in ('## Run size', '## Main results', '### Paired t-tests', '## Ablations',
                  '## Robustness', '## Training overhead and gate convergence', '## Learned gates',
                  '## Samples', 'ΔFID definition', 'KL definition'):
    assert heading in md, heading
  for label in ('B1 full', 'B2 ASE-default', 'B3 ASE-grid', 'LEES λ=0.05', 'A1 soft', 'A2 λ=0',
                'A3 random'):
    assert f'| {label} |' in md, label
  assert '3.05 ± 0.03' in md and '+1.55' in md  # the paper's numbers beside ours
  pngs = {f for f in os.listdir(report_dir) if f.endswith('.png')}
  assert {'pareto.png', 'ratio_vs_lambda.png', 'kl.png', 'gates_LEES_lam_0.05.png',
          'samples_B1_full.png'} <= pngs
  for name in pngs:
    assert f']({name})' in md, name
  # report_only rebuilds from files, without an evaluator.
  c.experiment.report_only = True
  os.remove(os.path.join(report_dir, 'report.md'))
  experiment.experiment(c, w)
  assert open(os.path.join(report_dir, 'report.md')).read() == md


def test_missing_backbone_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='needs a backbone'):
    experiment.experiment(cifar10.get_config('tiny'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'experiment' / 'cells')
