"""The 'stacked' sampling path: DiT's blocks stacked on a depth axis, a loop over the kept ones.

The oracle is the 'segments' path (static masks, skipped blocks never traced; itself checked
against diffusers in test_dit_sampling.py) with the same key: the stacked program must give its
samples for every mask, compile once for every mask, hold one block body and no conditional,
and run exactly the kept blocks (counted at run time).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from conftest import TINY_SPEC
from lees_jax import ase, data, diffusion, evaluate, gates, models, policies, samplers
from lees_jax.models import backbone

T = 1000
SCHED = diffusion.make_schedule(T)
SPEC = models.DiTSpec(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=5,
                      num_heads=4, num_classes=10, learn_sigma=True)
K = SPEC.depth
B = 2
STEPS = 5
ATOL = 1e-5  # one forward pass (outputs ~1), fp32; measured 4e-7
# Whole trajectories: DDIM without x0 clipping (clipping would saturate ~70 % of this random
# network's samples at +-1 and hide differences there), so |x| grows to ~100 and float32
# rounding with it: max |stacked - segments| <= RTOL max |x|; measured 1.9e-7 (random mask).
RTOL = 1e-5


def _assert_close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  assert np.abs(got - want).max() <= RTOL * max(1.0, np.abs(want).max())


@pytest.fixture(scope='module')
def dit():
  """The small DiT with random N(0, 0.1^2) parameters (its own init is adaLN-Zero: every block
  the identity, which would make skipping invisible)."""
  model = models.DiT(SPEC)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(1)
  return model, jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), jnp.float32), shapes)


def _solver():
  return samplers.make_solver(SCHED, 'ddim', STEPS, clip_x0=False)


def _policies():
  rng = np.random.default_rng(0)
  units = models.DiT(SPEC).units
  return {
      'all_on': policies.FullPolicy(),
      'all_off': policies.SchedulePolicy(np.zeros((K, 1), bool), name='all_off'),
      'alternating': policies.SchedulePolicy((np.arange(K) % 2 == 0)[:, None], name='alternating'),
      'ase_D7': ase.named_schedule('D7', units),
      'random': policies.SchedulePolicy(rng.random((K, 10)) < 0.5, name='random'),
  }


def _masks(policy, solver):
  return policy.step_masks(solver.timesteps, solver.num_original_timesteps, K)


@pytest.fixture(scope='module')
def stacked(dit):
  """One stacked program (compiled once; on a 1-device mesh, so the sharded route is the one
  checked) and its samples for every policy, by operand."""
  model, params = dit
  solver = _solver()
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, path='stacked',
                                  mesh=data.make_mesh(jax.devices()[:1]))
  rng = jax.random.PRNGKey(3)
  out = {name: np.asarray(prog.jitted(params, rng, jnp.asarray(_masks(pol, solver))))
         for name, pol in _policies().items()}
  return prog, out


def test_stacked_forward_equals_the_static_mask_forward(dit):
  """One forward pass: `Stack.forward` (through `predict_eps`) against ``model.apply`` with the
  same StaticMask, for masks including all on and all off; one compilation for all."""
  model, params = dit
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 8, 8, 4))
  t, y = jnp.array([3, 500, 999]), jnp.array([1, 10, 7])
  stack = model.stack
  assert stack.names == tuple(f'block_{k}' for k in range(K))
  fwd = jax.jit(lambda p, keep: backbone.predict_eps(
      model, p, x, t, y, gates=backbone.StackMask(stack.stacked_params(p), keep)))
  static = jax.jit(lambda p, keep: backbone.predict_eps(model, p, x, t, y,
                                                        gates=gates.StaticMask(keep)),
                   static_argnums=1)
  for keep in [(1,) * K, (0,) * K, (1, 0, 1, 1, 0)]:
    eps, v = fwd(params, jnp.asarray(keep, bool))
    want_eps, want_v = static(params, keep)
    np.testing.assert_allclose(eps, want_eps, rtol=0, atol=ATOL)
    np.testing.assert_allclose(v, want_v, rtol=0, atol=ATOL)
  assert fwd._cache_size() == 1
  with pytest.raises(ValueError, match='keep vector'):
    stack.kept_indices(jnp.ones((K + 1,), bool))
  with pytest.raises(ValueError, match='train=True'):
    backbone.call(model, params, x, t, y, train=True,
                  gates=backbone.StackMask(stack.stacked_params(params), jnp.ones((K,), bool)))


@pytest.mark.parametrize('name', list(_policies()))
def test_stacked_equals_segments(dit, stacked, name):
  model, params = dit
  policy = _policies()[name]
  seg = samplers.compile_sampler(model, _solver(), policy, B, path='segments')
  want = np.asarray(seg(params, jax.random.PRNGKey(3)))
  _assert_close(stacked[1][name], want)
  if name == 'ase_D7' or name == 'random':
    assert len(seg.segments) > 1  # the mask varies over the steps


def test_one_compilation_for_every_mask(dit, stacked):
  """The stacked program's operand is the (steps, K) mask matrix: the five policies above ran
  through one compiled program (on a 1-device mesh: the output is sharded over 'batch'); its
  own operand is its policy's mask matrix; and the masks change the samples."""
  model, params = dit
  prog, out = stacked
  assert prog.path == 'stacked' and prog.operand.shape == (STEPS, K)
  x = prog(params, jax.random.PRNGKey(3))  # its own operand: the full policy's masks
  assert len(x.sharding.device_set) == 1 and x.sharding.mesh.axis_names == ('batch',)
  np.testing.assert_array_equal(np.asarray(x), out['all_on'])
  assert prog.jitted._cache_size() == 1
  # The stacked layout, made once (prepare_params), runs the same program without the copy.
  prepared = prog.prepare_params(params)
  assert 'block_0' not in prepared and prepared['stacked_blocks']['mlp_in']['kernel'].shape == (
      K, SPEC.hidden_size, SPEC.mlp_hidden)
  _assert_close(prog.jitted(prepared, jax.random.PRNGKey(3),
                            jnp.asarray(_masks(_policies()['random'], _solver()))), out['random'])
  seg = samplers.compile_sampler(model, _solver(), policies.FullPolicy(), B)
  assert seg.prepare_params(params) is params
  # Evaluation prepares once and samples every batch with the stacked layout.
  images = evaluate.generate(prog, params, 2 * B - 1, seed=0)
  first = prog.jitted(prepared, jax.random.fold_in(jax.random.PRNGKey(0), 0), prog.operand)
  np.testing.assert_array_equal(images[:B], data.to_uint8(first))
  assert images.shape == (2 * B - 1, 8, 8, 4) and prog.jitted._cache_size() == 2
  np.testing.assert_array_equal(prog.operand, prog.masks)
  assert np.abs(out['all_on'] - out['all_off']).max() > 1e-2
  # A program built for another policy reports that policy's accounting, as every path does.
  other = samplers.compile_sampler(model, _solver(), _policies()['ase_D7'], B, path='stacked')
  assert other.block_ratio == pytest.approx(_masks(_policies()['ase_D7'], _solver()).mean())
  assert 0 < other.flop_fraction < 1


