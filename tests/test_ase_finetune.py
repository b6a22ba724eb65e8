"""ASE fine-tuning (config.mode=ase_finetune) on the tiny config: export, invariants, resume.

The backbone is a freshly initialised tiny UNet (no pretraining needed: the invariants are
about which parameters move). A custom schedule (a .json keep matrix) never executes three
units, so "fine-tuning changes only the units the schedule executes" can be checked bitwise.
Compilation dominates on CPU, so the module shares one persistent XLA compilation cache.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10
from conftest import tiny_config as _tiny
from lees_jax import checkpoints
from lees_jax import data
from lees_jax import evaluate
from lees_jax import gates as gating
from lees_jax import policies
from lees_jax import main as main_lib
from lees_jax import models
from lees_jax import objectives
from lees_jax import train

STEPS, CKPT = 6, 3
# Never executed by the custom schedule: an attention block, a ResBlock that keeps its
# channels (skip = identity) and one that changes them (skip = its 1x1 conv_shortcut, which
# therefore runs and trains).
NEVER = ('mid_attn', 'up_1_attn_1', 'up_0_res_1')
HALF = 'up_1_res_1'  # executed only in the 5 intervals near the data
FROZEN = {'ase_ft.freeze_time_embedding': True}


def _names():
  return [u.name for u in models.build_model(cifar10.get_config('tiny').model).units]


def _unit_of(path):
  return path[0] if path[0] in set(_names()) else None


@pytest.fixture(scope='module')
def backbone(tmp_path_factory):
  """A random tiny backbone directory and its parameters (numpy: compiling the Flax init
  costs tens of seconds on a loaded CPU)."""
  config = cifar10.get_config('tiny')
  model = models.build_model(config.model)
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if len(leaf.shape) > 1:  # kernels: fan-in scaled
      return rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    base = 1.0 if path[-1].key == 'scale' else 0.0
    return (base + rng.normal(0, 0.05, leaf.shape)).astype(np.float32)

  params = jax.tree_util.tree_map_with_path(draw, abstract)
  path = checkpoints.save_backbone(str(tmp_path_factory.mktemp('bb') / 'backbone'), params,
                                   config.model, diffusion_config=config.diffusion)
  return path, params


@pytest.fixture(scope='module')
def schedule_file(tmp_path_factory):
  names = _names()
  keep = np.ones((len(names), 10), bool)
  for n in NEVER:
    keep[names.index(n)] = False
  keep[names.index(HALF), 5:] = False
  path = str(tmp_path_factory.mktemp('sched') / 'custom.json')
  with open(path, 'w') as f:
    json.dump({'name': 'custom', 'matrix': keep.astype(int).tolist()}, f)
  return path, keep


def _config(backbone_path, schedule, **overrides):
  base = {'mode': 'ase_finetune', 'backbone': backbone_path, 'ase_ft.schedule': schedule,
          'ase_ft.num_train_steps': STEPS, 'ase_ft.checkpoint_every': CKPT,
          'ase_ft.log_every': CKPT, 'ase_ft.reweight_steps': 2}
  base.update(overrides)
  return _tiny(**base)


@pytest.fixture(scope='module')
def run(tmp_path_factory, backbone, schedule_file, compile_cache):
  """An uninterrupted ase_finetune run through lees_jax.main's mode table, time embedding frozen."""
  del compile_cache
  workdir = str(tmp_path_factory.mktemp('ase_ft') / 'run1')
  state = main_lib.run_mode(_config(backbone[0], schedule_file[0], **FROZEN), workdir)
  return workdir, jax.device_get(state)


def _flat(tree):
  import flax
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


# --- end to end --------------------------------------------------------------------------------


