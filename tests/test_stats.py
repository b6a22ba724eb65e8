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


def test_gate_convergence_on_a_synthetic_trajectory():
  ts = [0, 499, 999]
  p = stats.gate_probabilities([2.0], [-1.0], ts, 1000)
  np.testing.assert_allclose(p[:, 0], 1 / (1 + np.exp(-(2.0 * np.array([0.001, 0.5, 1.0]) - 1.0))))
  # Two units over 100 steps, snapshots every 10. Unit 0 (alpha 2, beta moving from -1.5 up by
  # 0.02 per step): its logit at t = (ts + 1) / 1000 is 2t + beta; at the three sampler times
  # t = 0.001, 0.5, 1 it is on where 2t + beta > 0. Unit 1 is fixed on (beta = 1).
  hist = [{'step': s, 'alpha': [2.0, 0.0], 'beta': [-1.5 + 0.02 * s, 1.0]} for s in range(10, 101, 10)]
  conv = stats.gate_convergence(hist, ts, 1000, 100, fractions=(0.25, 0.5, 0.75, 1.0),
                                stable_share=1.0)
  # Snapshots: the last at or before 25, 50, 75, 100.
  assert conv['steps'] == [20, 50, 70, 100]
  # Unit 0's decisions by hand: beta = -1.1 (step 20): on at t = 1 only (2 - 1.1 > 0);
  # -0.5 (step 50): on at t = 0.5? 1 - 0.5 > 0 yes, t = 0.001 no; -0.1 (step 70): on at 0.5, 1;
  # +0.5 (step 100): on everywhere. Unit 1 is always on. Decisions that no longer change
  # (over 6 (unit, step) pairs): step 20 -> unit 1 (3) + unit 0 at t = 1 (1) = 4/6; step 50 ->
  # 5/6; step 70 -> 5/6 (t = 0.001 still changes); step 100 -> 6/6.
  np.testing.assert_allclose(conv['stable'], [4 / 6, 5 / 6, 5 / 6, 1.0], rtol=0, atol=1e-12)
  assert conv['converged_fraction'] == 1.0
  assert stats.gate_convergence(hist, ts, 1000, 100, (0.25, 0.5, 0.75, 1.0),
                                stable_share=0.8)['converged_fraction'] == 0.5
  # KL per fraction against the previous snapshot (the first against the start, alpha = beta = 0).
  def g(a, b):
    return stats.gate_probabilities(a, b, ts, 1000)
  start = g([0.0, 0.0], [0.0, 0.0])
  want0 = np.mean(stats.bernoulli_kl(g([2.0, 0.0], [-1.1, 1.0]), start))
  q, r = g([2.0, 0.0], [-1.1, 1.0])[:, 0], start[:, 0]
  by_hand = np.mean(np.concatenate([q * np.log(q / r) + (1 - q) * np.log((1 - q) / (1 - r)),
                                    np.full(3, np.log(2 * 1 / (1 + np.exp(-1.0))) / (1 + np.exp(-1.0))
                                            + np.log(2 * (1 - 1 / (1 + np.exp(-1.0))))
                                            * (1 - 1 / (1 + np.exp(-1.0))))]))
  assert conv['kl'][0] == pytest.approx(want0, abs=1e-12) and conv['kl'][0] == pytest.approx(by_hand)
  assert conv['kl'][3] == pytest.approx(np.mean(stats.bernoulli_kl(g([2.0, 0.0], [0.5, 1.0]),
                                                                   g([2.0, 0.0], [-0.1, 1.0]))))
  # No snapshots: nothing to say.
  assert stats.gate_convergence([], ts, 1000, 100, (0.5, 1.0), 0.9)['converged_fraction'] is None
  with pytest.raises(ValueError, match='increase'):
    stats.gate_convergence(hist, ts, 1000, 100, (0.5, 0.25), 0.9)


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


def test_holm_by_hand():
  # m = 4 tests (None does not count): sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (kept
  # monotone: max(0.06, 2 * 0.03)), min(1, 0.5) = 0.5.
  got = stats.holm([0.03, None, 0.5, 0.01, 0.02])
  assert got[1] is None
  np.testing.assert_allclose([got[0], got[2], got[3], got[4]], [0.06, 0.5, 0.04, 0.06], rtol=0,
                             atol=1e-15)
  assert stats.holm([0.4, 0.6]) == [0.8, 0.8]  # 2 * 0.4, then max(0.8, min(1, 0.6))
  assert stats.holm([]) == []
