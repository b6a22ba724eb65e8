"""One device vs a mesh of four (forced host devices), and bfloat16 vs float32 sampling.

The four-device runs happen in one subprocess started with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX starts);
it runs each computation on a 1-device and on a 4-device mesh and writes both results, which
the tests compare. The oracle is the 1-device run: the sharded program must compute the same
thing (the batch split over devices, parameters replicated, the same random draws).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import cifar10
from lees_jax import diffusion, models, policies, samplers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import sys
import jax, jax.numpy as jnp, numpy as np
from flax import traverse_util
from configs import cifar10
from lees_jax import checkpoints, data, diffusion, models, policies, samplers, train
assert jax.device_count() == 4, jax.devices()
backbone, out_dir = sys.argv[1], sys.argv[2]
out = {}

def flat(tree, prefix):
  for k, v in traverse_util.flatten_dict(jax.device_get(tree)).items():
    out[prefix + '/' + '/'.join(k)] = np.asarray(v)

# Sampling: DDPM (noise at every step), a hard policy with several segments.
config = cifar10.get_config('tiny')
model_config, params = checkpoints.load_backbone_params(backbone)
model = models.build_model(model_config)
solver = samplers.make_solver(diffusion.schedule_from_config(config.diffusion), 'ddpm', 6)
rng = np.random.default_rng(1)
k = model.num_units
policy = policies.LeesPolicy(rng.normal(0, 8, k), rng.normal(0, 3, k))
for n in (1, 4):
  mesh = data.make_mesh(jax.devices()[:n])
  for path in ('segments',):  # ('cond' takes the same mesh code path in compile_sampler)
    prog = samplers.compile_sampler(model, solver, policy, 8, path=path, mesh=mesh)
    x = prog(params, jax.random.PRNGKey(7))
    assert len(x.sharding.device_set) == n, x.sharding
    out[f'sample_{path}_{n}'] = np.asarray(x)

# Pretraining (dropout on, so per-example random draws matter) and ASE fine-tuning.
for mode in ('pretrain', 'ase_finetune'):
  for n in (1, 4):
    c = cifar10.get_config('tiny')
    c.mode = mode
    if mode == 'pretrain':
      c.model.dropout = 0.1
      c.pretrain.update(num_train_steps=3, checkpoint_every=100, log_every=100)
    else:
      c.backbone = backbone
      c.ase_ft.update(schedule='D3', num_train_steps=3, checkpoint_every=100, log_every=100,
                      reweight_steps=2)
    state = train.run_objective(mode, c, f'{out_dir}/{mode}_{n}',
                                mesh=data.make_mesh(jax.devices()[:n]))
    flat(state['params'], f'{mode}_{n}/params')
    flat(state['ema_params'], f'{mode}_{n}/ema')
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state['opt_state']))[0]:
      out[f'{mode}_{n}/opt/' + jax.tree_util.keystr(path)] = np.asarray(leaf)
np.savez(f'{out_dir}/result.npz', **out)
print('DONE')
"""


