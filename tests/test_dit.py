"""DiT (`lees_jax.models.dit`) and its diffusers importer, against diffusers' own
``DiTTransformer2DModel`` (the oracle) with random weights on CPU torch.

The diffusers model keeps one timestep / label embedding per block; a real checkpoint holds the
same tensor in each (the conversion script writes one), so the random oracle is tied the same
way before it is converted. Skipping is checked against diffusers with the skipped block's
forward replaced by the identity (or by the blend h + g (block(h) - h)), an oracle that shares
no code with our gate forms.

Measured (jax 0.10.2, torch 2.13, CPU, fp32): max |ours - diffusers| <= 1.7e-6 on outputs of
magnitude ~2.4 (full network, every skip and blend); ATOL sits a margin above. FLOPs against
XLA's cost analysis on the tiny DiT: total -0.18 %, each block's saving -0.07 %, the
always-run part -2.4 % (XLA counts the patch embedding's bias and position adds once per fusion
that reads them, three times when no block runs; our count has each op once).
"""

import contextlib
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
from conftest import diffusers_dit_reference as _reference  # noqa: E402
diffusers = pytest.importorskip('diffusers')

import lees_jax  # noqa: E402
from lees_jax import ase, checkpoints, convert, cost, models  # noqa: E402
from lees_jax import gates as gating  # noqa: E402
from lees_jax.convert import diffusers_dit  # noqa: E402
from lees_jax.models import dit  # noqa: E402

ATOL = 1e-5
TINY = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
            num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
# epsilon only, patch 4 (a 2 x 2 token grid), two heads, an explicit norm_eps.
TINY_EPS = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=None,
                num_layers=2, sample_size=8, patch_size=4, num_embeds_ada_norm=5, norm_eps=1e-6)
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}




def _full_config(ref):
  return {'_class_name': 'DiTTransformer2DModel', **{k: v for k, v in ref.config.items()
                                                     if not k.startswith('_')}}


