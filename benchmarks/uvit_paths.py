"""Skipping U-ViT blocks: latency of the hard-skipping paths at ASE's U-ViT schedules, as ratios.

A U-ViT (random weights from its own init) samples with the VP SDE's Euler-Maruyama and
DPM-Solver (`lees_jax.sde`), for the full model and ASE's Table 5 U-ViT rows (D1-, D2-, D3-,
D6-U-ViT: decoder blocks kept per tenth of time, `lees_jax.ase.UVIT_KEPT`; a dropped out-block
keeps its skip linear), each along

* 'segments' -- one static-mask loop per segment (compiled per policy);
* 'cond'     -- every block behind lax.cond (one program for every mask);
* 'stacked'  -- U-ViT's two stacks of identical blocks (in + mid, out), a loop over only the
  kept blocks of each step (one program for every mask; its params stacked once beforehand by
  `prepare_params`, whose time is reported apart, as evaluation makes that layout once);

in each compute dtype. Per (dtype, solver) group the programs are timed in turn (A B C ... A B
C ...: load drifts hit all alike), --repeats runs each after a warm-up, and the fastest run of
each (least disturbed by other load; the median is recorded too) on --clock (default: the
process's CPU time on the CPU backend, wall time on an accelerator) reported as ratios within
the group: speedup = full latency / latency and skip_efficiency = latency /
(flop_fraction x full latency) (1.0 = time saved exactly in proportion to the FLOPs skipped),
the full latency being the group's full model on 'segments' (the plain network). The 'cond'
and 'stacked' programs are compiled once per group (on the full policy's masks) and run every
policy by their mask operand.

CPU (small: 64x64 pixels, patch 4 -- U-ViT-S/4's 256 tokens -- width 128, depth 12 = 6 + 1 + 6
blocks, so the D-n rows apply as published; a few steps):

  python benchmarks/uvit_paths.py --out=benchmarks/results/uvit_paths.json

GPU (the real U-ViT-S/4 of CelebA 64: width 512, depth 12, 8 heads; DPM-Solver-50 and EM steps
-- ASE's EM-1000 costs 10x the EM-100 per run, step for step the same program):

  python benchmarks/uvit_paths.py --preset=celeba64_uvit_small --batch=64 \\
      --solvers=dpm_solver:50,euler_maruyama:100 --repeats=5 \\
      --out=benchmarks/results/uvit_paths_gpu.json

Only jax, flax, numpy and lees_jax's model, policy and sampler modules are imported (no
TensorFlow, TFDS, CLU or ml_collections), so it runs on a bare accelerator machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import timing  # noqa: E402
from lees_jax import ase, models, policies, samplers, sde  # noqa: E402
from lees_jax.models import uvit  # noqa: E402

PATHS = ('segments', 'cond', 'stacked')
SCHEDULES = tuple(ase.UVIT_KEPT)  # D1-U-ViT, D2-U-ViT, D3-U-ViT, D6-U-ViT
# The CPU network: U-ViT-S/4's image, patch and depth at a quarter of its width.
SMALL = dict(img_size=64, patch_size=4, in_chans=3, embed_dim=128, depth=12, num_heads=4,
             mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True)


VERSIONS = ('jax', 'jaxlib', 'jax-cuda12-plugin', 'flax', 'numpy')


def package_version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def parse_solvers(text: str) -> list[tuple[str, int]]:
  """'dpm_solver:9,euler_maruyama:10' -> [('dpm_solver', 9), ('euler_maruyama', 10)]."""
  out = []
  for item in text.split(','):
    name, _, steps = item.strip().partition(':')
    if name not in sde.SDE_SAMPLERS or not steps.isdigit() or int(steps) < 1:
      raise ValueError(f'--solvers items are <{"|".join(sde.SDE_SAMPLERS)}>:<steps>, got {item!r}')
    out.append((name, int(steps)))
  return out


def uvit_spec(args) -> uvit.UViTSpec:
  fields = dict(uvit.PUBLIC_CONFIGS[args.preset]) if args.preset else dict(SMALL)
  for name in ('embed_dim', 'depth', 'num_heads'):
    if getattr(args, name):
      fields[name] = getattr(args, name)
  return uvit.UViTSpec(**fields)


def prepare(prog, params, repeats: int = 3):
  """(the program's params, median ms of `prepare_params`: the stacked layout's one-time copy
  of every block; 0 for the other paths)."""
  prepared = jax.block_until_ready(prog.prepare_params(params))  # compiles the stacking
  times = []
  for _ in range(repeats if prog.prepare is not None else 0):
    t0 = time.perf_counter()
    jax.block_until_ready(prog.prepare_params(params))
    times.append(time.perf_counter() - t0)
  return prepared, statistics.median(times) * 1e3 if times else 0.0


def time_interleaved(runs: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
  """{run: {'wall': seconds, 'process': CPU seconds of this process}} of ``repeats`` runs of
  each program, timed in turn after one warm-up each."""
  for run in runs.values():
    run()
  times = {name: {'wall': [], 'process': []} for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t0, c0 = time.perf_counter(), time.process_time()
      run()
      times[name]['wall'].append(time.perf_counter() - t0)
      times[name]['process'].append(time.process_time() - c0)
  return times


def default_clock() -> str:
  """'process' on the CPU backend: the CPU seconds the programs use, which other jobs on a
  shared machine do not inflate (its wall times varied 2x under load); 'wall' on an
  accelerator, where the process's CPU time is the host's alone."""
  return 'process' if jax.default_backend() == 'cpu' else 'wall'


def measure_group(spec, dtype: str, solver_name: str, steps: int, batch: int, repeats: int,
                  clock: str, log=print) -> list[dict]:
  """Every (policy, path) of one compute dtype and solver, timed in one interleaved run."""
  model = models.UViT(spec, dtype=models.compute_dtype(dtype))
  params = jax.jit(lambda: models.init_params(model, jax.random.PRNGKey(0)))()
  solver = sde.make_solver(solver_name, steps)
  rng = jax.random.PRNGKey(0)
  plan = [('full', policies.FullPolicy())] + [
      (name, ase.named_schedule(name, model.units)) for name in SCHEDULES]
  shared = {}  # cond and stacked: one program each, compiled on the full policy's masks
  for path in PATHS[1:]:
    prog = samplers.compile_sampler(model, solver, policies.FullPolicy(), batch, path=path)
    prepared, prepare_ms = prepare(prog, params)
    shared[path] = timing.compile_program(prog, prepared, rng) + (prepared, prepare_ms)
  runs, info = {}, {}
  for name, policy in plan:
    for path in PATHS:
      prog = samplers.compile_sampler(model, solver, policy, batch, path=path)
      if path == 'segments':
        fn, compile_s = timing.compile_program(prog, params, rng)
        run_params, prepare_ms = params, 0.0
      else:
        fn, compile_s, run_params, prepare_ms = shared[path]
      runs[name, path] = (lambda fn=fn, p=run_params, operand=prog.operand:
                          fn(p, rng, operand).block_until_ready())
      kept = ase.UVIT_KEPT.get(name)
      info[name, path] = dict(
          policy=name, policy_path=path, decoder_kept=list(kept) if kept else None,
          block_ratio=prog.block_ratio, flop_fraction=prog.flop_fraction,
          segments=len(prog.segments), compile_s=compile_s,
          compiled_per_policy=path == 'segments', prepare_ms=prepare_ms)
      log(f'[{dtype} {solver_name}-{steps}] compiled {name} {path}: {compile_s:.1f} s')
  times = time_interleaved(runs, repeats)
  # The fastest run on ``clock`` is the one least disturbed by other load; the ratios use it,
  # and both clocks' minimum and median are kept.
  latency = {key: min(ts[clock]) for key, ts in times.items()}
  full = latency['full', 'segments']
  out = []
  for key, rec in info.items():
    stats = {f'{c}_{f.__name__}_ms': f(times[key][c]) * 1e3 for c in ('wall', 'process')
             for f in (min, statistics.median)}
    out.append(dict(rec, dtype=dtype, solver=solver_name, steps=steps, clock=clock,
                    repeats=repeats, latency_ms=latency[key] * 1e3, **stats,
                    speedup=full / latency[key],
                    skip_efficiency=latency[key] / (rec['flop_fraction'] * full)))
  return out


def markdown_table(records: list[dict]) -> str:
  clock = records[0]['clock'] if records else 'wall'
  lines = [f'| dtype | sampler | policy | path | blocks | FLOPs | segments | ms / run ({clock}, '
           'min) | speedup | skip efficiency | compile s |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in records:
    compiled = f'{r["compile_s"]:.1f}' + ('' if r['compiled_per_policy'] else ' (one for all)')
    lines.append(f'| {r["dtype"]} | {r["solver"]}-{r["steps"]} | {r["policy"]} | '
                 f'{r["policy_path"]} | {r["block_ratio"]:.1%} | {r["flop_fraction"]:.1%} | '
                 f'{r["segments"]} | {r["latency_ms"]:.0f} | {r["speedup"]:.2f} | '
                 f'{r["skip_efficiency"]:.3f} | {compiled} |')
  return '\n'.join(lines).replace('%', ' %')


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--preset', default='', choices=[''] + sorted(uvit.PUBLIC_CONFIGS),
                  help="a public U-ViT network (celeba64_uvit_small: U-ViT-S/4); '' the small "
                       'CPU network')
  ap.add_argument('--embed_dim', type=int, default=0, help='override the width (0: keep)')
  ap.add_argument('--depth', type=int, default=0, help='override the depth (0: keep)')
  ap.add_argument('--num_heads', type=int, default=0, help='override the heads (0: keep)')
  ap.add_argument('--batch', type=int, default=2)
  ap.add_argument('--solvers', default='euler_maruyama:10,dpm_solver:9',
                  help='<euler_maruyama|dpm_solver>:<network evaluations>, comma-separated')
  ap.add_argument('--dtypes', default='float32,bfloat16', help='compute dtypes, comma-separated')
  ap.add_argument('--repeats', type=int, default=7)
  ap.add_argument('--clock', default='', choices=['', 'wall', 'process'],
                  help="what the ratios time ('': process CPU time on the CPU backend, else "
                       'wall time)')
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)

  spec = uvit_spec(args)
  solvers = parse_solvers(args.solvers)
  dtypes = [d.strip() for d in args.dtypes.split(',')]
  for d in dtypes:
    models.compute_dtype(d)  # refuses an unknown dtype before anything is compiled
  params = jax.eval_shape(lambda: models.init_params(models.UViT(spec), jax.random.PRNGKey(0)))
  meta = {'model': args.preset or 'small U-ViT', 'img_size': spec.img_size,
          'patch_size': spec.patch_size, 'embed_dim': spec.embed_dim, 'depth': spec.depth,
          'num_heads': spec.num_heads, 'tokens': spec.num_tokens,
          'params': models.count_params(params), 'batch': args.batch,
          'device': str(jax.devices()[0].device_kind), 'platform': jax.default_backend(),
          'num_devices': jax.device_count(), 'cpu_count': os.cpu_count(),
          **{package: package_version(package) for package in VERSIONS},
          'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  clock = args.clock or default_clock()
  records = []
  for dtype in dtypes:
    for solver_name, steps in solvers:
      records += [dict(meta, **r) for r in measure_group(spec, dtype, solver_name, steps,
                                                         args.batch, args.repeats, clock)]
  print(f'\n{meta["model"]}: {spec.img_size}x{spec.img_size}, patch {spec.patch_size}, width '
        f'{spec.embed_dim}, depth {spec.depth}, {meta["params"]:,} params, batch {args.batch}, '
        f'{meta["device"]} ({meta["platform"]}), jax {jax.__version__}, {clock} time\n')
  print(markdown_table(records))
  timing.write_records(args.out, records)
  return records


if __name__ == '__main__':
  main()
