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


def holm(p_values) -> list:
  """Holm's step-down adjusted p-values (family-wise error control), in the input's order.

  Sorted ascending p_(1) <= ... <= p_(m): adjusted p_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)).
  None entries (no test possible) stay None and do not count in m.
  """
  idx = [i for i, p in enumerate(p_values) if p is not None]
  order = sorted(idx, key=lambda i: p_values[i])
  m = len(order)
  out = [None] * len(p_values)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * float(p_values[i])))
    out[i] = running
  return out


def holm_adjust_ttests(ttests: dict, metrics) -> dict:
  """Adds ``p_holm`` to every test of `ttests_vs`'s result: one Holm family over all the
  comparisons of the table (every other policy x every metric)."""
  keys = [(label, m) for label in ttests for m in metrics if m in ttests[label]]
  adjusted = holm([ttests[label][m].get('p') for label, m in keys])
  for (label, m), p in zip(keys, adjusted):
    ttests[label][m]['p_holm'] = p
    ttests[label][m]['holm_family_size'] = sum(a is not None for a in adjusted)
  return ttests


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
                     fractions, stable_share: float) -> dict:
  """Where gate training settles, measured at fixed fractions of training.

  ``history``: gate snapshots {'step', 'alpha', 'beta'} (any steps; step 0 = alpha = beta = 0 is
  assumed when absent). For each f in ``fractions`` the snapshot taken is the last one at or
  before step f * num_train_steps. Per fraction:
    kl     -- mean over units k and sampler timesteps t_i of KL(Bern(g_k^f(t_i)) || Bern(g_k^prev(t_i))),
              prev the previous fraction's snapshot (the start for the first): how much the gates
              moved in that slice of training;
    stable -- the share of hard (unit, sampler step) decisions (logit > 0) at f that equal the
              decisions of every later fraction's snapshot: decisions that no longer change.
  ``converged_fraction`` is the first f whose stable share is >= ``stable_share``. Unlike a KL
  threshold between nearby snapshots (a Bernoulli KL is at most ~Δlogit²/8, so it is small at any
  snapshot interval short enough), the stable share reaches 1 at the end by definition and
  says how early the executed set was fixed.
  """
  fractions = [float(f) for f in fractions]
  if not history or not fractions:
    return {'fractions': fractions, 'steps': [], 'kl': [], 'stable': [],
            'converged_fraction': None, 'stable_share': stable_share}
  if sorted(fractions) != fractions or not 0.0 < fractions[0] or fractions[-1] > 1.0:
    raise ValueError(f'convergence fractions must increase within (0, 1], got {fractions}')
  k = len(history[0]['alpha'])
  snaps = sorted(history, key=lambda s: int(s['step']))
  if int(snaps[0]['step']) != 0:
    snaps = [{'step': 0, 'alpha': [0.0] * k, 'beta': [0.0] * k}] + snaps
  total = max(1, int(num_train_steps))
  picked = []
  for f in fractions:
    at = [s for s in snaps if int(s['step']) <= f * total + 1e-9]
    picked.append(at[-1])
  t = np.asarray(timesteps)
  probs = [gate_probabilities(s['alpha'], s['beta'], t, num_timesteps) for s in [snaps[0]] + picked]
  from lees_jax import policies  # pylint: disable=g-import-not-at-top
  # The decisions exactly as the sampler makes them (policies' masks).
  hard = [policies.LeesPolicy(np.asarray(s['alpha'], np.float32), np.asarray(s['beta'], np.float32)
                              ).step_masks(t, num_timesteps, k) for s in picked]
  kl = [float(bernoulli_kl(probs[i + 1], probs[i]).mean()) for i in range(len(picked))]
  stable = []
  for i, h in enumerate(hard):
    same = np.ones_like(h, bool)
    for later in hard[i + 1:]:
      same &= h == later
    stable.append(float(same.mean()))
  conv = next((f for f, st in zip(fractions, stable) if st >= stable_share), None)
  return {'fractions': fractions, 'steps': [int(s['step']) for s in picked], 'kl': kl,
          'stable': stable, 'converged_fraction': conv, 'stable_share': stable_share}
