"""DiT on ImageNet 256x256 latents (ASE's main system, LEES's ImageNet claim), and a CPU preset.

Usage:
  python -m lees_jax.main --config=configs/imagenet256_dit.py --workdir=W        # DiT-XL/2
  python -m lees_jax.main --config=configs/imagenet256_dit.py:tiny --workdir=W   # CPU, offline

The `paper` preset reads a backbone converted from facebook/DiT-XL-2-256 (or DiT's original
``DiT-XL-2-256x256.pt`` with its SD VAE), which holds the DiT and the VAE:
  python -m lees_jax.convert --source=facebook/DiT-XL-2-256 --out=checkpoints/dit-xl-2-256
and trains gates / fine-tunes on VAE latents of ImageNet computed once by the `latents` mode
(``--config.mode=latents``, written to ``config.data.latents_dir``). ImageNet itself is a
manual download (TFDS ``imagenet2012``; the error says which files go where).

The `tiny` preset is a small DiT (8x8x4 latents, 4 blocks) on latents of the shipped CIFAR-10
subset encoded by a small randomly initialised VAE (``vae.source='init:0'``): its latents and
pictures mean nothing, it exists to run every mode offline in seconds.

Every field not set here is the CIFAR-10 config's (configs/cifar10.py), which documents it.
"""

import ml_collections

from lees_jax import config_files

PRESETS = ('paper', 'tiny')


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  preset = config_files.check_preset(preset, PRESETS, __file__)
  c = config_files.sibling_config(__file__, 'cifar10.py', 'paper')

  # DiT-XL/2 (Peebles & Xie 2023): 675M parameters, 28 blocks, learned variance.
  c.model = ml_collections.ConfigDict(dict(
      name='dit', size='XL/2', input_size=32, in_channels=4, num_classes=1000, learn_sigma=True,
      class_dropout_prob=0.1, dtype='float32'))
  c.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02))

  # Images: TFDS imagenet2012 (manual download), ADM's centre crop to 256. The networks train
  # on latents of those images (`latents` mode; '' = <workdir>/latents for that mode).
  c.data.update(dataset='imagenet2012', train_split='train', random_flip=False)
  c.data.image_size = 256
  c.data.crop = 'adm'         # 'adm' (box halving, bicubic, centre crop) or 'none'
  c.data.latents_dir = ''
  c.data.latents_shard_size = 10_000

  # The SD VAE (stabilityai/sd-vae-ft-ema or -mse): '' = the backbone directory's vae/, a
  # directory written by `python -m lees_jax.convert --source=stabilityai/sd-vae-ft-mse`, or
  # 'init:<seed>' (random weights of the spec below: tests and the tiny preset only).
  c.vae = ml_collections.ConfigDict(dict(
      source='', batch_size=64,
      block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
      latent_channels=4, scaling_factor=0.18215))

  # DiT's protocol: respaced DDPM-250 with the learned variance, classifier-free guidance 1.5
  # on 3 of the 4 latent channels (DiT's released sampler), no x0 clipping on latents.
  # ASE's Figure 3 uses DDIM-50: --config.sampler.name=ddim --config.sampler.steps=50.
  c.sampler.update(name='ddpm', steps=250, variance='learned_range', clip_x0=False,
                   batch_size=64)
  c.sampler.guidance_scale = 1.5
  c.sampler.guidance_channels = 3

  # FID of decoded samples; ASE: 5,000 samples against the training set (DiT: 50k).
  c.eval.update(num_samples=5_000, reference_split='train', fid_batch_size=100, latency_batch=64,
                policies=('full', 'ase:D3'))

  # LEES on DiT: gates per block, lambda 0.05, one epoch of latents.
  c.gates.update(batch_size=64)
  c.l2c.update(batch_size=64)  # Learning-to-Cache on DiT (its benchmark): per block
  c.ase.update(grid_num_samples=1000)
  # ASE fine-tuning of DiT: AdamW 2e-5, batch 64, EMA, constant rate (DiT's recipe).
  c.ase_ft.update(schedule='D3', batch_size=64, lr_schedule='constant')
  # The study on DiT: B1, ASE's Table 5 rows (D3 is B2; D2, D4, D7 as rows), B3, the LEES sweep.
  c.experiment.update(seeds=(0,), flop_weighted_lams=(), ablations=(), robustness=False,
                      ase_finetuned=False, sample_grid=64, ase_rows=('D2', 'D4', 'D7'))

  if preset == 'tiny':
    c.model.update(size='', hidden_size=64, depth=4, num_heads=4, patch_size=2, input_size=8,
                   num_classes=10)
    c.data.update(dataset='cifar10_subset', image_size=32, crop='none', latents_shard_size=256)
    c.vae.update(source='init:0', batch_size=32, block_out_channels=(16, 32, 32),
                 layers_per_block=1, norm_num_groups=8)
    c.pretrain.update(batch_size=8, num_train_steps=20, warmup_steps=5, log_every=5,
                      checkpoint_every=10)
    c.gates.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10,
                   heatmap_every=10)
    c.l2c.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10)
    c.sampler.update(steps=5, batch_size=4)
    c.sampler.guidance_scale = 1.5
    c.sampler.guidance_channels = 0
    c.eval.update(num_samples=8, latency_batch=4, latency_repeats=1, fid_batch_size=8,
                  reference_split='test[:64]')
    c.ase.update(grid_starts=(2, 6), grid_finals=(2 / 7, 4 / 7), grid_num_samples=8,
                 grid_reference_split='test[64:128]')
    c.ase_ft.update(batch_size=8, num_train_steps=20, reweight_steps=10, learning_rate=1e-3,
                    ema_decay=0.9, log_every=5, checkpoint_every=10)
    c.experiment.update(lams=(0.05,), seeds=(0,), fid_method='svd', overhead_steps=2,
                        baselines=('full', 'ase_default'), sample_grid=8, ase_rows=('D7',))
  return c
