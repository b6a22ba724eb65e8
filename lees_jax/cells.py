"""The study's grid and its files: which cells a config plans, where each cell's files are,
and the summary built from those files alone (statistics: `lees_jax.stats`).

`lees_jax.experiment` runs the cells; `lees_jax.report` and ``--config.experiment.report_only``
read what is here, so any table can be rebuilt from the workdir.
"""

from __future__ import annotations

import dataclasses

from lees_jax import files
from lees_jax import stats as stats_lib

EXPERIMENT_DIR = 'experiment'
CELLS_DIR = 'cells'
RESULT_FILE = 'result.json'
ERROR_FILE = 'error.txt'
HISTORY_FILE = 'gates_history.jsonl'
SUMMARY_FILE = 'summary.json'
OVERHEAD_FILE = 'overhead.json'
ASE_SCHEDULES_FILE = 'ase_schedules.json'  # Table 5's rows as run (`ase.table5_as_run`)
METRICS = ('fid', 'latency_ms_per_100', 'images_per_s', 'block_ratio', 'flop_fraction',
           'delta_fid', 'gate_train_seconds', 'converged_fraction')
TTEST_METRICS = ('fid', 'latency_ms_per_100')


class CellsFailed(RuntimeError):
  """Some cells failed; the others finished and the report was written."""


# ---------------------------------------------------------------------------
# Cells.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
  id: str
  group: str          # 'baseline' | 'lees' | 'ablation' | 'few_step'
  label: str          # e.g. 'B1 full', 'LEES λ=0.05', 'A1 soft'
  kind: str           # 'full' | 'ase' | 'ase_grid' | 'ase_ft' | 'lees' | 'random' | 'spec'
  seed: int
  lam: float | None = None
  form: str = 'hard'        # kind 'lees': the form the gates are applied with at sampling;
                            # kind 'ase_ft': the baseline whose schedule is fine-tuned
  train_form: str = 'hard'  # kind 'lees': the form they are trained with
  regularizer: str = 'mean'  # kind 'lees': the compute term (see `objectives.lees_gates`)
  schedule: str = 'ase_default'  # kind 'ase': the ASE schedule (B2's, or a Table 5 row)
  spec: str = ''      # kind 'spec': the `evaluate.resolve_policy` spec (experiment.extra_policies)
  # A few-step cell's solver (experiment.few_step); '' / 0: the configured config.sampler.
  sampler: str = ''
  steps: int = 0
  gate_timesteps: str = 'uniform'  # kind 'lees': config.gates.timesteps of its gate training
  gates_from: str = ''  # kind 'lees': the cell whose gates it applies (none of its own trained)


BASELINES = ('full', 'ase_default', 'ase_grid')
# A1: the main λ's (hard-trained) gates applied soft at inference -- the paper's A1, no training
# of its own; A1': gates trained soft and applied soft; A2: λ = 0; A3: random fixed gates.
ABLATIONS = ('soft', 'soft_trained', 'lam0', 'random')
ABLATION_LABELS = {'soft': 'A1 soft inference', 'soft_trained': "A1' soft-trained",
                   'lam0': 'A2 λ=0', 'random': 'A3 random'}


# B2-ft / B3-ft: B2's and B3's schedules with the backbone fine-tuned under each (config.ase_ft).
FINETUNED_LABELS = {'ase_default': 'B2-ft ASE-default fine-tuned',
                    'ase_grid': 'B3-ft ASE-grid fine-tuned'}


def ase_row_label(row: str) -> str:
  return f'ASE {row}'


def lees_label(lam: float, regularizer: str = 'mean') -> str:
  return f'LEES λ={lam:g}' if regularizer == 'mean' else f'LEES-FLOPs λ={lam:g}'


SOLVER_NAMES = {'ddpm': 'DDPM', 'ddim': 'DDIM', 'dpm_solver++': 'DPM-Solver++'}


def solver_label(name: str, steps: int) -> str:
  """A few-step setting as the report names it, e.g. 'DDIM-10', 'DPM-Solver++-20'."""
  return f'{SOLVER_NAMES.get(name, name)}-{int(steps)}'


def few_step_settings(ex) -> list[tuple[str, int]]:
  """``experiment.few_step`` as (solver name, steps) pairs, checked."""
  from lees_jax import solvers  # pylint: disable=g-import-not-at-top
  out = []
  for entry in ex.get('few_step', ()):
    name, steps = entry
    if name not in solvers.SAMPLERS or int(steps) < 1:
      raise ValueError(f'experiment.few_step entry {tuple(entry)!r}: expected (solver, steps) with '
                       f'a solver of {solvers.SAMPLERS} and steps >= 1')
    out.append((str(name), int(steps)))
  if len(set(out)) != len(out):
    raise ValueError(f'experiment.few_step repeats a setting: {out}')
  return out


