"""lees_jax.files, and the modes' result files on a non-local filesystem.

``gs://`` paths are served here by an in-memory fsspec filesystem put behind etils.epath's
gs:// backend (offline; no credentials). A module that still used ``os``/``open`` on a
gs:// path would miss its files: ``os.path.isfile('gs://...')`` is silently False, so every
test reads what was written back through the module under test.
"""

import io
import json
import os

import fsspec
import numpy as np
import pytest
from etils.epath import backend as epath_backend
from etils.epath import gpath
from PIL import Image

from configs import cifar10
from lees_jax import ase, evaluate, experiment, files, report


class _MemoryBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  def fs(self, path):
    return fsspec.filesystem('memory')


@pytest.fixture
def gcs(monkeypatch):
  """A fake gs://bucket: returns the in-memory store ({path: file}), empty at the start."""
  fake = _MemoryBackend()
  real = gpath._GPath._backend  # pylint: disable=protected-access
  monkeypatch.setattr(gpath._GPath, '_backend',  # pylint: disable=protected-access
                      property(lambda p: fake if p._uri_scheme == 'gs' else real.fget(p)))
  mem = fsspec.filesystem('memory')
  mem.store.clear()
  mem.pseudo_dirs[:] = ['']
  yield mem.store
  mem.store.clear()


def _names(store, prefix):
  return sorted(k[len(prefix):].lstrip('/') for k in store if k.startswith(prefix))


# --- the module -------------------------------------------------------------------------------


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_read_write_list_and_copy(where, tmp_path, gcs):
  root = str(tmp_path / 'w') if where == 'local' else 'gs://bucket/w'
  p = files.join(root, 'a', 'x.json')
  files.write_json(p, {'v': np.float32(0.5), 'n': np.int64(3), 'arr': np.arange(2)})
  assert files.read_json(p) == {'v': 0.5, 'n': 3, 'arr': [0, 1]}
  assert files.read_text(p) == json.dumps({'v': 0.5, 'n': 3, 'arr': [0, 1]}, indent=1)
  assert files.listdir(files.join(root, 'a')) == ['x.json']  # no temporary sibling left
  assert files.isfile(p) and files.isdir(files.join(root, 'a')) and not files.isfile(files.join(root, 'a'))
  assert files.listdir(files.join(root, 'missing')) == []
  files.write_json(p, [1])  # overwrite
  assert files.read_json(p) == [1]

  lines = files.join(root, 'g.jsonl')
  for i in range(3):
    files.append_line(lines, json.dumps({'i': i}))
  assert files.read_json_lines(lines) == [{'i': 0}, {'i': 1}, {'i': 2}]

  files.save_npz(files.join(root, 's.npz'), mu=np.arange(3.0), tag=np.asarray('x'))
  z = files.load_npz(files.join(root, 's.npz'))
  np.testing.assert_array_equal(z['mu'], np.arange(3.0))
  assert str(z['tag']) == 'x'

  src = tmp_path / 'tree'
  (src / 'sub').mkdir(parents=True)
  (src / 'sub' / 'f.bin').write_bytes(b'\x00\x01')
  (src / 'top.txt').write_text('top')
  files.copy_tree(str(src), files.join(root, 'copy'), replace=True)
  assert files.listdir(files.join(root, 'copy')) == ['sub', 'top.txt']
  back = tmp_path / 'back'
  files.copy_tree(files.join(root, 'copy'), str(back))
  assert (back / 'sub' / 'f.bin').read_bytes() == b'\x00\x01' and (back / 'top.txt').read_text() == 'top'
  files.remove(p)
  assert not files.exists(p)
  files.remove(p)  # missing: nothing to do
  if where == 'gs':
    assert not os.path.exists('gs:') and not os.path.exists(os.path.join(os.getcwd(), 'gs:'))


def test_failed_write_keeps_the_old_file(tmp_path):
  p = str(tmp_path / 'r.json')
  files.write_json(p, {'old': 1})
  with pytest.raises(TypeError):
    files.write_json(p, {'new': object()})
  assert files.read_json(p) == {'old': 1} and os.listdir(tmp_path) == ['r.json']


def test_json_lines_skip_a_partial_last_line(tmp_path):
  p = tmp_path / 'h.jsonl'
  p.write_text('{"step": 1}\n{"step": 2}\n{"ste')
  assert files.read_json_lines(str(p)) == [{'step': 1}, {'step': 2}]
  assert experiment.read_history(str(p)) == [{'step': 1}, {'step': 2}]


# --- the modes on gs:// -----------------------------------------------------------------------


def test_ase_grid_file_resumes_on_gs(gcs):
  path = 'gs://bucket/w/ase_grid/grid.jsonl'
  points = ase.drop_grid((0, 2), (2 / 7,))
  evaluated = []

  def evaluate_point(p):
    evaluated.append(p.name)
    return {'fid': 10.0 - p.start, 'flop_fraction': 1.0 - p.start / 10, 'block_ratio': 1.0}

  ase.run_grid(points[:1], evaluate_point, path, log=lambda s: None)
  recs = ase.run_grid(points, evaluate_point, path, log=lambda s: None)
  assert evaluated == [points[0].name, points[1].name]  # the first point was read back
  assert files.read_json_lines(path) == recs
  # The one policy resolver reads the grid (and a pareto.json pick) from gs:// too.
  model = _tiny_model()
  assert evaluate.resolve_policy(f'ase_grid:{path}@0.85', model).policy.name == points[1].name
  files.write_json('gs://bucket/w/ase_grid/pareto.json', {'pick': recs[0]})
  pol = evaluate.resolve_policy('ase_grid:gs://bucket/w/ase_grid/pareto.json', model).policy
  np.testing.assert_array_equal(pol.matrix, ase.grid_policy(points[0], model.units).matrix)


