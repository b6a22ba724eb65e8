"""Figures from gate policies and result files (matplotlib, Agg backend, no display needed).

Every figure is returned as a uint8 RGB array (so gate training can log it to TensorBoard and
the experiment report can save it) and written with `save_png`. Kept apart from the markdown
report (`lees_jax.report`) because training and evaluation draw figures too: `gate_heatmap`
(LEES gates g_k(t) over normalised time), `mask_heatmap` (executed units of any hard policy),
`image_grid` (samples), `pareto_plot` (the ASE drop-length grid), and the report's
`results_pareto_plot`, `ratio_vs_lambda_plot` and `convergence_plot`.
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


def results_pareto_plot(per_label: dict, points: dict[str, list[tuple[float, float]]] | None = None,
                        title: str = 'FID vs latency (mean ± std over seeds)', *,
                        settings: dict[str, str] | None = None) -> np.ndarray:
  """FID against latency per 100 images, one marker with x/y error bars per policy; thin
  dots are the individual seeds. ``settings`` maps a label sampled by another solver (the
  few-step rows) to its setting, e.g. 'DDIM-10': one marker shape per setting, hollow, so
  every method of the study shares one plot and each solver stays recognisable."""
  fig = _figure(8.0, 5.2)
  ax = fig.add_subplot(1, 1, 1)
  markers = {'baseline': 's', 'lees': 'o', 'ablation': '^'}
  settings = settings or {}
  setting_markers = dict(zip(sorted(set(settings.values())), 'DvP*XhpH<>'))
  for i, (label, e) in enumerate(per_label.items()):
    fid, lat = e.get('fid') or {}, e.get('latency_ms_per_100') or {}
    if fid.get('mean') is None or lat.get('mean') is None:
      continue
    color = f'C{i % 10}'
    if points and points.get(label):
      ax.scatter([p[0] for p in points[label]], [p[1] for p in points[label]], s=6, c=color, alpha=0.4)
    hollow = label in settings
    marker = setting_markers[settings[label]] if hollow else markers.get(e.get('group'), 'o')
    ax.errorbar(lat['mean'], fid['mean'], xerr=lat.get('std') or 0.0, yerr=fid.get('std') or 0.0,
                fmt=marker, color=color, capsize=3, ms=7 if hollow else 6,
                mfc='none' if hollow else color, label=f'{label} (n={fid["n"]})')
  ax.set_xlabel('latency per 100 images (ms)')
  ax.set_ylabel('FID (lower is better)')
  ax.set_title(title + ('; hollow: ' + ', '.join(f'{m} {s}' for s, m in setting_markers.items())
                        if setting_markers else ''), fontsize=8)
  ax.legend(fontsize=5 if len(per_label) > 14 else 6, loc='best', ncol=2 if len(per_label) > 14 else 1)
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


def convergence_plot(curves: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float]]],
                     stable_share: float) -> np.ndarray:
  """Gate convergence against the fraction of training: the share of hard decisions that no
  longer change (left) and the KL to the previous fraction's gates (right)."""
  fig = _figure(9.0, 3.6)
  ax_s, ax_k = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for i, (name, (x, stable, kl)) in enumerate(sorted(curves.items())):
    ax_s.plot(x, stable, 'o-', ms=3, color=f'C{i % 10}', label=name)
    ax_k.plot(x, np.maximum(np.asarray(kl, np.float64), 1e-12), 'o-', ms=3, color=f'C{i % 10}')
  ax_s.axhline(stable_share, color='k', ls='--', lw=1, label=f'converged: {stable_share:g}')
  ax_s.set_ylim(0, 1.02)
  ax_s.set_xlabel('fraction of gate training')
  ax_s.set_ylabel('hard decisions that no longer change')
  ax_s.legend(fontsize=6)
  ax_k.set_yscale('log')
  ax_k.set_xlabel('fraction of gate training')
  ax_k.set_ylabel('KL to the previous fraction')
  fig.suptitle('Gate convergence', fontsize=9)
  fig.tight_layout()
  return _to_rgb(fig)