def test_mode_exports_backbone_and_schedule(run, backbone, schedule_file):
  workdir, state = run
  assert int(state['step']) == STEPS
  assert set(state) == {'step', 'params', 'opt_state', 'ema_params'}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', 'ase_finetune'))) == ['3', '6']
  summary = json.load(open(os.path.join(workdir, objectives.ASE_SCHEDULE_FILE)))
  assert summary['kind'] == 'schedule' and summary['name'] == 'custom'
  assert summary['matrix'] == schedule_file[1].astype(int).tolist()
  assert summary['units'] == _names() and summary['step'] == STEPS
  assert summary['backbone'] == os.path.join(workdir, 'backbone')
  assert summary['base_backbone'] == backbone[0]
  assert 0 < summary['executed_block_ratio'] < 1
  meta = checkpoints.read_backbone_meta(workdir)
  assert meta['source'] == 'lees_jax ase_finetune' and meta['params_kind'] == 'ema'
  assert meta['ase_schedule'] == {'name': 'custom', 'matrix': summary['matrix']}

  # load_ase_finetuned: the exported EMA params and the schedule.
  params, policy = objectives.load_ase_finetuned(workdir, expected_model_config=_tiny().model)
  assert isinstance(policy, policies.SchedulePolicy) and policy.name == 'custom'
  np.testing.assert_array_equal(policy.matrix, schedule_file[1])
  _, exported = checkpoints.load_backbone_params(workdir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, exported)

  # evaluate's policy spec: the fine-tuned params replace the evaluator's backbone.
  model = models.build_model(_tiny().model)
  resolved = evaluate.resolve_policy(f'ase_ft:{workdir}', model)
  assert resolved.name == 'ase_ft_run1'
  np.testing.assert_array_equal(resolved.policy.matrix, schedule_file[1])
  jax.tree_util.tree_map(np.testing.assert_array_equal, resolved.params, params)
  with pytest.raises(FileNotFoundError, match='ase_finetune'):
    evaluate.resolve_policy(f'ase_ft:{backbone[0]}_missing', model)
  with pytest.raises(ValueError, match='no ASE schedule'):
    objectives.load_ase_finetuned(backbone[0])  # a plain backbone
  with pytest.raises(checkpoints.BackboneError, match='does not match'):
    evaluate.resolve_policy(f'ase_ft:{workdir}', models.build_model(_tiny(**{'model.ch': 64}).model))


def test_only_executed_units_change_frozen_embedding_kept_no_gates(run, backbone):
  _, state = run
  before = _flat(backbone[1])
  assert not any(k[-1] in ('alpha', 'beta') for k in _flat(state['params']))  # no gate params
  # Everything but the frozen time embedding is trainable (and has Adam moments).
  trainable = set(_flat(state['params']))
  assert trainable == {k for k in before if not k[0].startswith('temb_dense')}
  adam = state['opt_state'][0][0]  # chain(adamw) -> adamw = chain(scale_by_adam, ...)
  assert set(_flat(adam.mu)) == trainable == set(_flat(adam.nu))
  for which in ('params', 'ema_params'):
    after = _flat(state[which])
    changed_units = set()
    for path, old in before.items():
      if path[0].startswith('temb_dense'):
        assert path not in after  # frozen: not in the trainable tree nor its EMA
        continue
      same = np.array_equal(np.asarray(after[path]), old)
      unit = _unit_of(path)
      if unit in NEVER and path[1] != 'conv_shortcut':
        assert same, f'{which}: {path} of never-executed unit {unit} changed'
      elif not same:
        changed_units.add(unit)
    executed = set(_names()) - set(NEVER)
    assert executed <= changed_units, f'{which}: executed units unchanged: {executed - changed_units}'
    assert None in changed_units  # conv_in / temb / norm_out / conv_out / resampling
    # The skip path of a dropped channel-changing ResBlock (its 1x1 shortcut) runs and trains.
    assert not np.array_equal(after[('up_0_res_1', 'conv_shortcut', 'kernel')],
                              before[('up_0_res_1', 'conv_shortcut', 'kernel')])
  # The exported backbone is the EMA, with the frozen time embedding bitwise as loaded.
  _, exported = checkpoints.load_backbone_params(run[0])
  exported = _flat(exported)
  assert set(exported) == set(before)
  for path, old in before.items():
    want = old if path[0].startswith('temb_dense') else _flat(state['ema_params'])[path]
    np.testing.assert_array_equal(exported[path], want)


