"""Learning-to-Cache (Ma, Fang, Mi & Wang, NeurIPS 2024): a per-step, per-unit reuse router
trained on the frozen backbone (``config.mode=train_l2c``, ``config.l2c``).

Parameters: beta (S, K), one router logit per step i of the configured sampler (sampling
order, noisiest first) and gateable unit k; r = sigmoid(beta). At sampling unit k reuses its
residual at step i > 0 when r[i, k] < threshold (`learned_reuse.L2CPolicy`; step 0 runs all).

Objective (the paper's layer interpolation, its Eq. 6-7, and loss, Eq. 8-9, read for our
units): for a batch x0, draw per example a step i ~ U{1..S-1} and eps ~ N(0, I); with the
sampler's timesteps s = t_{i-1} > m = t_i,
    x_s = q_sample(x0, s, eps),   x_m = q_sample(x0, m, eps)
(one shared eps: x_m is then exactly the DDIM step from x_s with the true noise, the point of
the sampler's trajectory L2C's "previous step" stands for). The frozen model at (x_s, s) gives
each unit's residual c_k = f_k(x) - skip_k(x) there ("cached"); at (x_m, m) each unit returns
    skip_k(h) + w[i, k] (f_k(h) - skip_k(h)) + (1 - w[i, k]) c_k
      = w fresh + (1 - w) (skip + cached residual)
and the loss is
    L(beta) = E || eps_theta^beta(x_m, m) - eps_theta(x_m, m) ||^2 + lam * E_i mean_k r[i, k],
the full model's own output the target (stop-gradient), beta the only trained parameters
(Adam). ``form`` (``config.l2c.form``): 'soft' -- w = r, the paper's differentiable
interpolation; 'hard' -- straight-through: forward w = [r >= threshold] (the sampling
decision), backward dr/dbeta (so d out / d beta = r (1 - r) (fresh residual - cached)).
Requires the discrete DDPM process (the sampler's integer timesteps and q_sample).

The run ends by writing ``<workdir>/routers.json`` (`learned_reuse.ROUTERS_FILE`): beta, the
threshold, the sampler's timesteps, the actions at the threshold and their FLOP fraction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lees_jax import cost, diffusion, files, learned_reuse, models, processes
from lees_jax import gates as gating
from lees_jax.objectives.base import (Objective, Pytree, backbone_params, batch_labels, num_steps,
                                      sampler_timesteps)

FORMS = ('soft', 'hard')


def ddpm_schedule(process, what: str) -> diffusion.Schedule:
  """The DDPM process's schedule (q_sample at a chosen integer timestep), or a clear refusal."""
  schedule = getattr(process, 'schedule', None)
  if not isinstance(schedule, diffusion.Schedule):
    raise ValueError(f'{what} draws the previous sampler step at an integer timestep with '
                     "q_sample: it needs config.diffusion.process='ddpm', got "
                     f'{process.describe()}')
  return schedule


def router_weights(beta, threshold: float, form: str):
  """w of the blend: r = sigmoid(beta) ('soft'), or [r >= threshold] forward with dr/dbeta
  backward ('hard', straight-through)."""
  r = jax.nn.sigmoid(beta)
  if form == 'soft':
    return r
  return (r >= threshold).astype(r.dtype) + r - jax.lax.stop_gradient(r)


def l2c_loss_fn(model, schedule: diffusion.Schedule, timesteps, lam: float, form: str,
                threshold: float):
  """The loss above; ``timesteps`` the sampler's, in sampling order (descending)."""
  if form not in FORMS:
    raise ValueError(f'config.l2c.form must be one of {FORMS}, got {form!r}')
  steps = jnp.asarray(np.asarray(timesteps), jnp.int32)
  if steps.shape[0] < 2:
    raise ValueError('Learning-to-Cache needs a sampler of at least 2 steps (step 0 always runs)')

  def loss_fn(routers, backbone, batch, rng):
    x0 = batch['image']
    y = batch_labels(model, batch)
    k_i, k_n = jax.random.split(rng)
    i = jax.random.randint(k_i, (x0.shape[0],), 1, steps.shape[0])
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    t_prev, t_cur = steps[i - 1], steps[i]
    x_prev = diffusion.q_sample(schedule, x0, t_prev, noise)
    x_cur = diffusion.q_sample(schedule, x0, t_cur, noise)
    cached = jax.lax.stop_gradient(learned_reuse.unit_residuals(model, backbone, x_prev, t_prev, y))
    target, _ = models.predict_eps(model, backbone, x_cur, t_cur, y)
    beta = routers['beta'][i]  # (B, K)
    w = router_weights(beta, threshold, form)
    form_ = gating.CacheBlend(w, cached, reuse_weight=jnp.ones_like(w))
    eps, _ = models.predict_eps(model, backbone, x_cur, t_cur, y, gates=form_)
    mse = jnp.mean(jnp.square(eps - jax.lax.stop_gradient(target)))
    r = jax.nn.sigmoid(beta)
    loss = mse + lam * r.mean()
    return loss, {'mse': mse, 'router_mean': r.mean(),
                  'reuse_fraction': (r < threshold).astype(jnp.float32).mean()}

  return loss_fn


