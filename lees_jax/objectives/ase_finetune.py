"""ASE fine-tuning (Moon et al. 2024, §3.3 and Appendix A.2): the backbone trained under a
fixed ASE schedule, AdamW + EMA + lambda(t).

Exports ``<workdir>/backbone`` (EMA params, the schedule in its metadata) and
``<workdir>/ase_schedule.json``; read back with `load_ase_finetuned`.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lees_jax import ase
from lees_jax import checkpoints
from lees_jax import cost
from lees_jax import files
from lees_jax import gates as gating
from lees_jax import models
from lees_jax import policies
from lees_jax import processes
from lees_jax.objectives.base import (CHECKPOINT_DIR, Objective, Pytree, backbone_params,
                                      batch_labels, merge, num_steps, partition,
                                      sampler_timesteps)

ASE_SCHEDULE_FILE = 'ase_schedule.json'
ASE_REWEIGHTS = ('none', 'paper')


def ase_time_weight(t, num_timesteps: int, step, reweight: str = 'paper', coef: float = 1.0,
                    reweight_steps: int = 0):
  """The ASE loss coefficient lambda(t) for integer timesteps ``t`` at optimiser step ``step``.

  What the paper says (§3.3, Algorithm 1): fine-tuning should change little near t -> 0 and
  learn what the dropped blocks leave unseen near t -> 1, so "we apply a higher coefficient to
  the lambda(t) term"; "once the model's performance appears to have plateaued, we adjust the
  lambda(t) value back to 1". Algorithm 1 takes a "time-dependent coefficient lambda(t)" and a
  "re-weighting cycle C" but gives neither; the released code implements lambda(t) = 1 only.

  What we implement (t_n = (t + 1) / T in (0, 1], the gates' normalised time; `ase_lambda`
  takes t_n itself, as a continuous-time process draws it):
    reweight='none':  lambda(t) = 1                                   (the released code)
    reweight='paper': lambda(t) = 1 + coef * t_n  while step < reweight_steps (the cycle C),
                      then 1.
  The linear ramp is our reading: it is 1 at the data end (no extra push where every unit runs)
  and 1 + coef at the noise end, where the schedule drops the most units; it needs no knowledge
  of the schedule, and coef = 0 or reweight_steps = 0 recovers lambda = 1.
  """
  return ase_lambda(policies.normalized_time(t, num_timesteps), step, reweight, coef,
                    reweight_steps)


def ase_lambda(t_n, step, reweight: str = 'paper', coef: float = 1.0, reweight_steps: int = 0):
  """`ase_time_weight` at normalised times ``t_n`` (`processes.NoisedBatch.gate_time`)."""
  if reweight == 'none':
    return jnp.ones_like(t_n)
  if reweight == 'paper':
    return jnp.where(jnp.asarray(step) < reweight_steps, 1.0 + coef * t_n, jnp.ones_like(t_n))
  raise ValueError(f'config.ase_ft.reweight must be one of {ASE_REWEIGHTS}, got {reweight!r}')


def ase_objective(config, backbone: Pytree | None = None) -> Objective:
  """ASE fine-tuning: the backbone (its EMA params) trained under a fixed ASE schedule.

  Every example runs the network as the sampler would at its time (the diffusion process's draw,
  `lees_jax.processes`: a DDPM timestep, or U-ViT's continuous VP SDE t, whose tenth of
  normalised time picks the column): the schedule's keep column for the example's interval
  becomes the fixed per-example mask `gates.ExampleMask`, so a dropped unit contributes exactly
  its skip path (identity, the 1x1 shortcut of a ResBlock that changes channels, U-ViT's
  skip-Linear -- those run and are trained) and gets exactly zero gradient from that example.
  Loss (the process's: `diffusion.hybrid_loss_terms` for DDPM, the eps-MSE for the VP SDE), per
  example i: lambda(t_i) mse_i for an epsilon-only backbone (the DDPM UNet, U-ViT),
  lambda(t_i) mse_i + vb_i for one with a learned variance (output 'eps_variance': DiT with
  learn_sigma), averaged over the batch; mse_i is the eps-MSE (mean over dimensions), vb_i improved DDPM's variational-bound term
  `diffusion.vb_terms_bpd` * T/1000, with eps under a stop-gradient (the vb trains the variance v
  only, the mse epsilon only), lambda(t) `ase_time_weight` (`ase_lambda` of the gates' time). So the variance outputs of the last
  layer are fine-tuned too, on the vb of the dropped-block forward. ASE's released DiT
  fine-tuning (``train_ase.py``: ``create_ase_diffusion``, DiT's learn_sigma with loss type MSE)
  trains mse + vb with lambda = 1 (its 'default' schedule, the only one it implements; a
  non-default one would multiply the sum mse + vb); here lambda(t) weights the eps-MSE only, so
  that reweight='none' is that loss exactly and 'paper' leaves the variance term as it is.
  Metrics: 'mse' (unweighted) and, for a learned variance, 'vb' (batch means).

  AdamW, constant (or cosine) learning rate, dropout as in pretraining
  (config.model.dropout), EMA from the loaded parameters. With
  ``config.ase_ft.freeze_time_embedding`` the timestep MLP (``model.time_embedding``: the
  UNet's temb_dense_*, DiT's t_embed_in/out) is frozen (not in the
  trainable partition, never updated). ``backbone`` params replace config.backbone
  (tests, benchmarks).

  A class-conditional backbone (DiT) is trained on the batch's labels in train mode, i.e. with
  its own label dropout to the null class (``config.model.class_dropout_prob``), as ASE's
  released DiT fine-tuning does (DiT's training script, ``model.train()`` "enables embedding
  dropout for classifier-free guidance"): guided sampling runs the null-class half under the
  same schedule, so it is fine-tuned too. ``config.model.class_dropout_prob=0`` keeps every
  label as given (a training field: the backbone still loads).
  """
  ac = config.ase_ft
  if ac.reweight not in ASE_REWEIGHTS:
    raise ValueError(f'config.ase_ft.reweight must be one of {ASE_REWEIGHTS}, got {ac.reweight!r}')
  if ac.lr_schedule not in ('constant', 'cosine'):
    raise ValueError(f"config.ase_ft.lr_schedule must be 'constant' or 'cosine', got {ac.lr_schedule!r}")
  model = models.build_model(config.model)
  process = processes.for_model(config.diffusion, model)
  units = model.units
  unit_names = [u.name for u in units]
  K = len(units)
  policy = ase.resolve_schedule(ac.schedule, units, config)  # before the backbone is read
  params, backbone_dir = backbone_params(config, backbone)
  params = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(params))
  freeze = bool(ac.freeze_time_embedding)
  # The backbone names its timestep-MLP subtrees (UNet: temb_dense_*; DiT: t_embed_in/out).
  trainable, frozen = partition(
      params, lambda path, leaf: not (freeze and path[0] in model.time_embedding))
  T = process.gate_timesteps
  keep_of = process.schedule_keep(policy, K)  # draw -> (B, K): unit k runs at its time
  n_steps = num_steps(ac, config.data)
  lr = (optax.cosine_decay_schedule(ac.learning_rate, n_steps) if ac.lr_schedule == 'cosine'
        else optax.constant_schedule(ac.learning_rate))
  parts = [optax.clip_by_global_norm(ac.grad_clip)] if ac.grad_clip > 0 else []
  optimizer = optax.chain(*parts, optax.adamw(lr, b1=ac.b1, b2=ac.b2,
                                              weight_decay=ac.weight_decay))
  reweight, coef, rw_steps = ac.reweight, float(ac.reweight_coef), int(ac.reweight_steps)

  def loss_fn(trainable, frozen, batch, rng, step):
    x0 = batch['image']
    noised = process.draw(rng, x0)
    keep = keep_of(noised)  # (B, K)
    eps, v = models.predict_eps(model, merge(trainable, frozen), noised.x_t, noised.network_time,
                                batch_labels(model, batch), gates=gating.ExampleMask(keep),
                                train=True, rngs={'dropout': jax.random.fold_in(rng, 2)})
    mse, vb = process.loss_terms(x0, noised, eps, v)
    lam = ase_lambda(noised.gate_time, step, reweight, coef, rw_steps)
    per_example = lam * mse if vb is None else lam * mse + vb
    metrics = {'mse': mse.mean(), 'lambda_mean': lam.mean(),
               'kept_fraction': keep.astype(jnp.float32).mean()}
    if vb is not None:
      metrics['vb'] = vb.mean()
    return jnp.mean(per_example), metrics

  timesteps = sampler_timesteps(config)
  masks = policy.step_masks(timesteps, T, K)
  ratio = policies.executed_block_ratio(masks)
  flops = cost.model_cost(model).flop_fraction(masks)

  def host_scalars(state):
    return {'learning_rate': float(lr(int(state['step']))), 'executed_ratio': ratio,
            'flop_fraction': flops}

  def finish(state, workdir):
    ema = jax.device_get(state['ema_params'])
    schedule_meta = {'name': policy.name, 'matrix': policy.matrix.astype(int).tolist()}
    path = checkpoints.export_backbone(
        workdir, 'ase_finetune', int(state['step']), merge(ema, frozen), config,
        files.join(workdir, CHECKPOINT_DIR, 'ase_finetune'), source='lees_jax ase_finetune', ema_decay=float(ac.ema_decay),
        base_backbone=backbone_dir, ase_schedule=schedule_meta)
    if jax.process_index() != 0:
      return
    summary = {
        'format': 'lees_jax.ase_schedule', 'version': 1, **policy.to_dict(),
        'spec': str(ac.schedule), 'units': unit_names, 'num_timesteps': T,
        'diffusion': process.describe(),
        'executed_block_ratio': ratio, 'flop_fraction': flops,
        'sampler': {'name': config.sampler.name, 'steps': len(timesteps),
                    'timesteps': list(timesteps)},
        'backbone': path, 'base_backbone': backbone_dir, 'step': int(state['step']),
        'seed': int(config.seed), 'config': config.to_dict(),
    }
    files.write_json(files.join(workdir, ASE_SCHEDULE_FILE), summary)
    print(f'ase_finetune: schedule {policy.name} executes {ratio:.3f} of the blocks '
          f'({flops:.3f} of the FLOPs) on the {len(timesteps)}-step sampler; wrote '
          f'{files.join(workdir, ASE_SCHEDULE_FILE)}', flush=True)

  n_train = models.count_params(trainable)
  return Objective(
      name='ase_finetune', section=ac, num_train_steps=n_steps,
      init_trainable=lambda rng: trainable, initial_trainable=trainable, frozen=frozen,
      loss_fn=loss_fn, loss_takes_step=True, optimizer=optimizer,
      ema_decay=float(ac.ema_decay), random_flip=bool(config.data.random_flip),
      host_scalars=host_scalars, finish=finish,
      describe=f'ASE fine-tuning under schedule {policy.name} (executed blocks {ratio:.3f}): '
               f'{n_train:,} trainable parameters'
               + (' (time embedding frozen)' if freeze else '')
               + f', AdamW lr {ac.learning_rate} ({ac.lr_schedule}), wd {ac.weight_decay}, '
               f'EMA {ac.ema_decay}, lambda(t) {reweight}'
               + (f' (1 + {coef} t for {rw_steps} steps)' if reweight == 'paper' else '')
               + (', loss lambda(t) eps-MSE + vb (learned variance)'
                  if model.output == 'eps_variance' else '')
               + f', {process.describe()}, backbone {backbone_dir}')


def load_ase_finetuned(workdir: str, expected_model_config=None
                       ) -> tuple[Pytree, policies.SchedulePolicy]:
  """(EMA params, schedule) of a finished ``ase_finetune`` run.

  ``workdir`` is the run's workdir or its ``backbone`` directory; the schedule is read from
  the backbone's metadata (``ase_schedule``), so the pair always travels together.
  ``expected_model_config`` (a config.model or a model's spec, e.g. `models.UNetSpec`) is
  checked, training settings (dropout) aside.
  """
  try:
    meta = checkpoints.read_backbone_meta(workdir)
  except checkpoints.BackboneError as e:
    raise FileNotFoundError(f'no ASE fine-tuned backbone at {workdir!r}: expected the backbone/ '
                            'that a finished `--config.mode=ase_finetune` run writes into its '
                            f'workdir ({e})') from e
  if 'ase_schedule' not in meta:
    raise ValueError(f'the backbone at {checkpoints.find_backbone_dir(workdir)} has no ASE schedule '
                     '(ase_schedule in backbone.json): it was not written by ase_finetune')
  want = expected_model_config
  is_spec = dataclasses.is_dataclass(want)  # a model's spec (any family), not a config.model
  with checkpoints.quiet():
    model_config, params = checkpoints.load_backbone_params(
        workdir, None if is_spec or want is None else want)
  if is_spec:
    fam = models.backbone.family(model_config.name)
    have = fam.spec_from_config(model_config)
    differs = type(have) is not type(want) or any(
        getattr(have, f.name) != getattr(want, f.name) for f in dataclasses.fields(want)
        if f.name not in fam.training_fields)
    if differs:
      raise checkpoints.BackboneError(
          f'the ASE fine-tuned backbone at {workdir} ({have}) does not match the model ({want})')
  sched = meta['ase_schedule']
  return params, policies.SchedulePolicy(np.asarray(sched['matrix'], bool), name=sched['name'])

