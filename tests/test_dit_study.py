"""configs/imagenet256_dit.py:tiny runs every mode offline, in order, as a user would: latents
-> pretrain -> train_gates / ase_finetune -> evaluate (decoded samples, FID) -> experiment.

Each mode's own behaviour has its oracle elsewhere (test_latents, test_vae, test_vlb, test_dit*,
test_stacked); this is the walk through the real entry point with every file each mode hands
to the next.
"""

import json
import os

import jax
import numpy as np

from configs import imagenet256_dit
from lees_jax import autoencoder, checkpoints, files, latents
from lees_jax import main as lees_main


def _config(mode, **overrides):
  c = imagenet256_dit.get_config('tiny')
  c.mode = mode
  c.data.train_split = 'train[:64]'
  c.update_from_flattened_dict(overrides)
  return c


def test_tiny_dit_runs_every_mode(tmp_path):
  w = str(tmp_path)
  lat = os.path.join(w, 'latents')
  pre = os.path.join(w, 'pre')

  lees_main.run_mode(_config('describe'), os.path.join(w, 'describe'))
  blocks = files.read_json(os.path.join(w, 'describe', 'blocks.json'))
  assert [u['kind'] for u in blocks['units']] == ['transformer'] * 4

  manifest = lees_main.run_mode(_config('latents'), w)
  vae = autoencoder.load_vae(_config('latents'))
  assert manifest['num_examples'] == 64 and manifest['vae'] == vae.fingerprint
  assert manifest['latent_shape'] == [8, 8, 4]
  assert latents.LatentSet(lat).rows(np.arange(3))[0].shape == (3, 8, 8, 4)

  train = {'data.latents_dir': lat}
  lees_main.run_mode(_config('pretrain', **train, **{'pretrain.num_train_steps': 4,
                                                       'pretrain.checkpoint_every': 4}), pre)
  meta = checkpoints.read_backbone_meta(pre)
  assert meta['model']['learn_sigma'] and os.path.isdir(os.path.join(pre, 'backbone', 'vae'))
  # The export carries the VAE it was trained with (same fingerprint from its vae/ copy).
  assert autoencoder.load_vae(_config('evaluate', backbone=pre, **{'vae.source': ''})
                              ).fingerprint == vae.fingerprint

  with_backbone = dict(train, backbone=pre)
  lees_main.run_mode(_config('train_gates', **with_backbone, **{'gates.num_train_steps': 4}),
                     os.path.join(w, 'gates'))
  assert os.path.isfile(os.path.join(w, 'gates', 'gates.json'))
  lees_main.run_mode(_config('ase_finetune', **with_backbone, **{
      'ase_ft.num_train_steps': 4, 'ase_ft.freeze_time_embedding': True}), os.path.join(w, 'aseft'))
  assert os.path.isdir(os.path.join(w, 'aseft', 'backbone', 'vae'))
  # DiT's timestep MLP stays bitwise as loaded; the blocks moved.
  _, before = checkpoints.load_backbone_params(pre)
  _, after = checkpoints.load_backbone_params(os.path.join(w, 'aseft'))
  for name in ('t_embed_in', 't_embed_out'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(after['block_0']['mlp_in']['kernel'], before['block_0']['mlp_in']['kernel'])

  results = lees_main.run_mode(
      _config('evaluate', backbone=pre, **{'sampler.path': 'stacked', 'eval.policies': (
          'full', 'ase:D3', f'lees:{os.path.join(w, "gates")}')}), os.path.join(w, 'ev'))
  assert [r['policy'] for r in results][:2] == ['full', 'D3']
  assert all(np.isfinite(r['fid']) and r['path'] == 'stacked' for r in results)
  assert results[1]['block_ratio'] == 0.7  # D3 on 4 blocks and 5 steps

  # The study finds the latents itself when latents_dir is empty (encoding them into its
  # workdir once), and reports on every cell.
  summary = lees_main.run_mode(_config('experiment', backbone=pre,
                                       **{'gates.num_train_steps': 4}), os.path.join(w, 'exp'))
  assert os.path.isfile(os.path.join(w, 'exp', 'latents', latents.MANIFEST))
  assert not summary['failed_cells']
  report = open(os.path.join(w, 'exp', 'report', 'report.md')).read()
  assert 'B1 full' in report and 'B2 ASE-default' in report and 'LEES λ=0.05' in report
  assert 'ASE D7' in report  # a Table 5 row as a cell of its own
  json.dumps(summary)  # the summary is plain JSON
