"""Refactoring changes no result: outputs of the `tiny` preset, bitwise, against saved ones.

`tests/golden/tiny_outputs.npz` was written (``LEES_WRITE_GOLDEN=1 python -m pytest
tests/test_golden_outputs.py``) before the core redesign of issue 13, from the modes' own entry
points: pretraining (20 steps), LEES gate training (20 steps), ASE fine-tuning (20 steps), and
the samplers for `full`, `ase:ase_default`, the learned LEES gates (segments and `lax.cond`
paths) and those gates used soft, one seed each. A refactoring must reproduce every array
bitwise. (XLA's CPU code depends on the processor's instruction set: the file was written on
the CI machine's kind, x86-64; regenerate it only for an intended change of results and say why
in the commit.)
"""

import hashlib
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lees_jax import evaluate, load_backbone, main, samplers

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'golden', 'tiny_outputs.npz')
POLICIES = (('full', 'segments'), ('ase:ase_default', 'segments'), ('lees:{gates}', 'segments'),
            ('lees:{gates}', 'cond'), ('lees_soft:{gates}', 'soft'))


def _digest(tree) -> np.ndarray:
  """sha256 of every leaf's bytes in path order (large parameter trees)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(tree)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return np.frombuffer(h.digest(), np.uint8)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory, compile_cache):
  del compile_cache
  root = tmp_path_factory.mktemp('golden')
  pre, gates_dir, ase_dir = (str(root / n) for n in ('pretrain', 'gates', 'ase_ft'))
  main.run_mode(tiny_config(mode='pretrain'), pre)
  main.run_mode(tiny_config(mode='train_gates', backbone=pre), gates_dir)
  main.run_mode(tiny_config(mode='ase_finetune', backbone=pre), ase_dir)
  out = {}
  model, params = load_backbone(os.path.join(pre, 'backbone'))
  out['pretrain_params_sha256'] = _digest(params)
  _, ase_params = load_backbone(os.path.join(ase_dir, 'backbone'))
  out['ase_finetune_params_sha256'] = _digest(ase_params)
  lees = evaluate.resolve_policy(f'lees:{gates_dir}', model).policy
  out['gates_alpha'], out['gates_beta'] = np.asarray(lees.alpha), np.asarray(lees.beta)
  # The saved samples use the DDPM variance that was the default then (now fixed_small).
  config = tiny_config(mode='evaluate', **{'sampler.variance': 'fixed_large'})
  solver = samplers.solver_from_config(config.diffusion, config.sampler)
  for spec, path in POLICIES:
    policy = evaluate.resolve_policy(spec.format(gates=gates_dir), model).policy
    program = samplers.compile_sampler(model, solver, policy, config.sampler.batch_size, path=path)
    x = program(params, jax.random.fold_in(jax.random.PRNGKey(0), 0))
    out[f'samples_{spec.split(":")[0]}_{path}'] = np.asarray(x)
  return out


def test_outputs_are_bitwise_the_saved_ones(outputs):
  if os.environ.get('LEES_WRITE_GOLDEN') == '1':
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    np.savez_compressed(GOLDEN, **outputs)
  with np.load(GOLDEN) as saved:
    assert sorted(saved.files) == sorted(outputs)
    for name in saved.files:
      np.testing.assert_array_equal(outputs[name], saved[name], err_msg=name)
  # The outputs are not degenerate: the policies really differ.
  assert not np.array_equal(outputs['samples_full_segments'], outputs['samples_ase_segments'])
  np.testing.assert_array_equal(outputs['samples_lees_segments'], outputs['samples_lees_cond'])
