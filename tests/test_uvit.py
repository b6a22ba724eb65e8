"""U-ViT (`lees_jax.models.uvit`) and its importer (`lees_jax.convert.uvit_original`).

There is no library U-ViT to serve as an oracle, so this file has its own: `reference`, a
numpy float64 forward pass written from baofff/U-ViT's ``libs/uvit.py`` (``UViT.forward``,
``Block._forward``, ``Attention`` in its 'math' mode, ``timestep_embedding``, ``unpatchify``)
that reads a state dict in the ORIGINAL layout (torch names, NCHW, (out, in) weights). Random
state dicts in that layout are saved with ``torch.save`` and converted through the command
line. Skipping is checked against the reference with the skipped block's attention and MLP
left out (an out-block keeps its skip_linear), which shares no code with our gate forms.

Measured (jax 0.10.2, CPU, fp32 against float64, network times 0 ... 999): max |ours -
reference| 1.4e-6 (unconditional, conv), 4.0e-6 (conditional, time MLP, qkv bias), 1.3e-6
(depth 7: 3 + 1 + 3 blocks); skips and blends alike. ATOL = 1e-4.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import special

torch = pytest.importorskip('torch')

import lees_jax  # noqa: E402
from lees_jax import ase, convert, cost, models  # noqa: E402
from lees_jax import gates as gating  # noqa: E402
from lees_jax.convert import uvit_original  # noqa: E402
from lees_jax.models import uvit  # noqa: E402

ATOL = 1e-4
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
# Three small networks (config.nnet fields): unconditional with the final conv; conditional
# with the time MLP and qkv biases, no conv; depth 7 = 3 in-blocks + mid + 3 out-blocks.
UNCOND = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=4,
              mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True)
COND = dict(img_size=8, patch_size=4, in_chans=3, embed_dim=64, depth=4, num_heads=2,
            mlp_ratio=2, qkv_bias=True, mlp_time_embed=True, num_classes=5, conv=False)
ODD = dict(img_size=8, patch_size=2, in_chans=2, embed_dim=32, depth=7, num_heads=2,
           mlp_ratio=3, qkv_bias=True, mlp_time_embed=False, num_classes=-1, conv=True)
TIMES = np.array([0.0, 1.5, 499.5, 999.0])  # network times 999 t


# ---------------------------------------------------------------------------------------------
# The original's module tree and a numpy float64 reference of UViT.forward.
# ---------------------------------------------------------------------------------------------

def original_shapes(c) -> dict:
  """Every tensor of ``UViT(**c).state_dict()``, from libs/uvit.py's __init__ (names, shapes)."""
  d, p, ch = c['embed_dim'], c['patch_size'], c.get('in_chans', 3)
  m, ncls = int(d * c['mlp_ratio']), c.get('num_classes', -1)
  tokens = (c['img_size'] // p) ** 2 + (2 if ncls > 0 else 1)
  out = {'patch_embed.proj.weight': (d, ch, p, p), 'patch_embed.proj.bias': (d,),
         'pos_embed': (1, tokens, d)}
  if c.get('mlp_time_embed', False):
    out.update({'time_embed.0.weight': (4 * d, d), 'time_embed.0.bias': (4 * d,),
                'time_embed.2.weight': (d, 4 * d), 'time_embed.2.bias': (d,)})
  if ncls > 0:
    out['label_emb.weight'] = (ncls, d)

  def block(prefix, skip):
    b = {f'{prefix}.norm1.weight': (d,), f'{prefix}.norm1.bias': (d,),
         f'{prefix}.attn.qkv.weight': (3 * d, d), f'{prefix}.attn.proj.weight': (d, d),
         f'{prefix}.attn.proj.bias': (d,), f'{prefix}.norm2.weight': (d,),
         f'{prefix}.norm2.bias': (d,), f'{prefix}.mlp.fc1.weight': (m, d),
         f'{prefix}.mlp.fc1.bias': (m,), f'{prefix}.mlp.fc2.weight': (d, m),
         f'{prefix}.mlp.fc2.bias': (d,)}
    if c.get('qkv_bias', False):
      b[f'{prefix}.attn.qkv.bias'] = (3 * d,)
    if skip:
      b.update({f'{prefix}.skip_linear.weight': (d, 2 * d), f'{prefix}.skip_linear.bias': (d,)})
    return b

  for i in range(c['depth'] // 2):
    out.update(block(f'in_blocks.{i}', False))
    out.update(block(f'out_blocks.{i}', True))
  out.update(block('mid_block', False))
  out.update({'norm.weight': (d,), 'norm.bias': (d,),
              'decoder_pred.weight': (p * p * ch, d), 'decoder_pred.bias': (p * p * ch,)})
  if c.get('conv', True):
    out.update({'final_layer.weight': (ch, ch, 3, 3), 'final_layer.bias': (ch,)})
  return out


def random_state_dict(c, seed=0) -> dict:
  """Random float32 tensors in the original layout, scaled so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, shape in original_shapes(c).items():
    if name.endswith('norm1.weight') or name.endswith('norm2.weight') or name == 'norm.weight':
      a = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith('bias'):
      a = 0.2 * rng.standard_normal(shape)
    elif name in ('pos_embed', 'label_emb.weight'):
      a = 0.5 * rng.standard_normal(shape)
    else:
      a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
    sd[name] = a.astype(np.float32)
  return sd


def _linear(sd, name, x):
  y = x @ sd[f'{name}.weight'].astype(np.float64).T
  return y + sd[f'{name}.bias'] if f'{name}.bias' in sd else y


def _layer_norm(sd, name, x):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * sd[f'{name}.weight'] + sd[f'{name}.bias']


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference(sd, c, x, t, y=None, skipped=(), blend=None):
  """UViT.forward in float64 (x NCHW). Block k in execution order (in-blocks, mid, out-blocks)
  in ``skipped`` leaves out its attention and MLP (an out-block keeps its skip_linear); blend
  {k: g}: that block is skip + g (block - skip)."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  d, p, heads = c['embed_dim'], c['patch_size'], c['num_heads']
  b, ch, hh, ww = x.shape
  g = hh // p
  patches = x.reshape(b, ch, g, p, g, p)
  h = np.einsum('bchpwq,dcpq->bhwd', patches, sd['patch_embed.proj.weight'])
  h = (h + sd['patch_embed.proj.bias']).reshape(b, g * g, d)
  half = d // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  time = np.concatenate([np.cos(args), np.sin(args)], -1)
  if c.get('mlp_time_embed', False):
    z = _linear(sd, 'time_embed.0', time)
    time = _linear(sd, 'time_embed.2', z / (1 + np.exp(-z)))
  h = np.concatenate([time[:, None], h], 1)
  extras = 1
  if y is not None:
    h = np.concatenate([sd['label_emb.weight'][np.asarray(y)][:, None], h], 1)
    extras = 2
  h = h + sd['pos_embed']

  def attention(prefix, z):
    n = z.shape[1]
    qkv = _linear(sd, f'{prefix}.attn.qkv', z).reshape(b, n, 3, heads, d // heads)
    q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # B H L D
    w = _softmax(q @ k.transpose(0, 1, 3, 2) * (d // heads) ** -0.5)
    return _linear(sd, f'{prefix}.attn.proj', (w @ v).transpose(0, 2, 1, 3).reshape(b, n, d))

  def body(prefix, z):
    z = z + attention(prefix, _layer_norm(sd, f'{prefix}.norm1', z))
    u = _linear(sd, f'{prefix}.mlp.fc1', _layer_norm(sd, f'{prefix}.norm2', z))
    return z + _linear(sd, f'{prefix}.mlp.fc2', 0.5 * u * (1 + special.erf(u / np.sqrt(2))))

  def gated(k, prefix, z):
    full = z if k in skipped else body(prefix, z)
    w = (blend or {}).get(k)
    return full if w is None else z + w * (body(prefix, z) - z)

  n_side, skips = c['depth'] // 2, []
  for i in range(n_side):
    h = gated(i, f'in_blocks.{i}', h)
    skips.append(h)
  h = gated(n_side, 'mid_block', h)
  for i in range(n_side):
    prefix = f'out_blocks.{i}'
    h = gated(n_side + 1 + i, prefix,
              _linear(sd, f'{prefix}.skip_linear', np.concatenate([h, skips.pop()], -1)))
  h = _linear(sd, 'decoder_pred', _layer_norm(sd, 'norm', h))[:, extras:]
  out = h.reshape(b, g, g, p, p, ch).transpose(0, 5, 1, 3, 2, 4).reshape(b, ch, hh, ww)
  if c.get('conv', True):
    padded = np.pad(out, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = sd['final_layer.weight']
    out = sum(np.einsum('bchw,oc->bohw', padded[:, :, i:i + hh, j:j + ww], w[:, :, i, j])
              for i in range(3) for j in range(3)) + sd['final_layer.bias'][None, :, None, None]
  return out


# ---------------------------------------------------------------------------------------------
# Fixtures: each network saved as an original .pth and converted on the command line.
# ---------------------------------------------------------------------------------------------

def _convert(tmp_path, c, seed):
  sd = random_state_dict(c, seed)
  path = str(tmp_path / 'uvit.pth')
  torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
  out = str(tmp_path / 'backbone')
  assert convert.main(['--source', path, '--arch=uvit', '--model_config', json.dumps(c),
                       '--out', out]) == 0
  model, params = lees_jax.load_backbone(out)
  return sd, model, params


@pytest.fixture(scope='module', params=['uncond_conv', 'cond_mlp_time_qkv_bias', 'odd_depth_7'])
def network(request, tmp_path_factory):
  c = {'uncond_conv': UNCOND, 'cond_mlp_time_qkv_bias': COND, 'odd_depth_7': ODD}[request.param]
  sd, model, params = _convert(tmp_path_factory.mktemp(request.param), c, seed=len(request.param))
  static = jax.jit(model.apply, static_argnames='gates')
  traced = jax.jit(model.apply)

  def apply(x, t, y, gates=None):
    fn = static if gates is None or isinstance(gates, gating.StaticMask) else traced
    args = (x, t) if y is None else (x, t, y)
    return np.asarray(fn({'params': params}, *args, gates=gates))
  return c, sd, model, params, apply


def _inputs(c, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4, c.get('in_chans', 3), c['img_size'], c['img_size']))
  y = np.array([0, 1, 3, 4]) if c['num_classes'] > 0 else None
  return x.astype(np.float32), TIMES, y


def _ours(apply, x, t, y, gates=None):
  return apply(x.transpose(0, 2, 3, 1), t, y, gates).transpose(0, 3, 1, 2)


def _diff(got, want):
  assert got.shape == want.shape and np.abs(want).max() > 0.3  # a non-degenerate output
  return float(np.abs(got - want).max())


# ---------------------------------------------------------------------------------------------
# The network against the reference.
# ---------------------------------------------------------------------------------------------

def test_matches_the_reference(network):
  c, sd, model, _, apply = network
  assert model.num_units == 2 * (c['depth'] // 2) + 1
  x, t, y = _inputs(c)
  diff = _diff(_ours(apply, x, t, y), reference(sd, c, x, t, y))
  print(f'\n[{c}] max |ours - reference| {diff:.2e}')
  assert diff <= ATOL


def test_skipping_equals_the_reference_without_the_block(network):
  c, sd, model, _, apply = network
  x, t, y = _inputs(c, seed=1)
  k = model.num_units
  units = model.units
  out_block = next(u.index for u in units if u.position == 'decoder')
  in_block = next(u.index for u in units if u.position == 'encoder')
  mid = next(u.index for u in units if u.position == 'middle')
  full = reference(sd, c, x, t, y)
  for skipped in [(out_block,), (in_block,), (mid,), (in_block, k - 1)]:
    keep = tuple(j not in skipped for j in range(k))
    want = reference(sd, c, x, t, y, skipped=skipped)
    assert np.abs(want - full).max() > 1e-3  # the skip matters
    static = _ours(apply, x, t, y, gating.StaticMask(keep))
    cond = _ours(apply, x, t, y, gating.CondMask(jnp.asarray(keep)))
    assert _diff(static, want) <= ATOL, skipped
    assert np.abs(cond - static).max() <= 1e-5, skipped  # CondMask == StaticMask


def test_soft_and_example_gates_blend(network):
  c, sd, model, _, apply = network
  x, t, y = _inputs(c, seed=2)
  k = model.num_units
  units = [0, k - 1]  # the first in-block and the last out-block at g = 0.3
  logits = np.full(k, 100.0, np.float32)  # sigmoid(100) = 1
  logits[units] = np.log(0.3 / 0.7)
  want = reference(sd, c, x, t, y, blend={u: 0.3 for u in units})
  assert _diff(_ours(apply, x, t, y, gating.SoftGates(jnp.asarray(logits))), want) <= ATOL
  # Examples 0 and 2 drop the last out-block (skip_linear only), 1 and 3 run everything.
  keep = np.ones((4, k), bool)
  keep[[0, 2], k - 1] = False
  want = np.where(np.array([1, 0, 1, 0], bool)[:, None, None, None],
                  reference(sd, c, x, t, y, skipped=(k - 1,)), reference(sd, c, x, t, y))
  assert _diff(_ours(apply, x, t, y, gating.ExampleMask(jnp.asarray(keep))), want) <= ATOL


def test_units_and_interface():
  model = models.build_model(ml_collections.ConfigDict(dict(name='uvit', **ODD)))
  units = model.units
  assert [u.name for u in units] == ['in_blocks_0', 'in_blocks_1', 'in_blocks_2', 'mid_block',
                                     'out_blocks_0', 'out_blocks_1', 'out_blocks_2']
  assert [u.position for u in units] == ['encoder'] * 3 + ['middle'] + ['decoder'] * 3
  assert [u.block for u in units] == [0, 1, 2, 0, 0, 1, 2]
  assert [u.skip for u in units] == ['identity'] * 4 + ['skip_linear'] * 3
  assert [u.ase_droppable for u in units] == [False] * 4 + [True] * 3
  assert all(u.skip_flops == 0 for u in units[:4]) and all(u.skip_flops > 0 for u in units[4:])
  assert model.input == models.InputSpec('pixels', (8, 8, 2)) and model.output == 'eps'
  assert model.conditioning is None and model.time_embedding == ()
  cond = models.build_model(ml_collections.ConfigDict(dict(name='uvit', **COND)))
  assert cond.conditioning == models.ClassConditioning(5, None)  # no null class
  assert cond.time_embedding == ('time_embed_0', 'time_embed_2')
  cfg = models.UViT(uvit.UViTSpec(**dict(COND, num_classes=6, null_label=True)))
  assert cfg.conditioning == models.ClassConditioning(5, 5)  # the last row is the null class
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    uvit.UViTSpec(embed_dim=30, num_heads=4)
  spec = models.spec_from_config(ml_collections.ConfigDict(
      dict(name='uvit', preset='celeba64_uvit_small')))
  assert spec == uvit.UViTSpec()  # the defaults are U-ViT-S/4 on CelebA 64


def _xla_flops(model, shapes, keep=None):
  x = jax.ShapeDtypeStruct((1,) + tuple(model.input.shape), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.float32)
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  if model.conditioning is None:
    fn = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t, gates=mask))
    lowered = fn.lower(shapes, x, t)
  else:
    fn = jax.jit(lambda p, x, t, y: model.apply({'params': p}, x, t, y, gates=mask))
    lowered = fn.lower(shapes, x, t, jax.ShapeDtypeStruct((1,), np.int32))
  analysis = lowered.compile(compiler_options=FAST_COMPILE).cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)['flops'])


@pytest.mark.parametrize('c', [UNCOND, COND], ids=['uncond_conv', 'cond_mlp_time_qkv_bias'])
def test_flops_match_xla(c):
  """Our count has each op once. XLA recounts an add fused into several consumers: the qkv
  bias once per q / k / v fusion (3 n 3d instead of n 3d, corrected for below), and an
  out-block's skip_linear output and the embedding's adds a few times (out-blocks, 'none')."""
  model = models.UViT(uvit.UViTSpec(**c))
  spec = model.spec
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  mc, k = cost.model_cost(model), model.num_units
  recount = 2 * spec.num_tokens * 3 * spec.embed_dim if spec.qkv_bias else 0
  total = _xla_flops(model, shapes)
  assert mc.total_flops + k * recount == pytest.approx(total, rel=2e-3)
  for unit in mc.units:
    saved = total - _xla_flops(model, shapes, [v.index != unit.index for v in mc.units])
    rel = 5e-3 if unit.position == 'decoder' else 1e-4
    assert unit.run_flops - unit.skip_flops + recount == pytest.approx(saved, rel=rel), unit.name
  assert mc.always_flops + sum(u.skip_flops for u in mc.units) == pytest.approx(
      _xla_flops(model, shapes, [False] * k), rel=1e-2)


# ---------------------------------------------------------------------------------------------
# The public configurations: key set, shapes, parameter counts (nothing downloaded).
# ---------------------------------------------------------------------------------------------

# Parameters of the public checkpoints' networks (the U-ViT paper: U-ViT-S 44M, M 131M, L 287M).
PUBLIC_PARAMS = {'cifar10_uvit_small': 44_255_328, 'celeba64_uvit_small': 44_292_228,
                 'imagenet64_uvit_mid': 130_940_292, 'imagenet64_uvit_large': 286_827_652}


@pytest.mark.parametrize('name', sorted(uvit.PUBLIC_CONFIGS))
def test_public_configuration_keys_shapes_and_count(name):
  from flax import traverse_util

  from lees_jax.convert import layout
  config = uvit_original.parse_model_config(name)
  model = models.build_model(config)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  ours = {uvit_original.original_name(path): layout.torch_shape(tuple(leaf.shape), path[-1])
          for path, leaf in traverse_util.flatten_dict(shapes).items()}
  want = original_shapes(uvit.PUBLIC_CONFIGS[name])
  assert ours == want
  assert models.count_params(shapes) == sum(int(np.prod(s)) for s in want.values())
  assert models.count_params(shapes) == PUBLIC_PARAMS[name]


def test_celeba_model_config():
  """U-ViT-S/4 of configs/celeba64_uvit_small.py: 6 + 1 + 6 blocks, 257 tokens."""
  spec = models.spec_from_config(uvit_original.parse_model_config('celeba64_uvit_small'))
  assert (spec.img_size, spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads,
          spec.num_blocks, spec.num_tokens, spec.conv, spec.qkv_bias, spec.mlp_time_embed,
          spec.conditional) == (64, 4, 512, 12, 8, 13, 257, True, False, False, False)
  model = models.UViT(spec)
  d3 = ase.named_schedule('D3-U-ViT', model.units).matrix
  np.testing.assert_array_equal(d3[:7].all(axis=1), True)  # encoder and mid: never dropped


# ---------------------------------------------------------------------------------------------
# The importer: strictness and the config.
# ---------------------------------------------------------------------------------------------

def test_importer_names_every_offending_tensor():
  sd = random_state_dict(UNCOND)
  del sd['out_blocks.1.skip_linear.bias']
  sd['mid_block.attn.qkv.weight'] = sd['mid_block.attn.qkv.weight'][:64]
  sd['in_blocks.0.attn.qkv.bias'] = np.zeros(96, np.float32)  # qkv_bias is False
  sd['pos_embed'] = sd['pos_embed'].copy()
  sd['pos_embed'][0, 0, 0] = np.nan
  sd['decoder_pred.bias'] = np.zeros(12, np.int64)
  with pytest.raises(convert.ConversionError) as e:
    uvit_original.original_to_params(sd, UNCOND)
  for fragment in ('out_blocks.1.skip_linear.bias (shape (32,), for out_blocks_1/skip_linear/bias)',
                   'mid_block.attn.qkv.weight: shape (64, 32), expected (96, 32)',
                   'in_blocks.0.attn.qkv.bias (shape (96,))',
                   'pos_embed: 1 NaN and 0 Inf value(s)',
                   'decoder_pred.bias: dtype int64'):
    assert fragment in str(e.value)


def test_model_config_parsing():
  assert uvit_original.parse_model_config('cifar10_uvit_small').img_size == 32
  c = uvit_original.parse_model_config(json.dumps(dict(UNCOND, name='uvit', use_checkpoint=True)))
  assert models.spec_from_config(c) == uvit.UViTSpec(**UNCOND)
  with pytest.raises(convert.ConversionError) as e:
    uvit_original.parse_model_config(json.dumps(dict(UNCOND, qk_scale=0.1, skip=False, foo=1)))
  for fragment in ('qk_scale=0.1', 'skip=False', "unknown field(s) ['foo']"):
    assert fragment in str(e.value)
  with pytest.raises(convert.ConversionError, match='neither a public U-ViT'):
    uvit_original.parse_model_config('celeba_small')
  with pytest.raises(convert.ConversionError, match='invalid U-ViT'):
    uvit_original.parse_model_config(json.dumps(dict(UNCOND, img_size=9)))


def test_convert_routes_and_refusals(tmp_path):
  path = str(tmp_path / 'u.pth')
  torch.save({k: torch.from_numpy(v) for k, v in random_state_dict(UNCOND).items()}, path)
  with pytest.raises(convert.ConversionError, match='needs --model_config'):
    convert.convert(path, str(tmp_path / 'a'), arch='uvit')
  with pytest.raises(convert.ConversionError, match='pass --arch=uvit'):
    convert.convert(path, str(tmp_path / 'b'), model_config=json.dumps(UNCOND))
  # A wrong configuration is refused naming the tensors (heads are not in the file: depth is).
  with pytest.raises(convert.ConversionError, match='out_blocks.2'):
    convert.convert(path, str(tmp_path / 'c'), arch='UViT', model_config=json.dumps(
        dict(UNCOND, depth=6)))
  out = convert.convert(path, str(tmp_path / 'd'), arch='uvit', model_config=json.dumps(UNCOND))
  meta = json.load(open(f'{out}/backbone.json'))
  assert meta['diffusion']['process'] == 'vp_sde' and meta['model']['name'] == 'uvit'


# ---------------------------------------------------------------------------------------------
# ASE's U-ViT schedules (Table 5).
# ---------------------------------------------------------------------------------------------

# Decoder blocks kept per tenth of time, [0, 0.1] first (ASE's Table 5, U-ViT rows).
TABLE5_UVIT = {'D1-U-ViT': (6, 6, 4, 4, 2, 2, 2, 2, 1, 1),
               'D2-U-ViT': (5, 5, 4, 4, 2, 2, 1, 1, 1, 1),
               'D3-U-ViT': (3, 3, 2, 2, 2, 2, 1, 1, 1, 1),
               'D6-U-ViT': (2, 2, 2, 2, 1, 1, 1, 1, 1, 1)}


@pytest.mark.parametrize('name', sorted(TABLE5_UVIT))
def test_ase_uvit_rows_keep_exactly_the_table_blocks(name):
  from lees_jax import sde
  units = models.UViT(uvit.UViTSpec()).units  # U-ViT-S: 6 + 1 + 6 blocks
  decoder = [u.index for u in units if u.position == 'decoder']
  assert decoder == list(range(7, 13))
  policy = ase.resolve_schedule(name, units)
  kept = TABLE5_UVIT[name]
  for i, n in enumerate(kept):  # the first n decoder blocks; encoder and mid always
    np.testing.assert_array_equal(policy.matrix[:, i], np.arange(13) < 7 + n)
  # On U-ViT's EM-1000 (t = 0.001 ... 1): 100 steps per interval, each with the row's count.
  solver = sde.euler_maruyama(1000)
  masks = policy.step_masks(solver.timesteps, solver.num_original_timesteps, len(units))
  per_interval = masks[::-1].reshape(10, 100, 13)  # data side first
  for i, n in enumerate(kept):
    assert (per_interval[i, :, 7:].sum(axis=1) == n).all() and per_interval[i, :, :7].all()
  with pytest.raises(ValueError, match='ASE-droppable'):
    ase.named_schedule(name, [dataclasses.replace(u, ase_droppable=False) for u in units])
