"""``config.mode=experiment``: the paper's CIFAR-10 study as one resumable grid of cells.

From a backbone checkpoint (``config.backbone``) and the ``config.experiment`` section, every
*cell* is one (policy, seed), evaluated as ``config.eval`` says (samples, FID reference, latency):

  B1 full              every unit at every step
  B2 ASE-default       the ASE D3 schedule (lees_jax/ase.py)
  B3 ASE-grid          the drop-length grid's best schedule within a FLOP budget (see below)
  LEES λ=<lam>         gates trained with gates.lam=<lam>, hard, evaluated hard (one per lam)
  A1 soft              gates trained soft at main_lam, evaluated soft (every unit runs,
                       its output blended by g_k(t): no unit is skipped)
  A2 λ=0               gates trained hard without the compute term
  A3 random            random fixed gates (`policies.random_gate_params`) whose keep fraction is
                       the executed-block ratio of the LEES main_lam cell of the same seed
  <spec>               each policy spec of experiment.extra_policies (e.g. deepcache:2)
  ... @ <solver>-<n>   per setting of experiment.few_step: B1, B2, the main λ's gates and gates
                       trained for that solver (gates.timesteps='sampler'), sampled by it

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
  * ΔFID (robustness to corrupted inputs, CIFAR-10-C at severity s; `lees_jax.robustness`,
    whose ``DEFINITION`` every record and the report carry with the run's values): the first
    ``robustness_reference_size`` images of ``<robustness_dataset>/<c>_<s>`` split
    ``robustness_split`` (CIFAR-10-C image i is a corrupted copy of CIFAR-10 test image i) and
    the same clean images of ``config.data`` are noised to the first sampler step whose timestep
    is <= ``robustness_t_start``·T, with one fixed ε per image from the cell's seed (the same for
    every policy, corruption and the clean copy), and denoised by the cell's policy from that
    step on (SDEdit). FID_c = FID(denoised c(x), clean images); the anchor A = FID(the full
    model's denoised clean x, clean images), one per seed and common to every policy;
    ΔFID_c = FID_c − A and ΔFID = mean_c FID_c − A. Lower is more robust, and as A is common to
    all policies ΔFID orders them exactly as the corrupted-input FID does (a degraded policy
    cannot look more robust through a worse clean baseline). For every seed of
    ``robustness_seeds`` (default: all). These Fréchet distances use the 'svd' method with each
    covariance decomposed once (`fid.Statistics.sqrt_eigh`).
  * Gate convergence (`stats.gate_convergence`): the gates are snapshotted at every logging step
    of gate training (``gates_history.jsonl``); at each of ``convergence_fractions`` of training
    the last snapshot at or before it is taken, and reported are the Bernoulli KL to the previous
    fraction's gates and the share of hard (unit, sampler step) decisions that no longer change
    afterwards. The convergence point is the first fraction whose share is >= ``stable_share``.
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

import time
import traceback

from lees_jax import cells
from lees_jax import files
from lees_jax import models
# The grid and its files live in `lees_jax.cells`, one cell's run in `lees_jax.cell_runner`;
# these names are the experiment's vocabulary.
from lees_jax.cell_runner import CellRunner as _Runner  # noqa: F401
from lees_jax.cell_runner import finetune_ase, train_cell_gates  # noqa: F401
from lees_jax.cells import (CELLS_DIR, ERROR_FILE, HISTORY_FILE, OVERHEAD_FILE, RESULT_FILE,  # noqa: F401
                            SUMMARY_FILE, Cell, CellsFailed, cell_dir, experiment_dir, lees_label,
                            load_cell_results, plan_cells, print_summary, read_history, summarize)

# ---------------------------------------------------------------------------
# Running the grid.
# ---------------------------------------------------------------------------


def time_backbone_epoch(config, num_steps: int) -> dict:
  """One backbone training epoch, estimated from ``num_steps`` timed pretraining steps."""
  from lees_jax import data, objectives, train  # pylint: disable=g-import-not-at-top
  timing = train.time_steps(objectives.pretrain_objective(config), config, num_steps)
  n_train = data.num_examples(config.data)
  steps_per_epoch = n_train / timing['batch_size']
  return dict(timing, train_examples=n_train, steps_per_epoch=steps_per_epoch,
              epoch_seconds=steps_per_epoch * timing['step_seconds'], dataset=config.data.dataset,
              method='steps_per_epoch x median time of one pretraining step (data loading '
                     'included, compile step excluded)')


def _ensure_latents(config, workdir: str) -> None:
  """A latent backbone's cells train on latents: those of config.data.latents_dir, or (when
  it is empty) the study's own ``<workdir>/latents``, encoded now (resumable) if missing."""
  if models.build_model(config.model).input.kind != 'latents' or config.data.latents_dir:
    return
  from lees_jax import latents  # pylint: disable=g-import-not-at-top
  latents.run(config, workdir)
  config.data.latents_dir = files.join(workdir, 'latents')


