"""Does skipping really save time? Latency of the sampler per policy path, as ratios in one run.

For the full model and for policies executing about 80, 60 and 40 % of the FLOPs, times
the whole multi-step sampler (warm-up, block_until_ready, median of --repeats runs) along
the 'segments' path (one static-mask loop per segment) and the 'cond' path (lax.cond per
unit), and reports

  skip_efficiency = latency / (flop_fraction * full-model latency)

(1.0 = time saved exactly in proportion to FLOPs skipped) and each program's compile time.

  python benchmarks/sampling.py --config=configs/cifar10.py --batch=4 --steps=10 --out=results.json
  python benchmarks/sampling.py --config=configs/cifar10.py:tiny --batch=100 --steps=50 --out=tiny.json

Policies: unit k runs for normalised t <= tau_k (near the data), with flip points tau_k
spread over (0, 1] and shifted until the FLOP fraction hits the target -- the shape of a
learned LEES schedule, with up to K+1 segments.
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
from lees_jax import cost, diffusion, models, policies, samplers  # noqa: E402
from train_step import load_config  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


def policy_for_fraction(model_cost: cost.ModelCost, timesteps, num_timesteps: int,
                        target: float) -> policies.LeesPolicy:
  """A LEES policy 'unit k on for t <= tau_k' whose FLOP fraction is close to ``target``."""
  k = len(model_cost.units)
  spread = np.linspace(-0.3, 0.3, k)
  rng = np.random.default_rng(0)
  spread = spread[rng.permutation(k)]
  slope = 50.0

  def make(offset):
    tau = np.clip(offset + spread, 0.0, 1.0)
    return policies.LeesPolicy(np.full(k, -slope), slope * tau, name=f'flops{target:.0%}')

  lo, hi = -0.4, 1.4
  for _ in range(40):  # bisection on the common offset of the flip points
    mid = 0.5 * (lo + hi)
    frac = model_cost.flop_fraction(make(mid).step_masks(timesteps, num_timesteps, k))
    lo, hi = (mid, hi) if frac < target else (lo, mid)
  return make(0.5 * (lo + hi))


def time_program(prog, params, repeats: int) -> tuple[float, float]:
  rng = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  compiled = prog.lower(params, rng).compile()
  compile_s = time.perf_counter() - t0
  run = lambda: compiled(params, rng, prog.operand).block_until_ready()  # noqa: E731
  run()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e3, compile_s


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--config', default='configs/cifar10.py')
  ap.add_argument('--batch', type=int, default=100)
  ap.add_argument('--steps', type=int, default=50)
  ap.add_argument('--sampler', default='ddpm', choices=samplers.SAMPLERS)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--fractions', default='0.8,0.6,0.4')
  ap.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  ap.add_argument('--paths', default='segments,cond')
  ap.add_argument('--out', default='')
  args = ap.parse_args()

  config = load_config(args.config)
  model = models.build_model(config.model, dtype=args.dtype)
  params = models.init_params(model, jax.random.PRNGKey(0))
  solver = samplers.make_solver(diffusion.schedule_from_config(config.diffusion), args.sampler,
                                args.steps)
  mc = cost.model_cost(model)
  meta = {'config': args.config, 'batch': args.batch, 'steps': args.steps, 'sampler': args.sampler,
          'dtype': args.dtype, 'device': str(jax.devices()[0].device_kind),
          'platform': jax.default_backend(), 'num_devices': jax.device_count(),
          'cpu_count': os.cpu_count(), 'jax': jax.__version__, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}

  records = []
  full_ms, compile_s = time_program(samplers.compile_sampler(model, solver, policies.FullPolicy(),
                                                             args.batch), params, args.repeats)
  records.append(dict(meta, policy='full', policy_path='full', target_fraction=1.0, flop_fraction=1.0,
                      block_ratio=1.0, segments=1, latency_ms=full_ms, skip_efficiency=1.0,
                      compile_s=compile_s))
  for target in [float(f) for f in args.fractions.split(',')]:
    policy = policy_for_fraction(mc, solver.timesteps, solver.num_original_timesteps, target)
    for path in args.paths.split(','):
      prog = samplers.compile_sampler(model, solver, policy, args.batch, path=path)
      ms, cs = time_program(prog, params, args.repeats)
      records.append(dict(meta, policy=policy.name, policy_path=path, target_fraction=target,
                          flop_fraction=prog.flop_fraction, block_ratio=prog.block_ratio,
                          segments=len(prog.segments), latency_ms=ms,
                          skip_efficiency=ms / (prog.flop_fraction * full_ms), compile_s=cs))

  per100 = 100.0 / args.batch
  print(f'\n{args.config}  {args.sampler}-{args.steps}  batch {args.batch}  {args.dtype}  '
        f'{meta["device"]} ({meta["platform"]})')
  timing.print_table(records, [
      ('policy', 'policy', '<10'), ('path', 'policy_path', '<9'),
      ('flops', 'flop_fraction', '>6.1%'), ('blocks', 'block_ratio', '>6.1%'),
      ('segs', 'segments', '>4'), ('ms/run', 'latency_ms', '>9.1f'),
      ('ms/100img', lambda r: r['latency_ms'] * per100, '>10.1f'),
      ('skip_eff', 'skip_efficiency', '>8.3f'), ('compile_s', 'compile_s', '>9.1f')])
  timing.write_records(args.out, records)


if __name__ == '__main__':
  main()
