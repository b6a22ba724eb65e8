"""Training binaries end to end on the tiny config: pretrain -> train_gates, resume, guards.

Compilation dominates on CPU, so the module shares one persistent XLA compilation cache
between its in-process runs and its subprocesses.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config as _tiny
from conftest import scale_residual_branches
from lees_jax import checkpoints
from lees_jax import data
from lees_jax import policies
from lees_jax import main as main_lib
from lees_jax import objectives
from lees_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE_STEPS, GATE_CKPT = 30, 10


def _env(cache_dir, **extra):
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1', TF_CPP_MIN_LOG_LEVEL='2',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.update(extra)
  return env


def _gate_config(backbone, **overrides):
  base = {'mode': 'train_gates', 'backbone': backbone,
          'gates.num_train_steps': GATE_STEPS, 'gates.checkpoint_every': GATE_CKPT,
          'gates.log_every': 5, 'gates.heatmap_every': 15}
  base.update(overrides)
  return _tiny(**base)


def _gate_flags(backbone, workdir):
  return [sys.executable, '-m', 'lees_jax.main', '--config=configs/cifar10.py:tiny',
          f'--workdir={workdir}', '--config.mode=train_gates', f'--config.backbone={backbone}',
          f'--config.gates.num_train_steps={GATE_STEPS}',
          f'--config.gates.checkpoint_every={GATE_CKPT}', '--config.gates.log_every=5',
          '--config.gates.heatmap_every=15']


def _snapshot(directory):
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      p = os.path.join(root, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, directory)] = (os.stat(p).st_mtime_ns,
                                              hashlib.sha1(fh.read()).hexdigest())
  return out


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory, compile_cache):
  """`pretrain` through lees_jax.main's mode table: a few steps, exports the EMA backbone."""
  del compile_cache
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  config = _tiny(**{'mode': 'pretrain', 'pretrain.num_train_steps': 4,
                    'pretrain.checkpoint_every': 2, 'pretrain.log_every': 2})
  state = main_lib.run_mode(config, workdir)
  return workdir, state


@pytest.fixture(scope='module')
def gates_run(tmp_path_factory, pretrained):
  """An uninterrupted `train_gates` run on the pretrained backbone.

  Returns (workdir, final state, backbone params read before the run, what the run did to the
  backbone: its files before, and the frozen pytree each jitted step received).
  """
  backbone, _ = pretrained
  workdir = str(tmp_path_factory.mktemp('gates'))
  _, before = checkpoints.load_backbone_params(backbone)
  seen = {'files_before': _snapshot(backbone), 'frozen': [], 'steps': 0}
  real_make_train_step = train.make_train_step

  def spying_make_train_step(objective, mesh):
    step = real_make_train_step(objective, mesh)

    def spied(state, frozen, batch, key):
      seen['steps'] += 1
      if not any(f is frozen for f in seen['frozen']):
        seen['frozen'].append(frozen)
      return step(state, frozen, batch, key)
    return spied

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'make_train_step', spying_make_train_step)
    state = main_lib.run_mode(_gate_config(backbone), workdir)
  return workdir, state, before, seen


# --- pretrain ------------------------------------------------------------------------------


def test_pretrain_exports_ema_backbone_and_checkpoints(pretrained):
  workdir, state = pretrained
  assert int(state['step']) == 4
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params'}
  model_config, params = checkpoints.load_backbone_params(workdir)
  assert model_config.ch == 32
  ema = jax.device_get(state['ema_params'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ema)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'pretrain'))) == ['2', '4']
  # Optimiser state: Adam moments of every backbone parameter (clip has no state).
  mu = state['opt_state'][1][0].mu
  assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state['params'])