@pytest.fixture(scope='module')
def four_devices(tiny_backbone, compile_cache, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp('devices'))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  run = subprocess.run([sys.executable, '-c', _SCRIPT, tiny_backbone, out_dir], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0 and 'DONE' in run.stdout, run.stderr[-3000:]
  return dict(np.load(os.path.join(out_dir, 'result.npz')))


def _max_diff(res, prefix_a, prefix_b, contains=''):
  keys_a = sorted(k for k in res if k.startswith(prefix_a + '/') and contains in k)
  keys_b = sorted(k for k in res if k.startswith(prefix_b + '/') and contains in k)
  assert [k[len(prefix_a):] for k in keys_a] == [k[len(prefix_b):] for k in keys_b] and keys_a
  return max((float(np.abs(res[a] - res[b]).max()), a) for a, b in zip(keys_a, keys_b))


@pytest.mark.parametrize('path', ['segments'])
def test_sampling_on_four_devices_equals_one(four_devices, path):
  one, four = four_devices[f'sample_{path}_1'], four_devices[f'sample_{path}_4']
  assert one.shape == (8, 32, 32, 3) and np.abs(one).max() > 0.1
  diff = float(np.abs(one - four).max())
  mean = float(np.abs(one - four).mean())
  print(f'\n[sampling {path}] max |4 devices - 1 device| = {diff:.2e}, mean {mean:.1e}')
  # Measured (6 DDPM steps, random-weight tiny UNet, values in [-1, 1]): max 2.85e-5 (4 of 24,576
  # values above 1e-5: float32 reduction order amplified over the steps).
  assert diff < 5e-5


# Attention key biases have a zero true gradient (softmax is invariant to adding q.b to every
# score of a row): their computed gradient is rounding noise (|g| ~ 1e-9), which Adam's
# normalisation turns into steps of up to +-lr whose sign differs between reduction orders.
ZERO_GRAD = '/k/bias'
# Parameters (attention key biases aside). Pretraining's first steps are in the warm-up (lr <=
# 8e-5): measured 1.5e-8 (EMA 9.3e-10). ASE fine-tuning runs Adam at lr 1e-3 from step 0, where
# m / sqrt(v) of a small gradient (|g| ~ 1e-7, its last bits differing between reduction orders)
# changes by a few % of lr: measured 2.3e-5 (EMA ~ 1e-5), while its moments agree to 3e-8.
PARAM_TOL = {'pretrain': 1e-7, 'ase_finetune': 5e-5}


@pytest.mark.parametrize('mode', ['pretrain', 'ase_finetune'])
def test_training_on_four_devices_equals_one(four_devices, mode):
  """Three steps of one global batch of 8 (2 rows per device on four), pretraining with dropout
  on: the same Adam moments, parameters and EMA parameters. Measured (jax 0.10.2, CPU):
  Adam mu 5.4e-9 / 2.9e-8, nu 3.6e-12 / 2.0e-10 for pretrain / ase_finetune; parameters see
  PARAM_TOL."""
  res = four_devices
  for what, tol in (('.mu', 1e-7), ('.nu', 1e-9)):
    diff, where = _max_diff(res, f'{mode}_4/opt', f'{mode}_1/opt', what)
    print(f'\n[{mode} Adam {what[1:]}] max |4 devices - 1 device| = {diff:.2e} at {where}')
    assert diff < tol, (where, diff)
  for part in ('params', 'ema'):
    worst = 0.0
    for key in sorted(k for k in res if k.startswith(f'{mode}_1/{part}/')):
      other = key.replace(f'{mode}_1/', f'{mode}_4/', 1)
      diff = float(np.abs(res[key] - res[other]).max())
      if ZERO_GRAD in key:
        continue
      worst = max(worst, diff)
    print(f'[{mode} {part}] max |4 devices - 1 device| = {worst:.2e} (attention key biases aside)')
    assert worst < PARAM_TOL[mode], (mode, part, worst)
  # The attention key biases: their gradient is noise on both meshes.
  noise = [float(np.abs(v).max()) for k, v in res.items()
           if k.startswith(f'{mode}_') and '/opt/' in k and '.mu' in k and "['k']['bias']" in k]
  assert noise and max(noise) < 1e-6, max(noise)


def test_training_moved_the_parameters(four_devices, tiny_backbone):
  from flax import traverse_util

  from lees_jax import checkpoints
  _, init = checkpoints.load_backbone_params(tiny_backbone)
  flat = {'ase_finetune_1/params/' + '/'.join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(init).items()}
  moved = max(float(np.abs(four_devices[k] - v).max()) for k, v in flat.items())
  assert moved > 1e-4


def test_bfloat16_sampling_is_close_to_float32(tiny_backbone):
  """The same sampler and key with the model in bfloat16 (``config.sampler.dtype=bfloat16``
  builds it with ``models.build_model(..., dtype='bfloat16')``): close to float32, and not
  identical (bfloat16 really ran)."""
  from lees_jax import checkpoints
  config = cifar10.get_config('tiny')
  model_config, params = checkpoints.load_backbone_params(tiny_backbone)
  solver = samplers.make_solver(diffusion.schedule_from_config(config.diffusion), 'ddim', 5)
  out = {}
  for dtype in ('float32', 'bfloat16'):
    model = models.build_model(model_config, dtype=dtype)
    prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), 4)
    out[dtype] = np.asarray(prog(params, jax.random.PRNGKey(0)), np.float64)
  assert out['bfloat16'].dtype == np.float64 and np.abs(out['float32']).max() > 0.5
  diff = np.abs(out['bfloat16'] - out['float32'])
  print(f'\n[bf16 vs fp32 sampling] max {diff.max():.3e}, mean {diff.mean():.3e}')
  assert diff.max() > 0
  assert diff.max() < BF16_MAX and diff.mean() < BF16_MEAN



# Measured (5 DDIM steps, random-weight tiny UNet, batch 4, values in [-1, 1]): max 0.43 (a few
# pixels where x0 clipping and bfloat16's 8-bit mantissa compound over the steps), mean 2.9e-3.
BF16_MAX, BF16_MEAN = 0.5, 4e-3
