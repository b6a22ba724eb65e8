"""One cell of the study, run: its policy (training the gates or fine-tuning ASE first when
it needs them), sampled and scored by an `evaluate.Evaluator` of the cell's sampler, and its
``result.json`` (`lees_jax.experiment` runs the grid of cells; `lees_jax.cells` plans it).

A cell of a few-step setting (``Cell.sampler``, ``experiment.few_step``) is sampled by its own
solver: the runner keeps one evaluator per sampler, all sharing the backbone, FID network and
reference statistics of the configured one.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import numpy as np

from lees_jax import cells
from lees_jax import files
from lees_jax import robustness
from lees_jax import stats as stats_lib
from lees_jax.cells import HISTORY_FILE, RESULT_FILE, Cell, cell_dir, experiment_dir, lees_label
from lees_jax.cells import load_cell_results, read_history

def _cell_config(config, cell: Cell, backbone: str):
  cfg = config.copy_and_resolve_references()
  cfg.seed = int(cell.seed)
  cfg.gates.lam = float(cell.lam)
  cfg.gates.form = cell.train_form
  cfg.gates.regularizer = cell.regularizer
  with cfg.unlocked():  # configs written before the field: the paper's draw
    cfg.gates.timesteps = cell.gate_timesteps
  if cell.sampler:  # a few-step cell: its solver (gates trained for it see its timesteps)
    cfg.sampler.update(name=cell.sampler, steps=int(cell.steps))
  cfg.backbone = backbone
  return cfg


def train_cell_gates(config, cell: Cell, gates_dir: str, backbone: str) -> dict:
  """Trains (or resumes, or reuses) the cell's gates; returns timing and the gates summary.

  Runs `train.train` on `objectives.gates_objective` -- exactly ``config.mode=train_gates`` --
  with one addition: the gate parameters of every logging step go to ``gates_history.jsonl``.
  """
  import jax  # pylint: disable=g-import-not-at-top

  from lees_jax import objectives, train  # pylint: disable=g-import-not-at-top
  cfg = _cell_config(config, cell, backbone)
  timing_path = files.join(gates_dir, 'train_time.json')
  gates_path = files.join(gates_dir, objectives.GATES_FILE)
  objective = objectives.gates_objective(cfg)
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


def finetune_ase(config, schedule: str, out_dir: str, backbone: str) -> str:
  """The backbone fine-tuned under ``schedule`` (`objectives.ase_objective`, exactly
  ``config.mode=ase_finetune`` with config.ase_ft) in ``out_dir``: trained once (resumable),
  shared by every seed's cell; returns ``out_dir`` for the ``ase_ft:`` policy spec."""
  from lees_jax import objectives, train  # pylint: disable=g-import-not-at-top
  cfg = config.copy_and_resolve_references()
  cfg.mode = 'ase_finetune'
  cfg.backbone = backbone
  cfg.ase_ft.schedule = schedule
  done = files.join(out_dir, objectives.ASE_SCHEDULE_FILE)
  objective = objectives.ase_objective(cfg)
  if not (files.isfile(done) and files.read_json(done).get('step') == objective.num_train_steps):
    train.train(cfg, out_dir, objective)
  return out_dir



