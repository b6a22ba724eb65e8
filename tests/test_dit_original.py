"""The importer of DiT's original checkpoints (`lees_jax.convert.dit_original`), against diffusers'
``DiTTransformer2DModel`` (the oracle) with random weights on CPU torch.

No original file is downloaded: a random diffusers DiT is written in the ORIGINAL layout
(facebookresearch/DiT ``models.py`` names) by inverting diffusers' own conversion rules
(``scripts/convert_dit_to_diffusers.py``: ``x_embedder.proj`` -> ``pos_embed.proj``, one
timestep / label embedding copied into every block's ``norm1.emb``, ``attn.qkv`` chunked into
``to_q``, ``to_k``, ``to_v``, ...), with the original's ``pos_embed`` buffer, and saved with
``torch.save``. The key set is checked against the one the original model definition has. For
the outputs to be comparable, diffusers is put on the original's conventions first: its
timestep frequencies divided by 128 (``downscale_freq_shift=0`` in every block's
``norm1.emb.time_proj``; diffusers divides by 127) and ``norm_eps=1e-6`` (the original's
LayerNorm before the MLP).

Measured (jax 0.10.2, torch 2.13, diffusers 0.42.1, CPU, fp32): max |ours - diffusers| <= 1.1e-6
on outputs of magnitude ~2 (patch 2 and 4, learn_sigma on and off, depth 3); ATOL = 1e-4.
"""

import argparse
import copy

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
from conftest import diffusers_dit_reference  # noqa: E402

import lees_jax  # noqa: E402
from lees_jax import checkpoints, convert, models  # noqa: E402
from lees_jax.convert import dit_original  # noqa: E402
from lees_jax.models import dit  # noqa: E402

ATOL = 1e-4
WIDTH, HEADS, DEPTH, CLASSES = 64, 4, 3, 10


def _arch(patch):
  """A non-paper size: S/<patch> with the test's width, depth and heads."""
  return f'DiT-S/{patch},hidden_size={WIDTH},depth={DEPTH},num_heads={HEADS}'


def _diffusers_config(patch, learn_sigma):
  return dict(num_attention_heads=HEADS, attention_head_dim=WIDTH // HEADS, in_channels=4,
              out_channels=8 if learn_sigma else None, num_layers=DEPTH, sample_size=8,
              patch_size=patch, num_embeds_ada_norm=CLASSES, norm_eps=1e-6)


def _on_original_conventions(ref):
  """diffusers' DiT as the original computes: frequencies exp(-ln(1e4) i / 128)."""
  for block in ref.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
  return ref


def original_keys(depth):
  """The state-dict keys of facebookresearch/DiT models.DiT (class dropout > 0): the fixed
  pos_embed Parameter, timm PatchEmbed's proj, TimestepEmbedder.mlp (Linear, SiLU, Linear),
  LabelEmbedder.embedding_table, per DiTBlock timm Attention (qkv, proj), timm Mlp (fc1, fc2)
  and adaLN_modulation (SiLU, Linear), FinalLayer.linear and adaLN_modulation."""
  modules = ['x_embedder.proj', 't_embedder.mlp.0', 't_embedder.mlp.2']
  for i in range(depth):
    modules += [f'blocks.{i}.{m}' for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2',
                                            'adaLN_modulation.1')]
  modules += ['final_layer.linear', 'final_layer.adaLN_modulation.1']
  return ({'pos_embed', 'y_embedder.embedding_table.weight'}
          | {f'{m}.{leaf}' for m in modules for leaf in ('weight', 'bias')})


def original_shapes(width, depth, patch, channels, classes, learn_sigma, tokens):
  """Their shapes, from the same definition (torch layouts: Linear (out, in), Conv2d OIHW)."""
  shapes = {'pos_embed': (1, tokens, width),
            'x_embedder.proj.weight': (width, channels, patch, patch),
            'x_embedder.proj.bias': (width,), 't_embedder.mlp.0.weight': (width, 256),
            't_embedder.mlp.0.bias': (width,), 't_embedder.mlp.2.weight': (width, width),
            't_embedder.mlp.2.bias': (width,),
            'y_embedder.embedding_table.weight': (classes + 1, width)}
  for i in range(depth):
    for m, out, inp in (('attn.qkv', 3 * width, width), ('attn.proj', width, width),
                        ('mlp.fc1', 4 * width, width), ('mlp.fc2', width, 4 * width),
                        ('adaLN_modulation.1', 6 * width, width)):
      shapes[f'blocks.{i}.{m}.weight'], shapes[f'blocks.{i}.{m}.bias'] = (out, inp), (out,)
  out = patch * patch * channels * (2 if learn_sigma else 1)
  shapes.update({'final_layer.linear.weight': (out, width), 'final_layer.linear.bias': (out,),
                 'final_layer.adaLN_modulation.1.weight': (2 * width, width),
                 'final_layer.adaLN_modulation.1.bias': (2 * width,)})
  return shapes


