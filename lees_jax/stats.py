"""Statistics of a study's results: mean ± std over seeds, paired t-tests, gate convergence.

Pure functions of result records and gate snapshots (no files, no models), so every number in
a summary or report can be recomputed from the files it was built from.
"""

from __future__ import annotations

import math
import statistics

import numpy as np


# ---------------------------------------------------------------------------
# Over seeds.
# ---------------------------------------------------------------------------


def mean_std(values) -> dict:
  """{'mean', 'std' (sample std, ddof=1; null for n < 2), 'n'} of the finite values."""
  v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
  if not v:
    return {'mean': None, 'std': None, 'n': 0}
  return {'mean': statistics.fmean(v), 'std': statistics.stdev(v) if len(v) > 1 else None,
          'n': len(v)}


def paired_ttest(a, b) -> dict:
  """Two-sided paired t-test of a against b (``scipy.stats.ttest_rel``), a[i] paired with b[i].

  Returns t, p, n, the mean difference (a − b) and, where no test is possible, p = None with
  the reason (n < 2, or differences that are all equal so that their std is zero).
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f'paired samples must be two 1-D arrays of equal length, got {a.shape} and {b.shape}')
  n = int(a.shape[0])
  out = {'n': n, 'mean_diff': float(np.mean(a - b)) if n else None, 't': None, 'p': None}
  if n < 2:
    out['reason'] = f'n = {n} paired seed(s): a paired t-test needs at least 2'
    return out
  d = a - b
  if np.allclose(d, d[0], rtol=0.0, atol=0.0):
    out['reason'] = 'every paired difference is identical (zero variance): t is undefined'
    return out
  from scipy import stats  # pylint: disable=g-import-not-at-top
  res = stats.ttest_rel(a, b)
  out.update(t=float(res.statistic), p=float(res.pvalue))
  return out


def by_label(results: list[dict]) -> dict[str, list[dict]]:
  """Records grouped by their 'label', each group sorted by seed."""
  out: dict[str, list[dict]] = {}
  for r in results:
    out.setdefault(r['label'], []).append(r)
  for v in out.values():
    v.sort(key=lambda r: r['seed'])
  return out


def per_label_stats(groups: dict[str, list[dict]], labels, metrics) -> dict:
  """For each label: its group, seeds, lam and `mean_std` of every metric over its records
  (and of ΔFID per corruption when the records carry robustness results)."""
  per_label = {}
  for label in labels:
    recs = groups.get(label, [])
    entry = {'group': recs[0]['group'] if recs else None, 'seeds': [r['seed'] for r in recs],
             'lam': recs[0].get('lam') if recs else None}
    for m in metrics:
      entry[m] = mean_std([r.get(m) for r in recs])
    if recs and recs[0].get('robustness'):
      names = sorted({c for r in recs for c in (r.get('robustness') or {}).get('per_corruption', {})})
      entry['delta_fid_per_corruption'] = {
          c: mean_std([(r.get('robustness') or {}).get('per_corruption', {}).get(c) for r in recs])
          for c in names}
    per_label[label] = entry
  return per_label


def ttests_vs(groups: dict[str, list[dict]], labels, main_label: str, metrics) -> dict:
  """`paired_ttest` of the main label against every other label, pairs = shared seeds."""
  ttests = {}
  main = {r['seed']: r for r in groups.get(main_label, [])}
  for label in labels:
    if label == main_label or label not in groups:
      continue
    other = {r['seed']: r for r in groups[label]}
    seeds = sorted(set(main) & set(other))
    ttests[label] = {'seeds': seeds}
    for m in metrics:
      pairs = [(main[s].get(m), other[s].get(m)) for s in seeds
               if main[s].get(m) is not None and other[s].get(m) is not None]
      ttests[label][m] = paired_ttest([p[0] for p in pairs], [p[1] for p in pairs])
  return ttests


# ---------------------------------------------------------------------------
# Gate convergence.
# ---------------------------------------------------------------------------


def bernoulli_kl(p, q, eps: float = 1e-6):
  """Elementwise KL(Bernoulli(p) || Bernoulli(q))."""
  p = np.clip(np.asarray(p, np.float64), eps, 1 - eps)
  q = np.clip(np.asarray(q, np.float64), eps, 1 - eps)
  return p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))


def gate_probabilities(alpha, beta, timesteps, num_timesteps: int) -> np.ndarray:
  """(steps, K) g_k(t_i) = sigmoid(alpha_k t_i + beta_k), t = (timestep + 1) / T, in float64."""
  from lees_jax import policies  # pylint: disable=g-import-not-at-top
  t = policies.normalized_time(timesteps, num_timesteps, np.float64)
  return policies.gate_values({'alpha': np.asarray(alpha, np.float64),
                               'beta': np.asarray(beta, np.float64)}, t)


def gate_convergence(history: list[dict], timesteps, num_timesteps: int, num_train_steps: int,
                     threshold: float) -> dict:
  """KL between successive gate snapshots and where it stays below ``threshold``."""
  if not history:
    return {'steps': [], 'kl': [], 'converged_step': None, 'converged_fraction': None,
            'threshold': threshold}
  k = len(history[0]['alpha'])
  snaps = history if int(history[0]['step']) == 0 else (
      [{'step': 0, 'alpha': [0.0] * k, 'beta': [0.0] * k}] + history)
  probs = [gate_probabilities(s['alpha'], s['beta'], timesteps, num_timesteps) for s in snaps]
  kl = [float(bernoulli_kl(probs[i], probs[i - 1]).mean()) for i in range(1, len(snaps))]
  steps = [int(s['step']) for s in snaps[1:]]
  above = [i for i, v in enumerate(kl) if v >= threshold]
  if not above:
    conv_step = int(snaps[0]['step'])
  elif above[-1] == len(kl) - 1:
    conv_step = None  # still moving at the end of training
  else:
    conv_step = steps[above[-1]]
  total = max(1, int(num_train_steps))
  return {'steps': steps, 'kl': kl, 'converged_step': conv_step, 'threshold': threshold,
          'converged_fraction': None if conv_step is None else conv_step / total}
