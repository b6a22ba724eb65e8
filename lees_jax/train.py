"""The one training loop: `train` runs any `objectives.Objective`.

`train` owns everything a long job needs: the device mesh, the state (step, trainable params,
optimiser state, optional EMA), the jitted data-parallel step, orbax checkpoints with
resume-from-latest, the NaN/inf guard, CLU summaries and console progress. What is trained,
with which loss, and what a finished run exports, is the objective's (`lees_jax.objectives`).
`TimedStep` times the same compiled step (the experiment's epoch estimate, the benchmarks).

EMA: ``ema <- ema + (1 - d) (params - ema)``, which leaves the EMA of a parameter that never
changes bitwise equal to it.

Determinism: the step's random key is ``fold_in(base_key, step)`` and the data order is a
function of (seed, step) (see `lees_jax.data`), so a run killed at any moment and restarted
from its latest checkpoint ends bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lees_jax import checkpoints
from lees_jax import data
from lees_jax import files
from lees_jax import objectives
from lees_jax.objectives import CHECKPOINT_DIR, Objective


class TrainingDivergedError(FloatingPointError):
  """A loss or gradient became NaN/inf; nothing was saved after the last good checkpoint."""


# ---------------------------------------------------------------------------
# State and step.
# ---------------------------------------------------------------------------


def init_state(objective: Objective, rng: jax.Array, mesh) -> dict:
  """{'step', 'params', 'opt_state'[, 'ema_params']}, replicated on every device of ``mesh``."""

  def init(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': objective.optimizer.init(params)}
    if objective.ema_decay is not None:
      state['ema_params'] = jax.tree_util.tree_map(jnp.copy, params)
    return state

  rep = data.replicated_sharding(mesh)
  if objective.initial_trainable is not None:
    return jax.jit(init, out_shardings=rep)(data.replicate(objective.initial_trainable, mesh))
  return jax.jit(lambda: init(objective.init_trainable(rng)), out_shardings=rep)()


def make_train_step(objective: Objective, mesh):
  """jit(state, frozen, batch, base_key) -> (state, metrics); batch sharded, the rest replicated.

  Gradients are taken with respect to the trainable pytree only; ``frozen`` enters through
  ``stop_gradient``, so no weight gradient of a frozen parameter is ever formed.
  """
  rep, bat = data.replicated_sharding(mesh), data.batch_sharding(mesh)
  optimizer, ema_decay = objective.optimizer, objective.ema_decay

  def step(state, frozen, batch, base_key):
    rng = jax.random.fold_in(base_key, state['step'])
    frozen = jax.lax.stop_gradient(frozen)

    extra = {'step': state['step']} if objective.loss_takes_step else {}

    def loss(trainable):
      return objective.loss_fn(trainable, frozen, batch, rng, **extra)

    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    if ema_decay is not None:
      # e + (1-d)(p - e), not d*e + (1-d)*p: the same average, but exactly e wherever p == e,
      # so a parameter that receives no update keeps a bitwise-identical EMA.
      new['ema_params'] = jax.tree_util.tree_map(
          lambda e, p: e + (1.0 - ema_decay) * (p - e), state['ema_params'], params)
    metrics = dict(metrics, loss=value, grad_norm=optax.global_norm(grads))
    return new, metrics

  return jax.jit(step, in_shardings=(rep, rep, bat, rep), out_shardings=(rep, rep),
                 donate_argnums=(0,))


class TimedStep:
  """The real jitted training step of an objective, for timing: one compile, then steps.

  The one "time N training steps" of the project: `lees_jax.experiment` estimates a backbone
  epoch with `time_steps`, `benchmarks/train_step.py` compares objectives with it.
  """

  def __init__(self, objective: Objective, mesh, seed: int = 0):
    self.objective, self.mesh = objective, mesh
    self.state = init_state(objective, jax.random.PRNGKey(seed), mesh)
    self.frozen = data.replicate(objective.frozen, mesh)
    self.key = data.replicate(np.asarray(jax.device_get(jax.random.PRNGKey(seed + 1))), mesh)
    self._step = make_train_step(objective, mesh)
    self._compiled = None
    self.compile_seconds = None
    self.trainable_params = int(sum(np.size(x) for x in
                                    jax.tree_util.tree_leaves(self.state['params'])))

  def compile(self, batch) -> float:
    """Compiles the step for ``batch``'s shapes (ahead of time); returns the seconds taken."""
    t0 = time.perf_counter()
    self._compiled = self._step.lower(self.state, self.frozen, batch, self.key).compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def __call__(self, batch) -> float:
    """Runs one step on ``batch`` (compiling first if needed); returns its wall seconds."""
    if self._compiled is None:
      self.compile(batch)
    t0 = time.perf_counter()
    self.state, metrics = self._compiled(self.state, self.frozen, batch, self.key)
    jax.block_until_ready((self.state, metrics))
    return time.perf_counter() - t0


