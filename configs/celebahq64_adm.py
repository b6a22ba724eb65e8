"""ADM on CelebA-HQ 64x64 (LEES's second benchmark: full FID 6.15, LEES 6.21, 34 % faster), and a
CPU preset.

Usage (README: "CelebA-HQ 64" for runtimes and memory):
  python -m lees_jax.main --config=configs/celebahq64_adm.py --config.mode=pretrain \
      --config.model.dtype=bfloat16 --workdir=W/pre
  python -m lees_jax.main --config=configs/celebahq64_adm.py --config.backbone=W/pre \
      --workdir=W/study
  python -m lees_jax.main --config=configs/celebahq64_adm.py:tiny --workdir=W   # CPU, offline

Architecture (`paper`). LEES names only "ADM", so we take ADM's own 64x64 network -- the one
architecture Dhariwal & Nichol (2021) give at this resolution, guided-diffusion's
``64x64_diffusion.pt`` -- without its class embedding (CelebA-HQ has no classes):
``--num_channels 192 --channel_mult 1,2,3,4 --num_res_blocks 3 --attention_resolutions 32,16,8
--num_head_channels 64 --use_new_attention_order True --use_scale_shift_norm True
--resblock_updown True --dropout 0.1 --learn_sigma True --noise_schedule cosine``.
295,136,454 parameters, 210.8 GFLOPs per image (a multiply-add is 2 FLOPs), 58 gateable units
(encoder: 15 ResBlocks, 3 of them resampling, and 9 attention blocks; middle: 3; decoder: 19
ResBlocks, 3 resampling, and 12 attention blocks); ``--config.mode=describe`` lists them. Why
this one and not a smaller net: it is the ADM a reader of "ADM at 64x64" would build, its units
are those of the public ImageNet-64 model (so what LEES learns on one transfers in kind to the
other), and its dropout 0.1 is the regularisation a 30k-image set needs. A smaller ADM is a few
overrides away (e.g. ``--config.model.model_channels=128 --config.model.num_res_blocks=2``:
101.7M parameters, 75.4 GFLOPs).

Data: TFDS ``celeb_a_hq/64`` (a manual download; the error says which files go where) or a
folder of images (``dataset='image_folder'``), 64x64, random horizontal flips in pretraining.
CelebA-HQ has one split (30,000 images), so the FID reference is the training split and the
ASE grid's selection reference is a slice of it (see ``c.ase``).

Pretraining (no public CelebA-HQ 64 ADM exists: ``pretrain`` trains it): improved-diffusion's
recipe -- Adam (AdamW with weight decay 0), learning rate 1e-4 without warm-up or gradient
clipping, batch 128, EMA 0.9999, the hybrid loss (eps-MSE + the variational bound for the
learned variance) -- for 500k steps (DDPM's CelebA-HQ schedule length, Ho et al. 2020: 0.5M;
~2,100 epochs of 30k images). Batch 128 needs ~180 GB of activations in fp32: several GPUs.

Sampling: the CIFAR-10 study's 50-step respaced DDPM, with the network's learned-range variance
(improved DDPM) instead of a fixed one; x0 clipped to [-1, 1] (pixels).

Every field not set here is the CIFAR-10 config's (configs/cifar10.py), which documents it.
"""

import ml_collections

from lees_jax import config_files

