"""The offline quick start: the shipped backbone, and a shortened run of the README's command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from lees_jax import checkpoints, data, diffusion, experiment, models


def test_shipped_backbone_loads_matches_its_config_and_denoises():
  c = cifar10.get_config('quickstart')
  meta = checkpoints.read_backbone_meta(c.backbone)
  model_config, params = checkpoints.load_backbone_params(c.backbone, c.model)
  # Produced by this project's pretrain mode with the preset's recipe (see TRAINING.md there).
  assert meta['source'] == 'lees_jax pretrain' and meta['params_kind'] == 'ema'
  assert meta['ema_decay'] == c.pretrain.ema_decay and meta['seed'] == c.seed
  assert meta['step'] == c.pretrain.num_train_steps
  model = models.build_model(model_config)
  assert models.count_params(params) == 1_113_955
  # Behaviour, not just shapes: on real held-out images it predicts the noise far better than
  # the trivial predictor eps = 0 (whose MSE is 1).
  x0 = data.to_model_range(data.load_subset('test')[0][:32])
  sched = diffusion.schedule_from_config(c.diffusion)
  for step in (100, 500):
    t = jnp.full((32,), step)
    noise = jax.random.normal(jax.random.PRNGKey(step), x0.shape)
    eps = model.apply({'params': params}, diffusion.q_sample(sched, jnp.asarray(x0), t, noise), t)
    assert float(diffusion.eps_mse(eps, noise).mean()) < 0.25, step


@pytest.mark.needs_fid_weights
def test_shortened_quickstart_runs_end_to_end(tmp_path):
  c = cifar10.get_config('quickstart')
  assert c.mode == 'experiment'
  # The README command with fewer steps and samples.
  c.sampler.update(steps=10, batch_size=16)
  c.gates.num_train_steps = 4
  c.eval.update(latency_batch=16, latency_repeats=1, fid_batch_size=16, num_samples=16,
                reference_split='test[:32]')
  c.experiment.update(overhead_steps=0)
  summary = experiment.experiment(c, str(tmp_path))
  report = (tmp_path / 'report' / 'report.md').read_text()
  cells = {r['cell']: r for r in experiment.load_cell_results(str(tmp_path))}
  assert sorted(cells) == ['b1_full_s0', 'b2_ase_default_s0', 'lees_lam0.05_s0']
  for r in cells.values():
    assert np.isfinite(r['fid']) and r['fid'] > 0 and r['num_samples'] == 16
  # The summary (the README's printed table) is the three cells' own numbers, one seed each.
  assert summary['cells_finished'] == 3 and summary['failed_cells'] == []
  labels = {'B1 full': 'b1_full_s0', 'B2 ASE-default': 'b2_ase_default_s0',
            'LEES λ=0.05': 'lees_lam0.05_s0'}
  for label, cid in labels.items():
    entry = summary['per_label'][label]
    for m in ('fid', 'latency_ms_per_100', 'block_ratio', 'flop_fraction'):
      assert entry[m] == {'mean': cells[cid][m], 'std': None, 'n': 1}, (label, m)
    assert f'| {label} |' in report, label
  assert cells['b1_full_s0']['block_ratio'] == cells['b1_full_s0']['flop_fraction'] == 1.0
  # B2 drops units: fewer blocks and FLOPs than B1 (ASE-default never drops near the data).
  assert 0.5 < cells['b2_ase_default_s0']['block_ratio'] < 1.0
  assert 0.0 < cells['b2_ase_default_s0']['flop_fraction'] < 1.0
  # The LEES cell's executed-block ratio, recounted by hand from its learned alpha, beta:
  # unit k runs at sampler timestep s iff alpha_k (s + 1) / 1000 + beta_k > 0.
  g = json.load(open(cells['lees_lam0.05_s0']['gates_dir'] + '/gates.json'))
  assert g['sampler']['steps'] == 10 and g['step'] == 4
  s = np.asarray(g['sampler']['timesteps'], np.float64)
  logits = np.asarray(g['alpha'])[None] * (s[:, None] + 1) / 1000 + np.asarray(g['beta'])[None]
  assert cells['lees_lam0.05_s0']['block_ratio'] == pytest.approx((logits > 0).mean(), abs=1e-12)
