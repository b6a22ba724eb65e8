"""U-ViT-S/4 on CelebA 64x64 (ASE's second system) on U-ViT's continuous VP SDE, and a CPU preset.

Usage:
  python -m lees_jax.main --config=configs/celeba64_uvit.py --workdir=W        # U-ViT-S/4
  python -m lees_jax.main --config=configs/celeba64_uvit.py:tiny --workdir=W   # CPU, offline

The `paper` preset reads a backbone converted from U-ViT's released ``celeba64_uvit_small.pth``
(https://github.com/baofff/U-ViT#pretrained-models; a plain state dict, read code-free):
  python -m lees_jax.convert --source=celeba64_uvit_small.pth --arch=uvit \
      --model_config=celeba64_uvit_small --out=checkpoints/uvit-celeba64
whose backbone.json records the VP SDE it was trained on (`sde.DIFFUSION_CONFIG`); a backbone
of another process is refused when read (`processes.backbone_mismatch`).

The process (lees_jax/processes.py, config.diffusion.process='vp_sde'): beta(t) from 0.1 to 20 on
t in [0, 1], training draws t ~ U(t_min, 1) (U-ViT's LSimple: t_min = 0) and x_t = alpha_t x0 +
sigma_t eps, the network gets 999 t and predicts eps; gates, ASE's schedules and lambda(t) read
t itself. Samplers: 'euler_maruyama' (ASE's U-ViT protocol EM-1000, the default) or 'dpm_solver'
(DPM-Solver-fast as U-ViT's eval.py runs it; ASE's Figure 3 / Tables 2-3 use DPM-25 and
DPM-50):
  --config.sampler.name=dpm_solver --config.sampler.steps=50     # or 25

Data: TFDS ``celeb_a`` (train split, 162,770 images) with U-ViT's crop (``crop='uvit_celeba'``:
the 128 x 128 box at top 57, left 25 of the 178 x 218 aligned image, resized to 64, as U-ViT's
datasets.py ``CelebA``), random horizontal flips for pretraining and ASE fine-tuning; FID of
5,000 samples against the training split (ASE's protocol).

The `tiny` preset is a 5-block U-ViT (width 32) on the shipped CIFAR-10 subset at 32 x 32 with
few-step samplers: it exists to run every mode offline in seconds, not to mean anything.

Every field not set here is the CIFAR-10 config's (configs/cifar10.py), which documents it.
"""

import ml_collections

from lees_jax import config_files

