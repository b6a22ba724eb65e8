"""Learned reuse (`lees_jax.learned_reuse`, `gates.REUSE_RESIDUAL`, `gates.CacheBlend`) on the tiny
UNet and the tiny DiT with random weights: residual reuse returns skip + the last residual,
Learning-to-Cache's router training and its straight-through gradient, three-choice LEES
reducing to LEES bitwise, spec strings and FLOP accounting."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import cost, diffusion, evaluate, files, gates, learned_reuse, models, policies
from lees_jax import reuse, samplers
from lees_jax.gates import REUSE, REUSE_RESIDUAL, RUN, SKIP
from lees_jax.models import backbone

SCHED = diffusion.make_schedule(1000)


def _never(*_):
  raise AssertionError('a reused unit must not be called')


def test_residual_reuse_returns_the_skip_plus_the_last_residual_two_steps():
  """Step 1 runs unit 0 (call = 3x, skip = x: residual 2x) and records it; step 2 reuses it on
  a new input y: y + 2x, without calling the unit."""
  x, y = jnp.array([1.0, 2.0]), jnp.array([10.0, 20.0])
  call, skip = (lambda _, v: 3 * v), (lambda _, v: v)
  step1 = gates.ReuseUnits((RUN,), record={0}, residual={0})
  np.testing.assert_array_equal(step1.run(0, None, call, skip, x), 3 * x)
  np.testing.assert_array_equal(step1.recorded[0], 2 * x)
  step2 = gates.ReuseUnits((REUSE_RESIDUAL,), cached=dict(step1.recorded), residual={0})
  np.testing.assert_array_equal(step2.run(0, None, _never, skip, y), y + 2 * x)
  with pytest.raises(ValueError, match='no cached output'):
    gates.ReuseUnits((REUSE_RESIDUAL,))
  with pytest.raises(ValueError, match='other kind'):
    gates.ReuseUnits((REUSE_RESIDUAL,), cached={0: x})  # not listed as residual
  with pytest.raises(ValueError, match='both whole'):
    reuse.check_actions(np.array([[RUN], [REUSE], [REUSE_RESIDUAL]]))
  with pytest.raises(ValueError, match='has not run'):
    reuse.check_actions(np.array([[SKIP], [REUSE_RESIDUAL]]))
  assert reuse.cached_units([[RUN, RUN], [REUSE_RESIDUAL, REUSE]]) == (0, 1)
  assert reuse.residual_units([[RUN, RUN], [REUSE_RESIDUAL, REUSE]]) == (0,)


@dataclasses.dataclass(eq=False)
class ResidualReference:
  """The test's own reading: a residual-reused unit returns skip + (call - skip) of the step at
  which it last ran (``last``, updated by every unit that runs)."""
  actions: tuple
  last: dict

  def check(self, num_units):
    assert len(self.actions) == num_units

  def run(self, k, unit, call, skip, *args):
    a = self.actions[k]
    if a == REUSE_RESIDUAL:
      return skip(unit, *args) + self.last[k]
    if a == SKIP:
      return skip(unit, *args)
    out = call(unit, *args)
    self.last[k] = out - skip(unit, *args)
    return out


@dataclasses.dataclass(frozen=True)
class _Static:
  value: tuple


jax.tree_util.register_static(_Static)


def reference_sample(model, params, solver, actions, rng, batch, y=None):
  @jax.jit
  def model_call(x, t, last, step_actions):
    form = ResidualReference(step_actions.value, dict(last))
    eps, v = backbone.predict_eps(model, params, x, t, y, gates=form)
    return eps, v, form.last

  init_key, step_rng = jax.random.split(rng)
  state = solver.init_state(jax.random.normal(init_key, (batch,) + tuple(model.input.shape)))
  last = {}
  for i, t in enumerate(solver.timesteps):
    eps, v, last = model_call(state[0], jnp.full((batch,), t, jnp.int32), last,
                              _Static(tuple(int(a) for a in actions[i])))
    state = solver.update(i, state, eps, jax.random.fold_in(step_rng, i), v)
  return np.asarray(state[0])


def test_residual_reuse_sample_matches_the_step_by_step_loop_and_costs_skips(tiny_model):
  model, params = tiny_model
  k = model.num_units
  actions = np.full((4, k), RUN, np.int8)
  actions[1, 1::2] = REUSE_RESIDUAL
  actions[2, 2] = SKIP
  actions[3, 2:] = REUSE_RESIDUAL  # unit 2 reuses step 1's residual across its skip at step 2
  policy = reuse.StepActionPolicy(actions, name='hand')
  solver = samplers.make_solver(SCHED, 'ddim', 4)
  program = samplers.compile_sampler(model, solver, policy, 2)
  rng = jax.random.PRNGKey(0)
  got = np.asarray(program(params, rng))
  np.testing.assert_allclose(got, reference_sample(model, params, solver, actions, rng, 2),
                             atol=1e-4, rtol=0)
  mc = cost.model_cost(model)
  run = np.array([u.run_flops for u in mc.units])
  skip = np.array([u.skip_flops for u in mc.units])
  want = np.mean([mc.always_flops + np.where(a == RUN, run, skip).sum() for a in actions])
  assert program.flop_fraction == pytest.approx(want / mc.total_flops)
