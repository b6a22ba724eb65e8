"""Class-conditional sampling and training of DiT: classifier-free guidance, the learned-range
variance, gate policies on both guidance halves, the objectives with labels, labelled batches.

The oracles are independent of our sampler: diffusers' ``DiTTransformer2DModel`` (random weights,
converted to ours by `lees_jax.convert.diffusers_dit`) stepped by diffusers' ``DDIMScheduler`` /
``DDPMScheduler(variance_type='learned_range')``, with the guidance formula written out here, the
same initial latents and (DDPM) the same per-step noise; skipped blocks are diffusers' blocks
with their forward replaced by the identity.

diffusers' scheduler runs on the float64 schedule (`_float64`).

Measured (jax 0.10.2, torch 2.13, CPU, fp32): the random network is no denoiser, so unclipped
guided trajectories grow to |x| ~ 300-800 over 10 steps, and float32 rounding grows with them;
the whole-trajectory tolerance is therefore relative to max |x|: guided DDIM-10 at scale 4
1.07e-6 (every eps channel; 4.2e-4 absolute at |x| 390) and 1.05e-6 (DiT's 3 of 4 channels);
guided DDPM-10 with the learned-range variance at scale 1.5, 4.9e-7 (3.8e-4 at |x| 782); block 1
skipped at the noisy steps, both paths, scale 3, 7.9e-7. Each forward pass agrees to ~2e-6
(tests/test_dit.py). The learned-range update alone against diffusers on an analytic (eps, v)
with x0 clipped (|x| <= 1): 6.2e-7 absolute over 50 respaced steps.
"""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from conftest import diffusers_dit_reference as _reference, tiny_config  # noqa: E402
from lees_jax import data, diffusion, models, objectives, policies, samplers, train  # noqa: E402
from lees_jax import gates as gating  # noqa: E402
from lees_jax.convert import diffusers_dit  # noqa: E402

T = 1000
SCHED = diffusion.make_schedule(T)
# 10 classes (label 10 = null), 3 blocks, 8 x 8 x 4 latents, 2 x 2 patches, learned sigma.
TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
LABELS = np.array([0, 3, 9, 5])
B = len(LABELS)
GUIDED_RTOL = 1e-5  # of max |x|; measured <= 1.1e-6 (module docstring)




@pytest.fixture(scope='module')
def tiny():
  ref = _reference(TINY)
  config = {'_class_name': 'DiTTransformer2DModel',
            **{k: v for k, v in ref.config.items() if not k.startswith('_')}}
  state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  model_config, params = diffusers_dit.diffusers_to_params(state, config)
  return ref, models.build_model(model_config), params


@contextlib.contextmanager
def _skipping(ref, skipped):
  """diffusers with the forward of the blocks in ``skipped`` replaced by the identity."""
  saved = {k: ref.transformer_blocks[k].forward for k in skipped}
  for k in skipped:
    ref.transformer_blocks[k].forward = lambda hidden_states, *a, **kw: hidden_states
  try:
    yield
  finally:
    for k, run in saved.items():
      ref.transformer_blocks[k].forward = run


