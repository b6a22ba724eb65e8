"""Does reuse save time in proportion to its FLOPs? DeepCache against the full model, in one run.

For DeepCache policies (`lees_jax.reuse`: a full step every N steps, the shallow branch only in
between, the deep part's cached output reused), times the whole multi-step sampler on the
'segments' path (one warm-up each, the programs timed in turn, median of --repeats runs:
`timing.interleaved_times`) and reports

  skip_efficiency = latency / (flop_fraction * full-model latency)

(1.0 = time saved exactly in proportion to the FLOPs not computed; a reused unit costs 0 FLOPs)
and each program's compile time. Random weights: this measures speed, not quality.

  python benchmarks/deepcache.py --config=configs/cifar10.py:tiny --batch=8 --steps=20 \\
      --policies=deepcache:2,deepcache:3,deepcache:5,deepcache:3:nonuniform \\
      --out=benchmarks/results/deepcache_tiny_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402

from lees_jax import diffusion, evaluate, models, policies, samplers  # noqa: E402
from benchmarks import timing  # noqa: E402
from train_step import load_config  # noqa: E402  (benchmarks/ is on sys.path as the script's folder)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--config', default='configs/cifar10.py:tiny')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--sampler', default='ddpm', choices=samplers.SAMPLERS)
  ap.add_argument('--repeats', type=int, default=5)
  ap.add_argument('--policies', default='deepcache:2,deepcache:3,deepcache:5,deepcache:3:nonuniform')
  ap.add_argument('--out', default='')
  args = ap.parse_args()

  config = load_config(args.config)
  model = models.build_model(config.model)
  params = models.init_params(model, jax.random.PRNGKey(0))
  solver = samplers.make_solver(diffusion.schedule_from_config(config.diffusion), args.sampler,
                                args.steps)
  rng = jax.random.PRNGKey(0)
  meta = {'config': args.config, 'batch': args.batch, 'steps': args.steps, 'sampler': args.sampler,
          'device': str(jax.devices()[0].device_kind), 'platform': jax.default_backend(),
          'cpu_count': os.cpu_count(), 'load_average': os.getloadavg()[0], 'jax': jax.__version__,
          'flax': flax.__version__, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}

  resolved = [('full', policies.FullPolicy())] + [
      (r.name, r.policy) for r in (evaluate.resolve_policy(s, model) for s in args.policies.split(','))]
  programs, runs = {}, {}
  for name, policy in resolved:
    prog = samplers.compile_sampler(model, solver, policy, args.batch)
    compiled, compile_s = timing.compile_program(prog, params, rng)
    programs[name] = (prog, compile_s)
    runs[name] = (lambda c, p: lambda: c(params, rng, p.operand).block_until_ready())(compiled, prog)
  times = timing.interleaved_times(runs, args.repeats)
  full_ms = statistics.median(times['full']) * 1e3

  records = []
  for name, (prog, compile_s) in programs.items():
    ms = statistics.median(times[name]) * 1e3
    full_steps = int(prog.masks.all(axis=1).sum())
    records.append(dict(meta, policy=name, flop_fraction=prog.flop_fraction,
                        block_ratio=prog.block_ratio, full_steps=full_steps,
                        segments=len(prog.segments), latency_ms=ms,
                        latency_ms_min=min(times[name]) * 1e3,
                        latency_ms_all=[t * 1e3 for t in times[name]], speedup=full_ms / ms,
                        skip_efficiency=ms / (prog.flop_fraction * full_ms), compile_s=compile_s))

  print(f'\n{args.config}  {args.sampler}-{args.steps}  batch {args.batch}  '
        f'{meta["device"]} ({meta["platform"]}), load average {meta["load_average"]:.1f}')
  timing.print_table(records, [
      ('policy', 'policy', '<28'), ('full', 'full_steps', '>4'),
      ('flops', 'flop_fraction', '>6.1%'), ('blocks', 'block_ratio', '>6.1%'),
      ('segs', 'segments', '>4'), ('ms/run', 'latency_ms', '>8.1f'),
      ('ms min', 'latency_ms_min', '>8.1f'), ('speedup', 'speedup', '>7.2f'),
      ('skip_eff', 'skip_efficiency', '>8.3f'), ('compile_s', 'compile_s', '>9.1f')])
  timing.write_records(args.out, records)


if __name__ == '__main__':
  main()
