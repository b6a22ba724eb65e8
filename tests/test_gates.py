"""Gate functions, policies and segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import diffusion, gates, policies


def test_gate_value_formula_and_init():
  p = policies.init_gate_params(5)
  np.testing.assert_array_equal(np.asarray(policies.gate_values(p, 0.3)), np.full(5, 0.5))
  p = {'alpha': jnp.array([2.0, -1.0]), 'beta': jnp.array([-0.5, 0.25])}
  t = np.array([0.1, 0.9])
  want = 1 / (1 + np.exp(-(np.array([2.0, -1.0])[None] * t[:, None] + np.array([-0.5, 0.25]))))
  np.testing.assert_allclose(np.asarray(policies.gate_values(p, t)), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(policies.normalized_time(jnp.array([0, 999]), 1000)), [1e-3, 1.0])


def test_initial_gates_sit_at_half_and_are_off():
  """g = 0.5 exactly is 'not executed' (a unit runs only when g > 0.5)."""
  pol = policies.LeesPolicy.from_params(policies.init_gate_params(4))
  assert not pol.step_masks([0, 500, 999], 1000, 4).any()


def test_soft_policy_never_skips_and_weights_are_sigmoids():
  pol = policies.LeesPolicy([1.0, -2.0], [0.0, 0.5], form='soft')
  ts = [0, 499, 999]
  assert pol.step_masks(ts, 1000, 2).all()
  t = (np.array(ts) + 1) / 1000
  want = 1 / (1 + np.exp(-(np.array([1.0, -2.0]) * t[:, None] + np.array([0.0, 0.5]))))
  np.testing.assert_allclose(pol.step_weights(ts, 1000, 2), want, rtol=1e-6)


@pytest.mark.parametrize('seed', range(5))
def test_segments_cover_every_step_and_reproduce_masks(seed):
  rng = np.random.default_rng(seed)
  k = 28
  pol = policies.LeesPolicy(rng.normal(0, 5, k), rng.normal(0, 2, k))
  timesteps = diffusion.space_timesteps(1000, '50')[::-1]  # samplers run from noise to data
  masks = pol.step_masks(timesteps, 1000, k)
  segs = policies.segments_from_masks(masks)
  assert segs[0].start == 0 and segs[-1].stop == len(timesteps)
  for a, b in zip(segs, segs[1:]):
    assert a.stop == b.start and a.keep != b.keep  # maximal runs
  rebuilt = np.concatenate([np.tile(np.array(s.keep), (s.length, 1)) for s in segs])
  np.testing.assert_array_equal(rebuilt, masks)
  assert len(segs) <= k + 1  # each linear logit changes sign at most once
  # Independent per-step check of the hard decision, every one of the 50 x 28: g > 0.5.
  t = (np.asarray(timesteps, np.float64) + 1) / 1000
  g = 1 / (1 + np.exp(-(pol.alpha[None].astype(np.float64) * t[:, None] + pol.beta[None])))
  np.testing.assert_array_equal(masks, g > 0.5)


def test_hard_decision_at_and_near_logit_zero():
  """g = 0.5 exactly is off; the smallest positive logit is on; sampler, training and cost agree."""
  # alpha * t + beta with t = (s + 1) / 1000: s = 499 gives t = 0.5 and logit exactly 0.
  pol = policies.LeesPolicy([2.0, 2.0, -2.0], [-1.0, -1.0 + 2.0 ** -20, 1.0 + 2.0 ** -20])
  masks = pol.step_masks([498, 499, 500], 1000, 3)
  np.testing.assert_array_equal(masks, [[False, False, True],
                                        [False, True, True],
                                        [True, True, False]])
  # The training gates' forward decision is the same on the same logits.
  t = jnp.asarray([0.499, 0.5, 0.501])[:, None]
  logits = jnp.asarray(pol.alpha)[None] * t + jnp.asarray(pol.beta)[None]
  np.testing.assert_array_equal(np.asarray(gates.StraightThrough(logits).weights()), masks)


def test_schedule_policy_maps_steps_to_intervals():
  m = np.zeros((3, 10), bool)
  m[0] = True            # always
  m[1, :5] = True        # t in (0, 0.5]
  m[2, 9] = True         # t in (0.9, 1]
  pol = policies.SchedulePolicy(m)
  masks = pol.step_masks([0, 499, 500, 899, 900, 999], 1000, 3)
  # t = 0.001, 0.5, 0.501, 0.9, 0.901, 1.0
  np.testing.assert_array_equal(masks[:, 1], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(masks[:, 2], [0, 0, 0, 0, 1, 1])
  assert masks[:, 0].all()
  with pytest.raises(ValueError, match='3 entries'):
    policies.SchedulePolicy(m).step_masks([0], 1000, 4)


def test_random_gates_match_requested_fraction():
  p = policies.random_gate_params(0, 2000, keep_fraction=0.6)
  pol = policies.LeesPolicy(p['alpha'], p['beta'])
  masks = pol.step_masks(np.arange(1000), 1000, 2000)
  assert abs(policies.executed_block_ratio(masks) - 0.6) < 0.02


def test_policy_round_trip():
  for pol in [policies.FullPolicy(), policies.SchedulePolicy(np.eye(3, 4, dtype=bool), name='x'),
              policies.LeesPolicy([1.0, 2.0], [0.5, -1.0], form='soft', name='y')]:
    back = policies.policy_from_dict(pol.to_dict())
    np.testing.assert_array_equal(back.step_weights(range(0, 1000, 100), 1000, pol_k(pol)),
                                  pol.step_weights(range(0, 1000, 100), 1000, pol_k(pol)))


def pol_k(pol):
  return {'full': 3, 'schedule': 3, 'lees': 2}[pol.kind]


def test_straight_through_weights():
  logits = jnp.array([-1.0, 0.0, 2.0])
  tg = gates.StraightThrough(logits)
  np.testing.assert_array_equal(np.asarray(tg.weights()), [0.0, 0.0, 1.0])
  grad = jax.grad(lambda l: gates.StraightThrough(l).weights().sum())(logits)
  s = 1 / (1 + np.exp(-np.asarray(logits)))
  np.testing.assert_allclose(np.asarray(grad), s * (1 - s), rtol=1e-6)


@pytest.mark.parametrize('name, want', [
    ('ddpm', [0, 20, 41, 61, 82, 102]),                 # improved-diffusion space_timesteps(1000, "50")
    ('ddim', list(range(0, 1000, 20))),                 # DDIM's uniform skip: ddim50
    ('dpm_solver++', [0, 20, 41, 61, 82, 102]),
])
def test_gate_runs_report_on_the_samplers_own_timesteps(name, want):
  """gates.json's hard masks and ratios are computed on the grid the sampler runs (DDIM's grid
  differs from the respaced DDPM one: 0, 20, 40, ... against 0, 20, 41, ...)."""
  from configs import cifar10
  from lees_jax import objectives
  config = cifar10.get_config('paper')
  config.sampler.name = name
  got = objectives.sampler_timesteps(config)
  assert len(got) == 50 and got[:len(want)] == want and got[-1] == (980 if name == 'ddim' else 999)