def few_step_labels(ex, name: str, steps: int) -> dict[str, str]:
  """The four rows of one few-step setting, by role: the full model, ASE-default, the main
  LEES cell's gates (trained on every t, the paper's) and gates trained for this solver."""
  lam, at = float(ex.main_lam), solver_label(name, steps)
  return {'full': f'B1 full @ {at}', 'ase_default': f'B2 ASE-default @ {at}',
          'lees_main': f'{lees_label(lam)} main gates @ {at}',
          'lees_solver': f'{lees_label(lam)} solver-trained @ {at}'}


def few_step_cells(ex, seed: int) -> list[Cell]:
  """Per setting of ``experiment.few_step``: full, ASE-default, the main λ cell's gates and
  gates trained with ``gates.timesteps='sampler'`` on that solver, all sampled by it."""
  lam, out = float(ex.main_lam), []
  for name, steps in few_step_settings(ex):
    tag = f'fs_{name.replace("++", "pp")}{steps}'
    lab = few_step_labels(ex, name, steps)
    at = dict(group='few_step', seed=seed, sampler=name, steps=steps)
    out += [Cell(f'{tag}_full_s{seed}', label=lab['full'], kind='full', **at),
            Cell(f'{tag}_ase_default_s{seed}', label=lab['ase_default'], kind='ase', **at),
            Cell(f'{tag}_lees_main_s{seed}', label=lab['lees_main'], kind='lees', lam=lam,
                 gates_from=f'lees_lam{lam:g}_s{seed}', **at),
            Cell(f'{tag}_lees_solver_s{seed}', label=lab['lees_solver'], kind='lees', lam=lam,
                 gate_timesteps='sampler', **at)]
  return out


def extra_policies(ex) -> list[str]:
  """``experiment.extra_policies``: policy specs run as baseline cells (e.g. DeepCache's)."""
  specs = [str(s) for s in ex.get('extra_policies', ())]
  if len(set(specs)) != len(specs):
    raise ValueError(f'experiment.extra_policies repeats a spec: {specs}')
  return specs


def extra_cell_id(spec: str, seed: int) -> str:
  import re  # pylint: disable=g-import-not-at-top
  return f'x_{re.sub(r"[^A-Za-z0-9.]+", "_", spec).strip("_")}_s{seed}'


