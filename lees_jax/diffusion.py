"""Diffusion math: beta schedules (DDPM's linear, improved DDPM's cosine), forward noising, respacing, the epsilon loss and improved
DDPM's hybrid loss (epsilon-MSE + the variational bound for a learned variance).

The single home of the DDPM formulas; samplers and training import them from here.
Schedules are computed in float64 with numpy (as the reference implementations
do) and handed to JAX as float32 constants.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp_special
import numpy as np


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02) -> np.ndarray:
  """The DDPM linear schedule (Ho et al. 2020: 1e-4 -> 0.02 over T = 1000)."""
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ValueError(f'need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}')
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete diffusion process q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I).

  ``timesteps[i]`` is the index of step i in the *original* T-step process (the
  identity for an un-respaced schedule); the network is always called with
  original timesteps, and gates use normalised time (timesteps + 1) / T_original
  (`lees_jax.policies.normalized_time`).
  """
  betas: np.ndarray
  timesteps: np.ndarray
  num_original_timesteps: int

  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return np.cumprod(1.0 - self.betas)

  @property
  def alphas_cumprod_prev(self) -> np.ndarray:
    return np.append(1.0, self.alphas_cumprod[:-1])

  @property
  def posterior_variance(self) -> np.ndarray:
    """beta_tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) ("fixed_small")."""
    return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

  @property
  def posterior_log_variance_clipped(self) -> np.ndarray:
    """log beta~_t with beta~_0 = 0 replaced by beta~_1 (improved-diffusion's "clipped" log);
    a one-step process has no beta~_1 and takes log beta_0."""
    post = self.posterior_variance
    return np.log(np.append(post[1], post[1:]) if self.num_steps > 1 else self.betas.copy())

  @property
  def posterior_mean_coefs(self) -> tuple[np.ndarray, np.ndarray]:
    """(c1, c2): the mean of q(x_{t-1} | x_t, x_0) is c1_t x_0 + c2_t x_t."""
    ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
    return (self.betas * np.sqrt(ab_prev) / (1.0 - ab),
            (1.0 - ab_prev) * np.sqrt(1.0 - self.betas) / (1.0 - ab))


COSINE_OFFSET = 0.008  # improved DDPM's s: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2)
COSINE_MAX_BETA = 0.999  # its clip, which keeps beta_T (where alpha_bar(1) = 0) below 1
BETA_SCHEDULES = ('linear', 'cosine')


