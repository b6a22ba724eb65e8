"""Skipping DiT blocks: latency of the three hard-skipping paths, as ratios in one run.

A DiT (random weights; DiT-S/2's width, depth and heads by default) on latents, class labels
drawn by the program, DDIM; for the full model and for ASE-style schedules executing about 80,
60 and 40 % of the blocks, times the whole sampler along

* 'segments' -- one static-mask loop per segment (compiled per policy);
* 'cond'     -- every block behind lax.cond (one program for every mask);
* 'stacked'  -- the blocks' parameters stacked, a loop over only the kept blocks of each step
  (one program for every mask; its params stacked once beforehand by `prepare_params`, whose
  time is reported apart, as evaluation makes that layout once for all its batches),

and reports skip_efficiency = latency / (flop_fraction * full latency) (1.0 = time saved
exactly in proportion to the FLOPs skipped) and each program's compile time. The 'cond' and
'stacked' programs are compiled once (on the full policy's masks) and run every policy by
their mask operand -- what they are for -- so their compile time is one number per path;
'segments' is compiled per policy. The programs are timed in turn (A B C ... A B C ...: load
drifts hit all alike), median of --repeats runs after a warm-up.

  python benchmarks/dit_paths.py --out=benchmarks/results/dit_paths.json

Schedules: ASE's rule (drop from the last block backwards; `lees_jax.ase.schedule_matrix`)
with drop fractions rising linearly over the 10 intervals of t, d_i = min(1, s (i + 1/2) / 10),
the slope s bisected until the executed-block ratio hits the target (up to 10 segments).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from lees_jax import ase, diffusion, models, policies, samplers  # noqa: E402

PATHS = ('segments', 'cond', 'stacked')


def schedule_for_ratio(num_units: int, timesteps, num_timesteps: int,
                       target: float) -> policies.SchedulePolicy:
  """An ASE-style schedule (linear drop ramp over t) whose executed-block ratio is close to
  ``target``."""
  centres = (np.arange(ase.NUM_INTERVALS) + 0.5) / ase.NUM_INTERVALS

  def make(slope):
    matrix = ase.schedule_matrix(np.minimum(1.0, slope * centres), num_units, 1.0)
    return policies.SchedulePolicy(matrix, name=f'blocks{target:.0%}')

  lo, hi = 0.0, 20.0
  for _ in range(40):  # the ratio falls as the slope grows
    mid = 0.5 * (lo + hi)
    ratio = make(mid).step_masks(timesteps, num_timesteps, num_units).mean()
    lo, hi = (mid, hi) if ratio > target else (lo, mid)
  return make(0.5 * (lo + hi))


def prepare(prog, params, repeats: int = 3):
  """(the program's params, median ms of `prepare_params`: the stacked layout's one-time copy
  of every block, made once per evaluation; 0 for the other paths)."""
  prepared = jax.block_until_ready(prog.prepare_params(params))  # compiles the stacking
  times = []
  for _ in range(repeats if prog.prepare is not None else 0):
    t0 = time.perf_counter()
    jax.block_until_ready(prog.prepare_params(params))
    times.append(time.perf_counter() - t0)
  return prepared, statistics.median(times) * 1e3 if times else 0.0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--size', default='S/2', help='DiT size, e.g. S/2 (width, depth, heads, patch)')
  ap.add_argument('--depth', type=int, default=0, help='override the size\'s depth (0: keep)')
  ap.add_argument('--input', type=int, default=16, help='latent side (channels: 4)')
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--ratios', default='0.8,0.6,0.4', help='target executed-block ratios')
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)

  overrides = dict(input_size=args.input, num_classes=1000, learn_sigma=True)
  if args.depth:
    overrides['depth'] = args.depth
  spec = models.dit_size(args.size, **overrides)
  model = models.DiT(spec, dtype=models.compute_dtype(args.dtype))
  params = jax.jit(lambda: models.init_params(model, jax.random.PRNGKey(0)))()
  solver = samplers.make_solver(diffusion.make_schedule(1000), 'ddim', args.steps)
  k, rng = model.num_units, jax.random.PRNGKey(0)
  meta = {'model': f'DiT-{args.size}', 'depth': spec.depth, 'hidden_size': spec.hidden_size,
          'num_heads': spec.num_heads, 'patch_size': spec.patch_size,
          'latents': [spec.input_size, spec.input_size, spec.in_channels],
          'params': models.count_params(params), 'batch': args.batch, 'steps': args.steps,
          'sampler': 'ddim', 'dtype': args.dtype, 'device': str(jax.devices()[0].device_kind),
          'platform': jax.default_backend(), 'num_devices': jax.device_count(),
          'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}

  full = policies.FullPolicy()
  targets = [float(r) for r in args.ratios.split(',')]
  plan = [('full', 1.0, full)] + [
      (None, t, schedule_for_ratio(k, solver.timesteps, solver.num_original_timesteps, t))
      for t in targets]
  compiled, info, runs = {}, {}, {}
  for path in PATHS:  # cond and stacked: one program, compiled on the full policy's masks
    if path != 'segments':
      prog = samplers.compile_sampler(model, solver, full, args.batch, path=path)
      prepared, prepare_ms = prepare(prog, params)
      compiled[path] = timing.compile_program(prog, prepared, rng) + (prepared, prepare_ms)
  for name, target, policy in plan:
    name = name or policy.name
    for path in PATHS:
      prog = samplers.compile_sampler(model, solver, policy, args.batch, path=path)
      if path == 'segments':
        fn, compile_s, run_params, prepare_ms = timing.compile_program(prog, params, rng) + (params, 0.0)
      else:
        fn, compile_s, run_params, prepare_ms = compiled[path]
      runs[name, path] = (lambda fn=fn, p=run_params, operand=prog.operand:
                          fn(p, rng, operand).block_until_ready())
      info[name, path] = dict(policy=name, policy_path=path, target_ratio=target,
                              block_ratio=prog.block_ratio, flop_fraction=prog.flop_fraction,
                              segments=len(prog.segments), compile_s=compile_s,
                              compiled_per_policy=path == 'segments', prepare_ms=prepare_ms)
      print(f'compiled {name} {path}: {compile_s:.1f} s', flush=True)
  latency = timing.interleaved_medians(runs, args.repeats)
  full_ms = latency['full', 'segments'] * 1e3
  records = []
  for key, rec in info.items():
    ms = latency[key] * 1e3
    records.append(dict(meta, **rec, latency_ms=ms,
                        skip_efficiency=ms / (rec['flop_fraction'] * full_ms)))

  print(f'\nDiT-{args.size} depth {spec.depth} on {spec.input_size}x{spec.input_size}x4, '
        f'ddim-{args.steps}, batch {args.batch}, {args.dtype}, {meta["device"]} ({meta["platform"]})')
  timing.print_table(records, [
      ('policy', 'policy', '<10'), ('path', 'policy_path', '<9'),
      ('blocks', 'block_ratio', '>6.1%'), ('flops', 'flop_fraction', '>6.1%'),
      ('segs', 'segments', '>4'), ('ms/run', 'latency_ms', '>9.1f'),
      ('skip_eff', 'skip_efficiency', '>8.3f'), ('compile_s', 'compile_s', '>9.1f'),
      ('prepare_ms', 'prepare_ms', '>10.1f')])
  timing.write_records(args.out, records)


if __name__ == '__main__':
  main()