def test_ema_update_on_a_hand_case(pretrained):
  """One jitted pretraining step from an EMA e0 that differs from the parameters p0 everywhere:
  the new EMA is d e0 + (1 - d) p1 (d = 0.9999, p1 the step's new parameters), by hand."""
  config = _tiny(**{'mode': 'pretrain', 'pretrain.num_train_steps': 4,
                    'pretrain.checkpoint_every': 2, 'pretrain.log_every': 2})
  objective = objectives.pretrain_objective(config)
  d = objective.ema_decay
  assert d == 0.9999 == config.pretrain.ema_decay
  mesh = data.make_mesh()
  # From the pretraining run's step-4 state (the warm-up's learning rate is 0 at step 0).
  p0 = jax.device_get(pretrained[1]['params'])
  e0 = jax.tree_util.tree_map(lambda a: (np.asarray(a) * -0.5 + 0.25).astype(np.float32), p0)
  state = {'step': jnp.asarray(4, jnp.int32), 'params': p0,
           'opt_state': jax.device_get(pretrained[1]['opt_state']), 'ema_params': e0}
  batch = next(data.train_iterator(config.data, global_batch_size=config.pretrain.batch_size,
                                   seed=0, random_flip=True))
  step = train.make_train_step(objective, mesh)
  new, _ = step(data.replicate(state, mesh), data.replicate(objective.frozen, mesh),
                data.shard_batch(batch, mesh), data.replicate(jax.random.PRNGKey(0), mesh))
  p1, e1 = jax.device_get(new['params']), jax.device_get(new['ema_params'])
  moved = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), p1, p0))
  assert max(moved) > 1e-6  # the parameters did move
  jax.tree_util.tree_map(
      lambda e, e_prev, p: np.testing.assert_allclose(
          e, d * np.float64(e_prev) + (1 - d) * np.float64(p), rtol=0, atol=1e-6), e1, e0, p1)


# --- train_gates ---------------------------------------------------------------------------


def test_gates_run_end_to_end(gates_run, pretrained):
  workdir, state, *_ = gates_run
  backbone, _ = pretrained
  assert int(state['step']) == GATE_STEPS
  summary = json.load(open(os.path.join(workdir, 'gates.json')))
  k = len(summary['units'])
  assert k == 12 and len(summary['alpha']) == k and len(summary['beta']) == k
  assert summary['lam'] == 0.05 and summary['form'] == 'hard'
  assert summary['backbone'] == os.path.join(backbone, 'backbone')
  assert 0.0 <= summary['executed_block_ratio'] <= 1.0
  assert 0.0 < summary['flop_fraction'] <= 1.0
  assert summary['sampler']['timesteps'] == [0, 250, 500, 749, 999]  # tiny: 5 respaced steps
  policy = policies.load_gates(workdir)
  assert isinstance(policy, policies.LeesPolicy) and policy.form == 'hard'
  np.testing.assert_array_equal(policy.alpha, np.asarray(state['params']['alpha']))
  np.testing.assert_array_equal(policy.beta, np.asarray(state['params']['beta']))
  masks = policy.step_masks(summary['sampler']['timesteps'], 1000, k)
  assert policies.executed_block_ratio(masks) == summary['executed_block_ratio']
  assert not np.all(policy.alpha == 0)  # the gates moved


def test_optimizer_state_covers_only_the_gates(gates_run):
  _, state, *_ = gates_run
  assert set(state) == {'step', 'params', 'opt_state'}  # no EMA, no backbone
  leaves = jax.tree_util.tree_leaves(state['opt_state'])
  k = state['params']['alpha'].shape[0]
  assert all(np.shape(x) in ((), (k,)) for x in leaves)
  adam = state['opt_state'][0]
  assert set(adam.mu) == {'alpha', 'beta'} and set(adam.nu) == {'alpha', 'beta'}
  n_state = sum(np.size(x) for x in leaves)
  assert n_state <= 4 * k + 1


