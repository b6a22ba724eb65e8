"""The training objectives in continuous time (`lees_jax.processes`, U-ViT's VP SDE), against
independent oracles:

* the VP SDE draw: t uniform on [t_min, 1), x_t = alpha_t x0 + sigma_t eps by the closed form
  (log alpha_t = -t^2 (b1 - b0) / 4 - t b0 / 2, sigma_t^2 = 1 - alpha_t^2, float64 numpy), the
  network time 999 t and the gates' time t;
* what each objective hands the backbone, seen by a spy on `models.predict_eps`: pretraining and
  LEES gates call it at 999 t with logits alpha t + beta of the same t, ASE fine-tuning with the
  keep column of t's tenth -- the mask the sampler runs at a step of that continuous t -- and
  lambda(t) = 1 + coef t; the losses are recomputed from what the spy saw;
* the DDPM process draws exactly what the objectives drew before the process existed
  (`draw_t_noise`, then q_sample by the closed form), so DDPM backbones train unchanged;
* configuration errors: unknown process, fields of the other process, a learned variance on the
  VP SDE, samplers of the other process.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import celeba64_uvit, cifar10
from lees_jax import ase, diffusion, gates, models, objectives, policies, processes, sde

B0, B1 = 0.1, 20.0


def _alpha_sigma(t):
  t = np.asarray(t, np.float64)
  log_alpha = -0.25 * t ** 2 * (B1 - B0) - 0.5 * t * B0
  return np.exp(log_alpha), np.sqrt(1.0 - np.exp(2.0 * log_alpha))


def _tiny():
  c = celeba64_uvit.get_config('tiny')
  c.data.train_split = 'train[:16]'
  return c


def _x0(n=8, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


def _shape(a, x):
  return np.asarray(a).reshape((-1,) + (1,) * (x.ndim - 1))


# ---------------------------------------------------------------------------------------------
# The draws.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('t_min', [0.0, 0.3])
def test_vp_sde_draw_is_the_closed_form_marginal(t_min):
  d = _tiny().diffusion
  d.t_min = t_min
  process = processes.from_config(d)
  x0 = _x0(256, 4)
  noised = process.draw(jax.random.PRNGKey(3), x0)
  t = np.asarray(noised.t, np.float64)
  assert t.min() >= t_min and t.max() < 1.0
  assert abs(t.mean() - (1 + t_min) / 2) < 0.05  # uniform on [t_min, 1): mean and spread
  assert abs(t.std() - (1 - t_min) / math.sqrt(12)) < 0.03
  a, s = _alpha_sigma(t)
  want = _shape(a, x0) * np.asarray(x0, np.float64) + _shape(s, x0) * np.asarray(noised.noise)
  np.testing.assert_allclose(noised.x_t, want, atol=1e-5)
  np.testing.assert_allclose(noised.network_time, 999.0 * t, rtol=1e-6)
  np.testing.assert_array_equal(noised.gate_time, noised.t)
  assert noised.network_time.dtype == jnp.float32
  # The noise is a standard normal draw independent of t.
  assert abs(float(jnp.mean(noised.noise))) < 0.02 and abs(float(jnp.std(noised.noise)) - 1) < 0.02


def test_ddpm_draw_is_the_draw_the_objectives_always_made():
  process = processes.from_config(cifar10.get_config('tiny').diffusion)
  x0, rng = _x0(16), jax.random.PRNGKey(7)
  noised = process.draw(rng, x0)
  t, noise = objectives.draw_t_noise(rng, x0, 1000)  # the pre-process draw
  np.testing.assert_array_equal(noised.t, t)
  np.testing.assert_array_equal(noised.network_time, t)
  np.testing.assert_array_equal(noised.noise, noise)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)]
  want = (_shape(np.sqrt(abar), x0) * np.asarray(x0)
          + _shape(np.sqrt(1 - abar), x0) * np.asarray(noise))
  np.testing.assert_allclose(noised.x_t, want, atol=1e-5)
  np.testing.assert_array_equal(noised.x_t, diffusion.q_sample(process.schedule, x0, t, noise))
  np.testing.assert_allclose(noised.gate_time, (np.asarray(t) + 1) / 1000, rtol=1e-7)
  assert process.gate_timesteps == 1000


def test_training_masks_at_t_are_the_samplers_at_t():
  """A schedule's per-example mask at a continuous t is the sampler's mask at a step of time t
  (the real-valued timestep 1000 t - 1 of `sde`), and the tenth of t it belongs to."""
  model = models.build_model(_tiny().model)
  policy = ase.named_schedule('D1-U-ViT', model.units)
  process = processes.from_config(_tiny().diffusion)
  t = np.concatenate([np.random.default_rng(0).uniform(0, 1, 200), [0.0, 0.05, 0.95, 0.999]])
  noised = processes.NoisedBatch(None, None, None, jnp.asarray(t, jnp.float32), None)
  keep = np.asarray(process.schedule_keep(policy, 5)(noised))
  sampler = policy.step_masks(policies.timesteps_for_time(t, 1000), 1000, 5)
  np.testing.assert_array_equal(keep, sampler)
  tenth = [min(9, max(0, math.ceil(x * 10) - 1)) for x in np.asarray(t, np.float32)]
  np.testing.assert_array_equal(keep, policy.matrix[:, tenth].T)


def test_interval_of_time_numpy_and_jax_agree():
  t = np.random.default_rng(1).uniform(0, 1, 1000)
  np.testing.assert_array_equal(policies.interval_of_time(jnp.asarray(t, jnp.float32), 10),
                                policies.interval_of_time(t, 10))
  np.testing.assert_array_equal(policies.interval_index(np.arange(1000), 1000, 10),
                                np.repeat(np.arange(10), 100))


# ---------------------------------------------------------------------------------------------
# What the objectives hand the backbone.
# ---------------------------------------------------------------------------------------------


class _Spy:
  """Stands in for `models.predict_eps`: records its inputs, returns a fixed function of x."""

  def __init__(self):
    self.calls = []

  def __call__(self, model, params, x, t, y=None, *, gates=None, train=False, rngs=None):
    del model, params, y, train, rngs
    self.calls.append(dict(x=np.asarray(x), t=np.asarray(t), gates=gates))
    return 0.5 * x, None


def _batch(n=8):
  return {'image': _x0(n)}


def test_lees_gates_read_t_and_the_network_999t(monkeypatch):
  c = _tiny()
  model = models.build_model(c.model)
  process = processes.for_model(c.diffusion, model)
  spy = _Spy()
  monkeypatch.setattr(models, 'predict_eps', spy)
  alpha = jnp.asarray([1.0, -2.0, 3.0, 0.5, -1.0])
  beta = jnp.asarray([0.1, 0.2, -0.3, 0.0, 0.4])
  lam = 0.05
  loss_fn = objectives.gate_loss_fn(model, process, lam, hard=True)
  batch, rng = _batch(), jax.random.PRNGKey(11)
  loss, metrics = loss_fn({'alpha': alpha, 'beta': beta}, {}, batch, rng)
  (call,) = spy.calls
  t_net = call['t'].astype(np.float64) / 999.0  # the network's time, back to t
  # The gates' time is the same t: logits alpha t + beta.
  assert isinstance(call['gates'], gates.StraightThrough)
  np.testing.assert_allclose(call['gates'].logits, t_net[:, None] * alpha + beta, atol=1e-5)
  # The network input is the closed-form marginal at that t (noise: the one the loss targets).
  noised = process.draw(rng, batch['image'])
  np.testing.assert_allclose(t_net, noised.t, rtol=1e-6)
  a, s = _alpha_sigma(t_net)
  x0 = np.asarray(batch['image'], np.float64)
  want = _shape(a, x0) * x0 + _shape(s, x0) * np.asarray(noised.noise)
  np.testing.assert_allclose(call['x'], want, atol=1e-5)
  g = 1.0 / (1.0 + np.exp(-(t_net[:, None] * np.asarray(alpha) + np.asarray(beta))))
  mse = np.mean((0.5 * call['x'] - np.asarray(noised.noise)) ** 2)
  np.testing.assert_allclose(metrics['mse'], mse, rtol=1e-5)
  np.testing.assert_allclose(loss, mse + lam * g.mean(), rtol=1e-5)


def test_pretrain_on_the_vp_sde_is_u_vits_lsimple(monkeypatch):
  c = _tiny()
  spy = _Spy()
  objective = objectives.pretrain_objective(c)
  monkeypatch.setattr(models, 'predict_eps', spy)
  batch, rng = _batch(), jax.random.PRNGKey(5)
  loss, metrics = objective.loss_fn({}, {}, batch, rng)
  (call,) = spy.calls
  noised = processes.from_config(c.diffusion).draw(rng, batch['image'])
  np.testing.assert_allclose(call['t'], 999.0 * np.asarray(noised.t, np.float64), rtol=1e-6)
  np.testing.assert_array_equal(call['x'], noised.x_t)
  # LSimple with noise prediction: the mean over dimensions of (eps - eps_hat)^2, batch mean.
  want = np.mean((np.asarray(noised.noise) - 0.5 * call['x']) ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert set(metrics) == {'mse'}
  # U-ViT's optimiser: AdamW with weight decay 0.03 (a zero-gradient weight still shrinks once
  # the warm-up's learning rate is above 0: -lr * 0.03 * w).
  params, zero = {'w': jnp.ones((3,))}, {'w': jnp.zeros((3,))}
  state = objective.optimizer.init(params)
  _, state = objective.optimizer.update(zero, state, params)  # step 0: learning rate 0
  updates, _ = objective.optimizer.update(zero, state, params)
  np.testing.assert_allclose(updates['w'], -1e-3 / 5 * 0.03, rtol=1e-5)


def test_ase_finetune_masks_and_lambda_at_t(monkeypatch):
  c = _tiny()
  c.ase_ft.update(reweight='paper', reweight_coef=2.0, reweight_steps=10)
  model = models.build_model(c.model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  objective = objectives.ase_objective(c, backbone=params)
  spy = _Spy()
  monkeypatch.setattr(models, 'predict_eps', spy)
  batch, rng = _batch(), jax.random.PRNGKey(9)
  loss, metrics = objective.loss_fn(objective.initial_trainable, objective.frozen, batch, rng,
                                    jnp.int32(3))
  (call,) = spy.calls
  t = call['t'].astype(np.float64) / 999.0
  matrix = ase.named_schedule('D1-U-ViT', model.units).matrix
  tenth = [min(9, max(0, math.ceil(x * 10) - 1)) for x in t]
  assert isinstance(call['gates'], gates.ExampleMask)
  np.testing.assert_array_equal(call['gates'].keep, matrix[:, tenth].T)
  noised = processes.from_config(c.diffusion).draw(rng, batch['image'])
  mse = np.mean((0.5 * call['x'] - np.asarray(noised.noise)).reshape(8, -1) ** 2, axis=1)
  lam = 1.0 + 2.0 * t  # step 3 < reweight_steps
  np.testing.assert_allclose(metrics['lambda_mean'], lam.mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(lam * mse), rtol=1e-5)
  # After the reweighting cycle lambda is 1.
  spy.calls.clear()
  loss, _ = objective.loss_fn(objective.initial_trainable, objective.frozen, batch, rng,
                              jnp.int32(10))
  np.testing.assert_allclose(loss, mse.mean(), rtol=1e-5)


def test_ase_lambda_reads_normalised_time():
  t_n = jnp.asarray([0.0, 0.25, 1.0])
  np.testing.assert_allclose(objectives.ase_lambda(t_n, 0, 'paper', 2.0, 5), [1.0, 1.5, 3.0])
  np.testing.assert_array_equal(objectives.ase_lambda(t_n, 5, 'paper', 2.0, 5), 1.0)
  t = jnp.asarray([0, 249, 999])  # the DDPM form reads (t + 1) / T
  np.testing.assert_allclose(objectives.ase_time_weight(t, 1000, 0, 'paper', 2.0, 5),
                             objectives.ase_lambda((t + 1) / 1000, 0, 'paper', 2.0, 5))


def test_gate_objective_reports_masks_at_the_samplers_continuous_times():
  c = _tiny()
  model = models.build_model(c.model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  objective = objectives.gates_objective(c, backbone=params)
  assert objective.num_train_steps == 20
  timesteps = objectives.sampler_timesteps(c)
  solver = sde.dpm_solver(6)
  np.testing.assert_allclose(timesteps, np.sort(solver.timesteps))
  np.testing.assert_allclose(policies.normalized_time(np.asarray(timesteps), 1000, np.float64),
                             np.sort(solver.times), rtol=1e-12)


def test_partial_runs_start_at_a_step_start_noised_by_the_marginal():
  """Robustness's SDEdit start: the first step start whose time is <= t_start (+ 1/T, as for
  DDPM timesteps), never a DPM-Solver intermediate evaluation; its input the VP SDE marginal."""
  from lees_jax import samplers
  process = processes.from_config(_tiny().diffusion)
  em = process.solver(ml_collections.ConfigDict(dict(name='euler_maruyama', steps=1000)))
  assert samplers.start_step(em, 0.5) == 499 and em.times[499] == pytest.approx(0.501)
  dpm = process.solver(ml_collections.ConfigDict(dict(name='dpm_solver', steps=25)))
  i0 = samplers.start_step(dpm, 0.5)
  starts = [i for i in range(25) if dpm.coefs['first'][i] == 1.0]  # step starts: 0, 3, ...
  assert i0 in starts and dpm.times[i0] <= 0.501
  assert dpm.times[starts[starts.index(i0) - 1]] > 0.501
  dpm.starting_at(i0)
  x0, noise = _x0(2, 4), _x0(2, 4, seed=1)
  a, s = _alpha_sigma(dpm.times[i0])
  np.testing.assert_allclose(process.noise_to_step(dpm, x0, i0, noise),
                             a * np.asarray(x0) + s * np.asarray(noise), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Configuration errors.
# ---------------------------------------------------------------------------------------------


def test_process_configuration_errors():
  with pytest.raises(ValueError, match="unknown config.diffusion.process 'edm'"):
    processes.from_config(ml_collections.ConfigDict(dict(process='edm')))
  with pytest.raises(ValueError, match=r"\['beta_max', 'beta_min'\]"):
    processes.from_config(ml_collections.ConfigDict(dict(process='ddpm', num_timesteps=10,
                                                         beta_schedule='linear', beta_min=0.1,
                                                         beta_max=20.0)))
  with pytest.raises(ValueError, match='t_min'):
    processes.from_config(ml_collections.ConfigDict(dict(process='vp_sde', t_min=1.0)))
  # A config without the field is the DDPM process (every config before it existed).
  legacy = ml_collections.ConfigDict(dict(num_timesteps=1000, beta_schedule='linear'))
  assert processes.from_config(legacy).name == 'ddpm'
  dit = ml_collections.ConfigDict(dict(name='dit', size='', hidden_size=32, depth=2, num_heads=2,
                                       patch_size=2, input_size=8, in_channels=4, num_classes=10,
                                       learn_sigma=True))
  with pytest.raises(ValueError, match='learned variance'):
    processes.for_model(_tiny().diffusion, models.build_model(dit))
  em = ml_collections.ConfigDict(dict(name='euler_maruyama', steps=10))
  assert processes.from_config(_tiny().diffusion).solver(em).num_steps == 10
  with pytest.raises(ValueError, match="'ddpm', 'ddim', 'dpm_solver\\+\\+'"):
    processes.from_config(legacy).solver(em)


def test_backbone_mismatch_messages():
  vp = dict(sde.DIFFUSION_CONFIG)
  assert processes.backbone_mismatch(vp, _tiny().diffusion) is None
  assert processes.backbone_mismatch(None, _tiny().diffusion) is None
  ddpm = cifar10.get_config('tiny').diffusion
  assert "U-ViT's continuous VP SDE" in processes.backbone_mismatch(vp, ddpm)
  assert 'discrete DDPM' in processes.backbone_mismatch(dict(ddpm), _tiny().diffusion)
  assert 'network_time_scale' in processes.backbone_mismatch(dict(vp, network_time_scale=1000.0),
                                                             _tiny().diffusion)
