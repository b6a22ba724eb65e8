"""The tests' own sampler for reusing policies (test_reuse, test_learned_reuse): the sampler
written out step by step in Python with a gate form written here, independent of
`lees_jax.reuse` (no loop state; each step's model call jitted on its own with the outputs of
earlier steps passed in and out)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax.gates import REUSE, REUSE_RESIDUAL, SKIP
from lees_jax.models import backbone


@dataclasses.dataclass(eq=False)
class ReferenceForm:
  """The test's own reading of the actions: a reused unit returns the output it had when it
  last ran; a residual-reused one its skip on this input + (call - skip) of the step at which
  it last ran (``last``, updated by every unit that runs; the residual for the units in
  ``residual``)."""
  actions: tuple
  last: dict
  residual: frozenset = frozenset()

  def check(self, num_units):
    assert len(self.actions) == num_units

  def run(self, k, unit, call, skip, *args):
    a = self.actions[k]
    if a == REUSE:
      return self.last[k]
    if a == REUSE_RESIDUAL:
      return skip(unit, *args) + self.last[k]
    if a == SKIP:
      return skip(unit, *args)
    out = call(unit, *args)
    self.last[k] = out - skip(unit, *args) if k in self.residual else out
    return out


@dataclasses.dataclass(frozen=True)
class _Static:
  """A hashable tuple that jit treats as a static argument (a pytree without leaves)."""
  value: tuple


jax.tree_util.register_static(_Static)


def reference_sample(model, params, solver, actions, rng, batch, y=None):
  """Samples ``batch`` images under the (steps, K) ``actions`` with `ReferenceForm`."""
  residual = frozenset(int(k) for k in
                       np.flatnonzero((np.asarray(actions) == REUSE_RESIDUAL).any(axis=0)))

  @jax.jit
  def model_call(x, t, last, step_actions):
    form = ReferenceForm(step_actions.value, dict(last), residual)
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