def training_batches(config, objective: Objective, *, global_batch_size: int, seed: int,
                     start_step: int = 0):
  """The objective's stream of ``config.data``: images, or a latent backbone's precomputed
  latents (`lees_jax.latents`; never images, which it cannot denoise)."""
  from lees_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model(config.model)
  if model.input.kind == 'latents' and not config.data.get('latents_dir'):
    raise ValueError(f'{type(model).__name__} denoises VAE latents: set config.data.latents_dir to '
                     'the directory the `latents` mode wrote (python -m lees_jax.main '
                     '--config=... --config.mode=latents --workdir=W writes W/latents)')
  return data.train_iterator(config.data, global_batch_size=global_batch_size, seed=seed,
                             start_step=start_step, random_flip=objective.random_flip)


def time_steps(objective: Objective, config, num_steps: int, *, mesh=None) -> dict:
  """Times ``num_steps`` real steps of ``objective`` on real batches of ``config.data``
  (loading included; the first, warm-up step excluded); the median and the compile time."""
  mesh = data.make_mesh() if mesh is None else mesh
  batch_size = int(objective.section.batch_size)
  data.check_batch_size(batch_size, mesh)
  batches = training_batches(config, objective, global_batch_size=batch_size, seed=0)
  step = TimedStep(objective, mesh)
  t0 = time.perf_counter()
  step(data.shard_batch(next(batches), mesh))  # compile + first step
  first = time.perf_counter() - t0
  times = []
  for _ in range(max(1, num_steps)):
    t0 = time.perf_counter()
    step(data.shard_batch(next(batches), mesh))
    times.append(time.perf_counter() - t0)
  return {'step_seconds': statistics.median(times), 'measured_steps': len(times),
          'batch_size': batch_size, 'first_step_seconds': first,
          'device': str(jax.devices()[0].device_kind), 'num_devices': jax.device_count()}


# ---------------------------------------------------------------------------
# Checkpoints and console.
# ---------------------------------------------------------------------------


def _checkpoint_manager(workdir: str, objective: Objective):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(objective.section.get('keep_checkpoints', 3)), create=True,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  # orbax writes only to absolute paths: a relative local --workdir is resolved here.
  root = workdir if files.is_remote(workdir) else os.path.abspath(workdir)
  return ocp.CheckpointManager(files.join(root, CHECKPOINT_DIR, objective.name), options=options)


def _restore(manager, state: dict, step: int) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    raise RuntimeError(f'cannot restore checkpoint step {step} from {manager.directory}: it does not '
                       f'match this run\'s state (a different config in the same workdir?). Use a '
                       f'fresh --workdir. {type(e).__name__}: {e}') from e