def test_backbone_bitwise_unchanged(gates_run, pretrained):
  """What the 30 jitted gate steps were given as the backbone is, after them, still alive (not
  donated) and bitwise the parameters read from disk before the run; the files were not
  rewritten (same bytes and modification times)."""
  _, _, before, seen = gates_run
  assert seen['steps'] == GATE_STEPS
  assert len(seen['frozen']) == 1  # one frozen pytree for the whole run
  frozen = seen['frozen'][0]
  leaves = jax.tree_util.tree_leaves(frozen)
  assert leaves and not any(x.is_deleted() for x in leaves)
  assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(before)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), frozen, before)
  assert _snapshot(pretrained[0]) == seen['files_before']


def test_tensorboard_has_scalars_and_heatmap(gates_run, pretrained):
  from tensorboard.backend.event_processing import event_accumulator
  ea = event_accumulator.EventAccumulator(gates_run[0], size_guidance={'tensors': 0})
  ea.Reload()
  tags = set(ea.Tags()['tensors'])
  for tag in ('loss', 'mse', 'gate_mean', 'reg', 'executed_ratio', 'flop_fraction',
              'steps_per_sec', 'alpha/00_down_0_res_0', 'beta/11_up_0_res_1', 'gates/heatmap'):
    assert tag in tags, tag
  assert [e.step for e in ea.Tensors('loss')] == [5, 10, 15, 20, 25, 30]
  heat = ea.Tensors('gates/heatmap')
  assert [e.step for e in heat] == [15, 30]
  assert heat[0].tensor_proto.string_val[2].startswith(b'\x89PNG')
  ea = event_accumulator.EventAccumulator(pretrained[0], size_guidance={'tensors': 0})
  ea.Reload()
  assert {'loss', 'learning_rate', 'grad_norm'} <= set(ea.Tags()['tensors'])


def _kill_after_first_checkpoint(cmd, ckpt_dir, env):
  """Starts ``cmd``, SIGKILLs it as soon as a checkpoint step appears in ``ckpt_dir``; returns
  that step (None if the run ended first or no checkpoint came within 180 s)."""
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  killed_after = None
  try:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
      steps = [d for d in (os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []) if d.isdigit()]
      if steps:
        proc.send_signal(signal.SIGKILL)
        killed_after = max(int(s) for s in steps)
        break
      time.sleep(0.02)
  finally:
    if proc.poll() is None and killed_after is None:
      proc.kill()
    proc.wait()
  return killed_after


