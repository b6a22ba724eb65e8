"""Diffusion math: beta schedules, forward noising, the epsilon loss and respacing.

The single home of the DDPM formulas; samplers and training import them from here.
Schedules are computed in float64 with numpy (as the reference implementations
do) and handed to JAX as float32 constants.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
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


def make_schedule(num_timesteps: int = 1000, beta_schedule: str = 'linear',
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  if beta_schedule != 'linear':
    raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; only 'linear' (DDPM) is implemented")
  betas = linear_betas(num_timesteps, beta_start, beta_end)
  return Schedule(betas, np.arange(num_timesteps), num_timesteps)


def schedule_from_config(diffusion_config) -> Schedule:
  return make_schedule(diffusion_config.num_timesteps, diffusion_config.beta_schedule,
                       diffusion_config.beta_start, diffusion_config.beta_end)


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
