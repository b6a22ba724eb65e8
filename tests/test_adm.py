"""ADM (`lees_jax.models.adm`) and its importers, against diffusers' ``UNet2DModel`` in ADM style
(the oracle) with random, perturbed weights on CPU torch, fp32.

The OpenAI layout is not downloaded: a diffusers model's state dict is written with
guided-diffusion's key names by inverting the rules of diffusers'
``scripts/convert_consistency_to_diffusers.py`` (``convert_resnet``: in_layers.0 -> norm1, ...;
``convert_attention``: qkv chunked in three -> to_q, to_k, to_v; the input / output block
counters), extended to learned (conv) resampling with guided-diffusion's own names
(``Downsample.op``, ``Upsample.conv``), and its key set is checked against `openai_keys`,
written from guided-diffusion's ``UNetModel.__init__``. diffusers splits q, k, v before the
heads (QKVAttention); the legacy order (QKVAttentionLegacy: heads first) is the same network
with the qkv rows of the file in the other order, so a legacy file is written with its rows
permuted and imported with ``--use_new_attention_order False``; the legacy split is also checked
against a numpy transcription of QKVAttentionLegacy.

Measured (jax 0.10.2, torch 2.13, diffusers 0.42.1, CPU, fp32): max |ours - diffusers| 1.1e-5
(A), 9.1e-6 (B), 1.2e-5 (C) through the diffusers importer, 9.8e-6, 8.9e-6 (legacy order),
1.4e-5 through the OpenAI layout, <= 1.0e-5 with units skipped or blended, on outputs of
magnitude ~4-6; ATOL = 3e-5. FLOPs against XLA's cost analysis on configuration A: total
-0.07 %; the saving of a plain or projecting ResBlock within 0.17 %, an up-ResBlock -0.09 %,
attention -0.63 %, a down-ResBlock +0.76 % (XLA fuses the average pools and attention's
normalisation differently from our one-count-per-op; the relative errors shrink with width:
-0.22 % and +0.12 % at 128 channels); the all-skipped program +0.39 %.
"""

import contextlib
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

import lees_jax  # noqa: E402
from lees_jax import cost, convert, diffusion, models  # noqa: E402
from lees_jax import gates as gating  # noqa: E402
from lees_jax.convert import diffusers_adm, guided_diffusion  # noqa: E402
from lees_jax.models import adm  # noqa: E402

ATOL = 3e-5
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}

# A: class-conditional, learned sigma, scale-shift, ResBlock resampling, heads of 16 channels.
A = dict(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, num_class_embeds=1000,
         block_out_channels=[32, 64], attention_head_dim=16, attn_norm_num_groups=32,
         down_block_types=['ResnetDownsampleBlock2D', 'AttnDownBlock2D'],
         up_block_types=['AttnUpBlock2D', 'ResnetUpsampleBlock2D'],
         resnet_time_scale_shift='scale_shift', downsample_type='resnet', upsample_type='resnet')
A_FLAGS = ('--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 '
           '--attention_resolutions 8 --class_cond True --learn_sigma True --num_head_channels 16 '
           '--use_scale_shift_norm True --resblock_updown True --use_new_attention_order True '
           '--noise_schedule cosine --dropout 0.1')
# B: unconditional, no scale-shift, learned conv resampling, 2 heads (num_heads), legacy order.
B = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[32, 64],
         attention_head_dim=32, down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
         up_block_types=['AttnUpBlock2D', 'UpBlock2D'])
B_FLAGS = ('--image_size 16 --num_channels 32 --channel_mult=1,2 --num_res_blocks 2 '
           '--attention_resolutions 8 --num_heads 2 --use_scale_shift_norm False '
           '--diffusion_steps 4000')
# C: an odd channel_mult (1, 3, 2), three levels, attention at the coarsest only.
C = dict(sample_size=16, in_channels=3, out_channels=6, layers_per_block=1,
         block_out_channels=[32, 96, 64], attention_head_dim=32, attn_norm_num_groups=32,
         down_block_types=['ResnetDownsampleBlock2D', 'ResnetDownsampleBlock2D', 'AttnDownBlock2D'],
         up_block_types=['AttnUpBlock2D', 'ResnetUpsampleBlock2D', 'ResnetUpsampleBlock2D'],
         resnet_time_scale_shift='scale_shift', downsample_type='resnet', upsample_type='resnet')
C_FLAGS = ('--image_size 16 --num_channels 32 --channel_mult 1,3,2 --num_res_blocks 1 '
           '--attention_resolutions 4 --learn_sigma True --num_head_channels 32 '
           '--resblock_updown True --use_new_attention_order True')
CONFIGS = {'A': (A, A_FLAGS, False), 'B': (B, B_FLAGS, True), 'C': (C, C_FLAGS, False)}


# ---------------------------------------------------------------------------------------------
# The oracle and the OpenAI layout.
# ---------------------------------------------------------------------------------------------

def _reference(config, seed=0):
  torch.manual_seed(seed)
  ref = diffusers.UNet2DModel(**config).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return ref


def _full_config(ref):
  return {'_class_name': 'UNet2DModel', **{k: v for k, v in ref.config.items()
                                           if not k.startswith('_')}}


