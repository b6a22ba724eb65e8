"""FLOP accounting against XLA's own count (`cost_analysis` of the compiled forward pass).

Measured (jax 0.10.2, CPU): the paper UNet's total is 0.11 % above XLA's, each unit's saving
within 0.062 % of XLA's, the all-skipped program 0.6 %; on the tiny UNet the total is within
0.009 % and each unit's saving within 0.13 %. Tolerances sit a small margin above.
"""

import jax
import numpy as np
import pytest

from lees_jax import cost, models
from lees_jax import gates as gating
from lees_jax.models import unet

from conftest import TINY_SPEC

# XLA's count is taken on the optimised HLO, before LLVM code generation: compiling with the
# CPU backend's LLVM optimisation off gives bitwise the same 'flops' (checked below and, when
# this was written, on 6 programs of the tiny and paper UNets) in about half the compile time.
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def _xla_flops(model, params, keep=None):
  """cost.xla_flops (batch 1) with the fast compile options above."""
  x = jax.ShapeDtypeStruct((1,) + tuple(model.input.shape), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.int32)
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  fn = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, gates=mask))
  analysis = fn.lower(params, x, t).compile(compiler_options=FAST_COMPILE).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


@pytest.fixture(scope='module')
def paper():
  """The 35.7M-parameter DDPM UNet (shapes only: XLA counts FLOPs without values)."""
  model = unet.UNet(unet.UNetSpec())
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  return model, shapes, cost.model_cost(model), _xla_flops(model, shapes)


def _one_by_one_conv(res, cin, cout):
  """A 1x1 convolution by hand: res^2 outputs x cout, each cin multiply-adds (2 FLOPs) + a bias."""
  return res * res * cout * (2 * cin + 1)


def test_paper_unet_total_and_shares_match_xla(paper):
  model, shapes, mc, xla_total = paper
  assert len(mc.units) == len(unet.gateable_units(model.spec)) == 28
  # README: 11.68 GFLOPs per image per step.
  assert mc.total_flops / 1e9 == pytest.approx(11.68, abs=0.005)
  assert mc.total_flops == pytest.approx(xla_total, rel=1.5e-3)
  shares = mc.shares()
  by_name = {u.name: u for u in mc.units}
  # (unit, its 1x1 shortcut by hand: what still runs when it is skipped)
  cases = [('down_0_res_0', 0), ('down_1_attn_0', 0),
           ('up_0_res_0', _one_by_one_conv(32, 384, 128)),
           ('up_1_res_0', _one_by_one_conv(16, 512, 256))]
  for name, shortcut in cases:
    u = by_name[name]
    assert u.skip_flops == shortcut, name
    keep = [v.name != name for v in mc.units]
    saved = xla_total - _xla_flops(model, shapes, keep)
    # The unit's share of the forward pass minus what its skip still runs = XLA's saving.
    assert shares[name] - shortcut / mc.total_flops == pytest.approx(saved / xla_total, rel=2e-3), name
  # Nothing gated: only the always-run part and the 13 shortcuts remain.
  k = len(mc.units)
  none = _xla_flops(model, shapes, [False] * k)
  assert none == cost.xla_flops(model, shapes, [False] * k)  # the fast compile counts the same
  assert mc.flop_fraction(np.zeros((1, k), bool)) == pytest.approx(none / xla_total, rel=1e-2)
  assert sum(shares.values()) == pytest.approx(1.0)


def test_conv_count_by_hand():
  # 3x3 'same' conv on 4x4, 1->1 channel: per axis 3*4-2 = 10 real taps -> 100 MACs + 16 bias adds.
  assert unet._conv(4, 3, 1, 1) == 2 * 100 + 16


def test_flop_fraction_of_masks():
  mc = cost.model_cost(unet.UNet(unet.UNetSpec()))
  k = len(mc.units)
  assert mc.flop_fraction(np.ones((3, k), bool)) == pytest.approx(1.0)
  # Two steps: all units, then all but the first (down_0_res_0, no shortcut): by hand.
  masks = np.ones((2, k), bool)
  masks[1, 0] = False
  want = 1 - 0.5 * mc.units[0].run_flops / mc.total_flops
  assert mc.flop_fraction(masks) == pytest.approx(want, rel=1e-12)
  with pytest.raises(ValueError, match='masks'):
    mc.flop_fraction(np.ones((2, k - 1), bool))


def test_matches_xla_cost_analysis():
  model = unet.UNet(TINY_SPEC)  # shapes only, as above (no parameter initialisation)
  params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  mc = cost.model_cost(model)
  xla_total = _xla_flops(model, params)
  assert mc.total_flops == pytest.approx(xla_total, rel=2e-4)
  k = len(mc.units)
  for i in range(k):
    keep = [True] * k
    keep[i] = False
    saved_xla = xla_total - _xla_flops(model, params, keep)
    u = mc.units[i]
    assert u.run_flops - u.skip_flops == pytest.approx(saved_xla, rel=1.5e-3), u.name
