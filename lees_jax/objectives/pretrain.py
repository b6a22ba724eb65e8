"""DDPM backbone pretraining (Ho et al. 2020): eps-prediction on the whole network.

The loss is `diffusion.hybrid_loss_terms`: the eps-MSE for an epsilon-only backbone (output
'eps'); for a backbone with a learned variance (output 'eps_variance', DiT with learn_sigma)
improved DDPM's hybrid loss, eps-MSE + the variational bound `diffusion.vb_terms_bpd` * T/1000,
as DiT's ``train.py`` trains it (``create_diffusion``: learn_sigma, LEARNED_RANGE, loss type MSE,
whose vb factor is 1 at T = 1000 as improved-diffusion's RESCALED_MSE T/1000 is). The vb sees eps
through a stop-gradient: epsilon is trained by the MSE, the variance v by the vb only.

A class-conditional backbone (DiT) is trained on the batch's labels, each replaced by the null
class with the backbone's own label-dropout probability (DiT: ``config.model.class_dropout_prob``,
drawn from the 'dropout' rng in train mode), so that it learns the unconditional prediction
classifier-free guidance needs.

Exports the EMA parameters to ``<workdir>/backbone`` (`lees_jax.checkpoints`).
"""

from __future__ import annotations

import jax
import optax

from lees_jax import checkpoints
from lees_jax import diffusion
from lees_jax import files
from lees_jax import models
from lees_jax.objectives.base import (CHECKPOINT_DIR, Objective, batch_labels,
                                      draw_t_noise, num_steps)


def pretrain_objective(config) -> Objective:
  """DDPM eps-prediction on the whole backbone (plus the vb term for a learned variance):
  Adam, linear warm-up, clipping, EMA, dropout (and label dropout for a conditional backbone).
  Metrics: 'mse' and, for a learned variance, 'vb' (batch means; loss = mse + vb)."""
  pc = config.pretrain
  model = models.build_model(config.model)
  schedule = diffusion.schedule_from_config(config.diffusion)
  T = schedule.num_steps
  lr = optax.linear_schedule(0.0, pc.learning_rate, max(1, pc.warmup_steps)) \
      if pc.warmup_steps > 0 else optax.constant_schedule(pc.learning_rate)
  parts = [optax.clip_by_global_norm(pc.grad_clip)] if pc.grad_clip > 0 else []
  optimizer = optax.chain(*parts, optax.adam(lr, b1=pc.get('b1', 0.9), b2=pc.get('b2', 0.999)))

  def init_trainable(rng):
    return models.init_params(model, rng)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    x0 = batch['image']
    t, noise = draw_t_noise(rng, x0, T)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    eps, v = models.predict_eps(model, params, x_t, t, batch_labels(model, batch), train=True,
                                rngs={'dropout': jax.random.fold_in(rng, 2)})
    mse, vb = diffusion.hybrid_loss_terms(schedule, x0, x_t, t, noise, eps, v)
    if vb is None:
      return mse.mean(), {'mse': mse.mean()}
    return (mse + vb).mean(), {'mse': mse.mean(), 'vb': vb.mean()}

  def host_scalars(state):
    return {'learning_rate': float(lr(int(state['step'])))}

  def finish(state, workdir):
    checkpoints.export_backbone(
        workdir, 'pretrain', int(state['step']), jax.device_get(state['ema_params']), config,
        files.join(workdir, CHECKPOINT_DIR, 'pretrain'), source='lees_jax pretrain',
        ema_decay=float(pc.ema_decay))

  return Objective(
      name='pretrain', section=pc, num_train_steps=num_steps(pc, config.data),
      init_trainable=init_trainable, frozen={}, loss_fn=loss_fn, optimizer=optimizer,
      ema_decay=float(pc.ema_decay), random_flip=bool(config.data.random_flip),
      host_scalars=host_scalars, finish=finish,
      describe=f'DDPM pretraining of a {config.model.name} on the '
               + ('hybrid loss eps-MSE + vb (learned variance)' if model.output == 'eps_variance'
                  else 'eps-MSE')
               + f' (lr {pc.learning_rate}, '
               f'warm-up {pc.warmup_steps}, clip {pc.grad_clip}, EMA {pc.ema_decay})')
