"""U-ViT's VP SDE and its samplers (`lees_jax.sde`) against hand-written numpy references.

* the marginal coefficients against their closed forms (U-ViT's ``VPSDE``: cum_alpha =
  exp(-int beta) = alpha_t^2; DPM-Solver's ``NoiseScheduleVP('linear')``);
* Euler-Maruyama against a numpy loop written from U-ViT's ``sde.euler_maruyama`` (the same
  Gaussian draws), on the exact noise predictor of Gaussian data;
* DPM-Solver against a numpy re-implementation of ``dpm_solver_pytorch.py``'s
  ``DPM_Solver.sample(fast_version=True)`` (its time steps, orders and first / second / third
  order updates, each written as the original computes it), and against the exact solution of
  the probability-flow ODE of Gaussian data;
* both compiled by `samplers.compile_sampler` with a gate policy on a tiny U-ViT: 'segments'
  == 'cond', and equal to a loop calling the network at 999 t with the mask of t's interval.

Measured (jax 0.10.2, CPU, fp32 against float64): EM-200 on the analytic eps 1.2e-7 (|x| <=
0.5), DPM-25 / DPM-50 3.8e-7 / 3.7e-7 (DPM-7 5e-6, DPM-3 2.9e-5: few large steps, e^h up to
~100); the compiled U-ViT samplers against the loop 3e-7 (EM-20) and 1.4e-7 (DPM-10) of max |x|.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import ase, gates, models, policies, samplers, sde
from lees_jax.models import uvit

B0, B1 = 0.1, 20.0
S2 = 0.3 ** 2  # variance of the Gaussian "data" whose exact noise predictor drives the solvers


def _alpha_sigma(t):
  """Closed forms: log alpha = -t^2 (b1 - b0) / 4 - t b0 / 2; sigma^2 = 1 - alpha^2."""
  log_alpha = -0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0
  return np.exp(log_alpha), np.sqrt(1.0 - np.exp(2.0 * log_alpha))


def exact_eps(x, t):
  """E[eps | x_t] for data ~ N(0, S2 I): sigma_t x / (alpha_t^2 S2 + sigma_t^2)."""
  a, s = _alpha_sigma(np.asarray(t, np.float64))
  return s * x / (a * a * S2 + s * s)


def test_marginal_coefficients_closed_form():
  v = sde.VPSDE()
  t = np.linspace(1e-4, 1.0, 101)
  a, s = _alpha_sigma(t)
  np.testing.assert_allclose(v.alpha(t), a, rtol=1e-12)
  np.testing.assert_allclose(v.sigma(t), s, rtol=1e-10)
  # U-ViT's cum_alpha = exp(-int_0^t beta) with int = b0 t + (b1 - b0) t^2 / 2, and beta(t).
  np.testing.assert_allclose(v.alpha(t) ** 2, np.exp(-(B0 * t + 0.5 * (B1 - B0) * t ** 2)),
                             rtol=1e-12)
  np.testing.assert_allclose(v.beta(t), B0 + t * (B1 - B0))
  np.testing.assert_allclose(v.lam(t), np.log(a) - np.log(s), rtol=1e-10)
  np.testing.assert_allclose(v.inverse_lam(v.lam(t)), t, rtol=1e-9)
  x0, noise = np.ones((3, 2)), np.full((3, 2), 2.0)
  tt = np.array([0.0, 0.5, 1.0])
  a3, s3 = _alpha_sigma(tt)
  want = np.broadcast_to(a3[:, None] + 2 * s3[:, None], (3, 2))
  np.testing.assert_allclose(v.marginal(x0, tt, noise), want, rtol=1e-6)
  assert sde.network_time(1.0) == 999.0


def test_time_of_the_gates_is_t():
  solver = sde.dpm_solver(25)
  np.testing.assert_allclose(policies.normalized_time(solver.timesteps, 1000, np.float64),
                             solver.times, rtol=1e-12)
  np.testing.assert_allclose(solver.model_times, 999 * solver.times)
  em = sde.euler_maruyama(1000)  # times 0.001 ... 1: the timesteps 0 ... 999 exactly
  np.testing.assert_allclose(em.timesteps, np.arange(1000)[::-1], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# Euler-Maruyama.
# ---------------------------------------------------------------------------------------------

def numpy_euler_maruyama(x, steps, noises, eps_fn, eps=1e-3):
  """U-ViT's sde.euler_maruyama on the reverse SDE, in float64: noises[j] is the draw of the
  j-th step taken (from t = 1 down)."""
  timesteps = np.append(0.0, np.linspace(eps, 1.0, steps))
  for j, (s, t) in enumerate(list(zip(timesteps, timesteps[1:]))[::-1]):
    beta = B0 + t * (B1 - B0)
    cum_beta = 1.0 - np.exp(-(B0 * t + 0.5 * (B1 - B0) * t ** 2))
    score = -eps_fn(x, t) / np.sqrt(cum_beta)
    drift = -0.5 * beta * x - beta * score       # f(x, t) - g(t)^2 score
    dt = s - t
    mean = x + drift * dt
    x = mean + np.sqrt(beta) * np.sqrt(-dt) * noises[j] if s != 0 else mean
  return x


def _run_solver(solver, x, eps_fn, key):
  """Drives solver.update step by step (keys fold_in(key, i), as the compiled sampler)."""
  update = jax.jit(solver.update)
  state = solver.init_state(jnp.asarray(x, jnp.float32))
  for i in range(solver.num_steps):
    eps = exact_eps(np.asarray(state[0], np.float64), solver.times[i]).astype(np.float32)
    state = update(i, state, jnp.asarray(eps), jax.random.fold_in(key, i))
  return np.asarray(state[0], np.float64)


def test_euler_maruyama_matches_the_numpy_loop():
  steps, key = 200, jax.random.PRNGKey(0)
  x = np.random.default_rng(0).standard_normal((4, 6))
  solver = sde.euler_maruyama(steps)
  assert solver.num_steps == steps and solver.times[0] == 1.0 and solver.t_end == 0.0
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape), np.float64)
            for i in range(steps)]
  want = numpy_euler_maruyama(x, steps, noises, exact_eps)
  got = _run_solver(solver, x, exact_eps, key)
  err = np.abs(got - want).max()
  print(f'\n[EM-{steps}] max |ours - numpy| {err:.2e} (|x| up to {np.abs(want).max():.2f})')
  assert err <= 1e-6
  assert 0.1 < want.std() < 0.6  # samples of N(0, 0.3^2), roughly


# ---------------------------------------------------------------------------------------------
# DPM-Solver (U-ViT's dpm_solver_pytorch.py, re-implemented in numpy).
# ---------------------------------------------------------------------------------------------

class NumpyDPMSolver:
  """dpm_solver_pytorch.py's NoiseScheduleVP('linear') + DPM_Solver, fast version, float64."""

  def __init__(self, model_fn):
    self.model_fn = model_fn

  @staticmethod
  def marginal_log_mean_coeff(t):
    return -0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0

  def marginal_std(self, t):
    return np.sqrt(1.0 - np.exp(2.0 * self.marginal_log_mean_coeff(t)))

  def marginal_lambda(self, t):
    log_mean_coeff = self.marginal_log_mean_coeff(t)
    return log_mean_coeff - 0.5 * np.log(1.0 - np.exp(2.0 * log_mean_coeff))

  @staticmethod
  def inverse_lambda(lamb):
    tmp = 2.0 * (B1 - B0) * np.logaddexp(-2.0 * lamb, 0.0)
    delta = B0 ** 2 + tmp
    return tmp / (np.sqrt(delta) + B0) / (B1 - B0)

  def get_time_steps_for_dpm_solver_fast(self, t_T, t_0, steps):
    K = steps // 3 + 1
    if steps % 3 == 0:
      orders = [3] * (K - 2) + [2, 1]
    elif steps % 3 == 1:
      orders = [3] * (K - 1) + [1]
    else:
      orders = [3] * (K - 1) + [2]
    lambdas = np.linspace(self.marginal_lambda(t_T), self.marginal_lambda(t_0), K + 1)
    return orders, self.inverse_lambda(lambdas)

  def first_update(self, x, s, t):
    ls, lt = self.marginal_lambda(s), self.marginal_lambda(t)
    h = lt - ls
    noise_s = self.model_fn(x, s)
    return (np.exp(self.marginal_log_mean_coeff(t) - self.marginal_log_mean_coeff(s)) * x
            - self.marginal_std(t) * np.expm1(h) * noise_s)

  def second_update(self, x, s, t, r1=0.5):
    la = self.marginal_log_mean_coeff
    ls, lt = self.marginal_lambda(s), self.marginal_lambda(t)
    h = lt - ls
    s1 = self.inverse_lambda(ls + r1 * h)
    phi_11, phi_1 = np.expm1(r1 * h), np.expm1(h)
    noise_s = self.model_fn(x, s)
    x_s1 = np.exp(la(s1) - la(s)) * x - self.marginal_std(s1) * phi_11 * noise_s
    noise_s1 = self.model_fn(x_s1, s1)
    sig_t = self.marginal_std(t)
    return (np.exp(la(t) - la(s)) * x - sig_t * phi_1 * noise_s
            - (0.5 / r1) * sig_t * phi_1 * (noise_s1 - noise_s))

  def third_update(self, x, s, t, r1=1.0 / 3.0, r2=2.0 / 3.0):
    la = self.marginal_log_mean_coeff
    ls, lt = self.marginal_lambda(s), self.marginal_lambda(t)
    h = lt - ls
    s1, s2 = self.inverse_lambda(ls + r1 * h), self.inverse_lambda(ls + r2 * h)
    sig_s1, sig_s2, sig_t = self.marginal_std(s1), self.marginal_std(s2), self.marginal_std(t)
    phi_11, phi_12, phi_1 = np.expm1(r1 * h), np.expm1(r2 * h), np.expm1(h)
    phi_22 = np.expm1(r2 * h) / (r2 * h) - 1.0
    phi_2 = np.expm1(h) / h - 1.0
    noise_s = self.model_fn(x, s)
    x_s1 = np.exp(la(s1) - la(s)) * x - sig_s1 * phi_11 * noise_s
    noise_s1 = self.model_fn(x_s1, s1)
    x_s2 = (np.exp(la(s2) - la(s)) * x - sig_s2 * phi_12 * noise_s
            - r2 / r1 * sig_s2 * phi_22 * (noise_s1 - noise_s))
    noise_s2 = self.model_fn(x_s2, s2)
    return (np.exp(la(t) - la(s)) * x - sig_t * phi_1 * noise_s
            - (1.0 / r2) * sig_t * phi_2 * (noise_s2 - noise_s))

  def sample(self, x, steps, eps=1e-4, t_T=1.0):
    orders, timesteps = self.get_time_steps_for_dpm_solver_fast(t_T, eps, steps)
    for i, order in enumerate(orders):
      update = {1: self.first_update, 2: self.second_update, 3: self.third_update}[order]
      x = update(x, timesteps[i], timesteps[i + 1])
    return x