def _oracle(ref, scheduler, x_init, labels, scale, *, channels=4, skipped=lambda t: (),
            noise=None):
  """diffusers' DiT and scheduler with classifier-free guidance written out: the batch twice
  (labels, then the null label 10), eps = eps_null + s (eps_label - eps_null) on the first
  ``channels`` channels, the labelled half's output elsewhere (its variance channels included).
  ``skipped(t)``: blocks skipped at timestep t; ``noise[i]``: the DDPM noise of step i (NHWC)."""
  from diffusers.schedulers import scheduling_ddpm
  x = torch.tensor(x_init.transpose(0, 3, 1, 2), dtype=torch.float64)
  y = torch.tensor(np.concatenate([labels, np.full(len(labels), 10)]))
  saved = scheduling_ddpm.randn_tensor
  try:
    for i, t in enumerate(scheduler.timesteps):
      if noise is not None:
        drawn = torch.tensor(noise[i].transpose(0, 3, 1, 2), dtype=torch.float64)
        scheduling_ddpm.randn_tensor = lambda *a, _d=drawn, **kw: _d
      with torch.no_grad(), _skipping(ref, skipped(int(t))):
        out = ref(torch.cat([x, x]).float(), torch.full((2 * len(labels),), int(t)), y).sample
      out = out.double()
      label, null = out[:len(labels)], out[len(labels):]
      guided = label.clone()
      guided[:, :channels] = null[:, :channels] + scale * (label - null)[:, :channels]
      if not isinstance(scheduler, diffusers.DDPMScheduler):
        guided = guided[:, :4]  # DDIM reads epsilon only
      x = scheduler.step(guided, t, x).prev_sample
  finally:
    scheduling_ddpm.randn_tensor = saved
  return x.numpy().transpose(0, 2, 3, 1)


def _float64(scheduler):
  """diffusers' scheduler on the float64 schedule (its own abar is a float32 cumprod, off by
  ~1e-5 relative near t = T, which 1 / sqrt(abar) ~ 160 amplifies without x0 clipping)."""
  scheduler.alphas_cumprod = torch.tensor(SCHED.alphas_cumprod, dtype=torch.float64)
  return scheduler


def _ddim10():
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                beta_schedule='linear', clip_sample=False, set_alpha_to_one=True)
  ref.set_timesteps(10)
  return _float64(ref)


def _ddpm(timesteps, clip=False):
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02,
                                beta_schedule='linear', variance_type='learned_range',
                                clip_sample=clip)
  ref.set_timesteps(timesteps=[int(t) for t in timesteps])
  return _float64(ref)


def _x_init(seed=0):
  return np.random.default_rng(seed).standard_normal((B, 8, 8, 4)).astype(np.float32)


def _max_diff(got, want, what=''):
  """max |got - want| relative to max |want| (random weights: trajectories grow to |x| ~ 1e2
  under strong guidance, and float32 rounding grows with them)."""
  got = np.asarray(got, np.float64)
  assert got.shape == want.shape and np.abs(want).max() > 0.5  # a non-degenerate trajectory
  diff, size = float(np.abs(got - want).max()), float(np.abs(want).max())
  print(f'\n[{what}] max |ours - diffusers| {diff:.2e} of max |x| {size:.3g}: {diff / size:.2e}')
  return diff / size


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance against diffusers.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels', [None, 3], ids=['all_channels', 'dit_release_3'])
def test_guided_ddim_matches_diffusers(tiny, channels):
  ref, model, params = tiny
  solver = samplers.make_solver(SCHED, 'ddim', 10, clip_x0=False)
  scheduler = _ddim10()
  assert list(scheduler.timesteps.numpy()) == list(solver.timesteps)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, start_step=0,
                                  guidance_scale=4.0, guidance_channels=channels)
  assert 'guidance 4' in prog.sampler
  x_init = _x_init()
  got = prog(params, jax.random.PRNGKey(0), x_init, LABELS)
  want = _oracle(ref, scheduler, x_init, LABELS, 4.0, channels=channels or 4)
  assert _max_diff(got, want, f'guided DDIM-10, scale 4, channels {channels}') < GUIDED_RTOL
  # The two channel rules are different samplers.
  other = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, start_step=0,
                                   guidance_scale=4.0, guidance_channels=4 if channels else 3)
  other_x = np.asarray(other(params, jax.random.PRNGKey(0), x_init, LABELS))
  assert np.abs(other_x - want).max() > 1e-3


