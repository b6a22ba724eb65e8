"""Figures from gate policies and result files (matplotlib, Agg backend, no display needed).

Currently: `gate_heatmap`, the (units x normalised time) picture of LEES gates that gate
training writes to TensorBoard and that reports reuse.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lees_jax import files
from lees_jax import policies


def _figure(width: float, height: float):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg', force=False)
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _to_rgb(fig) -> np.ndarray:
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def gate_heatmap(policy_or_params, unit_names: Sequence[str] | None = None, *,
                 num_timesteps: int = 1000, timesteps: Sequence[int] | None = None,
                 title: str = '', resolution: int = 200) -> np.ndarray:
  """uint8 RGB image (H, W, 3): gate values g_k(t) of each unit (rows) over normalised time.

  ``policy_or_params`` is a `gates.LeesPolicy` or a dict with 'alpha' and 'beta'. The
  colour is g_k(t) = sigmoid(alpha_k t + beta_k) on a grid of t in (0, 1]; a black tick in
  a row is where that gate crosses g = 0.5 (its hard decision flips). With ``timesteps`` (a
  sampler's original timesteps) the executed (unit, step) pairs of the hard policy are dots.
  """
  policy = policy_or_params
  if not isinstance(policy, policies.LeesPolicy):
    policy = policies.LeesPolicy.from_params(policy_or_params)
  k = policy.alpha.shape[0]
  names = list(unit_names) if unit_names is not None else [str(i) for i in range(k)]
  if len(names) != k:
    raise ValueError(f'{len(names)} unit names for {k} gates')
  t = policies.normalized_time(np.arange(resolution), resolution, np.float64)
  values = policies.gate_values({'alpha': policy.alpha.astype(np.float64), 'beta': policy.beta}, t).T

  fig = _figure(8.0, 1.2 + 0.22 * k)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(values, aspect='auto', origin='upper', cmap='viridis', vmin=0.0, vmax=1.0,
                 extent=(0.0, 1.0, k - 0.5, -0.5), interpolation='nearest')
  with np.errstate(divide='ignore', invalid='ignore'):
    flip = -policy.beta / policy.alpha  # where alpha t + beta changes sign
  for unit in np.nonzero((policy.alpha != 0) & (flip > 0) & (flip < 1))[0]:
    ax.plot([flip[unit]] * 2, [unit - 0.5, unit + 0.5], color='k', linewidth=1.2)
  if timesteps is not None:
    masks = policies.LeesPolicy(policy.alpha, policy.beta, 'hard').step_masks(
        timesteps, num_timesteps, k)
    tn = policies.normalized_time(timesteps, num_timesteps, np.float64)
    steps, units = np.nonzero(masks)
    ax.scatter(tn[steps], units, s=9, c='w', marker='o', linewidths=0)
  ax.set_yticks(range(k))
  ax.set_yticklabels(names, fontsize=6)
  ax.set_xlabel('normalised time t = (timestep + 1) / T   (0: data, 1: noise)')
  ax.set_title(title or f'LEES gates g_k(t) ({policy.form})', fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label='g')
  fig.tight_layout()
  return _to_rgb(fig)


def save_png(image: np.ndarray, path: str):
  """Writes a uint8 RGB array as PNG, atomically (local or gs://, `lees_jax.files`)."""
  import io  # pylint: disable=g-import-not-at-top

  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format='PNG')
  files.write_bytes(path, buf.getvalue())


def image_grid(images: np.ndarray, ncol: int = 10, pad: int = 2) -> np.ndarray:
  """uint8 (N, H, W, 3) images tiled into one uint8 RGB grid, ``ncol`` per row."""
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f'expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}')
  n, h, w, c = images.shape
  ncol = max(1, min(ncol, n))
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, ncol)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = img
  return grid if c == 3 else np.repeat(grid[..., :1], 3, axis=-1)


