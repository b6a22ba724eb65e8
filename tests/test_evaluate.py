"""evaluate mode end to end on the tiny config with the real FID network (skips without it)."""

import json
import os

import numpy as np
import pytest

from configs import cifar10
from lees_jax import evaluate, models, policies


def _config(backbone, policies):
  c = cifar10.get_config('tiny')
  c.backbone = backbone
  c.eval.policies = policies
  c.eval.reference_split = 'test[:16]'
  return c


@pytest.mark.needs_fid_weights
def test_evaluate_writes_every_file_and_resumes(tiny_backbone, tmp_path, monkeypatch):
  c = _config(tiny_backbone, ('full', 'ase:ase_default', 'random:0.5:3'))
  results = evaluate.evaluate(c, str(tmp_path))
  assert [r['policy'] for r in results] == ['full', 'ase_default', 'random_0.5']
  on_disk = json.load(open(tmp_path / 'eval' / 'results.json'))
  assert on_disk == json.loads(json.dumps(results))
  for r in on_disk:
    for k in evaluate.RESULT_KEYS:
      assert k in r, k
    assert np.isfinite(r['fid']) and r['fid'] > 0
    assert r['images_per_s'] == pytest.approx(100.0 / (r['latency_ms_per_100'] / 1e3))
  full, ase_rec, rnd = on_disk
  assert full['block_ratio'] == 1.0 and full['flop_fraction'] == 1.0
  # Block ratio of ASE-default on the tiny model = mean of its per-step masks (independent count).
  model = models.build_model(c.model)
  pol = evaluate.resolve_policy('ase:ase_default', model).policy
  from lees_jax import diffusion
  ts = diffusion.space_timesteps(1000, str(c.sampler.steps))
  assert ase_rec['block_ratio'] == pytest.approx(pol.step_masks(ts, 1000, model.num_units).mean())
  files = set(os.listdir(tmp_path / 'eval'))
  assert {'samples_full.png', 'samples_ase_default.png', 'gates_ase_default.png',
          'gates_random_0.5.png'} <= files
  assert any(f.startswith('events.out.tfevents') for f in files)
  # Restart: every record is found and nothing is sampled again.
  monkeypatch.setattr(evaluate, 'generate', lambda *a, **k: pytest.fail('re-sampled a finished record'))
  again = evaluate.evaluate(c, str(tmp_path))
  assert again == results


def test_bad_policy_specs(tiny_backbone):
  model = models.build_model(cifar10.get_config('tiny').model)
  with pytest.raises(ValueError, match='unknown policy spec'):
    evaluate.resolve_policy('magic', model)
  with pytest.raises(ValueError, match='unknown ASE schedule'):
    evaluate.resolve_policy('ase:D9', model)
  with pytest.raises(FileNotFoundError, match='grid'):
    evaluate.resolve_policy('ase_grid:/nonexistent.jsonl', model)
  with pytest.raises(FileNotFoundError, match='train_gates'):
    evaluate.resolve_policy('lees:/nonexistent', model)
  assert isinstance(evaluate.resolve_policy('random:0.4', model).policy, policies.LeesPolicy)


def test_corrupt_results_file_is_not_overwritten(tmp_path):
  path = tmp_path / 'results.json'
  path.write_text('{not json')
  with pytest.raises(ValueError, match='move it away'):
    evaluate.load_results(str(path))
  assert path.read_text() == '{not json'
