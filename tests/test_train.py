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
import optax
import pytest

from configs import cifar10
from lees_jax import checkpoints
from lees_jax import data
from lees_jax import gates as gating
from lees_jax import main as main_lib
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


def _tiny(**overrides):
  config = cifar10.get_config('tiny')
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _gate_config(backbone, **overrides):
  base = {'mode': 'train_gates', 'gates.backbone': backbone,
          'gates.num_train_steps': GATE_STEPS, 'gates.checkpoint_every': GATE_CKPT,
          'gates.log_every': 5, 'gates.heatmap_every': 15}
  base.update(overrides)
  return _tiny(**base)


def _gate_flags(backbone, workdir):
  return [sys.executable, '-m', 'lees_jax.main', '--config=configs/cifar10.py:tiny',
          f'--workdir={workdir}', '--config.mode=train_gates', f'--config.gates.backbone={backbone}',
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
  """An uninterrupted `train_gates` run on the pretrained backbone."""
  backbone, _ = pretrained
  workdir = str(tmp_path_factory.mktemp('gates'))
  _, before = checkpoints.load_backbone_params(backbone)
  state = main_lib.run_mode(_gate_config(backbone), workdir)
  return workdir, state, before


# --- pretrain ------------------------------------------------------------------------------


def test_pretrain_exports_ema_backbone_and_checkpoints(pretrained):
  workdir, state = pretrained
  assert int(state['step']) == 4
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params'}
  model_config, params = checkpoints.load_backbone_params(workdir)
  assert model_config.ch == 32
  ema = jax.device_get(state['ema_params'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ema)
  # EMA 0.9999 after 4 steps is not the raw parameters.
  diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                                state['params'], ema)
  assert max(jax.tree_util.tree_leaves(diff)) > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'pretrain'))) == ['2', '4']
  # Optimiser state: Adam moments of every backbone parameter (clip has no state).
  mu = state['opt_state'][1][0].mu
  assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(state['params'])


# --- train_gates ---------------------------------------------------------------------------


def test_gates_run_end_to_end(gates_run, pretrained):
  workdir, state, _ = gates_run
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
  policy = train.load_gates(workdir)
  assert isinstance(policy, gating.LeesPolicy) and policy.form == 'hard'
  np.testing.assert_array_equal(policy.alpha, np.asarray(state['params']['alpha']))
  np.testing.assert_array_equal(policy.beta, np.asarray(state['params']['beta']))
  masks = policy.step_masks(summary['sampler']['timesteps'], 1000, k)
  assert gating.executed_block_ratio(masks) == summary['executed_block_ratio']
  assert not np.all(policy.alpha == 0)  # the gates moved


def test_optimizer_state_covers_only_the_gates(gates_run):
  _, state, _ = gates_run
  assert set(state) == {'step', 'params', 'opt_state'}  # no EMA, no backbone
  leaves = jax.tree_util.tree_leaves(state['opt_state'])
  k = state['params']['alpha'].shape[0]
  assert all(np.shape(x) in ((), (k,)) for x in leaves)
  adam = state['opt_state'][0]
  assert set(adam.mu) == {'alpha', 'beta'} and set(adam.nu) == {'alpha', 'beta'}
  n_state = sum(np.size(x) for x in leaves)
  assert n_state <= 4 * k + 1


