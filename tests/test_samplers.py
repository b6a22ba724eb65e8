"""Samplers: agreement with independent step-by-step references, path equivalence, and
recovery of a 1-D Gaussian under an analytically known epsilon-predictor."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import scale_residual_branches
from lees_jax import data, diffusion, gates, policies, samplers

T = 1000
SCHED = diffusion.make_schedule(T)


def _eps_fn(model, params, keep=None):
  mask = None if keep is None else gates.StaticMask(tuple(keep))
  fn = jax.jit(lambda x, t: model.apply({'params': params}, x, jnp.full((x.shape[0],), t), gates=mask))
  return lambda x, t: np.asarray(fn(jnp.asarray(x, jnp.float32), int(t)), np.float64)


def _keys(rng, steps):
  init_key, step_rng = jax.random.split(rng)
  return init_key, [jax.random.fold_in(step_rng, i) for i in range(steps)]


def _normal(key, shape):
  return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


def reference_ddpm(eps, shape, rng, use, clip=True):
  """improved-diffusion's respaced p_sample loop, written out in float64."""
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[use]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1 - abar / abar_prev
  post_var = betas * (1 - abar_prev) / (1 - abar)
  large_var = np.append(post_var[1], betas[1:])
  init_key, keys = _keys(rng, len(use))
  x = _normal(init_key, shape)
  for i, j in enumerate(reversed(range(len(use)))):
    e = eps(x, use[j])
    x0 = np.sqrt(1 / abar[j]) * x - np.sqrt(1 / abar[j] - 1) * e
    if clip:
      x0 = np.clip(x0, -1, 1)
    mean = (betas[j] * np.sqrt(abar_prev[j]) / (1 - abar[j]) * x0
            + (1 - abar_prev[j]) * np.sqrt(1 - betas[j]) / (1 - abar[j]) * x)
    noise = _normal(keys[i], shape)
    x = mean + (np.sqrt(large_var[j]) * noise if j > 0 else 0.0)
  return x


def reference_ddim(eps, shape, rng, use, eta=0.0, clip=True):
  abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
  init_key, keys = _keys(rng, len(use))
  x = _normal(init_key, shape)
  seq = list(reversed(use))
  for i, t in enumerate(seq):
    a = abar_all[t]
    a_next = abar_all[seq[i + 1]] if i + 1 < len(seq) else 1.0
    e = eps(x, t)
    x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    if clip:
      x0 = np.clip(x0, -1, 1)
    e = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    sigma = eta * np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next - sigma ** 2) * e + sigma * _normal(keys[i], shape)
  return x


