"""experiment mode: the plan of cells, and the whole grid end to end on the tiny config (a kill
in the middle of a cell's gate training and the restart, a half-written result, a failing cell,
the report's sections). The end-to-end test needs the FID weights. Every number of the report
against the result files: test_report.py; the statistics: test_stats.py."""

import json
import os

import numpy as np
import pytest

from configs import cifar10
from lees_jax import cell_runner, evaluate, experiment, train


def test_plan_cells_and_config():
  c = cifar10.get_config('paper')
  assert c.mode == 'experiment'
  cells = experiment.plan_cells(c.experiment)
  # Per seed: B1, B2, 3 LEES, 3 FLOP-weighted LEES, A1, A1', A2, A3; then B3 for every seed,
  # then B2-ft and B3-ft (the paper preset fine-tunes ASE, as ASE does).
  assert len(cells) == 5 * 12 + 5 + 10 and len({x.id for x in cells}) == len(cells)
  assert [x.id for x in cells[-10:]] == [f'b2ft_ase_default_s{s}' for s in range(5)] + [
      f'b3ft_ase_grid_s{s}' for s in range(5)]
  assert {x.kind for x in cells[-10:]} == {'ase_ft'}
  assert [x.id for x in cells[:12]] == [
      'b1_full_s0', 'b2_ase_default_s0', 'lees_lam0.01_s0', 'lees_lam0.05_s0', 'lees_lam0.1_s0',
      'lees_flops_lam0.01_s0', 'lees_flops_lam0.05_s0', 'lees_flops_lam0.1_s0', 'a1_soft_s0',
      'a1t_soft_trained_s0', 'a2_lam0_s0', 'a3_random_s0']
  by_id = {x.id: x for x in cells}
  # A1 is the paper's: the main λ's hard-trained gates applied soft; A1' trains them soft.
  assert (by_id['a1_soft_s0'].train_form, by_id['a1_soft_s0'].form) == ('hard', 'soft')
  assert (by_id['a1t_soft_trained_s0'].train_form, by_id['a1t_soft_trained_s0'].form) == ('soft', 'soft')
  assert by_id['lees_flops_lam0.1_s0'].regularizer == 'flops'
  assert by_id['lees_lam0.1_s0'].regularizer == 'mean'
  assert all(x.kind == 'ase_grid' for x in cells[-15:-10])
  assert experiment.cells.label_order(c.experiment) == [
      'B1 full', 'B2 ASE-default', 'B3 ASE-grid', 'B2-ft ASE-default fine-tuned',
      'B3-ft ASE-grid fine-tuned', 'LEES λ=0.01', 'LEES λ=0.05', 'LEES λ=0.1',
      'LEES-FLOPs λ=0.01', 'LEES-FLOPs λ=0.05', 'LEES-FLOPs λ=0.1', 'A1 soft inference',
      "A1' soft-trained", 'A2 λ=0', 'A3 random']
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


def test_plan_few_step_and_extra_policy_cells():
  """experiment.extra_policies: spec cells per seed after B2; experiment.few_step: per setting
  and seed B1, B2, the main λ's gates and gates trained for the solver, last in the grid."""
  c = cifar10.get_config('fewstep')
  assert c.experiment.extra_policies == ('deepcache:2', 'deepcache:3:nonuniform')
  grid = experiment.plan_cells(c.experiment)
  assert [x.id for x in grid[:5]] == ['b1_full_s0', 'b2_ase_default_s0', 'x_deepcache_2_s0',
                                      'x_deepcache_3_nonuniform_s0', 'lees_lam0.05_s0']
  extra = grid[2:4]
  assert [(x.kind, x.group, x.label, x.spec, x.sampler) for x in extra] == [
      ('spec', 'baseline', 'deepcache:2', 'deepcache:2', ''),
      ('spec', 'baseline', 'deepcache:3:nonuniform', 'deepcache:3:nonuniform', '')]
  few = grid[5:]
  assert len(few) == 4 * 4 and {x.group for x in few} == {'few_step'}
  assert [x.id for x in few[:4]] == ['fs_ddim10_full_s0', 'fs_ddim10_ase_default_s0',
                                     'fs_ddim10_lees_main_s0', 'fs_ddim10_lees_solver_s0']
  assert [x.id for x in few[12:13]] == ['fs_dpm_solverpp20_full_s0']
  assert [(x.kind, x.sampler, x.steps) for x in few[12:]] == [
      ('full', 'dpm_solver++', 20), ('ase', 'dpm_solver++', 20), ('lees', 'dpm_solver++', 20),
      ('lees', 'dpm_solver++', 20)]
  main, trained = few[2], few[3]
  assert (main.label, main.gates_from, main.gate_timesteps, main.lam) == (
      'LEES λ=0.05 main gates @ DDIM-10', 'lees_lam0.05_s0', 'uniform', 0.05)
  assert (trained.label, trained.gates_from, trained.gate_timesteps, trained.form) == (
      'LEES λ=0.05 solver-trained @ DDIM-10', '', 'sampler', 'hard')
  assert experiment.cells.label_order(c.experiment)[-4:] == [
      'B1 full @ DPM-Solver++-20', 'B2 ASE-default @ DPM-Solver++-20',
      'LEES λ=0.05 main gates @ DPM-Solver++-20', 'LEES λ=0.05 solver-trained @ DPM-Solver++-20']
  # Gate training of a few-step cell: its solver, and t drawn from its timesteps.
  cfg = cell_runner._cell_config(c, trained, '/backbone')
  assert (cfg.sampler.name, cfg.sampler.steps, cfg.gates.timesteps) == ('ddim', 10, 'sampler')
  assert (c.sampler.name, c.sampler.steps, c.gates.timesteps) == ('ddpm', 50, 'uniform')
  # Several seeds: few-step cells come after every seed's main cells (they read their gates).
  c.experiment.seeds = (0, 1)
  ids = [x.id for x in experiment.plan_cells(c.experiment)]
  assert ids.index('lees_lam0.05_s1') < ids.index('fs_ddim10_lees_main_s0')
  for bad in ((('ddim', 0),), (('heun', 10),), (('ddim', 10), ('ddim', 10))):
    c.experiment.few_step = bad
    with pytest.raises(ValueError, match='few_step'):
      experiment.plan_cells(c.experiment)
  c.experiment.few_step = ()
  c.experiment.extra_policies = ('deepcache:2', 'deepcache:2')
  with pytest.raises(ValueError, match='extra_policies'):
    experiment.plan_cells(c.experiment)
  assert cifar10.get_config('paper').experiment.few_step == ()  # the paper's grid is unchanged