def test_backbone_bitwise_unchanged(gates_run, pretrained):
  _, _, before = gates_run
  _, after = checkpoints.load_backbone_params(pretrained[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)


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


def test_kill_and_restart_gives_identical_gates(gates_run, pretrained, compile_cache, tmp_path):
  backbone, _ = pretrained
  workdir = str(tmp_path / 'killed')
  cmd = _gate_flags(backbone, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints', 'train_gates')
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(compile_cache), stdout=subprocess.DEVNULL,
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
  assert killed_after is not None and killed_after < GATE_STEPS, 'the run ended before the kill'
  assert not os.path.exists(os.path.join(workdir, 'gates.json'))
  out = subprocess.run(cmd, cwd=REPO, env=_env(compile_cache), capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'resuming from checkpoint step {killed_after}' in out.stdout
  resumed = json.load(open(os.path.join(workdir, 'gates.json')))
  ref = json.load(open(os.path.join(gates_run[0], 'gates.json')))
  assert resumed['alpha'] == ref['alpha'] and resumed['beta'] == ref['beta']  # bitwise


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
  policy = train.load_gates(workdir)
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


def _random_gates(k, seed=0):
  rng = np.random.default_rng(seed)
  return {'alpha': rng.normal(0, 4, k).astype(np.float32),
          'beta': rng.normal(0, 2, k).astype(np.float32)}


def test_gate_loss_matches_hand_written_oracle(pretrained):
  config = _gate_config(pretrained[0])
  objective = train.gates_objective(config)
  model_config, backbone = checkpoints.load_backbone_params(pretrained[0])
  from lees_jax import models
  model = models.build_model(model_config)
  gp = _random_gates(model.num_units)
  x0 = next(data.train_iterator(config.data, global_batch_size=4, seed=1))['image']
  rng = jax.random.PRNGKey(11)
  loss, metrics = objective.loss_fn(gp, backbone, {'image': x0}, rng)

  # Oracle: numpy schedule, one sample at a time with a static mask of the executed units.
  t, noise = train.draw_t_noise(rng, x0, 1000)
  t, noise = np.asarray(t), np.asarray(noise)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t]
  x_t = (np.sqrt(abar)[:, None, None, None] * x0 +
         np.sqrt(1.0 - abar)[:, None, None, None] * noise).astype(np.float32)
  logits = gp['alpha'][None] * ((t[:, None] + 1.0) / 1000.0) + gp['beta'][None]
  assert 0 < (logits > 0).sum() < logits.size
  mse = []
  for i in range(4):
    eps = model.apply({'params': backbone}, x_t[i:i + 1], t[i:i + 1],
                      gates=gating.StaticMask(tuple(logits[i] > 0)))
    mse.append(np.mean((np.asarray(eps, np.float64) - noise[i:i + 1]) ** 2))
  reg = np.mean(1.0 / (1.0 + np.exp(-logits)))
  np.testing.assert_allclose(float(metrics['mse']), np.mean(mse), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['gate_mean']), reg, rtol=1e-6)
  np.testing.assert_allclose(float(loss), np.mean(mse) + 0.05 * reg, rtol=1e-5)


def test_one_train_step_is_one_adam_step_on_the_gates_only(pretrained):
  config = _gate_config(pretrained[0])
  objective = train.gates_objective(config)
  mesh = data.make_mesh(jax.devices()[:1])
  k = len(objective.init_trainable(None)['alpha'])
  gp = _random_gates(k, seed=3)
  state = {'step': jnp.zeros((), jnp.int32), 'params': gp,
           'opt_state': objective.optimizer.init(gp)}
  state = data.replicate(state, mesh)
  frozen = data.replicate(objective.frozen, mesh)
  batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
  base_key = jax.random.PRNGKey(5)
  step = train.make_train_step(objective, mesh)
  new, metrics = step(state, frozen, data.shard_batch(batch, mesh), data.replicate(base_key, mesh))
  # Frozen inputs are neither updated nor donated.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                         frozen, objective.frozen)
  # Optax-free Adam, first step: m = (1-b1) g, v = (1-b2) g^2, bias-corrected -> g / (|g| + eps).
  rng = jax.random.fold_in(base_key, 0)
  grads = jax.grad(lambda p: objective.loss_fn(p, objective.frozen, batch, rng)[0])(gp)
  for name in ('alpha', 'beta'):
    g = np.asarray(grads[name], np.float64)
    expected = gp[name] - 1e-3 * g / (np.abs(g) + 1e-8)
    np.testing.assert_allclose(np.asarray(new['params'][name]), expected, rtol=1e-5, atol=1e-6)
  assert int(new['step']) == 1 and np.isfinite(float(metrics['loss']))


_DEVICES_SCRIPT = r'''
import json, sys
import jax, numpy as np
from configs import cifar10
from lees_jax import data, train
assert jax.device_count() == 4, jax.devices()
config = cifar10.get_config('tiny')
config.gates.backbone = sys.argv[1]
objective = train.gates_objective(config)
batch = next(data.train_iterator(config.data, global_batch_size=8, seed=0))
out = {}
for n in (1, 4):
  mesh = data.make_mesh(jax.devices()[:n])
  state = train.init_state(objective, jax.random.PRNGKey(0), mesh)
  step = train.make_train_step(objective, mesh)
  new, metrics = step(state, data.replicate(objective.frozen, mesh), data.shard_batch(batch, mesh),
                      data.replicate(jax.random.PRNGKey(1), mesh))
  out[n] = {k: np.asarray(v).tolist() for k, v in new['params'].items()}
  out[n]['loss'] = float(metrics['loss'])
print('RESULT' + json.dumps(out))
'''


def test_one_vs_four_devices_same_gate_update(pretrained, compile_cache):
  out = subprocess.run([sys.executable, '-c', _DEVICES_SCRIPT, pretrained[0]], cwd=REPO,
                       env=_env(compile_cache, XLA_FLAGS='--xla_force_host_platform_device_count=4'),
                       capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.split('RESULT', 1)[1])
  one, four = res['1'], res['4']
  for name in ('alpha', 'beta'):
    assert np.any(np.asarray(one[name]) != 0)
    np.testing.assert_allclose(four[name], one[name], atol=1e-6, rtol=0)
  np.testing.assert_allclose(four['loss'], one['loss'], rtol=1e-6)


def test_partition_and_merge_split_a_parameter_tree(tiny_model):
  """The trainable-subset helpers a fine-tuning objective (e.g. ASE) plugs into the loop with."""
  _, params = tiny_model
  trainable, frozen = train.partition(params, lambda path, leaf: path[0].startswith('up_'))
  assert trainable and frozen
  assert all(k.startswith('up_') for k in trainable)
  assert not any(k.startswith('up_') for k in frozen)
  merged = train.merge(trainable, frozen)
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(dict(params))
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, dict(params))
