"""The SD VAE (`lees_jax.models.vae`) and its importer against diffusers' AutoencoderKL (oracle:
random weights on CPU torch, fp32)."""

import functools
import re

import jax
import numpy as np
import pytest
from flax import traverse_util

from lees_jax.convert import diffusers_vae, layout
from lees_jax.convert.errors import ConversionError
from lees_jax.models import vae

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

SD_CONFIG = dict(
    _class_name='AutoencoderKL', in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32,
    act_fn='silu', sample_size=256)


def small_config(block_out_channels, layers_per_block, groups, **extra):
  n = len(block_out_channels)
  return dict(_class_name='AutoencoderKL', _diffusers_version='0.42.1', in_channels=3,
              out_channels=3, latent_channels=4, down_block_types=['DownEncoderBlock2D'] * n,
              up_block_types=['UpDecoderBlock2D'] * n, block_out_channels=list(block_out_channels),
              layers_per_block=layers_per_block, norm_num_groups=groups, act_fn='silu',
              sample_size=32, scaling_factor=0.18215, force_upcast=True, **extra)


# (config, image size): two levels at 16x16, three levels and two layers at 32x32, and one
# without quant convs or mid-block attention.
CASES = {
    'two_levels': (small_config((32, 64), 1, 8), 16),
    'three_levels': (small_config((32, 64, 64), 2, 16), 32),
    'no_quant_no_attn': (small_config((16, 32), 1, 8, use_quant_conv=False,
                                      use_post_quant_conv=False, mid_block_add_attention=False),
                         16),
}
# Measured max-abs (mean, logvar, image): two_levels 1.0e-6, 8.3e-7, 2.2e-6; three_levels
# 1.8e-6, 1.2e-6, 6.8e-6; no_quant_no_attn 1.3e-6, 8.9e-7, 1.4e-6 (printed with -s).
TOL = 2e-5


def diffusers_vae_model(config, seed=0):
  """diffusers' AutoencoderKL with random weights, every tensor perturbed (norm scales around 1,
  biases non-zero) so that no tensor is trivially zero or one."""
  torch.manual_seed(seed)
  init = {k: v for k, v in config.items() if not k.startswith('_')}
  model = diffusers.AutoencoderKL(**init).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.add_(0.02 * torch.randn_like(p))
  return model


