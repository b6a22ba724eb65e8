"""Is gate training cheap? Step time of LEES gate training vs a full backbone training step.

Both steps are the real ones from `lees_jax.train` (`make_train_step` on the `train_gates`
and `pretrain` objectives), on the same model, the same batch and the same devices, timed
in one run (warm-up, block_until_ready, the programs timed in turn, median of --repeats
steps each). Gate training forms
no weight gradients (only activation gradients flow back to the 2K gate scalars) and has
no Adam/EMA over the backbone, so it should cost at most ~0.8x a full training step. An
inference forward pass is timed as a reference.

  python benchmarks/train_step.py --config=configs/cifar10.py:tiny --batch=8 --out=tiny.json
  python benchmarks/train_step.py --config=configs/cifar10.py --batch=8 --out=paper_b8.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import timing  # noqa: E402
from lees_jax import data, models, objectives, train  # noqa: E402


def load_config(spec: str):
  """``configs/cifar10.py:tiny`` -> the config, parsed as ``--config`` is (ml_collections)."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  return config_flags.ConfigFileFlagParser('config').parse(spec)


def prepare_objective(objective, mesh, batch) -> tuple[callable, dict]:
  """Compiles the real training step of ``objective`` (`train.TimedStep`); returns (run one
  step, info)."""
  step = train.TimedStep(objective, mesh)
  compile_s = step.compile(batch)
  return (lambda: step(batch)), {'compile_s': compile_s, 'trainable_params': step.trainable_params}


def time_interleaved(runs: dict, repeats: int) -> dict[str, list[float]]:
  """Times the programs in turn (A B C A B C ...) so that load drifts hit all alike."""
  return timing.interleaved_times(runs, repeats)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/cifar10.py:tiny')
  parser.add_argument('--batch', type=int, default=8, help='global batch size')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out', default='', help='JSON output path')
  args = parser.parse_args(argv)

  config = load_config(args.config)
  mesh = data.make_mesh()
  data.check_batch_size(args.batch, mesh)
  model = models.build_model(config.model)
  params = jax.jit(lambda: models.init_params(model, jax.random.PRNGKey(0)),
                   out_shardings=data.replicated_sharding(mesh))()
  host_params = jax.device_get(params)
  images = data.load_subset('train')[0][:args.batch]
  if images.shape[0] < args.batch:
    images = np.resize(images, (args.batch,) + images.shape[1:])
  batch = data.shard_batch({'image': data.to_model_range(images)}, mesh)

  runs, rows = {}, {}
  runs['gates'], rows['gates'] = prepare_objective(
      objectives.gates_objective(config, backbone=host_params), mesh, batch)
  runs['full'], rows['full'] = prepare_objective(objectives.pretrain_objective(config), mesh, batch)
  fwd = jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))
  t = jnp.zeros((args.batch,), jnp.int32)
  t0 = time.perf_counter()
  fwd_c = fwd.lower(params, batch['image'], t).compile()
  rows['forward'] = {'compile_s': time.perf_counter() - t0, 'trainable_params': 0}
  runs['forward'] = lambda: fwd_c(params, batch['image'], t).block_until_ready()
  for name, times in time_interleaved(runs, args.repeats).items():
    rows[name].update(median_s=statistics.median(times), times_s=times)

  full = rows['full']['median_s']
  names = {'gates': 'gate training step (LEES, hard STE)',
           'full': 'full training step (pretrain: all weights, Adam, EMA)',
           'forward': 'inference forward (reference)'}
  print(f'{args.config}  batch {args.batch}  {jax.device_count()} x {jax.devices()[0].platform} '
        f'({jax.devices()[0].device_kind})')
  print(f'{"step":<56} {"median ms":>10} {"vs full":>8} {"compile s":>10} {"trainable":>11}')
  for key, row in rows.items():
    row['ratio_to_full'] = row['median_s'] / full
    print(f'{names[key]:<56} {1e3 * row["median_s"]:>10.2f} {row["ratio_to_full"]:>8.3f} '
          f'{row["compile_s"]:>10.1f} {row["trainable_params"]:>11,}')
  ratio = rows['gates']['ratio_to_full']
  print(f'gate/full step-time ratio: {ratio:.3f} ({"within" if ratio <= 0.8 else "ABOVE"} the 0.8 '
        'target)')
  result = {
      'benchmark': 'train_step', 'config': args.config, 'batch': args.batch,
      'repeats': args.repeats, 'num_units': model.num_units,
      'backbone_params': models.count_params(host_params),
      'gate_over_full_ratio': ratio, 'target_ratio': 0.8, 'steps': rows,
      'device': {'platform': jax.devices()[0].platform, 'kind': jax.devices()[0].device_kind,
                 'count': jax.device_count()},
      'host': platform.node(), 'jax': jax.__version__,
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'wrote {args.out}')
  return result


if __name__ == '__main__':
  main()
