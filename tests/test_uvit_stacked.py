"""U-ViT on the 'stacked' sampling path: two stacks of identical blocks linked by the long skips.

The in-blocks with the mid-block are one stack (their outputs, a skipped block's input, are the
long skips), the out-blocks another (each applies its skip linear whether kept or not, ASE's
rule, and its attention and MLP only when kept). Oracles: the plain forward pass with the same
`gates.StaticMask` (itself checked against a float64 numpy U-ViT in test_uvit.py), that float64
reference directly, and the 'segments' sampler with the same key; plus counts at run time that
a step runs exactly its kept blocks' bodies and every out-block's skip linear.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lees_jax import ase, gates, models, policies, samplers, sde
from lees_jax.models import backbone, uvit

# depth 6: 3 in-blocks + mid + 3 out-blocks; unconditional with the final conv (as CelebA's).
SPEC = uvit.UViTSpec(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=6, num_heads=4,
                     mlp_ratio=2, conv=True)
# Conditional with a null class (guidance), the time MLP and qkv biases; odd depth 7 = 3 + 1 + 3.
COND_SPEC = uvit.UViTSpec(img_size=8, patch_size=4, in_chans=3, embed_dim=32, depth=7,
                          num_heads=2, mlp_ratio=2, qkv_bias=True, mlp_time_embed=True,
                          num_classes=6, null_label=True, conv=False)
B = 2
# One forward pass, fp32, outputs ~1: stacked against the plain forward with the same mask;
# measured <= 7.2e-7 (the same ops in another loop structure; jax 0.10.2, CPU).
ATOL = 1e-5
# Whole trajectories (EM-8 and DPM-Solver-9 of this random network, |x| up to ~660 at the end):
# max |stacked - segments| <= RTOL max |x|; measured <= 1.3e-7 relative (7.6e-5 absolute).
RTOL = 1e-5


def _random_params(model, seed=1):
  """Random weights, kernels ~1 / sqrt(fan-in), LayerNorm scales ~1: every block changes the
  output (U-ViT's own init is small enough that skipping would barely show)."""
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    z = rng.standard_normal(a.shape)
    if a.ndim >= 2:
      return jnp.asarray(z / np.sqrt(np.prod(a.shape[:-1])), jnp.float32)
    is_scale = getattr(path[-1], 'key', '') == 'scale'
    return jnp.asarray(1.0 + 0.1 * z if is_scale else 0.2 * z, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def net():
  model = models.UViT(SPEC)
  return model, _random_params(model)


def _named_masks(model):
  """Masks over units (in 0..n-1, mid n, out n+1..2n) incl. dropped out-blocks (skip linear
  kept), dropped in- and mid-blocks, all on and all off, and random ones."""
  k, n = model.num_units, model.spec.num_side
  out = {'all_on': np.ones(k, bool), 'all_off': np.zeros(k, bool)}
  out['last_two_out_blocks_off'] = np.arange(k) < k - 2          # ASE's kind of drop
  out['first_out_block_off'] = np.arange(k) != n + 1
  out['in_block_1_and_mid_off'] = ~np.isin(np.arange(k), [1, n])
  out['in_blocks_off_out_blocks_on'] = np.arange(k) >= n
  rng = np.random.default_rng(0)
  for i in range(3):
    out[f'random_{i}'] = rng.random(k) < 0.5
  return out


def _inputs(model, seed=2):
  s = model.spec
  x = jax.random.normal(jax.random.PRNGKey(seed), (3, s.img_size, s.img_size, s.in_chans))
  t = jnp.array([0.5, 499.5, 999.0])  # network times 999 t
  y = jnp.array([0, 5, 3]) if s.conditional else None  # 5: the null class
  return x, t, y


@pytest.mark.parametrize('spec', [SPEC, COND_SPEC], ids=['uncond_depth6', 'cond_depth7'])
def test_stacked_forward_equals_the_plain_forward(spec):
  model = models.UViT(spec)
  params = _random_params(model)
  x, t, y = _inputs(model)
  stack = model.stack
  n = spec.num_side
  assert stack.names == spec.block_names() and stack.depth == model.num_units
  assert [s.depth for s in stack.stacks] == [n + 1, n]
  fwd = jax.jit(lambda p, keep: backbone.predict_eps(
      model, p, x, t, y, gates=backbone.StackMask(stack.stacked_params(p), keep))[0])
  plain = jax.jit(lambda p, keep: backbone.predict_eps(model, p, x, t, y,
                                                       gates=gates.StaticMask(keep))[0],
                  static_argnums=1)
  full = np.asarray(plain(params, (True,) * model.num_units))
  for name, keep in _named_masks(model).items():
    want = np.asarray(plain(params, tuple(keep)))
    got = np.asarray(fwd(params, jnp.asarray(keep)))
    if not keep.all():
      assert np.abs(want - full).max() > 1e-2, name  # the mask matters
    print(f'{name}: max |stacked - plain| {np.abs(got - want).max():.2e}')
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=name)
  assert fwd._cache_size() == 1  # one compilation for every mask
  with pytest.raises(ValueError, match='keep vector'):
    stack.kept_indices(jnp.ones((model.num_units + 1,), bool))


def test_stacked_forward_equals_the_float64_reference():
  """Against test_uvit.py's numpy float64 U-ViT (written from the original code, no shared
  code with ours), on a state dict in the original layout converted in-process."""
  test_uvit = pytest.importorskip('test_uvit')  # skips with it where torch is absent
  from lees_jax.convert import uvit_original
  c = dict(test_uvit.ODD, depth=6)
  sd = test_uvit.random_state_dict(c, seed=3)
  config, params = uvit_original.original_to_params(sd, c)
  model = models.build_model(config)
  stack = model.stack
  x, t, _ = test_uvit._inputs(c, seed=1)
  fwd = jax.jit(lambda keep: backbone.predict_eps(
      model, params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t),
      gates=backbone.StackMask(stack.stacked_params(params), keep))[0])
  k = model.num_units
  for skipped in [(), (k - 1, k - 2), (0, 3), (3,), (1, 4), tuple(range(k))]:
    want = test_uvit.reference(sd, c, x, t, skipped=skipped)
    got = np.asarray(fwd(jnp.asarray([j not in skipped for j in range(k)]))).transpose(0, 3, 1, 2)
    print(f'skipped {skipped}: max |stacked - float64 reference| {np.abs(got - want).max():.2e}')
    assert np.abs(got - want).max() <= test_uvit.ATOL, skipped