def _state_dict(ref):
  return {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}


def _torch_out(ref, x, t, y):
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(t)),
              None if y is None else torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def _resnet(sd, old, new, out):
  for a, b in (('in_layers.0', 'norm1'), ('in_layers.2', 'conv1'), ('emb_layers.1', 'time_emb_proj'),
               ('out_layers.0', 'norm2'), ('out_layers.3', 'conv2'), ('skip_connection', 'conv_shortcut')):
    for leaf in ('weight', 'bias'):
      if f'{new}.{b}.{leaf}' in sd:
        out[f'{old}.{a}.{leaf}'] = sd[f'{new}.{b}.{leaf}']


def _attention(sd, old, new, out, heads, legacy):
  for leaf in ('weight', 'bias'):
    out[f'{old}.norm.{leaf}'] = sd[f'{new}.group_norm.{leaf}']
    qkv = np.concatenate([sd[f'{new}.to_{p}.{leaf}'] for p in 'qkv'])  # [q | k | v]
    if legacy:  # heads x [q | k | v]
      qkv = qkv.reshape(3, heads, -1, *qkv.shape[1:]).swapaxes(0, 1).reshape(qkv.shape)
    out[f'{old}.qkv.{leaf}'] = qkv[..., None] if leaf == 'weight' else qkv
    proj = sd[f'{new}.to_out.0.{leaf}']
    out[f'{old}.proj_out.{leaf}'] = proj[..., None] if leaf == 'weight' else proj


def openai_state_dict(ref, legacy=False):
  """The diffusers model's tensors under guided-diffusion's names (the conversion inverted)."""
  c, sd, out = ref.config, _state_dict(ref), {}
  for a, b in (('time_embed.0', 'time_embedding.linear_1'), ('time_embed.2', 'time_embedding.linear_2'),
               ('input_blocks.0.0', 'conv_in'), ('out.0', 'conv_norm_out'), ('out.2', 'conv_out')):
    for leaf in ('weight', 'bias'):
      out[f'{a}.{leaf}'] = sd[f'{b}.{leaf}']
  if 'class_embedding.weight' in sd:
    out['label_emb.weight'] = sd['class_embedding.weight']
  heads = lambda ch: ch // c.attention_head_dim  # noqa: E731
  levels, layer = len(c.block_out_channels), 1
  for i, kind in enumerate(c.down_block_types):
    for j in range(c.layers_per_block):
      _resnet(sd, f'input_blocks.{layer}.0', f'down_blocks.{i}.resnets.{j}', out)
      if kind.startswith('Attn'):
        _attention(sd, f'input_blocks.{layer}.1', f'down_blocks.{i}.attentions.{j}', out,
                   heads(c.block_out_channels[i]), legacy)
      layer += 1
    if i != levels - 1:
      if f'down_blocks.{i}.downsamplers.0.conv.weight' in sd:  # Downsample(use_conv): op
        for leaf in ('weight', 'bias'):
          out[f'input_blocks.{layer}.0.op.{leaf}'] = sd[f'down_blocks.{i}.downsamplers.0.conv.{leaf}']
      else:
        _resnet(sd, f'input_blocks.{layer}.0', f'down_blocks.{i}.downsamplers.0', out)
      layer += 1
  _resnet(sd, 'middle_block.0', 'mid_block.resnets.0', out)
  _attention(sd, 'middle_block.1', 'mid_block.attentions.0', out, heads(c.block_out_channels[-1]),
             legacy)
  _resnet(sd, 'middle_block.2', 'mid_block.resnets.1', out)
  layer = 0
  for i, kind in enumerate(c.up_block_types):
    attn = kind.startswith('Attn')
    for j in range(c.layers_per_block + 1):
      _resnet(sd, f'output_blocks.{layer}.0', f'up_blocks.{i}.resnets.{j}', out)
      if attn:
        _attention(sd, f'output_blocks.{layer}.1', f'up_blocks.{i}.attentions.{j}', out,
                   heads(c.block_out_channels[levels - 1 - i]), legacy)
      layer += 1
    if i != levels - 1:
      old = f'output_blocks.{layer - 1}.{2 if attn else 1}'
      if f'up_blocks.{i}.upsamplers.0.conv.weight' in sd:  # Upsample(use_conv): conv
        for leaf in ('weight', 'bias'):
          out[f'{old}.conv.{leaf}'] = sd[f'up_blocks.{i}.upsamplers.0.conv.{leaf}']
      else:
        _resnet(sd, old, f'up_blocks.{i}.upsamplers.0', out)
  return out


