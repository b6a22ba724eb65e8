"""Robustness (ΔFID on corrupted inputs): the partial-run sampler against float64 loops written
out by hand, the definition on known answers and hand-computed Fréchet distances, and the
reviewer's test -- a heavily degraded policy cannot look more robust than the full model -- on
the trained quick-start backbone and real CIFAR-10 images with the real FID network."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from conftest import scale_residual_branches
from configs import cifar10
from lees_jax import checkpoints, data, diffusion, evaluate, fid, models, policies, robustness, samplers

T = 1000
SCHED = diffusion.make_schedule(T)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, T))  # the DDPM linear schedule, by hand


def _normal(key, shape):
  return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


def _hard_policy(k, seed=1):
  rng = np.random.default_rng(seed)
  return policies.LeesPolicy(rng.normal(0, 8, k), rng.normal(0, 3, k))


def _weights_by_hand(policy, timesteps):
  """(steps, K) unit weights from g_k(t) = sigmoid(alpha_k t + beta_k), t = (timestep + 1) / T:
  the logit's sign for hard gates, the sigmoid for soft ones."""
  t = (np.asarray(timesteps, np.float64) + 1) / T
  logit = policy.alpha[None, :].astype(np.float64) * t[:, None] + policy.beta[None, :]
  return 1 / (1 + np.exp(-logit)) if policy.soft else (logit > 0).astype(np.float64)


# --- float64 solvers from sampling step i0 (seq: the kept timesteps, noisiest first) ----------


def _ddpm_from(eps, x, seq, i0, keys):
  """improved-diffusion's respaced p_sample ("fixed_large"), steps i0..S-1."""
  use = seq[::-1]
  abar = ABAR[use]
  abar_prev = np.append(1.0, abar[:-1])
  betas = 1 - abar / abar_prev
  large_var = np.append(betas[1] * (1 - abar_prev[1]) / (1 - abar[1]), betas[1:])
  for i in range(i0, len(seq)):
    j = len(seq) - 1 - i
    x0 = np.clip(np.sqrt(1 / abar[j]) * x - np.sqrt(1 / abar[j] - 1) * eps(i, x, seq[i]), -1, 1)
    mean = (betas[j] * np.sqrt(abar_prev[j]) / (1 - abar[j]) * x0
            + (1 - abar_prev[j]) * np.sqrt(1 - betas[j]) / (1 - abar[j]) * x)
    x = mean + (np.sqrt(large_var[j]) * _normal(keys[i], x.shape) if j > 0 else 0.0)
  return x


def _ddim_from(eps, x, seq, i0, keys, eta):
  for i in range(i0, len(seq)):
    a = ABAR[seq[i]]
    a_next = ABAR[seq[i + 1]] if i + 1 < len(seq) else 1.0
    x0 = np.clip((x - np.sqrt(1 - a) * eps(i, x, seq[i])) / np.sqrt(a), -1, 1)
    e = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
    sigma = eta * np.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
    x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next - sigma ** 2) * e + sigma * _normal(keys[i], x.shape)
  return x


def _dpmpp_2m_from(eps, x, seq, i0, keys):
  """DPM-Solver++(2M) started at i0: no history there, so its first step is first order."""
  del keys
  alpha, sigma = (lambda t: np.sqrt(ABAR[t])), (lambda t: np.sqrt(1 - ABAR[t]))
  lam = lambda t: np.log(alpha(t) / sigma(t))  # noqa: E731
  prev = None
  for i in range(i0, len(seq)):
    t = seq[i]
    d_i = np.clip((x - sigma(t) * eps(i, x, t)) / alpha(t), -1, 1)
    if i + 1 == len(seq):
      return d_i
    s = seq[i + 1]
    h = lam(s) - lam(t)
    if prev is None:
      d = d_i
    else:
      r = (lam(t) - prev[1]) / h
      d = (1 + 1 / (2 * r)) * d_i - 1 / (2 * r) * prev[0]
    x = sigma(s) / sigma(t) * x - alpha(s) * (np.exp(-h) - 1) * d
    prev = (d_i, lam(t))
  return x


@pytest.mark.parametrize('name,path', [('ddpm', 'segments'), ('dpm_solver++', 'cond'),
                                       ('ddim', 'soft')])
