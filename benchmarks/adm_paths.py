"""Skipping ADM units: latency of the 'segments' and 'cond' paths, and diffusers on the same work.

A small ADM with the layout of guided-diffusion's 64x64 model (channel_mult 1,2,3,4, attention
at 32, 16 and 8, heads of --head_channels, scale-shift norm, resampling ResBlocks, new attention
order, learned variance; --channels wide, --res_blocks per level; random weights), unconditional,
sampled by a respaced DDPM with the learned-range variance on the cosine schedule. For the full
model and for ASE-style schedules executing about 80, 60 and 40 % of the FLOPs, in fp32 and
bf16, times the whole sampler along

* 'segments' -- one static-mask loop per segment (compiled per policy);
* 'cond'     -- every unit behind lax.cond (compiled once, on the full policy's masks, and run
  for every policy by its mask operand);

and diffusers' ``UNet2DModel`` with the same configuration (torch, CPU; ``--steps`` forward
passes on the same batch, each step's output fed back as x - 0.1 * eps so the calls form a chain;
the scheduler's elementwise arithmetic is left out). When lees_jax's diffusers importer can be
loaded, both networks run the same weights (diffusers' random init imported), and the record
carries max |ours - diffusers| of one fp32 forward pass: the proof that the configuration is
the same. Otherwise the parameter counts are compared.

Reported per dtype: skip_efficiency = latency / (flop_fraction * full 'segments' latency) (1.0 =
time saved exactly in proportion to the FLOPs skipped) and vs_diffusers = latency / diffusers'
latency for the same (full) work. The programs are timed in turn (A B C ... A B C ...: load drifts
hit all alike), median of --repeats runs after a warm-up.

  python benchmarks/adm_paths.py --out=benchmarks/results/adm_paths.json

Schedules: ASE's rule on ADM (`lees_jax.ase.schedule_matrix`: units dropped from the last one
backwards, at most the ASE-droppable ones -- the decoder units and mid_res_1), with drop
fractions rising linearly over the 10 intervals of t, d_i = min(1, s (i + 1/2) / 10), the slope s
bisected until the FLOP fraction hits the target. Imports neither tensorflow, clu nor
ml_collections (the diffusers importer, which needs ml_collections, is optional), so it runs on
accelerator images without them; torch and diffusers are optional too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from lees_jax import ase, cost, diffusion, models, policies, samplers  # noqa: E402
from lees_jax.models import adm  # noqa: E402

PATHS = ('segments', 'cond')


def schedule_for_flops(model, timesteps, num_timesteps: int,
                       target: float) -> policies.SchedulePolicy:
  """An ASE-style schedule (linear drop ramp over t, ASE's cap on droppable units) whose FLOP
  fraction is close to ``target`` (the closest reachable one if the cap does not allow it)."""
  units, k = model.units, model.num_units
  model_cost, cap = cost.model_cost(model), ase.max_drop_fraction_for(units)
  centres = (np.arange(ase.NUM_INTERVALS) + 0.5) / ase.NUM_INTERVALS

  def make(slope):
    matrix = ase.schedule_matrix(np.minimum(1.0, slope * centres), k, cap)
    return policies.SchedulePolicy(matrix, name=f'flops{target:.0%}')

  def fraction(policy):
    return model_cost.flop_fraction(policy.step_masks(timesteps, num_timesteps, k))

  lo, hi = 0.0, 20.0
  for _ in range(40):  # the fraction falls as the slope grows
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if fraction(make(mid)) > target else (lo, mid)
  return make(0.5 * (lo + hi))


def diffusers_config(spec: adm.ADMSpec) -> dict:
  """The ADM-style ``UNet2DModel`` arguments of ``spec`` (the inverse of
  `lees_jax.convert.diffusers_adm.model_config_from_diffusers`; scale-shift, resampling
  ResBlocks and head channels, the layout diffusers' consistency-model conversions use)."""
  if not (spec.resblock_updown and spec.use_scale_shift_norm and spec.num_head_channels > 0
          and spec.use_new_attention_order and spec.num_classes == 0):
    raise ValueError('diffusers_config covers the unconditional ADM with resampling ResBlocks, '
                     'scale-shift norm, new attention order and num_head_channels')
  attn = [2 ** i in spec.attention_resolutions for i in range(len(spec.channel_mult))]
  return dict(
      sample_size=spec.image_size, in_channels=spec.in_channels, out_channels=spec.out_channels,
      layers_per_block=spec.num_res_blocks,
      block_out_channels=[int(m * spec.model_channels) for m in spec.channel_mult],
      attention_head_dim=spec.num_head_channels, norm_num_groups=spec.num_groups,
      attn_norm_num_groups=spec.num_groups, norm_eps=spec.norm_eps,
      down_block_types=['AttnDownBlock2D' if a else 'ResnetDownsampleBlock2D' for a in attn],
      up_block_types=['AttnUpBlock2D' if a else 'ResnetUpsampleBlock2D' for a in attn[::-1]],
      resnet_time_scale_shift='scale_shift', downsample_type='resnet', upsample_type='resnet')


def diffusers_run(spec, args):
  """(reference network, {dtype: run}, our params from its weights or None, info), or None when
  torch / diffusers are not installed."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  config = diffusers_config(spec)
  reference = diffusers.UNet2DModel(**config).eval()
  threads = torch.get_num_threads()
  info = {'torch': torch.__version__, 'diffusers': diffusers.__version__,
          'torch_threads': threads,
          'diffusers_params': sum(p.numel() for p in reference.parameters())}
  params = None
  try:
    from lees_jax.convert import diffusers_adm  # pylint: disable=g-import-not-at-top
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    full_config = {k: v for k, v in reference.config.items() if not k.startswith('_')}
    model_config, params = diffusers_adm.diffusers_to_params(
        state, {'_class_name': 'UNet2DModel', **full_config})
    assert models.spec_from_config(model_config) == spec, 'diffusers_config is not the spec'
  except ImportError:  # no ml_collections: other weights, same shapes
    pass

  runs = {}
  for dtype in args.dtypes:
    net = reference if dtype == 'float32' else diffusers.UNet2DModel(**config).eval().to(
        getattr(torch, dtype))
    if net is not reference:
      net.load_state_dict(reference.state_dict())
    x0 = torch.randn(args.batch, spec.in_channels, spec.image_size, spec.image_size,
                     generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
    steps = torch.linspace(999, 0, args.steps).round().long()

    def run(net=net, x0=x0):
      with torch.inference_mode():
        x = x0
        for t in steps:
          x = x - 0.1 * net(x, t.expand(args.batch)).sample[:, :spec.in_channels]
      return x
    runs[dtype] = run
  return reference, runs, params, info


def forward_difference(model, params, reference, spec) -> float:
  """max |ours - diffusers| of one fp32 forward pass on the same weights."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, spec.image_size, spec.image_size, spec.in_channels), np.float32)
  t = np.array([10, 700])
  ours = np.asarray(model.apply({'params': params}, x, t))
  with torch.inference_mode():
    theirs = reference(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t)).sample
  return float(np.abs(ours - theirs.numpy().transpose(0, 2, 3, 1)).max())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--channels', type=int, default=32, help='model_channels')
  ap.add_argument('--res_blocks', type=int, default=1, help='num_res_blocks')
  ap.add_argument('--head_channels', type=int, default=32, help='num_head_channels')
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--ratios', default='0.8,0.6,0.4', help='target FLOP fractions')
  ap.add_argument('--dtypes', default='float32,bfloat16')
  ap.add_argument('--no_diffusers', action='store_true')
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)
  args.dtypes = args.dtypes.split(',')

  size = args.image_size
  spec = adm.ADMSpec(
      image_size=size, model_channels=args.channels, num_res_blocks=args.res_blocks,
      channel_mult=(1, 2, 3, 4), attention_resolutions=(size // 32, size // 16, size // 8),
      num_head_channels=args.head_channels, use_scale_shift_norm=True, resblock_updown=True,
      use_new_attention_order=True, learn_sigma=True)
  solver = samplers.make_solver(diffusion.make_schedule(1000, 'cosine'), 'ddpm', args.steps,
                                variance='learned_range')
  rng = jax.random.PRNGKey(0)
  reference = None if args.no_diffusers else diffusers_run(spec, args)
  model_fp32 = adm.ADM(spec)
  params = (reference[2] if reference is not None and reference[2] is not None else
            jax.jit(lambda: models.init_params(model_fp32, jax.random.PRNGKey(0)))())
  meta = {'model': 'ADM', 'image_size': size, 'model_channels': spec.model_channels,
          'channel_mult': list(spec.channel_mult), 'num_res_blocks': spec.num_res_blocks,
          'attention_resolutions': [size // r for r in spec.attention_resolutions],
          'num_head_channels': spec.num_head_channels, 'num_units': model_fp32.num_units,
          'params': models.count_params(params),
          'gflops_per_image': cost.model_cost(model_fp32).total_flops / 1e9,
          'batch': args.batch, 'steps': args.steps, 'sampler': 'ddpm learned_range, cosine',
          'device': str(jax.devices()[0].device_kind), 'platform': jax.default_backend(),
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  if reference is not None:
    meta.update(reference[3])
    meta['weights'] = 'diffusers init, imported' if reference[2] is not None else 'each its own'
    if reference[2] is not None:
      meta['max_abs_diff_vs_diffusers_fp32'] = forward_difference(model_fp32, params,
                                                                  reference[0], spec)
    assert meta['diffusers_params'] == meta['params'], 'not the same network'

  full = policies.FullPolicy()
  plan = [('full', 1.0, full)] + [
      (None, t, schedule_for_flops(model_fp32, solver.timesteps,
                                   solver.num_original_timesteps, t))
      for t in (float(r) for r in args.ratios.split(','))]
  info, runs = {}, {}
  for dtype in args.dtypes:
    model = adm.ADM(spec, dtype=models.compute_dtype(dtype))
    cond = samplers.compile_sampler(model, solver, full, args.batch, path='cond')
    cond_fn, cond_compile_s = timing.compile_program(cond, params, rng)
    for name, target, policy in plan:
      name = name or policy.name
      for path in PATHS:
        prog = samplers.compile_sampler(model, solver, policy, args.batch, path=path)
        fn, compile_s = (timing.compile_program(prog, params, rng) if path == 'segments'
                         else (cond_fn, cond_compile_s))
        runs[dtype, name, path] = (lambda fn=fn, operand=prog.operand:
                                   fn(params, rng, operand).block_until_ready())
        info[dtype, name, path] = dict(
            dtype=dtype, policy=name, policy_path=path, target_flop_fraction=target,
            block_ratio=prog.block_ratio, flop_fraction=prog.flop_fraction,
            segments=len(prog.segments), compile_s=compile_s,
            compiled_per_policy=path == 'segments')
        print(f'compiled {dtype} {name} {path}: {compile_s:.1f} s', flush=True)
    if reference is not None:
      runs[dtype, 'full', 'diffusers'] = reference[1][dtype]
      info[dtype, 'full', 'diffusers'] = dict(
          dtype=dtype, policy='full', policy_path='diffusers', target_flop_fraction=1.0,
          block_ratio=1.0, flop_fraction=1.0, segments=1, compile_s=0.0,
          compiled_per_policy=False)
  latency = timing.interleaved_medians(runs, args.repeats)
  records = []
  for key, rec in info.items():
    dtype = key[0]
    ms, full_ms = latency[key] * 1e3, latency[dtype, 'full', 'segments'] * 1e3
    rec = dict(meta, **rec, latency_ms=ms, skip_efficiency=ms / (rec['flop_fraction'] * full_ms))
    if (dtype, 'full', 'diffusers') in latency:
      rec['vs_diffusers'] = ms / (latency[dtype, 'full', 'diffusers'] * 1e3)
    records.append(rec)

  print(f'\nADM {size}x{size}, {spec.model_channels} channels x (1,2,3,4), {spec.num_res_blocks} '
        f'ResBlock(s) per level, {meta["num_units"]} units, {meta["params"]:,} parameters, '
        f'{meta["gflops_per_image"]:.2f} GFLOPs/image; ddpm-{args.steps}, batch {args.batch}, '
        f'{meta["device"]} ({meta["platform"]})'
        + (f'; max |ours - diffusers| fp32 {meta["max_abs_diff_vs_diffusers_fp32"]:.2e}'
           if 'max_abs_diff_vs_diffusers_fp32' in meta else ''))
  timing.print_table(records, [
      ('dtype', 'dtype', '<9'), ('policy', 'policy', '<9'), ('path', 'policy_path', '<10'),
      ('blocks', 'block_ratio', '>6.1%'), ('flops', 'flop_fraction', '>6.1%'),
      ('segs', 'segments', '>4'), ('ms/run', 'latency_ms', '>9.1f'),
      ('skip_eff', 'skip_efficiency', '>8.3f'),
      ('vs_diff', lambda r: r.get('vs_diffusers', float('nan')), '>7.3f'),
      ('compile_s', 'compile_s', '>9.1f')])
  timing.write_records(args.out, records)


if __name__ == '__main__':
  main()