PRESETS = ('paper', 'tiny')
# Table 5's U-ViT rows (`lees_jax.ase.UVIT_KEPT`): decoder blocks kept per tenth of time.
UVIT_ROWS = ('D1-U-ViT', 'D2-U-ViT', 'D3-U-ViT', 'D6-U-ViT')


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  preset = config_files.check_preset(preset, PRESETS, __file__)
  c = config_files.sibling_config(__file__, 'cifar10.py', 'paper')

  # U-ViT-S/4 (baofff/U-ViT configs/celeba64_uvit_small.py's nnet; 44,292,228 parameters): 6
  # in-blocks, a mid-block, 6 out-blocks with skip-Linears; unconditional, final 3x3 conv.
  c.model = ml_collections.ConfigDict(dict(
      name='uvit', img_size=64, patch_size=4, in_chans=3, embed_dim=512, depth=12, num_heads=8,
      mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True,
      dtype='float32'))
  # U-ViT's continuous VP SDE (sde.VPSDE, LSimple's time draw).
  c.diffusion = ml_collections.ConfigDict(dict(
      process='vp_sde', beta_min=0.1, beta_max=20.0, t_min=0.0))

  c.data.update(dataset='celeb_a', train_split='train', random_flip=True)
  c.data.image_size = 64
  c.data.crop = 'uvit_celeba'  # the 128 x 128 box (top 57, left 25), resized to 64

  # U-ViT's own training recipe, for `pretrain` (the study starts from the released backbone):
  # AdamW 2e-4, weight decay 0.03, betas (0.99, 0.99), 5k warm-up steps, batch 128, 500k steps.
  c.pretrain.update(batch_size=128, learning_rate=2e-4, warmup_steps=5000, grad_clip=0.0,
                    ema_decay=0.9999, num_train_steps=500_000, b1=0.99, b2=0.99)
  c.pretrain.weight_decay = 0.03

  # ASE's U-ViT protocol: Euler-Maruyama with 1000 steps (EM-1000; Table 1, Tables 5 and 7).
  # DPM-Solver-25/50 (Figure 3, Tables 2-3): --config.sampler.name=dpm_solver
  # --config.sampler.steps=50 (or 25). sde_eps > 0 replaces the end time (EM 1e-3, DPM 1e-4).
  # U-ViT's samples are not clipped; the DDPM fields (spacing, eta, clip_x0, variance) are not
  # read by these samplers.
  c.sampler.update(name='euler_maruyama', steps=1000, batch_size=500, clip_x0=False)
  c.sampler.sde_eps = 0.0

  # FID of 5,000 samples against the whole training split (ASE's protocol).
  c.eval.update(num_samples=5_000, reference_split='train', fid_batch_size=250,
                latency_batch=128, policies=('full', 'ase:D1-U-ViT'))

  # LEES on U-ViT: gates per block (13 units), lambda 0.05, one epoch (1,271 steps at 128).
  c.gates.update(lam=0.05, batch_size=128, num_epochs=1.0)
  # ASE fine-tuning of U-ViT-S/4 (ASE §4, Table 6): AdamW 2e-5, batch 128, cosine annealing;
  # D1-U-ViT for 40k steps (D2 50k x 128; D3 150k x 64 and D6 200k x 64 in Table 6).
  c.ase_ft.update(schedule='D1-U-ViT', learning_rate=2e-5, batch_size=128, lr_schedule='cosine',
                  num_train_steps=40_000)
  c.ase.update(grid_num_samples=1000, grid_reference_split='train[:10000]')
  # The study on U-ViT: B1, Table 5's U-ViT rows as frozen-backbone cells, LEES lambda = 0.05.
  # No CelebA-C: no robustness measure. The DiT-derived baselines (B2 = D3, the B3 grid) are
  # not ASE's U-ViT schedules; add them with experiment.baselines if wanted.
  c.experiment.update(lams=(0.05,), main_lam=0.05, seeds=(0,), flop_weighted_lams=(),
                      baselines=('full',), ase_rows=UVIT_ROWS, ase_finetuned=False, ablations=(),
                      robustness=False, fid_method='sqrtm', sample_grid=64)

  if preset == 'tiny':
    c.model.update(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)
    c.data.update(dataset='cifar10_subset', image_size=32, crop='none')
    c.pretrain.update(batch_size=8, num_train_steps=20, warmup_steps=5, learning_rate=1e-3,
                      log_every=5, checkpoint_every=10)
    c.gates.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10,
                   heatmap_every=10)
    # DPM-Solver with 6 evaluations (orders 3, 2, 1); EM with few steps:
    # --config.sampler.name=euler_maruyama --config.sampler.steps=5.
    c.sampler.update(name='dpm_solver', steps=6, batch_size=4)
    c.eval.update(num_samples=8, latency_batch=4, latency_repeats=1, fid_batch_size=8,
                  reference_split='test[:32]', policies=('full', 'ase:D1-U-ViT'), fid_method='svd')
    c.ase.update(grid_starts=(2, 6), grid_finals=(2 / 7, 4 / 7), grid_num_samples=8,
                 grid_reference_split='test[64:128]')
    c.ase_ft.update(batch_size=8, num_train_steps=20, reweight_steps=10, learning_rate=1e-3,
                    ema_decay=0.9, log_every=5, checkpoint_every=10)
    c.experiment.update(fid_method='svd', overhead_steps=2, sample_grid=8, ase_rows=('D1-U-ViT',))
  return c
