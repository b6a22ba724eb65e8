"""``config.mode=experiment``: the paper's CIFAR-10 study as one resumable grid of cells.

From a backbone checkpoint (``config.eval.backbone`` or ``config.gates.backbone``) and the
``config.experiment`` section, every *cell* is one (policy, seed):

  B1 full              every unit at every step
  B2 ASE-default       the ASE D3 schedule (lees_jax/ase.py)
  B3 ASE-grid          the drop-length grid's best schedule within a FLOP budget (see below)
  LEES λ=<lam>         gates trained with gates.lam=<lam>, hard, evaluated hard (one per lam)
  A1 soft              gates trained soft at main_lam, evaluated soft (every unit runs,
                       its output blended by g_k(t): no unit is skipped)
  A2 λ=0               gates trained hard without the compute term
  A3 random            random fixed gates (`policies.random_gate_params`) whose keep fraction is
                       the executed-block ratio of the LEES main_lam cell of the same seed

For seed s the gate training uses ``config.seed = s`` and every cell samples with seed s, so
cells of one seed are paired (same initial noise) for the paired t-tests.

Files (``W = workdir``):
  W/experiment/cells/<cell_id>/result.json   the finished cell (written atomically, last);
                                             a restart skips cells that have it
  W/experiment/cells/<cell_id>/error.txt     the traceback of a failed cell (retried on restart)
  W/experiment/cells/<cell_id>/gates/        the cell's train_gates workdir (resumable):
                                             gates.json, checkpoints, gates_history.jsonl
  W/experiment/cells/<cell_id>/samples.png   a grid of the cell's first samples
  W/experiment/ase_grid/                     the B3 grid (grid.jsonl, pareto.json, pareto.png)
  W/experiment/overhead.json                 one backbone training epoch, timed
  W/experiment/summary.json                  statistics (`summarize`, `lees_jax.stats`)
  W/report/report.md + PNGs                  the report (`lees_jax.report.write_report`)
Every file goes through `lees_jax.files` (atomic writes; W may be gs://).

Definitions (also stated in the report):
  * ΔFID (robustness, CIFAR-10-C at severity s): for each corruption c,
    ΔFID_c = FID(samples, C_c) − FID(samples, clean), where C_c are the first
    ``robustness_reference_size`` images of ``<robustness_dataset>/<c>_<s>`` split
    ``robustness_split`` and ``clean`` the same images uncorrupted (the same split and count of
    ``config.data``); ΔFID is the mean of ΔFID_c over the corruption list. The samples are the
    cell's own samples (the first ``robustness_num_samples`` of them), for every seed of
    ``robustness_seeds`` (default: all), identically for every policy. These Fréchet
    distances always use the 'svd' method (exact for covariances; it equals 'sqrtm' to ~1e-12
    for full-rank statistics) with each covariance decomposed once (`fid.Statistics.sqrt_eigh`).
  * Gate convergence: the gates are snapshotted at every logging step of gate training
    (``gates_history.jsonl``; step 0 is the initialisation alpha = beta = 0). Between two
    successive snapshots, KL = mean over units k and the sampler's timesteps t_i of
    KL(Bernoulli(g_k^new(t_i)) || Bernoulli(g_k^old(t_i))), the hard gate's execution
    probability being g = sigmoid(alpha t + beta) (clipped to [1e-6, 1 - 1e-6]). The
    convergence point is the first snapshot after which every successive KL is below
    ``kl_threshold``, as a fraction of the training steps.
  * Training overhead: gate-training wall time of each cell (the call that finished it,
    compilation and backbone loading included) against one backbone training epoch, estimated
    as ``steps_per_epoch * t_step`` with t_step the median of ``overhead_steps`` timed pretraining
    steps (after a compile step) of the same backbone at ``config.pretrain.batch_size`` on the
    same data and devices.
  * B3's FLOP budget: ``ase_budget > 0`` is used as given; otherwise it is the mean FLOP
    fraction of the LEES main_lam cells (a compute-matched ASE; if no grid schedule fits it,
    the cheapest schedule is taken and the report says so).

The harness knows nothing about the dataset or backbone: it takes the config, the backbone
path and policies; datasets come through `lees_jax.data` and TFDS names in the config.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
import traceback

import numpy as np

from lees_jax import files, robustness
from lees_jax import stats as stats_lib

EXPERIMENT_DIR = 'experiment'
CELLS_DIR = 'cells'
RESULT_FILE = 'result.json'
ERROR_FILE = 'error.txt'
HISTORY_FILE = 'gates_history.jsonl'
SUMMARY_FILE = 'summary.json'
OVERHEAD_FILE = 'overhead.json'
METRICS = ('fid', 'latency_ms_per_100', 'images_per_s', 'block_ratio', 'flop_fraction',
           'delta_fid', 'gate_train_seconds', 'kl_converged_fraction')
TTEST_METRICS = ('fid', 'latency_ms_per_100')


class CellsFailed(RuntimeError):
  """Some cells failed; the others finished and the report was written."""


# ---------------------------------------------------------------------------
# Cells.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
  id: str
  group: str          # 'baseline' | 'lees' | 'ablation'
  label: str          # e.g. 'B1 full', 'LEES λ=0.05', 'A1 soft'
  kind: str           # 'full' | 'ase' | 'ase_grid' | 'lees' | 'random'
  seed: int
  lam: float | None = None
  form: str = 'hard'  # gate training and evaluation form for kind 'lees'


def lees_label(lam: float) -> str:
  return f'LEES λ={lam:g}'


def plan_cells(ex) -> list[Cell]:
  """The grid, in run order: per seed B1, B2, LEES λ sweep, A1, A2, A3; then every B3 cell
  (its budget may depend on all LEES cells)."""
  lams = [float(x) for x in ex.lams]
  main = float(ex.main_lam)
  unknown_b = set(ex.baselines) - {'full', 'ase_default', 'ase_grid'}
  unknown_a = set(ex.ablations) - {'soft', 'lam0', 'random'}
  if unknown_b or unknown_a:
    raise ValueError(f'unknown experiment.baselines {sorted(unknown_b)} / ablations {sorted(unknown_a)}; '
                     "choose from ('full', 'ase_default', 'ase_grid') and ('soft', 'lam0', 'random')")
  if not ex.seeds:
    raise ValueError('experiment.seeds is empty')
  if ('random' in ex.ablations or 'soft' in ex.ablations) and main not in lams:
    raise ValueError(f'experiment.main_lam={main:g} must be one of experiment.lams {lams} '
                     '(A1 and A3 are defined relative to it)')
  cells = []
  for s in (int(x) for x in ex.seeds):
    if 'full' in ex.baselines:
      cells.append(Cell(f'b1_full_s{s}', 'baseline', 'B1 full', 'full', s))
    if 'ase_default' in ex.baselines:
      cells.append(Cell(f'b2_ase_default_s{s}', 'baseline', 'B2 ASE-default', 'ase', s))
    for lam in lams:
      cells.append(Cell(f'lees_lam{lam:g}_s{s}', 'lees', lees_label(lam), 'lees', s, lam, 'hard'))
    if 'soft' in ex.ablations:
      cells.append(Cell(f'a1_soft_s{s}', 'ablation', 'A1 soft', 'lees', s, main, 'soft'))
    if 'lam0' in ex.ablations:
      cells.append(Cell(f'a2_lam0_s{s}', 'ablation', 'A2 λ=0', 'lees', s, 0.0, 'hard'))
    if 'random' in ex.ablations:
      cells.append(Cell(f'a3_random_s{s}', 'ablation', 'A3 random', 'random', s, main))
  if 'ase_grid' in ex.baselines:
    for s in (int(x) for x in ex.seeds):
      cells.append(Cell(f'b3_ase_grid_s{s}', 'baseline', 'B3 ASE-grid', 'ase_grid', s))
  return cells


def label_order(ex) -> list[str]:
  """Labels in table order (B1, B2, B3, LEES sweep, A1, A2, A3), restricted to the config."""
  out = [l for b, l in (('full', 'B1 full'), ('ase_default', 'B2 ASE-default'),
                        ('ase_grid', 'B3 ASE-grid')) if b in ex.baselines]
  out += [lees_label(float(x)) for x in ex.lams]
  out += [l for a, l in (('soft', 'A1 soft'), ('lam0', 'A2 λ=0'), ('random', 'A3 random'))
          if a in ex.ablations]
  return out


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def experiment_dir(workdir: str) -> str:
  return files.join(workdir, EXPERIMENT_DIR)


def cell_dir(workdir: str, cell_id: str) -> str:
  return files.join(experiment_dir(workdir), CELLS_DIR, cell_id)


def _cell_file(workdir: str, cell_id: str, name: str) -> str:
  return files.join(cell_dir(workdir, cell_id), name)


def load_cell_results(workdir: str) -> list[dict]:
  """Every finished cell's record (any cell directory with a result.json), sorted by id."""
  names = files.listdir(files.join(experiment_dir(workdir), CELLS_DIR))
  return [files.read_json(_cell_file(workdir, n, RESULT_FILE)) for n in names
          if files.isfile(_cell_file(workdir, n, RESULT_FILE))]


