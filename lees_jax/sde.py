"""The continuous-time VP SDE U-ViT trains and samples with, and its two samplers as `Solver`s.

The process (baofff/U-ViT ``sde.py`` ``VPSDE``; DPM-Solver's ``NoiseScheduleVP('linear')``):
beta(t) = beta_0 + t (beta_1 - beta_0) on t in [0, 1], beta_0 = 0.1, beta_1 = 20;
q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) with log alpha_t = -(1/2) int_0^t beta
= -(1/4) t^2 (beta_1 - beta_0) - (1/2) t beta_0 and sigma_t^2 = 1 - alpha_t^2. The network
predicts the noise and is called with 999 t (``ScoreModel.predict``: ``nnet(xt, t * 999)``).

Samplers, each a `lees_jax.solvers.Solver` that `lees_jax.samplers.compile_sampler` compiles
with any gate policy and path (one sampler step = one network evaluation):

* ``'euler_maruyama'`` -- U-ViT's ``euler_maruyama`` on the reverse SDE: times
  ``append(0, linspace(eps, 1, N))`` (eps = 1e-3) walked backwards, the network at t of each
  pair (s, t); x <- x + [f(x, t) - g(t)^2 score] (s - t) + g(t) sqrt(t - s) z, with f = -beta x / 2,
  g^2 = beta, score = -eps_hat / sigma_t, and no noise on the last step (s = 0);
* ``'dpm_solver'`` -- the DPM-Solver-fast U-ViT's eval.py runs (``DPM_Solver.sample(steps=N,
  eps=1e-4, adaptive_step_size=False, fast_version=True)``): K = N // 3 + 1 steps uniform in
  lambda = log(alpha / sigma) from t = 1 to t = 1e-4, of orders [3] * (K - 2) + [2, 1]
  (N % 3 = 0), [3] * (K - 1) + [1] (N % 3 = 1) or [3] * (K - 1) + [2] (N % 3 = 2); N network
  evaluations in all, at the steps' starts s and intermediate times s1, s2 (r1 = 1/3, r2 = 2/3
  for order 3, r1 = 1/2 for order 2), each an evaluation of its own in the program.

Gates read the normalised time of each evaluation: a step at continuous t is stated as the
real-valued timestep T t - 1 (`policies.timesteps_for_time`, T = `GATE_TIMESTEPS`), so that
`policies.normalized_time` gives back t -- the one definition of time every policy uses. The
network gets `Solver.model_times` = 999 t. Coefficients are float64 numpy, per evaluation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import policies
from lees_jax.solvers import Solver

BETA_MIN, BETA_MAX = 0.1, 20.0
NETWORK_TIME_SCALE = 999.0  # the network sees 999 t (U-ViT's ScoreModel.predict)
GATE_TIMESTEPS = 1000       # T of normalized_time for continuous t: timestep T t - 1 has time t
SDE_SAMPLERS = ('euler_maruyama', 'dpm_solver')
EM_EPS = 1e-3               # sde.euler_maruyama's default end time
DPM_EPS = 1e-4              # what U-ViT's eval.py / train.py pass to DPM_Solver.sample
# What a converted U-ViT backbone records as its diffusion (`checkpoints.save_backbone`).
DIFFUSION_CONFIG = dict(process='vp_sde', beta_min=BETA_MIN, beta_max=BETA_MAX,
                        network_time_scale=NETWORK_TIME_SCALE, prediction='eps')


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """The linear VP SDE on t in [0, 1]; every method takes numpy (float64) or jax arrays."""
  beta_min: float = BETA_MIN
  beta_max: float = BETA_MAX

  def beta(self, t):
    return self.beta_min + t * (self.beta_max - self.beta_min)

  def beta_integral(self, t):
    """int_0^t beta(tau) d tau."""
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t ** 2

  def log_alpha(self, t):
    """log alpha_t = log of the marginal mean coefficient."""
    return -0.5 * self.beta_integral(t)

  def alpha(self, t):
    xp = jnp if isinstance(t, jax.Array) else np
    return xp.exp(self.log_alpha(t))

  def sigma(self, t):
    """sqrt(1 - alpha_t^2) = sqrt(1 - exp(-int_0^t beta)) (U-ViT's cum_beta ** 0.5)."""
    xp = jnp if isinstance(t, jax.Array) else np
    return xp.sqrt(-xp.expm1(-self.beta_integral(t)))

  def lam(self, t):
    """lambda_t = log alpha_t - log sigma_t (DPM-Solver's half log-SNR)."""
    xp = jnp if isinstance(t, jax.Array) else np
    return self.log_alpha(t) - 0.5 * xp.log(-xp.expm1(-self.beta_integral(t)))

  def inverse_lam(self, lam):
    """The t of a given lambda (DPM-Solver's ``NoiseScheduleVP.inverse_lambda``, linear)."""
    lam = np.asarray(lam, np.float64)
    d = self.beta_max - self.beta_min
    tmp = 2.0 * d * np.logaddexp(-2.0 * lam, 0.0)
    return tmp / (np.sqrt(self.beta_min ** 2 + tmp) + self.beta_min) / d

  def marginal(self, x0, t, noise):
    """x_t = alpha_t x0 + sigma_t noise for times t (batch,) (U-ViT's ``VPSDE.sample``)."""
    t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (jnp.ndim(x0) - 1))
    return self.alpha(t) * x0 + self.sigma(t) * noise


