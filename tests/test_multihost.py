"""Two JAX processes on this machine, joined by ``jax.distributed.initialize`` over a localhost
coordinator (CPU collectives through gloo), each with two host devices, against one process with
four devices: LEES gate training, evaluation and a small study on the ``tiny`` preset.

The oracle is the single-process run: the same global batches (each process reads only its
own rows), the same gradients (an all-reduce over four devices either way) and so the same
gates; the same samples (each batch sharded over the four devices either way, gathered for FID)
and so the same FIDs; and only process 0 writes results (every `lees_jax.files` write that
reaches the disk is logged per process).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600  # seconds for a whole run: a stuck coordinator must not hang the suite

_CHILD = r"""
import json, os, sys
pid, nproc, port, workdir, backbone, log, steps, die_at, mode = sys.argv[1:]
pid, nproc, steps, die_at = int(pid), int(nproc), int(steps), int(die_at)
import jax
if nproc > 1:
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=nproc,
                             process_id=pid, initialization_timeout=120)
assert jax.device_count() == 4 and jax.process_count() == nproc, (jax.devices(), nproc)
import numpy as np
from configs import cifar10
from lees_jax import data, files, main
writes, rows = [], []
for name in ('write_json', 'write_text', 'write_bytes', 'save_npz', 'append_line'):
  real = getattr(files, name)
  def logged(path, *a, _real=real, _name=name, **k):
    if files.is_writer():  # a call on another process writes nothing (the file layer's rule)
      writes.append([_name, str(path)])
    return _real(path, *a, **k)
  setattr(files, name, logged)
real_iterator = data.train_iterator
def recording_iterator(*a, **k):
  for batch in real_iterator(*a, **k):
    rows.append([float(v) for v in batch['image'].reshape(len(batch['image']), -1).sum(1)])
    yield batch
data.train_iterator = recording_iterator
if die_at and pid == nproc - 1:  # the last process dies right after its step-`die_at` save
  from lees_jax import train
  real_save = train._save
  def save_then_die(manager, state, step):
    real_save(manager, state, step)
    if step == die_at:
      os._exit(3)
  train._save = save_then_die
c = cifar10.get_config('tiny')
c.backbone = backbone
c.gates.update(num_train_steps=steps, batch_size=8, checkpoint_every=2, log_every=100,
               heatmap_every=0)
c.eval.update(num_samples=8, latency_repeats=1, policies=('full', 'ase:ase_default'))
c.experiment.update(lams=(0.05,), flop_weighted_lams=(), seeds=(0,), ase_finetuned=False,
                    baselines=('full',), ablations=('random',), overhead_steps=0, sample_grid=4)
for c.mode in mode.split(','):  # e.g. 'evaluate,experiment': one process start, one FID network
  main.run_mode(c, workdir)
json.dump({'writes': writes, 'rows': rows, 'process_index': jax.process_index()}, open(log, 'w'))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('JAX_COORDINATOR_ADDRESS', None)
  return env