def _cell_done(workdir: str, cell: Cell) -> bool:
  return cells.read_result(workdir, cell.id) is not None


def experiment(config, workdir: str, *, after_cell=None) -> dict:
  """``config.mode=experiment``: runs the missing cells, then writes summary.json and the report.

  ``after_cell(cell, record_or_None)`` is called after each cell (tests use it to stop a run).
  Raises `CellsFailed` (after writing the summary and the report) if any cell failed.
  """
  from lees_jax import report  # pylint: disable=g-import-not-at-top
  ex = config.experiment
  grid = plan_cells(ex)
  files.makedirs(experiment_dir(workdir))
  if not ex.report_only:
    if not config.backbone:
      raise ValueError('config.mode=experiment needs a backbone: pass --config.backbone=<a pretrain '
                       'workdir or a converted checkpoint directory> (see README, "The study")')
    todo = [c for c in grid if not _cell_done(workdir, c)]
    print(f'experiment: {len(grid)} cells, {len(grid) - len(todo)} finished earlier, '
          f'{len(todo)} to run; workdir {workdir}', flush=True)
    if todo:
      from lees_jax import data_prep  # pylint: disable=g-import-not-at-top
      for name in data_prep.config_datasets(config):  # all data first: fail before hours of work
        data_prep.prepare(name, config.data.data_dir or None)
      _ensure_latents(config, workdir)
      runner = _Runner(config, workdir)
      overhead_path = files.join(experiment_dir(workdir), OVERHEAD_FILE)
      if ex.overhead_steps > 0 and not files.isfile(overhead_path):
        try:
          t0 = time.perf_counter()
          overhead = time_backbone_epoch(config, int(ex.overhead_steps))
          files.write_json(overhead_path, overhead)
          print(f'backbone epoch timed in {time.perf_counter() - t0:.1f}s: '
                f'{overhead["epoch_seconds"]:.1f}s per epoch', flush=True)
        except Exception:  # pylint: disable=broad-except
          print('timing a backbone epoch failed (the report will lack it):\n' + traceback.format_exc())
      t_start = time.perf_counter()
      for n, cell in enumerate(todo, 1):
        error_path = cells.cell_file(workdir, cell.id, ERROR_FILE)
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
  files.sync('experiment summary')  # the report reads summary.json
  path = report.write_report(workdir)
  print(f'\nsummary: {files.join(experiment_dir(workdir), SUMMARY_FILE)}\nreport: {path}')
  print_summary(summary)
  planned = {c.id for c in grid}
  failed = [c for c in summary['failed_cells'] if c in planned]
  if failed:
    raise CellsFailed(f'{len(failed)} cell(s) failed: {", ".join(failed)} (tracebacks in '
                      f'{files.join(experiment_dir(workdir), CELLS_DIR)}/<cell>/{ERROR_FILE}); '
                      'the other cells finished and the report shows them. Fix the cause and rerun '
                      'the same command: finished cells are kept.')
  return summary