def test_partial_run_matches_float64_loop(tiny_model, name, path):
  """Noise x0 to step i0 and run the policy's sampler from there, against the same solver
  written out in float64 whose epsilon at step i is the ungated model with every unit's
  residual branch scaled by that step's weight (0/1 hard, g_k(t) soft)."""
  model, params = tiny_model
  k = model.num_units
  solver = samplers.make_solver(SCHED, name, 6, spacing='6', eta=0.5 if name == 'ddim' else 0.0)
  seq = [int(t) for t in solver.timesteps]
  assert seq == [999, 799, 599, 400, 200, 0]
  i0 = samplers.start_step(solver, 0.5)
  assert i0 == 3  # the first timestep <= 500
  policy = _hard_policy(k)
  if path == 'soft':
    policy = policies.LeesPolicy(policy.alpha / 4, policy.beta / 4, form='soft')
  weights = _weights_by_hand(policy, seq)
  prog = samplers.compile_sampler(model, solver, policy, 2, path=path, start_step=i0)
  assert isinstance(prog, samplers.PartialSampleProgram) and prog.start_step == i0
  if path != 'soft':  # segments cover exactly the steps run; ratios count only those
    np.testing.assert_array_equal(prog.masks, weights[i0:] > 0)
    assert len(prog.segments) > 1 and prog.segments[0].start == i0 and prog.segments[-1].stop == 6
    assert all(a.stop == b.start for a, b in zip(prog.segments, prog.segments[1:]))
    assert prog.block_ratio == pytest.approx(weights[i0:].mean())
    assert prog.flop_fraction != samplers.compile_sampler(model, solver, policy, 2, path=path).flop_fraction

  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (2, 32, 32, 3))
  noise = rng.normal(size=x0.shape)
  x_t = samplers.noise_to_step(SCHED, solver, x0, i0, noise)
  want_t = np.sqrt(ABAR[400]) * x0 + np.sqrt(1 - ABAR[400]) * noise
  np.testing.assert_allclose(np.asarray(x_t), want_t, atol=1e-6)

  key = jax.random.PRNGKey(7)
  step_rng = jax.random.split(key)[1]  # the full program's per-step keys: fold_in(., i)
  keys = [jax.random.fold_in(step_rng, i) for i in range(6)]
  apply = jax.jit(lambda p, x, t: model.apply({'params': p}, x, jnp.full((x.shape[0],), t)))

  def eps(i, x, t):
    scaled = scale_residual_branches(params, model.units, weights[i].astype(np.float32))
    return np.asarray(apply(scaled, jnp.asarray(x, jnp.float32), t), np.float64)

  loop = {'ddpm': _ddpm_from, 'dpm_solver++': _dpmpp_2m_from,
          'ddim': lambda *a: _ddim_from(*a, eta=0.5)}[name]
  want = loop(eps, want_t, seq, i0, keys)
  got = np.asarray(prog(params, key, x_t))
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
  assert np.abs(got - np.clip(want_t, -1, 1)).max() > 1e-2  # the steps did something


@pytest.mark.parametrize('path', ['segments', 'cond', 'soft'])
def test_start_step_zero_is_the_full_program_bitwise(tiny_model, path):
  model, params = tiny_model
  policy = _hard_policy(model.num_units, seed=2)
  if path == 'soft':
    policy = policies.LeesPolicy(policy.alpha, policy.beta, form='soft')
  solver = samplers.make_solver(SCHED, 'ddpm', 4)
  full = samplers.compile_sampler(model, solver, policy, 2, path=path)
  part = samplers.compile_sampler(model, solver, policy, 2, path=path, start_step=0)
  rng = jax.random.PRNGKey(3)
  x_T = jax.random.normal(jax.random.split(rng)[0], (2, 32, 32, 3), jnp.float32)
  np.testing.assert_array_equal(np.asarray(full(params, rng)), np.asarray(part(params, rng, x_T)))
  assert (part.block_ratio, part.flop_fraction, part.segments) == \
      (full.block_ratio, full.flop_fraction, full.segments)
  with pytest.raises(ValueError, match='shape'):
    part(params, rng, x_T[:1])


def test_start_step_rule_and_dpm_restart():
  ddim = samplers.make_solver(SCHED, 'ddim', 10)  # 900, 800, ..., 0
  assert [samplers.start_step(ddim, t) for t in (1.0, 0.85, 0.5, 0.45, 0.0)] == [0, 1, 4, 5, 9]
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match='t_start'):
      samplers.start_step(ddim, bad)
  dpm = samplers.make_solver(SCHED, 'dpm_solver++', 6)
  assert dpm.coefs['half_r_inv'][3] != 0 and dpm.starting_at(3).coefs['half_r_inv'][3] == 0
  assert dpm.coefs['half_r_inv'][3] != 0  # the solver itself is unchanged
  assert ddim.starting_at(4) is ddim
  with pytest.raises(ValueError, match='start step'):
    ddim.starting_at(10)