def mask_heatmap(masks: np.ndarray, unit_names: Sequence[str], timesteps: Sequence[int], *,
                 num_timesteps: int = 1000, title: str = '') -> np.ndarray:
  """uint8 RGB image of which units (rows) run at which sampler step (columns, noise on the
  right, as normalised time grows): any hard policy, LEES or schedule."""
  masks = np.asarray(masks, bool)
  steps, k = masks.shape
  if len(unit_names) != k or len(timesteps) != steps:
    raise ValueError(f'masks {masks.shape} do not match {len(unit_names)} units x {len(timesteps)} steps')
  tn = policies.normalized_time(timesteps, num_timesteps, np.float64)
  order = np.argsort(tn)
  fig = _figure(8.0, 1.2 + 0.22 * k)
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(masks[order].T, aspect='auto', cmap='Greens', vmin=0, vmax=1, interpolation='nearest',
            extent=(tn.min(), tn.max(), k - 0.5, -0.5))
  ax.set_yticks(range(k))
  ax.set_yticklabels(list(unit_names), fontsize=6)
  ax.set_xlabel('normalised time t of the sampler step (0: data, 1: noise); green = executed')
  ax.set_title(title or f'executed units: {masks.mean():.1%} of (step, unit) pairs', fontsize=9)
  fig.tight_layout()
  return _to_rgb(fig)


def pareto_plot(records: Sequence[dict], front: Sequence[dict], pick: dict | None = None, *,
                x_key: str = 'flop_fraction', y_key: str = 'fid', title: str = 'ASE drop-length grid') -> np.ndarray:
  """FID against FLOP fraction of grid points, the Pareto set joined, the pick circled."""
  fig = _figure(6.0, 4.0)
  ax = fig.add_subplot(1, 1, 1)
  ax.scatter([r[x_key] for r in records], [r[y_key] for r in records], s=14, c='0.6', label='grid')
  ax.plot([r[x_key] for r in front], [r[y_key] for r in front], 'o-', c='C0', ms=4, label='Pareto set')
  if pick is not None:
    ax.scatter([pick[x_key]], [pick[y_key]], s=120, facecolors='none', edgecolors='C3', label='pick')
  ax.set_xlabel(x_key.replace('_', ' '))
  ax.set_ylabel(y_key.upper())
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  return _to_rgb(fig)


# ---------------------------------------------------------------------------
# The experiment report (``config.mode=experiment``): markdown + PNGs from result files only.
# ---------------------------------------------------------------------------

# What the LEES paper claims (papers/lees.md, Results), for side-by-side tables. None: not given.
PAPER_MAIN = {
    'B1 full': {'fid': '3.05 ± 0.03', 'latency': '312', 'blocks': '100 %', 'speedup': '—'},
    'B2 ASE-default': {'fid': '3.25 ± 0.04', 'latency': '218', 'blocks': '70 %', 'speedup': '30 %'},
    'B3 ASE-grid': {'fid': '3.16 ± 0.05', 'latency': '206', 'blocks': None, 'speedup': '34 %'},
    'LEES λ=0.05': {'fid': '3.08 ± 0.03', 'latency': '189', 'blocks': '60 %', 'speedup': '39 %'},
    'A1 soft': {'fid': '3.10', 'latency': '194', 'blocks': None, 'speedup': None},
    'A2 λ=0': {'fid': '3.06', 'latency': None, 'blocks': '82 %', 'speedup': None},
    'A3 random': {'fid': 'worse than baselines', 'latency': 'worse than baselines', 'blocks': None,
                  'speedup': None},
}
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


def results_pareto_plot(per_label: dict, points: dict[str, list[tuple[float, float]]] | None = None,
                        title: str = 'FID vs latency (mean ± std over seeds)') -> np.ndarray:
  """FID against latency per 100 images, one marker with x/y error bars per policy; thin
  dots are the individual seeds."""
  fig = _figure(7.0, 4.6)
  ax = fig.add_subplot(1, 1, 1)
  markers = {'baseline': 's', 'lees': 'o', 'ablation': '^'}
  for i, (label, e) in enumerate(per_label.items()):
    fid, lat = e.get('fid') or {}, e.get('latency_ms_per_100') or {}
    if fid.get('mean') is None or lat.get('mean') is None:
      continue
    color = f'C{i % 10}'
    if points and points.get(label):
      ax.scatter([p[0] for p in points[label]], [p[1] for p in points[label]], s=6, c=color, alpha=0.4)
    ax.errorbar(lat['mean'], fid['mean'], xerr=lat.get('std') or 0.0, yerr=fid.get('std') or 0.0,
                fmt=markers.get(e.get('group'), 'o'), color=color, capsize=3, ms=6,
                label=f'{label} (n={fid["n"]})')
  ax.set_xlabel('latency per 100 images (ms)')
  ax.set_ylabel('FID (lower is better)')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=6, loc='best')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _to_rgb(fig)


