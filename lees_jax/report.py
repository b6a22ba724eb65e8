"""The experiment report (``config.mode=experiment``): ``report.md`` and its PNGs from result files only.

`write_report` reads ``experiment/summary.json`` and the cells' ``result.json`` / ``gates.json``
(nothing from memory), so a report can be rebuilt at any time. The figures themselves are drawn
by `lees_jax.figures`; their names are re-exported here because callers (training, evaluation,
the experiment) use them as ``report.gate_heatmap``, ``report.save_png`` etc.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lees_jax import cells
from lees_jax import files
from lees_jax import policies
from lees_jax.figures import (  # re-exported: see the module docstring
    gate_heatmap,
    image_grid,
    convergence_plot,
    mask_heatmap,
    pareto_plot,
    ratio_vs_lambda_plot,
    results_pareto_plot,
    save_png,
)

__all__ = [
    'PAPER_DELTA_FID', 'PAPER_MAIN', 'PAPER_OVERHEAD', 'convergence_plot', 'gate_heatmap', 'image_grid',
    'mask_heatmap', 'pareto_plot', 'ratio_vs_lambda_plot', 'results_pareto_plot', 'save_png',
    'write_report',
]

# What the LEES paper claims (papers/lees.md, Results), for side-by-side tables. None: not given.
PAPER_MAIN = {
    'B1 full': {'fid': '3.05 ± 0.03', 'latency': '312', 'blocks': '100 %', 'speedup': '—'},
    'B2 ASE-default': {'fid': '3.25 ± 0.04', 'latency': '218', 'blocks': '70 %', 'speedup': '30 %'},
    'B3 ASE-grid': {'fid': '3.16 ± 0.05', 'latency': '206', 'blocks': None, 'speedup': '34 %'},
    'LEES λ=0.05': {'fid': '3.08 ± 0.03', 'latency': '189', 'blocks': '60 %', 'speedup': '39 %'},
    'A1 soft inference': {'fid': '3.10', 'latency': '194', 'blocks': None, 'speedup': None},
    'A2 λ=0': {'fid': '3.06', 'latency': None, 'blocks': '82 %', 'speedup': None},
    'A3 random': {'fid': 'worse than baselines', 'latency': 'worse than baselines', 'blocks': None,
                  'speedup': None},
}
# The full DDPM CIFAR-10 model's FID in the literature for the samplers we run (DDIM paper,
# Song et al. 2021, Table 1, S = 50 steps; DDPM paper, Ho et al. 2020, 1000 steps), approximate:
# what B1 should reach with 50k-sample FID. The LEES paper's 3.05 at "50 DDPM steps" matches none.
# Full-model CIFAR-10 FID (50k samples) of the DDPM CIFAR-10 checkpoint under each sampler, from
# DDIM's Table 1 (Song et al. 2021; CIFAR-10 uses its quadratic timestep skips) and DDPM's Table 1.
# In DDIM's notation eta = 1 is the posterior variance beta-tilde (our 'fixed_small') and
# sigma-hat the larger beta (our 'fixed_large').
LITERATURE_FULL_FID = {
    ('ddpm', 'fixed_large', 50): '32.72 (DDIM Table 1, σ̂, 50 steps)',
    ('ddpm', 'fixed_small', 50): '8.01 (DDIM Table 1, η = 1, 50 steps)',
    ('ddim', 0.0, 50): '4.67 (DDIM Table 1, η = 0, 50 steps)',
    ('ddim', 0.0, 100): '4.16 (DDIM Table 1, η = 0, 100 steps)',
    ('ddpm', 'fixed_small', 20): '18.36 (DDIM Table 1, η = 1, 20 steps)',
    ('ddim', 0.0, 10): '13.36 (DDIM Table 1, η = 0, 10 steps)',
    ('ddpm', 'fixed_large', 1000): '3.17 (Ho et al. 2020, 1000 steps)',
}


def literature_fid(sampler: str | None, variance_or_eta, steps: int | None) -> str:
  return LITERATURE_FULL_FID.get((sampler, variance_or_eta, steps), 'not tabulated here')


PAPER_DELTA_FID = {'B1 full': '+1.50', 'B2 ASE-default': '+1.89', 'LEES λ=0.05': '+1.55'}
PAPER_OVERHEAD = ('52 min gate training on CIFAR-10 (one RTX-3090), "< 5 % of the cost of one '
                  'backbone fine-tuning epoch"; KL between successive checkpoints < 0.05 after 60 % '
                  'of training')


def _fmt(stat: dict | None, digits: int = 3, scale: float = 1.0, pct: bool = False) -> str:
  if not stat or stat.get('mean') is None:
    return '—'
  m = stat['mean'] * scale
  s = stat['std'] * scale if stat.get('std') is not None else None
  unit = ' %' if pct else ''
  if s is None:
    return f'{m:.{digits}f}{unit}'
  return f'{m:.{digits}f} ± {s:.{digits}f}{unit}'


def _p(x) -> str:
  return '—' if x is None else x


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  out = ['| ' + ' | '.join(header) + ' |', '| ' + ' | '.join('---' for _ in header) + ' |']
  out += ['| ' + ' | '.join(str(c).replace('|', '\\|') for c in r) + ' |' for r in rows]
  return '\n'.join(out)


def _safe(label: str) -> str:
  import re  # pylint: disable=g-import-not-at-top
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', label.replace('λ', 'lam')).strip('_')


def write_report(workdir: str) -> str:
  """``W/report/report.md`` and its PNGs from ``W/experiment/summary.json`` and the cells'
  ``result.json`` / ``gates.json`` files (nothing from memory). Returns the report's path.
  Local or gs:// (`lees_jax.files`)."""
  exp = files.join(workdir, 'experiment')
  out = files.join(workdir, 'report')
  files.makedirs(out)
  summary = files.read_json(files.join(exp, 'summary.json'))
  cells_root = files.join(exp, 'cells')
  results = [files.read_json(files.join(cells_root, name, 'result.json'))
             for name in files.listdir(cells_root)
             if files.isfile(files.join(cells_root, name, 'result.json'))]
  by_label: dict[str, list[dict]] = {}
  for r in results:
    by_label.setdefault(r['label'], []).append(r)
  for v in by_label.values():
    v.sort(key=lambda r: r['seed'])
  per = summary['per_label']
  run = summary.get('run', {})
  main = summary['main_label']
  labels = [l for l in summary['labels'] if per.get(l, {}).get('fid', {}).get('n')]
  md: list[str] = []
  add = md.append

  add('# LEES experiment report\n')
  add('Built by `lees_jax.report.write_report` from `experiment/summary.json` and the cells\' '
      '`result.json` files; rebuild it with `--config.experiment.report_only=True`.\n')
  add('## Run size (read this first)\n')
  seeds_done = sorted({r['seed'] for r in results})
  add(_md_table(['setting', 'value'], [
      ['samples per cell (FID)', run.get('num_samples')],
      ['FID reference', f'{run.get("reference")} ({run.get("reference_count")} images)'],
      ['seeds (planned / with results)', f'{run.get("seeds")} / {seeds_done}'],
      ['sampler', run.get('sampler_description') or f'{run.get("sampler")}, {run.get("steps")} steps'],
      ['full-model FID in the literature for this sampler (CIFAR-10)',
       literature_fid(run.get('sampler'), run.get('sampler_variance'), run.get('steps'))],
      ['latency', f'median wall time of one batch of {run.get("latency_batch")}, scaled to 100 images; '
                  f'{run.get("device")} × {run.get("num_devices")}, {run.get("dtype")}'],
      ['Fréchet distance', run.get('fid_method')],
      ['cells finished / failed', f'{summary["cells_finished"]} / {len(summary["failed_cells"])}'
                                  + (f' ({", ".join(summary["failed_cells"])})' if summary['failed_cells'] else '')],
  ]))
  add('\nThe paper uses 10k samples against the 50k CIFAR-10 training images and 5 seeds on its '
      'pretrained DDPM; FID from fewer samples is biased upwards and not comparable to the '
      'paper\'s values in absolute terms, only between policies of this run. '
      'Std is the sample standard deviation over seeds (— with one seed).\n')

  # --- main results -----------------------------------------------------------------------
  full_lat = (per.get('B1 full') or {}).get('latency_ms_per_100', {}).get('mean')

  def speedup(label):
    lat = per[label]['latency_ms_per_100']['mean']
    return f'{(1 - lat / full_lat) * 100:.0f} %' if full_lat and lat is not None else '—'

  def row(label):
    e, pp = per[label], PAPER_MAIN.get(label, {})
    return [label, e['fid']['n'], _fmt(e['fid']), _p(pp.get('fid')),
            _fmt(e['latency_ms_per_100'], 1), _p(pp.get('latency')), _fmt(e['images_per_s'], 1),
            _fmt(e['block_ratio'], 1, 100, True), _p(pp.get('blocks')),
            _fmt(e['flop_fraction'], 1, 100, True), speedup(label), _p(pp.get('speedup'))]

  header = ['policy', 'n', 'FID (ours)', 'FID (paper)', 'ms / 100 img (ours)', 'ms (paper)',
            'img/s (ours)', 'executed blocks (ours)', 'blocks (paper)', 'FLOPs (ours)',
            'speed-up vs B1 (ours)', 'speed-up (paper)']
  main_labels = [l for l in labels if per[l]['group'] in ('baseline', 'lees')]
  add('## Main results (Table: B1–B3 and the LEES λ sweep)\n')
  add(_md_table(header, [row(l) for l in main_labels]) if main_labels else '_no finished cells_')
  grid = summary.get('ase_grid')
  if grid:
    pk = grid['pick']
    add(f'\nB3 (ASE-grid) is the drop-length grid\'s best-FID schedule within a FLOP budget of '
        f'{grid["budget"]:.3f} ({grid.get("budget_source", "")}): `{pk["name"]}` '
        f'(FLOPs {pk["flop_fraction"]:.1%}; grid FID {pk["fid"]:.3f} on {grid.get("grid_num_samples")} '
        f'samples of the selection seed {grid.get("grid_seed")} against {grid.get("grid_reference")}, '
        'apart from the seeds and reference the cells are scored on).' + (f' Note: {grid["note"]}.' if grid.get('note') else '')
        + '\n')
  if any(l in per for l in ('B2 ASE-default', 'B3 ASE-grid')):
    ft = [l for l in main_labels if per[l].get('group') == 'baseline' and '-ft' in l]
    add('\nWhich ASE each row is: **B2/B3** drop blocks of the *frozen* backbone (the schedule '
        'only); ' + ('**' + '/'.join(l.split()[0] for l in ft) + '** fine-tune the backbone under '
                     'the same schedule first, as the ASE paper always does (`config.ase_ft`: '
                     'AdamW, EMA, λ(t); once per schedule, shared by the seeds).' if ft else
                     'the fine-tuned variants (B2-ft/B3-ft, `experiment.ase_finetuned`) were not run.')
        + ' The LEES paper does not say whether its B2/B3 were fine-tuned.\n')
  add('\n![FID vs latency](pareto.png)\n')
  if summary.get('ase_schedules'):
    add('ASE\'s Table 5 rows as this backbone runs them (B2 is D3; kept units per interval of t, '
        '[0, 0.1] first; the UNet may drop at most its up path and last middle unit):\n')
    dit = '28 DiT blocks'  # a U-ViT row says what it counts (`ase.table5_as_run`)
    add(_md_table(['row', f'Table 5 (of {dit})', 'kept here (of units)', 'cut by the cap',
                   'executed blocks', 'FLOPs'],
                  [[r['name'], ' '.join(map(str, r.get('table5_kept', r.get('table5_kept_of_28'))))
                    + ('' if r.get('table5_of', dit) == dit else f' (of {r["table5_of"]})'),
                    ' '.join(map(str, r['kept'])) + f' (of {r["num_units"]})',
                    'yes' if r['cut_by_cap'] else 'no', f'{r["executed_block_ratio"]:.1%}',
                    f'{r["flop_fraction"]:.1%}'] for r in summary['ase_schedules']]))
    add('')

  add('### Paired t-tests: ' + main + ' against each policy (pairs = seeds)\n')
  trows = []
  for label, t in summary.get('ttests_vs_main', {}).items():
    for m, name in (('fid', 'FID'), ('latency_ms_per_100', 'latency')):
      r = t.get(m) or {}
      trows.append([label, name, r.get('n', 0),
                    '—' if r.get('mean_diff') is None else f'{r["mean_diff"]:+.4g}',
                    '—' if r.get('t') is None else f'{r["t"]:.3f}',
                    '—' if r.get('p') is None else f'{r["p"]:.3g}',
                    '—' if r.get('p_holm') is None else f'{r["p_holm"]:.3g}', r.get('reason', '')])
  add(_md_table(['vs', 'metric', 'n', f'mean diff ({main} − other)', 't', 'p (two-sided)',
                 'p (Holm)', 'note'], trows) if trows else '_no paired policy_')
  add('\nPaper: "error bars over seeds do not overlap except near the no-skip endpoint … '
      '(paired t-test p < 0.05)". `scipy.stats.ttest_rel`, two-sided; *p (Holm)* is Holm\'s '
      'step-down adjustment over every comparison of this table (one family: each policy × FID '
      'and latency), which keeps the chance of any false "significant" row at the nominal level.\n')

  # --- ablations -------------------------------------------------------------------------
  abl = [l for l in labels if per[l]['group'] == 'ablation']
  add("## Ablations (A1 soft inference, A1' soft-trained, A2 λ = 0, A3 random gates)\n")
  add(_md_table(header, [row(l) for l in ([main] if main in per and per[main]['fid']['n'] else []) + abl])
      if abl else '_no ablation cells_')
  add('\n**A1 soft inference** (the paper\'s A1): the gates of the main λ cell, trained hard, '
      'applied soft at sampling — every unit runs, its output blended by g_k(t) — so nothing is '
      'skipped and its latency is the full model\'s. **A1\' soft-trained**: gates trained with '
      'soft gates at the main λ and applied soft. **A2**: hard gates trained without the compute '
      'term (λ = 0). **A3 random**: fixed random gates (`policies.random_gate_params`) matched to '
      f'the executed-block ratio of the {main} cell of the same seed: each unit runs for a random '
      'share of the normalised time whose mean is that ratio, on at the data end or at the noise '
      'end (a random direction per unit), so A3 spends the same block budget as LEES with no '
      'learning.\n')

  # --- few-step solvers -------------------------------------------------------------------
  few = [l for l in labels if per[l]['group'] == 'few_step']
  settings = {}  # (sampler, steps) -> its labels, in table order
  for l in few:
    settings.setdefault((per[l].get('sampler'), per[l].get('steps')), []).append(l)
  if settings:
    add('## Few-step solvers: gates for the solver that runs them\n')
    add(f'Each setting samples with its own solver: B1, B2 (ASE-default), the gates of the {main} '
        f'cells (trained with t drawn over every timestep, the paper\'s; their masks reported on '
        f'{run.get("sampler")}-{run.get("steps")}) and gates trained at the same λ with '
        '`gates.timesteps=\'sampler\'` (the loss sees only the timesteps this solver visits). '
        'Speed-up is against B1 of the same setting. Not in the paired t-tests above.\n')
  for (name, steps), group in settings.items():
    full = next((per[l]['latency_ms_per_100']['mean'] for l in group
                 if l.startswith('B1 full')), None)
    add(f'### {cells.solver_label(name, steps)}\n')
    add(_md_table(['policy', 'n', 'FID', 'ms / 100 img', 'FLOPs', 'executed blocks',
                   'speed-up vs B1'],
                  [[l, per[l]['fid']['n'], _fmt(per[l]['fid']), _fmt(per[l]['latency_ms_per_100'], 1),
                    _fmt(per[l]['flop_fraction'], 1, 100, True), _fmt(per[l]['block_ratio'], 1, 100, True),
                    f'{(1 - per[l]["latency_ms_per_100"]["mean"] / full) * 100:.0f} %' if full else '—']
                   for l in group]))
    add('')

  # --- robustness ------------------------------------------------------------------------
  add('## Robustness (CIFAR-10-C)\n')
  rob_labels = [l for l in labels if per[l].get('delta_fid', {}).get('n')]
  if rob_labels:
    add('**ΔFID definition (ours; the paper gives none).** '
        + (run.get('robustness_definition') or 'see `lees_jax/robustness.py` (DEFINITION).') + '\n')
    add(_md_table(['policy', 'n', 'ΔFID (ours)', 'ΔFID (paper)'],
                  [[l, per[l]['delta_fid']['n'], _fmt(per[l]['delta_fid']),
                    _p(PAPER_DELTA_FID.get(l))] for l in rob_labels]))
    cors = sorted({c for l in rob_labels for c in per[l].get('delta_fid_per_corruption', {})})
    add('\nPer corruption (mean over seeds):\n')
    add(_md_table(['corruption'] + rob_labels,
                  [[c] + [_fmt(per[l].get('delta_fid_per_corruption', {}).get(c), 2) for l in rob_labels]
                   for c in cors]))
  else:
    add('_not run (experiment.robustness=False)_ — paper: ΔFID +1.50 (full), +1.89 (ASE-default), '
        '+1.55 (LEES).')
  add('')

  # --- training overhead & convergence ---------------------------------------------------
  add('## Training overhead and gate convergence\n')
  tr = summary.get('training', {})
  ep = tr.get('backbone_epoch')
  trained = [l for l in labels if per[l].get('gate_train_seconds', {}).get('n')]
  orows = []
  for l in trained:
    e = per[l]
    ratio = (f'{e["gate_train_seconds"]["mean"] / ep["epoch_seconds"] * 100:.1f} %'
             if ep and ep.get('epoch_seconds') else '—')
    steps = sorted({r.get('gate_train_steps') for r in by_label.get(l, [])})
    orows.append([l, ', '.join(str(s) for s in steps), _fmt(e['gate_train_seconds'], 1), ratio,
                  _fmt(e['converged_fraction'], 2, 100, True)])
  if orows:
    add(_md_table(['policy', 'gate-training steps', 'gate training wall time (s)',
                   'of one backbone epoch', 'converged after (of training)'], orows))
  if ep:
    add(f'\nOne backbone training epoch: {ep["steps_per_epoch"]:.1f} steps × {ep["step_seconds"]*1e3:.1f} ms '
        f'= {ep["epoch_seconds"]:.1f} s ({ep["measured_steps"]} timed pretraining steps at batch '
        f'{ep["batch_size"]} on {ep["device"]} × {ep["num_devices"]}, {ep["train_examples"]} training '
        f'images of `{ep["dataset"]}`). Gate-training wall time includes backbone loading and '
        'compilation.\n')
  fractions = ', '.join(f'{f:g}' for f in run.get('convergence_fractions') or [])
  add(f'\n**Convergence definition.** The gates are taken at fixed fractions of gate training '
      f'({fractions}; the last logged snapshot at or before each). At each fraction: the share of '
      'hard (unit, sampler step) decisions — unit k runs at step i iff α_k t_i + β_k > 0 — that '
      'equal the decisions of every later fraction ("no longer change"), and the KL between the '
      'gates and those of the previous fraction, mean over units and the sampler\'s timesteps of '
      'KL(Bernoulli(g_k^f(t_i)) ‖ Bernoulli(g_k^prev(t_i))), g = σ(α t + β). *Converged after* is '
      f'the first fraction whose share of stable decisions is ≥ {run.get("stable_share")}. '
      'A KL threshold between nearby snapshots is not used: a Bernoulli KL is at most about '
      'Δlogit²/8, and Adam at 1e-3 moves a logit by ~0.1 in 50 steps, so such a threshold is met '
      'at any short interval whether or not the gates have settled.\n')
  add(f'\nPaper: {PAPER_OVERHEAD}. (52 min being < 5 % of one epoch would make an epoch > 17 h, far '
      'more than one CIFAR-10 epoch of the DDPM UNet; our table reports the measured ratio.)\n')
  curves = {}
  for l in trained:
    for r in by_label.get(l, []):
      conv = r.get('gate_convergence') or {}
      if conv.get('fractions') and conv.get('stable'):
        curves[f'{l} s{r["seed"]}'] = (conv['fractions'], conv['stable'], conv['kl'])
  if curves:
    save_png(convergence_plot(curves, float(run.get('stable_share') or 0.99)),
             files.join(out, 'convergence.png'))
    add('![gate convergence](convergence.png)\n')

  # --- gates -----------------------------------------------------------------------------
  add('## Learned gates\n')
  lam_rows = []
  for l in labels:
    recs = by_label.get(l, [])
    if recs and recs[0].get('kind') == 'lees' and recs[0].get('form') == 'hard' and \
        recs[0].get('lam') is not None and recs[0].get('group') != 'few_step':
      lam_rows.append((recs[0].get('regularizer', 'mean'), float(recs[0]['lam']),
                       per[l]['block_ratio'], per[l]['flop_fraction']))
  if lam_rows:
    paper_rows = [r[1:] for r in lam_rows if r[0] == 'mean']  # the plot: the paper's sweep
    save_png(ratio_vs_lambda_plot(paper_rows or [r[1:] for r in lam_rows]),
             files.join(out, 'ratio_vs_lambda.png'))
    add(_md_table(['compute term', 'λ', 'executed blocks', 'FLOPs'],
                  [[reg, f'{x:g}', _fmt(b, 1, 100, True), _fmt(fl, 1, 100, True)]
                   for reg, x, b, fl in sorted(lam_rows)]))
    add('\nCompute term: *mean* is the paper\'s λ·mean_k g_k(t) (every unit costs the same); '
        '*flops* weights each unit by the FLOPs its skip saves (λ·Σ_k c_k g_k / Σ_k c_k).\n')
    add('\n![executed ratio vs λ](ratio_vs_lambda.png)\n')
  for l in labels:
    recs = by_label.get(l, [])
    if not recs:
      continue
    r = recs[0]
    fname = f'gates_{_safe(l)}.png'
    alpha, beta = r.get('gate_alpha'), r.get('gate_beta')
    if r.get('gates_dir') and files.isfile(files.join(r['gates_dir'], 'gates.json')):
      g = files.read_json(files.join(r['gates_dir'], 'gates.json'))
      alpha, beta = g['alpha'], g['beta']
    if r.get('kind') in ('lees', 'random') and alpha is not None:
      pol = policies.LeesPolicy(np.asarray(alpha), np.asarray(beta), form=r.get('form', 'hard'))
      img = gate_heatmap(pol, r['unit_names'], num_timesteps=r['num_timesteps'], timesteps=r['timesteps'],
                         title=f'{l}, seed {r["seed"]}: g_k(t); dots = executed at sampler steps')
    elif r.get('kind') != 'full' and r.get('masks'):
      img = mask_heatmap(np.asarray(r['masks'], bool), r['unit_names'], r['timesteps'],
                         num_timesteps=r['num_timesteps'], title=f'{l}: executed units')
    else:
      continue
    save_png(img, files.join(out, fname))
    add(f'**{l}** (seed {r["seed"]})\n\n![{l} gates]({fname})\n')

  # --- samples ---------------------------------------------------------------------------
  add('## Samples (first seed of each policy)\n')
  for l in labels:
    recs = by_label.get(l, [])
    src = files.join(cells_root, recs[0]['cell'], 'samples.png') if recs else ''
    if src and files.isfile(src):
      fname = f'samples_{_safe(l)}.png'
      files.write_bytes(files.join(out, fname), files.read_bytes(src))
      add(f'**{l}** (seed {recs[0]["seed"]}, FID {recs[0]["fid"]:.3f})\n\n![{l} samples]({fname})\n')

  points = {l: [(r['latency_ms_per_100'], r['fid']) for r in by_label.get(l, [])
                if r.get('latency_ms_per_100') is not None] for l in labels}
  # Few-step rows are marked by their solver setting; the configured sampler's by their group.
  markers = {l: cells.solver_label(per[l]['sampler'], per[l]['steps']) for l in few}
  save_png(results_pareto_plot({l: per[l] for l in labels}, points, settings=markers),
           files.join(out, 'pareto.png'))
  path = files.join(out, 'report.md')
  files.write_text(path, '\n'.join(md) + '\n')
  return path