def network_time(t):
  """What the network is called with at continuous time t: 999 t."""
  return NETWORK_TIME_SCALE * np.asarray(t, np.float64)


# ---------------------------------------------------------------------------------------------
# The solvers.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SDESolver(Solver):
  """A sampler of the VP SDE: ``times`` (S,) the continuous t of each network evaluation,
  noisiest first; ``timesteps`` = T t - 1 for the gates, ``model_times`` = 999 t."""
  times: np.ndarray | None = None
  sde: VPSDE = VPSDE()
  t_end: float = 0.0  # the time of the sample it returns

  def describe(self) -> str:
    kind = 'reverse SDE' if self.name == 'euler_maruyama' else 'DPM-Solver-fast'
    return (f'{self.name}, {self.num_steps} network evaluations ({kind}, t from '
            f'{self.times[0]:g} to {self.t_end:g}), VP SDE')

  def init_state(self, x):
    if self.name == 'euler_maruyama':
      return (x,)
    # (next network input, x at the start of the DPM-Solver step, eps at s, eps at s1)
    return (x, x, jnp.zeros_like(x), jnp.zeros_like(x))

  def x0_from_eps(self, i, x, eps):
    """The data prediction (x - sigma_t eps) / alpha_t at the time of step i (not clipped)."""
    t = jnp.asarray(self.times, jnp.float32)[i]
    return (x - self.sde.sigma(t) * eps) / self.sde.alpha(t)

  def start_steps(self) -> np.ndarray:
    """Every Euler-Maruyama step; the first evaluation of each DPM-Solver step."""
    if self.name == 'dpm_solver':
      return np.nonzero(self.coefs['first'] == 1.0)[0]
    return np.arange(self.num_steps)

  def starting_at(self, step: int) -> 'SDESolver':
    """A partial run from step ``step``: any Euler-Maruyama step, or the first evaluation of a
    DPM-Solver step (its state there is x alone)."""
    if not 0 <= step < self.num_steps:
      raise ValueError(f'start step {step} is not a step of this {self.num_steps}-step sampler')
    if step not in self.start_steps():
      starts = self.start_steps().tolist()
      raise ValueError(f'step {step} is an intermediate evaluation of a DPM-Solver step: a '
                       f'partial run starts at a step start, one of {starts}')
    return self

  def update(self, i, state, eps, key, v=None):
    del v
    c = self._at(i)
    if self.name == 'euler_maruyama':
      x = state[0]
      noise = jax.random.normal(key, x.shape, x.dtype)
      return (c['x'] * x + c['eps'] * eps + c['noise'] * noise,)
    _, x_s, e0, e1 = state
    e0 = jnp.where(c['first'] > 0, eps, e0)
    e1 = jnp.where(c['second'] > 0, eps, e1)
    out = c['x'] * x_s + c['e0'] * e0 + c['e1'] * e1 + c['e2'] * eps
    return (out, jnp.where(c['ends'] > 0, out, x_s), e0, e1)


def _solver(name, times, coefs, sde, t_end) -> SDESolver:
  times = np.asarray(times, np.float64)
  return SDESolver(name, policies.timesteps_for_time(times, GATE_TIMESTEPS), GATE_TIMESTEPS,
                   {k: np.asarray(v, np.float64) for k, v in coefs.items()}, clip_x0=False,
                   model_times=network_time(times), times=times, sde=sde, t_end=float(t_end))


def euler_maruyama(steps: int = 1000, eps: float = EM_EPS, sde: VPSDE = VPSDE()) -> SDESolver:
  """U-ViT's Euler-Maruyama sampler of the reverse SDE with ``steps`` network evaluations."""
  if steps < 1 or not 0.0 < eps < 1.0:
    raise ValueError(f'need steps >= 1 and 0 < eps < 1, got steps={steps}, eps={eps}')
  grid = np.append(0.0, np.linspace(eps, 1.0, steps))
  t, s = grid[1:][::-1], grid[:-1][::-1]  # pairs (s, t), the noisiest first
  beta, dt = sde.beta(t), s - t
  coefs = dict(x=1.0 - 0.5 * beta * dt,                     # x + f(x, t) dt
               eps=beta * dt / sde.sigma(t),                 # - g^2 score dt = g^2 eps/sigma dt
               noise=np.where(s == 0.0, 0.0, np.sqrt(beta * -dt)))
  return _solver('euler_maruyama', t, coefs, sde, 0.0)


def dpm_solver_orders(steps: int) -> list[int]:
  """DPM-Solver-fast's order of each step for ``steps`` network evaluations."""
  if steps < 1:
    raise ValueError(f'DPM-Solver needs steps >= 1, got {steps}')
  k = steps // 3 + 1
  if steps % 3 == 0:
    orders = [3] * (k - 2) + [2, 1]
  elif steps % 3 == 1:
    orders = [3] * (k - 1) + [1]
  else:
    orders = [3] * (k - 1) + [2]
  return orders