def plan_cells(ex) -> list[Cell]:
  """The grid, in run order: per seed B1, B2, the extra policies, the LEES λ sweep (and its
  FLOP-weighted rows), A1, A1', A2, A3; then every B3 cell (its budget may depend on all LEES
  cells), B2-ft and B3-ft; then the few-step cells (they apply the main LEES cells' gates)."""
  lams = [float(x) for x in ex.lams]
  flop_lams = [float(x) for x in ex.flop_weighted_lams]
  main = float(ex.main_lam)
  unknown_b = set(ex.baselines) - set(BASELINES)
  unknown_a = set(ex.ablations) - set(ABLATIONS)
  if unknown_b or unknown_a:
    raise ValueError(f'unknown experiment.baselines {sorted(unknown_b)} / ablations {sorted(unknown_a)}; '
                     f'choose from {BASELINES} and {ABLATIONS}')
  if not ex.seeds:
    raise ValueError('experiment.seeds is empty')
  from lees_jax import ase  # pylint: disable=g-import-not-at-top
  table5 = sorted(ase.D_FRACTIONS) + sorted(ase.UVIT_KEPT)  # DiT's rows and U-ViT's
  bad_rows = [r for r in ex.get('ase_rows', ()) if r not in table5]
  if bad_rows:
    raise ValueError(f'unknown experiment.ase_rows {bad_rows}; Table 5 has {table5}')
  if ({'random', 'soft', 'soft_trained'} & set(ex.ablations) or few_step_settings(ex)) \
      and main not in lams:
    raise ValueError(f'experiment.main_lam={main:g} must be one of experiment.lams {lams} '
                     '(A1, A1\', A3 and the few-step rows are defined relative to it)')
  specs = extra_policies(ex)
  label = ABLATION_LABELS
  cells = []
  for s in (int(x) for x in ex.seeds):
    if 'full' in ex.baselines:
      cells.append(Cell(f'b1_full_s{s}', 'baseline', 'B1 full', 'full', s))
    if 'ase_default' in ex.baselines:
      cells.append(Cell(f'b2_ase_default_s{s}', 'baseline', 'B2 ASE-default', 'ase', s))
    for row in ex.get('ase_rows', ()):  # Table 5's other rows (DiT's D-n, U-ViT's), frozen backbone
      cells.append(Cell(f'ase_{row}_s{s}', 'baseline', ase_row_label(row), 'ase', s,
                        schedule=row))
    for spec in specs:  # e.g. DeepCache: run as written, on the configured sampler
      cells.append(Cell(extra_cell_id(spec, s), 'baseline', spec, 'spec', s, spec=spec))
    for lam in lams:
      cells.append(Cell(f'lees_lam{lam:g}_s{s}', 'lees', lees_label(lam), 'lees', s, lam))
    for lam in flop_lams:
      cells.append(Cell(f'lees_flops_lam{lam:g}_s{s}', 'lees', lees_label(lam, 'flops'), 'lees', s,
                        lam, regularizer='flops'))
    if 'soft' in ex.ablations:
      cells.append(Cell(f'a1_soft_s{s}', 'ablation', label['soft'], 'lees', s, main, form='soft'))
    if 'soft_trained' in ex.ablations:
      cells.append(Cell(f'a1t_soft_trained_s{s}', 'ablation', label['soft_trained'], 'lees', s,
                        main, form='soft', train_form='soft'))
    if 'lam0' in ex.ablations:
      cells.append(Cell(f'a2_lam0_s{s}', 'ablation', label['lam0'], 'lees', s, 0.0))
    if 'random' in ex.ablations:
      cells.append(Cell(f'a3_random_s{s}', 'ablation', label['random'], 'random', s, main))
  if 'ase_grid' in ex.baselines:
    for s in (int(x) for x in ex.seeds):
      cells.append(Cell(f'b3_ase_grid_s{s}', 'baseline', 'B3 ASE-grid', 'ase_grid', s))
  if ex.ase_finetuned:  # ASE as ASE runs it: the backbone fine-tuned under the schedule
    for b, cid, label in (('ase_default', 'b2ft_ase_default', FINETUNED_LABELS['ase_default']),
                          ('ase_grid', 'b3ft_ase_grid', FINETUNED_LABELS['ase_grid'])):
      if b in ex.baselines:
        cells.extend(Cell(f'{cid}_s{s}', 'baseline', label, 'ase_ft', s, form=b)
                     for s in (int(x) for x in ex.seeds))
  for s in (int(x) for x in ex.seeds):
    cells.extend(few_step_cells(ex, s))
  return cells


def label_order(ex) -> list[str]:
  """Labels in table order (B1, B2, B3, ASE rows, extra policies, B2-ft, B3-ft, LEES sweep,
  A1, A1', A2, A3, then each few-step setting's four rows), restricted to the config."""
  out = [l for b, l in (('full', 'B1 full'), ('ase_default', 'B2 ASE-default'),
                        ('ase_grid', 'B3 ASE-grid')) if b in ex.baselines]
  out += [ase_row_label(row) for row in ex.get('ase_rows', ())]
  out += extra_policies(ex)
  if ex.ase_finetuned:
    out += [FINETUNED_LABELS[b] for b in ('ase_default', 'ase_grid') if b in ex.baselines]
  out += [lees_label(float(x)) for x in ex.lams]
  out += [lees_label(float(x), 'flops') for x in ex.flop_weighted_lams]
  out += [ABLATION_LABELS[a] for a in ABLATIONS if a in ex.ablations]
  for name, steps in few_step_settings(ex):
    out += list(few_step_labels(ex, name, steps).values())
  return out


# ---------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------


def experiment_dir(workdir: str) -> str:
  return files.join(workdir, EXPERIMENT_DIR)


def cell_dir(workdir: str, cell_id: str) -> str:
  return files.join(experiment_dir(workdir), CELLS_DIR, cell_id)


def cell_file(workdir: str, cell_id: str, name: str) -> str:
  return files.join(cell_dir(workdir, cell_id), name)