def state_dict_np(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.lru_cache(maxsize=None)
def imported(name):
  """(name, config, image size, diffusers model, our model, our imported params) of a case."""
  config, size = CASES[name]
  torch_model = diffusers_vae_model(config)
  model_config, params = diffusers_vae.diffusers_to_params(state_dict_np(torch_model), config)
  return name, config, size, torch_model, vae.build_vae(model_config), params


@pytest.fixture(scope='module', params=sorted(CASES))
def case(request):
  return imported(request.param)


def test_oracle(case):
  name, config, size, torch_model, model, params = case
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 3, size, size)).astype(np.float32)
  f = model.spec.downsample_factor
  z = rng.normal(size=(2, 4, size // f, size // f)).astype(np.float32)
  with torch.no_grad():
    dist = torch_model.encode(torch.from_numpy(x)).latent_dist
    want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
    want_image = torch_model.decode(torch.from_numpy(z)).sample.numpy()
  nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
  mean, logvar = model.apply({'params': params}, nhwc(x), method=vae.AutoencoderKL.encode)
  image = model.apply({'params': params}, nhwc(z), method=vae.AutoencoderKL.decode)
  assert mean.shape == (2, size // f, size // f, 4) and image.shape == (2, size, size, 3)
  errors = {k: float(np.abs(np.asarray(got) - nhwc(want)).max()) for k, got, want in (
      ('mean', mean, want_mean), ('logvar', logvar, want_logvar), ('image', image, want_image))}
  scale = {k: float(np.abs(a).max()) for k, a in (('mean', want_mean), ('image', want_image))}
  print(name, errors, 'max |value|', scale)
  assert max(errors.values()) <= TOL, errors
  assert np.abs(want_image).max() > 0.1 and np.abs(want_mean).max() > 0.1  # not degenerate


def test_convenience_functions():  # one case: they only wrap encode / decode
  _, config, size, torch_model, model, params = imported('two_levels')
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  scaled = vae.latents_from_images(model, params, images)
  floats = images.astype(np.float32) / 127.5 - 1
  mean, logvar = model.apply({'params': params}, floats, method=vae.AutoencoderKL.encode)
  np.testing.assert_allclose(scaled, mean * 0.18215, atol=1e-6)
  np.testing.assert_allclose(vae.latents_from_images(model, params, floats), scaled, atol=1e-6)
  sample = vae.latents_from_images(model, params, images, rng=jax.random.PRNGKey(0))
  again = vae.latents_from_images(model, params, images, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(sample, again)
  noise = (np.asarray(sample) / 0.18215 - mean) / np.exp(0.5 * np.asarray(logvar))
  assert 0.5 < noise.std() < 1.5 and np.abs(noise).max() > 0.1  # mean + std * N(0, 1)

  out = vae.images_from_latents(model, params, scaled)
  assert out.dtype == np.uint8 and out.shape == images.shape
  with torch.no_grad():  # diffusers' post-processing: (x / 2 + 0.5).clamp(0, 1) * 255, rounded
    x = torch_model.decode(torch.from_numpy(np.array(scaled).transpose(0, 3, 1, 2))
                           / 0.18215).sample
    want = ((x / 2 + 0.5).clamp(0, 1) * 255).numpy().round().astype(np.uint8).transpose(0, 2, 3, 1)
  diff = np.abs(np.asarray(out, np.int32) - want)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01  # off by one only at rounding ties
  with pytest.raises(ValueError, match='NHWC with 3 channels'):
    vae.latents_from_images(model, params, images.transpose(0, 3, 1, 2))


def test_legacy_attention_names_import_the_same():
  config, _ = CASES['two_levels']
  torch_model = diffusers_vae_model(config)
  sd = state_dict_np(torch_model)
  legacy = {}
  for k, v in sd.items():
    for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'),
                     ('to_out.0', 'proj_attn')):
      k = k.replace(f'attentions.0.{new}.', f'attentions.0.{old}.')
    legacy[k] = v
  assert 'encoder.mid_block.attentions.0.proj_attn.weight' in legacy
  # these are the names diffusers' own loader renames (from_pretrained of an old file)
  assert set(torch_model._fix_state_dict_keys_on_load(dict(legacy))) == set(sd)
  assert diffusers_vae.attention_names(legacy) == 'old'
  assert diffusers_vae.attention_names(sd) == 'new'
  _, new_params = diffusers_vae.diffusers_to_params(sd, config)
  _, old_params = diffusers_vae.diffusers_to_params(legacy, config)
  a, b = traverse_util.flatten_dict(new_params), traverse_util.flatten_dict(old_params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  both = dict(sd, **{'decoder.mid_block.attentions.0.query.weight':
                     sd['decoder.mid_block.attentions.0.to_q.weight']})
  with pytest.raises(ConversionError, match=r'attentions\.0\.query\.weight and .*to_q\.weight'):
    diffusers_vae.diffusers_to_params(both, config)


@pytest.fixture(scope='module')
def small_state_dict():
  config, _ = CASES['two_levels']
  return config, state_dict_np(diffusers_vae_model(config))


def _edit(sd, kind):
  sd = dict(sd)
  if kind == 'missing':
    del sd['decoder.up_blocks.1.resnets.1.conv2.weight']
    return sd, r'1 missing tensor.*decoder\.up_blocks\.1\.resnets\.1\.conv2\.weight'
  if kind == 'unexpected':
    sd['encoder.down_blocks.0.resnets.0.time_emb_proj.weight'] = np.zeros((32, 8), np.float32)
    return sd, r'1 unexpected tensor.*encoder\.down_blocks\.0\.resnets\.0\.time_emb_proj\.weight'
  if kind == 'shape':
    sd['quant_conv.weight'] = np.zeros((8, 8, 3, 3), np.float32)
    return sd, r'quant_conv\.weight: shape \(8, 8, 3, 3\), expected \(8, 8, 1, 1\)'
  if kind == 'nan':
    w = sd['encoder.mid_block.attentions.0.to_k.bias'].copy()
    w[3] = np.nan
    sd['encoder.mid_block.attentions.0.to_k.bias'] = w
    return sd, r'encoder\.mid_block\.attentions\.0\.to_k\.bias: 1 NaN and 0 Inf'
  if kind == 'conv_attention':  # a 1x1 conv kernel, as original-SD files store attention
    sd['decoder.mid_block.attentions.0.to_v.weight'] = (
        sd['decoder.mid_block.attentions.0.to_v.weight'][:, :, None, None])
    return sd, r'to_v\.weight: shape \(64, 64, 1, 1\), expected \(64, 64\) \(a 1x1 conv kernel'
  raise AssertionError(kind)


@pytest.mark.parametrize('kind', ['missing', 'unexpected', 'shape', 'nan', 'conv_attention'])
def test_bad_tensor_is_refused_by_name(small_state_dict, kind):
  config, sd = small_state_dict
  sd, message = _edit(sd, kind)
  with pytest.raises(ConversionError, match=r'(?s)' + message):
    diffusers_vae.diffusers_to_params(sd, config)


def test_every_bad_tensor_is_reported_together(small_state_dict):
  config, sd = small_state_dict
  messages = []
  for kind in ('missing', 'unexpected', 'shape', 'nan'):
    sd, message = _edit(sd, kind)
    messages.append(message)
  with pytest.raises(ConversionError) as e:
    diffusers_vae.diffusers_to_params(sd, config)
  for message in messages:
    assert re.search(r'(?s)' + message, str(e.value)), message


@pytest.mark.parametrize('field,value', [
    ('down_block_types', ['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']),
    ('up_block_types', ['UpDecoderBlock2D']),  # one entry for two levels
    ('act_fn', 'gelu'),
    ('shift_factor', 0.1159),
    ('latents_mean', [0.0] * 4),
    ('norm_num_groups', 12),  # 32 and 64 channels are not divisible by 12
    ('layers_per_block', 0),
    ('use_quant_conv', 'yes'),
    ('_class_name', 'VQModel'),
])
def test_unsupported_config_field_is_refused_by_name(field, value):
  config = dict(CASES['two_levels'][0], **{field: value})
  with pytest.raises(ConversionError, match=rf'{field}.*{re.escape(repr(value))}'
                     if field != 'norm_num_groups' else 'norm_num_groups=12'):
    diffusers_vae.model_config_from_diffusers(config)


def test_config_defaults_and_ignored_keys():
  config = diffusers_vae.model_config_from_diffusers({'_class_name': 'AutoencoderKL'})
  assert config.name == 'sd_vae' and tuple(config.block_out_channels) == (64,)
  assert config.layers_per_block == 1 and config.scaling_factor == 0.18215
  assert diffusers_vae.ignored_config_keys(dict(SD_CONFIG, force_upcast=False, foo=1)) == [
      'foo', 'force_upcast']
  with pytest.raises(ValueError, match=r'block_out_channels\[1\]=48 is not divisible'):
    vae.VAESpec(block_out_channels=(32, 48), norm_num_groups=32)


def test_sd_vae_parameter_count_matches_diffusers():
  model_config = diffusers_vae.model_config_from_diffusers(SD_CONFIG)
  model = vae.build_vae(model_config)
  assert model.spec == vae.VAESpec()  # the defaults are the SD VAE
  abstract = jax.eval_shape(lambda: vae.init_vae_params(model, jax.random.PRNGKey(0)))
  ours = sum(leaf.size for leaf in jax.tree_util.tree_leaves(abstract))
  with torch.device('meta'):
    theirs = diffusers.AutoencoderKL(**{k: v for k, v in SD_CONFIG.items() if k[0] != '_'})
    names = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
  assert ours == sum(p.numel() for p in theirs.parameters()) == 83_653_863
  # and every diffusers tensor is one of ours, shape for shape
  flat = traverse_util.flatten_dict(abstract)
  mapped = {diffusers_vae.diffusers_name(p): layout.torch_shape(tuple(v.shape), p[-1])
            for p, v in flat.items()}
  assert mapped == names