# --- the definition -------------------------------------------------------------------------


class _Features:
  """A stand-in FID network: 10 fixed random projections of the pixels (fast, linear, full-rank
  statistics from 16 images). Records the features of every `iter_features` call."""
  weights_sha1 = 'test-projection'
  batch_size = 8

  def __init__(self):
    self.proj = np.random.default_rng(1).normal(size=(32 * 32 * 3, 10)) / 50
    self.calls = []

  def iter_features(self, images):
    self.calls.append([])
    for batch in ((images,) if isinstance(images, np.ndarray) else images):
      f = np.asarray(batch, np.float64).reshape(len(batch), -1) / 255 @ self.proj
      self.calls[-1].append(f)
      yield f


def _frechet_by_hand(f1, f2):
  """The Fréchet distance of two feature sets, with scipy's sqrtm (not the svd method)."""
  m1, m2 = f1.mean(0), f2.mean(0)
  s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  return float(((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def _evaluator(model, params, solver, extractor):
  return types.SimpleNamespace(model=model, params=params, solver=solver, mesh=None,
                               extractor=extractor, fid=fid)


def test_definition_known_answers(tiny_model, tmp_path):
  """t_start = 0: one step from timestep 0, where the sampler nearly returns its input, so
  FID_c ≈ FID(c(x), clean) computed from the inputs by hand; a 'corruption' that is the
  identity gives exactly the clean-input FID (paired noise), and ΔFID_c = 0 for the full model;
  every reported FID is a hand-computed Fréchet distance of one denoised set to the clean one."""
  model, params = tiny_model
  c = cifar10.get_config('tiny')
  c.experiment.update(robustness_reference_size=16)
  c.experiment.robustness_t_start = 0.0
  c.sampler.batch_size = 8
  solver = samplers.solver_from_config(c.diffusion, c.sampler)
  clean = data.load_subset('test')[0][:20]
  mean = clean.mean(axis=(1, 2, 3), keepdims=True)
  images = {'clean': clean, 'corrupted': {
      'identity': clean.copy(), 'contrast': np.round(mean + 0.3 * (clean - mean)).astype(np.uint8),
      'dark': clean // 4}}
  feats = _Features()
  rob = robustness.Robustness(c, _evaluator(model, params, solver, feats), str(tmp_path), images)
  assert rob.start_step == solver.num_steps - 1 and rob.clean.shape[0] == 16  # cut to the size
  assert 'i0 = 4' in rob.definition and '(τ = 0)' in rob.definition
  ref = np.concatenate(feats.calls[0])

  full = rob.evaluate(policies.FullPolicy(), seed=0)
  assert len(feats.calls) == 1 + 1 + 3  # reference, anchor, three corruptions
  hand = [_frechet_by_hand(np.concatenate(call), ref) for call in feats.calls[1:]]
  reported = [full['anchor_fid']] + list(full['fid_corrupted'].values())
  np.testing.assert_allclose(sorted(reported), sorted(hand), rtol=1e-7, atol=1e-9)
  f = lambda a: _frechet_by_hand(np.concatenate(list(feats.iter_features(a[:16]))), ref)  # noqa: E731
  for name in ('contrast', 'dark'):  # nearly the identity: the inputs' own FIDs
    # measured: within 0.7 % (contrast) and 0.5 % (dark)
    assert full['fid_corrupted'][name] == pytest.approx(f(images['corrupted'][name]), rel=0.03)
  assert min(full['fid_corrupted']['dark'], full['fid_corrupted']['contrast']) > 10 * full['anchor_fid']
  assert full['fid_clean_input'] == full['anchor_fid']
  assert full['fid_corrupted']['identity'] == full['anchor_fid'] and full['per_corruption']['identity'] == 0
  for name, v in full['fid_corrupted'].items():
    assert full['per_corruption'][name] == v - full['anchor_fid']
  r = np.mean(list(full['fid_corrupted'].values()))
  assert full['delta_fid'] == pytest.approx(r - full['anchor_fid'], abs=1e-12)
  assert full['corrupted_input_fid'] - full['anchor_fid'] == full['delta_fid']

  # Another policy (through a ResolvedPolicy): the anchor is reused, its own clean-input FID is
  # measured, and the identity corruption reproduces it exactly.
  n_calls = len(feats.calls)
  gated = rob.evaluate(evaluate.ResolvedPolicy('gated', _hard_policy(model.num_units)), seed=0)
  assert len(feats.calls) == n_calls + 1 + 3
  assert gated['anchor_fid'] == full['anchor_fid'] and gated['fid_clean_input'] != full['anchor_fid']
  assert gated['fid_corrupted']['identity'] == gated['fid_clean_input']
  assert gated['delta_fid'] == pytest.approx(gated['corrupted_input_fid'] - full['anchor_fid'], abs=1e-12)
  assert gated['block_ratio'] < 1 and full['block_ratio'] == 1
  # A new seed: new noise, a new anchor.
  other = rob.evaluate(policies.FullPolicy(), seed=1)
  assert other['anchor_fid'] != full['anchor_fid'] and other['per_corruption']['identity'] == 0
  # The clean reference is cached in out_dir: a second instance does not recompute it.
  fresh = _Features()
  again = robustness.Robustness(c, _evaluator(model, params, solver, fresh), str(tmp_path), images)
  assert np.array_equal(again.reference.mu, rob.reference.mu) and not fresh.calls
  assert list(tmp_path.glob('ref_clean_injected*.npz'))
  with pytest.raises(ValueError, match='corrupted copy'):
    robustness.Robustness(c, _evaluator(model, params, solver, feats), str(tmp_path),
                          {'clean': clean, 'corrupted': {'bad': clean[:10]}})


# --- the reviewer's test ----------------------------------------------------------------------


def _gaussian_noise(images, sigma, seed=0):
  x = images / 255.0 + np.random.default_rng(seed).normal(0, sigma, images.shape)
  return np.clip(np.round(x * 255), 0, 255).astype(np.uint8)


def _contrast(images, factor):
  mean = images.mean(axis=(1, 2, 3), keepdims=True)
  return np.clip(np.round(mean + factor * (images - mean)), 0, 255).astype(np.uint8)


@pytest.mark.needs_fid_weights
def test_degraded_policy_cannot_look_more_robust(tmp_path):
  """The trained quick-start backbone, 64 real CIFAR-10 test images with their contrast reduced
  (×0.4) and Gaussian noise added (σ = 0.1), DDIM 10 steps from t_start = 0.5, the real FID
  network: random gates keeping about 40 % of the units have a larger ΔFID than the full model.
  (One corruption, four FID statistics of 64 images: about a minute of CPU.)"""
  c = cifar10.get_config('quickstart')
  c.sampler.update(name='ddim', steps=10, batch_size=64)
  c.experiment.update(robustness_reference_size=64)
  c.experiment.robustness_t_start = 0.5
  _, params = checkpoints.load_backbone_params(c.backbone, c.model)
  model = models.build_model(c.model)
  solver = samplers.solver_from_config(c.diffusion, c.sampler)
  clean = data.load_subset('test')[0][:64]
  images = {'clean': clean, 'corrupted': {'contrast_noise': _gaussian_noise(_contrast(clean, 0.4), 0.1)}}
  ev = _evaluator(model, params, solver, fid.FeatureExtractor(batch_size=64))
  rob = robustness.Robustness(c, ev, str(tmp_path), images)
  full = rob.evaluate(policies.FullPolicy(), seed=0)
  g = policies.random_gate_params(0, model.num_units, 0.4)
  rand = rob.evaluate(policies.LeesPolicy(g['alpha'], g['beta'], name='random_0.4'), seed=0,
                      clean_input=False)  # informative only: saves a fifth of the test's time
  for name, r in (('full', full), ('random 40%', rand)):
    print(f'\n[{name}] ΔFID {r["delta_fid"]:+.2f} = R {r["corrupted_input_fid"]:.2f} − anchor '
          f'{r["anchor_fid"]:.2f}; blocks {r["block_ratio"]:.1%} of steps '
          f'{r["start_step"]}..{solver.num_steps - 1}')
  assert rand['anchor_fid'] == full['anchor_fid'] == full['fid_clean_input']
  assert rand['fid_clean_input'] is None
  assert rand['block_ratio'] < 0.7
  assert rand['delta_fid'] > full['delta_fid']