def read_result(workdir: str, cell_id: str) -> dict | None:
  """The cell's record, or None when it has not finished.

  Our writer is atomic, but a result.json can still arrive truncated (a copy between machines
  cut short, a full disk elsewhere): such a file is not a finished cell. It is moved aside to
  ``result.json.corrupt`` (kept for inspection, never deleted) and the cell counts as not run.
  """
  path = cell_file(workdir, cell_id, RESULT_FILE)
  if not files.isfile(path):
    return None
  try:
    rec = files.read_json(path)
  except ValueError as e:  # json.JSONDecodeError
    aside = path + '.corrupt'
    files.write_bytes(aside, files.read_bytes(path))
    files.remove(path)
    print(f'cell {cell_id}: {path} is not valid JSON ({e}); moved it to {aside} and will run the '
          'cell again', flush=True)
    return None
  if not isinstance(rec, dict) or 'label' not in rec:
    raise ValueError(f'{path} is not a cell record (no "label"); move it away and rerun the cell')
  return rec


def load_cell_results(workdir: str) -> list[dict]:
  """Every finished cell's record (any cell directory with a valid result.json), sorted by id."""
  names = files.listdir(files.join(experiment_dir(workdir), CELLS_DIR))
  return [rec for rec in (read_result(workdir, n) for n in names) if rec is not None]


def load_cell_errors(workdir: str) -> dict[str, str]:
  """The tracebacks of failed cells (an error.txt and no result.json), by cell id."""
  names = files.listdir(files.join(experiment_dir(workdir), CELLS_DIR))
  return {n: files.read_text(cell_file(workdir, n, ERROR_FILE)) for n in names
          if files.isfile(cell_file(workdir, n, ERROR_FILE))
          and not files.isfile(cell_file(workdir, n, RESULT_FILE))}


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
  # The paired tests compare policies on the configured sampler: a few-step row differs from
  # the main LEES cell in its solver too, so it is left out of the family.
  same_sampler = [l for l in labels if (groups.get(l) or [{}])[0].get('group') != 'few_step']
  ttests = stats_lib.holm_adjust_ttests(
      stats_lib.ttests_vs(groups, same_sampler, main_label, TTEST_METRICS), TTEST_METRICS)

  overhead_path = files.join(experiment_dir(workdir), OVERHEAD_FILE)
  overhead = files.read_json(overhead_path) if files.isfile(overhead_path) else None
  gate_seconds = stats_lib.mean_std([r.get('gate_train_seconds') for r in groups.get(main_label, [])])
  training = {'backbone_epoch': overhead, 'gate_train_seconds_main': gate_seconds}
  if overhead and gate_seconds['mean'] is not None and overhead.get('epoch_seconds'):
    training['gate_train_over_backbone_epoch'] = gate_seconds['mean'] / overhead['epoch_seconds']

  # The run's sampler is the configured one: a few-step cell records its own.
  first = next((r for r in results if r.get('group') != 'few_step'), results[0] if results else {})
  for label in labels:  # the solver each label was sampled with, as its records say
    recs = groups.get(label) or [{}]
    per_label[label].update(sampler=recs[0].get('sampler'), steps=recs[0].get('steps'))
  summary = {
      'main_label': main_label, 'labels': labels, 'per_label': per_label,
      'ttests_vs_main': ttests, 'training': training,
      'cells_finished': len(results), 'failed_cells': sorted(load_cell_errors(workdir)),
      'run': {k: first.get(k) for k in ('num_samples', 'reference', 'reference_count', 'sampler',
                                         'sampler_description', 'sampler_variance',
                                         'steps', 'device', 'num_devices', 'dtype',
                                         'latency_batch', 'fid_method')},
  }
  if ex is not None:
    summary['run'].update(seeds=[int(s) for s in ex.seeds], lams=[float(x) for x in ex.lams],
                          main_lam=float(ex.main_lam), stable_share=float(ex.stable_share),
                          convergence_fractions=[float(f) for f in ex.convergence_fractions],
                          robustness=bool(ex.robustness), severity=int(ex.severity),
                          corruptions=list(ex.corruptions),
                          robustness_reference_size=int(ex.robustness_reference_size),
                          robustness_dataset=ex.robustness_dataset,
                          few_step=[list(x) for x in few_step_settings(ex)],
                          extra_policies=extra_policies(ex))
  rob = next((r['robustness'] for r in results if r.get('robustness')), None)
  if rob:  # the definition with the run's values, as the cells measured it
    summary['run'].update(robustness_definition=rob.get('definition'),
                          robustness_t_start=rob.get('t_start'),
                          robustness_start_step=rob.get('start_step'))
  schedules = files.join(experiment_dir(workdir), ASE_SCHEDULES_FILE)
  if files.isfile(schedules):
    summary['ase_schedules'] = files.read_json(schedules)
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