class CellRunner:
  """Shared state of one experiment run: evaluator, compiled programs, ASE grid pick."""

  def __init__(self, config, workdir: str):
    from lees_jax import evaluate  # pylint: disable=g-import-not-at-top
    self.config = config
    self.ex = config.experiment
    self.workdir = workdir
    self.out = experiment_dir(workdir)
    self.evaluator = evaluate.Evaluator(config, self.out, fid_method=self.ex.fid_method)
    self.backbone = self.evaluator.backbone_path
    self.num_samples = int(config.eval.num_samples)
    self.programs = {}
    self._write_ase_schedules()
    self.robustness = robustness.Robustness(config, self.evaluator,
                                            files.join(self.out, 'robustness_refs')) \
        if self.ex.robustness else None
    self._grid_pick = None
    self._evaluators = {}

  def evaluator_for(self, cell: Cell):
    """The evaluator of the cell's sampler: the configured one, or for a few-step cell the same
    backbone, FID network and reference with the cell's solver (`Evaluator.for_sampler`)."""
    if not cell.sampler:
      return self.evaluator
    key = (cell.sampler, int(cell.steps))
    if key not in self._evaluators:
      self._evaluators[key] = self.evaluator.for_sampler(*key)
    return self._evaluators[key]

  def _write_ase_schedules(self):
    """W/experiment/ase_schedules.json: Table 5's rows (U-ViT's among ase_rows) as run here."""
    from lees_jax import ase, cost  # pylint: disable=g-import-not-at-top
    model, solver = self.evaluator.model, self.evaluator.solver
    uvit = [r for r in self.ex.get('ase_rows', ()) if r in ase.UVIT_KEPT]
    rows = ase.table5_as_run(model.units, cost.model_cost(model), solver.timesteps,
                             solver.num_original_timesteps, uvit)
    files.write_json(files.join(self.out, cells.ASE_SCHEDULES_FILE), rows)

  # -- policies --------------------------------------------------------------

  def policy_spec(self, cell: Cell, cdir: str, rec_extra: dict) -> str:
    """The cell's policy as an `evaluate.resolve_policy` spec, after what it needs: the B3
    grid's pick, the main LEES cell's block ratio (A3) or the cell's trained gates (LEES)."""
    if cell.kind == 'full':
      return 'full'
    if cell.kind == 'spec':  # experiment.extra_policies, as written
      return cell.spec
    if cell.kind == 'ase':
      return f'ase:{cell.schedule}'
    if cell.kind == 'ase_grid':
      rec_extra['ase_grid_pick'] = self.ase_grid_pick()
      return 'ase_grid:' + files.join(self.out, 'ase_grid', 'pareto.json')
    if cell.kind == 'ase_ft':
      schedule = 'ase_default' if cell.form == 'ase_default' else self.ase_grid_pick()['name']
      out = finetune_ase(self.config, schedule, files.join(self.out, 'ase_finetune', schedule),
                         self.backbone)
      rec_extra['ase_finetuned_schedule'] = schedule
      return f'ase_ft:{out}'
    if cell.kind == 'random':
      main = cells.cell_file(self.workdir, f'lees_lam{cell.lam:g}_s{cell.seed}', RESULT_FILE)
      if not files.isfile(main):
        raise RuntimeError(f'A3 random gates take their keep fraction from the LEES λ={cell.lam:g} '
                           f'cell of seed {cell.seed}, which has not finished (see its error.txt)')
      keep = float(files.read_json(main)['block_ratio'])
      rec_extra['random_keep_fraction'] = keep
      return f'random:{keep!r}:{int(cell.seed)}'  # repr: the float round-trips exactly
    if cell.kind == 'lees':
      gates_dir = files.join(cdir, 'gates')
      if cell.gates_from or (cell.train_form == 'hard' and cell.form == 'soft'):
        # A1 (the paper's): the main λ cell's gates, trained exactly as this cell would train
        # them (same seed, λ, form and compute term), applied soft: reuse them. A few-step
        # 'main gates' cell applies them (hard) on its own solver.
        main_id = cell.gates_from or f'lees_lam{cell.lam:g}_s{cell.seed}'
        if cells.read_result(self.workdir, main_id) is None:
          raise RuntimeError(f'{cell.label} applies the gates of cell {main_id} (LEES λ={cell.lam:g}, '
                             f'seed {cell.seed}), which has not finished (see its error.txt)')
        gates_dir = files.join(cells.cell_dir(self.workdir, main_id), 'gates')
      info = train_cell_gates(self.config, cell, gates_dir, self.backbone)
      g = info['gates']
      hist = read_history(files.join(gates_dir, HISTORY_FILE))
      conv = stats_lib.gate_convergence(hist, self.evaluator_for(cell).solver.timesteps,
                                        g['num_timesteps'],
                                        info['num_train_steps'], self.ex.convergence_fractions,
                                        float(self.ex.stable_share))
      rec_extra.update(gate_train_seconds=info['gate_train_seconds'],
                       gate_train_steps=info['num_train_steps'], gates_dir=gates_dir,
                       gate_alpha=g['alpha'], gate_beta=g['beta'],
                       gates_executed_block_ratio=g['executed_block_ratio'],
                       gate_convergence=conv, converged_fraction=conv['converged_fraction'])
      return f'{"lees_soft" if cell.form == "soft" else "lees"}:{gates_dir}'
    raise ValueError(f'unknown cell kind {cell.kind!r}')

  def _resolved(self, cell: Cell, cdir: str, rec_extra: dict):
    """(resolved policy named as the records name it, key of its reusable program or None)."""
    from lees_jax import evaluate  # pylint: disable=g-import-not-at-top
    spec = self.policy_spec(cell, cdir, rec_extra)
    names = {'full': 'full', 'ase': cell.schedule, 'ase_grid': 'ase_grid', 'spec': None}
    if cell.kind == 'random':
      name = f'random_{rec_extra["random_keep_fraction"]:.3f}_s{cell.seed}'
    else:
      name = names.get(cell.kind, cell.id)  # None: the spec's own name (e.g. deepcache_n2)
    resolved = evaluate.resolve_policy(spec, self.evaluator.model, name=name)
    rec_extra['policy_spec'] = spec
    if cell.kind == 'random':
      rec_extra.update(gate_alpha=resolved.policy.alpha.tolist(),
                       gate_beta=resolved.policy.beta.tolist())
    # Fixed policies compile once per run and sampler; gates differ per cell.
    key = f'{spec}@{cell.sampler}{cell.steps}' if cell.sampler else spec
    return resolved, (key if cell.kind in names else None)

  def ase_grid_pick(self) -> dict:
    """Runs the B3 grid once (resumable, W/experiment/ase_grid) and picks within the budget."""
    if self._grid_pick is not None:
      return self._grid_pick
    from lees_jax import ase, evaluate, report  # pylint: disable=g-import-not-at-top
    out = files.join(self.out, 'ase_grid')
    files.makedirs(out)
    cfg = self.config

    records = evaluate.run_ase_grid(cfg, self.evaluator, out)
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
                      'grid_seed': int(cfg.ase.grid_seed),
                      'grid_reference': f'{cfg.data.dataset}/{cfg.ase.grid_reference_split}'})
    report.save_png(report.pareto_plot(records, front, pick), files.join(out, 'pareto.png'))
    files.sync('ase grid pick')  # B3's cells resolve their policy from pareto.json
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
    evaluator = self.evaluator_for(cell)
    rec, images, program = evaluator.run(resolved, cell.seed, self.num_samples, program=program)
    if cache_key:
      self.programs[cache_key] = program
    eval_seconds = time.perf_counter() - t_eval
    t_rob = time.perf_counter()
    # ΔFID is measured with the configured sampler's steps: few-step cells have none.
    if self.robustness is not None and not cell.sampler and (not self.ex.robustness_seeds or
                                        cell.seed in tuple(self.ex.robustness_seeds)):
      # The cell's policy (and its backbone, e.g. ase_ft's) denoises the corrupted inputs.
      rob = self.robustness.evaluate(resolved, seed=cell.seed, cache_key=cache_key)
      rec.update(robustness=rob, delta_fid=rob['delta_fid'])
    rob_seconds = time.perf_counter() - t_rob
    report.save_png(report.image_grid(images[:max(1, min(int(self.ex.sample_grid), len(images)))]),
                    files.join(cdir, 'samples.png'))
    rec.update(extra)
    rec.update(cell=cell.id, group=cell.group, label=cell.label, kind=cell.kind, lam=cell.lam,
               form=cell.form, train_form=cell.train_form, regularizer=cell.regularizer,
               spec=cell.spec or None, gate_timesteps=cell.gate_timesteps,
               gates_from=cell.gates_from or None,
               few_step=bool(cell.sampler),  # its solver: the record's sampler and steps
               seed=int(cell.seed), fid_method=self.ex.fid_method,
               masks=np.asarray(program.masks, int).tolist(),
               timesteps=evaluator.solver.timestep_values(),  # real-valued when continuous
               num_timesteps=int(evaluator.solver.num_original_timesteps),
               unit_names=[u.name for u in evaluator.model.units], backbone=self.backbone,
               seconds={'total': time.perf_counter() - t_cell, 'evaluate': eval_seconds,
                        'robustness': rob_seconds,
                        'gate_training': extra.get('gate_train_seconds', 0.0)})
    files.write_json(files.join(cdir, RESULT_FILE), rec)
    files.sync(f'cell {cell.id}')  # later cells (B3's budget, A3's ratio) read this result
    return rec