def test_kill_and_restart_gives_identical_gates(gates_run, pretrained, compile_cache, tmp_path):
  backbone, _ = pretrained
  workdir = str(tmp_path / 'killed')
  cmd = _gate_flags(backbone, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'train_gates')
  killed_after = _kill_after_first_checkpoint(cmd, ckpt_dir, _env(compile_cache))
  assert killed_after is not None and killed_after < GATE_STEPS, 'the run ended before the kill'
  assert not os.path.exists(os.path.join(workdir, 'gates.json'))
  out = subprocess.run(cmd, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from checkpoint step {killed_after}' in out.stdout
  resumed = json.load(open(os.path.join(workdir, 'gates.json')))
  ref = json.load(open(os.path.join(gates_run[0], 'gates.json')))
  assert resumed['alpha'] == ref['alpha'] and resumed['beta'] == ref['beta']  # bitwise


PRETRAIN_RESUME = {'pretrain.num_train_steps': 12, 'pretrain.checkpoint_every': 2,
                   'pretrain.log_every': 2, 'pretrain.ema_decay': 0.5, 'model.dropout': 0.1}


def test_pretrain_kill_and_restart_gives_identical_backbone(compile_cache, tmp_path):
  """pretrain killed (SIGKILL) right after its first checkpoint and restarted ends with bitwise
  the same exported (EMA) backbone as an uninterrupted run. Dropout is on (the per-step keys
  matter) and the EMA decay is 0.5 (the EMA follows the parameters)."""
  ref_dir = str(tmp_path / 'uninterrupted')
  main_lib.run_mode(_tiny(mode='pretrain', **PRETRAIN_RESUME), ref_dir)
  workdir = str(tmp_path / 'killed')
  cmd = [sys.executable, '-m', 'lees_jax.main', '--config=configs/cifar10.py:tiny',
         f'--workdir={workdir}', '--config.mode=pretrain'] + [
             f'--config.{k}={v}' for k, v in PRETRAIN_RESUME.items()]
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'pretrain')
  killed_after = _kill_after_first_checkpoint(cmd, ckpt_dir, _env(compile_cache))
  steps = PRETRAIN_RESUME['pretrain.num_train_steps']
  assert killed_after is not None and killed_after < steps, 'the run ended before the kill'
  assert not os.path.exists(os.path.join(workdir, 'backbone'))
  out = subprocess.run(cmd, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  # The newest checkpoint the killed run left may be partial: resuming uses the newest complete one.
  assert 'resuming from checkpoint step' in out.stdout, out.stdout[-2000:]
  resumed_from = int(out.stdout.split('resuming from checkpoint step', 1)[1].split()[0].strip(',;.)'))
  assert 0 < resumed_from < steps
  _, want = checkpoints.load_backbone_params(ref_dir)
  _, got = checkpoints.load_backbone_params(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)  # bitwise


def test_nan_loss_stops_and_keeps_last_good_checkpoint(gates_run, pretrained, tmp_path):
  workdir = str(tmp_path / 'nan')
  shutil.copytree(gates_run[0], workdir)
  model_config, params = checkpoints.load_backbone_params(pretrained[0])
  params = jax.tree_util.tree_map(np.array, params)
  params['conv_out']['bias'][:] = np.nan
  bad = checkpoints.save_backbone(str(tmp_path / 'nan_backbone'), params, model_config)
  before = _snapshot(workdir)
  config = _gate_config(bad, **{'gates.num_train_steps': GATE_STEPS + GATE_CKPT})
  with pytest.raises(train.TrainingDivergedError) as err:
    train.train_gates(config, workdir)
  msg = str(err.value)
  assert f'non-finite loss or gradient at step {GATE_STEPS + 1}' in msg
  assert f'last good checkpoint is step {GATE_STEPS}' in msg
  after = _snapshot(workdir)
  assert {k: v for k, v in after.items() if 'tfevents' not in k} == \
      {k: v for k, v in before.items() if 'tfevents' not in k}
  # The last good checkpoint is intact and restores the gates of the good run.
  policy = policies.load_gates(workdir)
  np.testing.assert_array_equal(policy.alpha, np.asarray(gates_run[1]['params']['alpha']))


@pytest.mark.parametrize('problem', ['missing', 'corrupt_params', 'corrupt_json', 'mismatch'])
def test_bad_backbone_fails_naming_the_path(problem, gates_run, pretrained, tmp_path):
  workdir = str(tmp_path / 'work')
  shutil.copytree(gates_run[0], workdir)
  before = _snapshot(workdir)
  backbone = str(tmp_path / 'bb')
  overrides = {}
  if problem == 'missing':
    backbone = str(tmp_path / 'does_not_exist')
  else:
    shutil.copytree(os.path.join(pretrained[0], 'backbone'), backbone)
    if problem == 'corrupt_params':
      for root, _, files in os.walk(os.path.join(backbone, 'params')):
        for f in files:
          with open(os.path.join(root, f), 'wb') as fh:
            fh.write(b'garbage')
    elif problem == 'corrupt_json':
      with open(os.path.join(backbone, 'backbone.json'), 'w') as fh:
        fh.write('{not json')
    else:
      overrides['model.ch'] = 64
  with pytest.raises(checkpoints.BackboneError) as err:
    train.train_gates(_gate_config(backbone, **overrides), workdir)
  msg = str(err.value)
  assert backbone in msg
  if problem == 'mismatch':
    assert 'ch: checkpoint 32 vs config 64' in msg
  assert _snapshot(workdir) == before  # nothing in the workdir was touched


# --- oracles ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def gate_oracle(pretrained):
  """The LEES loss and its straight-through gradient written out independently of lees_jax's
  gating, diffusion and training code.

  x_t from a float64 numpy schedule; logit_bk = alpha_k (t_b + 1) / 1000 + beta_k; the hard
  weight w_bk = [logit_bk > 0]. A unit blended by w is the plain (ungated) model with the unit's
  residual branch (ResBlock conv2, attention proj_out) scaled by w -- skip + w (unit - skip).
  mse = mean_b mean_pixels (eps_b(w_b) - noise_b)^2, reg = mean_bk sigmoid(logit_bk);
  straight-through: d loss / d logit_bk = d mse / d w_bk * s(1-s) + lam s(1-s) / (B K).
  """
  from lees_jax import models
  model_config, backbone = checkpoints.load_backbone_params(pretrained[0])
  model = models.build_model(model_config)
  units = model.units
  abar_all = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))

  def sample_mse(w, x_t, t, noise):
    p = scale_residual_branches(backbone, units, [w[k] for k in range(len(units))])
    eps = model.apply({'params': p}, x_t[None], t[None])
    return jnp.mean((eps[0] - noise) ** 2)

  value_and_grad = jax.jit(jax.value_and_grad(sample_mse))

  def oracle(gp, x0, t, noise, lam, weights=None):
    """``weights``: per-unit weights of the compute term (None: the paper's mean)."""
    t, noise = np.asarray(t), np.asarray(noise, np.float64)
    abar = abar_all[t][:, None, None, None]
    x_t = (np.sqrt(abar) * np.asarray(x0, np.float64) + np.sqrt(1 - abar) * noise).astype(np.float32)
    tau = (t + 1.0) / 1000.0
    logits = (np.asarray(gp['alpha'], np.float64)[None] * tau[:, None]
              + np.asarray(gp['beta'], np.float64)[None])
    w = (logits > 0).astype(np.float32)
    mse_b, dmse_dw = [], []
    for b in range(len(t)):
      v, g = value_and_grad(w[b], x_t[b], jnp.int32(t[b]), noise[b].astype(np.float32))
      mse_b.append(float(v))
      dmse_dw.append(np.asarray(g, np.float64) / len(t))
    s = 1 / (1 + np.exp(-logits))
    if weights is None:  # reg = mean_bk s_bk
      dreg = np.full(s.shape, 1.0 / s.size)
      reg = float(s.mean())
    else:  # reg = mean_b sum_k c_k s_bk / sum_k c_k
      c = np.asarray(weights, np.float64) / np.sum(weights)
      dreg = np.broadcast_to(c[None] / len(t), s.shape)
      reg = float((s * c[None]).sum(1).mean())
    dlogit = (np.array(dmse_dw) + lam * dreg) * s * (1 - s)
    grads = {'alpha': (dlogit * tau[:, None]).sum(0), 'beta': dlogit.sum(0)}
    mse = float(np.mean(mse_b))
    return {'loss': mse + lam * reg, 'mse': mse, 'reg': lam * reg, 'gate_mean': float(s.mean()),
            'grads': grads, 'logits': logits,
            'grad_norm': float(np.sqrt(sum((g ** 2).sum() for g in grads.values())))}

  return oracle


