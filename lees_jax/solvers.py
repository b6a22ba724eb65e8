"""Solvers: the update rule of one reverse step, with its per-step coefficients in float64.

Respaced DDPM (improved-diffusion's ancestral sampler with a fixed or a learned variance), eta-DDIM
and DPM-Solver++(2M). A `Solver` knows nothing of the network: it maps (step i, state, eps[, v],
key) to the next state. `lees_jax.samplers` compiles a solver and a gate policy into a program.

Time runs from noise to data: sampler step i = 0 is the noisiest timestep.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import diffusion

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++')
# The DDPM sampler's per-step variance (the names of improved-diffusion and diffusers):
# 'fixed_large' = the (respaced) beta_t, 'fixed_small' = the posterior variance beta~_t,
# 'learned_range' = the backbone's interpolation between the two in log space (needs a backbone
# with output 'eps_variance', e.g. DiT with learn_sigma).
VARIANCES = ('fixed_large', 'fixed_small', 'learned_range')


# ---------------------------------------------------------------------------
# Solvers: per-step coefficients (numpy, float64) and the update rule.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Solver:
  """A discretised reverse process over ``timesteps`` (sampling order, noisiest first)."""
  name: str
  timesteps: np.ndarray          # (S,) original timesteps, descending
  num_original_timesteps: int
  coefs: dict[str, np.ndarray]   # per-step float64 arrays of length S
  clip_x0: bool = True
  variance: str | None = None    # ddpm: one of VARIANCES; None for the others
  # The network's time input per step (S,), for a continuous-time solver (`lees_jax.sde`);
  # None: the integer ``timesteps`` themselves.
  model_times: np.ndarray | None = None

  def describe(self) -> str:
    """One line saying what this solver does, e.g. 'ddpm, 50 steps, variance fixed_large'."""
    parts = [self.name, f'{self.num_steps} steps']
    if self.variance is not None:
      parts.append(f'variance {self.variance}')
    if not self.clip_x0:
      parts.append('x0 not clipped')
    return ', '.join(parts)

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])

  def timestep_values(self) -> list[int] | list[float]:
    """``timesteps`` as results record them: integers for a discrete solver; for a continuous-
    time one (``model_times`` set) the real-valued T t - 1 its gates read (`lees_jax.sde`),
    which an integer would round to another time."""
    if self.model_times is None:
      return [int(t) for t in self.timesteps]
    return [float(t) for t in self.timesteps]

  def init_state(self, x):
    if self.name == 'dpm_solver++':
      return (x, jnp.zeros_like(x))
    return (x,)

  def x0_from_eps(self, i, x, eps):
    c = self._at(i)
    x0 = c['sqrt_recip_ab'] * x - c['sqrt_recipm1_ab'] * eps
    return jnp.clip(x0, -1.0, 1.0) if self.clip_x0 else x0

  def _at(self, i):
    return {k: jnp.asarray(v, jnp.float32)[i] for k, v in self.coefs.items()}

  def starting_at(self, step: int) -> 'Solver':
    """This solver for a run that begins at sampler step ``step`` (a partial program).

    A multistep solver has no history at its first step: DPM-Solver++(2M) then takes a first-
    order step, as it does at step 0 (its history state starts at zero, and a second-order
    coefficient would blend that zero in). One-step solvers are returned unchanged.
    """
    if not 0 <= step < self.num_steps:
      raise ValueError(f'start step {step} is not a step of this {self.num_steps}-step sampler')
    if self.name != 'dpm_solver++' or self.coefs['half_r_inv'][step] == 0.0:
      return self
    coefs = dict(self.coefs, half_r_inv=self.coefs['half_r_inv'].copy())
    coefs['half_r_inv'][step] = 0.0
    return dataclasses.replace(self, coefs=coefs)

  def start_steps(self) -> np.ndarray:
    """The steps a partial run may start at (`starting_at`): every step of these solvers."""
    return np.arange(self.num_steps)

  @property
  def needs_variance(self) -> bool:
    """Whether `update` reads the backbone's variance output v (DDPM 'learned_range')."""
    return self.variance == 'learned_range'

  def update(self, i, state, eps, key, v=None):
    """One reverse step from sampler step i to i + 1 (the last step returns x0).

    ``v`` (the backbone's variance interpolation, `models.backbone.predict_eps`) is read by a
    'learned_range' DDPM only; every other solver ignores it.
    """
    x = state[0]
    c = self._at(i)
    x0 = self.x0_from_eps(i, x, eps)
    if self.name == 'ddpm':
      mean = c['coef_x0'] * x0 + c['coef_xt'] * x
      noise = jax.random.normal(key, x.shape, x.dtype)
      if self.needs_variance:
        if v is None:
          raise ValueError("the 'learned_range' variance needs the backbone's v output")
        log_var = diffusion.learned_range_log_variance(v, c['log_beta'],
                                                       c['log_posterior_variance'])
        return (mean + c['noise_on'] * jnp.exp(0.5 * log_var) * noise,)
      return (mean + c['sigma'] * noise,)
    if self.name == 'ddim':
      # eps consistent with the (possibly clipped) x0, as DDIM implementations do.
      eps_hat = (c['sqrt_recip_ab'] * x - x0) / c['sqrt_recipm1_ab']
      noise = jax.random.normal(key, x.shape, x.dtype)
      return (c['sqrt_ab_next'] * x0 + c['dir_coef'] * eps_hat + c['sigma'] * noise,)
    # DPM-Solver++(2M): data-prediction multistep; first step first order, last step -> x0.
    d_prev = state[1]
    r_inv = c['half_r_inv']  # 1 / (2 r), 0 where first order
    d = (1.0 + r_inv) * x0 - r_inv * d_prev
    x_next = c['sigma_ratio'] * x + c['alpha_expm1'] * d
    return (x_next, x0)