def ratio_vs_lambda_plot(rows: Sequence[tuple[float, dict, dict]]) -> np.ndarray:
  """Executed-block ratio and FLOP fraction (mean ± std over seeds) against λ."""
  fig = _figure(5.5, 3.8)
  ax = fig.add_subplot(1, 1, 1)
  rows = sorted(rows, key=lambda r: r[0])
  for j, (name, idx) in enumerate((('executed-block ratio', 1), ('FLOP fraction', 2))):
    xs = [r[0] for r in rows if r[idx].get('mean') is not None]
    ys = [r[idx]['mean'] for r in rows if r[idx].get('mean') is not None]
    es = [r[idx].get('std') or 0.0 for r in rows if r[idx].get('mean') is not None]
    ax.errorbar(xs, ys, yerr=es, fmt='o-', color=f'C{j}', capsize=3, label=name)
  ax.set_xlabel('λ (weight of the compute term)')
  ax.set_ylabel('fraction of the full model')
  ax.set_ylim(0, 1.05)
  ax.set_title('LEES: executed work vs λ (hard gates, mean ± std over seeds)', fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return _to_rgb(fig)


def kl_plot(curves: dict[str, tuple[Sequence[float], Sequence[float]]], threshold: float) -> np.ndarray:
  """KL between successive gate snapshots against the fraction of training."""
  fig = _figure(6.0, 3.8)
  ax = fig.add_subplot(1, 1, 1)
  for i, (name, (x, y)) in enumerate(sorted(curves.items())):
    ax.plot(x, np.maximum(np.asarray(y, np.float64), 1e-12), 'o-', ms=3, color=f'C{i % 10}',
            label=name)
  ax.axhline(threshold, color='k', ls='--', lw=1, label=f'threshold {threshold:g}')
  ax.set_yscale('log')
  ax.set_xlabel('fraction of gate training')
  ax.set_ylabel('KL(successive snapshots)')
  ax.set_title('Gate convergence', fontsize=9)
  ax.legend(fontsize=6)
  fig.tight_layout()
  return _to_rgb(fig)


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
      ['sampler', f'{run.get("sampler")}, {run.get("steps")} steps'],
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
        f'samples, seed {grid.get("grid_seed")}).' + (f' Note: {grid["note"]}.' if grid.get('note') else '')
        + '\n')
  add('\n![FID vs latency](pareto.png)\n')

  add('### Paired t-tests: ' + main + ' against each policy (pairs = seeds)\n')
  trows = []
  for label, t in summary.get('ttests_vs_main', {}).items():
    for m, name in (('fid', 'FID'), ('latency_ms_per_100', 'latency')):
      r = t.get(m) or {}
      trows.append([label, name, r.get('n', 0),
                    '—' if r.get('mean_diff') is None else f'{r["mean_diff"]:+.4g}',
                    '—' if r.get('t') is None else f'{r["t"]:.3f}',
                    '—' if r.get('p') is None else f'{r["p"]:.3g}', r.get('reason', '')])
  add(_md_table(['vs', 'metric', 'n', f'mean diff ({main} − other)', 't', 'p (two-sided)', 'note'],
                trows) if trows else '_no paired policy_')
  add('\nPaper: "error bars over seeds do not overlap except near the no-skip endpoint … '
      '(paired t-test p < 0.05)". `scipy.stats.ttest_rel`, two-sided.\n')

  # --- ablations -------------------------------------------------------------------------
  abl = [l for l in labels if per[l]['group'] == 'ablation']
  add('## Ablations (A1 soft gating, A2 λ = 0, A3 random gates)\n')
  add(_md_table(header, [row(l) for l in ([main] if main in per and per[main]['fid']['n'] else []) + abl])
      if abl else '_no ablation cells_')
  add('\nA1: gates trained with soft gates at the main λ and used soft at inference (every unit '
      'runs, its output blended by g_k(t)), so nothing is skipped and its latency is the full '
      'model\'s. A2: hard gates trained without the compute term. A3: random fixed gates '
      '(`gates.random_gate_params`) with keep fraction = the executed-block ratio of the '
      f'{main} cell of the same seed.\n')

  # --- robustness ------------------------------------------------------------------------
  add('## Robustness (CIFAR-10-C)\n')
  rob_labels = [l for l in labels if per[l].get('delta_fid', {}).get('n')]
  if rob_labels:
    add(f'**ΔFID definition (ours; the paper gives none).** For each corruption c at severity '
        f'{run.get("severity")}: ΔFID_c = FID(samples, C_c) − FID(samples, clean), where C_c are '
        f'the first {run.get("robustness_reference_size")} test images of '
        f'`{run.get("robustness_dataset")}/<c>_{run.get("severity")}` and *clean* the same split and '
        'count of the uncorrupted dataset; ΔFID is the mean of ΔFID_c over the corruptions. The '
        'samples are the cell\'s own samples; the same references and the same procedure for '
        'every policy. A smaller ΔFID means the samples are as far from the corrupted data as '
        'from the clean data, i.e. less corruption-like.\n')
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
                  _fmt(e['kl_converged_fraction'], 2, 100, True)])
  if orows:
    add(_md_table(['policy', 'gate-training steps', 'gate training wall time (s)',
                   'of one backbone epoch', 'KL < threshold after (of training)'], orows))
  if ep:
    add(f'\nOne backbone training epoch: {ep["steps_per_epoch"]:.1f} steps × {ep["step_seconds"]*1e3:.1f} ms '
        f'= {ep["epoch_seconds"]:.1f} s ({ep["measured_steps"]} timed pretraining steps at batch '
        f'{ep["batch_size"]} on {ep["device"]} × {ep["num_devices"]}, {ep["train_examples"]} training '
        f'images of `{ep["dataset"]}`). Gate-training wall time includes backbone loading and '
        'compilation.\n')
  add(f'\n**KL definition.** Gates are snapshotted at every logging step of gate training (step 0 = '
      'the initialisation α = β = 0). Between successive snapshots, KL = mean over units k and the '
      'sampler\'s timesteps t_i of KL(Bernoulli(g_k^new(t_i)) ‖ Bernoulli(g_k^old(t_i))), '
      'g = σ(α t + β) being the probability that the hard gate executes the unit. Convergence = the '
      f'first snapshot after which every successive KL stays below {run.get("kl_threshold")}, as a '
      'fraction of training steps (— when it never settles). The value depends on the snapshot '
      'interval (`gates.log_every`).\n')
  add(f'\nPaper: {PAPER_OVERHEAD}. (52 min being < 5 % of one epoch would make an epoch > 17 h, far '
      'more than one CIFAR-10 epoch of the DDPM UNet; our table reports the measured ratio.)\n')
  curves = {}
  for l in trained:
    for r in by_label.get(l, []):
      conv = r.get('gate_convergence') or {}
      if conv.get('steps') and r.get('gate_train_steps'):
        curves[f'{l} s{r["seed"]}'] = ([s / r['gate_train_steps'] for s in conv['steps']], conv['kl'])
  if curves:
    save_png(kl_plot(curves, float(run.get('kl_threshold') or 0.05)), files.join(out, 'kl.png'))
    add('![gate convergence](kl.png)\n')

  # --- gates -----------------------------------------------------------------------------
  add('## Learned gates\n')
  lam_rows = []
  for l in labels:
    recs = by_label.get(l, [])
    if recs and recs[0].get('kind') == 'lees' and recs[0].get('form') == 'hard' and recs[0].get('lam') is not None:
      lam_rows.append((float(recs[0]['lam']), per[l]['block_ratio'], per[l]['flop_fraction']))
  if lam_rows:
    save_png(ratio_vs_lambda_plot(lam_rows), files.join(out, 'ratio_vs_lambda.png'))
    add(_md_table(['λ', 'executed blocks', 'FLOPs'],
                  [[f'{x:g}', _fmt(b, 1, 100, True), _fmt(fl, 1, 100, True)] for x, b, fl in sorted(lam_rows)]))
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
  save_png(results_pareto_plot({l: per[l] for l in labels}, points), files.join(out, 'pareto.png'))
  path = files.join(out, 'report.md')
  files.write_text(path, '\n'.join(md) + '\n')
  return path