def to_original(ref):
  """diffusers' DiT state dict in the original layout: diffusers' conversion rules inverted."""
  sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
  emb = 'transformer_blocks.0.norm1.emb'
  out = {'pos_embed': ref.pos_embed.pos_embed.detach().clone(),  # a buffer diffusers does not save
         'x_embedder.proj.weight': sd.pop('pos_embed.proj.weight'),
         'x_embedder.proj.bias': sd.pop('pos_embed.proj.bias')}
  for ours, theirs in (('t_embedder.mlp.0', 'timestep_embedder.linear_1'),
                       ('t_embedder.mlp.2', 'timestep_embedder.linear_2')):
    for leaf in ('weight', 'bias'):
      out[f'{ours}.{leaf}'] = sd[f'{emb}.{theirs}.{leaf}']
  out['y_embedder.embedding_table.weight'] = sd[f'{emb}.class_embedder.embedding_table.weight']
  for i in range(len(ref.transformer_blocks)):
    b = f'transformer_blocks.{i}'
    for name in [k for k in sd if k.startswith(f'{b}.norm1.emb.')]:  # one copy per block
      torch.testing.assert_close(sd.pop(name), _copy_of(out, name, b), rtol=0, atol=0)
    for leaf in ('weight', 'bias'):
      out[f'blocks.{i}.attn.qkv.{leaf}'] = torch.cat(
          [sd.pop(f'{b}.attn1.to_{x}.{leaf}') for x in 'qkv'], dim=0)
      for ours, theirs in (('attn.proj', 'attn1.to_out.0'), ('mlp.fc1', 'ff.net.0.proj'),
                           ('mlp.fc2', 'ff.net.2'), ('adaLN_modulation.1', 'norm1.linear')):
        out[f'blocks.{i}.{ours}.{leaf}'] = sd.pop(f'{b}.{theirs}.{leaf}')
  for leaf in ('weight', 'bias'):
    out[f'final_layer.adaLN_modulation.1.{leaf}'] = sd.pop(f'proj_out_1.{leaf}')
    out[f'final_layer.linear.{leaf}'] = sd.pop(f'proj_out_2.{leaf}')
  assert not sd, f'diffusers tensors left unmapped: {sorted(sd)}'
  return out


def _copy_of(out, name, block):
  """The original tensor a block's copy of the timestep / label embedding was made from."""
  rest = name[len(f'{block}.norm1.emb.'):]
  return {'timestep_embedder.linear_1.weight': out['t_embedder.mlp.0.weight'],
          'timestep_embedder.linear_1.bias': out['t_embedder.mlp.0.bias'],
          'timestep_embedder.linear_2.weight': out['t_embedder.mlp.2.weight'],
          'timestep_embedder.linear_2.bias': out['t_embedder.mlp.2.bias'],
          'class_embedder.embedding_table.weight': out['y_embedder.embedding_table.weight']}[rest]


def _numpy(sd):
  return {k: v.numpy().copy() for k, v in sd.items()}


def _inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4,) + model.input.shape).astype(np.float32)
  return x, np.array([0, 10, 500, 999]), np.array([0, 3, CLASSES - 1, CLASSES])  # null class last


def _torch_out(ref, x, t, y):
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
              torch.from_numpy(y)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  """A random patch-2, learn_sigma DiT as an original .pt, with its diffusers oracle."""
  ref = _on_original_conventions(diffusers_dit_reference(_diffusers_config(2, True), seed=3))
  sd = to_original(ref)
  path = tmp_path_factory.mktemp('dit-original') / 'DiT-tiny-2.pt'
  torch.save(sd, str(path))
  return ref, _numpy(sd), str(path)


