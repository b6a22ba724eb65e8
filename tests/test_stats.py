"""lees_jax.stats: mean ± std, paired t-tests, per-label summaries, gate convergence (KL)."""

import math

import numpy as np
import pytest

from lees_jax import stats


def test_paired_ttest_matches_scipy_and_the_formula():
  from scipy import stats as scipy_stats
  a = [3.08, 3.05, 3.11, 3.07, 3.10]
  b = [3.25, 3.21, 3.30, 3.24, 3.22]
  r = stats.paired_ttest(a, b)
  ref = scipy_stats.ttest_rel(a, b)
  assert r['t'] == pytest.approx(ref.statistic, rel=1e-12)
  assert r['p'] == pytest.approx(ref.pvalue, rel=1e-12)
  # By hand: t = mean(d) / (sd(d) / sqrt(n)), sd with n - 1; p two-sided from t(n - 1).
  d = np.subtract(a, b)
  n = len(d)
  t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
  assert r['t'] == pytest.approx(t, rel=1e-12)
  assert r['p'] == pytest.approx(2 * scipy_stats.t.sf(abs(t), n - 1), rel=1e-9)
  assert r['n'] == 5 and r['mean_diff'] == pytest.approx(d.mean())
  assert r['p'] < 0.05

  one = stats.paired_ttest([1.0], [2.0])
  assert one['p'] is None and one['t'] is None and 'at least 2' in one['reason']
  same = stats.paired_ttest([1.0, 2.0, 3.0], [0.5, 1.5, 2.5])
  assert same['p'] is None and 'identical' in same['reason']
  with pytest.raises(ValueError, match='equal length'):
    stats.paired_ttest([1, 2], [1])


def test_mean_std():
  assert stats.mean_std([1.0, 2.0, 3.0]) == {'mean': 2.0, 'std': 1.0, 'n': 3}
  assert stats.mean_std([4.0, None]) == {'mean': 4.0, 'std': None, 'n': 1}
  assert stats.mean_std([]) == {'mean': None, 'std': None, 'n': 0}


def test_gate_convergence_kl():
  ts = [0, 499, 999]
  p = stats.gate_probabilities([2.0], [-1.0], ts, 1000)
  np.testing.assert_allclose(p[:, 0], 1 / (1 + np.exp(-(2.0 * np.array([0.001, 0.5, 1.0]) - 1.0))))
  # KL(Bern(p) || Bern(0.5)) by hand for the first snapshot.
  hist = [{'step': 10, 'alpha': [2.0], 'beta': [-1.0]},
          {'step': 20, 'alpha': [2.0], 'beta': [-1.0]},
          {'step': 30, 'alpha': [2.1], 'beta': [-1.0]}]
  conv = stats.gate_convergence(hist, ts, 1000, num_train_steps=40, threshold=0.05)
  q = p[:, 0]
  kl0 = np.mean(q * np.log(q / 0.5) + (1 - q) * np.log((1 - q) / 0.5))
  assert conv['steps'] == [10, 20, 30]
  assert conv['kl'][0] == pytest.approx(kl0)
  assert conv['kl'][1] == 0.0
  # kl0 is above 0.05, every later one below: converged after step 10 of 40.
  assert kl0 >= 0.05 and conv['kl'][2] < 0.05
  assert conv['converged_step'] == 10 and conv['converged_fraction'] == 0.25
  moving = stats.gate_convergence(hist[:1], ts, 1000, 40, 0.05)
  assert moving['converged_fraction'] is None


def test_per_label_stats_and_ttests_vs_main():
  recs = [{'label': 'L', 'group': 'lees', 'seed': s, 'lam': 0.05, 'fid': f} for s, f in ((1, 3.0), (0, 2.0))]
  recs += [{'label': 'B', 'group': 'baseline', 'seed': s, 'fid': f} for s, f in ((0, 2.5), (1, 3.7))]
  groups = stats.by_label(recs)
  assert [r['seed'] for r in groups['L']] == [0, 1]
  per = stats.per_label_stats(groups, ['B', 'L', 'missing'], ('fid',))
  assert per['L']['fid'] == stats.mean_std([2.0, 3.0]) and per['L']['seeds'] == [0, 1]
  assert per['L']['lam'] == 0.05 and per['B']['group'] == 'baseline'
  assert per['missing'] == {'group': None, 'seeds': [], 'lam': None, 'fid': stats.mean_std([])}
  tt = stats.ttests_vs(groups, ['B', 'L'], 'L', ('fid',))
  assert list(tt) == ['B'] and tt['B']['seeds'] == [0, 1]
  assert tt['B']['fid'] == stats.paired_ttest([2.0, 3.0], [2.5, 3.7])