def dpm_solver(steps: int = 50, eps: float = DPM_EPS, sde: VPSDE = VPSDE(),
               t_start: float = 1.0) -> SDESolver:
  """DPM-Solver-fast (noise prediction, uniform lambda steps) with ``steps`` evaluations.

  Each of its steps from s to t (h = lambda_t - lambda_s) is one, two or three evaluations;
  every evaluation's update is one linear form ``x * x_s + e0 * eps_s + e1 * eps_s1 + e2 *
  eps_now`` (``first`` / ``second`` mark the evaluations whose eps is eps_s / eps_s1, ``ends``
  those that finish a step), the closed forms of ``dpm_solver_{first,second,third}_update``:

    order 1: x_t = e^(la_t - la_s) x - sigma_t (e^h - 1) eps_s;
    order 2: x_s1 = e^(la_s1 - la_s) x - sigma_s1 (e^(r1 h) - 1) eps_s,
             x_t = e^(la_t - la_s) x - sigma_t (e^h - 1) eps_s
                   - (1 / (2 r1)) sigma_t (e^h - 1) (eps_s1 - eps_s);
    order 3: x_s1 as above, x_s2 = e^(la_s2 - la_s) x - sigma_s2 (e^(r2 h) - 1) eps_s
                   - (r2 / r1) sigma_s2 ((e^(r2 h) - 1) / (r2 h) - 1) (eps_s1 - eps_s),
             x_t = e^(la_t - la_s) x - sigma_t (e^h - 1) eps_s
                   - (1 / r2) sigma_t ((e^h - 1) / h - 1) (eps_s2 - eps_s).
  """
  if not 0.0 < eps < t_start <= 1.0:
    raise ValueError(f'need 0 < eps < t_start <= 1, got eps={eps}, t_start={t_start}')
  orders = dpm_solver_orders(steps)
  grid = sde.inverse_lam(np.linspace(sde.lam(t_start), sde.lam(eps), len(orders) + 1))
  la, sig, lam = sde.log_alpha, sde.sigma, sde.lam
  rows = []  # (time, x, e0, e1, e2, first, second, ends)

  def row(time, x, e0=0.0, e1=0.0, e2=0.0, first=0.0, second=0.0, ends=0.0):
    rows.append((time, x, e0, e1, e2, first, second, ends))

  for o, s, t in zip(orders, grid[:-1], grid[1:]):
    h = lam(t) - lam(s)
    a_t, phi_1 = np.exp(la(t) - la(s)), np.expm1(h)
    if o == 1:
      row(s, a_t, e0=-sig(t) * phi_1, first=1, ends=1)
      continue
    r1, r2 = (0.5, None) if o == 2 else (1 / 3, 2 / 3)
    s1 = sde.inverse_lam(lam(s) + r1 * h)
    row(s, np.exp(la(s1) - la(s)), e0=-sig(s1) * np.expm1(r1 * h), first=1)
    if o == 2:
      corr = (0.5 / r1) * sig(t) * phi_1
      row(s1, a_t, e0=-sig(t) * phi_1 + corr, e1=-corr, second=1, ends=1)
      continue
    s2 = sde.inverse_lam(lam(s) + r2 * h)
    corr1 = (r2 / r1) * sig(s2) * (np.expm1(r2 * h) / (r2 * h) - 1.0)
    row(s1, np.exp(la(s2) - la(s)), e0=-sig(s2) * np.expm1(r2 * h) + corr1, e1=-corr1, second=1)
    corr2 = (1.0 / r2) * sig(t) * (np.expm1(h) / h - 1.0)
    row(s2, a_t, e0=-sig(t) * phi_1 + corr2, e2=-corr2, ends=1)
  table = np.asarray(rows, np.float64)
  keys = ('x', 'e0', 'e1', 'e2', 'first', 'second', 'ends')
  coefs = {k: table[:, j + 1] for j, k in enumerate(keys)}
  assert len(table) == steps, (len(table), steps)
  return _solver('dpm_solver', table[:, 0], coefs, sde, grid[-1])


def make_solver(name: str, steps: int, eps: float | None = None,
                sde: VPSDE = VPSDE()) -> SDESolver:
  """'euler_maruyama' (eps default 1e-3) or 'dpm_solver' (eps default 1e-4) with ``steps``
  network evaluations."""
  if name == 'euler_maruyama':
    return euler_maruyama(steps, EM_EPS if eps is None else eps, sde)
  if name == 'dpm_solver':
    return dpm_solver(steps, DPM_EPS if eps is None else eps, sde)
  raise ValueError(f'unknown VP SDE sampler {name!r}; choose one of {SDE_SAMPLERS}')


def noise_to_step(solver: SDESolver, x0, step: int, noise) -> jax.Array:
  """x0 noised to the time of sampler step ``step`` (the start of a partial program)."""
  t = jnp.full((jnp.shape(x0)[0],), solver.times[step], jnp.float32)
  return solver.sde.marginal(jnp.asarray(x0, jnp.float32), t, jnp.asarray(noise, jnp.float32))
