"""Improved DDPM's hybrid loss: the variational-bound term (`diffusion.vb_terms_bpd`) against
oracles written here in float64, its stop-gradient, and the objectives that train it
(pretraining and ASE fine-tuning of a DiT with a learned variance).

The oracles share no code with `lees_jax.diffusion`: q(x_{t-1} | x_t, x_0) is the product of
the two Gaussians N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}) and
N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) (precisions add), the KL is the closed form in standard
deviations (and torch.distributions' elementwise), the t = 0 term takes its bin probabilities
from scipy.stats.norm.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats

from conftest import tiny_config
from lees_jax import ase, data, diffusion, models, objectives, train
from lees_jax import gates as gating

T = 1000
SCHED = diffusion.make_schedule(T)
LABELS = np.array([0, 3, 9, 5], np.int32)
B = len(LABELS)


# --- float64 oracles -----------------------------------------------------------------------------


def _oracle_schedule():
  betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
  return betas, np.cumprod(1.0 - betas)


def _q_posterior(x0, x_t, t):
  """(mean, variance) of q(x_{t-1} | x_t, x_0) for t >= 1, from the precisions of its factors."""
  betas, abar = _oracle_schedule()
  ab_prev, alpha = abar[t - 1], 1.0 - betas[t]
  var = 1.0 / (1.0 / (1.0 - ab_prev) + alpha / betas[t])
  return var * (np.sqrt(ab_prev) * x0 / (1.0 - ab_prev) + np.sqrt(alpha) * x_t / betas[t]), var


def _p_log_var(v, t):
  """log sigma^2 of the learned range between beta_t and the posterior variance (at t = 0 the
  posterior variance of t = 1)."""
  betas, _ = _oracle_schedule()
  lo = _q_posterior(0.0, 0.0, max(t, 1))[1]
  f = (v + 1.0) / 2.0
  return f * np.log(betas[t]) + (1.0 - f) * np.log(lo)


def _x0_hat(x_t, t, eps):
  _, abar = _oracle_schedule()
  return (x_t - np.sqrt(1.0 - abar[t]) * eps) / np.sqrt(abar[t])


def _kl_elementwise(x0, x_t, t, eps, v):
  """KL(q || p) per element in nats, N(m1, s1^2) against N(m2, s2^2):
  log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2."""
  m1, var1 = _q_posterior(x0, x_t, t)
  m2, _ = _q_posterior(_x0_hat(x_t, t, eps), x_t, t)
  s1, s2 = np.sqrt(var1), np.exp(0.5 * _p_log_var(v, t))
  return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


def _bin_log_prob(x, mean, std):
  """log P(x) of N(mean, std^2) rounded to the 256 levels of [-1, 1], each floored at 1e-12."""
  hi, lo = (x + 1 / 255 - mean) / std, (x - 1 / 255 - mean) / std
  p = np.where(x < -0.999, stats.norm.cdf(hi),
               np.where(x > 0.999, stats.norm.sf(lo), stats.norm.cdf(hi) - stats.norm.cdf(lo)))
  return np.log(np.maximum(p, 1e-12))


def oracle_vb(x0, x_t, t, eps, v):
  """Per-example L_t in bits/dim, float64; t an array of timesteps."""
  x0, x_t, eps, v = (np.asarray(a, np.float64) for a in (x0, x_t, eps, v))
  out = []
  for i, ti in enumerate(np.asarray(t)):
    if ti > 0:
      nats = _kl_elementwise(x0[i], x_t[i], ti, eps[i], v[i])
    else:  # p(x_0 | x_1): the mean is x0_hat itself
      nats = -_bin_log_prob(x0[i], _x0_hat(x_t[i], 0, eps[i]), np.exp(0.5 * _p_log_var(v[i], 0)))
    out.append(nats.mean() / np.log(2.0))
  return np.asarray(out)


def _draw(seed, shape, t, eps_off=0.3, grid=False):
  """(x0, x_t, eps, v): x0 in [-1, 1] (on the 256-level grid if ``grid``), x_t = q(x_t | x0) in
  float64, eps = the noise + eps_off * N(0, 1), v uniform on [-1.2, 1.2]."""
  rng = np.random.default_rng(seed)
  _, abar = _oracle_schedule()
  x0 = (rng.integers(0, 256, shape) / 127.5 - 1.0 if grid
        else rng.uniform(-1, 1, shape))
  noise = rng.standard_normal(shape)
  ab = abar[np.asarray(t)].reshape((-1,) + (1,) * (len(shape) - 1))
  x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
  eps = noise + eps_off * rng.standard_normal(shape)
  v = rng.uniform(-1.2, 1.2, shape)
  return tuple(a.astype(np.float32) for a in (x0, x_t, eps, v))


# --- (a) the KL term -----------------------------------------------------------------------------


def test_kl_term_matches_closed_form_and_torch():
  torch = pytest.importorskip('torch')
  t = np.array([1, 2, 10, 250, 500, 900, 998, 999])
  x0, x_t, eps, v = _draw(0, (len(t), 4, 4, 3), t)
  got = np.asarray(diffusion.vb_terms_bpd(SCHED, x0, x_t, jnp.asarray(t), eps, v))
  want = oracle_vb(x0, x_t, t, eps, v)
  print('\n[vb kl] rel err per t:', np.abs(got / want - 1))
  np.testing.assert_allclose(got, want, rtol=2e-5)
  # The exact eps (the mean term vanishes): the variance term alone, down to ~1e-12 bits near T.
  _, _, _, v2 = _draw(1, x0.shape, t)
  noise = ((x_t - np.sqrt(SCHED.alphas_cumprod[t])[:, None, None, None] * x0.astype(np.float64))
           / np.sqrt(1 - SCHED.alphas_cumprod[t])[:, None, None, None])
  got = np.asarray(diffusion.vb_terms_bpd(SCHED, x0, x_t, jnp.asarray(t), noise, v2))
  want = oracle_vb(x0, x_t, t, noise, v2)
  print('[vb kl, exact eps] bits/dim', got, 'rel err', np.abs(got / want - 1))
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-12)
  # torch's elementwise KL of the same two Gaussians (float64) against the closed form above,
  # and against `diffusion.normal_kl` on the float64 means and log-variances.
  x0, x_t, eps, v = (a.astype(np.float64) for a in (x0, x_t, eps, v))
  for i, ti in enumerate(t):
    m1, var1 = _q_posterior(x0[i], x_t[i], ti)
    m2, _ = _q_posterior(_x0_hat(x_t[i], ti, eps[i]), x_t[i], ti)
    lv2 = _p_log_var(v[i], ti)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(m1), torch.tensor(np.sqrt(var1))),
        torch.distributions.Normal(torch.tensor(m2), torch.tensor(np.exp(0.5 * lv2)))).numpy()
    closed = _kl_elementwise(x0[i], x_t[i], ti, eps[i], v[i])
    np.testing.assert_allclose(closed, ref, rtol=1e-9, atol=1e-15)
    with jax.enable_x64(True):
      ours = np.asarray(diffusion.normal_kl(jnp.asarray(m1), jnp.log(jnp.asarray(var1)),
                                            jnp.asarray(m2), jnp.asarray(lv2)))
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-15)


# --- (b) the t = 0 term --------------------------------------------------------------------------


def test_decoder_nll_matches_scipy_bins():
  t = np.zeros(6, int)
  x0, x_t, eps, v = _draw(2, (6, 4, 4, 3), t, eps_off=0.6, grid=True)
  x0[0, 0, 0] = [-1.0, 1.0, 0.0]  # both open edge bins
  x0[1, :2] = 1.0
  x0[2, :2] = -1.0
  eps[5] += 30.0  # mean 0.3 below x0: every bin but the lower edge's at the 1e-12 floor
  got = np.asarray(diffusion.vb_terms_bpd(SCHED, x0, x_t, jnp.asarray(t), eps, v))
  want = oracle_vb(x0, x_t, t, eps, v)
  print('\n[vb t=0] bits/dim', got, 'rel err', np.abs(got / want - 1))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  floored = np.abs(x0[5]) < 0.999
  assert 0.9 < floored.mean() < 1 and got[5] > floored.mean() * 0.999 * -np.log2(1e-12)
  # Elementwise, across the body and both tails of the Gaussian (the survival-function side).
  rng = np.random.default_rng(3)
  x = (rng.integers(0, 256, 4000) / 127.5 - 1.0)
  std = np.exp(rng.uniform(np.log(1e-3), np.log(0.3), x.shape))
  mean = x + std * rng.uniform(-7, 7, x.shape)
  got = np.asarray(diffusion.discretized_gaussian_log_likelihood(
      jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32),
      jnp.asarray(np.log(std), jnp.float32)))
  want = _bin_log_prob(x, mean.astype(np.float32).astype(np.float64),
                       np.exp(np.log(std).astype(np.float32).astype(np.float64)))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


# --- (c) the stop-gradient -----------------------------------------------------------------------


def test_vb_trains_the_variance_only_and_mse_the_eps_only():
  t = np.array([0, 3, 400, 999])
  x0, x_t, eps, v = _draw(4, (4, 4, 4, 3), t)
  noise = _draw(5, x0.shape, t)[2]

  def parts(eps, v):
    mse, vb = diffusion.hybrid_loss_terms(SCHED, x0, x_t, jnp.asarray(t), noise, eps, v)
    return mse.sum(), vb.sum()

  d_mse = jax.grad(lambda e, w: parts(e, w)[0], argnums=(0, 1))(eps, v)
  d_vb = jax.grad(lambda e, w: parts(e, w)[1], argnums=(0, 1))(eps, v)
  assert not np.any(np.asarray(d_vb[0]))   # d vb / d eps = 0 exactly
  assert not np.any(np.asarray(d_mse[1]))  # d mse / d v = 0 exactly
  assert np.all(np.abs(np.asarray(d_vb[1])) > 0) and np.all(np.abs(np.asarray(d_mse[0])) > 0)
  mse, vb = diffusion.hybrid_loss_terms(SCHED, x0, x_t, jnp.asarray(t), noise, eps, v)
  np.testing.assert_allclose(vb, oracle_vb(x0, x_t, t, eps, v), rtol=2e-5)  # T / 1000 = 1
  np.testing.assert_allclose(mse, ((eps.astype(np.float64) - noise) ** 2).mean((1, 2, 3)),
                             rtol=1e-6)
  assert diffusion.hybrid_loss_terms(SCHED, x0, x_t, t, noise, eps)[1] is None
  # A 500-step process scales the vb by T / 1000 (improved-diffusion's RESCALED_MSE).
  short = diffusion.make_schedule(500)
  np.testing.assert_allclose(diffusion.hybrid_loss_terms(short, x0, x_t, t // 2, noise, eps, v)[1],
                             0.5 * diffusion.vb_terms_bpd(short, x0, x_t, t // 2, eps, v),
                             rtol=1e-6)


# --- (d), (e) the objectives on a tiny learned-variance DiT ---------------------------------------


def _dit_config(mode, **model):
  c = tiny_config(mode=mode)
  c.model = ml_collections.ConfigDict({
      **dict(name='dit', input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3,
             num_heads=4, num_classes=10, learn_sigma=True, class_dropout_prob=0.0,
             dtype='float32'), **model})
  return c


def _batch(seed):
  rng = np.random.default_rng(seed)
  return {'image': rng.uniform(-1, 1, (B, 8, 8, 4)).astype(np.float32), 'label': LABELS}


def _random_params(model, seed=0):
  """Random parameters of ``model`` drawn in numpy (kernels fan-in scaled, every other leaf
  near its Flax start): adaLN-Zero would start with a zero output, so eps and v would be 0;
  and numpy is quicker than an eager Flax init on a loaded CPU."""
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if len(leaf.shape) > 1:
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    base = 1.0 if path[-1].key == 'scale' else 0.0
    return (base + rng.normal(0, 0.05, leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def _oracle_loss(model, params, batch, rng, keep=None, lam=None):
  """(mean mse, mean vb, mean loss) in float64 with the loss's own draw of (t, noise); ``keep``
  the per-example (B, K) unit mask, ``lam(t)`` the weight of the mse."""
  x0 = batch['image']
  t, noise = objectives.draw_t_noise(rng, jnp.asarray(x0), T)
  x_t = np.asarray(diffusion.q_sample(SCHED, jnp.asarray(x0), t, noise))
  forward = jax.jit(lambda p, x, t, y, keep: models.predict_eps(
      model, p, x, t, y, gates=None if keep is None else gating.ExampleMask(keep)))
  eps, v = forward(params, x_t, t, batch['label'], keep)
  t, noise = np.asarray(t), np.asarray(noise, np.float64)
  mse = ((np.asarray(eps, np.float64) - noise) ** 2).mean((1, 2, 3))
  vb = oracle_vb(x0, x_t, t, eps, v)
  lam = np.ones(B) if lam is None else lam(t)
  return mse.mean(), vb.mean(), (lam * mse + vb).mean()


def _final_linear_columns(grads, c=4, out=8):
  """(eps columns, v columns) of the final linear layer's kernel gradient: column j is output
  channel j % out of its patch; channels [c:] are v."""
  g = np.asarray(flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))[
      ('final_linear', 'kernel')])
  ch = np.arange(g.shape[1]) % out
  return g[:, ch < c], g[:, ch >= c]


def test_pretrain_learned_variance_dit_trains_the_hybrid_loss():
  config = _dit_config('pretrain')
  config.pretrain.update(learning_rate=1e-3, warmup_steps=0)
  objective = objectives.pretrain_objective(config)
  assert 'hybrid loss' in objective.describe
  model = models.build_model(config.model)
  batch, rng = _batch(0), jax.random.PRNGKey(3)
  loss_fn = jax.jit(objective.loss_fn)
  params = _random_params(model)
  loss, metrics = loss_fn(params, {}, batch, rng)
  mse, vb, want = _oracle_loss(model, params, batch, rng)
  np.testing.assert_allclose([metrics['mse'], metrics['vb'], loss], [mse, vb, want], rtol=1e-4)

  # A few steps of the training loop's own step: finite, and the loss of a fixed batch goes
  # down (the run starts from these parameters instead of init_trainable's draw).
  objective = dataclasses.replace(objective, initial_trainable=params)
  mesh = data.make_mesh(jax.devices()[:1])
  state = train.init_state(objective, jax.random.PRNGKey(0), mesh)
  before = float(loss_fn(state['params'], {}, batch, rng)[0])
  step = train.make_train_step(objective, mesh)
  sharded = data.shard_batch(batch, mesh)
  for i in range(5):
    state, metrics = step(state, {}, sharded, data.replicate(np.asarray(rng), mesh))
    assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['vb']))
  after = float(loss_fn(state['params'], {}, batch, rng)[0])
  print(f'\n[pretrain learned sigma] fixed-batch loss {before:.4f} -> {after:.4f}')
  assert after < before


def test_ase_finetune_learned_variance_dit_trains_the_variance_head():
  config = _dit_config('ase_finetune')
  config.ase_ft.update(schedule='D3', reweight='paper', reweight_coef=3.0, reweight_steps=100)
  model = models.build_model(config.model)
  params = _random_params(model, seed=1)
  objective = objectives.ase_objective(config, backbone=params)
  batch, rng = _batch(1), jax.random.PRNGKey(5)

  def terms(p):
    loss, m = objective.loss_fn(p, objective.frozen, batch, rng, jnp.int32(0))
    return jnp.stack([loss, m['mse'], m['vb']])

  jac, values = jax.jit(jax.jacrev(lambda p: (terms(p), terms(p)), has_aux=True))(
      objective.initial_trainable)
  d_loss, d_mse, d_vb = (jax.tree_util.tree_map(lambda g, i=i: g[i], jac) for i in range(3))
  # The oracle: the schedule's keep column of each example's interval (as the sampler runs it),
  # lambda = 1 + 3 t_n on the mse only.
  t = np.asarray(objectives.draw_t_noise(rng, jnp.asarray(batch['image']), T)[0])
  policy = ase.resolve_schedule('D3', model.units, config)
  keep = policy.step_masks(np.arange(T), T, len(model.units))[t]
  assert not keep.all()
  mse, vb, want = _oracle_loss(model, params, batch, rng, keep=keep,
                               lam=lambda t: 1.0 + 3.0 * (t + 1) / T)
  np.testing.assert_allclose(values, [want, mse, vb], rtol=1e-4)
  eps_cols, v_cols = _final_linear_columns(d_loss)
  assert np.abs(v_cols).max() > 0 and np.abs(eps_cols).max() > 0  # the variance head trains now
  assert not np.any(_final_linear_columns(d_mse)[1])  # the eps-MSE alone: none (as before)
  assert not np.any(_final_linear_columns(d_vb)[0])   # the vb never reaches eps