# ---------------------------------------------------------------------------------------------
# (a) The mapping: our model on an original file computes what diffusers does.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('patch,learn_sigma', [(2, True), (4, False), (4, True), (2, False)])
def test_original_file_matches_diffusers(patch, learn_sigma, tmp_path):
  ref = _on_original_conventions(
      diffusers_dit_reference(_diffusers_config(patch, learn_sigma), seed=patch + learn_sigma))
  sd = to_original(ref)
  tokens = (8 // patch) ** 2
  assert set(sd) == original_keys(DEPTH)
  assert {k: tuple(v.shape) for k, v in sd.items()} == original_shapes(
      WIDTH, DEPTH, patch, 4, CLASSES, learn_sigma, tokens)
  path = str(tmp_path / f'DiT-tiny-{patch}.pt')
  torch.save(sd, path)

  state_dict, which, args = dit_original.read_checkpoint(path)
  assert which == 'state_dict' and args is None
  model_config, params = dit_original.original_to_params(state_dict, _arch(patch))
  assert (model_config.input_size, model_config.patch_size, model_config.num_classes,
          model_config.learn_sigma) == (8, patch, CLASSES, learn_sigma)
  assert model_config.time_freq_shift == 0 and model_config.mlp_norm_eps == 1e-6
  model = models.build_model(model_config)
  assert model.output == ('eps_variance' if learn_sigma else 'eps')
  x, t, y = _inputs(model)
  want = _torch_out(ref, x, t, y)
  diff = float(np.abs(np.asarray(model.apply({'params': params}, x, t, y)) - want).max())
  print(f'\n[original DiT, patch {patch}, learn_sigma {learn_sigma}] max |ours - diffusers| '
        f'{diff:.2e} (outputs up to {np.abs(want).max():.2f})')
  assert np.abs(want).max() > 0.1 and diff <= ATOL


def test_qkv_thirds_and_names():
  name = dit_original.original_name
  assert name(('block_2', 'query', 'kernel')) == ('blocks.2.attn.qkv.weight', 0)
  assert name(('block_2', 'key', 'kernel')) == ('blocks.2.attn.qkv.weight', 1)
  assert name(('block_2', 'value', 'bias')) == ('blocks.2.attn.qkv.bias', 2)
  assert name(('y_embed', 'embedding')) == ('y_embedder.embedding_table.weight', None)
  assert name(('final_modulation', 'kernel')) == ('final_layer.adaLN_modulation.1.weight', None)


def test_paper_arch_and_its_contradiction():
  """A paper size imports by its name alone; a wrong one is refused saying what the file is."""
  shapes = original_shapes(384, 12, 8, 4, 1000, True, tokens=16)  # DiT-S/8 on 32 x 32 latents
  rng = np.random.default_rng(0)
  sd = {k: rng.standard_normal(s).astype(np.float32) * 0.02 for k, s in shapes.items()}
  sd['pos_embed'] = dit.position_embedding(4, 384)[None]
  model_config, params = dit_original.original_to_params(sd, 'DiT-S/8')
  assert models.spec_from_config(model_config) == dit.dit_size('S/8', input_size=32)
  np.testing.assert_array_equal(params['block_11']['value']['kernel'],
                                sd['blocks.11.attn.qkv.weight'][768:].T)
  with pytest.raises(convert.ConversionError) as e:
    dit_original.original_to_params(sd, 'DiT-B/8')
  assert ('the file has width 384, depth 12, patch 8, mlp hidden 1536: DiT-S/8, not DiT-B/8'
          in str(e.value))
  with pytest.raises(convert.ConversionError,
                     match=r'1536: DiT-S/8, not DiT-S/2 \(which has patch 2\)'):
    dit_original.original_to_params(sd, 'DiT-S/2')
  with pytest.raises(convert.ConversionError, match='unknown DiT size'):
    dit_original.original_to_params(sd, 'DiT-M/8')
  with pytest.raises(convert.ConversionError, match="'heads=6'"):
    dit_original.original_to_params(sd, 'DiT-S/8,heads=6')


@pytest.mark.parametrize('dtype', ['float16', 'bfloat16'])
def test_half_precision_file(source, tmp_path, dtype):
  """Weights (and pos_embed, rounded) stored in half precision import as their float32 values."""
  _, sd, _ = source
  path = str(tmp_path / 'half.pt')
  torch.save({k: torch.from_numpy(v).to(getattr(torch, dtype)) for k, v in sd.items()}, path)
  state_dict, _, _ = dit_original.read_checkpoint(path)
  _, params = dit_original.original_to_params(state_dict, _arch(2))
  np.testing.assert_array_equal(params['block_1']['key']['kernel'],
                                state_dict['blocks.1.attn.qkv.weight'][WIDTH:2 * WIDTH]
                                .astype(np.float32).T)
  assert params['t_embed_in']['kernel'].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# (b) train.py checkpoints: the EMA weights.
# ---------------------------------------------------------------------------------------------

def test_train_checkpoint_imports_the_ema(source, tmp_path):
  ref, sd, _ = source
  ema = {k: torch.from_numpy(v) for k, v in sd.items()}
  raw = {k: v * 2 for k, v in ema.items()}  # the non-EMA weights: must not be what is imported
  opt = {'state': {0: {'step': torch.tensor(7.0), 'exp_avg': torch.zeros(3)}},
         'param_groups': [{'lr': 1e-4, 'betas': (0.9, 0.999), 'weight_decay': 0, 'params': [0]}]}
  args = argparse.Namespace(model=_arch(2), image_size=64, num_classes=CLASSES, epochs=1400)
  path = str(tmp_path / '0400000.pt')
  torch.save({'model': raw, 'ema': ema, 'opt': opt, 'args': args}, path)
  state_dict, which, got_args = dit_original.read_checkpoint(path)
  assert which == 'ema' and got_args['image_size'] == 64
  np.testing.assert_array_equal(state_dict['blocks.0.attn.qkv.weight'],
                                sd['blocks.0.attn.qkv.weight'])
  out = convert.convert(path, str(tmp_path / 'out'), arch=_arch(2))
  meta = checkpoints.read_backbone_meta(out)
  assert meta['source_weights'] == 'ema' and meta['training_args']['model'] == _arch(2)
  _, params = checkpoints.load_backbone_params(out)
  _, want = dit_original.original_to_params(sd, _arch(2))
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, want)
  # Training args that name another model contradict --arch.
  torch.save({'ema': ema, 'args': argparse.Namespace(model='DiT-XL/2')}, path)
  with pytest.raises(convert.ConversionError, match="training args say model='DiT-XL/2'"):
    convert.convert(path, str(tmp_path / 'refused'), arch=_arch(2))