def load_cell_errors(workdir: str) -> dict[str, str]:
  """The tracebacks of failed cells (an error.txt and no result.json), by cell id."""
  names = files.listdir(files.join(experiment_dir(workdir), CELLS_DIR))
  return {n: files.read_text(_cell_file(workdir, n, ERROR_FILE)) for n in names
          if files.isfile(_cell_file(workdir, n, ERROR_FILE))
          and not files.isfile(_cell_file(workdir, n, RESULT_FILE))}


# ---------------------------------------------------------------------------
# Summary (its statistics: `lees_jax.stats`).
# ---------------------------------------------------------------------------


def summarize(workdir: str, config=None) -> dict:
  """Statistics from the cells' result files only; writes W/experiment/summary.json."""
  ex = config.experiment if config is not None else None
  results = load_cell_results(workdir)
  groups = stats_lib.by_label(results)
  order = label_order(ex) if ex is not None else []
  labels = order + sorted(l for l in groups if l not in order)
  main_label = lees_label(float(ex.main_lam)) if ex is not None else _guess_main(groups)
  per_label = stats_lib.per_label_stats(groups, labels, METRICS)
  ttests = stats_lib.ttests_vs(groups, labels, main_label, TTEST_METRICS)

  overhead_path = files.join(experiment_dir(workdir), OVERHEAD_FILE)
  overhead = files.read_json(overhead_path) if files.isfile(overhead_path) else None
  gate_seconds = stats_lib.mean_std([r.get('gate_train_seconds') for r in groups.get(main_label, [])])
  training = {'backbone_epoch': overhead, 'gate_train_seconds_main': gate_seconds}
  if overhead and gate_seconds['mean'] is not None and overhead.get('epoch_seconds'):
    training['gate_train_over_backbone_epoch'] = gate_seconds['mean'] / overhead['epoch_seconds']

  first = results[0] if results else {}
  summary = {
      'main_label': main_label, 'labels': labels, 'per_label': per_label,
      'ttests_vs_main': ttests, 'training': training,
      'cells_finished': len(results), 'failed_cells': sorted(load_cell_errors(workdir)),
      'run': {k: first.get(k) for k in ('num_samples', 'reference', 'reference_count', 'sampler',
                                         'steps', 'device', 'num_devices', 'dtype',
                                         'latency_batch', 'fid_method')},
  }
  if ex is not None:
    summary['run'].update(seeds=[int(s) for s in ex.seeds], lams=[float(x) for x in ex.lams],
                          main_lam=float(ex.main_lam), kl_threshold=float(ex.kl_threshold),
                          robustness=bool(ex.robustness), severity=int(ex.severity),
                          corruptions=list(ex.corruptions),
                          robustness_reference_size=int(ex.robustness_reference_size),
                          robustness_dataset=ex.robustness_dataset)
  grid_pick = files.join(experiment_dir(workdir), 'ase_grid', 'pareto.json')
  if files.isfile(grid_pick):
    summary['ase_grid'] = files.read_json(grid_pick)
  files.write_json(files.join(experiment_dir(workdir), SUMMARY_FILE), summary)
  return summary