@pytest.mark.parametrize('steps', [25, 50, 7, 3])
def test_dpm_solver_matches_the_original_logic(steps):
  x = np.random.default_rng(steps).standard_normal((3, 5))
  calls = []

  def model_fn(z, t):
    calls.append(float(t))
    return exact_eps(z, t)

  want = NumpyDPMSolver(model_fn).sample(x, steps)
  solver = sde.dpm_solver(steps)
  assert solver.num_steps == steps == len(calls)
  np.testing.assert_allclose(solver.times, calls, rtol=1e-12)  # the same evaluation times
  got = _run_solver(solver, x, exact_eps, jax.random.PRNGKey(0))
  err = np.abs(got - want).max()
  # The probability-flow ODE of N(0, S2) data scales x by std(x_t) / std(x_T).
  a0, s0 = _alpha_sigma(1e-4)
  a1, s1 = _alpha_sigma(1.0)
  exact = x * np.sqrt(a0 ** 2 * S2 + s0 ** 2) / np.sqrt(a1 ** 2 * S2 + s1 ** 2)
  print(f'\n[DPM-{steps}] max |ours - numpy DPM-Solver| {err:.2e}, |numpy - exact ODE| '
        f'{np.abs(want - exact).max():.2e}')
  # float32 rounding grows with the step: at 3 or 7 evaluations h ~ 5 or 2, e^h ~ 100 or 8.
  assert err <= (1e-6 if steps >= 25 else 1e-4)
  if steps >= 25:  # DPM-Solver-fast converges to the ODE's solution (0.4 % at 25, 0.05 % at 50)
    assert np.abs(want - exact).max() <= (1e-2 if steps == 25 else 2e-3) * np.abs(exact).max()