def openai_keys(model_channels, channel_mult, num_res_blocks, attention_ds, class_cond, updown):
  """The state-dict keys of guided-diffusion's UNetModel, from its __init__ (unet.py)."""
  keys = {f'{m}.{leaf}' for m in ('time_embed.0', 'time_embed.2', 'input_blocks.0.0', 'out.0',
                                  'out.2') for leaf in ('weight', 'bias')}
  keys |= {'label_emb.weight'} if class_cond else set()

  def res(prefix, cin, cout):
    subs = ['in_layers.0', 'in_layers.2', 'emb_layers.1', 'out_layers.0', 'out_layers.3']
    subs += ['skip_connection'] if cin != cout else []
    return {f'{prefix}.{s}.{leaf}' for s in subs for leaf in ('weight', 'bias')}

  def attn(prefix):
    return {f'{prefix}.{s}.{leaf}' for s in ('norm', 'qkv', 'proj_out') for leaf in ('weight', 'bias')}

  ch, chans, ds, n = model_channels * channel_mult[0], [model_channels * channel_mult[0]], 1, 1
  for level, mult in enumerate(channel_mult):
    for _ in range(num_res_blocks):
      keys |= res(f'input_blocks.{n}.0', ch, mult * model_channels)
      ch = mult * model_channels
      keys |= attn(f'input_blocks.{n}.1') if ds in attention_ds else set()
      chans.append(ch)
      n += 1
    if level != len(channel_mult) - 1:
      keys |= res(f'input_blocks.{n}.0', ch, ch) if updown else {
          f'input_blocks.{n}.0.op.{leaf}' for leaf in ('weight', 'bias')}
      chans.append(ch)
      n, ds = n + 1, ds * 2
  keys |= res('middle_block.0', ch, ch) | attn('middle_block.1') | res('middle_block.2', ch, ch)
  n = 0
  for level, mult in list(enumerate(channel_mult))[::-1]:
    for i in range(num_res_blocks + 1):
      keys |= res(f'output_blocks.{n}.0', ch + chans.pop(), model_channels * mult)
      ch, sub = model_channels * mult, 1
      if ds in attention_ds:
        keys |= attn(f'output_blocks.{n}.1')
        sub = 2
      if level and i == num_res_blocks:
        keys |= res(f'output_blocks.{n}.{sub}', ch, ch) if updown else {
            f'output_blocks.{n}.{sub}.conv.{leaf}' for leaf in ('weight', 'bias')}
        ds //= 2
      n += 1
  return keys


def _inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3,) + model.input.shape).astype(np.float32)
  y = None if model.conditioning is None else np.array([0, 17, 999], np.int64)
  return x, np.array([0, 421, 999]), y


def _max_diff(got, want):
  assert got.shape == want.shape and np.abs(want).max() > 0.5  # a non-degenerate output
  return float(np.abs(np.asarray(got) - want).max())


_CACHE = {}


def _jit(fn, **kwargs):
  """jax.jit with the CPU backend's LLVM optimisation off: these tiny programs compile in about
  half the time and run fast enough."""
  return jax.jit(fn, compiler_options=FAST_COMPILE, **kwargs)


def _setup(name):
  """(ref, model, params from diffusers, apply) of a configuration, built once."""
  if name not in _CACHE:
    ref = _reference(CONFIGS[name][0], seed=ord(name))
    model_config, params = diffusers_adm.diffusers_to_params(_state_dict(ref), _full_config(ref))
    model = models.build_model(model_config)
    static = _jit(lambda p, x, t, y, gates=None: models.backbone.call(model, p, x, t, y,
                                                                     gates=gates),
                  static_argnames='gates')
    traced = _jit(lambda p, x, t, y, gates: models.backbone.call(model, p, x, t, y, gates=gates))

    def apply(p, x, t, y, gates=None):
      if gates is None or isinstance(gates, gating.StaticMask):
        return np.asarray(static(p, x, t, y, gates=gates))
      return np.asarray(traced(p, x, t, y, gates))
    _CACHE[name] = (ref, model, params, apply)
  return _CACHE[name]


# ---------------------------------------------------------------------------------------------
# The network against diffusers, through both importers.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_both_importers_match_diffusers(name):
  config, flags, legacy = CONFIGS[name]
  ref, model, params, apply = _setup(name)
  spec = model.spec
  x, t, y = _inputs(model)
  want = _torch_out(ref, x, t, y)
  diff = _max_diff(apply(params, x, t, y), want)

  sd = openai_state_dict(ref, legacy=legacy)
  assert set(sd) == openai_keys(spec.model_channels, spec.channel_mult, spec.num_res_blocks,
                                spec.attention_resolutions, spec.num_classes > 0, spec.resblock_updown)
  model_config, diffusion_config, openai_params = guided_diffusion.original_to_params(sd, flags)
  # The same network (heads per block equal; num_heads is unused with num_head_channels).
  flagged = models.spec_from_config(model_config)
  assert adm.adm_layout(flagged) == adm.adm_layout(spec)
  heads = ('num_heads', 'num_head_channels', 'num_heads_upsample', 'dropout')
  assert {k: v for k, v in dataclasses.asdict(flagged).items() if k not in heads} == {
      k: v for k, v in dataclasses.asdict(spec).items() if k not in heads} | dict(
          use_new_attention_order=not legacy)
  assert diffusion_config.num_timesteps == (4000 if name == 'B' else 1000)
  if legacy:
    openai_model = models.build_model(model_config)
    got = np.asarray(_jit(lambda p, x, t, y: models.backbone.call(openai_model, p, x, t, y))(
        openai_params, x, t, y))
  else:  # the same network (asserted above): the compiled diffusers-import program
    got = apply(openai_params, x, t, y)
  openai_diff = _max_diff(got, want)
  print(f'\n[{name}] max |ours - diffusers| {diff:.2e} (diffusers importer), {openai_diff:.2e} '
        f'(OpenAI layout, {"legacy" if legacy else "new"} attention order); |out| <= '
        f'{np.abs(want).max():.2f}')
  assert diff < ATOL and openai_diff < ATOL
  if not legacy:  # the same tensors, in the same tree
    jax.tree_util.tree_map(np.testing.assert_array_equal, openai_params, params)
  assert model.output == ('eps_variance' if config['out_channels'] == 6 else 'eps')


