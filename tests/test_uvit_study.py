"""configs/celeba64_uvit.py:tiny runs every mode offline, in order, as a user would, on U-ViT's
continuous VP SDE: describe -> pretrain -> train_gates / ase_finetune (a Table 5 U-ViT row) ->
evaluate (FID, Euler-Maruyama and DPM-Solver) -> experiment and its report.

The continuous-time objectives have their own oracles in tests/test_uvit_time.py, the samplers in
tests/test_vp_sde.py and the backbone in tests/test_uvit.py; this is the walk through the real
entry point with every file each mode hands to the next.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import celeba64_uvit
from lees_jax import ase, checkpoints, files, models, policies, samplers
from lees_jax import main as lees_main


def _config(mode, **overrides):
  c = celeba64_uvit.get_config('tiny')
  c.mode = mode
  c.data.train_split = 'train[:64]'
  c.update_from_flattened_dict(overrides)
  return c


def test_tiny_uvit_runs_every_mode(tmp_path):
  w = str(tmp_path)
  pre = os.path.join(w, 'pre')

  blocks = lees_main.run_mode(_config('describe'), os.path.join(w, 'describe'))
  assert [u['position'] for u in blocks['units']] == ['encoder'] * 2 + ['middle'] + ['decoder'] * 2
  assert blocks['diffusion'].startswith('continuous VP SDE')

  lees_main.run_mode(_config('pretrain', **{'pretrain.num_train_steps': 4,
                                            'pretrain.checkpoint_every': 4}), pre)
  meta = checkpoints.read_backbone_meta(pre)
  # The export records the process it was trained on, which every later mode checks.
  assert meta['model']['name'] == 'uvit' and meta['diffusion']['process'] == 'vp_sde'

  lees_main.run_mode(_config('train_gates', backbone=pre, **{'gates.num_train_steps': 4}),
                     os.path.join(w, 'gates'))
  gates = files.read_json(os.path.join(w, 'gates', 'gates.json'))
  # The masks it reports are at the DPM-Solver's own (real-valued) timesteps, whose normalised
  # time is the continuous t of each network evaluation.
  assert gates['num_timesteps'] == 1000 and len(gates['sampler']['timesteps']) == 6
  assert not all(float(t).is_integer() for t in gates['sampler']['timesteps'])
  assert np.asarray(gates['hard_masks']).shape == (6, 5)

  lees_main.run_mode(_config('ase_finetune', backbone=pre, **{'ase_ft.num_train_steps': 4}),
                     os.path.join(w, 'aseft'))
  summary = files.read_json(os.path.join(w, 'aseft', 'ase_schedule.json'))
  assert summary['name'] == 'D1-U-ViT' and 'VP SDE' in summary['diffusion']
  _, before = checkpoints.load_backbone_params(pre)
  _, after = checkpoints.load_backbone_params(os.path.join(w, 'aseft'))
  assert not np.array_equal(after['out_blocks_0']['qkv']['kernel'],
                            before['out_blocks_0']['qkv']['kernel'])

  # Both samplers of the VP SDE, into one evaluation directory (the FID reference is computed
  # once; records are keyed by sampler). The study below samples the full model and D1-U-ViT.
  model = models.build_model(_config('evaluate').model)
  for name, steps, spec in (('euler_maruyama', 5, f'ase_ft:{os.path.join(w, "aseft")}'),
                            ('dpm_solver', 6, f'lees:{os.path.join(w, "gates")}')):
    c = _config('evaluate', backbone=pre, **{'sampler.name': name, 'sampler.steps': steps,
                                             'eval.policies': (spec,)})
    (rec,) = [r for r in lees_main.run_mode(c, w) if r['sampler'] == name]
    assert rec['steps'] == steps and np.isfinite(rec['fid']) and rec['policy_spec'] == spec
    solver = samplers.solver_from_config(c.diffusion, c.sampler)
    if name == 'euler_maruyama':
      # The fine-tuned backbone runs D1-U-ViT: round(kept / 6 * 2) of the 2 decoder blocks in
      # each tenth of t, at the continuous t of each step.
      want = ase.named_schedule('D1-U-ViT', model.units).step_masks(solver.timesteps, 1000, 5)
      assert rec['block_ratio'] == pytest.approx(policies.executed_block_ratio(want))
      assert rec['block_ratio'] < 1.0
  assert os.path.isfile(os.path.join(w, 'eval', 'gates_lees_gates.png'))

  # DPM-Solver-6: B1, ASE D1-U-ViT, LEES (the backbone-epoch timing is the DDPM study's, not
  # run here for time).
  summary = lees_main.run_mode(_config('experiment', backbone=pre, **{
      'gates.num_train_steps': 4, 'experiment.overhead_steps': 0}), os.path.join(w, 'exp'))
  assert not summary['failed_cells']
  assert [r['name'] for r in summary['ase_schedules']][-1] == 'D1-U-ViT'
  cell = files.read_json(os.path.join(w, 'exp', 'experiment', 'cells', 'lees_lam0.05_s0',
                                      'result.json'))
  assert cell['num_timesteps'] == 1000 and cell['converged_fraction'] is not None
  np.testing.assert_allclose(cell['timesteps'], solver.timesteps)  # real-valued, as run
  report = open(os.path.join(w, 'exp', 'report', 'report.md')).read()
  assert 'B1 full' in report and 'ASE D1-U-ViT' in report and 'LEES λ=0.05' in report
  assert 'U-ViT-S decoder blocks' in report
  json.dumps(summary)  # the summary is plain JSON


def test_a_vp_sde_backbone_refuses_a_ddpm_config(tmp_path):
  """The backbone records its process; a config of the other one is refused when it is read, and
  a DDPM sampler on the VP SDE when the solver is built, each naming what to set."""
  from configs import cifar10
  from lees_jax import processes
  c = _config('evaluate')
  model = models.build_model(c.model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  out = checkpoints.save_backbone(os.path.join(str(tmp_path), 'b'), params, c.model,
                                  diffusion_config=dict(process='vp_sde', beta_min=0.1,
                                                        beta_max=20.0))
  ddpm = cifar10.get_config('tiny').diffusion
  with pytest.raises(checkpoints.BackboneError, match="config.diffusion.process='vp_sde'"):
    checkpoints.read_backbone(out, c.model, ddpm)
  checkpoints.read_backbone(out, c.model, c.diffusion)  # its own process
  other = c.diffusion.copy_and_resolve_references()
  other.beta_max = 10.0
  with pytest.raises(checkpoints.BackboneError, match='beta_max=20.0'):
    checkpoints.read_backbone(out, c.model, other)
  with pytest.raises(ValueError, match="'euler_maruyama', 'dpm_solver'"):
    samplers.solver_from_config(c.diffusion,
                                _config('evaluate', **{'sampler.name': 'ddpm'}).sampler)
  with pytest.raises(ValueError, match="process='vp_sde'"):
    samplers.solver_from_config(ddpm, c.sampler)
  mixed = cifar10.get_config('tiny').diffusion
  mixed.process = 'vp_sde'  # the DDPM fields would be ignored: refused by name
  with pytest.raises(ValueError, match='num_timesteps'):
    processes.from_config(mixed)