def _state_dict(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _jitted(model):
  """model.apply compiled once per gate-form type (a StaticMask is static: part of the program;
  the other forms are traced pytrees)."""
  static = jax.jit(model.apply, static_argnames='gates')
  traced = jax.jit(model.apply)

  def apply(variables, x, t, y, gates=None):
    run = static if gates is None or isinstance(gates, gating.StaticMask) else traced
    return run(variables, x, t, y, gates=gates)
  return apply


@pytest.fixture(scope='module')
def tiny():
  ref = _reference(TINY)
  model_config, params = diffusers_dit.diffusers_to_params(_state_dict(ref), _full_config(ref))
  model = models.build_model(model_config)
  return ref, model, params, _jitted(model)


def _inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  n = model.conditioning.null_class
  x = rng.standard_normal((4,) + model.input.shape).astype(np.float32)
  return x, np.array([0, 10, 500, 999]), np.array([0, 3, n - 1, n])  # the null class last


@contextlib.contextmanager
def _blended(ref, weights: dict):
  """diffusers with block k's forward replaced by h + g (block(h) - h) (g = 0: the identity)."""
  saved = {k: ref.transformer_blocks[k].forward for k in weights}
  for k, g in weights.items():
    def forward(hidden_states, *args, _run=saved[k], _g=g, **kwargs):
      if _g == 0:
        return hidden_states
      return hidden_states + _g * (_run(hidden_states, *args, **kwargs) - hidden_states)
    ref.transformer_blocks[k].forward = forward
  try:
    yield ref
  finally:
    for k, run in saved.items():
      ref.transformer_blocks[k].forward = run


def _torch_out(ref, x, t, y):
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
              torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _max_diff(got, want):
  assert got.shape == want.shape and np.abs(want).max() > 0.1  # a non-degenerate output
  return float(np.abs(np.asarray(got) - want).max())


# ---------------------------------------------------------------------------------------------
# The network against diffusers.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('config', [TINY, TINY_EPS], ids=['learn_sigma', 'eps'])
def test_matches_diffusers(config):
  ref = _reference(config, seed=1)
  model_config, params = diffusers_dit.diffusers_to_params(_state_dict(ref), _full_config(ref))
  model = models.build_model(model_config)
  assert model.output == ('eps_variance' if config['out_channels'] else 'eps')
  assert model.conditioning == models.ClassConditioning(config['num_embeds_ada_norm'],
                                                        config['num_embeds_ada_norm'])
  x, t, y = _inputs(model)
  diff = _max_diff(model.apply({'params': params}, x, t, y), _torch_out(ref, x, t, y))
  print(f'\n[{model_config.hidden_size}-wide DiT] max |ours - diffusers| {diff:.2e}')
  assert diff < ATOL


def test_position_embedding_is_diffusers_buffer(tiny):
  ref, model, _, _ = tiny
  spec = model.spec
  np.testing.assert_array_equal(dit.position_embedding(spec.grid, spec.hidden_size)[None],
                                ref.pos_embed.pos_embed.numpy())


@pytest.mark.parametrize('skipped', [(0,), (2,), (0, 1, 2)])
def test_static_mask_equals_diffusers_without_the_blocks(tiny, skipped):
  ref, model, params, apply = tiny
  x, t, y = _inputs(model, seed=2)
  keep = tuple(k not in skipped for k in range(model.num_units))
  got = apply({'params': params}, x, t, y, gates=gating.StaticMask(keep))
  with _blended(ref, {k: 0 for k in skipped}):
    want = _torch_out(ref, x, t, y)
  assert _max_diff(got, want) < ATOL
  assert np.abs(np.asarray(got) - _torch_out(ref, x, t, y)).max() > 1e-3  # the skip matters


def test_every_gate_form_agrees_with_the_blend_oracle(tiny):
  """Unit k blended by g: skip + g (unit - skip), every other unit run (g = 1)."""
  ref, model, params, apply = tiny
  x, t, y = _inputs(model, seed=3)
  k, num = 1, model.num_units
  with _blended(ref, {k: 0}):
    skipped = _torch_out(ref, x, t, y)
  with _blended(ref, {k: 0.3}):
    soft = _torch_out(ref, x, t, y)
  full = _torch_out(ref, x, t, y)
  keep = np.arange(num) != k
  logits = np.where(keep, 100.0, np.log(0.3 / 0.7)).astype(np.float32)  # sigmoid(100) = 1
  forms = {
      'static': (gating.StaticMask(tuple(keep)), skipped),
      'cond': (gating.CondMask(jnp.asarray(keep)), skipped),
      'soft': (gating.SoftGates(jnp.asarray(logits)), soft),
      'all': (None, full),
      # Examples 0 and 2 skip unit k, 1 and 3 run it.
      'example': (gating.ExampleMask(jnp.asarray([keep, np.ones(num, bool)] * 2)),
                  np.where(np.array([1, 0, 1, 0], bool)[:, None, None, None], skipped, full)),
  }
  for name, (form, want) in forms.items():
    got = apply({'params': params}, x, t, y, gates=form)
    assert _max_diff(got, want) < ATOL, name


def test_label_dropout_in_training_gives_the_null_class(tiny):
  _, model, params, apply = tiny
  x, t, _ = _inputs(model, seed=4)
  y = np.array([1, 2, 3, 4])
  cond = np.asarray(apply({'params': params}, x, t, y))
  null = np.asarray(apply({'params': params}, x, t, np.full(4, model.conditioning.null_class)))
  half = models.DiT(dataclasses.replace(model.spec, class_dropout_prob=0.5))
  got = np.asarray(half.apply({'params': params}, x, t, y, train=True,
                              rngs={'dropout': jax.random.PRNGKey(3)}))
  dropped = [bool(np.abs(g - n).max() < np.abs(g - c).max()) for g, n, c in zip(got, null, cond)]
  for i, drop in enumerate(dropped):  # eager here, compiled above: equal to ~1e-6
    np.testing.assert_allclose(got[i], null[i] if drop else cond[i], atol=ATOL)
  assert 0 < sum(dropped) < 4  # this key drops some labels, not all
  np.testing.assert_allclose(half.apply({'params': params}, x, t, y), cond, atol=ATOL)  # eval: none


# ---------------------------------------------------------------------------------------------
# DiT-XL/2: size, parameters, units, FLOPs.
# ---------------------------------------------------------------------------------------------

def test_xl2_parameters_units_and_flops():
  spec = dit.dit_size('XL/2')
  assert (spec.hidden_size, spec.depth, spec.num_heads, spec.input_size, spec.in_channels,
          spec.out_channels, spec.num_classes) == (1152, 28, 16, 32, 4, 8, 1000)
  model = models.DiT(spec)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  n, d = spec.num_tokens, spec.hidden_size
  # The paper's 675,129,632 counts the fixed position embedding (a frozen nn.Parameter there);
  # ours is a constant, not a parameter.
  assert models.count_params(shapes) + n * d == 675_129_632
  assert shapes['y_embed']['embedding'].shape == (1001, 1152)

  units = model.units
  assert len(units) == 28 and all(u.kind == 'transformer' and u.skip == 'identity'
                                  and u.skip_flops == 0 and u.ase_droppable for u in units)
  assert [u.name for u in units] == [f'block_{k}' for k in range(28)]
  # ASE drops DiT blocks from the last one: D3 keeps the first 12 in its last interval.
  assert ase.max_drop_fraction_for(units) == 1.0
  d3 = ase.named_schedule('D3', units).matrix
  np.testing.assert_array_equal(d3[:, -1], np.arange(28) < 12)
  np.testing.assert_array_equal(d3.sum(axis=0), ase.DIT_KEPT['D3'])

  # One block by hand (N = 256 tokens, width 1152, 16 heads, MLP 4608): multiply-adds of the
  # modulation, q/k/v/out, q k^T and weights @ v, the MLP; then bias adds and element-wise ops.
  heads, m = 16, 4 * d
  macs = d * 6 * d + 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
  biases = 6 * d + n * (4 * d + m + d)
  elementwise = (2 * (6 * n * d + 2 * n)       # two LayerNorms
                 + 2 * (2 * n * d + d)         # two modulations x (1 + scale) + shift
                 + n * d                       # q / sqrt(72)
                 + heads * n * (4 * n - 1)     # softmax rows
                 + 8 * n * m                   # tanh-GELU
                 + 4 * n * d)                  # two gated residual adds
  assert units[0].run_flops == 2 * macs + biases + elementwise == 8_494_127_104
  # The paper's 118.6 Gflops for DiT-XL/2 count multiply-adds: half of our FLOPs.
  assert cost.model_cost(model).total_flops / 2e9 == pytest.approx(118.6, rel=5e-3)


def test_sizes_and_config():
  for name, (width, depth, heads) in dit.SIZES.items():
    for patch in dit.PATCH_SIZES:
      s = dit.dit_size(f'{name}/{patch}')
      assert (s.hidden_size, s.depth, s.num_heads, s.patch_size) == (width, depth, heads, patch)
  config = ml_collections.ConfigDict(dict(name='dit', size='B/4', num_classes=10, dtype='float32'))
  assert models.spec_from_config(config) == dit.dit_size('B/4', num_classes=10)
  with pytest.raises(ValueError, match='depth=7'):
    dit.DiTSpec.from_config(dict(size='B/4', depth=7))
  with pytest.raises(ValueError, match='unknown DiT size'):
    dit.dit_size('XXL/2')
  with pytest.raises(ValueError, match='not divisible by patch_size'):
    dit.DiTSpec(input_size=10, patch_size=4)
  model = models.build_model(config)
  assert model.input == models.InputSpec('latents', (32, 32, 4), decoder='sd_vae')


def _xla_flops(model, params, keep=None):
  """XLA's count of one forward pass (batch 1, labels included), the fast compile of test_cost."""
  x = jax.ShapeDtypeStruct((1,) + tuple(model.input.shape), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.int32)
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  fn = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, gates=mask))
  compiled = fn.lower(params, x, t, t).compile(compiler_options=FAST_COMPILE)
  analysis = compiled.cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)['flops'])