def test_rescaled_timesteps_are_improved_diffusions(tmp_path):
  """time_scale: improved-diffusion's rescale_timesteps calls the network with t * 1000 / T."""
  ref, model, params, _ = _setup('B')
  scaled = adm.ADM(dataclasses.replace(model.spec, time_scale=0.25))
  x, t, _ = _inputs(model, seed=5)
  t = np.array([0, 401, 3999])
  got = np.asarray(_jit(scaled.apply)({'params': params}, x, t))
  assert _max_diff(got, _torch_out(ref, x, t.astype(np.float32) * 0.25, None)) < ATOL
  improved = ('--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True '
              '--diffusion_steps 4000 --noise_schedule cosine')
  model_config, diffusion_config, f = guided_diffusion.configs_from_flags(improved,
                                                                          'improved-diffusion')
  assert model_config.time_scale == 0.25 and tuple(model_config.channel_mult) == (1, 2, 2, 2)
  assert model_config.num_heads == 4 and tuple(model_config.attention_resolutions) == (2, 4)
  assert diffusion_config.to_dict() == dict(num_timesteps=4000, beta_schedule='cosine')
  assert f['rescale_timesteps'] and guided_diffusion.configs_from_flags(
      improved + ' --rescale_timesteps False', 'improved-diffusion')[0].time_scale == 1.0
  _, linear, _ = guided_diffusion.configs_from_flags(B_FLAGS)  # guided: linear scaled by 1000/T
  assert linear.to_dict() == dict(num_timesteps=4000, beta_schedule='linear', beta_start=2.5e-5,
                                  beta_end=0.005)