def test_guidance_scale_one_is_unguided_and_zero_is_the_null_class(tiny):
  _, model, params = tiny
  solver = samplers.make_solver(SCHED, 'ddim', 10, clip_x0=False)
  full = policies.FullPolicy()
  rng = jax.random.PRNGKey(3)
  plain = samplers.compile_sampler(model, solver, full, B)
  one = samplers.compile_sampler(model, solver, full, B, guidance_scale=1.0)
  assert one.sampler == plain.sampler == solver.describe()
  np.testing.assert_array_equal(one(params, rng, LABELS), plain(params, rng, LABELS))
  # s = 0: eps_null exactly, computed in a batch of 2B rather than B (float rounding only).
  zero = samplers.compile_sampler(model, solver, full, B, guidance_scale=0.0)
  null = np.full(B, model.conditioning.null_class)
  np.testing.assert_allclose(zero(params, rng, LABELS), plain(params, rng, null), atol=1e-5)
  labelled, unlabelled = np.asarray(plain(params, rng, LABELS)), np.asarray(plain(params, rng, null))
  assert np.abs(labelled - unlabelled).max() > 1e-2


def test_labels_drawn_from_the_key(tiny):
  """Without labels a program draws them uniformly from the classes (never the null class),
  fixed by its key, and `program.labels(rng)` says which."""
  _, model, params = tiny
  solver = samplers.make_solver(SCHED, 'ddim', 10, clip_x0=False)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, guidance_scale=1.5)
  rng = jax.random.PRNGKey(7)
  labels = np.asarray(prog.labels(rng))
  np.testing.assert_array_equal(prog(params, rng), prog(params, rng, labels))
  many = np.asarray(samplers.draw_labels(rng, 4000, 10))
  assert many.min() == 0 and many.max() == 9 and np.bincount(many).min() > 300
  assert not np.array_equal(labels, np.asarray(prog.labels(jax.random.PRNGKey(8))))
  for bad in (np.array([0, 1, 2, 11]), np.array([0, 1, 2]), np.zeros(B, np.float32)):
    with pytest.raises(ValueError, match='labels'):
      prog(params, rng, bad)


def test_guidance_and_learned_variance_are_refused_where_they_cannot_apply(tiny, tiny_model):
  unet, _ = tiny_model
  ddpm = samplers.make_solver(SCHED, 'ddpm', 10)
  with pytest.raises(ValueError, match='class-conditional'):
    samplers.compile_sampler(unet, ddpm, policies.FullPolicy(), 2, guidance_scale=1.5)
  learned = samplers.make_solver(SCHED, 'ddpm', 10, variance='learned_range')
  with pytest.raises(ValueError, match="outputs 'eps'"):
    samplers.compile_sampler(unet, learned, policies.FullPolicy(), 2)
  eps_only = models.DiT(dataclasses.replace(tiny[1].spec, learn_sigma=False))
  with pytest.raises(ValueError, match="outputs 'eps'"):
    samplers.compile_sampler(eps_only, learned, policies.FullPolicy(), 2)
  with pytest.raises(ValueError, match='guidance_channels'):
    samplers.compile_sampler(tiny[1], ddpm, policies.FullPolicy(), 2, guidance_scale=2.0,
                             guidance_channels=5)
  prog = samplers.compile_sampler(unet, ddpm, policies.FullPolicy(), 2)
  with pytest.raises(ValueError, match='unconditional'):
    prog(tiny_model[1], jax.random.PRNGKey(0), np.array([0, 1]))
  c = ml_collections.ConfigDict(dict(guidance_scale=1.5, guidance_channels=3))
  assert samplers.guidance_from_config(c) == dict(guidance_scale=1.5, guidance_channels=3)
  assert samplers.guidance_from_config(ml_collections.ConfigDict()) == dict(
      guidance_scale=1.0, guidance_channels=None)


# ---------------------------------------------------------------------------------------------
# The learned-range variance.
# ---------------------------------------------------------------------------------------------