# ---------------------------------------------------------------------------------------------
# (c) Refusals, by name.
# ---------------------------------------------------------------------------------------------

def test_every_offending_tensor_is_named_together(source):
  _, sd, _ = source
  sd = copy.deepcopy(sd)
  del sd['blocks.1.attn.qkv.bias']
  sd['blocks.0.norm1.weight'] = np.ones(WIDTH, np.float32)  # the original's LNs are affine-free
  sd['blocks.2.mlp.fc2.weight'] = sd['blocks.2.mlp.fc2.weight'][:, :128]
  sd['t_embedder.mlp.0.weight'][0, 0] = np.nan
  sd['final_layer.adaLN_modulation.1.bias'] = np.arange(2 * WIDTH, dtype=np.int32)
  with pytest.raises(convert.ConversionError) as e:
    dit_original.original_to_params(sd, _arch(2))
  message = str(e.value)
  for fragment in (
      'blocks.1.attn.qkv.bias (shape (192,), for block_1/key/bias, block_1/query/bias, '
      'block_1/value/bias)',
      'blocks.0.norm1.weight (shape (64,))',
      'blocks.2.mlp.fc2.weight: shape (64, 128), expected (64, 256) (for block_2/mlp_out/kernel)',
      't_embedder.mlp.0.weight: 1 NaN and 0 Inf value(s) of 16384',
      'final_layer.adaLN_modulation.1.bias: dtype int32, expected a floating-point tensor'):
    assert fragment in message, message