def test_legacy_attention_against_numpy():
  """QKVAttentionLegacy (heads split before q, k, v) and QKVAttention, transcribed in numpy on
  the original's N x C x T layout, against our AttentionBlock on one block."""
  rng = np.random.default_rng(0)
  b, side, c, heads = 2, 4, 64, 4
  x = rng.standard_normal((b, side, side, c)).astype(np.float32)
  for new_order in (False, True):
    block = adm.adm_blocks.AttentionBlock(c, heads, new_order, num_groups=32)
    params = jax.tree_util.tree_map(
        lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.2,
        block.init(jax.random.PRNGKey(0), jnp.zeros((1, side, side, c)))['params'])
    got = np.asarray(_jit(block.apply)({'params': params}, x))

    xs = x.reshape(b, side * side, c).transpose(0, 2, 1).astype(np.float64)  # N x C x T
    g = xs.reshape(b, 32, -1)
    norm = ((g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-5)).reshape(xs.shape)
    norm = norm * params['norm']['scale'][None, :, None] + params['norm']['bias'][None, :, None]
    qkv = np.einsum('oc,bct->bot', params['qkv']['kernel'].T, norm) + params['qkv']['bias'][None, :, None]
    length, ch = qkv.shape[-1], c // heads
    if new_order:
      q, k, v = np.split(qkv, 3, axis=1)
      q, k, v = (a.reshape(b * heads, ch, length) for a in (q, k, v))
    else:
      q, k, v = np.split(qkv.reshape(b * heads, 3 * ch, length), 3, axis=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = np.einsum('bct,bcs->bts', q * scale, k * scale)
    w = np.exp(w - w.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum('bts,bcs->bct', w, v).reshape(b, -1, length)
    h = np.einsum('oc,bct->bot', params['proj_out']['kernel'].T, a) + params['proj_out']['bias'][None, :, None]
    want = (xs + h).transpose(0, 2, 1).reshape(x.shape)
    assert np.abs(got - want).max() < 1e-4, new_order
  # The two orders differ for the same weights (more than one head).
  legacy = _jit(adm.adm_blocks.AttentionBlock(c, heads, False, num_groups=32).apply)(
      {'params': params}, x)
  assert np.abs(np.asarray(legacy) - got).max() > 1e-3


def test_heads_per_block_follow_unet_py():
  """num_head_channels wins over num_heads; output blocks use num_heads_upsample (-1: num_heads)."""
  spec = adm.ADMSpec(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(1, 2), num_heads=4, num_heads_upsample=1)
  heads = {op.name: op.heads for op in adm.adm_layout(spec) if op.kind == 'attn'}
  assert heads == {'down_0_attn_0': 4, 'down_1_attn_0': 4, 'mid_attn': 4, 'up_1_attn_0': 1,
                   'up_1_attn_1': 1, 'up_0_attn_0': 1, 'up_0_attn_1': 1}
  by_width = adm.adm_layout(dataclasses.replace(spec, num_head_channels=16))
  assert {op.name: op.heads for op in by_width if op.kind == 'attn'}['up_1_attn_0'] == 4
  assert {op.name: op.heads for op in by_width if op.kind == 'attn'}['down_0_attn_0'] == 2


# ---------------------------------------------------------------------------------------------
# Gate forms, units and FLOPs.
# ---------------------------------------------------------------------------------------------

def _diffusers_skip(module):
  """What a diffusers block returns in place of itself: a ResnetBlock2D its shortcut (resample,
  then the 1x1 conv_shortcut if any), an Attention its input."""
  if isinstance(module, diffusers.models.attention_processor.Attention):
    return lambda hidden_states, *args, **kwargs: hidden_states

  def shortcut(input_tensor, temb, *args, **kwargs):
    x = input_tensor
    if module.upsample is not None:
      x = module.upsample(x)
    elif module.downsample is not None:
      x = module.downsample(x)
    return module.conv_shortcut(x) if module.conv_shortcut is not None else x
  return shortcut


@contextlib.contextmanager
def _blended(ref, spec, weights: dict):
  """diffusers with unit name's block replaced by skip + g (block - skip) (g = 0: the skip)."""
  where = diffusers_adm.diffusers_modules(spec)
  saved = {}
  for name, g in weights.items():
    module = ref.get_submodule(where[name])
    saved[name] = (module, module.forward)
    skip = _diffusers_skip(module)

    def forward(*args, _run=module.forward, _skip=skip, _g=g, **kwargs):
      s = _skip(*args, **kwargs)
      return s if _g == 0 else s + _g * (_run(*args, **kwargs) - s)
    module.forward = forward
  try:
    yield ref
  finally:
    for module, run in saved.values():
      module.forward = run


def test_gate_forms_against_diffusers_with_blocks_replaced():
  ref, model, params, apply = _setup('A')
  x, t, y = _inputs(model, seed=3)
  names = [u.name for u in model.units]
  full = _torch_out(ref, x, t, y)
  # A down- and an up-ResBlock (skip: their resample), projecting ResBlocks, attention, plain
  # ResBlocks.
  for skipped in (['down_0_downsample'], ['up_1_upsample', 'down_1_res_0', 'mid_attn'],
                  ['mid_res_0', 'up_1_attn_0', 'up_0_res_1', 'down_1_attn_0']):
    keep = tuple(n not in skipped for n in names)
    with _blended(ref, model.spec, {n: 0 for n in skipped}):
      want = _torch_out(ref, x, t, y)
    got = apply(params, x, t, y, gating.StaticMask(keep))
    assert _max_diff(got, want) < ATOL, skipped
    assert np.abs(want - full).max() > 1e-2, skipped  # the skip matters
    cond = apply(params, x, t, y, gating.CondMask(jnp.asarray(keep)))
    assert _max_diff(cond, got) < ATOL, skipped
  # Soft gates at g = 0.3 on two units, every other unit on (sigmoid(100) = 1).
  soft = {'down_0_downsample': 0.3, 'up_1_attn_0': 0.3}
  logits = np.array([np.log(0.3 / 0.7) if n in soft else 100.0 for n in names], np.float32)
  with _blended(ref, model.spec, soft):
    want = _torch_out(ref, x, t, y)
  assert _max_diff(apply(params, x, t, y, gating.SoftGates(jnp.asarray(logits))), want) < ATOL


def test_units_positions_and_skips():
  _, model, _, _ = _setup('A')
  got = [(u.name, u.kind, u.position, u.skip, u.ase_droppable) for u in model.units]
  assert got == [
      ('down_0_res_0', 'res', 'encoder', 'identity', False),
      ('down_0_downsample', 'res', 'encoder', 'resample', False),
      ('down_1_res_0', 'res', 'encoder', 'shortcut_projection', False),
      ('down_1_attn_0', 'attn', 'encoder', 'identity', False),
      ('mid_res_0', 'res', 'middle', 'identity', False),
      ('mid_attn', 'attn', 'middle', 'identity', False),
      ('mid_res_1', 'res', 'middle', 'identity', True),
      ('up_1_res_0', 'res', 'decoder', 'shortcut_projection', True),
      ('up_1_attn_0', 'attn', 'decoder', 'identity', True),
      ('up_1_res_1', 'res', 'decoder', 'shortcut_projection', True),
      ('up_1_attn_1', 'attn', 'decoder', 'identity', True),
      ('up_1_upsample', 'res', 'decoder', 'resample', True),
      ('up_0_res_0', 'res', 'decoder', 'shortcut_projection', True),
      ('up_0_res_1', 'res', 'decoder', 'shortcut_projection', True)]
  assert model.conditioning == models.ClassConditioning(1000, None)
  assert model.time_embedding == ('time_embed_0', 'time_embed_1')
  assert model.input == models.InputSpec('pixels', (16, 16, 3))


def test_real_64x64_model_is_the_consistency_conversions_imagenet64():
  """The README flags of 64x64_diffusion.pt (REFERENCE §10) and the ImageNet-64 config of
  diffusers' convert_consistency_to_diffusers.py describe one network (epsilon-only there)."""
  flags = ('--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 '
           '--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 '
           '--num_head_channels 64 --num_res_blocks 3 --resblock_updown True '
           '--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True')
  model_config, diffusion_config, _ = guided_diffusion.configs_from_flags(flags)
  spec = models.spec_from_config(model_config)
  assert (spec.channel_mult, spec.attention_resolutions) == ((1, 2, 3, 4), (2, 4, 8))
  assert diffusion_config.to_dict() == dict(num_timesteps=1000, beta_schedule='cosine')
  imagenet64 = dict(sample_size=64, in_channels=3, out_channels=3, layers_per_block=3,
                    num_class_embeds=1000, block_out_channels=[192, 384, 576, 768],
                    attention_head_dim=64, attn_norm_num_groups=32,
                    down_block_types=['ResnetDownsampleBlock2D'] + ['AttnDownBlock2D'] * 3,
                    up_block_types=['AttnUpBlock2D'] * 3 + ['ResnetUpsampleBlock2D'],
                    resnet_time_scale_shift='scale_shift', upsample_type='resnet',
                    downsample_type='resnet')
  assert diffusers_adm.is_adm_config(imagenet64)
  ours = models.spec_from_config(diffusers_adm.model_config_from_diffusers(imagenet64))
  assert adm.adm_layout(ours) == adm.adm_layout(spec)
  assert ours == dataclasses.replace(spec, learn_sigma=False, dropout=0.0, num_heads=1)
  with torch.device('meta'):
    reference = diffusers.UNet2DModel(**imagenet64)
  n_ref = sum(p.numel() for p in reference.parameters())
  shapes = jax.eval_shape(lambda: models.init_params(adm.ADM(ours), jax.random.PRNGKey(0)))
  assert models.count_params(shapes) == n_ref
  # 16 input and 16 output blocks: 15 + 9 encoder units (3 down-ResBlocks), 3 middle, 19 + 12
  # decoder units (3 up-ResBlocks).
  units = adm.ADM(spec).units
  counts = {(p, k): sum(u.position == p and u.kind == k for u in units)
            for p in adm.backbone.POSITIONS for k in ('res', 'attn')}
  assert counts == {('encoder', 'res'): 15, ('encoder', 'attn'): 9, ('middle', 'res'): 2,
                    ('middle', 'attn'): 1, ('decoder', 'res'): 19, ('decoder', 'attn'): 12}


def _xla_flops(model, params, keep=None):
  x = jax.ShapeDtypeStruct((1,) + tuple(model.input.shape), np.float32)
  t = jax.ShapeDtypeStruct((1,), np.int32)
  y = None if model.conditioning is None else t
  mask = None if keep is None else gating.StaticMask(tuple(keep))
  fn = jax.jit(lambda p, x, t, y: models.backbone.call(model, p, x, t, y, gates=mask))
  analysis = fn.lower(params, x, t, y).compile(compiler_options=FAST_COMPILE).cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)['flops'])


