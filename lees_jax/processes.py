"""The diffusion process of a backbone: the one place that says how training noises an example
and which solvers sample it.

``config.diffusion.process`` picks one (absent: 'ddpm', every config and backbone written before
the field existed):

* 'ddpm' -- the discrete DDPM process (`lees_jax.diffusion`; fields num_timesteps, beta_schedule,
  beta_start, beta_end): t ~ U{0..T-1}, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the network
  gets the integer t, the gates the normalised time (t + 1) / T; the loss is
  `diffusion.hybrid_loss_terms` (eps-MSE, plus the vb for a learned variance); samplers 'ddpm',
  'ddim', 'dpm_solver++' (`lees_jax.solvers`).
* 'vp_sde' -- U-ViT's continuous VP SDE (`lees_jax.sde`; fields beta_min, beta_max, t_min):
  t ~ U(t_min, 1) (U-ViT's ``VPSDE.sample``, ``torch.rand(B) * (1 - t_init) + t_init``, which
  ``LSimple`` calls with t_init = 0, our default t_min), x_t = alpha_t x0 + sigma_t eps; the
  network gets 999 t, the gates t itself (the time its samplers state as the real-valued
  timesteps T t - 1, T = `sde.GATE_TIMESTEPS`); the loss is the eps-MSE (``LSimple`` with
  noise prediction: the mean of squares over dimensions); samplers 'euler_maruyama' and
  'dpm_solver' (``config.sampler.steps``; ``config.sampler.sde_eps`` > 0 replaces their end time).

Every objective (pretrain, LEES gates, ASE fine-tuning), the solver of every sampler and the
noising of robustness inputs come from here, so none of them branches on the process:

  process.draw(rng, x0[, times])         -> NoisedBatch(x_t, noise, network_time, gate_time, t);
                                            with ``times`` t is drawn uniformly from them only
  process.sampler_times(timestep_values) -> the process's own times of a solver's timesteps
                                            (what ``times`` takes: gates trained for a solver)
  process.loss_terms(x0, noised, eps, v) -> per-example (mse, vb or None)
  process.schedule_keep(policy, K)       -> noised -> (B, K) bool, the units a fixed schedule
                                            runs at each example's time (ASE fine-tuning)
  process.solver(config.sampler)         -> a `solvers.Solver`
  process.noise_to_step(solver, x0, i, noise)
  process.gate_timesteps                 -> T of `policies.normalized_time` for its timesteps

A backbone records its process in backbone.json ('diffusion'); `backbone_mismatch` says why a
recorded process cannot be run with a config's (checked when a backbone is read).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import diffusion, policies, sde, solvers

PROCESSES = ('ddpm', 'vp_sde')
DEFAULT_PROCESS = 'ddpm'
# The fields each process reads from config.diffusion (besides 'process'). A field of the other
# process is refused: it would be silently ignored.
DDPM_FIELDS = ('num_timesteps', 'beta_schedule', 'beta_start', 'beta_end')
VP_SDE_FIELDS = ('beta_min', 'beta_max', 't_min')
# What a converted U-ViT records besides its fields (`sde.DIFFUSION_CONFIG`): the only values
# the VP SDE process implements.
VP_SDE_FIXED = dict(network_time_scale=sde.NETWORK_TIME_SCALE, prediction='eps')


class NoisedBatch(NamedTuple):
  """One training draw for a batch x0 (B, ...): what the network sees and what it must predict.

  x_t: the network input; noise: eps, the regression target; network_time: (B,) the time the
  network is called with; gate_time: (B,) the normalised time in [0, 1] that gates, ASE's
  schedules and lambda(t) read; t: (B,) the process's own time (DDPM: the integer step the vb
  term indexes; VP SDE: the continuous t).
  """
  x_t: jax.Array
  noise: jax.Array
  network_time: jax.Array
  gate_time: jax.Array
  t: jax.Array


def draw_t_noise(rng: jax.Array, x0: jax.Array, num_timesteps: int):
  """The per-example diffusion timestep t ~ U{0..T-1} and noise eps ~ N(0, I) of a DDPM step."""
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, num_timesteps)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  return t, noise


def draw_from_times(rng: jax.Array, x0: jax.Array, times):
  """t drawn uniformly from the given ``times`` (one per example) and eps ~ N(0, I): training
  on exactly the times a solver visits (``config.gates.timesteps='sampler'``)."""
  k_t, k_n = jax.random.split(rng)
  times = jnp.asarray(times)
  t = times[jax.random.randint(k_t, (x0.shape[0],), 0, times.shape[0])]
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  return t, noise


def process_name(diffusion_config) -> str:
  """``config.diffusion.process`` ('ddpm' when absent), checked."""
  name = diffusion_config.get('process', DEFAULT_PROCESS) if diffusion_config is not None \
      else DEFAULT_PROCESS
  if name not in PROCESSES:
    raise ValueError(f'unknown config.diffusion.process {name!r}; choose one of {PROCESSES} '
                     "('ddpm': the discrete DDPM process, the default; 'vp_sde': U-ViT's "
                     'continuous VP SDE, configs/celeba64_uvit.py)')
  return name


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteDDPM:
  """The discrete DDPM process of ``schedule`` (see the module docstring)."""
  schedule: diffusion.Schedule
  name: str = 'ddpm'

  @property
  def gate_timesteps(self) -> int:
    return self.schedule.num_original_timesteps

  def describe(self) -> str:
    return (f'discrete DDPM process, T = {self.schedule.num_steps} (t ~ U{{0..T-1}}, the network '
            'gets t, the gates (t + 1) / T)')

  def check_model(self, model) -> None:
    del model  # epsilon and epsilon-plus-variance backbones both train on it

  def sampler_times(self, timestep_values) -> np.ndarray:
    return np.asarray(timestep_values, np.int32)  # a discrete solver's original timesteps

  def draw(self, rng, x0, times=None) -> NoisedBatch:
    if times is None:
      t, noise = draw_t_noise(rng, x0, self.schedule.num_steps)
    else:
      t, noise = draw_from_times(rng, x0, times)
    return NoisedBatch(diffusion.q_sample(self.schedule, x0, t, noise), noise, t,
                       policies.normalized_time(t, self.gate_timesteps), t)

  def loss_terms(self, x0, noised: NoisedBatch, eps, v=None):
    return diffusion.hybrid_loss_terms(self.schedule, x0, noised.x_t, noised.t, noised.noise,
                                       eps, v)

  def schedule_keep(self, policy, num_units: int) -> Callable[[NoisedBatch], jax.Array]:
    # Exactly the sampler's masks at every integer timestep, looked up by the example's t.
    table = jnp.asarray(policy.step_masks(np.arange(self.schedule.num_steps),
                                          self.gate_timesteps, num_units))
    return lambda noised: table[noised.t]

  def solver(self, sampler_config) -> solvers.Solver:
    name = sampler_config.name
    if name in sde.SDE_SAMPLERS:
      raise ValueError(f'config.sampler.name={name!r} samples the continuous VP SDE, but '
                       "config.diffusion.process is 'ddpm' (the discrete DDPM process): choose "
                       f"one of {solvers.SAMPLERS}, or use a VP SDE config and backbone "
                       "(config.diffusion.process='vp_sde', e.g. configs/celeba64_uvit.py)")
    return solvers.make_solver(self.schedule, name, sampler_config.steps,
                               sampler_config.get('spacing', ''), sampler_config.get('eta', 0.0),
                               sampler_config.get('clip_x0', True),
                               sampler_config.get('variance', 'fixed_large'))

  def noise_to_step(self, solver, x0, step: int, noise) -> jax.Array:
    return solvers.noise_to_step(self.schedule, solver, x0, step, noise)

  noising = 'x_τ = sqrt(ᾱ_τ)·x + sqrt(1 − ᾱ_τ)·ε'


@dataclasses.dataclass(frozen=True, eq=False)
class ContinuousVPSDE:
  """U-ViT's continuous VP SDE (see the module docstring)."""
  vp: sde.VPSDE = sde.VPSDE()
  t_min: float = 0.0
  name: str = 'vp_sde'
  gate_timesteps: int = sde.GATE_TIMESTEPS

  def __post_init__(self):
    if not 0.0 <= self.t_min < 1.0:
      raise ValueError(f'config.diffusion.t_min must be in [0, 1), got {self.t_min}')
    if not 0.0 < self.vp.beta_min <= self.vp.beta_max:
      raise ValueError(f'config.diffusion needs 0 < beta_min <= beta_max, got '
                       f'{self.vp.beta_min}, {self.vp.beta_max}')

  def describe(self) -> str:
    return (f'continuous VP SDE, beta {self.vp.beta_min:g} -> {self.vp.beta_max:g} (t ~ '
            f'U({self.t_min:g}, 1), the network gets {sde.NETWORK_TIME_SCALE:g} t, the gates t)')

  def check_model(self, model) -> None:
    if model.output != 'eps':
      raise ValueError(f"config.diffusion.process='vp_sde' trains noise prediction (U-ViT's "
                       f"'noise_pred'), but {type(model).__name__} outputs {model.output!r}: a "
                       "learned variance belongs to the discrete DDPM process ('ddpm')")

  def sampler_times(self, timestep_values) -> np.ndarray:
    # The solvers state their continuous t as the real-valued timesteps T t - 1.
    return ((np.asarray(timestep_values, np.float64) + 1.0) / self.gate_timesteps).astype(np.float32)

  def draw(self, rng, x0, times=None) -> NoisedBatch:
    if times is None:
      k_t, k_n = jax.random.split(rng)
      t = jax.random.uniform(k_t, (x0.shape[0],), jnp.float32, self.t_min, 1.0)
      noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    else:
      t, noise = draw_from_times(rng, x0, times)
    return NoisedBatch(self.vp.marginal(x0, t, noise), noise,
                       jnp.float32(sde.NETWORK_TIME_SCALE) * t, t, t)

  def loss_terms(self, x0, noised: NoisedBatch, eps, v=None):
    del x0
    if v is not None:
      raise ValueError('the VP SDE has no variance term: the backbone must output eps only')
    return diffusion.eps_mse(eps, noised.noise), None

  def schedule_keep(self, policy, num_units: int) -> Callable[[NoisedBatch], jax.Array]:
    if not isinstance(policy, policies.SchedulePolicy):
      raise ValueError(f'a fixed per-example mask needs a schedule policy, got {policy.kind!r}')
    keep = jnp.asarray(policy.matrix.T)  # (intervals, K)
    if keep.shape[1] != num_units:
      raise ValueError(f'schedule {policy.name!r} has {keep.shape[1]} rows but the model has '
                       f'{num_units} gateable units')
    # The interval of each example's continuous t, by the definition the samplers' masks use.
    return lambda noised: keep[policies.interval_of_time(noised.gate_time, keep.shape[0])]

  def solver(self, sampler_config) -> solvers.Solver:
    name = sampler_config.name
    if name not in sde.SDE_SAMPLERS:
      raise ValueError(f'config.sampler.name={name!r} is not a sampler of the continuous VP SDE '
                       f"(config.diffusion.process='vp_sde', U-ViT's): choose one of "
                       f'{sde.SDE_SAMPLERS}' + (' (the DDPM samplers need a discrete DDPM '
                                                'backbone and process)'
                                                if name in solvers.SAMPLERS else ''))
    end = float(sampler_config.get('sde_eps', 0.0))
    return sde.make_solver(name, int(sampler_config.steps), end if end > 0 else None, self.vp)

  def noise_to_step(self, solver, x0, step: int, noise) -> jax.Array:
    return sde.noise_to_step(solver, x0, step, noise)

  noising = 'x_t = α_t·x + σ_t·ε (the VP SDE marginal at the step\'s t)'