def _tiny_model():
  from lees_jax import models
  return models.build_model(cifar10.get_config('tiny').model)


@pytest.mark.needs_fid_weights
def test_evaluate_writes_and_resumes_on_gs(tiny_backbone, gcs, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, 'clu', None)  # CLU's TF summary writer would go to real GCS
  c = cifar10.get_config('tiny')
  c.backbone = tiny_backbone
  c.eval.update(policies=('ase:ase_default',), seeds=(0,), num_samples=4, reference_split='test[:8]')
  w = 'gs://bucket/w'
  results = evaluate.evaluate(c, w)
  names = _names(gcs, 'gs://bucket/w/eval')
  assert names == ['gates_ase_default.png', f'ref_stats_{c.data.dataset}_test_8.npz', 'results.json',
                   'samples_ase_default.png']
  assert files.read_json(f'{w}/eval/results.json') == json.loads(json.dumps(results))
  png = Image.open(io.BytesIO(files.read_bytes(f'{w}/eval/samples_ase_default.png')))
  assert png.size[0] > 0
  monkeypatch.setattr(evaluate, 'generate', lambda *a, **k: pytest.fail('re-sampled a finished record'))
  assert evaluate.evaluate(c, w) == results


def _cell_records(k=3, steps=(999, 499, 0)):
  """Result records of a small finished study (2 seeds): B1, B2, LEES, A3."""
  names = [f'u{i}' for i in range(k)]
  recs = []
  for s in (0, 1):
    common = dict(seed=s, unit_names=names, timesteps=list(steps), num_timesteps=1000,
                  masks=[[1] * k] * len(steps), latency_ms_per_100=50.0 + s, images_per_s=2000.0,
                  num_samples=4, sampler='ddim', steps=len(steps))
    recs.append(dict(common, cell=f'b1_full_s{s}', group='baseline', label='B1 full', kind='full',
                     lam=None, form='hard', fid=30.0 + s, block_ratio=1.0, flop_fraction=1.0))
    recs.append(dict(common, cell=f'b2_ase_default_s{s}', group='baseline', label='B2 ASE-default',
                     kind='ase', lam=None, form='hard', fid=33.0 + 2 * s, block_ratio=0.7,
                     flop_fraction=0.75, masks=[[1, 1, 0]] * len(steps), latency_ms_per_100=40.0 + s))
    recs.append(dict(common, cell=f'lees_lam0.05_s{s}', group='lees', label='LEES λ=0.05', kind='lees',
                     lam=0.05, form='hard', fid=31.0 + s * 1.5, block_ratio=0.6, flop_fraction=0.62,
                     gate_alpha=[1.0, -2.0, 3.0], gate_beta=[0.5, 0.1, -1.0], gate_train_seconds=9.0,
                     gate_train_steps=4, converged_fraction=0.5, latency_ms_per_100=38.0 + s,
                     gate_convergence={'fractions': [0.5, 1.0], 'steps': [2, 4], 'kl': [0.3, 0.01],
                                       'stable': [0.5, 1.0]}))
  return recs


def test_experiment_summary_and_report_read_gs_like_local(gcs, tmp_path):
  c = cifar10.get_config('tiny')
  c.mode = 'experiment'
  c.experiment.update(lams=(0.05,), seeds=(0, 1), baselines=('full', 'ase_default'), ablations=())
  outputs = {}
  for w in (str(tmp_path / 'w'), 'gs://bucket/w'):
    for rec in _cell_records():
      files.write_json(files.join(experiment.cell_dir(w, rec['cell']), experiment.RESULT_FILE), rec)
      report.save_png(np.full((8, 8, 3), 200, np.uint8),
                      files.join(experiment.cell_dir(w, rec['cell']), 'samples.png'))
    files.write_text(files.join(experiment.cell_dir(w, 'a3_random_s0'), experiment.ERROR_FILE), 'Traceback')
    files.write_json(files.join(experiment.experiment_dir(w), experiment.OVERHEAD_FILE),
                     {'epoch_seconds': 100.0, 'steps_per_epoch': 10.0, 'step_seconds': 10.0,
                      'measured_steps': 1, 'batch_size': 4, 'device': 'cpu', 'num_devices': 1,
                      'train_examples': 40, 'dataset': 'cifar10'})
    assert [r['cell'] for r in experiment.load_cell_results(w)] == sorted(r['cell'] for r in _cell_records())
    assert experiment.cells.load_cell_errors(w) == {'a3_random_s0': 'Traceback'}
    summary = experiment.summarize(w, c)
    assert summary['failed_cells'] == ['a3_random_s0'] and summary['cells_finished'] == 6
    assert summary['training']['gate_train_over_backbone_epoch'] == pytest.approx(0.09)
    assert files.read_json(files.join(experiment.experiment_dir(w), experiment.SUMMARY_FILE)) == \
        json.loads(json.dumps(summary))
    md_path = report.write_report(w)
    outputs[w.split(':')[0]] = (summary, files.read_text(md_path),
                                files.listdir(files.join(w, 'report')))
  local, remote = outputs[str(tmp_path / 'w').split(':')[0]], outputs['gs']
  assert local == remote
  summary, md, listing = remote
  assert '| LEES λ=0.05 |' in md and 'a3_random_s0' in md
  assert {'report.md', 'pareto.png', 'convergence.png', 'samples_B1_full.png', 'gates_LEES_lam_0.05.png'} <= set(listing)
  assert _names(gcs, 'gs://bucket/w/report') == listing