def test_position_embedding_must_be_the_fixed_one(source):
  _, sd, _ = source
  np.testing.assert_allclose(sd['pos_embed'][0], dit.position_embedding(4, WIDTH), atol=1e-6)
  bad = dict(sd, pos_embed=sd['pos_embed'] * 1.01)
  with pytest.raises(convert.ConversionError,
                     match='pos_embed: differs from the fixed 2-D sin-cos'):
    dit_original.original_to_params(bad, _arch(2))
  missing = {k: v for k, v in sd.items() if k != 'pos_embed'}
  with pytest.raises(convert.ConversionError, match='pass input_size'):
    dit_original.original_to_params(missing, _arch(2))
  with pytest.raises(convert.ConversionError, match=r'missing tensor\(s\):\n    pos_embed \(shape '
                                                    r'\(1, 16, 64\)'):
    dit_original.original_to_params(missing, _arch(2), input_size=8)


def test_arch_and_input_size_that_contradict_the_file(source):
  _, sd, _ = source
  with pytest.raises(convert.ConversionError) as e:
    dit_original.original_to_params(sd, f'DiT-S/2,hidden_size={WIDTH},depth=4,num_heads={HEADS}')
  assert ('the file has width 64, depth 3, patch 2, mlp hidden 256: no paper size, not '
          'DiT-S/2,hidden_size=64,depth=4,num_heads=4 (which has depth 4)') in str(e.value)
  with pytest.raises(convert.ConversionError, match='256: no paper size, not DiT-S/4'):
    dit_original.original_to_params(sd, _arch(4))
  with pytest.raises(convert.ConversionError, match='input_size=16 given, but pos_embed has 16 '
                                                    'tokens = 4 x 4 patches of 2: input_size 8'):
    dit_original.original_to_params(sd, _arch(2), input_size=16)
  with pytest.raises(convert.ConversionError, match='no null-class row'):
    dit_original.original_to_params(sd, _arch(2), num_classes=CLASSES + 1)


def test_source_and_flag_refusals(source, tmp_path):
  _, _, path = source
  missing = str(tmp_path / 'DiT-XL-2-256x256.pt')
  with pytest.raises(convert.SourceUnavailableError,
                     match='https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt'):
    convert.convert(missing, str(tmp_path / 'a'), arch='DiT-XL/2')
  with pytest.raises(convert.ConversionError, match='pass --arch'):
    convert.convert(path, str(tmp_path / 'b'))
  with pytest.raises(convert.ConversionError, match='--arch and --input_size are for an original'):
    convert.convert(str(tmp_path), str(tmp_path / 'c'), arch='DiT-XL/2')
  assert not any((tmp_path / n).exists() for n in 'abc')


# ---------------------------------------------------------------------------------------------
# (d) The command line, and the saved backbone.
# ---------------------------------------------------------------------------------------------

def test_cli_end_to_end_and_load_backbone(source, tmp_path, capsys):
  ref, sd, path = source
  out = str(tmp_path / 'dit-tiny')
  assert convert.main([f'--source={path}', f'--arch={_arch(2)}', f'--out={out}']) == 0
  printed = capsys.readouterr().out
  assert 'wrote' in printed and "variance_type='learned_range'" in printed
  meta = checkpoints.read_backbone_meta(out)
  assert meta['source_weights'] == 'state_dict' and meta['model_output'] == 'eps_variance'
  assert meta['source_dtypes'] == {'float32': len(sd)} and len(meta['weights_sha256']) == 64
  assert meta['diffusion'] == convert.diffusion_config_from_scheduler(None).to_dict()
  assert meta['num_params'] == sum(v.size for k, v in sd.items() if k != 'pos_embed')
  model, params = lees_jax.load_backbone(out)
  model_config, in_memory = dit_original.original_to_params(sd, _arch(2))
  assert model.spec == models.spec_from_config(model_config)
  x, t, y = _inputs(model, seed=1)
  got = np.asarray(model.apply({'params': params}, x, t, y))
  np.testing.assert_array_equal(got, np.asarray(model.apply({'params': in_memory}, x, t, y)))
  assert float(np.abs(got - _torch_out(ref, x, t, y)).max()) <= ATOL
  # A failing conversion prints the error and writes nothing.
  assert convert.main([f'--source={path}', '--arch=DiT-XL/2', f'--out={out}-x']) == 1
  assert 'the file has width 64' in capsys.readouterr().err