def _solver_timesteps(schedule: diffusion.Schedule, name: str, steps: int, spacing: str) -> np.ndarray:
  if not spacing:
    spacing = f'ddim{steps}' if name == 'ddim' else str(steps)
  kept = diffusion.space_timesteps(schedule.num_steps, spacing)
  if len(kept) != steps:
    raise ValueError(f'spacing {spacing!r} gives {len(kept)} steps but sampler.steps={steps}')
  return np.asarray(kept)


def make_solver(schedule: diffusion.Schedule, name: str = 'ddpm', steps: int = 50,
                spacing: str = '', eta: float = 0.0, clip_x0: bool = True,
                variance: str = 'fixed_large') -> Solver:
  """Builds the per-step coefficients of a sampler over ``steps`` respaced timesteps.

  ddpm: improved-diffusion's respaced ancestral sampler with ``variance`` "fixed_large"
  (the respaced beta_t, the default and the paper's), "fixed_small" (the respaced posterior
  variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)) or "learned_range" (per element
  exp(f log beta_t + (1 - f) log beta~_t) with f = (v + 1) / 2 from the backbone, beta~ clipped
  at t = 0 to its value at the next step as improved-diffusion does, both on the respaced
  schedule); no noise on the last step.
  ddim: eta-DDIM. dpm_solver++: 2M multistep in data prediction, log-SNR steps between the kept
  timesteps. ``variance`` is ignored by ddim and dpm_solver++.
  """
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; choose one of {SAMPLERS}')
  if name == 'ddpm' and variance not in VARIANCES:
    raise ValueError(f'unknown DDPM variance {variance!r}; choose one of {VARIANCES}')
  kept = _solver_timesteps(schedule, name, steps, spacing)
  abar_full = schedule.alphas_cumprod
  ab = abar_full[kept]                        # ascending in time
  coefs: dict[str, np.ndarray] = {'sqrt_recip_ab': np.sqrt(1.0 / ab),
                                  'sqrt_recipm1_ab': np.sqrt(1.0 / ab - 1.0)}
  if name == 'ddpm':
    rs = diffusion.respace(schedule, kept)
    betas = rs.betas
    ab_prev = rs.alphas_cumprod_prev
    post_var = rs.posterior_variance
    coefs['coef_x0'] = betas * np.sqrt(ab_prev) / (1.0 - ab)
    coefs['coef_xt'] = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
    if variance == 'learned_range':
      # The two ends of the range in log space; beta~ is 0 at t = 0, so improved-diffusion's
      # "clipped" log takes its value at the next kept step there (that step adds no noise).
      coefs['log_beta'] = np.log(betas)
      coefs['log_posterior_variance'] = rs.posterior_log_variance_clipped
      coefs['noise_on'] = (np.arange(len(betas)) > 0).astype(np.float64)  # none at t = 0
    else:
      if variance == 'fixed_small':
        var = post_var.copy()
      else:
        var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas.copy()
      sigma = np.sqrt(var)
      sigma[0] = 0.0  # no noise on the final step to t = 0
      coefs['sigma'] = sigma
  elif name == 'ddim':
    ab_next = np.append(1.0, ab[:-1])        # the step after t_j is t_{j-1}; x0 after the last
    sigma = eta * np.sqrt((1.0 - ab_next) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_next)
    coefs['sqrt_ab_next'] = np.sqrt(ab_next)
    coefs['dir_coef'] = np.sqrt(np.maximum(1.0 - ab_next - sigma ** 2, 0.0))
    coefs['sigma'] = sigma
  else:
    alpha, sig = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sig)
    # In sampling order (descending time) step j goes from kept[j] to kept[j-1].
    lam_next = np.append(np.inf, lam[:-1])
    h = lam_next - lam
    alpha_next = np.append(1.0, alpha[:-1])
    sig_next = np.append(0.0, sig[:-1])
    with np.errstate(over='ignore', invalid='ignore'):
      coefs['sigma_ratio'] = np.where(np.isinf(h), 0.0, sig_next / sig)
      coefs['alpha_expm1'] = np.where(np.isinf(h), 1.0, -alpha_next * np.expm1(-h))
    # Second-order correction uses the previous (noisier) step: h_prev = lam - lam_prev.
    lam_prev = np.append(lam[1:], np.nan)
    h_prev = lam - lam_prev
    with np.errstate(divide='ignore', invalid='ignore'):
      half_r_inv = np.where(np.isfinite(h) & np.isfinite(h_prev), h / (2.0 * h_prev), 0.0)
    half_r_inv[-1] = 0.0  # the noisiest step has no history: first order
    coefs['half_r_inv'] = half_r_inv
  order = slice(None, None, -1)  # to sampling order (noisiest first)
  return Solver(name, kept[order].copy(), schedule.num_original_timesteps,
                {k: v[order].copy() for k, v in coefs.items()}, clip_x0,
                variance if name == 'ddpm' else None)


