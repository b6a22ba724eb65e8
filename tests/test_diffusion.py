"""Diffusion math against the DDPM formulas and improved-diffusion's respacing rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import diffusion, policies


def test_linear_schedule():
  s = diffusion.make_schedule()
  assert s.num_steps == 1000
  assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
  assert np.allclose(np.diff(s.betas), (0.02 - 1e-4) / 999)
  # abar_T of the DDPM schedule is ~4e-5 (hand-computed product).
  assert s.alphas_cumprod[-1] == pytest.approx(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
  t = policies.normalized_time(s.timesteps, s.num_original_timesteps, np.float64)
  np.testing.assert_allclose(t[[0, 999]], [0.001, 1.0])


def test_space_timesteps_matches_improved_diffusion():
  kept = diffusion.space_timesteps(1000, '50')
  assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
  stride = 999 / 49  # improved-diffusion: round(i * (size - 1) / (count - 1))
  assert kept == [int(round(i * stride)) for i in range(50)]
  assert kept[:4] == [0, 20, 41, 61]
  assert diffusion.space_timesteps(1000, 'ddim50') == list(range(0, 1000, 20))
  two = diffusion.space_timesteps(100, '2,3')
  assert two == [0, 49, 50, 74, 99]
  with pytest.raises(ValueError):
    diffusion.space_timesteps(10, '11')


def test_respace_preserves_marginals():
  s = diffusion.make_schedule()
  use = diffusion.space_timesteps(1000, '50')
  r = diffusion.respace(s, use)
  np.testing.assert_allclose(r.alphas_cumprod, s.alphas_cumprod[use], rtol=1e-12)
  np.testing.assert_array_equal(r.timesteps, use)
  assert r.num_original_timesteps == 1000


def test_q_sample_and_loss():
  s = diffusion.make_schedule()
  x0 = jnp.full((4000, 2), 0.7)
  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  t = jnp.full((4000,), 300)
  xt = diffusion.q_sample(s, x0, t, noise)
  ab = s.alphas_cumprod[300]
  np.testing.assert_allclose(np.asarray(xt), np.sqrt(ab) * 0.7 + np.sqrt(1 - ab) * np.asarray(noise),
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.std(xt)) == pytest.approx(np.sqrt(1 - ab), rel=0.05)
  loss = diffusion.eps_mse(jnp.ones((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 1)))
  np.testing.assert_allclose(np.asarray(loss), [1.0, 1.0])