def test_flops_match_xla():
  _, model, _, _ = _setup('A')
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  mc = cost.model_cost(model)
  total = _xla_flops(model, shapes)
  assert mc.total_flops == pytest.approx(total, rel=2e-3)
  by_name = {u.name: u for u in mc.units}
  for name, rel in (('down_1_res_0', 3e-3), ('down_0_downsample', 1e-2),
                    ('up_1_upsample', 3e-3), ('mid_attn', 8e-3)):
    keep = [u.name != name for u in mc.units]
    unit = by_name[name]
    assert unit.run_flops - unit.skip_flops == pytest.approx(total - _xla_flops(model, shapes, keep),
                                                             rel=rel), name
  none = _xla_flops(model, shapes, [False] * model.num_units)
  assert mc.flops_for_mask(np.zeros(model.num_units, bool)) == pytest.approx(none, rel=1e-2)
  # A skipped down-ResBlock still pools its input: 4 FLOPs per output element.
  assert by_name['down_0_downsample'].skip_flops == 4 * 8 * 8 * 32
  assert by_name['up_1_upsample'].skip_flops == 0


def test_describe(tmp_path):
  ref, model, _, _ = _setup('C')
  config = ml_collections.ConfigDict(dict(
      model=diffusers_adm.model_config_from_diffusers(_full_config(ref))))
  out = cost.describe(config, str(tmp_path))
  assert [u['name'] for u in out['units']] == [u.name for u in model.units]
  assert out['params'] == models.count_params(_setup('C')[2])
  assert json.loads((tmp_path / 'blocks.json').read_text())['total_gflops'] == pytest.approx(
      cost.model_cost(model).total_flops / 1e9)


