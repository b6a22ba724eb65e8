"""Three-choice LEES: per unit, run / reuse its residual / skip as functions of t, trained like
LEES (``config.mode=train_lees3``; LEES's ``config.gates`` plus ``config.lees3``).

Parameterisation (4K scalars): with the normalised time t = (timestep + 1) / T,
    run logit    u_k(t) = alpha_k t + beta_k    (the LEES gate g_k = sigmoid(u_k))
    reuse logit  v_k(t) = gamma_k t + delta_k   (among the units that do not run)
Hard decisions at 0: run if u > 0, else reuse if v > 0, else skip (`learned_reuse.Lees3Policy`;
a reuse before the unit has run at any step -- step 0 always -- becomes run).

Training forward (straight-through for 'hard': the 0/1 decisions forward, the sigmoids'
gradients backward; 'soft': the sigmoids), with G_run, G_reuse those weights,
    out_k = G_run fresh + (1 - G_run) (G_reuse (skip + c_k) + (1 - G_reuse) skip)
(`gates.CacheBlend`), c_k the unit's residual fresh - skip at the *previous sampler step*:
the frozen model at t_prev = min(t + gap, T - 1) on x_prev = q_sample(x0, t_prev, eps) with the
example's own eps (gap = the configured sampler's mean step spacing; at t = T - 1 the previous
step is the step itself, where reuse equals run, as the sampler's first-step rule has it).
The draw of (t, eps, x_t) is LEES's own (`processes`), and so is the loss:
    L = E || eps_theta^gates(x_t, t) - eps ||^2 + lam * E_t[cost_k(t)],
    cost_k(t) = g_run + rho (1 - g_run) g_reuse      (soft sigmoids, as LEES's E_t[g])
averaged over units ('mean') or FLOP-weighted ('flops', `lees_gates.REGULARIZERS`). What each
choice is charged: run 1; skip 0 (LEES's price of a skipped unit: its skip FLOPs are the
always-paid floor of the term); reuse rho = ``config.lees3.reuse_cost`` >= 0 (default 0: a
residual reuse executes exactly the skip's FLOPs, `cost.ModelCost.flops_for_actions`, so in
FLOPs it is priced like a skip and the choice between them is the MSE's; rho > 0 prices the
cache's memory traffic). With G_reuse = 0 (reuse logits negative) the forward is LEES's
arithmetic and the cost LEES's term.

The run writes ``<workdir>/lees3_gates.json`` (`learned_reuse.LEES3_FILE`): the parameters and
the actions on the configured sampler's timesteps with their FLOP fraction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lees_jax import cost, diffusion, files, learned_reuse, models, policies
from lees_jax import gates as gating
from lees_jax import processes
from lees_jax.objectives.base import (Objective, Pytree, backbone_params, batch_labels, num_steps,
                                      sampler_timesteps)
from lees_jax.objectives.learning_to_cache import ddpm_schedule
from lees_jax.objectives.lees_gates import REGULARIZERS


def previous_step_gap(timesteps) -> int:
  """The sampler's mean spacing between steps (>= 1): how far back "the previous step" is."""
  ts = sorted(int(t) for t in timesteps)
  return max(1, int(round((ts[-1] - ts[0]) / max(1, len(ts) - 1))))


def lees3_loss_fn(model, process, schedule: diffusion.Schedule, lam: float, hard: bool,
                  regularizer: str, reuse_cost: float, gap: int):
  if regularizer not in REGULARIZERS:
    raise ValueError(f'config.gates.regularizer must be one of {REGULARIZERS}, got {regularizer!r}')
  savings = cost.model_cost(model).savings()
  flop_weights = jnp.asarray(savings / savings.sum(), jnp.float32)
  T = schedule.num_steps
  weight = gating.straight_through if hard else jax.nn.sigmoid

  def loss_fn(params, backbone, batch, rng):
    x0 = batch['image']
    y = batch_labels(model, batch)
    noised = process.draw(rng, x0)  # LEES's draw: t, eps, x_t and the gates' time
    t_prev = jnp.minimum(noised.t + gap, T - 1)
    x_prev = diffusion.q_sample(schedule, x0, t_prev, noised.noise)
    cached = jax.lax.stop_gradient(learned_reuse.unit_residuals(model, backbone, x_prev, t_prev, y))
    run_logits = policies.gate_logits(params, noised.gate_time)  # (B, K)
    reuse_logits = learned_reuse.reuse_logits(params, noised.gate_time)
    form = gating.CacheBlend(weight(run_logits), cached, reuse_weight=weight(reuse_logits))
    eps, _ = models.predict_eps(model, backbone, noised.x_t, noised.network_time, y, gates=form)
    mse = diffusion.eps_mse(eps, noised.noise).mean()
    g_run, g_reuse = jax.nn.sigmoid(run_logits), jax.nn.sigmoid(reuse_logits)
    unit_cost = g_run + reuse_cost * (1 - g_run) * g_reuse
    term = unit_cost.mean() if regularizer == 'mean' else (unit_cost @ flop_weights).mean()
    hard_run = run_logits > 0
    return mse + lam * term, {
        'mse': mse, 'gate_mean': g_run.mean(), 'reg': lam * term,
        'hard_gate_mean': hard_run.astype(jnp.float32).mean(),
        'hard_reuse_mean': (~hard_run & (reuse_logits > 0)).astype(jnp.float32).mean()}

  return loss_fn