def _random_gates(k, seed=0):
  rng = np.random.default_rng(seed)
  return {'alpha': rng.normal(0, 4, k).astype(np.float32),
          'beta': rng.normal(0, 2, k).astype(np.float32)}


# Measured (CPU, float32): gradients and Adam moments within 7.6e-7 of the oracle relative to
# their largest component, grad_norm within 3e-7, loss within 2e-7; 4 devices vs 1: 2.5e-7.
GRAD_RTOL = 3e-6
LOSS_RTOL = 2e-6


def _assert_grads_close(got, want, what):
  for name in ('alpha', 'beta'):
    g, w = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
    np.testing.assert_allclose(g, w, rtol=0, atol=GRAD_RTOL * np.abs(w).max(), err_msg=f'{what} {name}')


def test_gate_loss_and_gradient_match_hand_written_oracle(pretrained, gate_oracle):
  config = _gate_config(pretrained[0])
  objective = objectives.gates_objective(config)
  gp = _random_gates(len(objective.init_trainable(None)['alpha']))
  x0 = next(data.train_iterator(config.data, global_batch_size=4, seed=1))['image']
  rng = jax.random.PRNGKey(11)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective.loss_fn, has_aux=True))(
      gp, objective.frozen, {'image': x0}, rng)
  t, noise = objectives.draw_t_noise(rng, x0, 1000)
  o = gate_oracle(gp, x0, t, noise, lam=0.05)
  assert 0 < (o['logits'] > 0).sum() < o['logits'].size  # some units on, some off
  np.testing.assert_allclose(float(metrics['mse']), o['mse'], rtol=LOSS_RTOL)
  np.testing.assert_allclose(float(metrics['gate_mean']), o['gate_mean'], rtol=1e-6)
  np.testing.assert_allclose(float(metrics['hard_gate_mean']), (o['logits'] > 0).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(loss), o['loss'], rtol=LOSS_RTOL)
  _assert_grads_close(grads, o['grads'], 'jax.grad of the gate loss')