def test_learned_range_step_matches_diffusers_ddpm_scheduler(monkeypatch):
  """Respaced DDPM-50 with the learned-range variance against diffusers' DDPMScheduler on the
  same custom timesteps, the same analytic (eps, v) (v over [-1, 1] and beyond) and the same
  noise, step by step; x0 clipped, as in test_samplers' fixed-variance test, so that the
  analytic eps (which no data distribution produces) keeps x bounded."""
  from diffusers.schedulers import scheduling_ddpm
  abar = SCHED.alphas_cumprod

  def eps_v(x, t):
    eps = np.tanh(1.5 * x + 0.3) * np.sqrt(1 - abar[t]) + 0.2 * np.sin(3 * x) * abar[t]
    return eps, 1.2 * np.sin(2 * x + t / 100.0)

  solver = samplers.make_solver(SCHED, 'ddpm', 50, variance='learned_range')
  assert solver.needs_variance and 'variance learned_range' in solver.describe()
  ref = _ddpm(solver.timesteps, clip=True)
  shape = (4, 3, 8, 8)  # NCHW for diffusers; the update is element-wise, any layout works
  keys = [jax.random.fold_in(jax.random.PRNGKey(5), i) for i in range(solver.num_steps)]
  drawn = []
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                      lambda shp, **kw: torch.tensor(drawn[-1], dtype=torch.float64))
  x_init = np.random.default_rng(0).normal(size=shape)
  x_ref = torch.tensor(x_init, dtype=torch.float64)
  state = solver.init_state(jnp.asarray(x_init, jnp.float32))
  update = jax.jit(solver.update)
  worst = 0.0
  for i, t in enumerate(solver.timesteps):
    drawn.append(np.asarray(jax.random.normal(keys[i], shape, jnp.float32), np.float64))
    e, v = eps_v(x_ref.numpy(), int(t))
    x_ref = ref.step(torch.tensor(np.concatenate([e, v], axis=1)), int(t), x_ref).prev_sample
    e, v = eps_v(np.asarray(state[0], np.float64), int(t))
    state = update(i, state, jnp.asarray(e, jnp.float32), keys[i], jnp.asarray(v, jnp.float32))
    worst = max(worst, float(np.abs(np.asarray(state[0], np.float64) - x_ref.numpy()).max()))
  print(f'\n[ddpm learned_range] max |ours - diffusers| over 50 steps: {worst:.2e}, max |x| '
        f'{np.abs(x_ref.numpy()).max():.2f}')
  assert worst < 1e-5


def test_learned_range_by_hand_and_at_its_ends():
  """float64 by hand on a 3-step respacing; v = +1 is fixed_large (beta_t) and v = -1 is
  fixed_small (beta~_t) at every step that adds noise."""
  use = [0, 500, 999]
  ab = np.cumprod(1 - np.linspace(1e-4, 0.02, T))[use]
  ab_prev = np.append(1.0, ab[:-1])
  beta = 1 - ab / ab_prev
  post = beta * (1 - ab_prev) / (1 - ab)
  solver = samplers.make_solver(SCHED, 'ddpm', 3, spacing='3', variance='learned_range')
  # sampling order t = 999, 500, 0; beta~ at t = 0 is clipped to its value at t = 500
  np.testing.assert_allclose(solver.coefs['log_beta'], np.log(beta[::-1]), rtol=1e-12)
  np.testing.assert_allclose(solver.coefs['log_posterior_variance'],
                             np.log([post[2], post[1], post[1]]), rtol=1e-12)
  np.testing.assert_array_equal(solver.coefs['noise_on'], [1.0, 1.0, 0.0])
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 3)), jnp.float32)
  eps = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  v = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, size=x.shape), jnp.float32)
  key = jax.random.PRNGKey(0)
  fixed = {name: samplers.make_solver(SCHED, 'ddpm', 3, spacing='3', variance=name)
           for name in ('fixed_large', 'fixed_small')}
  for i in range(3):
    mean = solver.update(i, (x,), eps, key, jnp.zeros_like(x))[0] if i == 2 else None
    for end, name in ((1.0, 'fixed_large'), (-1.0, 'fixed_small')):
      np.testing.assert_allclose(solver.update(i, (x,), eps, key, jnp.full_like(x, end))[0],
                                 fixed[name].update(i, (x,), eps, key)[0], rtol=0, atol=2e-6)
    if mean is not None:  # the last step adds no noise, whatever v says
      np.testing.assert_array_equal(solver.update(i, (x,), eps, key, v)[0], mean)
  # In between, per element: sigma = exp((f log beta + (1 - f) log beta~) / 2), f = (v + 1) / 2.
  noise = np.asarray(jax.random.normal(key, x.shape, jnp.float32), np.float64)
  fixed_mean = np.asarray(fixed['fixed_large'].update(0, (x,), eps, key)[0], np.float64) \
      - np.sqrt(beta[2]) * noise
  f = (np.asarray(v, np.float64) + 1) / 2
  want = fixed_mean + np.exp(0.5 * (f * np.log(beta[2]) + (1 - f) * np.log(post[2]))) * noise
  np.testing.assert_allclose(solver.update(0, (x,), eps, key, v)[0], want, rtol=0, atol=5e-6)
  with pytest.raises(ValueError, match='v output'):
    solver.update(0, (x,), eps, key)


