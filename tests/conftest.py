"""Shared fixtures. Tests run on CPU; keep models tiny and compile once per module."""

import os
import sys

# Make the repository importable without installation (tests run from a fresh clone).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import pytest  # noqa: E402

from lees_jax.models import unet  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SPEC = unet.UNetSpec(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                          num_groups=8, dropout=0.0)


@pytest.fixture(scope='session')
def tiny_model():
  model = unet.UNet(TINY_SPEC)
  params = unet.init_params(model, jax.random.PRNGKey(0))
  return model, params


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  """A persistent XLA compile cache shared by a test module and the subprocesses it starts."""
  from jax._src import compilation_cache
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  compilation_cache.reset_cache()
  yield path
  for n, v in old.items():
    jax.config.update(n, v)
  compilation_cache.reset_cache()
