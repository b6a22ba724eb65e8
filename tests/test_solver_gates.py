"""Gates for the solver that runs them (config.gates.timesteps='sampler'): the LEES loss draws t
only from the configured solver's timesteps; the default ('uniform') draw is unchanged.

Tiny random-weight model, no training loop (fast)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from lees_jax import diffusion, models, objectives, processes
from lees_jax.objectives import lees_gates

# DDIM-10 on T = 1000 with the 'ddim10' spacing: stride 1000 // 10 = 100, from 0.
DDIM10_GRID = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]


def _config(**sampler):
  c = cifar10.get_config('tiny')
  c.sampler.update(**sampler)
  return c


def test_sampler_draws_only_the_solver_grid():
  c = _config(name='ddim', steps=10)
  process = processes.from_config(c.diffusion)
  assert lees_gates.training_times(c, process) is None  # the default: every t
  c.gates.timesteps = 'sampler'
  times = lees_gates.training_times(c, process)
  assert times.tolist() == DDIM10_GRID
  x0 = jnp.zeros((4096, 2, 2, 1))
  noised = process.draw(jax.random.PRNGKey(3), x0, times)
  drawn = np.asarray(noised.t)
  assert set(drawn.tolist()) == set(DDIM10_GRID)  # only grid values, and every one of them
  # What the gates and the network read follows the drawn t.
  np.testing.assert_array_equal(np.asarray(noised.network_time), drawn)
  np.testing.assert_allclose(np.asarray(noised.gate_time), (drawn + 1) / 1000, rtol=1e-6)
  c.gates.timesteps = 'everywhere'
  with pytest.raises(ValueError, match='gates.timesteps'):
    lees_gates.training_times(c, process)


def test_dpm_solver_grid_and_the_vp_sde_continuous_times():
  c = _config(name='dpm_solver++', steps=20)
  c.gates.timesteps = 'sampler'
  process = processes.from_config(c.diffusion)
  times = lees_gates.training_times(c, process)
  solver_grid = sorted(objectives.sampler_timesteps(c))
  assert len(times) == 20 and times.tolist() == solver_grid
  drawn = np.asarray(process.draw(jax.random.PRNGKey(0), jnp.zeros((512, 1)), times).t)
  assert set(drawn.tolist()) <= set(solver_grid)
  # A continuous-time solver states its t as the real-valued timesteps T t - 1: the draw is t.
  vp = processes.ContinuousVPSDE()
  values = [0.25, 499.5, 998.0]
  t = vp.sampler_times(values)
  np.testing.assert_allclose(t, (np.asarray(values) + 1) / vp.gate_timesteps, rtol=1e-6)
  noised = vp.draw(jax.random.PRNGKey(1), jnp.zeros((256, 1)), t)
  assert set(np.asarray(noised.t).tolist()) <= set(t.tolist())
  np.testing.assert_array_equal(np.asarray(noised.gate_time), np.asarray(noised.t))


def test_default_draw_is_bitwise_the_uniform_one():
  """Without times the draw is the DDPM one it always was: t, eps from `draw_t_noise`."""
  c = _config()
  process = processes.from_config(c.diffusion)
  x0 = jax.random.normal(jax.random.PRNGKey(7), (3, 4, 4, 3))
  rng = jax.random.PRNGKey(11)
  noised = process.draw(rng, x0)
  t, noise = processes.draw_t_noise(rng, x0, 1000)
  np.testing.assert_array_equal(np.asarray(noised.t), np.asarray(t))
  np.testing.assert_array_equal(np.asarray(noised.noise), np.asarray(noise))
  schedule = diffusion.schedule_from_config(c.diffusion)
  np.testing.assert_array_equal(np.asarray(noised.x_t),
                                np.asarray(diffusion.q_sample(schedule, x0, t, noise)))


def test_objective_loss_reads_the_solver_times(tiny_backbone):
  """The objective's loss is the LEES loss on the solver's grid with 'sampler' and the plain
  one by default (bitwise), and the two differ."""
  from lees_jax import checkpoints
  base = _config(name='ddim', steps=10)
  params, _ = checkpoints.read_backbone(tiny_backbone, base.model, base.diffusion)
  model = models.build_model(base.model)
  process = processes.for_model(base.diffusion, model)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(2), (2, 32, 32, 3))}
  gp = {'alpha': jnp.linspace(-2.0, 2.0, len(model.units)),
        'beta': jnp.linspace(1.0, -1.0, len(model.units))}
  rng = jax.random.PRNGKey(5)

  def loss(fn):
    return float(jax.jit(fn)(gp, params, batch, rng)[0])

  default = objectives.gates_objective(base, backbone=params)
  sampler_cfg = _config(name='ddim', steps=10)
  sampler_cfg.gates.timesteps = 'sampler'
  on_grid = objectives.gates_objective(sampler_cfg, backbone=params)
  lam = float(base.gates.lam)
  assert loss(default.loss_fn) == loss(lees_gates.gate_loss_fn(model, process, lam, True))
  assert loss(on_grid.loss_fn) == loss(lees_gates.gate_loss_fn(
      model, process, lam, True, times=np.asarray(DDIM10_GRID, np.int32)))
  assert loss(on_grid.loss_fn) != loss(default.loss_fn)
  assert 'timesteps of ddim-10' in on_grid.describe
