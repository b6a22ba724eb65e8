"""diffusers -> lees_jax conversion, checked against diffusers' own UNet2DModel (the oracle).

diffusers' ``UNet2DModel`` with random weights (GroupNorm affine parameters randomised too, so a
swapped scale/bias or a wrong norm is visible) is saved in the formats the Hub uses, converted with
`lees_jax.convert`, loaded with `lees_jax.load_backbone`, and both networks are run on the same
inputs (NCHW for torch, NHWC for us). Offline and CPU only.
"""

import json
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
from safetensors.numpy import load_file, save_file  # noqa: E402

import lees_jax  # noqa: E402
from lees_jax import checkpoints, convert, models, torch_archive  # noqa: E402
from lees_jax.models import unet  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-4  # fp32, max abs difference against diffusers

# google/ddpm-cifar10-32's config.json (REFERENCE §2), as the Hub serves it.
DDPM_CIFAR10_CONFIG = {
    '_class_name': 'UNet2DModel', '_diffusers_version': '0.1.1', 'act_fn': 'silu',
    'attention_head_dim': None, 'block_out_channels': [128, 256, 256, 256],
    'center_input_sample': False,
    'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
    'downsample_padding': 0, 'flip_sin_to_cos': False, 'freq_shift': 1, 'in_channels': 3,
    'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-06, 'norm_num_groups': 32,
    'out_channels': 3, 'sample_size': 32, 'time_embedding_type': 'positional',
    'up_block_types': ['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'],
}
DDPM_SCHEDULER_CONFIG = {
    '_class_name': 'DDPMScheduler', '_diffusers_version': '0.1.1', 'beta_end': 0.02,
    'beta_schedule': 'linear', 'beta_start': 0.0001, 'clip_sample': True,
    'num_train_timesteps': 1000, 'trained_betas': None, 'variance_type': 'fixed_small',
}

# Small variants for the broader checks: the DDPM layout at 2 levels, and a 3-level model with
# attention at the first level, one ResBlock per level and different in/out channels.
SMALL = dict(DDPM_CIFAR10_CONFIG, block_out_channels=[32, 64], norm_num_groups=8,
             down_block_types=['DownBlock2D', 'AttnDownBlock2D'],
             up_block_types=['AttnUpBlock2D', 'UpBlock2D'])
SMALL3 = dict(DDPM_CIFAR10_CONFIG, block_out_channels=[16, 32, 32], norm_num_groups=4,
              layers_per_block=1, sample_size=16, in_channels=1, out_channels=2, norm_eps=1e-5,
              down_block_types=['AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'],
              up_block_types=['UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D'])

OLD_NAMES = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}


def _diffusers_config(config):
  return {k: v for k, v in config.items() if not k.startswith('_')}


def _diffusers_model(config, seed=0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DModel(**_diffusers_config(config)).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.GroupNorm):
        m.weight.normal_(1.0, 0.3)
        m.bias.normal_(0.0, 0.3)
  return model


def _old_name(name):
  for new, old in OLD_NAMES.items():
    marker = f'.{new}.'
    if '.attentions.' in name and marker in name:
      return name.replace(marker, f'.{old}.')
  return name


def _write_source(directory, model, fmt='safetensors', names='new', scheduler=None):
  """A diffusers model directory as on the Hub: config.json + weights (+ scheduler_config.json)."""
  os.makedirs(directory, exist_ok=True)
  weights = os.path.join(directory, convert.SAFETENSORS_FILE if fmt == 'safetensors'
                         else convert.BIN_FILE)
  if names == 'new':
    model.save_pretrained(directory, safe_serialization=(fmt == 'safetensors'))
    assert os.path.isfile(weights)
  else:  # the Hub checkpoint's names (query/key/value/proj_attn): the weights written once
    model.save_config(directory)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    renamed = {_old_name(k): v for k, v in sd.items()}
    assert sum(k != _old_name(k) for k in sd) > 0
    if fmt == 'safetensors':
      save_file(renamed, weights)
    else:
      torch.save({k: torch.from_numpy(v) for k, v in renamed.items()}, weights)
  if scheduler is not None:
    with open(os.path.join(directory, convert.SCHEDULER_FILE), 'w') as f:
      json.dump(scheduler, f)
  return directory


