"""LEES gate training (the paper's method): only the 2K gate scalars (alpha_k, beta_k) are
trained, with Adam, on the eps-MSE of the gated frozen backbone plus lam * E_t[mean_k g_k(t)].

A class-conditional backbone (DiT) is called with the batch's labels as given (no label
dropout: the backbone is frozen and in eval mode). For a backbone with a learned variance
(output 'eps_variance') the loss is the eps-MSE only, the paper's loss: the variance head is
frozen with the rest of the backbone, and the gates are trained on what they change in epsilon
(no variational-bound term, unlike pretraining and ASE fine-tuning of such a backbone, which
train `diffusion.hybrid_loss_terms`).

The gates read the normalised time of each example's draw (`processes.NoisedBatch.gate_time`:
(t + 1) / T for the DDPM process, the continuous t for the VP SDE), the time the samplers' masks
read at each step, and the network its own time (DDPM: t; VP SDE: 999 t).

Which t the loss sees (``config.gates.timesteps``): 'uniform' (the paper's: every t of the
process) or 'sampler' (only the timesteps the configured solver visits, e.g. DDIM-10's
0, 100, ..., 900: gates trained for the solver that runs them; `training_times`).

Hard gates run unit k when g_k(t) > 0.5 with a straight-through gradient
(`gates.StraightThrough`); soft gates blend (`gates.SoftGates`). The run ends by writing
``<workdir>/gates.json``: the parameters, the hard masks on the configured sampler's own
timesteps, the executed-block ratio and FLOP fraction (read back by `policies.load_gates`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lees_jax import cost
from lees_jax import diffusion
from lees_jax import files
from lees_jax import gates as gating
from lees_jax import models
from lees_jax import policies
from lees_jax import processes
from lees_jax.objectives.base import (Objective, Pytree, backbone_params, batch_labels, num_steps,
                                      sampler_timesteps)

GATES_FILE = policies.GATES_FILE


REGULARIZERS = ('mean', 'flops')
TIMESTEP_DRAWS = ('uniform', 'sampler')


def training_times(config, process) -> np.ndarray | None:
  """The times the LEES loss draws t from: None for ``config.gates.timesteps='uniform'`` (or
  absent; the process's own draw over all t), else the configured solver's timesteps in the
  process's time (`processes.*.sampler_times`: integers for DDPM, continuous t for the VP SDE)."""
  how = config.gates.get('timesteps', 'uniform')
  if how not in TIMESTEP_DRAWS:
    raise ValueError(f'config.gates.timesteps must be one of {TIMESTEP_DRAWS}, got {how!r}')
  if how == 'uniform':
    return None
  return process.sampler_times(sampler_timesteps(config))


def gate_loss_fn(model, process, lam: float, hard: bool, regularizer: str = 'mean', times=None):
  """LEES loss: eps-MSE with gated units + lam * the compute term, averaged over the batch, on
  the draws of ``process`` (`lees_jax.processes`).

  The compute term (``config.gates.regularizer``):
    'mean'  -- mean_k g_k(t), the paper's E_t[g]: every unit costs the same, so LEES can lower
               its block ratio by dropping cheap low-resolution units;
    'flops' -- sum_k c_k g_k(t) / sum_k c_k with c_k the FLOPs skipping unit k saves
               (`cost.ModelCost.savings`): the term is the expected share of skippable FLOPs run.
  ``times``: t is drawn from these only (`training_times`); None: the process's own draw.
  """
  if regularizer not in REGULARIZERS:
    raise ValueError(f'config.gates.regularizer must be one of {REGULARIZERS}, got {regularizer!r}')
  savings = cost.model_cost(model).savings()
  flop_weights = jnp.asarray(savings / savings.sum(), jnp.float32)

  def loss_fn(gate_params, backbone, batch, rng):
    x0 = batch['image']
    noised = process.draw(rng, x0) if times is None else process.draw(rng, x0, times)
    logits = policies.gate_logits(gate_params, noised.gate_time)  # (B, K)
    form = gating.StraightThrough(logits) if hard else gating.SoftGates(logits)
    eps, _ = models.predict_eps(model, backbone, noised.x_t, noised.network_time,
                                batch_labels(model, batch), gates=form)
    mse = diffusion.eps_mse(eps, noised.noise).mean()
    gate_mean = jax.nn.sigmoid(logits).mean()
    if regularizer == 'mean':
      term = gate_mean
    else:
      term = (jax.nn.sigmoid(logits) @ flop_weights).mean()
    loss = mse + lam * term
    return loss, {'mse': mse, 'gate_mean': gate_mean, 'reg': lam * term,
                  'hard_gate_mean': (logits > 0).astype(jnp.float32).mean()}

  return loss_fn


def gates_objective(config, backbone: Pytree | None = None) -> Objective:
  """LEES: alpha, beta per unit on a frozen backbone (its EMA params); Adam on the gates only.

  The backbone is read from ``config.backbone`` unless ``backbone`` params are given
  (benchmarks, tests).
  """
  gc = config.gates
  if gc.form not in ('hard', 'soft'):
    raise ValueError(f"config.gates.form must be 'hard' or 'soft', got {gc.form!r}")
  if gc.init not in policies.GATE_STARTS:
    raise ValueError(f'config.gates.init must be one of {policies.GATE_STARTS}, got {gc.init!r}')
  if gc.regularizer not in REGULARIZERS:
    raise ValueError(f'config.gates.regularizer must be one of {REGULARIZERS}, got '
                     f'{gc.regularizer!r}')
  model = models.build_model(config.model)
  process = processes.for_model(config.diffusion, model)
  backbone, backbone_dir = backbone_params(config, backbone)
  unit_names = [u.name for u in model.units]
  K = len(unit_names)
  T = process.gate_timesteps
  timesteps = sampler_timesteps(config)
  times = training_times(config, process)
  model_cost = cost.model_cost(model)
  optimizer = optax.adam(gc.learning_rate, b1=gc.b1, b2=gc.b2)

  def hard_stats(params):
    policy = policies.LeesPolicy.from_params(jax.device_get(params), form='hard')
    masks = policy.step_masks(timesteps, T, K)
    return policy, masks, policies.executed_block_ratio(masks), model_cost.flop_fraction(masks)

  def host_scalars(state):
    params = jax.device_get(state['params'])
    _, _, ratio, flops = hard_stats(params)
    out = {'executed_ratio': ratio, 'flop_fraction': flops}
    for k, name in enumerate(unit_names):
      out[f'alpha/{k:02d}_{name}'] = float(params['alpha'][k])
      out[f'beta/{k:02d}_{name}'] = float(params['beta'][k])
    return out

  def images(state):
    if jax.process_index() != 0:
      return {}
    from lees_jax import report  # pylint: disable=g-import-not-at-top
    params = jax.device_get(state['params'])
    img = report.gate_heatmap(policies.LeesPolicy.from_params(params, form=gc.form), unit_names,
                              num_timesteps=T, timesteps=timesteps,
                              title=f'LEES gates, step {int(state["step"])} '
                                    f'(lam={gc.lam}, {gc.form}; dots: executed at sampler steps)')
    return {'gates/heatmap': img}

  def finish(state, workdir):
    if jax.process_index() != 0:
      return
    params = jax.device_get(state['params'])
    policy, masks, ratio, flops = hard_stats(params)
    summary = {
        'format': 'lees_jax.gates', 'version': 1,
        'alpha': [float(a) for a in np.asarray(params['alpha'])],
        'beta': [float(b) for b in np.asarray(params['beta'])],
        'units': unit_names, 'lam': float(gc.lam), 'form': gc.form, 'init': gc.init,
        'regularizer': gc.regularizer, 'timesteps': gc.get('timesteps', 'uniform'),
        'step': int(state['step']), 'seed': int(config.seed),
        'executed_block_ratio': ratio, 'flop_fraction': flops,
        'sampler': {'name': config.sampler.name, 'steps': len(timesteps),
                    'timesteps': list(timesteps)},
        'num_timesteps': T, 'diffusion': process.describe(), 'backbone': backbone_dir,
        'hard_masks': np.asarray(masks, int).tolist(),
        'policy': policies.LeesPolicy.from_params(params, form=gc.form).to_dict(),
        'config': config.to_dict(),
    }
    del policy
    files.write_json(files.join(workdir, GATES_FILE), summary)
    print(f'gates: executed-block ratio {ratio:.3f}, FLOP fraction {flops:.3f} on the '
          f'{len(timesteps)}-step sampler; wrote {files.join(workdir, GATES_FILE)}', flush=True)

  return Objective(
      name='train_gates', section=gc, num_train_steps=num_steps(gc, config.data),
      init_trainable=lambda rng: policies.init_gate_params(K, gc.init), frozen=backbone,
      loss_fn=gate_loss_fn(model, process, float(gc.lam), gc.form == 'hard', gc.regularizer,
                           times),
      optimizer=optimizer, ema_decay=None, random_flip=False,  # paper: no augmentation
      host_scalars=host_scalars, images=images, image_every=int(gc.get('heatmap_every', 0)),
      finish=finish,
      describe=f'LEES gate training: {K} units, lam={gc.lam} ({gc.regularizer} compute term), '
               f'{gc.form} gates, {gc.init} start, {process.describe()}'
               + ('' if times is None else f', t drawn from the {len(times)} timesteps of '
                                           f'{config.sampler.name}-{len(timesteps)}')
               + f', backbone {backbone_dir}')

