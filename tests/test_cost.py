"""FLOP accounting: shares, policy fractions, and agreement with XLA's own count."""

import numpy as np
import pytest

from lees_jax import cost
from lees_jax.models import unet


def test_shares_sum_to_one():
  for spec in [unet.UNetSpec(), unet.UNetSpec(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=8)]:
    mc = cost.model_cost(spec)
    assert sum(mc.shares().values()) == pytest.approx(1.0)
    assert len(mc.units) == len(unet.gateable_units(spec))


def test_conv_count_by_hand():
  # 3x3 'same' conv on 4x4, 1->1 channel: per axis 3*4-2 = 10 real taps -> 100 MACs + 16 bias adds.
  assert cost._conv(4, 3, 1, 1) == 2 * 100 + 16


def test_flop_fraction_of_masks():
  mc = cost.model_cost(unet.UNetSpec())
  k = len(mc.units)
  assert mc.flop_fraction(np.ones((3, k), bool)) == pytest.approx(1.0)
  none = mc.flop_fraction(np.zeros((1, k), bool))
  skip = sum(u.skip_flops for u in mc.units)
  assert none == pytest.approx((mc.always_flops + skip) / mc.total_flops)


def test_matches_xla_cost_analysis(tiny_model):
  model, params = tiny_model
  mc = cost.model_cost(model.spec)
  xla_total = cost.xla_flops(model, params)
  assert mc.total_flops == pytest.approx(xla_total, rel=0.03)
  k = len(mc.units)
  for i in range(k):
    keep = [True] * k
    keep[i] = False
    saved_xla = xla_total - cost.xla_flops(model, params, keep)
    u = mc.units[i]
    assert u.run_flops - u.skip_flops == pytest.approx(saved_xla, rel=0.03), u.name