def _find(jaxpr, primitive, out):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      out.append(eqn)
    for sub in jex_core.jaxprs_in_params(eqn.params):
      _find(sub, primitive, out)
  return out


def test_program_has_one_block_body_no_conditional_and_a_data_dependent_loop(dit, stacked):
  model, params = dit
  prog, _ = stacked
  rng = jax.random.PRNGKey(0)
  lowered = prog.lower(params, rng)
  text = lowered.as_text()
  assert 'stablehlo.case' not in text and 'stablehlo.if' not in text
  assert 'conditional' not in lowered.compile().as_text()
  # The block body appears once: the dot products of the full segments program are those of
  # the program with every block skipped plus depth x one block's; the stacked program has one.
  count = lambda p: p.lower(params, rng).as_text().count('stablehlo.dot_general')  # noqa: E731
  solver = _solver()
  n_full = count(samplers.compile_sampler(model, solver, policies.FullPolicy(), B))
  n_none = count(samplers.compile_sampler(model, solver, _policies()['all_off'], B))
  per_block = (n_full - n_none) // K
  assert per_block >= 7 and n_full == n_none + K * per_block
  assert count(prog) == n_none + per_block

  # The loop over the blocks is a while (a fori_loop with a traced trip count; a static one
  # would be a scan) whose condition compares the counter with a carried bound, not a constant,
  # computed in the step from the mask operand by a sum; its body is the one block.
  jaxpr = jax.make_jaxpr(prog.jitted)(params, rng, prog.operand).jaxpr
  (loop,) = _find(jaxpr, 'while', [])
  cond = loop.params['cond_jaxpr'].jaxpr
  (lt,) = cond.eqns
  assert lt.primitive.name == 'lt' and all(v in cond.invars for v in lt.invars)
  assert not any(isinstance(v, jex_core.Literal) for v in lt.invars)
  nc, nb = loop.params['cond_nconsts'], loop.params['body_nconsts']  # invars: consts, carry
  bound = loop.invars[nc + nb + cond.invars.index(lt.invars[1]) - nc]
  (step,) = [s for s in _find(jaxpr, 'scan', []) if loop in s.params['jaxpr'].jaxpr.eqns]
  producers = {v: e for e in step.params['jaxpr'].jaxpr.eqns for v in e.outvars}
  ancestry, todo = set(), [bound]
  while todo:
    eqn = producers.get(todo.pop())
    if eqn is not None and eqn not in ancestry:
      ancestry.add(eqn)
      todo.extend(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
  assert 'reduce_sum' in {e.primitive.name for e in ancestry}
  assert len(_find(loop.params['body_jaxpr'].jaxpr, 'dot_general', [])) == per_block


class _CountingDiT(models.DiT):
  """DiT whose stacked block reports every execution to ``RUNS`` (debug callback)."""

  @property
  def stack(self):
    stack = super().stack
    (blocks,) = stack.stacks

    def block(block_params, h, ctx):
      jax.debug.callback(lambda: RUNS.append(1))
      return blocks.block(block_params, h, ctx)

    return dataclasses.replace(stack, stacks=(dataclasses.replace(blocks, block=block),))


RUNS = []


def test_only_the_kept_blocks_run(dit):
  """Counted at run time: a step runs exactly its kept blocks (guided: one loop for both
  halves), none at all when every block is off."""
  _, params = dit
  model = _CountingDiT(SPEC)
  solver = _solver()
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, path='stacked',
                                  guidance_scale=2.0)
  rng = jax.random.PRNGKey(0)
  for name in ('all_on', 'all_off', 'ase_D7', 'random'):
    masks = _masks(_policies()[name], solver)
    RUNS.clear()
    jax.block_until_ready(prog.jitted(params, rng, jnp.asarray(masks)))
    jax.effects_barrier()
    assert len(RUNS) == masks.sum(), name
  assert prog.jitted._cache_size() == 1