def test_dpm_solver_partial_start_only_at_a_step_start():
  solver = sde.dpm_solver(25)
  np.testing.assert_array_equal(np.nonzero(solver.coefs['first'])[0], np.arange(0, 25, 3))
  assert solver.starting_at(3) is solver
  with pytest.raises(ValueError, match='intermediate evaluation'):
    solver.starting_at(4)


# ---------------------------------------------------------------------------------------------
# Compiled with gates on a tiny U-ViT.
# ---------------------------------------------------------------------------------------------

TINY = uvit.UViTSpec(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4,
                     mlp_ratio=2, conv=True)
BATCH = 2


@pytest.fixture(scope='module')
def tiny():
  model = models.UViT(TINY)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(1)  # random weights of size ~1 / sqrt(fan-in): blocks matter
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.standard_normal(a.shape) / np.sqrt(max(a.shape[0], 1)) * 0.5
                            if a.ndim >= 2 else 0.1 * rng.standard_normal(a.shape), jnp.float32),
      shapes)
  return model, params


def _policy(model):
  # ASE's D1 on the tiny U-ViT's 2 decoder blocks, plus an encoder block off near the noise.
  matrix = ase.named_schedule('D1-U-ViT', model.units).matrix.copy()
  matrix[0, 8:] = False
  return policies.SchedulePolicy(matrix, name='test')


