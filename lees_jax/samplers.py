"""Samplers that really skip blocks: respaced DDPM, DDIM and DPM-Solver++(2M).

A sampler is a *solver* (the update rule of one step, with its per-step coefficients
precomputed in float64) plus a *gate policy*. `compile_sampler` turns both into one
jitted program ``fn(params, rng) -> x0`` along one of three paths:

* ``'segments'`` -- the policy's per-step masks are grouped into segments (runs of steps
  with one mask); the program holds one ``fori_loop`` per segment whose model call gets a
  `gates.StaticMask`, so skipped units are absent from that loop's compiled code;
* ``'cond'`` -- one ``fori_loop`` over all steps; the (steps, K) mask matrix is a traced
  input and every unit sits behind ``lax.cond`` (one compilation for any mask);
* ``'soft'`` -- soft LEES gates: every unit runs and is blended with its skip by g(t).

The gate forms (`lees_jax.gates`) carry each path into the backbone; the policy
(`lees_jax.policies`) says which units run at which step.

Every path uses the same step function, step index ``i`` and per-step noise key
``fold_in(rng, i)``, so the paths give the same samples for the same key and gates.

A *partial* program (``compile_sampler(..., start_step=i0)``, a `PartialSampleProgram`) runs
only steps i0, ..., S-1 from a given x at the solver's timestep of step i0 (SDEdit-style
denoising of noised inputs; `start_step` picks i0, `noise_to_step` makes that x):
``fn(params, rng, x_init) -> x0``. It keeps the absolute step index and the per-step keys of
the full program, so from the full program's state at step i0 it continues that trajectory.

Time runs from noise to data: sampler step i = 0 is the noisiest timestep.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lees_jax import cost as cost_lib
from lees_jax import diffusion
from lees_jax import gates as gating
from lees_jax import policies

SAMPLERS = ('ddpm', 'ddim', 'dpm_solver++')
PATHS = ('segments', 'cond', 'soft')
# The DDPM sampler's per-step variance (the names of improved-diffusion and diffusers):
# 'fixed_large' = the (respaced) beta_t, 'fixed_small' = the posterior variance beta~_t.
VARIANCES = ('fixed_large', 'fixed_small')


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
  variance: str | None = None    # ddpm: 'fixed_large' | 'fixed_small'; None for the others

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

  def update(self, i, state, eps, key):
    """One reverse step from sampler step i to i + 1 (the last step returns x0)."""
    x = state[0]
    c = self._at(i)
    x0 = self.x0_from_eps(i, x, eps)
    if self.name == 'ddpm':
      mean = c['coef_x0'] * x0 + c['coef_xt'] * x
      noise = jax.random.normal(key, x.shape, x.dtype)
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
  (the respaced beta_t, the default and the paper's) or "fixed_small" (the respaced posterior
  variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)); no noise on the last step.
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
    if variance == 'fixed_small':
      var = post_var.copy()
    else:
      var = np.append(post_var[1], betas[1:]) if len(betas) > 1 else betas.copy()
    coefs['coef_x0'] = betas * np.sqrt(ab_prev) / (1.0 - ab)
    coefs['coef_xt'] = (1.0 - ab_prev) * np.sqrt(1.0 - betas) / (1.0 - ab)
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
  """The solver of ``config.sampler`` (``variance`` defaults to 'fixed_large' when the config
  has no such field). ``solver.variance`` / ``solver.describe()`` say which variance it uses."""
  return make_solver(diffusion.schedule_from_config(diffusion_config), sampler_config.name,
                     sampler_config.steps, sampler_config.get('spacing', ''),
                     sampler_config.get('eta', 0.0), sampler_config.get('clip_x0', True),
                     sampler_config.get('variance', 'fixed_large'))


def start_step(solver: Solver, t_start: float) -> int:
  """The sampler step a partial run starts at: the first (noisiest) step whose original
  timestep is <= ``t_start * T``, i.e. the largest kept timestep not above that level.

  ``t_start`` in [0, 1]; 1 gives step 0 (denoising from almost pure noise), 0 the last step
  (timestep 0). Every spacing keeps timestep 0, so a step always exists.
  """
  if not 0.0 <= t_start <= 1.0:
    raise ValueError(f't_start must be in [0, 1], got {t_start}')
  below = np.nonzero(solver.timesteps <= t_start * solver.num_original_timesteps)[0]
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


# ---------------------------------------------------------------------------
# Compiled programs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class SampleProgram:
  """A compiled sampler for one policy: ``program(params, rng) -> x0`` (float32 NHWC, [-1, 1])."""
  jitted: Callable[..., jax.Array]
  operand: jax.Array                 # the traced per-step masks / logits (empty for segments)
  path: str
  policy: policies.Policy
  masks: np.ndarray                  # (steps, K) executed units per step
  segments: list[policies.Segment]
  block_ratio: float                 # executed (step, unit) pairs / all
  flop_fraction: float               # executed FLOPs / full model FLOPs
  batch_size: int
  sampler: str = ''                  # the solver, e.g. 'ddpm, 50 steps, variance fixed_large'

  def __call__(self, params, rng):
    return self.jitted(params, rng, self.operand)

  def lower(self, params, rng):
    """For compile-time measurement and HLO inspection."""
    return self.jitted.lower(params, rng, self.operand)


@dataclasses.dataclass(eq=False)
class PartialSampleProgram(SampleProgram):
  """Steps ``start_step``..S-1 only: ``program(params, rng, x_init) -> x0``, ``x_init`` the
  (batch_size, H, W, C) state at step ``start_step`` (e.g. `noise_to_step`).

  ``masks``, ``block_ratio`` and ``flop_fraction`` count the steps run only; ``segments``
  cover them, numbered by the solver's (absolute) step index.
  """
  start_step: int = 0

  def __call__(self, params, rng, x_init):  # pylint: disable=arguments-differ
    return self.jitted(params, rng, x_init, self.operand)

  def lower(self, params, rng, x_init):  # pylint: disable=arguments-differ
    return self.jitted.lower(params, rng, x_init, self.operand)


def default_path(policy: policies.Policy) -> str:
  return 'soft' if policy.soft else 'segments'


def compile_sampler(model, solver: Solver, policy: policies.Policy, batch_size: int, *,
                    path: str | None = None, mesh: Mesh | None = None,
                    start_step: int | None = None) -> SampleProgram:
  """One jitted program sampling ``batch_size`` images under ``policy``.

  With a ``mesh`` the batch is sharded over its 'batch' axis and params are replicated.
  ``start_step=i0`` gives a `PartialSampleProgram` running steps i0..S-1 from a given x
  (i0 = 0 included: the whole sampler from a given x_T); None, the default, the full sampler
  from its own Gaussian draw.
  """
  path = path or default_path(policy)
  if path not in PATHS:
    raise ValueError(f'unknown sampling path {path!r}; choose one of {PATHS}')
  if policy.soft != (path == 'soft'):
    raise ValueError(f"policy {policy.kind!r} ({'soft' if policy.soft else 'hard'}) cannot use path "
                     f"{path!r}: soft gates need path='soft', hard policies 'segments' or 'cond'")
  first = 0 if start_step is None else int(start_step)
  if start_step is not None:
    solver = solver.starting_at(first)
  k = model.num_units
  # Masks of every step (the traced operand is indexed by the absolute step), then those run.
  all_masks = policy.step_masks(solver.timesteps, solver.num_original_timesteps, k)
  masks = all_masks[first:]
  segments = [policies.Segment(s.start + first, s.stop + first, s.keep)
              for s in policies.segments_from_masks(masks)]
  mc = cost_lib.model_cost(model)
  shape = (batch_size,) + tuple(model.input.shape)
  if mesh is not None and batch_size % mesh.devices.size:
    raise ValueError(f'batch size {batch_size} is not divisible by the {mesh.devices.size} devices '
                     'of the mesh')
  x_sharding = NamedSharding(mesh, P('batch')) if mesh is not None else None
  timesteps = jnp.asarray(solver.timesteps, jnp.int32)

  def step(params, rng, i, state, gates_arg):
    x = state[0]
    t = jnp.full((batch_size,), timesteps[i], jnp.int32)
    eps = model.apply({'params': params}, x, t, gates=gates_arg)
    return solver.update(i, state, eps, jax.random.fold_in(rng, i))

  def steps(params, rng, state, mask_matrix):
    """Steps ``first``..S-1 from ``state`` (step noise keys fold_in(rng, i))."""
    if path == 'segments':
      for seg in segments:
        mask = gating.StaticMask(seg.keep)
        body = functools.partial(lambda m, i, s: step(params, rng, i, s, m), mask)
        state = jax.lax.fori_loop(seg.start, seg.stop, body, state)
    elif path == 'cond':
      state = jax.lax.fori_loop(
          first, solver.num_steps,
          lambda i, s: step(params, rng, i, s, gating.CondMask(mask_matrix[i])), state)
    else:
      state = jax.lax.fori_loop(
          first, solver.num_steps,
          lambda i, s: step(params, rng, i, s, gating.SoftGates(mask_matrix[i])),
          state)
    return state[0]

  def constrain(x):
    return jax.lax.with_sharding_constraint(x, x_sharding) if x_sharding is not None else x

  def run(params, rng, mask_matrix):
    init_key, rng = jax.random.split(rng)
    x = constrain(jax.random.normal(init_key, shape, jnp.float32))
    return steps(params, rng, solver.init_state(x), mask_matrix)

  def run_from(params, rng, x_init, mask_matrix):
    # The same split as `run`, so that the step keys are those of the full program.
    _, rng = jax.random.split(rng)
    if tuple(x_init.shape) != shape:
      raise ValueError(f'x_init has shape {tuple(x_init.shape)}; this program runs {shape}')
    x = constrain(jnp.asarray(x_init, jnp.float32))
    return steps(params, rng, solver.init_state(x), mask_matrix)

  if path == 'segments':
    operand = jnp.zeros((0,), bool)  # masks are baked into the program
  elif path == 'cond':
    operand = jnp.asarray(all_masks)
  else:
    # SoftGates blends each unit by sigmoid(logit) = g_k(t).
    operand = jnp.asarray(policy.step_logits(solver.timesteps, solver.num_original_timesteps, k))
  fn = run if start_step is None else run_from
  jitted = jax.jit(fn, out_shardings=x_sharding) if x_sharding is not None else jax.jit(fn)
  fields = (jitted, operand, path, policy, masks, segments, policies.executed_block_ratio(masks),
            mc.flop_fraction(masks), batch_size, solver.describe())
  if start_step is None:
    return SampleProgram(*fields)
  return PartialSampleProgram(*fields, start_step=first)