def test_flops_match_xla_on_the_tiny_dit(tiny):
  _, model, _, _ = tiny
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  mc, k = cost.model_cost(model), model.num_units
  total = _xla_flops(model, shapes)
  assert mc.total_flops == pytest.approx(total, rel=2.5e-3)
  for unit in mc.units:
    saved = total - _xla_flops(model, shapes, [v.index != unit.index for v in mc.units])
    assert unit.run_flops - unit.skip_flops == pytest.approx(saved, rel=1e-3), unit.name
  none = _xla_flops(model, shapes, [False] * k)
  assert none == cost.xla_flops(model, shapes, [False] * k)  # labels passed, same count
  assert mc.always_flops == pytest.approx(none, rel=3e-2)  # fused adds counted 3x by XLA


# ---------------------------------------------------------------------------------------------
# The importer: strictness and the convert() path.
# ---------------------------------------------------------------------------------------------

def test_importer_names_every_offending_tensor(tiny):
  ref = tiny[0]
  sd, config = _state_dict(ref), _full_config(ref)
  sd['transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight'][0, 0] += 1.0
  del sd['transformer_blocks.1.attn1.to_k.bias']
  sd['proj_out_2.weight'] = sd['proj_out_2.weight'][:16]
  sd['transformer_blocks.0.norm3.weight'] = np.ones(64, np.float32)
  sd['transformer_blocks.3.ff.net.2.bias'] = np.ones(64, np.float32)  # a 4th block
  with pytest.raises(convert.ConversionError) as e:
    diffusers_dit.diffusers_to_params(sd, config)
  for fragment in ('transformer_blocks.2.norm1.emb.class_embedder.embedding_table.weight: differs',
                   'transformer_blocks.1.attn1.to_k.bias (shape (64,), for block_1/key/bias)',
                   'proj_out_2.weight: shape (16, 64), expected (32, 64)',
                   'transformer_blocks.0.norm3.weight (shape (64,))',
                   'transformer_blocks.3.ff.net.2.bias (shape (64,))'):
    assert fragment in str(e.value)
  # A stored position embedding must be ours.
  sd = _state_dict(ref)
  sd[diffusers_dit.POS_EMBED_KEY] = ref.pos_embed.pos_embed.numpy()
  diffusers_dit.diffusers_to_params(sd, config)
  sd[diffusers_dit.POS_EMBED_KEY] = sd[diffusers_dit.POS_EMBED_KEY] * 2
  with pytest.raises(convert.ConversionError, match='pos_embed.pos_embed'):
    diffusers_dit.diffusers_to_params(sd, config)