def _save(manager, state: dict, step: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _flat_config(config) -> dict:
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def _fmt_time(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------



def train(config, workdir: str, objective: Objective, *, mesh=None) -> dict:
  """Runs (or resumes) ``objective`` to ``objective.num_train_steps``; returns the final state."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  data.configure_tensorflow()  # before CLU's writer imports TF: keep TF off the accelerators

  section = objective.section
  mesh = data.make_mesh() if mesh is None else mesh
  global_batch = int(section.batch_size)
  data.check_batch_size(global_batch, mesh)
  num_steps = objective.num_train_steps
  root = jax.random.PRNGKey(config.seed)
  init_key, base_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)
  base_key = data.replicate(jax.device_get(base_key), mesh)

  state = init_state(objective, init_key, mesh)
  frozen = data.replicate(objective.frozen, mesh)
  with checkpoints.quiet():
    manager = _checkpoint_manager(workdir, objective)
    latest = manager.latest_step()
    if latest is not None:
      state = _restore(manager, state, latest)
  start = int(jax.device_get(state['step']))
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main,
                                                asynchronous=False)
  if is_main:
    print(f'{objective.name}: {objective.describe}', flush=True)
    print(f'{objective.name}: {num_steps} steps at global batch {global_batch} on {mesh.size} '
          f'device(s) / {jax.process_count()} process(es); '
          + (f'resuming from checkpoint step {start}' if latest is not None else 'starting fresh')
          + f'; workdir {workdir}', flush=True)
  if latest is None:
    writer.write_hparams(_flat_config(config))

  step_fn = make_train_step(objective, mesh)
  batches = training_batches(config, objective, global_batch_size=global_batch, seed=config.seed,
                             start_step=start)
  log_every = max(1, int(section.log_every))
  ckpt_every = max(1, int(section.checkpoint_every))
  pending: list[dict] = []
  t_last, s_last = time.perf_counter(), start

  def flush(step: int):
    """Checks the pending steps for NaN/inf, writes their mean metrics, prints progress."""
    nonlocal pending, t_last, s_last
    values = jax.device_get(pending)
    first = step - len(values) + 1
    for i, m in enumerate(values):
      if not all(np.isfinite(np.asarray(v)).all() for v in m.values()):
        writer.flush()
        terms = ', '.join(f'{k}={float(v):.4g}' for k, v in sorted(m.items()))
        raise TrainingDivergedError(
            f'{objective.name}: non-finite loss or gradient at step {first + i} ({terms}). '
            f'The run stopped without saving; the last good checkpoint is step '
            f'{manager.latest_step()} in {manager.directory} (a restart resumes from it). '
            'Check the learning rate, the input data and the backbone parameters.')
    means = {k: float(np.mean([m[k] for m in values])) for k in values[0]}
    now = time.perf_counter()
    rate = (step - s_last) / max(now - t_last, 1e-9)
    first_interval = s_last == start
    t_last, s_last = now, step
    pending = []
    scalars = dict(means, steps_per_sec=rate, **objective.host_scalars(
        {'step': step, 'params': state['params']}))
    writer.write_scalars(step, scalars)
    if is_main:
      terms = ' '.join(f'{k} {means[k]:.4f}' for k in sorted(means) if k != 'grad_norm')
      extra = ''
      if 'executed_ratio' in scalars:
        extra = f' | executed {scalars["executed_ratio"]:.3f}'
      note = ' (incl. compilation)' if first_interval else ''
      print(f'[{objective.name}] step {step}/{num_steps} | {rate:.2f} steps/s{note} | '
            f'ETA {_fmt_time((num_steps - step) / max(rate, 1e-9))} | {terms}{extra}', flush=True)

  for step in range(start, num_steps):
    batch = data.shard_batch(next(batches), mesh)
    state, metrics = step_fn(state, frozen, batch, base_key)
    pending.append(metrics)
    done = step + 1
    last = done == num_steps
    save = done % ckpt_every == 0 or last
    if done % log_every == 0 or save:
      flush(done)
    if objective.image_every > 0 and (done % objective.image_every == 0 or last):
      images = objective.images({'step': done, 'params': state['params']})
      if images:
        writer.write_images(done, {k: v[None] for k, v in images.items()})
    if save:
      with checkpoints.quiet():
        _save(manager, state, done)
  with checkpoints.quiet():
    manager.wait_until_finished()
  writer.flush()
  objective.finish(state, workdir)  # idempotent: a restarted finished run rewrites the same files
  writer.close()
  with checkpoints.quiet():
    manager.close()
  files.sync(f'{objective.name} finished in {workdir}')  # callers read what finish() wrote
  return state


def run_objective(name: str, config, workdir: str, *, mesh=None) -> dict:
  objective = objectives.OBJECTIVES[name](config)  # validates inputs before the workdir is touched
  return train(config, workdir, objective, mesh=mesh)


def pretrain(config, workdir: str):
  """``config.mode=pretrain``: DDPM training; exports EMA params to ``<workdir>/backbone``."""
  return run_objective('pretrain', config, workdir)


def train_gates(config, workdir: str):
  """``config.mode=train_gates``: LEES gates on the frozen ``config.backbone``."""
  return run_objective('train_gates', config, workdir)


def ase_finetune(config, workdir: str):
  """``config.mode=ase_finetune``: the backbone fine-tuned under ``config.ase_ft.schedule``;
  exports ``<workdir>/backbone`` (EMA params + schedule) and ``<workdir>/ase_schedule.json``."""
  return run_objective('ase_finetune', config, workdir)


def train_l2c(config, workdir: str):
  """``config.mode=train_l2c``: Learning-to-Cache routers on the frozen ``config.backbone``;
  writes ``<workdir>/routers.json`` (policy spec ``l2c:<workdir>``)."""
  return run_objective('train_l2c', config, workdir)


def train_lees3(config, workdir: str):
  """``config.mode=train_lees3``: three-choice LEES gates on the frozen ``config.backbone``;
  writes ``<workdir>/lees3_gates.json`` (policy spec ``lees3:<workdir>``)."""
  return run_objective('train_lees3', config, workdir)