def test_flop_weighted_compute_term_matches_the_oracle(pretrained, gate_oracle):
  """gates.regularizer='flops': lam * sum_k c_k g_k / sum_k c_k, c_k the FLOPs skipping unit k
  saves -- loss and gradient against the oracle with those weights."""
  from lees_jax import cost, models
  config = _gate_config(pretrained[0], **{'gates.regularizer': 'flops', 'gates.lam': 0.5})
  objective = objectives.gates_objective(config)
  savings = cost.model_cost(models.build_model(config.model)).savings()
  assert (savings > 0).all() and savings.std() > 0  # the weights are not all alike
  gp = _random_gates(len(savings), seed=3)
  x0 = next(data.train_iterator(config.data, global_batch_size=4, seed=2))['image']
  rng = jax.random.PRNGKey(5)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(objective.loss_fn, has_aux=True))(
      gp, objective.frozen, {'image': x0}, rng)
  t, noise = objectives.draw_t_noise(rng, x0, 1000)
  o = gate_oracle(gp, x0, t, noise, lam=0.5, weights=savings)
  np.testing.assert_allclose(float(metrics['reg']), o['reg'], rtol=1e-6)
  np.testing.assert_allclose(float(loss), o['loss'], rtol=LOSS_RTOL)
  _assert_grads_close(grads, o['grads'], 'jax.grad of the FLOP-weighted gate loss')
  # The paper's term on the same gates differs: the weighting is real.
  plain = gate_oracle(gp, x0, t, noise, lam=0.5)
  assert abs(plain['reg'] - o['reg']) > 1e-3


@pytest.mark.parametrize('start,executed', [('zero', False), ('on', True)])
def test_gate_start(start, executed):
  """gates.init: 'zero' (alpha = beta = 0, the paper) starts every unit off -- g = 0.5 is not
  > 0.5 --, 'on' (beta = +0.01) every unit executed; both start at g ~ 0.5."""
  p = policies.init_gate_params(5, start)
  masks = policies.LeesPolicy.from_params(jax.device_get(p)).step_masks(np.arange(1000), 1000, 5)
  assert (masks == executed).all()
  g = policies.gate_values(jax.device_get(p), np.linspace(0.001, 1, 7))
  np.testing.assert_allclose(g, 0.5 if start == 'zero' else 1 / (1 + np.exp(-0.01)), rtol=1e-6)
  with pytest.raises(ValueError, match='config.gates.init'):
    policies.init_gate_params(5, 'off')