def test_guided_ddpm_learned_range_matches_diffusers(tiny):
  """The whole program: DDPM-10 respaced, learned-range variance (the labelled half's v), scale
  1.5, against diffusers' DiT and DDPMScheduler with the same initial latents and step noise."""
  ref, model, params = tiny
  solver = samplers.make_solver(SCHED, 'ddpm', 10, variance='learned_range', clip_x0=False)
  scheduler = _ddpm(solver.timesteps)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, start_step=0,
                                  guidance_scale=1.5)
  rng = jax.random.PRNGKey(1)
  step_rng = jax.random.split(rng)[1]  # the program's step keys: fold_in(step_rng, i)
  noise = [np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), (B, 8, 8, 4)))
           for i in range(solver.num_steps)]
  x_init = _x_init(1)
  got = prog(params, rng, x_init, LABELS)
  want = _oracle(ref, scheduler, x_init, LABELS, 1.5, noise=noise)
  assert _max_diff(got, want, 'guided DDPM-10 learned_range, scale 1.5') < GUIDED_RTOL
  # v matters: the fixed variances give other samples; fixed variances ignore v.
  large = samplers.make_solver(SCHED, 'ddpm', 10, variance='fixed_large', clip_x0=False)
  fixed = samplers.compile_sampler(model, large, policies.FullPolicy(), B, start_step=0,
                                   guidance_scale=1.5)
  assert np.abs(np.asarray(fixed(params, rng, x_init, LABELS)) - want).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Gate policies on both halves.
# ---------------------------------------------------------------------------------------------

def test_policy_skips_the_same_blocks_in_both_halves(tiny):
  """Block 1 skipped at the noisy half of the steps (t > T/2) by a schedule, on the segments
  and lax.cond paths, against diffusers with block 1's forward the identity at those steps in
  both passes; and a block skipped at every step equals the model without that block."""
  ref, model, params = tiny
  solver = samplers.make_solver(SCHED, 'ddim', 10, clip_x0=False)
  x_init = _x_init(2)
  rng = jax.random.PRNGKey(0)
  noisy = policies.SchedulePolicy(np.array([[1, 1], [1, 0], [1, 1]], bool))
  want = _oracle(ref, _ddim10(), x_init, LABELS, 3.0,
                 skipped=lambda t: (1,) if (t + 1) / T > 0.5 else ())
  for path in ('segments', 'cond'):
    prog = samplers.compile_sampler(model, solver, noisy, B, path=path, start_step=0,
                                    guidance_scale=3.0)
    assert 0 < prog.masks[:, 1].sum() < solver.num_steps  # skipped at some steps only
    assert _max_diff(prog(params, rng, x_init, LABELS), want,
                     f'{path}: block 1 skipped at t > T/2, scale 3') < GUIDED_RTOL

  # Always skipped: the 2-block DiT made of blocks 0 and 2, bitwise up to XLA's fusion choices.
  never = policies.SchedulePolicy(np.array([[1], [0], [1]], bool))
  skipped = samplers.compile_sampler(model, solver, never, B, start_step=0, guidance_scale=3.0)
  removed = models.DiT(dataclasses.replace(model.spec, depth=2))
  removed_params = {k: v for k, v in params.items() if not k.startswith('block_')}
  removed_params.update(block_0=params['block_0'], block_1=params['block_2'])
  without = samplers.compile_sampler(removed, solver, policies.FullPolicy(), B, start_step=0,
                                     guidance_scale=3.0)
  got = np.asarray(skipped(params, rng, x_init, LABELS))
  np.testing.assert_allclose(got, without(removed_params, rng, x_init, LABELS), rtol=0, atol=1e-6)
  full = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, start_step=0,
                                  guidance_scale=3.0)
  assert np.abs(got - np.asarray(full(params, rng, x_init, LABELS))).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Objectives with labels.