def _loop(model, params, solver, policy, rng):
  """The sampler by hand: x_T and keys as the program draws them, the network at 999 t with
  the mask of t's tenth of time, numpy update rules (EM: U-ViT's; DPM: dpm_solver_pytorch's)."""
  init_key, step_key = jax.random.split(rng)
  x = np.asarray(jax.random.normal(init_key, (BATCH,) + model.input.shape), np.float64)
  apply = jax.jit(model.apply, static_argnames='gates')

  def model_fn(z, t):
    interval = int(np.clip(np.ceil(t * 10 - 1e-9) - 1, 0, 9))
    keep = gates.StaticMask(tuple(policy.matrix[:, interval]))
    t_in = jnp.full((BATCH,), 999 * t, jnp.float32)
    return np.asarray(apply({'params': params}, jnp.asarray(z, jnp.float32), t_in, gates=keep),
                      np.float64)

  if solver.name == 'dpm_solver':
    return NumpyDPMSolver(model_fn).sample(x, solver.num_steps)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(step_key, i), x.shape), np.float64)
            for i in range(solver.num_steps)]
  return numpy_euler_maruyama(x, solver.num_steps, noises, model_fn)


@pytest.mark.parametrize('name,steps', [('euler_maruyama', 20), ('dpm_solver', 10)])
def test_compiled_sampler_with_gates(tiny, name, steps):
  model, params = tiny
  solver = sde.make_solver(name, steps)
  policy = _policy(model)
  rng = jax.random.PRNGKey(5)
  seg = samplers.compile_sampler(model, solver, policy, BATCH, path='segments')
  cond = samplers.compile_sampler(model, solver, policy, BATCH, path='cond')
  out_seg, out_cond = np.asarray(seg(params, rng)), np.asarray(cond(params, rng))
  assert len(seg.segments) > 1 and seg.block_ratio < 1.0
  assert np.abs(out_seg - out_cond).max() <= 1e-5 * max(1.0, np.abs(out_seg).max())
  want = _loop(model, params, solver, policy, rng)
  full = np.asarray(samplers.compile_sampler(model, solver, policies.FullPolicy(), BATCH)(
      params, rng))
  err = np.abs(out_seg - want).max()
  print(f'\n[{name}-{steps} on a tiny U-ViT] max |compiled - loop| {err:.2e} (|x| up to '
        f'{np.abs(want).max():.2f}); the gates change it by {np.abs(full - out_seg).max():.2e}')
  assert err <= 1e-4 * max(1.0, np.abs(want).max())
  assert np.abs(full - out_seg).max() > 1e-3  # the policy matters


def test_noise_to_step_is_the_marginal():
  solver = sde.dpm_solver(25)
  x0 = np.ones((2, 4, 4, 3), np.float32)
  noise = np.full_like(x0, 2.0)
  a, s = _alpha_sigma(solver.times[3])
  np.testing.assert_allclose(sde.noise_to_step(solver, x0, 3, noise), a + 2 * s, rtol=1e-6)