def solver_from_config(diffusion_config, sampler_config) -> Solver:
  """The solver of ``config.sampler`` for the process of ``config.diffusion``
  (`lees_jax.processes`): a DDPM sampler of this module (``variance`` defaults to 'fixed_large'
  when the config has no such field; ``solver.variance`` / ``solver.describe()`` say which it
  uses), or for the VP SDE 'euler_maruyama' / 'dpm_solver' (`lees_jax.sde`). A sampler of the
  other process is refused with what to choose."""
  from lees_jax import processes  # pylint: disable=g-import-not-at-top  (it imports this module)
  return processes.from_config(diffusion_config).solver(sampler_config)


def start_step(solver: Solver, t_start: float) -> int:
  """The sampler step a partial run starts at: the first (noisiest) step whose original
  timestep is <= ``t_start * T``, i.e. the largest kept timestep not above that level, among
  the steps a run can start at (`Solver.start_steps`: a DPM-Solver step's start, not its
  intermediate evaluations; every step of the other solvers).

  ``t_start`` in [0, 1]; 1 gives step 0 (denoising from almost pure noise), 0 the last step
  (timestep 0). Every spacing keeps timestep 0, so a step always exists.
  """
  if not 0.0 <= t_start <= 1.0:
    raise ValueError(f't_start must be in [0, 1], got {t_start}')
  starts = solver.start_steps()
  below = starts[solver.timesteps[starts] <= t_start * solver.num_original_timesteps]
  if below.size == 0:
    raise ValueError(f'no timestep of {solver.describe()} (smallest {solver.timesteps.min()}) is '
                     f'<= {t_start} * {solver.num_original_timesteps}')
  return int(below[0])


def noise_to_step(schedule: diffusion.Schedule, solver: Solver, x0, step: int, noise) -> jax.Array:
  """x0 noised to sampler step ``step``: q(x_t | x0) at the solver's original timestep t of
  that step (`diffusion.q_sample` on the un-respaced ``schedule`` of the solver)."""
  if schedule.num_steps != solver.num_original_timesteps:
    raise ValueError(f'the schedule has {schedule.num_steps} timesteps but the solver was built '
                     f'on {solver.num_original_timesteps}')
  x0 = jnp.asarray(x0, jnp.float32)
  t = jnp.full((x0.shape[0],), int(solver.timesteps[step]), jnp.int32)
  return diffusion.q_sample(schedule, x0, t, jnp.asarray(noise, jnp.float32))