def _adam(moments, g, lr, b1, b2, eps=1e-8):
  """optax.adam by hand (float64): moments (m, v, count) -> (update, new moments)."""
  m, v, n = moments
  m = {k: b1 * m[k] + (1 - b1) * g[k] for k in g}
  v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in g}
  n += 1
  upd = {k: -lr * (m[k] / (1 - b1 ** n)) / (np.sqrt(v[k] / (1 - b2 ** n)) + eps) for k in g}
  return upd, (m, v, n)


def test_two_train_steps_are_adam_on_the_oracle_gradient(pretrained, gate_oracle):
  """Two jitted steps on one device: the step's gradient (Adam's moments hold it: m = (1-b1) g
  after step 1), grad_norm and loss match the oracle; the parameters follow Adam by hand."""
  config = _gate_config(pretrained[0])
  objective = objectives.gates_objective(config)
  lr, b1, b2 = 1e-3, 0.9, 0.999  # README: Adam 1e-3, betas (0.9, 0.999)
  assert (config.gates.learning_rate, config.gates.b1, config.gates.b2) == (lr, b1, b2)
  mesh = data.make_mesh(jax.devices()[:1])
  k = len(objective.init_trainable(None)['alpha'])
  gp = _random_gates(k, seed=3)
  state = data.replicate({'step': jnp.zeros((), jnp.int32), 'params': gp,
                          'opt_state': objective.optimizer.init(gp)}, mesh)
  frozen = data.replicate(objective.frozen, mesh)
  batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
  base_key = jax.random.PRNGKey(5)
  step = train.make_train_step(objective, mesh)
  zeros = {n: np.zeros(k) for n in ('alpha', 'beta')}
  moments = (zeros, zeros, 0)
  params = {n: np.asarray(v) for n, v in gp.items()}
  for i in range(2):
    state, metrics = step(state, frozen, data.shard_batch(batch, mesh), data.replicate(base_key, mesh))
    t, noise = objectives.draw_t_noise(jax.random.fold_in(base_key, i), batch['image'], 1000)
    o = gate_oracle(params, batch['image'], t, noise, lam=config.gates.lam)
    update, moments = _adam(moments, o['grads'], lr, b1, b2)
    adam = state['opt_state'][0]
    _assert_grads_close(adam.mu, moments[0], f'step {i + 1}: Adam first moment')
    _assert_grads_close(adam.nu, moments[1], f'step {i + 1}: Adam second moment')
    np.testing.assert_allclose(float(metrics['grad_norm']), o['grad_norm'], rtol=GRAD_RTOL)
    np.testing.assert_allclose(float(metrics['loss']), o['loss'], rtol=LOSS_RTOL)
    new = {n: np.asarray(state['params'][n]) for n in params}
    for n in params:  # float32 parameters of size up to ~10: resolution ~1e-6
      np.testing.assert_allclose(new[n], params[n] + update[n], rtol=0, atol=2e-6)
    params = new
  assert int(state['step']) == 2
  # Frozen inputs are neither updated nor donated.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         frozen, objective.frozen)


_DEVICES_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from configs import cifar10
from lees_jax import data, objectives, train
assert jax.device_count() == 4, jax.devices()
config = cifar10.get_config('tiny')
config.backbone = sys.argv[1]
objective = objectives.gates_objective(config)
gp = dict(np.load(sys.argv[2]))
batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
out = {}
for n in (1, 4):
  mesh = data.make_mesh(jax.devices()[:n])
  state = data.replicate({'step': jnp.zeros((), jnp.int32), 'params': gp,
                          'opt_state': objective.optimizer.init(gp)}, mesh)
  step = train.make_train_step(objective, mesh)
  new, metrics = step(state, data.replicate(objective.frozen, mesh), data.shard_batch(batch, mesh),
                      data.replicate(jax.random.PRNGKey(1), mesh))
  out[n] = {k: np.asarray(v).tolist() for k, v in new['params'].items()}
  out[n]['mu'] = {k: np.asarray(v).tolist() for k, v in new['opt_state'][0].mu.items()}
  out[n]['loss'] = float(metrics['loss'])
  out[n]['grad_norm'] = float(metrics['grad_norm'])