PRESETS = ('paper', 'tiny')


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  preset = config_files.check_preset(preset, PRESETS, __file__)
  c = config_files.sibling_config(__file__, 'cifar10.py', 'paper')

  # guided-diffusion's 64x64 ADM, unconditional (see the module docstring). attention_resolutions
  # are downsample rates: 64 // 32, 64 // 16, 64 // 8.
  c.model = ml_collections.ConfigDict(dict(
      name='adm_unet', image_size=64, in_channels=3, model_channels=192,
      channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(2, 4, 8),
      num_heads=4, num_head_channels=64, num_heads_upsample=-1, use_new_attention_order=True,
      use_scale_shift_norm=True, resblock_updown=True, dropout=0.1, num_classes=0,
      learn_sigma=True, time_scale=1.0, num_groups=32, norm_eps=1e-5, dtype='float32'))
  # beta_start / beta_end stay for the schema; the cosine schedule does not read them.
  c.diffusion.update(num_timesteps=1000, beta_schedule='cosine')

  c.data.update(dataset='celeb_a_hq', train_split='train', random_flip=True)
  c.data.image_size = 64

  c.pretrain.update(batch_size=128, learning_rate=1e-4, warmup_steps=0, grad_clip=0.0,
                    ema_decay=0.9999, num_train_steps=500_000, checkpoint_every=10_000)

  # The CIFAR-10 study's sampler, reading the learned variance.
  c.sampler.update(name='ddpm', steps=50, variance='learned_range', clip_x0=True, batch_size=100)

  # FID-10k (the CIFAR-10 study's protocol) against all 30,000 training images.
  c.eval.update(num_samples=10_000, reference_split='train', policies=('full', 'ase:D3'))
  c.eval.fid_method = 'sqrtm'  # evaluate mode's Frechet method ('svd': fast, exact for PSD)

  # LEES as the paper transfers it: lambda 0.05, one epoch (234 steps at batch 128), hard gates.
  c.gates.update(lam=0.05, num_epochs=1.0, batch_size=128, checkpoint_every=100,
                 heatmap_every=100)

  # The B3 grid is scored on a selection seed and reference of its own; with no held-out split
  # its reference is the first 5,000 training images (not disjoint from the evaluation
  # reference, but other statistics and another seed than the cells are scored with).
  c.ase.update(grid_num_samples=2000, grid_reference_split='train[:5000]')

  # ASE fine-tuning of the ADM (B2-ft / B3-ft when experiment.ase_finetuned): AdamW 2e-5, batch
  # 128, EMA 0.9999, 40k steps (8 % of pretraining, as ASE's D1-U-ViT).
  c.ase_ft.update(schedule='D3', batch_size=128, num_train_steps=40_000, lr_schedule='constant')

  # The study on ADM: B1, B2 (D3), ASE's other Table 5 rows, B3, the LEES lambda sweep and the
  # ablations, 3 seeds for paired statistics. No CIFAR-10-C counterpart: no robustness rows.
  # ASE fine-tuning costs ~2 x 40k backbone steps: --config.experiment.ase_finetuned=True.
  c.experiment.update(lams=(0.01, 0.05, 0.1), main_lam=0.05, seeds=(0, 1, 2),
                      flop_weighted_lams=(), baselines=('full', 'ase_default', 'ase_grid'),
                      ase_rows=('D2', 'D4', 'D7'), ase_finetuned=False,
                      ablations=('soft', 'lam0', 'random'), robustness=False, sample_grid=64)

  if preset == 'tiny':
    # A small ADM with every option the paper preset uses, on the shipped 32x32 CIFAR-10 subset.
    c.model.update(image_size=32, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_head_channels=16, num_groups=8, dropout=0.0)
    c.data.update(dataset='cifar10_subset', image_size=32)
    # A short EMA horizon and a higher rate, so that a few steps move the zero-initialised
    # output convolution and the policies' samples differ.
    c.pretrain.update(batch_size=8, num_train_steps=20, learning_rate=1e-3, ema_decay=0.9,
                      log_every=5, checkpoint_every=10)
    c.gates.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10,
                   heatmap_every=10)
    c.sampler.update(steps=5, batch_size=4)
    # As in the paper preset, every FID reference is a piece of the training split.
    c.eval.update(num_samples=8, latency_batch=4, latency_repeats=1, fid_batch_size=8,
                  reference_split='train[:64]', fid_method='svd')
    c.ase.update(grid_starts=(2, 6), grid_finals=(2 / 7, 4 / 7), grid_num_samples=8,
                 grid_reference_split='train[64:128]')
    c.ase_ft.update(batch_size=8, num_train_steps=20, reweight_steps=10, learning_rate=1e-3,
                    ema_decay=0.9, log_every=5, checkpoint_every=10)
    # B1, B2 and LEES: the ablations and ASE's other rows are the same cells on other policies.
    c.experiment.update(lams=(0.05,), seeds=(0,), fid_method='svd', overhead_steps=2,
                        baselines=('full', 'ase_default'), ablations=(), ase_rows=(),
                        sample_grid=8)
  return c