# ---------------------------------------------------------------------------------------------

def _dit_config(mode='train_gates', **model):
  c = tiny_config(mode=mode)
  c.model = ml_collections.ConfigDict({
      **dict(name='dit', input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3,
             num_heads=4, num_classes=10, learn_sigma=True, class_dropout_prob=0.1,
             dtype='float32'), **model})
  return c


def _latent_batch(seed=0):
  rng = np.random.default_rng(seed)
  return {'image': rng.standard_normal((B, 8, 8, 4)).astype(np.float32),
          'label': LABELS.astype(np.int32)}


def test_lees_gate_loss_on_dit_with_labels(tiny):
  """Finite, labels used as given, the eps-MSE only (not the variance channels), gradients
  only for the 2K gate scalars; one real training step moves the gates."""
  _, model, params = tiny
  config = _dit_config()
  config.model = ml_collections.ConfigDict(dict(config.model, time_freq_shift=1.0,
                                                mlp_norm_eps=1e-5))  # as the import
  objective = objectives.gates_objective(config, backbone=params)
  gates = objective.init_trainable(jax.random.PRNGKey(0))
  assert sorted(gates) == ['alpha', 'beta'] and gates['alpha'].shape == (3,)
  gates = {'alpha': jnp.asarray([0.5, -1.0, 2.0]), 'beta': jnp.asarray([0.3, 0.2, -0.4])}
  batch, rng = _latent_batch(), jax.random.PRNGKey(4)
  loss_fn = jax.jit(objective.loss_fn)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective.loss_fn, has_aux=True))(
      gates, params, batch, rng)
  assert np.isfinite(float(loss)) and all(np.isfinite(g).all() for g in grads.values())
  assert np.abs(np.asarray(grads['beta'])).min() > 0
  # The eps-MSE of the gated model by hand, with the loss's own draw of (t, noise).
  t, noise = objectives.draw_t_noise(rng, jnp.asarray(batch['image']), T)
  x_t = diffusion.q_sample(SCHED, jnp.asarray(batch['image']), t, noise)
  logits = policies.gate_logits(gates, policies.normalized_time(t, T))
  eps, v = models.predict_eps(model, params, x_t, t, batch['label'],
                              gates=gating.StraightThrough(logits))
  assert eps.shape == v.shape == (B, 8, 8, 4)
  np.testing.assert_allclose(metrics['mse'], diffusion.eps_mse(eps, noise).mean(), rtol=1e-5)
  other = dict(batch, label=np.full(B, 10, np.int32))
  assert abs(float(loss_fn(gates, params, other, rng)[1]['mse']) - float(metrics['mse'])) > 1e-4
  with pytest.raises(ValueError, match="no 'label'"):
    objective.loss_fn(gates, params, {'image': batch['image']}, rng)

  mesh = data.make_mesh(jax.devices()[:1])
  state = train.init_state(objective, jax.random.PRNGKey(0), mesh)
  step = train.make_train_step(objective, mesh)
  new, metrics = step(state, data.replicate(objective.frozen, mesh),
                      data.shard_batch(batch, mesh), data.replicate(np.asarray(rng), mesh))
  assert np.isfinite(float(metrics['loss']))
  assert not np.array_equal(new['params']['beta'], state['params']['beta'])
  assert sorted(new['params']) == ['alpha', 'beta']  # nothing of the backbone is trained