def _policies(model):
  units, k = model.units, model.num_units
  d1 = ase.named_schedule('D1-U-ViT', units)
  with_in_and_mid = d1.matrix.copy()
  with_in_and_mid[[0, model.spec.num_side], 6:] = False  # an in-block and the mid near the noise
  return {
      'full': policies.FullPolicy(),
      'D1-U-ViT': d1,
      'D6-U-ViT': ase.named_schedule('D6-U-ViT', units),
      'D1_with_in_and_mid_off': policies.SchedulePolicy(with_in_and_mid, name='in_mid'),
      'random': policies.SchedulePolicy(np.random.default_rng(4).random((k, 10)) < 0.5,
                                        name='random'),
  }


def _close(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  print(f'max |stacked - segments| {err:.2e} (|x| up to {np.abs(want).max():.2f})')
  assert err <= RTOL * max(1.0, np.abs(want).max()), err


@pytest.mark.parametrize('solver_name,steps,names', [
    ('euler_maruyama', 8, None),  # every policy of `_policies`
    ('dpm_solver', 9, ('full', 'D1_with_in_and_mid_off', 'random'))])
def test_stacked_sampler_equals_segments(net, solver_name, steps, names):
  """One stacked program (compiled once) runs every policy by its mask operand and gives the
  'segments' samples of each with the same key; prepared params (the stacked layout) too."""
  model, params = net
  solver = sde.make_solver(solver_name, steps)
  k = model.num_units
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, path='stacked')
  rng = jax.random.PRNGKey(3)
  prepared = prog.prepare_params(params)
  n = SPEC.num_side
  assert not any(name in prepared for name in SPEC.block_names())
  assert prepared['stacked_in_and_mid_blocks']['fc1']['kernel'].shape == (n + 1, 32, 64)
  assert prepared['stacked_out_blocks']['skip_linear']['kernel'].shape == (n, 64, 32)
  outs = {}
  for name, policy in _policies(model).items():
    if names is not None and name not in names:
      continue
    masks = policy.step_masks(solver.timesteps, solver.num_original_timesteps, k)
    seg = samplers.compile_sampler(model, solver, policy, B, path='segments')
    want = np.asarray(seg(params, rng))
    got = np.asarray(prog.jitted(prepared, rng, jnp.asarray(masks)))
    _close(got, want)
    outs[name] = got
    if name != 'full':
      assert masks.mean() < 1, name
    if name != 'D6-U-ViT':  # D6 on 3 out-blocks keeps one in every interval: one segment
      assert (len(seg.segments) > 1) == (name != 'full'), name  # the mask varies over steps
  _close(prog.jitted(params, rng, jnp.asarray(prog.masks)), outs['full'])  # ordinary layout
  assert prog.jitted._cache_size() == 2  # one program per params layout, any mask
  assert np.abs(outs['full'] - outs['random']).max() > 1e-2


def test_guided_partial_stacked_equals_segments():
  """A conditional U-ViT with a null class: classifier-free guidance (both halves through one
  loop over the kept blocks) and a partial program from a DPM-Solver step start."""
  model = models.UViT(COND_SPEC)
  params = _random_params(model, seed=5)
  solver = sde.make_solver('dpm_solver', 9)
  policy = _policies(model)['D1_with_in_and_mid_off']
  rng, labels = jax.random.PRNGKey(6), np.array([2, 5])
  x_init = np.random.default_rng(1).standard_normal((B, 8, 8, 3)).astype(np.float32)
  progs = {path: samplers.compile_sampler(model, solver, policy, B, path=path, start_step=3,
                                          guidance_scale=2.0)
           for path in ('stacked', 'segments')}
  assert len(progs['segments'].segments) > 1
  _close(progs['stacked'](params, rng, x_init, labels),
         progs['segments'](params, rng, x_init, labels))


