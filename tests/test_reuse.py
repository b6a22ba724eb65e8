"""Reuse as a gate form (`lees_jax.reuse`, `gates.ReuseUnits`) and DeepCache, on the tiny UNet
and a tiny ADM with random weights: samples against an independent step-by-step loop whose
gate form is written here, equality with masking policies when nothing is reused, refusals,
spec strings and FLOP accounting."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import celebahq64_adm
from lees_jax import cost, diffusion, evaluate, gates, models, policies, reuse, samplers
from lees_jax.gates import REUSE, RUN, SKIP
from reuse_reference import reference_sample

SCHED = diffusion.make_schedule(1000)


@pytest.fixture(scope='module')
def tiny_adm():
  model = models.build_model(celebahq64_adm.get_config('tiny').model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  # ADM zero-initialises its output convolution: give it weights, so that eps depends on x.
  kernel = params['conv_out']['kernel']
  params = dict(params, conv_out=dict(params['conv_out'], kernel=0.1 * jax.random.normal(
      jax.random.PRNGKey(1), kernel.shape)))
  return model, params


def test_form_returns_the_cached_output_without_calling_the_unit():
  def never(*_):
    raise AssertionError('a reused unit must not be called')

  cached = jnp.arange(6.0).reshape(2, 3)
  form = gates.ReuseUnits((RUN, REUSE, SKIP), cached={1: cached}, record={0})
  assert form.run(1, None, never, never, jnp.ones(3)) is cached
  out = form.run(0, None, lambda _, x: 2 * x, never, jnp.ones(3))
  np.testing.assert_array_equal(form.recorded[0], out)
  np.testing.assert_array_equal(form.run(2, None, never, lambda _, x: -x, jnp.ones(3)), -1)
  assert set(form.recorded) == {0}
  with pytest.raises(ValueError, match='no cached output'):
    gates.ReuseUnits((RUN, REUSE, SKIP))
  with pytest.raises(ValueError, match='codes'):
    gates.ReuseUnits((RUN, 4, SKIP))


def test_run_and_skip_actions_equal_the_static_mask_bitwise(tiny_model):
  model, params = tiny_model
  keep = tuple(bool(v) for v in np.arange(model.num_units) % 3 != 1)
  x, t = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3)), jnp.array([10, 900])
  fn = jax.jit(lambda form: model.apply({'params': params}, x, t, gates=form), static_argnums=0)
  a = fn(gates.StaticMask(keep))
  b = fn(gates.ReuseUnits(tuple(int(v) for v in keep), record={0, 1}))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize('branch', [1, 3])
def test_deepcache_sample_matches_the_step_by_step_loop(tiny_model, branch):
  model, params = tiny_model
  solver = samplers.make_solver(SCHED, 'ddpm', 5)
  policy = reuse.deepcache(model, 2, branch=branch)
  program = samplers.compile_sampler(model, solver, policy, 2)
  actions = policy.step_actions(solver.timesteps, 1000, model.num_units)
  assert [bool((a == RUN).all()) for a in actions] == [True, False, True, False, True]
  rng = jax.random.PRNGKey(3)
  got = np.asarray(program(params, rng))
  np.testing.assert_allclose(got, reference_sample(model, params, solver, actions, rng, 2),
                             atol=1e-4, rtol=0)
  full = np.asarray(samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)(params, rng))
  # float32 jitted loop against per-step programs: ~3e-5 apart; the reuse itself moves the
  # sample by far more than the tolerance.
  assert np.abs(got - full).max() > 1e-2


def test_a_reused_unit_gets_its_last_computed_output_across_skips(tiny_model):
  """Unit mid_res_1 runs, is skipped, then reused: it returns step 0's output (the last step
  at which it *ran*), and a unit reused in two segments keeps one cache across them."""
  model, params = tiny_model
  k = model.num_units
  names = [u.name for u in model.units]
  mid, attn = names.index('mid_res_1'), names.index('mid_attn')
  actions = np.full((4, k), RUN, np.int8)
  actions[1, mid], actions[2, mid], actions[3, mid] = SKIP, REUSE, REUSE
  actions[1, attn], actions[3, attn] = REUSE, REUSE  # ran at steps 0 and 2
  policy = reuse.StepActionPolicy(actions, name='hand')
  solver = samplers.make_solver(SCHED, 'ddim', 4)
  program = samplers.compile_sampler(model, solver, policy, 2)
  assert len(program.segments) == 4 and program.masks.sum() == actions.size - 5
  rng = jax.random.PRNGKey(0)
  np.testing.assert_allclose(np.asarray(program(params, rng)),
                             reference_sample(model, params, solver, actions, rng, 2),
                             atol=1e-4, rtol=0)


def test_reuse_policies_that_reuse_nothing_sample_bitwise_like_masks(tiny_model):
  model, params = tiny_model
  k = model.num_units
  solver = samplers.make_solver(SCHED, 'ddpm', 4)
  rng = jax.random.PRNGKey(1)
  schedule = policies.SchedulePolicy(np.random.default_rng(0).random((k, 3)) < 0.6, name='s')
  lees = policies.LeesPolicy(np.random.default_rng(1).normal(0, 8, k),
                             np.random.default_rng(2).normal(0, 3, k))
  for masking in (schedule, lees):
    as_actions = reuse.StepActionPolicy(masking.step_actions(solver.timesteps, 1000, k))
    a = samplers.compile_sampler(model, solver, masking, 2)
    b = samplers.compile_sampler(model, solver, as_actions, 2)
    assert [s.keep for s in a.segments] == [s.keep for s in b.segments]
    assert a.flop_fraction == b.flop_fraction and a.block_ratio == b.block_ratio
    np.testing.assert_array_equal(np.asarray(a(params, rng)), np.asarray(b(params, rng)))
  # DeepCache with N = 1 runs every step in full: the full policy, bitwise.
  full = samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)
  dc1 = samplers.compile_sampler(model, solver, reuse.deepcache(model, 1), 2)
  assert dc1.flop_fraction == 1.0
  np.testing.assert_array_equal(np.asarray(full(params, rng)), np.asarray(dc1(params, rng)))


def test_deepcache_on_adm_with_learned_variance(tiny_adm):
  model, params = tiny_adm
  solver = samplers.make_solver(diffusion.make_schedule(1000, 'cosine'), 'ddpm', 4,
                                variance='learned_range')
  policy = evaluate.resolve_policy('deepcache:2@2', model).policy
  program = samplers.compile_sampler(model, solver, policy, 2)
  rng = jax.random.PRNGKey(0)
  actions = policy.step_actions(solver.timesteps, 1000, model.num_units)
  np.testing.assert_allclose(np.asarray(program(params, rng)),
                             reference_sample(model, params, solver, actions, rng, 2),
                             atol=1e-4, rtol=0)
  dc1 = samplers.compile_sampler(model, solver, reuse.deepcache(model, 1), 2)
  full = samplers.compile_sampler(model, solver, policies.FullPolicy(), 2)
  np.testing.assert_array_equal(np.asarray(full(params, rng)), np.asarray(dc1(params, rng)))


def test_shallow_branch_runs_exactly_the_fresh_skips_consumers(tiny_model, tiny_adm):
  for model in (tiny_model[0], tiny_adm[0]):
    skips = model.skip_connections
    assert all(model.units[s.target].position == 'decoder' and
               (s.source < 0 or model.units[s.source].position == 'encoder') for s in skips)
    assert len({s.target for s in skips}) == len(skips)
    for b in range(len(skips)):
      shallow = reuse.shallow_branch(model, b)
      for j, s in enumerate(skips):
        assert shallow[s.target] == (j <= b)  # a running decoder unit gets a fresh skip
      # Encoder units run up to skip b's source, then the deep part is reused, then the rest.
      runs = ''.join('r' if v else '.' for v in shallow)
      assert runs == 'r' * (skips[b].source + 1) + '.' * (skips[b].target - skips[b].source - 1) \
          + 'r' * (model.num_units - skips[b].target)
  model = tiny_model[0]
  assert [u.name for u, v in zip(model.units, reuse.shallow_branch(model, 1)) if v] == \
      ['down_0_res_0', 'up_0_res_0', 'up_0_res_1']


def test_invalid_reuse_is_refused_by_name(tiny_model):
  model, _ = tiny_model
  k = model.num_units
  early = np.full((3, k), RUN, np.int8)
  early[0, 4] = REUSE
  with pytest.raises(ValueError, match=r'unit 4\) is reused at step 0 but has not run'):
    reuse.StepActionPolicy(early)
  with pytest.raises(ValueError, match='unknown unit actions'):
    reuse.StepActionPolicy(np.full((3, k), 'cache'))
  solver = samplers.make_solver(SCHED, 'ddpm', 6)
  dc = reuse.deepcache(model, 3)
  # A partial program from step 1 would reuse what step 0 computed: refused, naming the unit.
  with pytest.raises(ValueError, match=r'down_1_res_0 \(unit 1\) is reused at step 1'):
    samplers.compile_sampler(model, solver, dc, 2, start_step=1)
  for path in ('cond', 'stacked'):
    with pytest.raises(ValueError, match="only path 'segments'"):
      samplers.compile_sampler(model, solver, dc, 2, path=path)
  with pytest.raises(ValueError, match='4 steps x'):
    samplers.compile_sampler(model, solver, reuse.StepActionPolicy(np.ones((4, k), int)), 2)
  with pytest.raises(ValueError, match='branch must be in'):
    reuse.deepcache(model, 2, branch=4)
  with pytest.raises(ValueError, match='interval N must be >= 1'):
    reuse.deepcache(model, 0)


def test_spec_strings_and_dicts(tiny_model, tiny_adm):
  model = tiny_model[0]
  r = evaluate.resolve_policy('deepcache:3', model)
  assert r.name == 'deepcache_3_uniform_b1' and r.policy.interval == 3
  assert r.policy.shallow == reuse.shallow_branch(model, 1)
  r = evaluate.resolve_policy('deepcache:2:nonuniform@0', model)
  assert (r.policy.schedule, r.policy.branch) == ('nonuniform', 0)
  assert evaluate.resolve_policy('deepcache:2@3', tiny_adm[0]).policy.branch == 3
  for bad, why in [('deepcache:x', 'expected deepcache'), ('deepcache:2:often', 'schedule must'),
                   ('deepcache:2@9', 'branch must be in')]:
    with pytest.raises(ValueError, match=why):
      evaluate.resolve_policy(bad, model)
  actions = np.full((2, model.num_units), RUN, np.int8)
  actions[1, 3] = REUSE
  for pol in (r.policy, reuse.StepActionPolicy(actions, name='a')):
    back = policies.policy_from_dict(pol.to_dict())
    assert type(back) is type(pol) and back.to_dict() == pol.to_dict()
  from configs import imagenet256_dit  # noqa: F401 pylint: disable=g-import-not-at-top
  dit = models.build_model(imagenet256_dit.get_config('tiny').model)
  with pytest.raises(ValueError, match='declares no skip_connections'):
    evaluate.resolve_policy('deepcache:2', dit)


def test_full_step_choices():
  assert reuse.uniform_full_steps(10, 3) == [0, 3, 6, 9]
  for steps, n in [(50, 2), (50, 3), (50, 5), (20, 3), (10, 4), (7, 7), (5, 10)]:
    full = reuse.nonuniform_full_steps(steps, n)
    assert len(full) == -(-steps // n) and full[0] == 0
    assert all(0 <= a < b < steps for a, b in zip(full, full[1:]))
  full = np.array(reuse.nonuniform_full_steps(50, 3))
  gaps = np.diff(full)
  center = int(np.argmin(np.abs(full - 15)))
  assert gaps[max(center - 1, 0)] < gaps[0] and gaps[center] < gaps[-1]  # dense near step 15


def test_flop_fraction_of_deepcache_by_hand(tiny_model):
  model, _ = tiny_model
  units = model.units
  total = model.always_flops + sum(u.run_flops for u in units)
  solver = samplers.make_solver(SCHED, 'ddpm', 10)
  for n, branch in [(2, 1), (3, 1), (5, 3)]:
    shallow = reuse.shallow_branch(model, branch)
    partial = model.always_flops + sum(u.run_flops for u, s in zip(units, shallow) if s)
    full_steps = len(range(0, 10, n))
    want = (full_steps * total + (10 - full_steps) * partial) / (10 * total)
    program = samplers.compile_sampler(model, solver, reuse.deepcache(model, n, branch=branch), 2)
    assert program.flop_fraction == pytest.approx(want, rel=1e-12)
    assert program.block_ratio == pytest.approx(
        (full_steps * len(units) + (10 - full_steps) * sum(shallow)) / (10 * len(units)))
  mc = cost.model_cost(model)
  assert mc.flops_for_actions([REUSE] * len(units)) == model.always_flops
  assert mc.flops_for_actions([SKIP] * len(units)) == mc.flops_for_mask([False] * len(units))


def test_reused_units_are_absent_from_the_program(tiny_model):
  """S = N = 4: one full step, then one loop of three partial steps. The partial loop's
  convolutions are the shallow units' and the always-run ones (conv_in/out, the upsample feeding
  the shallow decoder; the downsample, whose output feeds only reused units, is dead code that
  JAX already leaves out of the lowered program)."""
  model, params = tiny_model
  solver = samplers.make_solver(SCHED, 'ddpm', 4)
  rng = jax.random.PRNGKey(0)
  count = lambda pol: samplers.compile_sampler(model, solver, pol, 2).lower(  # noqa: E731
      params, rng).as_text().count('stablehlo.convolution')
  shallow = reuse.shallow_branch(model, 1)
  convs = sum(2 + (u.in_ch != u.out_ch) for u, s in zip(model.units, shallow)
              if s and u.kind == 'res')
  partial_loop = count(reuse.deepcache(model, 4)) - count(policies.FullPolicy())
  assert 3 + convs <= partial_loop <= 4 + convs


def test_repeating_segments_are_one_loop(tiny_model):
  """DeepCache N = 2 over 8 steps is [full, partial] four times: one loop of two step bodies,
  the program of 4 steps (whose two repeats make the same loop); 7 steps add a last full step."""
  model, params = tiny_model
  rng = jax.random.PRNGKey(0)
  policy = reuse.deepcache(model, 2)

  def convolutions(steps):
    solver = samplers.make_solver(SCHED, 'ddim', steps)
    program = samplers.compile_sampler(model, solver, policy, 2)
    assert len(program.segments) == steps
    return program.lower(params, rng).as_text().count('stablehlo.convolution')

  full = samplers.compile_sampler(model, samplers.make_solver(SCHED, 'ddim', 2),
                                  policies.FullPolicy(), 2).lower(params, rng).as_text()
  four = convolutions(4)
  assert convolutions(8) == four and convolutions(7) == four + full.count('stablehlo.convolution')
  segs = policies.segments_from_actions(policy.step_actions(range(7), 1000, model.num_units))
  assert [(len(g), r) for g, r in reuse.repeated_groups(segs)] == [(2, 3), (1, 1)]