def cosine_betas(num_timesteps: int = 1000, max_beta: float = COSINE_MAX_BETA) -> np.ndarray:
  """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17):
  beta_i = min(1 - abar((i + 1) / T) / abar(i / T), max_beta), i = 0..T-1, with
  abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2) (guided-diffusion ``betas_for_alpha_bar``)."""
  if num_timesteps < 1:
    raise ValueError(f'num_timesteps must be >= 1, got {num_timesteps}')
  t = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
  abar = np.cos((t + COSINE_OFFSET) / (1 + COSINE_OFFSET) * np.pi / 2) ** 2
  return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def make_schedule(num_timesteps: int = 1000, beta_schedule: str = 'linear',
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """The T-step process of ``beta_schedule``: 'linear' (beta_start -> beta_end) or 'cosine'
  (`cosine_betas`; beta_start and beta_end do not enter it)."""
  if beta_schedule == 'linear':
    betas = linear_betas(num_timesteps, beta_start, beta_end)
  elif beta_schedule == 'cosine':
    betas = cosine_betas(num_timesteps)
  else:
    raise ValueError(f'unsupported beta_schedule {beta_schedule!r}; choose one of '
                     f'{BETA_SCHEDULES}')
  return Schedule(betas, np.arange(num_timesteps), num_timesteps)


def schedule_from_config(diffusion_config) -> Schedule:
  """The schedule of ``config.diffusion`` (beta_start / beta_end are the linear schedule's
  only, and may be absent for the cosine one)."""
  return make_schedule(diffusion_config.num_timesteps, diffusion_config.beta_schedule,
                       diffusion_config.get('beta_start', 1e-4),
                       diffusion_config.get('beta_end', 0.02))


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
  """Which original timesteps a respaced sampler keeps (improved-diffusion's rule).

  ``section_counts`` is e.g. "50" (50 steps spread evenly, endpoints included),
  "10,15,20" (the process cut into equal sections, each with its own count), or
  "ddim50" (a fixed integer stride starting at 0, as DDIM's ``range(0, T, T // 50)``).
  """
  if isinstance(section_counts, str):
    if section_counts.startswith('ddim'):
      want = int(section_counts[len('ddim'):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == want:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f'cannot take exactly {want} steps with an integer stride from {num_timesteps}')
    section_counts = [int(x) for x in section_counts.split(',')]
  counts = [int(c) for c in section_counts]
  size_per, extra = divmod(num_timesteps, len(counts))
  kept: list[int] = []
  start = 0
  for i, count in enumerate(counts):
    size = size_per + (1 if i < extra else 0)
    if count > size:
      raise ValueError(f'cannot take {count} steps from a section of {size} timesteps')
    if count < 1:
      raise ValueError('each section needs at least one step')
    stride = 1.0 if count == 1 else (size - 1) / (count - 1)
    cur = 0.0
    for _ in range(count):
      kept.append(start + round(cur))
      cur += stride
    start += size
  return sorted(set(kept))


def respace(schedule: Schedule, use_timesteps: Sequence[int]) -> Schedule:
  """A shorter process over ``use_timesteps`` with betas recomputed from the kept abar.

  beta'_i = 1 - abar[t_i] / abar[t_{i-1}], so that q(x_t | x_0) is unchanged at
  every kept timestep.
  """
  use = np.asarray(sorted(set(int(t) for t in use_timesteps)))
  if use.size == 0 or use[0] < 0 or use[-1] >= schedule.num_steps:
    raise ValueError(f'respaced timesteps must lie in [0, {schedule.num_steps}), got {use_timesteps}')
  abar = schedule.alphas_cumprod[use]
  prev = np.append(1.0, abar[:-1])
  betas = 1.0 - abar / prev
  return Schedule(betas, schedule.timesteps[use], schedule.num_original_timesteps)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, for integer step indices t (batch,)."""
  abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[t]
  shape = (-1,) + (1,) * (x0.ndim - 1)
  return jnp.sqrt(abar).reshape(shape) * x0 + jnp.sqrt(1.0 - abar).reshape(shape) * noise


def eps_mse(eps_pred: jax.Array, noise: jax.Array) -> jax.Array:
  """Per-example mean squared error between predicted and true noise, shape (batch,)."""
  diff = (eps_pred.astype(jnp.float32) - noise.astype(jnp.float32)) ** 2
  return diff.reshape(diff.shape[0], -1).mean(axis=-1)


# ---------------------------------------------------------------------------
# Improved DDPM (Nichol & Dhariwal 2021): the learned-range variance and the hybrid loss.
# ---------------------------------------------------------------------------


def learned_range_log_variance(v, log_beta, log_posterior_variance):
  """Improved DDPM's learned range: log sigma^2 = f log beta_t + (1 - f) log beta~_t with
  f = (v + 1) / 2, per element (v = 1: beta_t, v = -1: beta~_t). The one copy of the formula:
  the 'learned_range' sampler (`lees_jax.solvers`) and `vb_terms_bpd` both call it."""
  frac = (v + 1.0) / 2.0
  return frac * log_beta + (1.0 - frac) * log_posterior_variance


def _expm1_minus_x(d):
  """e^d - 1 - d, by its Taylor series for |d| < 0.1 (where the direct form cancels in float32)."""
  series = d * d * (1 / 2 + d * (1 / 6 + d * (1 / 24 + d * (1 / 120 + d * (
      1 / 720 + d * (1 / 5040 + d / 40320))))))  # truncation < 1e-12 relative
  return jnp.where(jnp.abs(d) < 0.1, series, jnp.expm1(d) - d)


def normal_kl_from_gap(mean_diff, logvar_gap, logvar2):
  """KL(N(m1, e^lv1) || N(m2, e^lv2)) per element, in nats, from mean_diff = m1 - m2 and
  logvar_gap = lv1 - lv2: (e^gap - 1 - gap + mean_diff^2 e^-lv2) / 2. A caller that knows the
  differences more precisely than the two means or log-variances gives them here."""
  return 0.5 * (_expm1_minus_x(logvar_gap) + mean_diff ** 2 * jnp.exp(-logvar2))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (improved-diffusion's
  ``losses.normal_kl``: (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^-lv2) / 2)."""
  return normal_kl_from_gap(mean1 - mean2, logvar1 - logvar2, logvar2)


_LOG_FLOOR = float(np.log(1e-12))  # improved-diffusion clamps every probability at 1e-12


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(x) per element, in nats, of N(mean, e^(2 log_scale)) discretised to 256 bins of
  width 2/255 centred on x (data in [-1, 1]); the edge bins are open (x < -0.999: (-inf,
  x + 1/255], x > 0.999: [x - 1/255, inf)); each probability floored at 1e-12, as
  improved-diffusion's ``losses.discretized_gaussian_log_likelihood``. The normal CDF is the
  exact one (``ndtr``; improved-diffusion uses a tanh approximation), and a bin above the mean
  is measured by the survival function, so that a bin in either tail keeps its precision."""
  centered = x - mean
  inv_std = jnp.exp(-log_scale)
  plus_in = inv_std * (centered + 1.0 / 255.0)
  min_in = inv_std * (centered - 1.0 / 255.0)
  upper = min_in > 0  # the whole bin above the mean: 1 - cdf on both sides
  prob = jnp.where(upper, jsp_special.ndtr(-min_in) - jsp_special.ndtr(-plus_in),
                   jsp_special.ndtr(plus_in) - jsp_special.ndtr(min_in))
  log_mid = jnp.log(jnp.maximum(prob, 1e-12))
  log_probs = jnp.where(x < -0.999, jsp_special.log_ndtr(plus_in),
                        jnp.where(x > 0.999, jsp_special.log_ndtr(-min_in), log_mid))
  return jnp.maximum(log_probs, _LOG_FLOOR)


def _mean_flat(x):
  return x.reshape(x.shape[0], -1).mean(axis=-1)


def vb_terms_bpd(schedule: Schedule, x0, x_t, t, eps, v) -> jax.Array:
  """Per-example variational-bound term L_t in bits per dimension, shape (batch,).

  t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)), averaged over dimensions, / log 2;
  t = 0: -log p(x_0 | x_1) of the discretised Gaussian (`discretized_gaussian_log_likelihood`),
  averaged over dimensions, / log 2 (improved-diffusion's ``_vb_terms_bpd``).
  q: mean c1_t x_0 + c2_t x_t, log-variance ``posterior_log_variance_clipped``. p: mean c1_t
  x0_hat + c2_t x_t with x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps (not clipped),
  log-variance `learned_range_log_variance`(v). ``eps`` enters through
  ``jax.lax.stop_gradient``: this term trains the variance v only (improved-diffusion's
  ``frozen_out``), whatever the caller does with eps. ``t`` are step indices of ``schedule``;
  float32 arithmetic on the schedule's float64 constants.
  """
  def at(a):
    return jnp.asarray(a, jnp.float32)[t].reshape((-1,) + (1,) * (x0.ndim - 1))

  c1, c2 = schedule.posterior_mean_coefs
  abar = schedule.alphas_cumprod
  x0, x_t = jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32)
  eps = jax.lax.stop_gradient(jnp.asarray(eps, jnp.float32))
  v = jnp.asarray(v, jnp.float32)
  x0_hat = at(np.sqrt(1.0 / abar)) * x_t - at(np.sqrt(1.0 / abar - 1.0)) * eps
  model_mean = at(c1) * x0_hat + at(c2) * x_t
  log_beta, log_post = np.log(schedule.betas), schedule.posterior_log_variance_clipped
  model_log_var = learned_range_log_variance(v, at(log_beta), at(log_post))
  # The KL from the differences, each formed where it is exact: q's mean minus p's is
  # c1 (x0 - x0_hat) (the c2 x_t parts of the two means cancel), and q's log-variance minus p's
  # is -f (log beta_t - log beta~_t) with the gap of the two logs from float64 (near t = T they
  # agree to ~1e-6, below the float32 rounding of either log).
  gap = -learned_range_log_variance(v, at(log_beta - log_post), 0.0)
  kl = normal_kl_from_gap(at(c1) * (x0 - x0_hat), gap, model_log_var)
  nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
  return jnp.where(t == 0, _mean_flat(nll), _mean_flat(kl)) / np.log(2.0)


def hybrid_loss_terms(schedule: Schedule, x0, x_t, t, noise, eps, v=None):
  """(mse, vb), per example: improved DDPM's hybrid loss is mse + vb.

  mse = `eps_mse`(eps, noise) (mean over dimensions); vb = `vb_terms_bpd` * T / 1000 for a
  backbone with a learned variance (``v`` not None; improved-diffusion's RESCALED_MSE, T =
  ``schedule.num_steps``; the factor is 1 for the usual T = 1000, where it equals DiT's plain
  MSE loss type), None for an epsilon-only backbone (its loss is the mse alone). eps gets no
  gradient from vb and v none from mse.
  """
  mse = eps_mse(eps, noise)
  if v is None:
    return mse, None
  return mse, vb_terms_bpd(schedule, x0, x_t, t, eps, v) * (schedule.num_steps / 1000.0)
