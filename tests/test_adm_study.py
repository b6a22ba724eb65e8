"""configs/celebahq64_adm.py: the `tiny` preset through every mode, in order, as a user would
(describe -> pretrain -> train_gates / ase_finetune -> evaluate on both skipping paths ->
experiment with its report), and the `paper` preset's network against its oracles.

Each mode's own behaviour has its oracle elsewhere (test_adm, test_vlb, test_samplers,
test_experiment); this is the walk through the real entry point with every file each mode hands
to the next, on ADM with a learned variance and the cosine schedule.
"""

import json
import os

import jax
import numpy as np
import pytest

from configs import celebahq64_adm
from lees_jax import checkpoints, cost, files, models
from lees_jax import main as lees_main


def _config(mode, **overrides):
  c = celebahq64_adm.get_config('tiny')
  c.mode = mode
  c.data.train_split = 'train[:64]'
  c.update_from_flattened_dict(overrides)
  return c


@pytest.mark.needs_fid_weights
def test_tiny_adm_runs_every_mode(tmp_path):
  w = str(tmp_path)
  pre = os.path.join(w, 'pre')

  lees_main.run_mode(_config('describe'), os.path.join(w, 'describe'))
  blocks = files.read_json(os.path.join(w, 'describe', 'blocks.json'))
  # 32x32, levels (1, 2), one ResBlock per level, attention at 16x16 (rate 2): the encoder's
  # ResBlock, the down-ResBlock, ResBlock + attention; middle res, attn, res; the decoder's two
  # ResBlocks + attention per coarse level, the up-ResBlock, two ResBlocks at 32.
  assert [(u['kind'], u['skip']) for u in blocks['units']] == [
      ('res', 'identity'), ('res', 'resample'), ('res', 'shortcut_projection'),
      ('attn', 'identity'), ('res', 'identity'), ('attn', 'identity'), ('res', 'identity'),
      ('res', 'shortcut_projection'), ('attn', 'identity'), ('res', 'shortcut_projection'),
      ('attn', 'identity'), ('res', 'resample'), ('res', 'shortcut_projection'),
      ('res', 'shortcut_projection')]

  lees_main.run_mode(_config('pretrain', **{'pretrain.num_train_steps': 4,
                                            'pretrain.checkpoint_every': 4}), pre)
  meta = checkpoints.read_backbone_meta(pre)
  assert meta['model']['name'] == 'adm_unet' and meta['model']['learn_sigma']
  assert meta['diffusion']['beta_schedule'] == 'cosine'

  lees_main.run_mode(_config('train_gates', backbone=pre, **{'gates.num_train_steps': 4}),
                     os.path.join(w, 'gates'))
  gates = files.read_json(os.path.join(w, 'gates', 'gates.json'))
  assert len(gates['alpha']) == 14 and gates['sampler']['steps'] == 5
  assert np.asarray(gates['hard_masks']).shape == (5, 14)

  lees_main.run_mode(_config('ase_finetune', backbone=pre, **{
      'ase_ft.num_train_steps': 4, 'ase_ft.freeze_time_embedding': True}), os.path.join(w, 'aseft'))
  # ADM's timestep MLP stays bitwise as loaded; a decoder ResBlock moved.
  _, before = checkpoints.load_backbone_params(pre)
  _, after = checkpoints.load_backbone_params(os.path.join(w, 'aseft'))
  for name in ('time_embed_0', 'time_embed_1'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(after['up_0_res_1']['conv1']['kernel'],
                            before['up_0_res_1']['conv1']['kernel'])

  # (B1 full is the experiment's first cell below.)
  results = lees_main.run_mode(_config('evaluate', backbone=pre, **{'eval.policies': (
      'ase:D3', f'lees:{os.path.join(w, "gates")}')}), os.path.join(w, 'ev'))
  d3, lees = results
  assert (d3['policy'], lees['policy']) == ('D3', 'lees_gates')
  assert all(np.isfinite(r['fid']) and r['path'] == 'segments' for r in results)
  assert d3['sampler_variance'] == 'learned_range'
  assert d3['reference'] == 'cifar10_subset/train[:64]'
  # D3 drops 0, 0, 2, 2, 4, 4, 6, 6, 8, 8 of the 14 units per tenth of t (at most 8 = 16/28
  # of them: the 7 decoder units and mid_res_1); the 5 steps fall in tenths 0, 2, 4, 7, 9.
  assert d3['block_ratio'] == pytest.approx(1 - (0 + 2 + 4 + 6 + 8) / (5 * 14))
  assert lees['block_ratio'] == pytest.approx(np.asarray(gates['hard_masks']).mean())
  assert d3['fid'] != lees['fid']  # the backbone is no constant function
  # The lax.cond path samples the same images from the same noise as the segment programs.
  cond = lees_main.run_mode(_config('evaluate', backbone=pre, **{
      'sampler.path': 'cond', 'eval.policies': ('ase:D3',)}), os.path.join(w, 'ev_cond'))[0]
  assert (cond['path'], cond['segments']) == ('cond', d3['segments'])
  assert (cond['block_ratio'], cond['flop_fraction']) == (d3['block_ratio'], d3['flop_fraction'])
  assert cond['fid'] == pytest.approx(d3['fid'], rel=1e-3)

  # (overhead_steps=0: the one-epoch timing compiles a pretraining step again, for a line of
  # the report that test_experiment covers.)
  summary = lees_main.run_mode(_config('experiment', backbone=pre, **{
      'gates.num_train_steps': 4, 'experiment.overhead_steps': 0}), os.path.join(w, 'exp'))
  assert not summary['failed_cells']
  report = open(os.path.join(w, 'exp', 'report', 'report.md')).read()
  for row in ('B1 full', 'B2 ASE-default', 'LEES λ=0.05'):
    assert row in report, row
  json.dumps(summary)  # the summary is plain JSON


def test_paper_preset_is_guided_diffusions_64x64_adm_without_classes(tmp_path):
  """The paper preset's network is the one guided-diffusion's flags describe (64x64_diffusion.pt
  less --class_cond), and its parameter count is diffusers' UNet2DModel's for that network."""
  from lees_jax.convert import guided_diffusion  # pylint: disable=g-import-not-at-top
  c = celebahq64_adm.get_config('paper')
  assert (c.data.dataset, c.data.image_size, c.data.train_split) == ('celeb_a_hq', 64, 'train')
  assert c.data.random_flip and c.eval.reference_split == 'train'
  assert (c.sampler.name, c.sampler.steps, c.sampler.variance) == ('ddpm', 50, 'learned_range')
  assert (c.gates.lam, c.gates.num_epochs, c.diffusion.beta_schedule) == (0.05, 1.0, 'cosine')
  flags = ('--attention_resolutions 32,16,8 --class_cond False --diffusion_steps 1000 '
           '--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine '
           '--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True '
           '--use_new_attention_order True --use_scale_shift_norm True')
  model_config, diffusion_config, _ = guided_diffusion.configs_from_flags(flags)
  assert models.spec_from_config(c.model) == models.spec_from_config(model_config)
  assert diffusion_config.num_timesteps == c.diffusion.num_timesteps

  out = cost.describe(c, str(tmp_path))  # no data needed
  assert out['params'] == 295_136_454 and len(out['units']) == 58
  assert [u['name'] for u in out['units']][:3] == ['down_0_res_0', 'down_0_res_1', 'down_0_res_2']
  assert sum(u['ase_droppable'] for u in out['units']) == 32  # 31 decoder units + mid_res_1

  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  with torch.device('meta'):
    reference = diffusers.UNet2DModel(
        sample_size=64, in_channels=3, out_channels=6, layers_per_block=3,
        block_out_channels=[192, 384, 576, 768], attention_head_dim=64, attn_norm_num_groups=32,
        down_block_types=['ResnetDownsampleBlock2D'] + ['AttnDownBlock2D'] * 3,
        up_block_types=['AttnUpBlock2D'] * 3 + ['ResnetUpsampleBlock2D'],
        resnet_time_scale_shift='scale_shift', upsample_type='resnet', downsample_type='resnet')
  assert out['params'] == sum(p.numel() for p in reference.parameters())
