"""Entry point: ``python -m lees_jax.main --config=configs/cifar10.py[:preset] --workdir=W``.

``config.mode`` picks the job; each job is a function ``run(config, workdir)`` in its
own module, imported only when chosen so that light jobs do not import TensorFlow.
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py:tiny.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, summaries and results '
                    '(a local path or gs://...).')
flags.mark_flags_as_required(['config', 'workdir'])

# mode -> (module, function). Every entry is implemented; see README for what each does.
MODES = {
    'describe': ('lees_jax.cost', 'describe'),
    'latents': ('lees_jax.latents', 'run'),
    'pretrain': ('lees_jax.train', 'pretrain'),
    'train_gates': ('lees_jax.train', 'train_gates'),
    'ase_finetune': ('lees_jax.train', 'ase_finetune'),
    'train_l2c': ('lees_jax.train', 'train_l2c'),
    'train_lees3': ('lees_jax.train', 'train_lees3'),
    'evaluate': ('lees_jax.evaluate', 'evaluate'),
    'ase_grid': ('lees_jax.evaluate', 'ase_grid'),
    'experiment': ('lees_jax.experiment', 'experiment'),
}


def _maybe_initialize_distributed():
  """Multi-host runs (TPU pods, multi-node GPU) call jax.distributed.initialize()."""
  import jax

  multi_host = (os.environ.get('LEES_MULTIHOST') == '1' or
                int(os.environ.get('SLURM_NTASKS', '1')) > 1 or
                'TPU_WORKER_HOSTNAMES' in os.environ and ',' in os.environ['TPU_WORKER_HOSTNAMES'])
  if multi_host:
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d, %d global devices', jax.process_index(),
                 jax.process_count(), jax.device_count())


def run_mode(config, workdir: str):
  if config.mode not in MODES:
    raise app.UsageError(f'unknown config.mode {config.mode!r}; available modes: '
                         f'{", ".join(sorted(MODES))}')
  module_name, fn_name = MODES[config.mode]
  return getattr(importlib.import_module(module_name), fn_name)(config, workdir)


def _user_errors() -> tuple[type[Exception], ...]:
  """Errors about the user's input whose message already says cause and remedy: printed as
  one line, without a traceback. (Imported here: each module is light.)"""
  from lees_jax.checkpoints import BackboneError  # pylint: disable=g-import-not-at-top
  from lees_jax.data_prep import DataError  # pylint: disable=g-import-not-at-top
  from lees_jax.fid.inception import WeightsError  # pylint: disable=g-import-not-at-top
  return DataError, BackboneError, WeightsError


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _maybe_initialize_distributed()
  try:
    run_mode(FLAGS.config, FLAGS.workdir)
  except _user_errors() as e:
    logging.debug('user error', exc_info=True)  # the traceback only in a verbose log
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
