"""Backbone pretraining: eps-prediction on the whole network, on the backbone's diffusion
process (`lees_jax.processes`: DDPM, Ho et al. 2020, or U-ViT's continuous VP SDE).

The loss is the process's (`processes.DiscreteDDPM.loss_terms`: `diffusion.hybrid_loss_terms`;
the VP SDE's: the eps-MSE at t ~ U(t_min, 1), U-ViT's ``LSimple``): the eps-MSE for an
epsilon-only backbone (output 'eps'); for a DDPM backbone with a learned variance (output
'eps_variance', DiT with learn_sigma)
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
from lees_jax import files
from lees_jax import models
from lees_jax import processes
from lees_jax.objectives.base import CHECKPOINT_DIR, Objective, batch_labels, num_steps


def pretrain_objective(config) -> Objective:
  """eps-prediction on the whole backbone (plus the vb term for a learned variance): Adam (AdamW
  when ``config.pretrain.weight_decay`` > 0, U-ViT's recipe), linear warm-up, clipping, EMA,
  dropout (and label dropout for a conditional backbone).
  Metrics: 'mse' and, for a learned variance, 'vb' (batch means; loss = mse + vb)."""
  pc = config.pretrain
  model = models.build_model(config.model)
  process = processes.for_model(config.diffusion, model)
  lr = optax.linear_schedule(0.0, pc.learning_rate, max(1, pc.warmup_steps)) \
      if pc.warmup_steps > 0 else optax.constant_schedule(pc.learning_rate)
  parts = [optax.clip_by_global_norm(pc.grad_clip)] if pc.grad_clip > 0 else []
  b1, b2, wd = pc.get('b1', 0.9), pc.get('b2', 0.999), float(pc.get('weight_decay', 0.0))
  optimizer = optax.chain(*parts, optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd) if wd > 0
                          else optax.adam(lr, b1=b1, b2=b2))

  def init_trainable(rng):
    return models.init_params(model, rng)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    x0 = batch['image']
    noised = process.draw(rng, x0)
    eps, v = models.predict_eps(model, params, noised.x_t, noised.network_time,
                                batch_labels(model, batch), train=True,
                                rngs={'dropout': jax.random.fold_in(rng, 2)})
    mse, vb = process.loss_terms(x0, noised, eps, v)
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
      describe=f'pretraining of a {config.model.name} on the '
               + ('hybrid loss eps-MSE + vb (learned variance)' if model.output == 'eps_variance'
                  else 'eps-MSE')
               + f' of the {process.describe()} (lr {pc.learning_rate}, '
               f'warm-up {pc.warmup_steps}, clip {pc.grad_clip}, EMA {pc.ema_decay}'
               + (f', AdamW weight decay {wd}' if wd > 0 else '') + ')')