def from_config(diffusion_config):
  """The process of ``config.diffusion`` (clear errors for fields of the other process)."""
  name = process_name(diffusion_config)
  present = set(diffusion_config) if diffusion_config is not None else set()
  foreign = sorted(present & set(VP_SDE_FIELDS if name == 'ddpm' else DDPM_FIELDS))
  if foreign:
    other = 'vp_sde' if name == 'ddpm' else 'ddpm'
    raise ValueError(f'config.diffusion.process={name!r} but config.diffusion sets {foreign}, '
                     f'fields of the {other!r} process that {name!r} would ignore: '
                     f"{name!r} reads {list(DDPM_FIELDS if name == 'ddpm' else VP_SDE_FIELDS)} "
                     '(start from a config of that process, e.g. configs/cifar10.py for ddpm, '
                     'configs/celeba64_uvit.py for vp_sde)')
  if name == 'ddpm':
    return DiscreteDDPM(diffusion.schedule_from_config(diffusion_config))
  get = diffusion_config.get
  return ContinuousVPSDE(sde.VPSDE(float(get('beta_min', sde.BETA_MIN)),
                                   float(get('beta_max', sde.BETA_MAX))),
                         t_min=float(get('t_min', 0.0)))


def for_model(diffusion_config, model):
  """The process of ``config.diffusion``, checked against the backbone it trains."""
  process = from_config(diffusion_config)
  process.check_model(model)
  return process