def test_cosine_schedule_is_the_formula():
  """Improved DDPM eq. 17, computed here in float64 with math, one timestep at a time."""
  for steps in (1000, 4000):
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    want = [min(1 - abar((i + 1) / steps) / abar(i / steps), 0.999) for i in range(steps)]
    schedule = diffusion.make_schedule(steps, 'cosine')
    np.testing.assert_allclose(schedule.betas, want, rtol=1e-12, atol=0)
    assert schedule.betas[-1] == 0.999 and schedule.betas.dtype == np.float64
    config = ml_collections.ConfigDict(dict(num_timesteps=steps, beta_schedule='cosine'))
    np.testing.assert_array_equal(diffusion.schedule_from_config(config).betas, schedule.betas)
  with pytest.raises(ValueError, match="'linear', 'cosine'"):
    diffusion.make_schedule(10, 'quadratic')


# ---------------------------------------------------------------------------------------------
# Refusals, and the convert() / command-line paths.
# ---------------------------------------------------------------------------------------------

def test_openai_tensors_are_checked_together_by_name():
  ref = _setup('A')[0]
  sd = openai_state_dict(ref)
  del sd['input_blocks.1.0.emb_layers.1.bias']
  sd['output_blocks.0.1.qkv.weight'] = sd['output_blocks.0.1.qkv.weight'][:, :, 0]
  sd['middle_block.1.proj_out.bias'] = sd['middle_block.1.proj_out.bias'].copy()
  sd['middle_block.1.proj_out.bias'][3] = np.nan
  sd['out.2.bias'] = sd['out.2.bias'].astype(np.int64)
  sd['output_blocks.9.0.in_layers.0.weight'] = np.ones(32, np.float32)
  with pytest.raises(convert.ConversionError) as e:
    guided_diffusion.original_to_params(sd, A_FLAGS)
  for fragment in ('input_blocks.1.0.emb_layers.1.bias (shape (64,), for down_0_res_0/temb_proj/bias)',
                   'output_blocks.0.1.qkv.weight: shape (192, 64), expected (192, 64, 1)',
                   'middle_block.1.proj_out.bias: 1 NaN and 0 Inf value(s)',
                   'out.2.bias: dtype int64, expected a floating-point tensor',
                   'output_blocks.9.0.in_layers.0.weight (shape (32,))'):
    assert fragment in str(e.value), fragment


def test_flags_refused_by_name_and_against_the_file():
  sd = openai_state_dict(_setup('A')[0])
  with pytest.raises(convert.ConversionError, match=r'unknown flag\(s\) --num_chanels, --batch_size'):
    guided_diffusion.parse_flags('--num_chanels 32 --batch_size 4 --image_size 16')
  with pytest.raises(convert.ConversionError, match=r'--channel_mult \(a guided-diffusion flag\)'):
    guided_diffusion.parse_flags('--channel_mult 1,2', 'improved-diffusion')
  with pytest.raises(convert.ConversionError, match="--class_cond 'maybe': a boolean"):
    guided_diffusion.parse_flags('--class_cond maybe')
  with pytest.raises(convert.ConversionError, match='--image_size 16 has no default channel_mult'):
    guided_diffusion.configs_from_flags('--image_size 16')
  with pytest.raises(convert.ConversionError, match='predict_xstart'):
    guided_diffusion.configs_from_flags(A_FLAGS + ' --predict_xstart True')
  # Flags that contradict the tensors: what the file looks like comes with the refusal.
  wrong = A_FLAGS.replace('--num_channels 32', '--num_channels 64').replace(
      '--resblock_updown True', '--resblock_updown False').replace('--class_cond True', '')
  with pytest.raises(convert.ConversionError) as e:
    guided_diffusion.original_to_params(sd, wrong)
  message = str(e.value)
  for fragment in ('model_channels: flags 64, file 32', 'resblock_updown: flags False, file True',
                   'num_classes: flags 0, file 1000',
                   'The file looks like: --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 '
                   '--attention_resolutions 8 --class_cond True --learn_sigma True '
                   '--use_scale_shift_norm True --resblock_updown True'):
    assert fragment in message, fragment
  with pytest.raises(convert.ConversionError, match='attention_resolutions: flags \\(1, 2\\)'):
    guided_diffusion.original_to_params(sd, A_FLAGS.replace('--attention_resolutions 8',
                                                            '--attention_resolutions 16,8'))


def test_diffusers_config_refusals():
  config = dict(A, _class_name='UNet2DModel', attn_norm_num_groups=None, freq_shift=1,
                down_block_types=['ResnetDownsampleBlock2D', 'KDownBlock2D'])
  with pytest.raises(convert.ConversionError) as e:
    diffusers_adm.model_config_from_diffusers(config)
  for fragment in ('freq_shift=1', "block types ['KDownBlock2D']", 'attn_norm_num_groups=None'):
    assert fragment in str(e.value), fragment
  mixed = dict(A, down_block_types=['DownBlock2D', 'AttnDownBlock2D'])  # conv down, resnet up
  with pytest.raises(convert.ConversionError, match='resampling mixes ResBlocks and convolutions'):
    diffusers_adm.model_config_from_diffusers(mixed)
  # The DDPM-style UNet2DModel (google/ddpm-cifar10-32) is not ADM; B and the consistency configs are.
  ddpm = dict(_class_name='UNet2DModel', flip_sin_to_cos=False, freq_shift=1,
              down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
              up_block_types=['AttnUpBlock2D', 'UpBlock2D'])
  assert not diffusers_adm.is_adm_config(ddpm) and diffusers_adm.is_adm_config(B)
  ref = _setup('A')[0]
  sd = _state_dict(ref)
  del sd['mid_block.attentions.0.to_k.bias']
  with pytest.raises(convert.ConversionError,
                     match=r'mid_block.attentions.0.to_k.bias \(shape \(64,\), for mid_attn/qkv/bias\)'):
    diffusers_adm.diffusers_to_params(sd, _full_config(ref))