def _torch_eps(model, x_nchw, t):
  with torch.no_grad():
    return model(torch.from_numpy(x_nchw), torch.from_numpy(np.asarray(t))).sample.numpy()


_JITTED = {}


def _our_eps(model, params, x_nchw, t):
  # One compilation per architecture and input shape, shared by the tests (CPU time matters).
  if model not in _JITTED:
    _JITTED[model] = jax.jit(model.apply)
  out = _JITTED[model]({'params': params}, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)),
                       jnp.asarray(t))
  return np.asarray(out).transpose(0, 3, 1, 2)


# (batch, timesteps): every timestep of interest, batch sizes 3 and 1.
CASES = [(3, np.array([0, 10, 500])), (1, np.array([999]))]


def _max_diffs(ref_model, model, params, config, seed=0):
  rng = np.random.default_rng(seed)
  c, s = config['in_channels'], config['sample_size']
  diffs = {}
  for batch, t in CASES:
    x = rng.standard_normal((batch, c, s, s)).astype(np.float32)
    want = _torch_eps(ref_model, x, t)
    got = _our_eps(model, params, x, t)
    assert got.shape == want.shape
    assert np.abs(want).max() > 0.1  # a meaningful, non-degenerate output
    diffs[f'B={batch},t={t.tolist()}'] = float(np.abs(got - want).max())
  return diffs


def _report(name, diffs):
  print(f'\n[{name}] max |ours - diffusers|: ' + ', '.join(f'{k}: {v:.2e}' for k, v in diffs.items()))


@pytest.fixture(scope='module')
def small(tmp_path_factory):
  """The small diffusers model and its four on-disk variants (safetensors/.bin x new/old names)."""
  model = _diffusers_model(SMALL, seed=1)
  root = tmp_path_factory.mktemp('small')
  sources = {(fmt, names): _write_source(str(root / f'{fmt}-{names}'), model, fmt, names)
             for fmt in ('safetensors', 'bin') for names in ('new', 'old')}
  return model, sources


# ---------------------------------------------------------------------------------------------
# Parity with diffusers.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fmt', ['safetensors', 'bin'])
@pytest.mark.parametrize('names', ['new', 'old'])
def test_small_model_matches_diffusers(small, tmp_path, fmt, names):
  ref, sources = small
  out = convert.convert(sources[(fmt, names)], str(tmp_path / 'out'))
  meta = checkpoints.read_backbone_meta(out)
  assert meta['attention_names'] == names
  assert meta['source_files']['weights'] == os.path.basename(
      convert.SAFETENSORS_FILE if fmt == 'safetensors' else convert.BIN_FILE)
  model, params = lees_jax.load_backbone(out)
  assert model.spec == unet.UNetSpec(ch=32, ch_mult=(1, 2), num_res_blocks=2,
                                     attn_resolutions=(16,), num_groups=8, dropout=0.1)
  assert models.count_params(params) == sum(p.numel() for p in ref.parameters())
  diffs = _max_diffs(ref, model, params, SMALL)
  _report(f'small {fmt} {names} names', diffs)
  assert max(diffs.values()) <= ATOL, diffs


def test_three_level_variant_matches_diffusers(tmp_path):
  """Attention at the first level, one ResBlock per level, 1 -> 2 channels, eps 1e-5."""
  ref = _diffusers_model(SMALL3, seed=2)
  src = _write_source(str(tmp_path / 'src'), ref, 'safetensors', 'old')
  model, params = lees_jax.load_backbone(convert.convert(src, str(tmp_path / 'out')))
  assert model.spec == unet.UNetSpec(resolution=16, in_channels=1, out_channels=2, ch=16,
                                     ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,),
                                     num_groups=4, norm_eps=1e-5, dropout=0.1)
  diffs = _max_diffs(ref, model, params, SMALL3)
  _report('3-level variant', diffs)
  assert max(diffs.values()) <= ATOL, diffs


