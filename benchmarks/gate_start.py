"""The gate start (``config.gates.init``: 'zero', the paper's, against 'on') on one backbone.

Runs nothing itself: it collects two finished study workdirs, one per start, made with the
same command but ``--config.gates.init`` (the λ sweep, B1 as the reference), e.g. on the shipped
quick-start backbone:

  for s in zero on; do
    python -m lees_jax.main --config=configs/cifar10.py:quickstart --workdir=W_$s \\
      --config.gates.init=$s --config.gates.batch_size=64 --config.gates.num_train_steps=150 \\
      --config.experiment.lams=0.01,0.05,0.1 --config.experiment.baselines=full \\
      --config.experiment.overhead_steps=0
  done
  python benchmarks/gate_start.py --zero=W_zero --on=W_on --out=benchmarks/results/gate_start.json

and prints, per start, the λ sweep's executed blocks, FLOP fraction and FID, whether the sweep is
monotone in executed FLOPs, and which start has the better FID at equal FLOPs (the FID of the
other start's sweep interpolated linearly in FLOP fraction).
"""

import argparse
import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lees_jax import cells  # noqa: E402


def sweep(workdir: str) -> dict:
  recs = cells.load_cell_results(workdir)
  lees = sorted((r for r in recs if r['kind'] == 'lees' and r['form'] == 'hard'),
                key=lambda r: r['lam'])
  full = next((r for r in recs if r['kind'] == 'full'), None)
  rows = [{'lam': r['lam'], 'block_ratio': r['block_ratio'], 'flop_fraction': r['flop_fraction'],
           'fid': r['fid'], 'seed': r['seed']} for r in lees]
  flops = [r['flop_fraction'] for r in rows]
  return {'rows': rows, 'full_fid': full['fid'] if full else None,
          'monotone_in_flops': all(a >= b for a, b in zip(flops, flops[1:])),
          'sampler': lees[0].get('sampler_description') or lees[0].get('sampler') if lees else None,
          'num_samples': lees[0]['num_samples'] if lees else None,
          'reference': lees[0]['reference'] if lees else None}


def fid_at(rows, flop_fraction):
  """The sweep's FID linearly interpolated at ``flop_fraction`` (None outside its range)."""
  pts = sorted((r['flop_fraction'], r['fid']) for r in rows)
  x, y = [p[0] for p in pts], [p[1] for p in pts]
  if not pts or flop_fraction < x[0] or flop_fraction > x[-1]:
    return None
  return float(np.interp(flop_fraction, x, y))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--zero', required=True)
  p.add_argument('--on', required=True)
  p.add_argument('--out', default='')
  args = p.parse_args(argv)
  out = {'zero': sweep(args.zero), 'on': sweep(args.on),
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
  comparisons = []
  for a, b in (('zero', 'on'), ('on', 'zero')):
    for r in out[a]['rows']:
      other = fid_at(out[b]['rows'], r['flop_fraction'])
      if other is not None:
        comparisons.append({'start': a, 'lam': r['lam'], 'flop_fraction': r['flop_fraction'],
                            'fid': r['fid'], 'other_start': b, 'other_fid_at_equal_flops': other})
  out['equal_flops'] = comparisons
  for s in ('zero', 'on'):
    print(f'start {s}: B1 FID {out[s]["full_fid"]}, sweep monotone in FLOPs: '
          f'{out[s]["monotone_in_flops"]}')
    for r in out[s]['rows']:
      print(f'  λ={r["lam"]:<5g} blocks {r["block_ratio"]:.3f}  FLOPs {r["flop_fraction"]:.3f}  '
            f'FID {r["fid"]:.2f}')
  for c in comparisons:
    print(f'{c["start"]} λ={c["lam"]:g} at FLOPs {c["flop_fraction"]:.3f}: FID {c["fid"]:.2f} vs '
          f'{c["other_start"]} {c["other_fid_at_equal_flops"]:.2f} (interpolated)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main()
