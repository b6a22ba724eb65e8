"""`describe` mode: the backbone interface's units of the tiny UNet, checked against the layout
worked out by hand (channels include the concatenated skip tensors of the up path)."""

import json

import pytest

from conftest import cifar10
from lees_jax import main

# name, position, skip behaviour, ASE may drop it, in -> out channels.
TINY_UNITS = [
    ('down_0_res_0', 'encoder', 'identity', False, 32, 32),
    ('down_1_res_0', 'encoder', 'shortcut_projection', False, 32, 64),
    ('down_1_attn_0', 'encoder', 'identity', False, 64, 64),
    ('mid_res_0', 'middle', 'identity', False, 64, 64),
    ('mid_attn', 'middle', 'identity', False, 64, 64),
    ('mid_res_1', 'middle', 'identity', True, 64, 64),
    ('up_1_res_0', 'decoder', 'shortcut_projection', True, 64 + 64, 64),
    ('up_1_attn_0', 'decoder', 'identity', True, 64, 64),
    ('up_1_res_1', 'decoder', 'shortcut_projection', True, 64 + 32, 64),
    ('up_1_attn_1', 'decoder', 'identity', True, 64, 64),
    ('up_0_res_0', 'decoder', 'shortcut_projection', True, 64 + 32, 32),
    ('up_0_res_1', 'decoder', 'shortcut_projection', True, 32 + 32, 32),
]


def test_describe_writes_the_units_of_the_interface(tmp_path):
  config = cifar10.get_config('tiny')
  config.mode = 'describe'
  main.run_mode(config, str(tmp_path))
  d = json.loads((tmp_path / 'blocks.json').read_text())
  got = [(u['name'], u['position'], u['skip'], u['ase_droppable'], u['in_channels'], u['out_channels'])
         for u in d['units']]
  assert got == TINY_UNITS
  assert [u['index'] for u in d['units']] == list(range(len(TINY_UNITS)))
  # Skipping costs nothing but a kept 1x1 projection (2 * 32 * 32 * cin * cout + bias adds).
  for u in d['units']:
    if u['skip'] == 'identity':
      assert u['skip_gflops'] == 0.0
    else:
      r = u['resolution']
      assert u['skip_gflops'] * 1e9 == pytest.approx(2 * r * r * u['in_channels'] * u['out_channels']
                                                     + r * r * u['out_channels'])