def test_guided_partial_stacked_equals_segments(dit):
  """Classifier-free guidance (both halves through one loop over the kept blocks) and a
  partial program (start_step: the absolute step masks and keys), labels given."""
  model, params = dit
  policy = _policies()['random']
  solver = _solver()
  rng = jax.random.PRNGKey(6)
  labels = np.array([3, 8])
  x_init = np.random.default_rng(1).standard_normal((B, 8, 8, 4)).astype(np.float32)
  progs = {path: samplers.compile_sampler(model, solver, policy, B, path=path, start_step=2,
                                          guidance_scale=3.0)
           for path in ('stacked', 'segments')}
  assert progs['stacked'].operand.shape == (STEPS, K)  # indexed by the absolute step
  np.testing.assert_array_equal(progs['stacked'].masks, progs['segments'].masks)
  assert len(progs['segments'].segments) > 1
  got = np.asarray(progs['stacked'](params, rng, x_init, labels))
  _assert_close(got, progs['segments'](params, rng, x_init, labels))


def test_stacked_is_refused_where_it_cannot_apply(dit):
  unet = models.UNet(TINY_SPEC)
  solver = samplers.make_solver(SCHED, 'ddim', 3)
  with pytest.raises(ValueError, match=r"'stacked' needs .*UNet has none: use path 'segments', "
                                       r"'cond'"):
    samplers.compile_sampler(unet, solver, policies.FullPolicy(), 2, path='stacked')
  soft = policies.LeesPolicy(np.zeros(K), np.ones(K), form='soft')
  with pytest.raises(ValueError, match="soft gates need path='soft'"):
    samplers.compile_sampler(dit[0], solver, soft, 2, path='stacked')
  with pytest.raises(ValueError, match="'stacked'"):
    samplers.compile_sampler(dit[0], solver, policies.FullPolicy(), 2, path='scan')
  assert 'stacked' in samplers.PATHS and 'stacked' in samplers.HARD_PATHS