def test_diffusers_to_params_layouts_and_name_schemes(small):
  """Kernels are transposed (OIHW -> HWIO, Linear -> (in, out)); both name schemes agree."""
  ref, _ = small
  new = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  old = {_old_name(k): v for k, v in new.items()}
  model_config, params = convert.diffusers_to_params(new, SMALL)
  _, params_old = convert.diffusers_to_params(old, SMALL)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_old)
  levels = len(model_config.ch_mult)
  assert levels == 2
  np.testing.assert_array_equal(params['conv_in']['kernel'],
                                new['conv_in.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['temb_dense_1']['kernel'],
                                new['time_embedding.linear_2.weight'].T)
  np.testing.assert_array_equal(params['up_1_attn_2']['proj_out']['kernel'],  # up_blocks[0]
                                new['up_blocks.0.attentions.2.to_out.0.weight'].T)
  np.testing.assert_array_equal(params['up_0_res_2']['norm1']['scale'],  # up_blocks[1]
                                new['up_blocks.1.resnets.2.norm1.weight'])
  np.testing.assert_array_equal(params['norm_out']['bias'], new['conv_norm_out.bias'])
  leaves = jax.tree_util.tree_leaves(params)
  assert all(a.dtype == np.float32 for a in leaves)
  assert sum(a.size for a in leaves) == sum(v.size for v in new.values())


def test_old_named_files_are_what_diffusers_itself_loads(small):
  """Our old-name files mimic the Hub's: diffusers loads them into the same network."""
  ref, sources = small
  loaded = diffusers.UNet2DModel.from_pretrained(sources[('safetensors', 'old')]).eval()
  want = ref.state_dict()
  got = loaded.state_dict()
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert torch.equal(got[name], value), name


@pytest.fixture(scope='module')
def full_size(tmp_path_factory):
  """The google/ddpm-cifar10-32 architecture (35.7M parameters) in the Hub's layout, converted
  once for the module (each copy of it is 143 MB)."""
  root = tmp_path_factory.mktemp('full')
  ref = _diffusers_model(DDPM_CIFAR10_CONFIG, seed=0)
  src = _write_source(str(root / 'hub'), ref, 'safetensors', 'old',
                      scheduler=DDPM_SCHEDULER_CONFIG)
  with open(os.path.join(src, 'config.json'), 'w') as f:  # exactly the Hub's config.json
    json.dump(DDPM_CIFAR10_CONFIG, f)
  out = convert.convert(src, str(root / 'ddpm-cifar10-32'))
  return ref, src, out


def test_full_size_ddpm_cifar10_matches_diffusers(full_size):
  """The google/ddpm-cifar10-32 architecture (35.7M parameters) in the Hub's layout."""
  ref, src, out = full_size
  assert sum(p.numel() for p in ref.parameters()) == 35_746_307

  # The converted backbone is the paper's model as configs/cifar10.py describes it.
  from configs import cifar10
  paper = cifar10.get_config()
  # (load_backbone_params checks every architecture field against the expected config.)
  model_config, params = checkpoints.load_backbone_params(out, expected_model_config=paper.model)
  assert (model_config.name, model_config.dropout) == (paper.model.name, paper.model.dropout)
  meta = checkpoints.read_backbone_meta(out)
  assert meta['diffusion'] == {k: paper.diffusion[k] for k in meta['diffusion']}
  assert meta['source'] == os.path.abspath(src) and meta['attention_names'] == 'old'
  assert meta['num_params'] == 35_746_307 and meta['scheduler_config'] == DDPM_SCHEDULER_CONFIG
  # The Hub's scheduler samples with fixed_small, our default sampler too.
  assert meta['variance_type'] == 'fixed_small' and meta['source_dtypes'] == {'float32': len(ref.state_dict())}

  model, params = lees_jax.load_backbone(out)
  rng = np.random.default_rng(0)
  diffs = {}
  for batch, t in [(4, np.array([0, 10, 500, 999]))]:  # one compilation of the big model
    x = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
    diffs[f'B={batch},t={t.tolist()}'] = float(np.abs(_our_eps(model, params, x, t) -
                                                      _torch_eps(ref, x, t)).max())
  _report('full-size google/ddpm-cifar10-32 layout', diffs)
  assert max(diffs.values()) <= ATOL, diffs


def test_full_size_legacy_bin_gives_bitwise_the_same_params(full_size, tmp_path):
  """The Hub's legacy .bin (old names), read without torch, gives bitwise the same parameters."""
  ref, _, out = full_size
  _, params = checkpoints.load_backbone_params(out)
  bin_src = _write_source(str(tmp_path / 'hub-bin'), ref, 'bin', 'old')
  state_dict = convert.read_state_dict(os.path.join(bin_src, convert.BIN_FILE))
  _, bin_params = convert.diffusers_to_params(state_dict, DDPM_CIFAR10_CONFIG)
  jax.tree_util.tree_map(np.testing.assert_array_equal, bin_params, params)


# ---------------------------------------------------------------------------------------------
# Strictness: tampered files, unsupported configs, existing outputs.
# ---------------------------------------------------------------------------------------------

def _tampered_source(small, tmp_path, edit):
  _, sources = small
  src = tmp_path / 'tampered'
  src.mkdir()
  base = sources[('safetensors', 'old')]
  sd = load_file(os.path.join(base, convert.SAFETENSORS_FILE))
  edit(sd)
  save_file(sd, str(src / convert.SAFETENSORS_FILE))
  with open(os.path.join(base, 'config.json')) as f:
    (src / 'config.json').write_text(f.read())
  return str(src)


def _fails(source, out, *fragments, error=convert.ConversionError):
  with pytest.raises(error) as info:
    convert.convert(source, out)
  message = str(info.value)
  for fragment in fragments:
    assert fragment in message, f'{fragment!r} not in error message:\n{message}'
  assert not os.path.exists(out)
  assert not [p for p in os.listdir(os.path.dirname(out)) if '.tmp-' in p]
  return message


def _wrong_shape(sd):
  sd['down_blocks.1.resnets.0.conv1.weight'] = np.zeros((64, 32, 1, 1), np.float32)


def _missing(sd):
  del sd['mid_block.attentions.0.key.bias']
  del sd['up_blocks.0.upsamplers.0.conv.weight']


def _unexpected(sd):
  sd['down_blocks.0.attentions.0.query.weight'] = np.zeros((32, 32), np.float32)
  sd['ema_decay'] = np.zeros((), np.float32)


@pytest.mark.parametrize('edit,fragments', [
    (_wrong_shape, ['down_blocks.1.resnets.0.conv1.weight', '(64, 32, 1, 1)', '(64, 32, 3, 3)',
                    'down_1_res_0/conv1/kernel']),
    (_missing, ['2 missing', 'mid_block.attentions.0.to_k.bias',
                'old name mid_block.attentions.0.key.bias', 'mid_attn/k/bias',
                'up_blocks.0.upsamplers.0.conv.weight', 'up_1_upsample/conv/kernel']),
    (_unexpected, ['2 unexpected', 'down_blocks.0.attentions.0.query.weight', 'ema_decay']),
], ids=['wrong_shape', 'missing', 'unexpected'])
def test_tampered_checkpoint_names_each_offending_tensor(small, tmp_path, edit, fragments):
  src = _tampered_source(small, tmp_path, edit)
  _fails(src, str(tmp_path / 'out'), *fragments)


def _nonfinite(sd):
  w = sd['down_blocks.1.resnets.0.conv1.weight'].copy()
  w[0, 0, 0, 0], w[1, 2, 0, 1] = np.nan, np.nan
  sd['down_blocks.1.resnets.0.conv1.weight'] = w
  b = sd['conv_out.bias'].copy()
  b[1] = -np.inf
  sd['conv_out.bias'] = b


def _non_float(sd):
  sd['conv_in.bias'] = np.arange(32, dtype=np.int64)
  sd['mid_block.attentions.0.query.bias'] = np.ones(64, bool)


@pytest.mark.parametrize('edit,fragments', [
    (_nonfinite, ['2 tensor(s)', 'down_blocks.1.resnets.0.conv1.weight', '2 NaN and 0 Inf',
                  'down_1_res_0/conv1/kernel', 'conv_out.bias', '0 NaN and 1 Inf',
                  'conv_out/bias']),
    (_non_float, ['2 tensor(s)', 'conv_in.bias', 'dtype int64', 'conv_in/bias',
                  'mid_block.attentions.0.query.bias', 'dtype bool', 'mid_attn/q/bias']),
], ids=['nan_inf', 'int_bool'])
def test_non_finite_and_non_float_tensors_are_refused_by_name(small, tmp_path, edit, fragments):
  """A NaN / Inf value or an integer / boolean tensor is refused, naming each tensor (as the
  checkpoint spells it and our parameter), with nothing written."""
  src = _tampered_source(small, tmp_path, edit)
  _fails(src, str(tmp_path / 'out'), *fragments)


@pytest.mark.parametrize('half,fmt', [('float16', 'safetensors'), ('bfloat16', 'safetensors'),
                                      ('bfloat16', 'bin')])
def test_half_precision_checkpoint_converts_exactly(small, tmp_path, fmt, half):
  """A float16 / bfloat16 checkpoint (safetensors' numpy API cannot read bfloat16) converts to
  float32 exactly: the backbone equals diffusers' model with the half weights cast to float32
  (torch's own cast, the oracle), and its outputs match that model's."""
  ref, _ = small
  dtype = getattr(torch, half)
  half_model = _diffusers_model(SMALL, seed=1).to(dtype)
  src = _write_source(str(tmp_path / 'src'), half_model, fmt, 'new')
  out = convert.convert(src, str(tmp_path / 'out'))
  meta = checkpoints.read_backbone_meta(out)
  assert meta['source_dtypes'] == {half: len(half_model.state_dict())}
  model, params = lees_jax.load_backbone(out)
  oracle = half_model.float()
  want = {k: v.detach().numpy() for k, v in oracle.state_dict().items()}
  _, want_params = convert.diffusers_to_params(want, SMALL)  # float32 in: only a relayout
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, want_params)
  diffs = _max_diffs(oracle, model, params, SMALL)
  assert max(diffs.values()) <= ATOL, diffs


