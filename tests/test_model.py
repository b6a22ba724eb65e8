"""The gated UNet: parameter count, skip semantics, static vs lax.cond vs training gates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import scale_residual_branches
from lees_jax import gates, models, policies
from lees_jax.models import layers, unet


def _inputs(batch=2, seed=1):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (batch, 32, 32, 3))
  t = jax.random.randint(k2, (batch,), 0, 1000)
  return x, t


def test_default_config_has_published_parameter_count():
  model = unet.UNet(unet.UNetSpec())
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  assert models.count_params(shapes) == 35_746_307  # Ho et al. 2020, REFERENCE §1
  units = unet.gateable_units(model.spec)
  assert len(units) == 28
  assert sum(u.kind == 'res' for u in units) == 22
  assert sum(u.kind == 'attn' for u in units) == 6
  # 13 ResBlocks change channels and carry a 1x1 shortcut (REFERENCE §1).
  assert sum(u.kind == 'res' and u.in_ch != u.out_ch for u in units) == 13
  assert sum('conv_shortcut' in v for v in shapes.values()) == 13


def test_all_on_masks_equal_ungated_model(tiny_model):
  model, params = tiny_model
  x, t = _inputs()
  k = model.num_units
  ref = model.apply({'params': params}, x, t)
  static = model.apply({'params': params}, x, t, gates=gates.StaticMask.all(k))
  cond = model.apply({'params': params}, x, t, gates=gates.CondMask(jnp.ones(k, bool)))
  np.testing.assert_array_equal(np.asarray(static), np.asarray(ref))
  np.testing.assert_allclose(np.asarray(cond), np.asarray(ref), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_skipped_units_follow_skip_semantics(tiny_model, seed):
  model, params = tiny_model
  units = model.units
  rng = np.random.default_rng(seed)
  keep = tuple(bool(v) for v in rng.random(len(units)) < 0.5)
  x, t = _inputs(seed=seed)
  got = model.apply({'params': params}, x, t, gates=gates.StaticMask(keep))
  oracle = model.apply({'params': scale_residual_branches(params, units, np.asarray(keep, np.float32))}, x, t)
  np.testing.assert_allclose(np.asarray(got), np.asarray(oracle), atol=1e-5, rtol=1e-5)
  cond = model.apply({'params': params}, x, t, gates=gates.CondMask(jnp.asarray(keep)))
  np.testing.assert_allclose(np.asarray(cond), np.asarray(got), atol=1e-5, rtol=1e-5)


def test_resblock_skip_is_identity_or_1x1_projection_by_hand():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
  temb = jnp.zeros((2, 64))
  for out_ch in (16, 24):
    block = layers.ResBlock(out_ch, num_groups=8)
    variables = block.init(jax.random.PRNGKey(1), x, temb)
    got = block.apply(variables, x, method=block.skip)
    if out_ch == 16:
      np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    else:
      sc = variables['params']['conv_shortcut']
      by_hand = np.einsum('bhwc,cd->bhwd', np.asarray(x), np.asarray(sc['kernel'][0, 0])) + sc['bias']
      np.testing.assert_allclose(np.asarray(got), by_hand, atol=1e-5)
  attn = layers.AttnBlock(16, num_groups=8)
  v = attn.init(jax.random.PRNGKey(2), x)
  np.testing.assert_array_equal(np.asarray(attn.apply(v, x, method=attn.skip)), np.asarray(x))


def test_static_mask_removes_skipped_units_from_the_program(tiny_model):
  model, params = tiny_model
  x, t = _inputs()
  k = model.num_units
  full = jax.jit(lambda p: model.apply({'params': p}, x, t)).lower(params).as_text()
  none = jax.jit(lambda p: model.apply({'params': p}, x, t,
                                       gates=gates.StaticMask((False,) * k))).lower(params).as_text()
  assert full.count('convolution') > none.count('convolution')
  # Without any unit only the stem, resampling, head and 1x1 shortcuts are convolutions.
  n_shortcuts = sum(u.kind == 'res' and u.in_ch != u.out_ch for u in model.units)
  n_resample = sum(op.kind in ('down', 'up') for op in unet.unet_layout(model.spec))
  assert none.count('stablehlo.convolution') == 2 + n_resample + n_shortcuts


def test_soft_gates_blend_at_03_and_07(tiny_model):
  model, params = tiny_model
  x, t = _inputs()
  k = model.num_units
  rng = np.random.default_rng(4)
  g = rng.choice([0.3, 0.7], size=(2, k))   # per sample and unit
  g[0, :2], g[1, :2] = (0.3, 0.7), (0.7, 0.3)
  logits = jnp.asarray(np.log(g / (1 - g)), jnp.float32)
  soft = np.asarray(model.apply({'params': params}, x, t,
                                gates=gates.SoftGates(logits)))
  apply = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))
  for b in range(2):
    oracle = apply(scale_residual_branches(params, model.units, g[b].astype(np.float32)), x[b:b + 1], t[b:b + 1])
    np.testing.assert_allclose(soft[b:b + 1], np.asarray(oracle), atol=3e-6, rtol=0)  # measured 1.4e-6
  # Not a near-identity: the blend is far from both the full and the all-skipped network.
  full = np.asarray(model.apply({'params': params}, x, t))
  none = np.asarray(model.apply({'params': params}, x, t, gates=gates.StaticMask((False,) * k)))
  assert np.abs(soft - full).max() > 1e-2 and np.abs(soft - none).max() > 1e-2


def test_hard_training_gates_forward_equals_static_mask(tiny_model):
  model, params = tiny_model
  x, t = _inputs()
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(model.num_units,)).astype(np.float32)
  keep = tuple(bool(v) for v in logits > 0)
  got = model.apply({'params': params}, x, t, gates=gates.StraightThrough(jnp.asarray(logits)))
  want = model.apply({'params': params}, x, t, gates=gates.StaticMask(keep))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('unit_on', [True, False])
def test_straight_through_gradient_matches_analytic_expression(tiny_model, unit_on):
  """dL/d(alpha_k, beta_k) = dL/dw_k * g(1-g) * (t, 1), with dL/dw_k the derivative of the
  loss w.r.t. the blend weight of unit k at its hard value (STE: forward hard, backward sigmoid).

  dL/dw_k is computed independently of the gating code: a ResBlock's output is
  shortcut + conv2(...), so scaling conv2's kernel and bias by w realises
  skip + w * (unit - skip); a central finite difference in w gives dL/dw.
  """
  model, params = tiny_model
  units = model.units
  k = [i for i, u in enumerate(units) if u.kind == 'res'][1]
  x, _ = _inputs(batch=2)
  step = 600
  t_norm = (step + 1) / 1000.0
  t = jnp.full((2,), step)
  alpha = np.full(len(units), 3.0, np.float32)   # all other units on
  beta = np.zeros(len(units), np.float32)
  alpha[k], beta[k] = (0.5, 0.1) if unit_on else (-0.5, 0.1)
  w = jax.random.normal(jax.random.PRNGKey(7), (2, 32, 32, 3))

  def loss_of_gates(gp):
    logits = policies.gate_logits(gp, jnp.full((2,), t_norm))
    out = model.apply({'params': params}, x, t, gates=gates.StraightThrough(logits))
    return jnp.sum(out * w)

  grads = jax.grad(loss_of_gates)({'alpha': jnp.asarray(alpha), 'beta': jnp.asarray(beta)})

  def loss_of_weight(weight):
    p = scale_residual_branches(params, units[k:k + 1], [weight])
    return jnp.sum(model.apply({'params': p}, x, t) * w)

  hard = 1.0 if unit_on else 0.0
  eps = 1e-2
  dl_dw = (loss_of_weight(hard + eps) - loss_of_weight(hard - eps)) / (2 * eps)
  logit = alpha[k] * t_norm + beta[k]
  g = 1.0 / (1.0 + np.exp(-logit))
  np.testing.assert_allclose(float(grads['alpha'][k]), float(dl_dw) * g * (1 - g) * t_norm, rtol=2e-2)
  np.testing.assert_allclose(float(grads['beta'][k]), float(dl_dw) * g * (1 - g), rtol=2e-2)


def test_bad_inputs_give_clear_errors(tiny_model):
  model, params = tiny_model
  x, t = _inputs()
  with pytest.raises(ValueError, match='gateable units'):
    model.apply({'params': params}, x, t, gates=gates.StaticMask((True,) * 3))
  with pytest.raises(ValueError, match='NHWC'):
    model.apply({'params': params}, jnp.zeros((2, 3, 32, 32)), t)
  with pytest.raises(ValueError, match='per-sample'):
    model.apply({'params': params}, x, t, gates=gates.CondMask(jnp.ones((2, model.num_units), bool)))
  with pytest.raises(ValueError, match='num_groups'):
    unet.UNetSpec(ch=30)