def _guess_main(groups) -> str:
  lees = sorted(l for l in groups if l.startswith('LEES'))
  return lees_label(0.05) if lees_label(0.05) in groups else (lees[0] if lees else lees_label(0.05))


def read_history(path: str) -> list[dict]:
  """Snapshots by step (a restarted run re-logs some steps: the last record wins)."""
  by_step = {int(rec['step']): rec for rec in files.read_json_lines(path)}
  return [by_step[s] for s in sorted(by_step)]


# ---------------------------------------------------------------------------
# Running the grid.
# ---------------------------------------------------------------------------


def _cell_config(config, cell: Cell, backbone: str):
  cfg = config.copy_and_resolve_references()
  cfg.seed = int(cell.seed)
  cfg.gates.lam = float(cell.lam)
  cfg.gates.form = cell.form
  cfg.gates.backbone = backbone
  return cfg


def train_cell_gates(config, cell: Cell, gates_dir: str, backbone: str) -> dict:
  """Trains (or resumes, or reuses) the cell's gates; returns timing and the gates summary.

  Runs `train.train` on `train.gates_objective` -- exactly ``config.mode=train_gates`` -- with
  one addition: the gate parameters of every logging step go to ``gates_history.jsonl``.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from lees_jax import train  # pylint: disable=g-import-not-at-top
  cfg = _cell_config(config, cell, backbone)
  timing_path = files.join(gates_dir, 'train_time.json')
  gates_path = files.join(gates_dir, train.GATES_FILE)
  objective = train.gates_objective(cfg)
  if files.isfile(gates_path) and files.isfile(timing_path) and \
      files.read_json(gates_path).get('step') == objective.num_train_steps:
    return dict(files.read_json(timing_path), gates=files.read_json(gates_path),
                num_train_steps=objective.num_train_steps)
  history_path = files.join(gates_dir, HISTORY_FILE)
  base_scalars = objective.host_scalars

  def host_scalars(state):
    out = base_scalars(state)
    if jax.process_index() == 0:
      p = jax.device_get(state['params'])
      files.append_line(history_path, json.dumps({'step': int(state['step']),
                                                  'alpha': [float(x) for x in np.asarray(p['alpha'])],
                                                  'beta': [float(x) for x in np.asarray(p['beta'])]}))
    return out

  objective = dataclasses.replace(objective, host_scalars=host_scalars)
  t0 = time.perf_counter()
  train.train(cfg, gates_dir, objective)
  seconds = time.perf_counter() - t0
  timing = {'gate_train_seconds': seconds, 'gate_train_device': str(jax.devices()[0].device_kind)}
  files.write_json(timing_path, timing)
  return dict(timing, gates=files.read_json(gates_path), num_train_steps=objective.num_train_steps)


def time_backbone_epoch(config, num_steps: int) -> dict:
  """One backbone training epoch, estimated from ``num_steps`` timed pretraining steps."""
  import jax  # pylint: disable=g-import-not-at-top

  from lees_jax import data, train  # pylint: disable=g-import-not-at-top
  objective = train.pretrain_objective(config)
  mesh = data.make_mesh()
  batch_size = int(config.pretrain.batch_size)
  data.check_batch_size(batch_size, mesh)
  state = train.init_state(objective, jax.random.PRNGKey(0), mesh)
  frozen = data.replicate(objective.frozen, mesh)
  key = data.replicate(jax.device_get(jax.random.PRNGKey(1)), mesh)
  step_fn = train.make_train_step(objective, mesh)
  batches = data.train_iterator(config.data, global_batch_size=batch_size, seed=0,
                                random_flip=objective.random_flip)
  t0 = time.perf_counter()
  state, metrics = step_fn(state, frozen, data.shard_batch(next(batches), mesh), key)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - t0
  times = []
  for _ in range(max(1, num_steps)):
    batch = data.shard_batch(next(batches), mesh)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, frozen, batch, key)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_seconds = statistics.median(times)
  n_train = data.num_examples(config.data)
  steps_per_epoch = n_train / batch_size
  return {'step_seconds': step_seconds, 'measured_steps': len(times), 'batch_size': batch_size,
          'train_examples': n_train, 'steps_per_epoch': steps_per_epoch,
          'epoch_seconds': steps_per_epoch * step_seconds, 'first_step_seconds': compile_seconds,
          'device': str(jax.devices()[0].device_kind), 'num_devices': jax.device_count(),
          'dataset': config.data.dataset,
          'method': 'steps_per_epoch x median time of one pretraining step (data loading '
                    'included, compile step excluded)'}


class _Runner:
  """Shared state of one experiment run: evaluator, compiled programs, ASE grid pick."""

  def __init__(self, config, workdir: str):
    from lees_jax import evaluate  # pylint: disable=g-import-not-at-top
    self.config = config
    self.ex = config.experiment
    self.workdir = workdir
    self.out = experiment_dir(workdir)
    eval_config = config
    if self.ex.reference_split or self.ex.latency_repeats > 0:
      eval_config = config.copy_and_resolve_references()
      if self.ex.reference_split:
        eval_config.eval.reference_split = self.ex.reference_split
      if self.ex.latency_repeats > 0:
        eval_config.eval.latency_repeats = int(self.ex.latency_repeats)
    self.evaluator = evaluate.Evaluator(eval_config, self.out, fid_method=self.ex.fid_method)
    self.backbone = self.evaluator.backbone_path
    self.num_samples = int(self.ex.num_samples) if self.ex.num_samples > 0 else int(config.eval.num_samples)
    self.programs = {}
    self.robustness = robustness.Robustness(config, self.evaluator,
                                            files.join(self.out, 'robustness_refs')) \
        if self.ex.robustness else None
    self._grid_pick = None

  # -- policies --------------------------------------------------------------

  def policy_spec(self, cell: Cell, cdir: str, rec_extra: dict) -> str:
    """The cell's policy as an `evaluate.resolve_policy` spec, after what it needs: the B3
    grid's pick, the main LEES cell's block ratio (A3) or the cell's trained gates (LEES)."""
    if cell.kind == 'full':
      return 'full'
    if cell.kind == 'ase':
      return 'ase:ase_default'
    if cell.kind == 'ase_grid':
      rec_extra['ase_grid_pick'] = self.ase_grid_pick()
      return 'ase_grid:' + files.join(self.out, 'ase_grid', 'pareto.json')
    if cell.kind == 'random':
      main = _cell_file(self.workdir, f'lees_lam{cell.lam:g}_s{cell.seed}', RESULT_FILE)
      if not files.isfile(main):
        raise RuntimeError(f'A3 random gates take their keep fraction from the LEES λ={cell.lam:g} '
                           f'cell of seed {cell.seed}, which has not finished (see its error.txt)')
      keep = float(files.read_json(main)['block_ratio'])
      rec_extra['random_keep_fraction'] = keep
      return f'random:{keep!r}:{int(cell.seed)}'  # repr: the float round-trips exactly
    if cell.kind == 'lees':
      gates_dir = files.join(cdir, 'gates')
      info = train_cell_gates(self.config, cell, gates_dir, self.backbone)
      g = info['gates']
      hist = read_history(files.join(gates_dir, HISTORY_FILE))
      conv = stats_lib.gate_convergence(hist, self.evaluator.solver.timesteps, g['num_timesteps'],
                                        info['num_train_steps'], float(self.ex.kl_threshold))
      rec_extra.update(gate_train_seconds=info['gate_train_seconds'],
                       gate_train_steps=info['num_train_steps'], gates_dir=gates_dir,
                       gate_alpha=g['alpha'], gate_beta=g['beta'],
                       gates_executed_block_ratio=g['executed_block_ratio'],
                       gate_convergence=conv, kl_converged_fraction=conv['converged_fraction'])
      return f'{"lees_soft" if cell.form == "soft" else "lees"}:{gates_dir}'
    raise ValueError(f'unknown cell kind {cell.kind!r}')

  def _resolved(self, cell: Cell, cdir: str, rec_extra: dict):
    """(resolved policy named as the records name it, key of its reusable program or None)."""
    from lees_jax import evaluate  # pylint: disable=g-import-not-at-top
    spec = self.policy_spec(cell, cdir, rec_extra)
    names = {'full': 'full', 'ase': 'ase_default', 'ase_grid': 'ase_grid'}
    if cell.kind == 'random':
      name = f'random_{rec_extra["random_keep_fraction"]:.3f}_s{cell.seed}'
    else:
      name = names.get(cell.kind, cell.id)
    resolved = evaluate.resolve_policy(spec, self.evaluator.model, name=name)
    rec_extra['policy_spec'] = spec
    if cell.kind == 'random':
      rec_extra.update(gate_alpha=resolved.policy.alpha.tolist(),
                       gate_beta=resolved.policy.beta.tolist())
    # Fixed policies compile once per run; gates differ per cell.
    return resolved, (spec if cell.kind in names else None)

  def ase_grid_pick(self) -> dict:
    """Runs the B3 grid once (resumable, W/experiment/ase_grid) and picks within the budget."""
    if self._grid_pick is not None:
      return self._grid_pick
    from lees_jax import ase, evaluate, report  # pylint: disable=g-import-not-at-top
    out = files.join(self.out, 'ase_grid')
    files.makedirs(out)
    cfg = self.config

    def evaluate_point(point):
      resolved = evaluate.ResolvedPolicy(point.name, ase.grid_policy(point, self.evaluator.model.units))
      rec, _, _ = self.evaluator.run(resolved, int(cfg.ase.grid_seed), cfg.ase.grid_num_samples,
                                     time_it=False)
      return rec

    records = ase.run_grid(ase.drop_grid(cfg.ase.grid_starts, cfg.ase.grid_finals), evaluate_point,
                           files.join(out, 'grid.jsonl'))
    budget = float(self.ex.ase_budget)
    source = 'experiment.ase_budget'
    if budget <= 0:
      main = [r for r in load_cell_results(self.workdir) if r['label'] == lees_label(float(self.ex.main_lam))]
      if main:
        budget = statistics.fmean(r['flop_fraction'] for r in main)
        source = f'mean FLOP fraction of the {len(main)} {lees_label(float(self.ex.main_lam))} cell(s)'
      else:
        budget = float(cfg.eval.ase_budget)
        source = f'config.eval.ase_budget (no finished {lees_label(float(self.ex.main_lam))} cell)'
    note = ''
    try:
      pick = ase.pick_for_budget(records, budget)
    except ValueError:
      pick = min(records, key=lambda r: (r['flop_fraction'], r['fid']))
      note = (f'no grid schedule fits the FLOP budget {budget:.3f}; took the cheapest one '
              f'({pick["flop_fraction"]:.3f})')
      print(f'B3: {note}')
    front = ase.pareto_front(records)
    files.write_json(files.join(out, 'pareto.json'),
                     {'pareto': front, 'budget': budget, 'budget_source': source, 'note': note,
                      'pick': pick, 'grid_num_samples': int(cfg.ase.grid_num_samples),
                      'grid_seed': int(cfg.ase.grid_seed)})
    report.save_png(report.pareto_plot(records, front, pick), files.join(out, 'pareto.png'))
    self._grid_pick = dict(pick, budget=budget, budget_source=source, note=note)
    return self._grid_pick

  # -- one cell --------------------------------------------------------------

  def run_cell(self, cell: Cell) -> dict:
    from lees_jax import report  # pylint: disable=g-import-not-at-top
    cdir = cell_dir(self.workdir, cell.id)
    files.makedirs(cdir)
    t_cell = time.perf_counter()
    extra: dict = {}
    resolved, cache_key = self._resolved(cell, cdir, extra)
    t_eval = time.perf_counter()
    program = self.programs.get(cache_key) if cache_key else None
    rec, images, program = self.evaluator.run(resolved, cell.seed, self.num_samples, program=program)
    if cache_key:
      self.programs[cache_key] = program
    eval_seconds = time.perf_counter() - t_eval
    sample_stats = self.evaluator.last_sample_stats
    t_rob = time.perf_counter()
    if self.robustness is not None and (not self.ex.robustness_seeds or
                                        cell.seed in tuple(self.ex.robustness_seeds)):
      rob = self.robustness.delta_fid(sample_stats, images, self.evaluator.extractor)
      rec.update(robustness=rob, delta_fid=rob['delta_fid'])
    rob_seconds = time.perf_counter() - t_rob
    report.save_png(report.image_grid(images[:max(1, min(int(self.ex.sample_grid), len(images)))]),
                    files.join(cdir, 'samples.png'))
    rec.update(extra)
    rec.update(cell=cell.id, group=cell.group, label=cell.label, kind=cell.kind, lam=cell.lam,
               form=cell.form, seed=int(cell.seed), fid_method=self.ex.fid_method,
               masks=np.asarray(program.masks, int).tolist(),
               timesteps=[int(t) for t in self.evaluator.solver.timesteps],
               num_timesteps=int(self.config.diffusion.num_timesteps),
               unit_names=[u.name for u in self.evaluator.model.units], backbone=self.backbone,
               seconds={'total': time.perf_counter() - t_cell, 'evaluate': eval_seconds,
                        'robustness': rob_seconds,
                        'gate_training': extra.get('gate_train_seconds', 0.0)})
    files.write_json(files.join(cdir, RESULT_FILE), rec)
    return rec