def test_all_problems_are_reported_together(small, tmp_path):
  src = _tampered_source(small, tmp_path, lambda sd: (_wrong_shape(sd), _missing(sd),
                                                       _unexpected(sd)))
  _fails(src, str(tmp_path / 'out'), 'missing', 'unexpected', 'wrong shape',
         'down_blocks.1.resnets.0.conv1.weight', 'mid_block.attentions.0.to_k.bias', 'ema_decay')


def test_tensor_under_old_and_new_name_is_an_error(small, tmp_path):
  def both(sd):
    sd['mid_block.attentions.0.to_q.weight'] = sd['mid_block.attentions.0.query.weight']
  src = _tampered_source(small, tmp_path, both)
  _fails(src, str(tmp_path / 'out'), 'mid_block.attentions.0.query.weight',
         'mid_block.attentions.0.to_q.weight')


class _RunsCode:
  """Pickles as a call to os.system: a .bin that would run code under torch.load/pickle.load."""

  def __init__(self, sentinel):
    self.sentinel = sentinel

  def __reduce__(self):
    return (os.system, (f'touch {self.sentinel}',))


def test_bin_whose_pickle_would_run_code_is_refused_without_running_it(small, tmp_path):
  _, sources = small
  src = tmp_path / 'evil'
  src.mkdir()
  with open(os.path.join(sources[('bin', 'new')], 'config.json')) as f:
    (src / 'config.json').write_text(f.read())
  sentinel = tmp_path / 'code_ran'
  torch.save({'conv_in.bias': torch.zeros(32), 'payload': _RunsCode(str(sentinel))},
             str(src / convert.BIN_FILE))
  assert zipfile.is_zipfile(src / convert.BIN_FILE)
  _fails(str(src), str(tmp_path / 'out'), 'system', convert.BIN_FILE,
         error=torch_archive.UnsafeArchiveError)
  assert not sentinel.exists()