# --- the whole grid -------------------------------------------------------------------------


class _Kill(BaseException):
  """Stands in for SIGKILL: not an Exception, so the harness does not catch it."""


def _tiny_study(backbone):
  c = cifar10.get_config('tiny')
  c.mode = 'experiment'
  c.backbone = backbone
  c.gates.update(num_train_steps=4, log_every=1, checkpoint_every=2, heatmap_every=0)
  c.sampler.update(steps=2, batch_size=4)
  c.eval.update(num_samples=4, latency_batch=4, fid_batch_size=4, reference_split='test[:8]')
  c.ase.update(grid_starts=(2,), grid_finals=(2 / 7, 4 / 7), grid_num_samples=4)
  c.experiment.update(lams=(0.05,), flop_weighted_lams=(), ase_finetuned=False, seeds=(0,),
                      ablations=('soft', 'soft_trained', 'random'),
                      robustness=True,
                      corruptions=('fog',), robustness_reference_size=4, fid_method='svd',
                      overhead_steps=1, sample_grid=4)
  return c


@pytest.mark.needs_fid_weights
def test_study_end_to_end_kill_restart_failure_report(tiny_backbone, tmp_path, monkeypatch, tfds_mock):
  c = _tiny_study(tiny_backbone)
  w = str(tmp_path)
  ids = [x.id for x in experiment.plan_cells(c.experiment)]
  assert len(ids) == 7  # one seed: the statistics over seeds are test_report.py's

  def result(cid):
    return os.path.join(experiment.cell_dir(w, cid), experiment.RESULT_FILE)

  runs = []
  real_run = evaluate.Evaluator.run

  def counting_run(self, resolved, seed, num_samples, **kw):
    runs.append((resolved.name, seed))
    return real_run(self, resolved, seed, num_samples, **kw)

  monkeypatch.setattr(evaluate.Evaluator, 'run', counting_run)

  with tfds_mock(num_examples=8):  # cifar10_corrupted offline (the clean data: shipped subset)
    # 1. Killed in the middle of the third cell's gate training (the first LEES cell), right
    #    after its step-2 checkpoint.
    assert ids[2] == 'lees_lam0.05_s0'
    real_save = train._save

    def save_then_kill(manager, state, step):
      real_save(manager, state, step)
      if step == 2 and ids[2] in str(manager.directory):
        raise _Kill()

    monkeypatch.setattr(train, '_save', save_then_kill)
    with pytest.raises(_Kill):
      experiment.experiment(c, w)
    monkeypatch.setattr(train, '_save', real_save)
    assert [i for i in ids if os.path.isfile(result(i))] == ids[:2]
    gates_dir = os.path.join(experiment.cell_dir(w, ids[2]), 'gates')
    assert os.listdir(os.path.join(gates_dir, 'checkpoints', 'train_gates')) == ['2']
    assert not os.path.exists(os.path.join(gates_dir, 'gates.json'))
    # ... and the first cell's result.json arrives half-written (e.g. a copy cut short).
    whole = open(result(ids[0])).read()
    with open(result(ids[0]), 'w') as f:
      f.write(whole[:len(whole) // 2])
    before = {ids[1]: open(result(ids[1])).read()}

    # 2. Restart with one cell failing (a bad policy): the others finish; it is reported.
    runs.clear()
    real_policy_spec = experiment._Runner.policy_spec

    def bad_policy(self, cell, cdir, extra):
      if cell.id == 'a1t_soft_trained_s0':
        return 'ase:D9'
      return real_policy_spec(self, cell, cdir, extra)

    monkeypatch.setattr(experiment._Runner, 'policy_spec', bad_policy)
    with pytest.raises(experiment.CellsFailed, match='a1t_soft_trained_s0'):
      experiment.experiment(c, w)
    assert 'unknown ASE schedule' in open(os.path.join(experiment.cell_dir(w, 'a1t_soft_trained_s0'),
                                                       experiment.ERROR_FILE)).read()
    assert {i for i in ids if not os.path.isfile(result(i))} == {'a1t_soft_trained_s0'}
    assert {ids[1]: open(result(ids[1])).read()} == before  # not redone
    # The half-written result was kept aside, its cell run again: every cell but the finished
    # ids[1] and the failing one ran, plus the two grid points.
    assert open(result(ids[0]) + '.corrupt').read() == whole[:len(whole) // 2]
    assert ('full', 0) in runs
    grid_runs = sum(1 for name, _ in runs if name.startswith('ase_s'))
    assert grid_runs == 2 and len(runs) == 2 + (len(ids) - 1 - 1)
    # The killed gate training resumed from its checkpoint and ended where an uninterrupted
    # training of the same cell ends, bitwise.
    cell = next(x for x in experiment.plan_cells(c.experiment) if x.id == ids[2])
    ref = experiment.train_cell_gates(c, cell, str(tmp_path / 'uninterrupted'), tiny_backbone)
    got = json.load(open(os.path.join(gates_dir, 'gates.json')))
    assert got['step'] == ref['gates']['step'] == 4
    assert got['alpha'] == ref['gates']['alpha'] and got['beta'] == ref['gates']['beta']
    report_md = open(os.path.join(w, 'report', 'report.md')).read()
    assert 'a1t_soft_trained_s0' in report_md  # listed as failed

    # 3. Fixed: only the failed cell runs.
    monkeypatch.setattr(experiment._Runner, 'policy_spec', real_policy_spec)
    runs.clear()
    summary = experiment.experiment(c, w)
  assert runs == [('a1t_soft_trained_s0', 0)]
  assert summary['failed_cells'] == [] and summary['cells_finished'] == 7
  assert not os.path.exists(os.path.join(experiment.cell_dir(w, 'a1t_soft_trained_s0'),
                                         experiment.ERROR_FILE))

  schedules = json.load(open(os.path.join(w, 'experiment', 'ase_schedules.json')))
  assert [r['name'] for r in schedules] == ['D2', 'D3', 'D4', 'D7']
  assert summary['ase_schedules'] == schedules
  # B3's grid was scored on its own selection seed and reference, and timed.
  grid = [json.loads(l) for l in open(os.path.join(w, 'experiment', 'ase_grid', 'grid.jsonl'))]
  assert len(grid) == 2
  for g in grid:
    assert g['seed'] == c.ase.grid_seed == 1000 and g['seed'] not in c.experiment.seeds
    assert g['reference'] == 'cifar10_subset/test[64:128]' != 'cifar10_subset/' + c.eval.reference_split
    assert g['latency_ms_per_100'] > 0

  # Records and statistics.
  recs = {r['cell']: r for r in experiment.load_cell_results(w)}
  lees = recs['lees_lam0.05_s0']
  assert lees['group'] == 'lees' and lees['lam'] == 0.05 and lees['seed'] == 0
  assert lees['gate_train_seconds'] > 0 and os.path.isfile(os.path.join(lees['gates_dir'], 'gates.json'))
  # Snapshots at the configured fractions of the 4 steps (logged every step): steps 1, 2, 3, 4.
  conv = lees['gate_convergence']
  assert conv['fractions'] == list(c.experiment.convergence_fractions) and conv['stable'][-1] == 1.0
  assert conv['steps'] == [int(f * 4 + 1e-9) for f in c.experiment.convergence_fractions]
  assert lees['converged_fraction'] == conv['converged_fraction']
  assert recs['a3_random_s0']['random_keep_fraction'] == recs['lees_lam0.05_s0']['block_ratio']
  for a1 in ('a1_soft_s0', 'a1t_soft_trained_s0'):
    assert recs[a1]['path'] == 'soft' and recs[a1]['block_ratio'] == 1.0
  # The paper's A1 applies the main cell's gates; A1' trained its own, soft.
  assert recs['a1_soft_s0']['gates_dir'] == lees['gates_dir']
  assert recs['a1_soft_s0']['gate_alpha'] == lees['gate_alpha']
  a1t = json.load(open(os.path.join(recs['a1t_soft_trained_s0']['gates_dir'], 'gates.json')))
  assert a1t['form'] == 'soft' and a1t['alpha'] != lees['gate_alpha']
  assert recs['b1_full_s0']['block_ratio'] == 1.0
  for r in recs.values():
    assert np.isfinite(r['fid']) and np.isfinite(r['delta_fid'])
    assert set(r['robustness']['per_corruption']) == {'fog'}
  per = summary['per_label']
  assert per['B1 full']['fid'] == {'mean': recs['b1_full_s0']['fid'], 'std': None, 'n': 1}
  assert summary['ttests_vs_main']['B1 full']['fid']['p'] is None  # one seed: no test
  assert summary['training']['backbone_epoch']['epoch_seconds'] > 0
  on_disk = json.load(open(os.path.join(w, 'experiment', 'summary.json')))
  assert on_disk['labels'] == summary['labels']

  # The report: every table and plot, images present.
  report_dir = os.path.join(w, 'report')
  md = open(os.path.join(report_dir, 'report.md')).read()
  for heading in ('## Run size', '## Main results', '### Paired t-tests', '## Ablations',
                  '## Robustness', '## Training overhead and gate convergence', '## Learned gates',
                  '## Samples', 'ΔFID definition', 'Convergence definition'):
    assert heading in md, heading
  for label in ('B1 full', 'B2 ASE-default', 'B3 ASE-grid', 'LEES λ=0.05', 'A1 soft inference',
                "A1' soft-trained",
                'A3 random'):
    assert f'| {label} |' in md, label
  assert '3.05 ± 0.03' in md and '+1.55' in md  # the paper's numbers beside ours
  pngs = {f for f in os.listdir(report_dir) if f.endswith('.png')}
  assert {'pareto.png', 'ratio_vs_lambda.png', 'convergence.png', 'gates_LEES_lam_0.05.png',
          'samples_B1_full.png'} <= pngs
  for name in pngs:
    assert f']({name})' in md, name
  # report_only rebuilds from files, without an evaluator.
  c.experiment.report_only = True
  os.remove(os.path.join(report_dir, 'report.md'))
  experiment.experiment(c, w)
  assert open(os.path.join(report_dir, 'report.md')).read() == md


@pytest.mark.needs_fid_weights
def test_ase_finetuned_cells_fine_tune_once_and_sample_the_fine_tuned_backbone(tiny_backbone, tmp_path):
  """B2-ft: B2's schedule with the backbone fine-tuned under it (config.ase_ft), trained once
  and shared by the seeds' cells."""
  c = _tiny_study(tiny_backbone)
  c.experiment.update(lams=(), ablations=(), baselines=('ase_default',), seeds=(0, 1),
                      ase_finetuned=True, robustness=False, overhead_steps=0)
  c.ase_ft.update(num_train_steps=2, checkpoint_every=2, log_every=1, reweight_steps=1)
  w = str(tmp_path)
  experiment.experiment(c, w)
  recs = {r['cell']: r for r in experiment.load_cell_results(w)}
  assert sorted(recs) == ['b2_ase_default_s0', 'b2_ase_default_s1', 'b2ft_ase_default_s0',
                          'b2ft_ase_default_s1']
  ft_dir = os.path.join(w, 'experiment', 'ase_finetune', 'ase_default')
  for s in (0, 1):
    ft, frozen = recs[f'b2ft_ase_default_s{s}'], recs[f'b2_ase_default_s{s}']
    assert ft['policy_spec'] == f'ase_ft:{ft_dir}' and ft['label'] == 'B2-ft ASE-default fine-tuned'
    assert ft['masks'] == frozen['masks'] and ft['block_ratio'] == frozen['block_ratio']
    assert ft['fid'] != frozen['fid']  # other parameters, same noise
  assert os.listdir(os.path.join(ft_dir, 'checkpoints', 'ase_finetune')) == ['2']  # trained once
  meta = json.load(open(os.path.join(ft_dir, 'backbone', 'backbone.json')))
  assert meta['ase_schedule']['name'] == 'ase_default' and meta['step'] == 2
  md = open(os.path.join(w, 'report', 'report.md')).read()
  assert '| B2-ft ASE-default fine-tuned |' in md and 'fine-tune the backbone under' in md


def test_missing_backbone_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match='needs a backbone'):
    experiment.experiment(cifar10.get_config('tiny'), str(tmp_path))
  assert not os.path.exists(tmp_path / 'experiment' / 'cells')