def _cell_done(workdir: str, cell: Cell) -> bool:
  return files.isfile(_cell_file(workdir, cell.id, RESULT_FILE))


def experiment(config, workdir: str, *, after_cell=None) -> dict:
  """``config.mode=experiment``: runs the missing cells, then writes summary.json and the report.

  ``after_cell(cell, record_or_None)`` is called after each cell (tests use it to stop a run).
  Raises `CellsFailed` (after writing the summary and the report) if any cell failed.
  """
  from lees_jax import report  # pylint: disable=g-import-not-at-top
  ex = config.experiment
  cells = plan_cells(ex)
  files.makedirs(experiment_dir(workdir))
  if not ex.report_only:
    if not (config.eval.backbone or config.gates.backbone):
      raise ValueError('config.mode=experiment needs a backbone: pass --config.gates.backbone=<a pretrain '
                       'workdir or a converted checkpoint directory> (see README, "The study")')
    todo = [c for c in cells if not _cell_done(workdir, c)]
    print(f'experiment: {len(cells)} cells, {len(cells) - len(todo)} finished earlier, '
          f'{len(todo)} to run; workdir {workdir}', flush=True)
    if todo:
      from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
      for name in data_prep.config_datasets(config):  # all data first: fail before hours of work
        data_prep.prepare(name, config.data.data_dir or None)
      runner = _Runner(config, workdir)
      overhead_path = files.join(experiment_dir(workdir), OVERHEAD_FILE)
      if ex.overhead_steps > 0 and not files.isfile(overhead_path):
        try:
          t0 = time.perf_counter()
          files.write_json(overhead_path, time_backbone_epoch(config, int(ex.overhead_steps)))
          print(f'backbone epoch timed in {time.perf_counter() - t0:.1f}s: '
                f'{files.read_json(overhead_path)["epoch_seconds"]:.1f}s per epoch', flush=True)
        except Exception:  # pylint: disable=broad-except
          print('timing a backbone epoch failed (the report will lack it):\n' + traceback.format_exc())
      t_start = time.perf_counter()
      for n, cell in enumerate(todo, 1):
        error_path = _cell_file(workdir, cell.id, ERROR_FILE)
        files.remove(error_path)
        print(f'\n=== [cell {n}/{len(todo)}] {cell.id} ({cell.label}, seed {cell.seed}) ===', flush=True)
        t0 = time.perf_counter()
        try:
          rec = runner.run_cell(cell)
        except Exception:  # pylint: disable=broad-except  -- one failed cell must not stop the grid
          tb = traceback.format_exc()
          files.write_text(error_path, tb)
          print(f'cell {cell.id} FAILED ({time.perf_counter() - t0:.1f}s); traceback in '
                f'{error_path}:\n{tb}', flush=True)
          rec = None
        else:
          extra = f'  ΔFID {rec["delta_fid"]:+.3f}' if rec.get('delta_fid') is not None else ''
          print(f'cell {cell.id}: FID {rec["fid"]:.3f}  {rec["latency_ms_per_100"]:.1f} ms/100  '
                f'blocks {rec["block_ratio"]:.1%}  FLOPs {rec["flop_fraction"]:.1%}{extra}  '
                f'({time.perf_counter() - t0:.1f}s; {time.perf_counter() - t_start:.0f}s so far)',
                flush=True)
        if after_cell is not None:
          after_cell(cell, rec)
  summary = summarize(workdir, config)
  path = report.write_report(workdir)
  print(f'\nsummary: {files.join(experiment_dir(workdir), SUMMARY_FILE)}\nreport: {path}')
  print_summary(summary)
  planned = {c.id for c in cells}
  failed = [c for c in summary['failed_cells'] if c in planned]
  if failed:
    raise CellsFailed(f'{len(failed)} cell(s) failed: {", ".join(failed)} (tracebacks in '
                      f'{files.join(experiment_dir(workdir), CELLS_DIR)}/<cell>/{ERROR_FILE}); '
                      'the other cells finished and the report shows them. Fix the cause and rerun '
                      'the same command: finished cells are kept.')
  return summary


def print_summary(summary: dict):
  def fmt(d, p=3):
    if d['mean'] is None:
      return '—'
    return f'{d["mean"]:.{p}f}' + (f'±{d["std"]:.{p}f}' if d['std'] is not None else '')

  print(f'\n{"policy":<18} {"n":>2} {"FID":>16} {"ms/100":>16} {"blocks":>8} {"FLOPs":>8}')
  for label in summary['labels']:
    e = summary['per_label'][label]
    if not e['fid']['n']:
      continue
    print(f'{label:<18} {e["fid"]["n"]:>2} {fmt(e["fid"]):>16} {fmt(e["latency_ms_per_100"], 1):>16} '
          f'{e["block_ratio"]["mean"]:>8.1%} {e["flop_fraction"]["mean"]:>8.1%}')