def test_corrupt_safetensors_gives_a_clear_error(small, tmp_path):
  _, sources = small
  src = tmp_path / 'corrupt'
  src.mkdir()
  base = sources[('safetensors', 'new')]
  with open(os.path.join(base, 'config.json')) as f:
    (src / 'config.json').write_text(f.read())
  with open(os.path.join(base, convert.SAFETENSORS_FILE), 'rb') as f:
    (src / convert.SAFETENSORS_FILE).write_bytes(f.read()[:5000])
  _fails(str(src), str(tmp_path / 'out'), convert.SAFETENSORS_FILE)


def test_unsupported_config_lists_every_unsupported_field(tmp_path):
  config = dict(SMALL, flip_sin_to_cos=True, downsample_padding=1, attention_head_dim=8,
                act_fn='gelu', resnet_time_scale_shift='scale_shift', class_embed_type='timestep',
                up_block_types=['UpBlock2D', 'UpBlock2D'], time_embedding_type='fourier')
  del config['freq_shift']  # absent: diffusers' default (0) applies
  with pytest.raises(convert.ConversionError) as info:
    convert.diffusers_to_params({}, config)
  message = str(info.value)
  for field in ('flip_sin_to_cos=True', 'downsample_padding=1', 'attention_head_dim=8',
                "act_fn='gelu'", "resnet_time_scale_shift='scale_shift'",
                "class_embed_type='timestep'", 'attention levels differ',
                "time_embedding_type='fourier'", 'freq_shift=0 (absent from config.json'):
    assert field in message, f'{field!r} not in:\n{message}'
  # And through `convert`: the config is checked before the weights are read; nothing written.
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(config))
  (src / convert.SAFETENSORS_FILE).write_bytes(b'not read')
  _fails(str(src), str(tmp_path / 'out'), 'flip_sin_to_cos=True')


