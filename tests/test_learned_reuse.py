"""Learned reuse (`lees_jax.learned_reuse`, `gates.REUSE_RESIDUAL`, `gates.CacheBlend`) on the tiny
UNet and the tiny DiT with random weights: residual reuse returns skip + the last residual,
Learning-to-Cache's router training and its straight-through gradient, three-choice LEES
reducing to LEES bitwise, spec strings and FLOP accounting."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import cost, diffusion, evaluate, files, gates, learned_reuse, models, policies
from lees_jax import reuse, samplers
from lees_jax.gates import REUSE, REUSE_RESIDUAL, RUN, SKIP
from reuse_reference import reference_sample

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


@pytest.mark.parametrize('form', ['soft', 'hard'])
def test_router_gradient_is_the_analytic_blend_derivative(form):
  """One unit, call = 3x, skip = x, cached residual c: out = x + w (2x) + (1 - w) c, so
  d out / d beta = r (1 - r) (2x - c) for both forms (straight-through: the soft blend's
  gradient); forward w = r ('soft') or the sampling decision r >= threshold ('hard')."""
  from lees_jax.objectives import learning_to_cache as l2c
  x, c = jnp.array([[1.0, -2.0]]), jnp.array([[0.5, 4.0]])

  def out(beta):
    w = l2c.router_weights(beta, 0.5, form)[None, None]  # (B=1, K=1)
    blend = gates.CacheBlend(w, {0: c}, reuse_weight=jnp.ones_like(w))
    return blend.run(0, None, lambda _, v: 3 * v, lambda _, v: v, x)

  for beta in (-0.7, 0.3):
    r = 1 / (1 + np.exp(-beta))
    w = r if form == 'soft' else float(r >= 0.5)
    np.testing.assert_allclose(out(jnp.float32(beta)), x + w * 2 * x + (1 - w) * c, rtol=1e-6)
    grad = jax.grad(lambda b: out(b).sum())(jnp.float32(beta))
    np.testing.assert_allclose(grad, r * (1 - r) * float((2 * x - c).sum()), rtol=1e-5)


def test_l2c_training_moves_routers_and_keeps_the_backbone_frozen(tiny_model, tmp_path):
  from conftest import tiny_config
  from lees_jax import train
  from lees_jax.objectives import learning_to_cache as l2c
  model, params = tiny_model
  config = tiny_config(**{'mode': 'train_l2c', 'l2c.num_train_steps': 2, 'l2c.batch_size': 4,
                          'l2c.log_every': 2, 'l2c.checkpoint_every': 2})
  before = jax.tree_util.tree_map(np.array, params)
  objective = l2c.l2c_objective(config, backbone=params)
  state = train.train(config, str(tmp_path), objective)
  assert set(state['params']) == {'beta'}
  beta = np.asarray(state['params']['beta'])
  assert beta.shape == (5, model.num_units)
  np.testing.assert_array_equal(beta[0], 2.0)  # step 0 always runs: never drawn, never moved
  assert (beta[1:] != 2.0).any()
  # The optimiser state holds the routers' moments only; the backbone is bitwise unchanged.
  assert {np.shape(v) for v in jax.tree_util.tree_leaves(state['opt_state'])} <= {(), beta.shape}
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.asarray, objective.frozen))
  summary = files.read_json(files.join(str(tmp_path), learned_reuse.ROUTERS_FILE))
  assert summary['timesteps'] == [999, 749, 500, 250, 0]
  np.testing.assert_array_equal(summary['actions'][0], RUN)
  # Its spec resolves into the policy of those routers; a threshold above r reuses every block.
  pol = evaluate.resolve_policy(f'l2c:{tmp_path}', model).policy
  np.testing.assert_array_equal(pol.beta, beta)
  high = evaluate.resolve_policy(f'l2c:{tmp_path}/routers.json@0.99', model).policy
  acts = high.step_actions(summary['timesteps'], 1000, model.num_units)
  assert (acts[0] == RUN).all() and (acts[1:] == REUSE_RESIDUAL).all()
  assert policies.policy_from_dict(high.to_dict()).threshold == 0.99
  with pytest.raises(ValueError, match='trained for the sampler timesteps'):
    high.step_actions([999, 700, 500, 250, 0], 1000, model.num_units)


def _lees3_without_reuse(k, seed=0):
  gp = policies.random_gate_params(seed, k, 0.6)
  return gp, learned_reuse.Lees3Policy(gp['alpha'], gp['beta'], np.zeros(k), np.full(k, -1.0))


def test_three_choice_without_reuse_equals_lees_masks_and_samples_bitwise(tiny_model):
  model, params = tiny_model
  k = model.num_units
  gp, lees3 = _lees3_without_reuse(k)
  lees = policies.LeesPolicy(gp['alpha'], gp['beta'])
  solver = samplers.make_solver(SCHED, 'ddpm', 5)
  acts = lees3.step_actions(solver.timesteps, 1000, k)
  np.testing.assert_array_equal(acts, lees.step_masks(solver.timesteps, 1000, k).astype(np.int8))
  rng = jax.random.PRNGKey(2)
  a = samplers.compile_sampler(model, solver, lees3, 2)
  b = samplers.compile_sampler(model, solver, lees, 2)
  np.testing.assert_array_equal(np.asarray(a(params, rng)), np.asarray(b(params, rng)))
  assert a.flop_fraction == b.flop_fraction
  d = policies.policy_from_dict(lees3.to_dict())
  np.testing.assert_array_equal(d.step_actions(solver.timesteps, 1000, k), acts)


def test_three_choice_actions_by_hand():
  """Unit 0 always runs; unit 1 never runs and wants reuse: at step 0 (nothing cached) it runs,
  then reuses; unit 2 runs at the noisy half, reuses at the clean half; unit 3 is skipped."""
  ts = [999, 749, 500, 250, 0]  # t = 1, 0.75, 0.501, 0.251, 0.001
  pol = learned_reuse.Lees3Policy(alpha=[0, 0, 10, 0], beta=[1, -1, -6, -1],
                                  gamma=[0, 0, 0, 0], delta=[1, 1, 1, -1])
  acts = pol.step_actions(ts, 1000, 4)
  np.testing.assert_array_equal(acts, [[RUN, RUN, RUN, SKIP],
                                       [RUN, REUSE_RESIDUAL, RUN, SKIP],
                                       [RUN, REUSE_RESIDUAL, REUSE_RESIDUAL, SKIP],
                                       [RUN, REUSE_RESIDUAL, REUSE_RESIDUAL, SKIP],
                                       [RUN, REUSE_RESIDUAL, REUSE_RESIDUAL, SKIP]])


def test_three_choice_loss_with_reuse_pinned_off_is_the_lees_loss(tiny_model):
  from conftest import tiny_config
  from lees_jax import processes
  from lees_jax.objectives import lees_gates, lees_reuse
  model, params = tiny_model
  config = tiny_config()
  process = processes.for_model(config.diffusion, model)
  k = model.num_units
  gp, lees3 = _lees3_without_reuse(k, seed=1)
  lees_fn = lees_gates.gate_loss_fn(model, process, 0.1, hard=True)
  lees3_fn = lees_reuse.lees3_loss_fn(model, process, process.schedule, 0.1, True, 'mean', 0.5,
                                      250)
  batch = {'image': jax.random.normal(jax.random.PRNGKey(5), (2, 32, 32, 3))}
  rng = jax.random.PRNGKey(6)
  p3 = jax.tree_util.tree_map(jnp.asarray, lees3.params)
  (l1, _), g1 = jax.jit(jax.value_and_grad(lambda p: lees_fn(p, params, batch, rng), has_aux=True))(
      {'alpha': p3['alpha'], 'beta': p3['beta']})
  (l3, m3), g3 = jax.jit(jax.value_and_grad(lambda p: lees3_fn(p, params, batch, rng),
                                            has_aux=True))(p3)
  # reuse_cost 0.5 but g_reuse ~ sigmoid(-1) in the term: remove it to compare with LEES's.
  g_run = jax.nn.sigmoid(policies.gate_logits(p3, process.draw(rng, batch['image']).gate_time))
  extra = 0.1 * (0.5 * (1 - g_run) * jax.nn.sigmoid(-1.0)).mean()
  np.testing.assert_allclose(float(l3) - float(extra), float(l1), rtol=1e-6)
  assert float(m3['hard_reuse_mean']) == 0.0
  np.testing.assert_allclose(g3['beta'], g1['beta'] + 0.1 * 0.5 * jax.nn.sigmoid(-1.0) * (
      -g_run * (1 - g_run)).mean(axis=0) / k, rtol=1e-4, atol=1e-7)


def test_dit_tiny_l2c_policy_samples_like_the_step_by_step_loop():
  from configs import imagenet256_dit
  model = models.build_model(imagenet256_dit.get_config('tiny').model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  # adaLN-Zero starts every block as the identity (residual 0): perturb every weight.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(kk, p.shape) for p, kk in zip(leaves, keys)])
  solver = samplers.make_solver(SCHED, 'ddim', 3)
  beta = np.array(jax.random.normal(jax.random.PRNGKey(2), (3, model.num_units)))
  policy = learned_reuse.L2CPolicy(beta, 0.5, tuple(int(t) for t in solver.timesteps))
  acts = policy.step_actions(solver.timesteps, 1000, model.num_units)
  assert (acts[0] == RUN).all() and (acts == REUSE_RESIDUAL).any()
  program = samplers.compile_sampler(model, solver, policy, 2)
  y, rng = jnp.array([1, 7]), jax.random.PRNGKey(3)
  got = np.asarray(program(params, rng, y=y))
  want = reference_sample(model, params, solver, acts, rng, 2, y=y)
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()), rtol=0)
  assert program.flop_fraction < 1.0


def test_lees3_training_writes_gates_that_resolve(tiny_model, tmp_path):
  from conftest import tiny_config
  from lees_jax import train
  from lees_jax.objectives import lees_reuse
  model, params = tiny_model
  config = tiny_config(**{'mode': 'train_lees3', 'gates.num_train_steps': 2, 'gates.batch_size': 4,
                          'gates.log_every': 2, 'gates.checkpoint_every': 2, 'gates.init': 'on',
                          'gates.heatmap_every': 0})
  state = train.train(config, str(tmp_path), lees_reuse.lees3_objective(config, backbone=params))
  assert set(state['params']) == {'alpha', 'beta', 'gamma', 'delta'}
  assert any((np.asarray(v) != 0).any() for k, v in state['params'].items() if k != 'beta')
  summary = files.read_json(files.join(str(tmp_path), learned_reuse.LEES3_FILE))
  assert summary['previous_step_gap'] == 250
  pol = evaluate.resolve_policy(f'lees3:{tmp_path}', model).policy
  np.testing.assert_array_equal(pol.step_actions(summary['sampler']['timesteps'], 1000,
                                                 model.num_units), summary['actions'])