print('RESULT' + json.dumps(out))
"""


def test_one_vs_four_devices_same_gradient_and_update(pretrained, gate_oracle, compile_cache,
                                                       tmp_path):
  """One global batch of 8 on 1 and on 4 devices (2 rows each): the same gradient (read from
  Adam's first moment), grad_norm and loss -- and both the oracle's."""
  config = _gate_config(pretrained[0])
  k = len(objectives.gates_objective(config).init_trainable(None)['alpha'])
  gp = _random_gates(k, seed=4)
  np.savez(tmp_path / 'gates.npz', **gp)
  out = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT, pretrained[0], str(tmp_path / 'gates.npz')],
                       cwd=REPO, capture_output=True, text=True, timeout=400,
                       env=_env(compile_cache, XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split('RESULT', 1)[1])
  one, four = res['1'], res['4']
  batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
  t, noise = objectives.draw_t_noise(jax.random.fold_in(jax.random.PRNGKey(1), 0), batch['image'], 1000)
  o = gate_oracle(gp, batch['image'], t, noise, lam=config.gates.lam)
  assert 0 < (o['logits'] > 0).sum() < o['logits'].size
  grad = {n: np.asarray(one['mu'][n]) / (1 - config.gates.b1) for n in ('alpha', 'beta')}
  _assert_grads_close(grad, o['grads'], '1 device vs oracle')
  _assert_grads_close(four['mu'], one['mu'], '4 devices vs 1')
  np.testing.assert_allclose(one['grad_norm'], o['grad_norm'], rtol=GRAD_RTOL)
  np.testing.assert_allclose(four['grad_norm'], one['grad_norm'], rtol=GRAD_RTOL)
  np.testing.assert_allclose(one['loss'], o['loss'], rtol=LOSS_RTOL)
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=1e-6)
  for name in ('alpha', 'beta'):
    np.testing.assert_allclose(four[name], one[name], atol=1e-6, rtol=0)


def test_partition_and_merge_split_a_parameter_tree(tiny_model):
  """The trainable-subset helpers a fine-tuning objective (e.g. ASE) plugs into the loop with."""
  _, params = tiny_model
  trainable, frozen = objectives.partition(params, lambda path, leaf: path[0].startswith('up_'))
  assert trainable and frozen
  assert all(k.startswith('up_') for k in trainable)
  assert not any(k.startswith('up_') for k in frozen)
  merged = objectives.merge(trainable, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(dict(params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, dict(params))


def test_relative_workdir(tmp_path, monkeypatch, compile_cache):
  """A relative --workdir (the README's commands use one) trains, checkpoints and exports:
  orbax accepts only absolute paths, so the loop resolves it."""
  del compile_cache
  monkeypatch.chdir(tmp_path)
  config = _tiny(**{'mode': 'pretrain', 'pretrain.num_train_steps': 2,
                    'pretrain.checkpoint_every': 1, 'pretrain.log_every': 1})
  main_lib.run_mode(config, 'rel/w')
  assert sorted(os.listdir(tmp_path / 'rel' / 'w' / 'checkpoints' / 'pretrain')) == ['1', '2']
  assert (tmp_path / 'rel' / 'w' / 'backbone' / 'backbone.json').is_file()
  # ... and a relative backbone path (the README's --config.backbone=workdirs/pretrain) loads.
  _, params = checkpoints.load_backbone_params('rel/w')
  assert jax.tree_util.tree_leaves(params)