def _run(tmp_path, name: str, nproc: int, backbone: str, *, steps: int = 3, die_at: int = 0,
         mode: str = 'train_gates'):
  """Runs train_gates in ``nproc`` processes. With ``die_at``, the last process exits after its
  step-``die_at`` checkpoint and the others (then stuck in a collective) are killed, as a host
  failure leaves a pod slice."""
  workdir, port = str(tmp_path / name), _free_port()
  logs = [str(tmp_path / f'{name}_{i}_{die_at}.json') for i in range(nproc)]
  procs = [subprocess.Popen([sys.executable, '-c', _CHILD, str(i), str(nproc), str(port),
                             workdir, backbone, logs[i], str(steps), str(die_at), mode], cwd=REPO,
                            env=_env(4 // nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(nproc)]
  try:
    if die_at:
      assert procs[-1].wait(timeout=TIMEOUT) == 3, procs[-1].communicate()[0][-4000:]
      for p in procs[:-1]:
        p.kill()
      return workdir, None
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.communicate()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f'process {i} of {nproc} failed:\n{out[-4000:]}'
  return workdir, [json.load(open(log)) for log in logs]


def test_two_processes_train_the_same_gates_as_one(tiny_backbone, tmp_path):
  one_dir, (one,) = _run(tmp_path, 'one', 1, tiny_backbone)
  two_dir, (p0, p1) = _run(tmp_path, 'two', 2, tiny_backbone)

  # Each process read its own half of every global batch: together, the one process's rows.
  for step, whole in enumerate(one['rows']):
    assert p0['rows'][step] + p1['rows'][step] == whole
    assert len(p0['rows'][step]) == len(p1['rows'][step]) == len(whole) // 2

  # The same gates (the gradient is an all-reduce over the same four shards either way).
  g1 = json.load(open(os.path.join(one_dir, 'gates.json')))
  g2 = json.load(open(os.path.join(two_dir, 'gates.json')))
  np.testing.assert_allclose(g2['alpha'], g1['alpha'], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(g2['beta'], g1['beta'], rtol=1e-6, atol=1e-7)

  # Only process 0 wrote results; process 1 wrote nothing through the file layer.
  assert p0['process_index'] == 0 and p1['process_index'] == 1
  assert any(path.endswith('gates.json') for _, path in p0['writes'])
  assert p1['writes'] == []
  events = [f for f in os.listdir(two_dir) if f.startswith('events.out.tfevents')]
  assert len(events) == 1, events  # one TensorBoard writer: process 0's


def test_a_host_lost_mid_run_resumes_to_the_same_gates(tiny_backbone, tmp_path):
  """One of the two processes dies after the step-4 checkpoint; both restart and finish: the
  gates equal those of an uninterrupted two-process run."""
  straight_dir, _ = _run(tmp_path, 'straight', 2, tiny_backbone, steps=6)
  killed_dir, _ = _run(tmp_path, 'killed', 2, tiny_backbone, steps=6, die_at=4)
  assert not os.path.exists(os.path.join(killed_dir, 'gates.json'))
  steps = os.listdir(os.path.join(killed_dir, 'checkpoints', 'train_gates'))
  assert '4' in steps, steps
  _, (p0, _) = _run(tmp_path, 'killed', 2, tiny_backbone, steps=6)
  assert len(p0['rows']) == 2  # resumed at step 4: two more batches read
  g = json.load(open(os.path.join(straight_dir, 'gates.json')))
  r = json.load(open(os.path.join(killed_dir, 'gates.json')))
  assert r['alpha'] == g['alpha'] and r['beta'] == g['beta']


def _results(workdir):
  return {r['policy']: r for r in json.load(open(os.path.join(workdir, 'eval', 'results.json')))}


def test_two_processes_evaluate_and_run_the_study_as_one(tiny_backbone, tmp_path):
  """``evaluate`` (full, ASE) and then a small study (B1, LEES λ = 0.05 with its gates trained
  across both processes, A3 random gates at its ratio) in two processes: samples sharded over
  both processes' devices and gathered for FID give the same FIDs and masks as one process;
  process 0 alone writes results, summaries, pictures and the report."""
  from lees_jax import cells
  modes = 'evaluate,experiment'
  one_dir, _ = _run(tmp_path, 'one', 1, tiny_backbone, steps=2, mode=modes)
  two_dir, (p0, p1) = _run(tmp_path, 'two', 2, tiny_backbone, steps=2, mode=modes)
  assert p1['writes'] == []
  assert any(p.endswith('results.json') for _, p in p0['writes'])
  assert any(p.endswith('.png') for _, p in p0['writes'])

  one, two = _results(one_dir), _results(two_dir)
  assert sorted(one) == sorted(two) == ['ase_default', 'full']
  for name in one:
    np.testing.assert_allclose(two[name]['fid'], one[name]['fid'], rtol=1e-5)
    assert two[name]['block_ratio'] == one[name]['block_ratio']
    assert two[name]['num_devices'] == 4 and two[name]['reference_count'] == 64

  assert os.path.isfile(os.path.join(two_dir, 'report', 'report.md'))
  summary = json.load(open(os.path.join(two_dir, 'experiment', 'summary.json')))
  assert summary['cells_finished'] == 3 and summary['failed_cells'] == []
  cells_one = {r['cell']: r for r in cells.load_cell_results(one_dir)}
  cells_two = {r['cell']: r for r in cells.load_cell_results(two_dir)}
  assert sorted(cells_one) == sorted(cells_two) and len(cells_one) == 3
  for cell, r in cells_one.items():
    np.testing.assert_allclose(cells_two[cell]['fid'], r['fid'], rtol=1e-5)
    assert cells_two[cell]['masks'] == r['masks']


def test_robustness_refuses_several_processes_with_what_to_do(monkeypatch):
  """ΔFID feeds host arrays to the sampler: on several processes it stops before any work."""
  import jax
  from configs import cifar10
  from lees_jax import robustness
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='robustness measure runs in one process .*robustness=False'):
    robustness.Robustness(cifar10.get_config('tiny'), evaluator=None, out_dir='/nonexistent')