def _described(diffusion_dict) -> str:
  name = diffusion_dict.get('process', DEFAULT_PROCESS)
  return ("U-ViT's continuous VP SDE" if name == 'vp_sde' else 'the discrete DDPM process') + \
      f' ({dict(diffusion_dict)})'


def backbone_mismatch(recorded, diffusion_config) -> str | None:
  """Why a backbone whose backbone.json records the diffusion ``recorded`` cannot run with
  ``config.diffusion`` (None: it can, or the backbone records none). Checked: the process, and
  for the VP SDE its betas and the fixed values of `VP_SDE_FIXED`."""
  if not recorded:
    return None
  have = recorded.get('process', DEFAULT_PROCESS)
  want = process_name(diffusion_config)
  if have not in PROCESSES:
    return f"the backbone's diffusion process {have!r} is not one of {PROCESSES}"
  if have != want:
    hint = ("set config.diffusion.process='vp_sde' with beta_min / beta_max and sample with "
            "'euler_maruyama' or 'dpm_solver' (configs/celeba64_uvit.py does)" if have == 'vp_sde'
            else "use a config of the discrete DDPM process (config.diffusion.process='ddpm', "
                 'e.g. configs/cifar10.py)')
    return (f'it was trained on {_described(recorded)}, but config.diffusion.process is '
            f'{want!r}: {hint}')
  if have == 'vp_sde':
    process = from_config(diffusion_config)
    for field, value in (('beta_min', process.vp.beta_min), ('beta_max', process.vp.beta_max)):
      if field in recorded and not np.isclose(float(recorded[field]), value, rtol=1e-12):
        return (f'it was trained with {field}={recorded[field]} but config.diffusion.{field} is '
                f'{value}')
    for field, value in VP_SDE_FIXED.items():
      if field in recorded and recorded[field] != value:
        return (f'it records {field}={recorded[field]!r}; the VP SDE process implements '
                f'{field}={value!r} only')
  return None