def lees3_objective(config, backbone: Pytree | None = None) -> Objective:
  """Three-choice LEES on a frozen backbone; Adam on (alpha, beta, gamma, delta) only."""
  gc, rc = config.gates, config.lees3
  if gc.form not in ('hard', 'soft'):
    raise ValueError(f"config.gates.form must be 'hard' or 'soft', got {gc.form!r}")
  if float(rc.reuse_cost) < 0:
    raise ValueError(f'config.lees3.reuse_cost must be >= 0, got {rc.reuse_cost}')
  model = models.build_model(config.model)
  process = processes.for_model(config.diffusion, model)
  schedule = ddpm_schedule(process, 'three-choice LEES')
  backbone, backbone_dir = backbone_params(config, backbone)
  unit_names = [u.name for u in model.units]
  K, T = len(unit_names), process.gate_timesteps
  timesteps = [int(t) for t in sorted(sampler_timesteps(config), reverse=True)]
  gap = previous_step_gap(timesteps)
  model_cost = cost.model_cost(model)

  def actions_of(params):
    return learned_reuse.Lees3Policy.from_params(params).step_actions(timesteps, T, K)

  def host_scalars(state):
    actions = actions_of(state['params'])
    return {'executed_ratio': float((actions == gating.RUN).mean()),
            'reused_ratio': float((actions == gating.REUSE_RESIDUAL).mean()),
            'flop_fraction': model_cost.flop_fraction_of_actions(actions)}

  def finish(state, workdir):
    if jax.process_index() != 0:
      return
    policy = learned_reuse.Lees3Policy.from_params(state['params'])
    actions = actions_of(state['params'])
    summary = {
        'format': 'lees_jax.lees3', 'version': 1, **policy.to_dict(), 'units': unit_names,
        'lam': float(gc.lam), 'form': gc.form, 'init': gc.init, 'regularizer': gc.regularizer,
        'reuse_cost': float(rc.reuse_cost), 'reuse_init': float(rc.reuse_init),
        'previous_step_gap': gap, 'step': int(state['step']), 'seed': int(config.seed),
        'actions': np.asarray(actions, int).tolist(),
        'executed_block_ratio': float((actions == gating.RUN).mean()),
        'reused_ratio': float((actions == gating.REUSE_RESIDUAL).mean()),
        'flop_fraction': model_cost.flop_fraction_of_actions(actions),
        'sampler': {'name': config.sampler.name, 'steps': len(timesteps), 'timesteps': timesteps},
        'num_timesteps': T, 'diffusion': process.describe(), 'backbone': backbone_dir,
        'config': config.to_dict()}
    path = files.join(workdir, learned_reuse.LEES3_FILE)
    files.write_json(path, summary)
    print(f'lees3: run {summary["executed_block_ratio"]:.3f}, reuse {summary["reused_ratio"]:.3f}, '
          f'FLOP fraction {summary["flop_fraction"]:.3f} on the {len(timesteps)}-step sampler; '
          f'wrote {path}', flush=True)

  return Objective(
      name='train_lees3', section=gc, num_train_steps=num_steps(gc, config.data),
      init_trainable=lambda rng: learned_reuse.init_lees3_params(K, gc.init, float(rc.reuse_init)),
      frozen=backbone,
      loss_fn=lees3_loss_fn(model, process, schedule, float(gc.lam), gc.form == 'hard',
                            gc.regularizer, float(rc.reuse_cost), gap),
      optimizer=optax.adam(gc.learning_rate, b1=gc.b1, b2=gc.b2), ema_decay=None,
      random_flip=False, host_scalars=host_scalars, finish=finish,
      describe=f'three-choice LEES: {K} units (run / reuse residual / skip), lam={gc.lam} '
               f'({gc.regularizer}), reuse cost {rc.reuse_cost}, previous step {gap} timesteps '
               f'back, {gc.form} gates, {process.describe()}, backbone {backbone_dir}')