class _CountingUViT(models.UViT):
  """U-ViT whose stacked blocks report each run of a body or a skip linear to ``RUNS``."""

  @property
  def stack(self):
    stack = super().stack
    in_and_mid, out_blocks = stack.stacks

    def counted(kind, fn):
      def run(*args):
        jax.debug.callback(lambda: RUNS.append(kind))
        return fn(*args)
      return run

    return dataclasses.replace(stack, stacks=(
        dataclasses.replace(in_and_mid, block=counted('in', in_and_mid.block)),
        dataclasses.replace(out_blocks, block=counted('out', out_blocks.block),
                            mix=counted('skip_linear', out_blocks.mix))))


RUNS = []


def test_only_the_kept_blocks_run_and_every_skip_linear(net):
  """Counted at run time, per sampler step: the kept in/mid bodies, the kept out-block bodies,
  and n skip linears whatever the mask (all off included)."""
  _, params = net
  model = _CountingUViT(SPEC)
  solver = sde.make_solver('euler_maruyama', 8)
  prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), B, path='stacked')
  k, n = model.num_units, SPEC.num_side
  rng = jax.random.PRNGKey(0)
  all_off = policies.SchedulePolicy(np.zeros((k, 1), bool), name='off')
  for name, policy in dict(_policies(model), all_off=all_off).items():
    masks = policy.step_masks(solver.timesteps, solver.num_original_timesteps, k)
    RUNS.clear()
    jax.block_until_ready(prog.jitted(params, rng, jnp.asarray(masks)))
    jax.effects_barrier()
    assert RUNS.count('in') == masks[:, :n + 1].sum(), name
    assert RUNS.count('out') == masks[:, n + 1:].sum(), name
    assert RUNS.count('skip_linear') == n * solver.num_steps, name
  assert prog.jitted._cache_size() == 1


def test_program_size_does_not_grow_with_depth_and_has_no_conditional():
  """One block body per stack: the stacked program of a depth-10 U-ViT holds as many matrix
  products as that of a depth-6 one (the unrolled 'segments' program grows), and no
  conditional."""
  def dots(spec, path):
    model = models.UViT(spec)
    params = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
    prog = samplers.compile_sampler(model, sde.make_solver('euler_maruyama', 4),
                                    policies.FullPolicy(), B, path=path)
    text = prog.lower(params, jax.random.PRNGKey(0)).as_text()
    assert 'stablehlo.case' not in text and 'stablehlo.if' not in text
    return text.count('stablehlo.dot_general')

  deeper = dataclasses.replace(SPEC, depth=10)
  assert dots(SPEC, 'stacked') == dots(deeper, 'stacked')
  assert dots(deeper, 'segments') > dots(SPEC, 'segments') > dots(SPEC, 'stacked')


def test_benchmark_runs_without_tensorflow_tfds_clu_or_ml_collections(tmp_path):
  """benchmarks/uvit_paths.py on a tiny U-ViT with those packages made unimportable (as on a
  bare accelerator machine): its records cover every policy and path, with the accounting of
  the policies it names."""
  import json
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = tmp_path / 'uvit_paths.json'
  blocked = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')
  script = (f'import sys; sys.modules.update({{m: None for m in {blocked!r}}}); '
            'sys.argv = sys.argv[1:]; import runpy; runpy.run_path(sys.argv[0], run_name="__main__")')
  args = [os.path.join(root, 'benchmarks', 'uvit_paths.py'), '--embed_dim=16', '--depth=4',
          '--num_heads=2', '--batch=1', '--solvers=euler_maruyama:3', '--dtypes=float32',
          '--repeats=1', f'--out={out}']
  done = subprocess.run([sys.executable, '-c', script, *args], cwd=tmp_path, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  records = json.loads(out.read_text())
  assert {(r['policy'], r['policy_path']) for r in records} == {
      (p, path) for p in ('full',) + tuple(ase.UVIT_KEPT) for path in ('segments', 'cond',
                                                                        'stacked')}
  model = models.UViT(uvit.UViTSpec(embed_dim=16, depth=4, num_heads=2))
  solver = sde.make_solver('euler_maruyama', 3)
  for r in records:
    policy = (policies.FullPolicy() if r['policy'] == 'full'
              else ase.named_schedule(r['policy'], model.units))
    masks = policy.step_masks(solver.timesteps, solver.num_original_timesteps, model.num_units)
    assert r['block_ratio'] == pytest.approx(masks.mean())
    assert r['jax'] == jax.__version__ and r['device'] and r['date']