def test_unsupported_config_lists_every_field():
  config = dict(_class_name='DiTTransformer2DModel', **TINY)
  config.update(out_channels=5, activation_fn='geglu', norm_elementwise_affine=True)
  with pytest.raises(convert.ConversionError) as e:
    diffusers_dit.model_config_from_diffusers(config)
  for fragment in ('out_channels=5', "activation_fn='geglu'", 'norm_elementwise_affine=True'):
    assert fragment in str(e.value)
  legacy = dict(TINY, _class_name='Transformer2DModel', norm_type='ada_norm_zero',
                cross_attention_dim=None, use_linear_projection=False)
  assert diffusers_dit.is_dit_config(legacy)
  assert diffusers_dit.model_config_from_diffusers(legacy) == \
      diffusers_dit.model_config_from_diffusers(dict(TINY, _class_name='DiTTransformer2DModel'))
  with pytest.raises(convert.ConversionError, match='cross_attention_dim=32'):
    diffusers_dit.model_config_from_diffusers(dict(legacy, cross_attention_dim=32))
  assert not diffusers_dit.is_dit_config(dict(legacy, norm_type='layer_norm'))


def test_convert_a_pipeline_snapshot_and_load_it(tiny, tmp_path):
  """transformer/ + scheduler/ as save_pretrained writes them, found from the pipeline root."""
  ref, model, params, apply = tiny
  root = tmp_path / 'DiT-tiny'
  ref.save_pretrained(str(root / 'transformer'))
  (root / 'scheduler').mkdir()
  (root / 'scheduler' / convert.SCHEDULER_FILE).write_text(json.dumps(dict(
      _class_name='DDIMScheduler', beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
      num_train_timesteps=1000, clip_sample=False, prediction_type='epsilon')))
  with pytest.raises(convert.ConversionError, match='dropout'):
    convert.convert(str(root), str(tmp_path / 'refused'), dropout=0.1)
  out = convert.convert(str(root), str(tmp_path / 'out'))
  meta = checkpoints.read_backbone_meta(out)
  assert meta['model']['name'] == 'dit' and meta['model_output'] == 'eps_variance'
  assert meta['diffusion']['num_timesteps'] == 1000
  loaded, loaded_params = lees_jax.load_backbone(out)
  assert loaded.spec == model.spec
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)
  # Architecture checks are family-generic; label dropout is training, not architecture.
  want = ml_collections.ConfigDict(meta['model'])
  want.class_dropout_prob = 0.0
  checkpoints.load_backbone_params(out, expected_model_config=want)
  want.depth = 4
  with pytest.raises(checkpoints.BackboneError, match='depth: checkpoint 3 vs config 4'):
    checkpoints.load_backbone_params(out, expected_model_config=want)
  assert convert.main(['--source', str(root), '--out', str(tmp_path / 'cli')]) == 0