def reference_dpmpp_2m(eps, shape, rng, use, clip=True):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), final step to the clean sample."""
  abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
  init_key, _ = _keys(rng, len(use))
  x = _normal(init_key, shape)
  seq = list(reversed(use))
  alpha = lambda t: np.sqrt(abar_all[t])  # noqa: E731
  sigma = lambda t: np.sqrt(1 - abar_all[t])  # noqa: E731
  lam = lambda t: np.log(alpha(t) / sigma(t))  # noqa: E731
  prev_d, prev_lam = None, None
  for i, t in enumerate(seq):
    e = eps(x, t)
    d_i = (x - sigma(t) * e) / alpha(t)
    if clip:
      d_i = np.clip(d_i, -1, 1)
    if i + 1 == len(seq):
      return d_i
    s = seq[i + 1]
    h = lam(s) - lam(t)
    if prev_d is None:
      d = d_i
    else:
      r = (lam(t) - prev_lam) / h
      d = (1 + 1 / (2 * r)) * d_i - 1 / (2 * r) * prev_d
    x = sigma(s) / sigma(t) * x - alpha(s) * (np.exp(-h) - 1) * d
    prev_d, prev_lam = d_i, lam(t)
  return x


@pytest.mark.parametrize('name,steps', [('ddpm', 5), ('ddim', 4), ('dpm_solver++', 5)])
def test_sampler_matches_independent_reference(tiny_model, name, steps):
  model, params = tiny_model
  solver = samplers.make_solver(SCHED, name, steps, eta=0.0)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), batch_size=2)
  rng = jax.random.PRNGKey(3)
  got = np.asarray(prog(params, rng))
  shape = (2, 32, 32, 3)
  eps = _eps_fn(model, params)
  if name == 'ddpm':
    want = reference_ddpm(eps, shape, rng, diffusion.space_timesteps(T, str(steps)))
  elif name == 'ddim':
    want = reference_ddim(eps, shape, rng, list(range(0, T, T // steps)))
  else:
    want = reference_dpmpp_2m(eps, shape, rng, diffusion.space_timesteps(T, str(steps)))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)


def test_ddim_with_eta_matches_reference(tiny_model):
  model, params = tiny_model
  solver = samplers.make_solver(SCHED, 'ddim', 4, eta=0.7)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), batch_size=2)
  rng = jax.random.PRNGKey(5)
  want = reference_ddim(_eps_fn(model, params), (2, 32, 32, 3), rng, list(range(0, T, 250)), eta=0.7)
  np.testing.assert_allclose(np.asarray(prog(params, rng)), want, atol=2e-4, rtol=1e-3)


def _policy_with_flips(k, seed):
  rng = np.random.default_rng(seed)
  return policies.LeesPolicy(rng.normal(0, 8, k), rng.normal(0, 3, k))


@pytest.mark.parametrize('name', ['ddpm', 'dpm_solver++'])
def test_segments_cond_and_per_step_masks_agree(tiny_model, name):
  model, params = tiny_model
  k = model.num_units
  solver = samplers.make_solver(SCHED, name, 6)
  policy = _policy_with_flips(k, 1)
  seg = samplers.compile_sampler(model, solver, policy, 2, path='segments')
  cond = samplers.compile_sampler(model, solver, policy, 2, path='cond')
  assert 1 < len(seg.segments) < solver.num_steps + 1
  rng = jax.random.PRNGKey(0)
  a, b = np.asarray(seg(params, rng)), np.asarray(cond(params, rng))
  np.testing.assert_allclose(a, b, atol=1e-4)
  # Per-step masked sampling: a plain Python loop with the step's StaticMask.
  init_key, step_rng = jax.random.split(rng)
  x = jax.random.normal(init_key, (2, 32, 32, 3))
  state = solver.init_state(x)
  for i, t in enumerate(solver.timesteps):
    eps = model.apply({'params': params}, state[0], jnp.full((2,), t),
                      gates=gates.StaticMask(tuple(seg.masks[i])))
    state = solver.update(i, state, eps, jax.random.fold_in(step_rng, i))
  np.testing.assert_allclose(a, np.asarray(state[0]), atol=1e-4)
  assert seg.block_ratio == pytest.approx(seg.masks.mean())
  assert 0 < seg.flop_fraction < 1


def test_all_ones_policy_equals_ungated_sampler(tiny_model):
  model, params = tiny_model
  k = model.num_units
  solver = samplers.make_solver(SCHED, 'ddpm', 4)
  rng = jax.random.PRNGKey(1)
  on = policies.LeesPolicy(np.zeros(k), np.full(k, 5.0))  # logit 5 > 0 at every t
  full = np.asarray(samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)(params, rng))
  ones = np.asarray(samplers.compile_sampler(model, solver, on, 2)(params, rng))
  np.testing.assert_array_equal(full, ones)
  cond = np.asarray(samplers.compile_sampler(model, solver, on, 2, path='cond')(params, rng))
  np.testing.assert_allclose(cond, full, atol=1e-4)
  # Reference loop with no gates argument at all.
  want = reference_ddpm(_eps_fn(model, params), (2, 32, 32, 3), rng, diffusion.space_timesteps(T, '4'))
  np.testing.assert_allclose(full, want, atol=2e-4, rtol=1e-3)


def test_soft_policy_blends_units(tiny_model):
  """Soft LEES gates between 0.3 and 0.7, changing with t, against a float64 DDIM loop whose
  epsilon at timestep s is the ungated model with every unit blended by g_k(s) by hand."""
  model, params = tiny_model
  k = model.num_units
  lo, hi = np.log(0.3 / 0.7), np.log(0.7 / 0.3)       # logit(0.3), logit(0.7)
  up = np.arange(k) % 2 == 0                            # g: 0.3 -> 0.7, or 0.7 -> 0.3, over t
  alpha, beta = np.where(up, hi - lo, lo - hi), np.where(up, lo, hi)
  pol = policies.LeesPolicy(alpha, beta, form='soft')
  solver = samplers.make_solver(SCHED, 'ddim', 4)
  use = list(range(0, T, 250))
  rng = jax.random.PRNGKey(0)
  got = np.asarray(samplers.compile_sampler(model, solver, pol, 2)(params, rng))

  apply = jax.jit(lambda p, x, t: model.apply({'params': p}, x, jnp.full((x.shape[0],), t)))

  def eps(x, s):
    g = 1 / (1 + np.exp(-(alpha * (s + 1) / T + beta)))
    assert 0.29 < g.min() and g.max() < 0.71
    out = apply(scale_residual_branches(params, model.units, g.astype(np.float32)), jnp.asarray(x, jnp.float32), int(s))
    return np.asarray(out, np.float64)

  want = reference_ddim(eps, (2, 32, 32, 3), rng, use)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)  # measured 1.2e-5 (values up to 1)
  full = np.asarray(samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)(params, rng))
  assert np.abs(got - full).max() > 1e-2  # the blend matters
  with pytest.raises(ValueError, match='soft'):
    samplers.compile_sampler(model, solver, pol, 2, path='segments')


def test_segmented_program_omits_skipped_units(tiny_model):
  model, params = tiny_model
  k = model.num_units
  solver = samplers.make_solver(SCHED, 'ddpm', 4)
  none = policies.SchedulePolicy(np.zeros((k, 1), bool))
  full = samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)
  skip = samplers.compile_sampler(model, solver, none, 2)
  rng = jax.random.PRNGKey(0)
  n_full = full.lower(params, rng).as_text().count('stablehlo.convolution')
  n_none = skip.lower(params, rng).as_text().count('stablehlo.convolution')
  shortcuts = sum(u.kind == 'res' and u.in_ch != u.out_ch for u in model.units)
  assert n_none == 2 + 2 + shortcuts  # conv_in/out, down/upsample, 1x1 projections only
  assert n_full > n_none + 2 * sum(u.kind == 'res' for u in model.units) - 1


@pytest.mark.parametrize('name', ['ddim', 'dpm_solver++', 'ddpm'])
def test_recovers_1d_gaussian_with_analytic_eps(name):
  """Data x0 ~ N(mu, s^2): the optimal predictor is
  E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar)."""
  mu, s = 0.3, 0.5
  # 200 steps: the time-uniform 50-step grid has a ~5% discretisation error in the std on
  # this problem (diffusers' DPM-Solver++ gives the same number, see the test below).
  solver = samplers.make_solver(SCHED, name, 200, spacing='200', clip_x0=False)
  abar = SCHED.alphas_cumprod

  def eps(x, t):
    a = jnp.asarray(abar, jnp.float32)[t]
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)

  @jax.jit
  def run(rng):
    init_key, step_rng = jax.random.split(rng)
    x = jax.random.normal(init_key, (40_000, 1))
    ts = jnp.asarray(solver.timesteps)
    body = lambda i, st: solver.update(i, st, eps(st[0], ts[i]), jax.random.fold_in(step_rng, i))  # noqa: E731
    return jax.lax.fori_loop(0, solver.num_steps, body, solver.init_state(x))[0]

  x = np.asarray(run(jax.random.PRNGKey(0)), np.float64)
  assert x.mean() == pytest.approx(mu, abs=0.01)
  assert x.std() == pytest.approx(s, rel=0.03)


@pytest.mark.parametrize('name', ['dpm_solver++', 'ddim'])
def test_matches_diffusers_schedulers(name):
  """diffusers' DPMSolverMultistepScheduler (2M, dpmsolver++) and DDIMScheduler on the same
  timesteps and the same analytic epsilon give the same trajectory."""
  torch = pytest.importorskip('torch')
  dsched = pytest.importorskip('diffusers')
  mu, s = 0.3, 0.5
  abar = SCHED.alphas_cumprod
  eps = lambda x, t: np.sqrt(1 - abar[t]) * (x - np.sqrt(abar[t]) * mu) / (abar[t] * s * s + 1 - abar[t])  # noqa: E731
  solver = samplers.make_solver(SCHED, name, 50, clip_x0=False)
  common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule='linear')
  if name == 'ddim':
    ref = dsched.DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True)
    ref.set_timesteps(50)
    assert list(ref.timesteps.numpy()) == list(solver.timesteps)
  else:
    ref = dsched.DPMSolverMultistepScheduler(**common, algorithm_type='dpmsolver++', solver_order=2)
    ref.set_timesteps(timesteps=list(solver.timesteps))
  x_t = np.random.default_rng(0).normal(size=(512, 1))
  x = torch.tensor(x_t, dtype=torch.float64)
  for t in ref.timesteps:
    x = ref.step(torch.tensor(eps(x.numpy(), int(t))), t, x).prev_sample
  state = solver.init_state(jnp.asarray(x_t, jnp.float32))
  for i, t in enumerate(solver.timesteps):
    e = jnp.asarray(eps(np.asarray(state[0], np.float64), int(t)), jnp.float32)
    state = solver.update(i, state, e, jax.random.PRNGKey(0))
  # Measured: 3.6e-6 (DPM-Solver++), 2.0e-6 (DDIM) on values up to 1.9 (README: 4e-6).
  np.testing.assert_allclose(np.asarray(state[0]), x.numpy(), atol=5e-6, rtol=0)


@pytest.mark.parametrize('variance', ['fixed_large', 'fixed_small'])
def test_ddpm_matches_diffusers_ddpm_scheduler(variance, monkeypatch):
  """Respaced ancestral DDPM against diffusers' DDPMScheduler on the same 50 custom timesteps
  (improved-diffusion's space_timesteps(1000, "50")), the same epsilon function and the same
  noise (diffusers' randn_tensor replaced by our per-step draw), step by step, x0 clipped.
  diffusers' "fixed_large" is the respaced beta_t = 1 - abar_t / abar_prev, "fixed_small" the
  respaced posterior variance, both with no noise on the last step (t = 0)."""
  torch = pytest.importorskip('torch')
  dsched = pytest.importorskip('diffusers')
  from diffusers.schedulers import scheduling_ddpm
  abar = SCHED.alphas_cumprod

  def eps(x, t):  # nonlinear in x, depends on t; large enough that x0 clipping is active
    return np.tanh(1.5 * x + 0.3) * np.sqrt(1 - abar[t]) + 0.2 * np.sin(3 * x) * abar[t]

  solver = samplers.make_solver(SCHED, 'ddpm', 50, variance=variance)
  assert solver.variance == variance and f'variance {variance}' in solver.describe()
  assert list(solver.timesteps) == sorted(diffusion.space_timesteps(T, '50'), reverse=True)
  ref = dsched.DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                             beta_schedule='linear', variance_type=variance, clip_sample=True)
  ref.set_timesteps(timesteps=[int(t) for t in solver.timesteps])
  assert list(ref.timesteps.numpy()) == list(solver.timesteps)

  shape = (4, 8, 8, 3)
  rng = jax.random.PRNGKey(11)
  keys = [jax.random.fold_in(rng, i) for i in range(solver.num_steps)]
  drawn = []
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                      lambda shp, **kw: torch.tensor(drawn[-1], dtype=kw.get('dtype', torch.float64)))
  x_init = np.random.default_rng(0).normal(size=shape)
  x_ref = torch.tensor(x_init, dtype=torch.float64)
  state = solver.init_state(jnp.asarray(x_init, jnp.float32))
  update = jax.jit(solver.update)
  worst, clipped = 0.0, 0
  for i, t in enumerate(solver.timesteps):
    drawn.append(_normal(keys[i], shape))  # the very draw our update makes from keys[i]
    e = eps(x_ref.numpy(), int(t))
    clipped += int((np.abs((x_ref.numpy() - np.sqrt(1 - abar[t]) * e) / np.sqrt(abar[t])) > 1).any())
    x_ref = ref.step(torch.tensor(e), int(t), x_ref).prev_sample
    e_ours = jnp.asarray(eps(np.asarray(state[0], np.float64), int(t)), jnp.float32)
    state = update(i, state, e_ours, keys[i])
    diff = np.abs(np.asarray(state[0], np.float64) - x_ref.numpy()).max()
    worst = max(worst, diff)
    assert diff < 1e-5, (i, int(t), diff)  # measured 6.1e-6 (large) / 7.6e-6 (small), |x| <= ~3
  assert clipped > 5  # the clip path is exercised
  print(f'\n[ddpm {variance}] max |ours - diffusers| over 50 steps: {worst:.2e}')
  # The two variances are really different samplers on this problem.
  other = samplers.make_solver(SCHED, 'ddpm', 50,
                               variance={'fixed_large': 'fixed_small', 'fixed_small': 'fixed_large'}[variance])
  assert np.abs(other.coefs['sigma'] - solver.coefs['sigma'])[:-1].max() > 1e-3


def test_ddpm_variances_by_hand():
  """fixed_small / fixed_large on a 3-step respacing of T = 1000, from the schedule by hand."""
  use = [0, 500, 999]
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[use]
  beta = 1 - ab / np.append(1.0, ab[:-1])
  small = beta * (1 - np.append(1.0, ab[:-1])) / (1 - ab)
  for variance, want in [('fixed_large', beta), ('fixed_small', small)]:
    solver = samplers.make_solver(SCHED, 'ddpm', 3, spacing='3', variance=variance)
    assert list(solver.timesteps) == use[::-1]
    # sampling order: t = 999, 500, then the last step (t = 0) adds no noise
    np.testing.assert_allclose(solver.coefs['sigma'], [np.sqrt(want[2]), np.sqrt(want[1]), 0.0],
                               rtol=1e-12)
  with pytest.raises(ValueError, match='variance'):
    samplers.make_solver(SCHED, 'ddpm', 3, variance='learned')
  assert samplers.make_solver(SCHED, 'ddim', 4).variance is None


def test_solver_from_config_variance(tiny_model):
  from configs import cifar10
  c = cifar10.get_config('tiny')
  # The default is the posterior variance (README: which "50 DDPM steps").
  assert samplers.solver_from_config(c.diffusion, c.sampler).variance == 'fixed_small'
  assert cifar10.get_config('paper').sampler.variance == 'fixed_small'
  sampler = c.sampler.to_dict()
  sampler['variance'] = 'fixed_large'
  import ml_collections
  solver = samplers.solver_from_config(c.diffusion, ml_collections.ConfigDict(sampler))
  assert solver.variance == 'fixed_large'
  assert solver.describe() == f'ddpm, {c.sampler.steps} steps, variance fixed_large'
  # The compiled program says which sampler (and variance) it runs (compile_sampler only traces
  # lazily: nothing is compiled here).
  prog = samplers.compile_sampler(tiny_model[0], solver, policies.FullPolicy(), 2)
  assert prog.sampler == solver.describe()


def test_bad_sampler_config():
  with pytest.raises(ValueError, match='unknown sampler'):
    samplers.make_solver(SCHED, 'euler', 10)
  with pytest.raises(ValueError, match='steps'):
    samplers.make_solver(SCHED, 'ddim', 900)  # ceil(1000 / stride) is never 900


def test_to_uint8():
  np.testing.assert_array_equal(data.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