def test_pt_file_through_the_command_line_and_load_backbone(tmp_path, capsys):
  ref, model, params, apply = _setup('A')
  path = str(tmp_path / 'adm_tiny.pt')
  torch.save({k: torch.from_numpy(v) for k, v in openai_state_dict(ref).items()}, path)
  out = str(tmp_path / 'out')
  assert convert.main(['--source', path, '--out', out, '--model_flags', A_FLAGS]) == 0
  printed = capsys.readouterr().out
  assert 'ADM model_channels=32' in printed and "variance_type='learned_range'" in printed
  loaded, loaded_params = lees_jax.load_backbone(out)
  assert loaded.spec == models.spec_from_config(guided_diffusion.configs_from_flags(A_FLAGS)[0])
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)
  from lees_jax import checkpoints  # pylint: disable=g-import-not-at-top
  meta = checkpoints.read_backbone_meta(out)
  assert meta['diffusion'] == dict(num_timesteps=1000, beta_schedule='cosine')
  assert meta['model_output'] == 'eps_variance' and meta['model_flags'] == A_FLAGS
  # A .pt says what it is with --arch (DiT) or --model_flags (ADM), never both or neither.
  with pytest.raises(convert.ConversionError, match='pass --arch .* --model_flags .* --arch=uvit'):
    convert.convert(path, str(tmp_path / 'a'))
  with pytest.raises(convert.ConversionError, match='give one kind'):
    convert.convert(path, str(tmp_path / 'b'), arch='DiT-XL/2', model_flags=A_FLAGS)
  with pytest.raises(convert.ConversionError, match='is not one'):
    convert.convert(str(tmp_path), str(tmp_path / 'c'), model_flags=A_FLAGS)
  with pytest.raises(convert.ConversionError, match='--model_defaults goes with --model_flags'):
    convert.convert(path, str(tmp_path / 'd'), model_defaults='improved-diffusion')
  assert not any((tmp_path / n).exists() for n in 'abcd')


def test_diffusers_directory_through_convert(tmp_path):
  ref, model, params, _ = _setup('C')
  ref.save_pretrained(str(tmp_path / 'unet'))
  (tmp_path / 'scheduler').mkdir()
  (tmp_path / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(dict(
      _class_name='DDPMScheduler', beta_schedule='squaredcos_cap_v2', num_train_timesteps=1000,
      variance_type='learned_range')))
  with pytest.raises(convert.ConversionError, match='--dropout'):
    convert.convert(str(tmp_path), str(tmp_path / 'refused'), dropout=0.1)
  out = convert.convert(str(tmp_path), str(tmp_path / 'out'))
  loaded, loaded_params = lees_jax.load_backbone(out)
  assert loaded.spec == model.spec
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_params, params)
  from lees_jax import checkpoints  # pylint: disable=g-import-not-at-top
  assert checkpoints.read_backbone_meta(out)['diffusion'] == dict(num_timesteps=1000,
                                                                  beta_schedule='cosine')
  (tmp_path / 'scheduler' / 'scheduler_config.json').write_text(json.dumps(dict(
      _class_name='CMStochasticIterativeScheduler', num_train_timesteps=40, sigma_min=0.002)))
  with pytest.raises(convert.ConversionError, match='consistency model'):
    convert.convert(str(tmp_path), str(tmp_path / 'cm'))


def test_samples_with_an_ase_schedule_and_its_learned_variance():
  """The backbone through the generic sampler: learned-range DDPM on the cosine schedule, ASE's
  D3 schedule (decoder units dropped from the end), labels without a null class."""
  from lees_jax import ase, samplers, solvers  # pylint: disable=g-import-not-at-top
  _, model, params, _ = _setup('A')
  solver = solvers.make_solver(diffusion.make_schedule(1000, 'cosine'), 'ddpm', steps=4,
                               variance='learned_range')
  policy = ase.named_schedule('D3', model.units)
  assert ase.max_drop_fraction_for(model.units) == 8 / 14  # 7 decoder units + mid_res_1
  program = samplers.compile_sampler(model, solver, policy, batch_size=2)
  assert 0.5 < program.flop_fraction < 1.0
  x0 = np.asarray(program(params, jax.random.PRNGKey(0), np.array([3, 999])))
  assert x0.shape == (2, 16, 16, 3) and np.isfinite(x0).all()
  with pytest.raises(ValueError, match='no null class'):
    program(params, jax.random.PRNGKey(0), np.array([3, 1000]))
  with pytest.raises(ValueError, match='has no null class .*cannot be guided'):
    samplers.compile_sampler(model, solver, policy, batch_size=2, guidance_scale=2.0)
