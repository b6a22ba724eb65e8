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