def test_model_config_of_the_hub_checkpoint():
  mc = convert.model_config_from_diffusers(DDPM_CIFAR10_CONFIG)
  assert (mc.ch, tuple(mc.ch_mult), mc.num_res_blocks, tuple(mc.attn_resolutions)) == (
      128, (1, 2, 2, 2), 2, (16,))
  assert (mc.resolution, mc.num_groups, mc.norm_eps, mc.dropout) == (32, 32, 1e-6, 0.1)
  assert convert.model_config_from_diffusers(DDPM_CIFAR10_CONFIG, dropout=0.0).dropout == 0.0
  # attention_head_dim equal to every attention block's channels is single-head too.
  assert convert.model_config_from_diffusers(dict(DDPM_CIFAR10_CONFIG, attention_head_dim=256))
  # A list sample_size of a square works; a non-square one does not.
  assert convert.model_config_from_diffusers(dict(SMALL, sample_size=[32, 32])).resolution == 32
  with pytest.raises(convert.ConversionError, match='sample_size'):
    convert.model_config_from_diffusers(dict(SMALL, sample_size=[32, 16]))


def test_diffusion_config_from_scheduler():
  default = convert.diffusion_config_from_scheduler(None).to_dict()
  assert default == dict(num_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02)
  assert convert.diffusion_config_from_scheduler(DDPM_SCHEDULER_CONFIG).to_dict() == default
  with pytest.raises(convert.ConversionError, match="scaled_linear.*\n.*v_prediction"):
    convert.diffusion_config_from_scheduler(dict(beta_schedule='scaled_linear',
                                                 prediction_type='v_prediction'))
  # diffusers' squaredcos_cap_v2 is improved DDPM's cosine schedule.
  assert convert.diffusion_config_from_scheduler(dict(
      beta_schedule='squaredcos_cap_v2', num_train_timesteps=4000)).to_dict() == dict(
          num_timesteps=4000, beta_schedule='cosine')