def test_resume_from_mid_run_checkpoint_is_bitwise_identical(run, tmp_path, backbone,
                                                             schedule_file, capsys):
  """A run stopped after its step-3 checkpoint and restarted ends exactly as the uninterrupted one
  (the lambda(t) phase switches at step 2, before the checkpoint; the data order and keys are
  functions of the step)."""
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(run[0], workdir)
  shutil.rmtree(os.path.join(workdir, 'checkpoints', 'ase_finetune', str(STEPS)))
  shutil.rmtree(os.path.join(workdir, 'backbone'))
  os.remove(os.path.join(workdir, objectives.ASE_SCHEDULE_FILE))
  state = jax.device_get(train.ase_finetune(_config(backbone[0], schedule_file[0], **FROZEN),
                                            workdir))
  assert f'resuming from checkpoint step {CKPT}' in capsys.readouterr().out
  for which in ('params', 'ema_params'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, state[which], run[1][which])
  _, a = checkpoints.load_backbone_params(workdir)
  _, b = checkpoints.load_backbone_params(run[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


# --- the loss --------------------------------------------------------------------------------------


def test_lambda_matches_hand_formula():
  t = np.array([0, 99, 499, 999])
  t_n = (t + 1) / 1000.0
  np.testing.assert_allclose(objectives.ase_time_weight(t, 1000, 0, 'paper', 2.0, 5),
                             1.0 + 2.0 * t_n, rtol=1e-6)
  np.testing.assert_allclose(objectives.ase_time_weight(t, 1000, 4, 'paper', 0.5, 5),
                             [1.0005, 1.05, 1.25, 1.5], rtol=1e-6)
  np.testing.assert_array_equal(objectives.ase_time_weight(t, 1000, 5, 'paper', 2.0, 5), 1.0)
  np.testing.assert_array_equal(objectives.ase_time_weight(t, 1000, 0, 'none', 2.0, 5), 1.0)
  with pytest.raises(ValueError, match='reweight'):
    objectives.ase_time_weight(t, 1000, 0, 'cosine')


def test_loss_is_sampler_forward_per_example_and_dropped_units_get_zero_gradient(
    backbone, schedule_file):
  config = _config(backbone[0], schedule_file[0], **{'ase_ft.reweight_coef': 3.0,
                                                     'ase_ft.reweight_steps': 100})
  objective = objectives.ase_objective(config)
  model = models.build_model(config.model)
  x0 = next(data.train_iterator(config.data, global_batch_size=4, seed=1))['image']
  rng = jax.random.PRNGKey(7)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p: objective.loss_fn(p, objective.frozen, {'image': x0}, rng, jnp.int32(0)),
      has_aux=True))
  (loss, metrics), grads = value_and_grad(objective.initial_trainable)
  # Oracle: one example at a time through the sampler's forward (a StaticMask of the
  # schedule's column at the example's interval), numpy q_sample, lambda = 1 + 3 t_n.
  t, noise = objectives.draw_t_noise(rng, x0, 1000)
  t, noise = np.asarray(t), np.asarray(noise)
  abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[t]
  x_t = (np.sqrt(abar)[:, None, None, None] * x0 +
         np.sqrt(1.0 - abar)[:, None, None, None] * noise).astype(np.float32)
  cols = policies.interval_index(t, 1000, 10)
  keep = schedule_file[1][:, cols].T
  assert not keep.all()
  mse = []
  for i in range(4):
    eps = model.apply({'params': backbone[1]}, x_t[i:i + 1], t[i:i + 1],
                      gates=gating.StaticMask(tuple(keep[i])))
    mse.append(np.mean((np.asarray(eps, np.float64) - noise[i:i + 1]) ** 2))
  lam = 1.0 + 3.0 * (t + 1) / 1000.0
  np.testing.assert_allclose(float(metrics['mse']), np.mean(mse), rtol=1e-5)
  np.testing.assert_allclose(float(loss), np.mean(lam * np.asarray(mse)), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['kept_fraction']), keep.mean(), rtol=1e-6)

  grads = _flat(grads)
  for path, g in grads.items():
    if _unit_of(path) in NEVER and path[1] != 'conv_shortcut':
      assert not np.any(np.asarray(g)), path  # exactly zero
  assert np.any(np.asarray(grads[('conv_out', 'kernel')]))


# --- schedules and errors --------------------------------------------------------------------------


def test_schedule_specs_resolve():
  units = models.build_model(_tiny().model).units
  config = _tiny()
  from lees_jax import ase
  np.testing.assert_array_equal(ase.resolve_schedule('ase_default', units, config).matrix,
                                ase.named_schedule('ase_default', units).matrix)
  point = ase.GridPoint(2, 4 / 7)
  assert point.name == 'ase_s2_f0.57'
  got = ase.resolve_schedule('ase_s2_f0.57', units, config)
  np.testing.assert_array_equal(got.matrix, ase.grid_policy(point, units).matrix)
  assert got.name == 'ase_s2_f0.57'


def test_bad_schedule_fails_clearly_before_touching_the_workdir(backbone, tmp_path):
  workdir = str(tmp_path / 'never')
  with pytest.raises(ValueError) as err:
    main_lib.run_mode(_config(backbone[0], 'D9'), workdir)
  msg = str(err.value)
  assert "unknown ASE schedule config.ase_ft.schedule='D9'" in msg
  assert 'ase_default' in msg and 'D7' in msg and 'ase_s2_f0.57' in msg
  assert not os.path.exists(workdir)
  with pytest.raises(FileNotFoundError, match='missing.json'):
    objectives.ase_objective(_config(backbone[0], str(tmp_path / 'missing.json')))
  bad = tmp_path / 'short.json'
  bad.write_text(json.dumps({'matrix': [[1] * 10] * 3}))
  with pytest.raises(ValueError, match='3 rows but the model has 12'):
    objectives.ase_objective(_config(backbone[0], str(bad)))
  with pytest.raises(ValueError, match='reweight'):
    objectives.ase_objective(_config(backbone[0], 'D3', **{'ase_ft.reweight': 'yes'}))