def test_pretrain_drops_labels():
  """Label dropout of a conditional backbone (eps-only; the learned-variance DiT's hybrid loss
  in pretraining is tested in test_vlb.py)."""
  batch, rng = _latent_batch(1), jax.random.PRNGKey(2)
  losses = {}
  for prob in (0.0, 0.5):
    objective = objectives.pretrain_objective(
        _dit_config('pretrain', learn_sigma=False, class_dropout_prob=prob))
    params = objective.init_trainable(jax.random.PRNGKey(0))
    # adaLN-Zero starts at zero output: perturb so that the labels reach the output.
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
    losses[prob] = float(objective.loss_fn(params, {}, batch, rng)[0])
    null = dict(batch, label=np.full(B, 10, np.int32))
    losses[prob, 'null'] = float(objective.loss_fn(params, {}, null, rng)[0])
  assert all(np.isfinite(v) for v in losses.values())
  assert losses[0.0] != losses[0.0, 'null']  # labels are read
  assert losses[0.5] != losses[0.0]          # and some are dropped to the null class


def test_ase_finetune_loss_on_dit_with_labels(tiny):
  _, model, params = tiny
  config = _dit_config('ase_finetune')
  config.model = ml_collections.ConfigDict(dict(config.model, time_freq_shift=1.0,
                                                mlp_norm_eps=1e-5, class_dropout_prob=0.0))
  config.ase_ft.schedule = 'D3'
  objective = objectives.ase_objective(config, backbone=params)
  batch, rng = _latent_batch(2), jax.random.PRNGKey(0)
  loss_fn = jax.jit(objective.loss_fn)
  loss, metrics = loss_fn(objective.initial_trainable, objective.frozen, batch, rng, 0)
  assert np.isfinite(float(loss)) and 0 < float(metrics['kept_fraction']) < 1
  null = dict(batch, label=np.full(B, 10, np.int32))
  null_loss = loss_fn(objective.initial_trainable, objective.frozen, null, rng, 0)[0]
  assert float(null_loss) != float(loss)


# ---------------------------------------------------------------------------------------------
# Labelled batches.
# ---------------------------------------------------------------------------------------------

def test_subset_batches_carry_their_labels():
  c = tiny_config().data
  images, labels = data.load_subset('train')
  it = data.train_iterator(c, global_batch_size=8, seed=3, random_flip=False)
  for step in range(3):
    batch = next(it)
    idx = data.subset_batch_indices(images.shape[0], 3, step, 8)
    assert batch['label'].dtype == np.int32
    np.testing.assert_array_equal(batch['label'], labels[idx])
    np.testing.assert_array_equal(batch['image'], data.to_model_range(images[idx]))


def test_tfds_batches_carry_their_labels(tfds_mock):
  """Each image comes with its own label through file and example shuffling (mocked CIFAR-10)."""
  from lees_jax import data_prep
  with tfds_mock(num_examples=24):
    c = ml_collections.ConfigDict(dict(dataset='cifar10', train_split='train', data_dir='',
                                       shuffle_buffer=16, random_flip=False, subset_path=''))
    raw = data_prep.prepare('cifar10', None).as_dataset(split='train', shuffle_files=False)
    label_of = {ex['image'].tobytes(): int(ex['label']) for ex in raw.as_numpy_iterator()}
    assert len(set(label_of.values())) > 1
    it = data.train_iterator(c, global_batch_size=8, seed=1)
    for _ in range(4):
      batch = next(it)
      assert batch['label'].dtype == np.int32
      images = data.to_uint8(batch['image'])
      assert [label_of[im.tobytes()] for im in images] == list(batch['label'])