@pytest.mark.parametrize('scheduler,want,origin', [
    (DDPM_SCHEDULER_CONFIG, 'fixed_small', 'scheduler_config.json'),
    (dict(DDPM_SCHEDULER_CONFIG, variance_type='fixed_large'), 'fixed_large', 'scheduler_config.json'),
    ({k: v for k, v in DDPM_SCHEDULER_CONFIG.items() if k != 'variance_type'}, 'fixed_small',
     "diffusers' DDPMScheduler default"),
    (None, 'fixed_small', "diffusers' DDPMScheduler default"),
], ids=['hub', 'fixed_large', 'unstated', 'no_scheduler'])
def test_scheduler_variance_type_is_recorded(small, tmp_path, scheduler, want, origin):
  """The hub scheduler's variance_type (diffusers' DDPMScheduler defaults to fixed_small) is
  recorded in the backbone metadata, with where it came from."""
  _, sources = small
  src = tmp_path / 'src'
  src.mkdir()
  base = sources[('safetensors', 'new')]
  for name in ('config.json', convert.SAFETENSORS_FILE):
    os.symlink(os.path.join(base, name), src / name)
  if scheduler is not None:
    (src / convert.SCHEDULER_FILE).write_text(json.dumps(scheduler))
  meta = checkpoints.read_backbone_meta(convert.convert(str(src), str(tmp_path / 'out')))
  assert meta['variance_type'] == want and meta['variance_type_from'] == origin
  assert diffusers.DDPMScheduler.from_config(scheduler or {}).config.variance_type == want


def test_learned_variance_schedulers_are_refused():
  for vt in ('learned', 'learned_range', 'fixed_small_log'):
    with pytest.raises(convert.ConversionError, match=f"variance_type='{vt}'"):
      convert.diffusion_config_from_scheduler(dict(DDPM_SCHEDULER_CONFIG, variance_type=vt))


def test_existing_output_is_refused_unless_overwrite(small, tmp_path):
  _, sources = small
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(FileExistsError, match='overwrite'):
    convert.convert(sources[('safetensors', 'new')], str(out))
  assert (out / 'keep.txt').read_text() == 'mine'
  assert convert.main(['--source', sources[('safetensors', 'new')], '--out', str(out)]) == 1
  assert convert.main(['--source', sources[('safetensors', 'new')], '--out', str(out),
                       '--overwrite']) == 0
  assert not (out / 'keep.txt').exists()
  lees_jax.load_backbone(str(out))


def test_pipeline_layout_with_unet_and_scheduler_folders(small, tmp_path):
  """A pipeline snapshot (model_index.json, unet/, scheduler/) is found from its root."""
  ref, _ = small
  root = tmp_path / 'pipeline'
  _write_source(str(root / 'unet'), ref)
  (root / 'scheduler').mkdir()
  (root / 'scheduler' / convert.SCHEDULER_FILE).write_text(
      json.dumps(dict(DDPM_SCHEDULER_CONFIG, num_train_timesteps=500, beta_end=0.03)))
  (root / 'model_index.json').write_text('{}')
  for source in (root, root / 'unet'):
    out = tmp_path / f'out-{source.name}'
    convert.convert(str(source), str(out))
    meta = checkpoints.read_backbone_meta(str(out))
    assert meta['diffusion']['num_timesteps'] == 500 and meta['diffusion']['beta_end'] == 0.03