def init_routers(num_steps_: int, num_units: int, init_beta: float) -> dict:
  return {'beta': jnp.full((num_steps_, num_units), init_beta, jnp.float32)}


def l2c_objective(config, backbone: Pytree | None = None) -> Objective:
  """Learning-to-Cache's routers on a frozen backbone (its EMA params); Adam on beta only."""
  lc = config.l2c
  if lc.form not in FORMS:
    raise ValueError(f'config.l2c.form must be one of {FORMS}, got {lc.form!r}')
  model = models.build_model(config.model)
  process = processes.for_model(config.diffusion, model)
  schedule = ddpm_schedule(process, 'Learning-to-Cache')
  backbone, backbone_dir = backbone_params(config, backbone)
  timesteps = [int(t) for t in sorted(sampler_timesteps(config), reverse=True)]  # sampling order
  unit_names = [u.name for u in model.units]
  K, S = len(unit_names), len(timesteps)
  T = process.gate_timesteps
  threshold = float(lc.threshold)
  model_cost = cost.model_cost(model)

  def policy_of(params):
    return learned_reuse.L2CPolicy(np.asarray(jax.device_get(params)['beta']), threshold,
                                   tuple(timesteps))

  def host_scalars(state):
    actions = policy_of(state['params']).step_actions(timesteps, T, K)
    return {'reused_ratio': float((actions == gating.REUSE_RESIDUAL).mean()),
            'executed_ratio': float((actions == gating.RUN).mean()),
            'flop_fraction': model_cost.flop_fraction_of_actions(actions)}

  def finish(state, workdir):
    if jax.process_index() != 0:
      return
    policy = policy_of(state['params'])
    actions = policy.step_actions(timesteps, T, K)
    summary = {
        'format': 'lees_jax.l2c', 'version': 1, **policy.to_dict(),
        'units': unit_names, 'lam': float(lc.lam), 'form': lc.form,
        'init_beta': float(lc.init_beta),
        'step': int(state['step']), 'seed': int(config.seed),
        'actions': np.asarray(actions, int).tolist(),
        'reused_ratio': float((actions == gating.REUSE_RESIDUAL).mean()),
        'flop_fraction': model_cost.flop_fraction_of_actions(actions),
        'sampler': {'name': config.sampler.name, 'steps': S, 'timesteps': timesteps},
        'num_timesteps': T, 'diffusion': process.describe(), 'backbone': backbone_dir,
        'config': config.to_dict()}
    path = files.join(workdir, learned_reuse.ROUTERS_FILE)
    files.write_json(path, summary)
    print(f'l2c: {summary["reused_ratio"]:.3f} of (step, unit) pairs reuse their residual, FLOP '
          f'fraction {summary["flop_fraction"]:.3f} on the {S}-step sampler; wrote {path}',
          flush=True)

  return Objective(
      name='train_l2c', section=lc, num_train_steps=num_steps(lc, config.data),
      init_trainable=lambda rng: init_routers(S, K, float(lc.init_beta)), frozen=backbone,
      loss_fn=l2c_loss_fn(model, schedule, timesteps, float(lc.lam), lc.form, threshold),
      optimizer=optax.adam(lc.learning_rate, b1=lc.b1, b2=lc.b2), ema_decay=None,
      random_flip=False, host_scalars=host_scalars, finish=finish,
      describe=f'Learning-to-Cache routers: {S} steps x {K} units, lam={lc.lam}, {lc.form} blend, '
               f'threshold {threshold}, {process.describe()}, backbone {backbone_dir}')