def test_missing_files_in_local_directory(tmp_path):
  src = tmp_path / 'empty'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(SMALL))
  _fails(str(src), str(tmp_path / 'out'), convert.SAFETENSORS_FILE, convert.BIN_FILE,
         error=convert.SourceUnavailableError)


# ---------------------------------------------------------------------------------------------
# The Hugging Face Hub (mocked: tests run offline).
# ---------------------------------------------------------------------------------------------

def test_offline_hub_id_says_which_files_to_place_where(tmp_path, monkeypatch):
  import huggingface_hub
  from huggingface_hub import constants, errors

  calls = []

  def offline(repo_id, filename, subfolder=None, **kwargs):
    calls.append(filename)
    raise errors.LocalEntryNotFoundError('cannot reach the Hub and the file is not in the cache')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', offline)
  out = str(tmp_path / 'ckpt')
  message = _fails('google/ddpm-cifar10-32', out, 'config.json',
                   'diffusion_pytorch_model.safetensors',
                   'https://huggingface.co/google/ddpm-cifar10-32',
                   f'python -m lees_jax.convert --source=D --out={out}',
                   error=convert.SourceUnavailableError)
  assert calls == ['config.json']
  print('\n[offline message]', message)

  # The real client in offline mode (HF_HUB_OFFLINE=1) with an empty cache gives the same advice.
  monkeypatch.undo()
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf-cache'))
  _fails('google/ddpm-cifar10-32', out, 'diffusion_pytorch_model.safetensors', '--source=D',
         error=convert.SourceUnavailableError)


@pytest.mark.parametrize('available', [('safetensors', 'bin'), ('bin',)])
def test_hub_download_prefers_safetensors_and_falls_back_to_bin(small, tmp_path, monkeypatch,
                                                               available):
  import huggingface_hub
  from huggingface_hub import errors

  _, sources = small
  hub = {convert.CONFIG_FILE: os.path.join(sources[('safetensors', 'old')], 'config.json'),
         convert.SCHEDULER_FILE: str(tmp_path / 'scheduler_config.json')}
  with open(hub[convert.SCHEDULER_FILE], 'w') as f:
    json.dump(DDPM_SCHEDULER_CONFIG, f)
  if 'safetensors' in available:
    hub[convert.SAFETENSORS_FILE] = os.path.join(sources[('safetensors', 'old')],
                                                 convert.SAFETENSORS_FILE)
  hub[convert.BIN_FILE] = os.path.join(sources[('bin', 'old')], convert.BIN_FILE)
  calls = []

  def fake_download(repo_id, filename, subfolder=None, **kwargs):
    calls.append((repo_id, filename, subfolder))
    if subfolder is None and filename in hub:
      return hub[filename]
    raise errors.EntryNotFoundError(f'404: {filename} not in {repo_id}')

  monkeypatch.setattr(huggingface_hub, 'hf_hub_download', fake_download)
  out = convert.convert('someone/ddpm-small', str(tmp_path / 'out'))
  meta = checkpoints.read_backbone_meta(out)
  want = convert.SAFETENSORS_FILE if 'safetensors' in available else convert.BIN_FILE
  assert meta['source'] == 'someone/ddpm-small' and meta['source_files']['weights'] == want
  assert meta['diffusion_from'] == 'scheduler_config.json'
  assert (('someone/ddpm-small', convert.BIN_FILE, None) in calls) == ('safetensors' not in available)
  lees_jax.load_backbone(out)


def test_cli_entry_point(small, tmp_path):
  _, sources = small
  out = tmp_path / 'cli-out'
  env = dict(os.environ, HF_HUB_OFFLINE='1', JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, '-m', 'lees_jax.convert',
                        f'--source={sources[("bin", "old")]}', f'--out={out}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  assert 'wrote' in run.stdout and 'load_backbone' in run.stdout
  assert "variance_type='fixed_small'" in run.stdout  # no scheduler file: diffusers' default
  lees_jax.load_backbone(str(out))
