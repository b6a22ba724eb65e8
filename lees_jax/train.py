"""The training loop, and the objectives that plug into it.

One loop (`train`) owns everything a long job needs: the device mesh, the state
(step, trainable params, optimiser state, optional EMA), the jitted data-parallel step,
orbax checkpoints with resume-from-latest, the NaN/inf guard, CLU summaries and console
progress. An `Objective` says what is trained and how:

* ``init_trainable(rng)`` -- the trainable pytree: the ONLY thing that is differentiated,
  updated by the optimiser and kept in the optimiser state;
* ``frozen`` -- everything else the loss reads (e.g. the backbone); passed through
  ``jax.lax.stop_gradient`` and never updated or checkpointed by the loop;
* ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``;
* host-side hooks for extra scalars, images and the final export.

Modes (``config.mode``): ``pretrain`` (DDPM eps-prediction training of the whole UNet,
exports its EMA parameters to ``<workdir>/backbone``), ``train_gates`` (LEES: only the
2K gate scalars alpha, beta are trained on a frozen backbone; writes ``<workdir>/gates.json``)
and ``ase_finetune`` (the ASE baseline: the backbone fine-tuned under a fixed ASE schedule,
AdamW + EMA + lambda(t); exports ``<workdir>/backbone`` with the schedule in its metadata and
``<workdir>/ase_schedule.json``; read back with `load_ase_finetuned`). An objective that trains
part of a parameter tree splits it with `partition` / `merge` into trainable and frozen parts.

EMA: ``ema <- ema + (1 - d) (params - ema)``, which leaves the EMA of a parameter that never
changes bitwise equal to it.

Determinism: the step's random key is ``fold_in(base_key, step)`` and the data order is a
function of (seed, step) (see `lees_jax.data`), so a run killed at any moment and restarted
from its latest checkpoint ends bitwise identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lees_jax import ase
from lees_jax import checkpoints
from lees_jax import cost
from lees_jax import data
from lees_jax import diffusion
from lees_jax import files
from lees_jax import gates as gating
from lees_jax import policies
from lees_jax import models

Pytree = Any
GATES_FILE = policies.GATES_FILE
CHECKPOINT_DIR = 'checkpoints'


class TrainingDivergedError(FloatingPointError):
  """A loss or gradient became NaN/inf; nothing was saved after the last good checkpoint."""


# ---------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Objective:
  """What is trained, with which loss and optimiser (see the module docstring)."""
  name: str
  section: ml_collections.ConfigDict  # batch_size, log_every, checkpoint_every, keep_checkpoints
  num_train_steps: int
  init_trainable: Callable[[jax.Array], Pytree]
  frozen: Pytree
  loss_fn: Callable[[Pytree, Pytree, dict, jax.Array], tuple[jax.Array, dict]]
  optimizer: optax.GradientTransformation
  ema_decay: float | None = None
  random_flip: bool = False
  # Host-side hooks (called on every process; only process 0 writes).
  host_scalars: Callable[[dict], dict[str, float]] = lambda state: {}
  images: Callable[[dict], dict[str, np.ndarray]] = lambda state: {}
  image_every: int = 0
  finish: Callable[[dict, str], None] = lambda state, workdir: None
  describe: str = ''
  # Given trainable values (e.g. a loaded backbone): passed to the jitted init as arguments
  # rather than closed over (a closed-over array becomes an HLO constant); init_trainable is
  # then not called.
  initial_trainable: Pytree | None = None
  # loss_fn(trainable, frozen, batch, rng, step=<traced int32 step>) for step-dependent losses.
  loss_takes_step: bool = False


def partition(params: Pytree, is_trainable: Callable[[tuple[str, ...], Any], bool]
              ) -> tuple[dict, dict]:
  """Splits a nested dict into (trainable, frozen) by a predicate on (path, leaf)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  trainable = {k: v for k, v in flat.items() if is_trainable(k, v)}
  frozen = {k: v for k, v in flat.items() if k not in trainable}
  return (flax.traverse_util.unflatten_dict(trainable) if trainable else {},
          flax.traverse_util.unflatten_dict(frozen) if frozen else {})


def merge(trainable: Pytree, frozen: Pytree) -> dict:
  """Inverse of `partition`."""
  flat = dict(flax.traverse_util.flatten_dict(flax.core.unfreeze(frozen)))
  flat.update(flax.traverse_util.flatten_dict(flax.core.unfreeze(trainable)))
  return flax.traverse_util.unflatten_dict(flat)


def draw_t_noise(rng: jax.Array, x0: jax.Array, num_timesteps: int):
  """The per-example diffusion timestep t ~ U{0..T-1} and noise eps ~ N(0, I) of a step."""
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, num_timesteps)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  return t, noise


def _num_steps(section, data_config) -> int:
  if section.get('num_train_steps', -1) > 0:
    return int(section.num_train_steps)
  epochs = section.get('num_epochs', -1.0)
  if epochs <= 0:
    raise ValueError('set num_train_steps > 0 or num_epochs > 0')
  n = data.num_examples(data_config)
  return max(1, int(math.floor(epochs * n / section.batch_size)))


def sampler_timesteps(config) -> list[int]:
  """Original timesteps of the configured sampler, ascending: the solver's own grid (50-step
  respaced DDPM in the paper, ``ddim<steps>`` spacing for DDIM), so that the hard masks, ratios
  and FLOP fractions a gate run reports are those the sampler will run."""
  from lees_jax import samplers  # pylint: disable=g-import-not-at-top
  solver = samplers.solver_from_config(config.diffusion, config.sampler)
  return sorted(int(t) for t in solver.timesteps)


def pretrain_objective(config) -> Objective:
  """DDPM eps-prediction on the whole UNet: Adam, linear warm-up, clipping, EMA, dropout."""
  pc = config.pretrain
  model = models.build_model(config.model)
  schedule = diffusion.schedule_from_config(config.diffusion)
  T = schedule.num_steps
  lr = optax.linear_schedule(0.0, pc.learning_rate, max(1, pc.warmup_steps)) \
      if pc.warmup_steps > 0 else optax.constant_schedule(pc.learning_rate)
  parts = [optax.clip_by_global_norm(pc.grad_clip)] if pc.grad_clip > 0 else []
  optimizer = optax.chain(*parts, optax.adam(lr, b1=pc.get('b1', 0.9), b2=pc.get('b2', 0.999)))

  def init_trainable(rng):
    return models.init_params(model, rng)

  def loss_fn(params, frozen, batch, rng):
    del frozen
    x0 = batch['image']
    t, noise = draw_t_noise(rng, x0, T)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    eps = model.apply({'params': params}, x_t, t, train=True,
                      rngs={'dropout': jax.random.fold_in(rng, 2)})
    mse = diffusion.eps_mse(eps, noise).mean()
    return mse, {'mse': mse}

  def host_scalars(state):
    return {'learning_rate': float(lr(int(state['step'])))}

  def finish(state, workdir):
    _export_backbone(workdir, 'pretrain', state, jax.device_get(state['ema_params']), config,
                     source='lees_jax pretrain', ema_decay=float(pc.ema_decay))

  return Objective(
      name='pretrain', section=pc, num_train_steps=_num_steps(pc, config.data),
      init_trainable=init_trainable, frozen={}, loss_fn=loss_fn, optimizer=optimizer,
      ema_decay=float(pc.ema_decay), random_flip=bool(config.data.random_flip),
      host_scalars=host_scalars, finish=finish,
      describe=f'DDPM pretraining of a {config.model.name} (lr {pc.learning_rate}, '
               f'warm-up {pc.warmup_steps}, clip {pc.grad_clip}, EMA {pc.ema_decay})')


def _export_backbone(workdir: str, mode: str, state: dict, params: Pytree, config,
                     **metadata) -> str | None:
  """Writes ``params`` (EMA parameters) as the backbone directory ``<workdir>/backbone``.

  Atomic (checkpoints.save_backbone); a gs:// workdir is written locally, then copied up.
  Returns the path, or None in a multi-process run (see below).
  """
  step = int(state['step'])
  if jax.process_count() > 1:
    # checkpoints.save_backbone's orbax checkpointer synchronises all processes, so it cannot
    # run on process 0 alone; the EMA parameters are safe in the last checkpoint.
    if jax.process_index() == 0:
      print(f'multi-process run: the EMA parameters are in the step-{step} '
            f'checkpoint under {files.join(workdir, CHECKPOINT_DIR, mode)}. Export them to '
            f'{files.join(workdir, "backbone")} by running the same {mode} command once in a single '
            'process (it restores the final checkpoint, trains no further and exports).',
            flush=True)
    return None
  target = files.join(workdir, 'backbone')
  local = tempfile.mkdtemp(prefix='lees_backbone_') if files.is_remote(workdir) else None
  with _quiet():
    path = checkpoints.save_backbone(
        os.path.join(local, 'backbone') if local else target, params, config.model,
        diffusion_config=config.diffusion, overwrite=True, step=step, seed=int(config.seed),
        params_kind='ema', **metadata)
  if local:  # gs://...: written locally (atomically), then copied up
    files.copy_tree(path, target, replace=True)
    shutil.rmtree(local, ignore_errors=True)
    path = target
  print(f'exported EMA parameters (step {step}) to {path}', flush=True)
  return path


def gate_loss_fn(model, schedule: diffusion.Schedule, lam: float, hard: bool):
  """LEES loss: eps-MSE with gated units + lam * mean over batch and units of sigmoid(logits)."""
  T = schedule.num_original_timesteps

  def loss_fn(gate_params, backbone, batch, rng):
    x0 = batch['image']
    t, noise = draw_t_noise(rng, x0, schedule.num_steps)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    logits = policies.gate_logits(gate_params, policies.normalized_time(t, T))  # (B, K)
    form = gating.StraightThrough(logits) if hard else gating.SoftGates(logits)
    eps = model.apply({'params': backbone}, x_t, t, gates=form, train=False)
    mse = diffusion.eps_mse(eps, noise).mean()
    gate_mean = jax.nn.sigmoid(logits).mean()
    loss = mse + lam * gate_mean
    return loss, {'mse': mse, 'gate_mean': gate_mean, 'reg': lam * gate_mean,
                  'hard_gate_mean': (logits > 0).astype(jnp.float32).mean()}

  return loss_fn


def _read_backbone(path: str, model_config) -> tuple[Pytree, str]:
  """(params, backbone directory) of a local or gs:// backbone checked against config.model.

  Fails (naming the path and what was expected) before anything touches the workdir.
  """
  source = _localize_backbone(path) if files.is_remote(path) else path
  with _quiet():
    _, params = checkpoints.load_backbone_params(source, expected_model_config=model_config)
  backbone_dir = checkpoints.find_backbone_dir(source)
  if source != path:
    shutil.rmtree(os.path.dirname(source), ignore_errors=True)
    backbone_dir = path
  return params, backbone_dir


def gates_objective(config, backbone: Pytree | None = None) -> Objective:
  """LEES: alpha, beta per unit on a frozen backbone (its EMA params); Adam on the gates only.

  The backbone is read from ``config.gates.backbone`` unless ``backbone`` params are given
  (benchmarks, tests).
  """
  gc = config.gates
  if gc.form not in ('hard', 'soft'):
    raise ValueError(f"config.gates.form must be 'hard' or 'soft', got {gc.form!r}")
  if backbone is None:
    backbone, backbone_dir = _read_backbone(gc.backbone, config.model)
  else:
    backbone_dir = '<given parameters>'
  model = models.build_model(config.model)
  unit_names = [u.name for u in model.units]
  K = len(unit_names)
  schedule = diffusion.schedule_from_config(config.diffusion)
  T = schedule.num_steps
  timesteps = sampler_timesteps(config)
  model_cost = cost.model_cost(model)
  optimizer = optax.adam(gc.learning_rate, b1=gc.b1, b2=gc.b2)

  def hard_stats(params):
    policy = policies.LeesPolicy.from_params(jax.device_get(params), form='hard')
    masks = policy.step_masks(timesteps, T, K)
    return policy, masks, policies.executed_block_ratio(masks), model_cost.flop_fraction(masks)

  def host_scalars(state):
    params = jax.device_get(state['params'])
    _, _, ratio, flops = hard_stats(params)
    out = {'executed_ratio': ratio, 'flop_fraction': flops}
    for k, name in enumerate(unit_names):
      out[f'alpha/{k:02d}_{name}'] = float(params['alpha'][k])
      out[f'beta/{k:02d}_{name}'] = float(params['beta'][k])
    return out

  def images(state):
    if jax.process_index() != 0:
      return {}
    from lees_jax import report  # pylint: disable=g-import-not-at-top
    params = jax.device_get(state['params'])
    img = report.gate_heatmap(policies.LeesPolicy.from_params(params, form=gc.form), unit_names,
                              num_timesteps=T, timesteps=timesteps,
                              title=f'LEES gates, step {int(state["step"])} '
                                    f'(lam={gc.lam}, {gc.form}; dots: executed at sampler steps)')
    return {'gates/heatmap': img}

  def finish(state, workdir):
    if jax.process_index() != 0:
      return
    params = jax.device_get(state['params'])
    policy, masks, ratio, flops = hard_stats(params)
    summary = {
        'format': 'lees_jax.gates', 'version': 1,
        'alpha': [float(a) for a in np.asarray(params['alpha'])],
        'beta': [float(b) for b in np.asarray(params['beta'])],
        'units': unit_names, 'lam': float(gc.lam), 'form': gc.form,
        'step': int(state['step']), 'seed': int(config.seed),
        'executed_block_ratio': ratio, 'flop_fraction': flops,
        'sampler': {'name': config.sampler.name, 'steps': len(timesteps),
                    'timesteps': [int(t) for t in timesteps]},
        'num_timesteps': T, 'backbone': backbone_dir,
        'hard_masks': np.asarray(masks, int).tolist(),
        'policy': policies.LeesPolicy.from_params(params, form=gc.form).to_dict(),
        'config': config.to_dict(),
    }
    del policy
    files.write_json(files.join(workdir, GATES_FILE), summary)
    print(f'gates: executed-block ratio {ratio:.3f}, FLOP fraction {flops:.3f} on the '
          f'{len(timesteps)}-step sampler; wrote {files.join(workdir, GATES_FILE)}', flush=True)

  return Objective(
      name='train_gates', section=gc, num_train_steps=_num_steps(gc, config.data),
      init_trainable=lambda rng: policies.init_gate_params(K), frozen=backbone,
      loss_fn=gate_loss_fn(model, schedule, float(gc.lam), gc.form == 'hard'),
      optimizer=optimizer, ema_decay=None, random_flip=False,  # paper: no augmentation
      host_scalars=host_scalars, images=images, image_every=int(gc.get('heatmap_every', 0)),
      finish=finish,
      describe=f'LEES gate training: {K} units, lam={gc.lam}, {gc.form} gates, backbone '
               f'{backbone_dir}')


# ---------------------------------------------------------------------------
# ASE fine-tuning (Moon et al. 2024, §3.3 and Appendix A.2): the backbone under a fixed schedule.
# ---------------------------------------------------------------------------

ASE_SCHEDULE_FILE = 'ase_schedule.json'
ASE_REWEIGHTS = ('none', 'paper')


def resolve_ase_schedule(spec: str, units, config=None) -> policies.SchedulePolicy:
  """``config.ase_ft.schedule`` -> the fixed schedule the backbone is fine-tuned under.

  Accepted specs:
    ase_default | D2 | D3 | D4 | D7   a Table 5 row mapped to the UNet (`ase.named_schedule`);
    ase_s<start>_f<final>             a drop-length grid point by name (`ase.GridPoint.name`,
                                      e.g. ase_s2_f0.57), from the default grid or the one in
                                      config.ase (grid_starts x grid_finals);
    <path/grid.jsonl>[@budget]        the best-FID schedule of an `ase_grid` run within a FLOP
                                      budget (default config.eval.ase_budget), as evaluate's
                                      ``ase_grid:`` policy picks it;
    <path.json>                       a schedule written as a policy dict ({"matrix": (K, n)
                                      0/1 rows, "name": ...}), e.g. another run's
                                      ase_schedule.json: custom schedules.
  """
  spec = str(spec).strip()
  named = ['ase_default', *sorted(ase.D_FRACTIONS)]
  if spec in named:
    return ase.named_schedule(spec, units)
  grid = list(ase.drop_grid())
  if config is not None and 'ase' in config:
    grid += ase.drop_grid(config.ase.grid_starts, config.ase.grid_finals)
  points = {p.name: p for p in grid}
  if spec in points:
    return ase.grid_policy(points[spec], units)
  path, _, budget = spec.partition('@')
  if path.endswith('.jsonl') or path.endswith('.json'):
    if not files.isfile(path):
      raise FileNotFoundError(f'config.ase_ft.schedule={spec!r}: no file at {path!r}')
    if path.endswith('.jsonl'):
      records = files.read_json_lines(path)
      default_budget = config.eval.ase_budget if config is not None and 'eval' in config else 0.75
      best = ase.pick_for_budget(records, float(budget) if budget else float(default_budget))
      return ase.grid_policy(ase.GridPoint(int(best['start']), float(best['final'])), units)
    d = files.read_json(path)
    if 'matrix' not in d:
      raise ValueError(f'config.ase_ft.schedule={spec!r}: {path} has no "matrix" (a (units, '
                       'intervals) 0/1 keep matrix)')
    policy = policies.SchedulePolicy(np.asarray(d['matrix'], bool),
                                   name=d.get('name', os.path.splitext(os.path.basename(path))[0]))
    if policy.matrix.shape[0] != len(units):
      raise ValueError(f'config.ase_ft.schedule={spec!r}: the matrix has {policy.matrix.shape[0]} '
                       f'rows but the model has {len(units)} gateable units')
    return policy
  raise ValueError(
      f'unknown ASE schedule config.ase_ft.schedule={spec!r}; use one of {named}, a grid point '
      f'name ({", ".join(sorted(points))}), <grid.jsonl>[@budget] from an ase_grid run, or a '
      '.json file holding a schedule matrix')


def ase_time_weight(t, num_timesteps: int, step, reweight: str = 'paper', coef: float = 1.0,
                    reweight_steps: int = 0):
  """The ASE loss coefficient lambda(t) for integer timesteps ``t`` at optimiser step ``step``.

  What the paper says (§3.3, Algorithm 1): fine-tuning should change little near t -> 0 and
  learn what the dropped blocks leave unseen near t -> 1, so "we apply a higher coefficient to
  the lambda(t) term"; "once the model's performance appears to have plateaued, we adjust the
  lambda(t) value back to 1". Algorithm 1 takes a "time-dependent coefficient lambda(t)" and a
  "re-weighting cycle C" but gives neither; the released code implements lambda(t) = 1 only.

  What we implement (t_n = (t + 1) / T in (0, 1], the gates' normalised time):
    reweight='none':  lambda(t) = 1                                   (the released code)
    reweight='paper': lambda(t) = 1 + coef * t_n  while step < reweight_steps (the cycle C),
                      then 1.
  The linear ramp is our reading: it is 1 at the data end (no extra push where every unit runs)
  and 1 + coef at the noise end, where the schedule drops the most units; it needs no knowledge
  of the schedule, and coef = 0 or reweight_steps = 0 recovers lambda = 1.
  """
  t_n = policies.normalized_time(t, num_timesteps)
  if reweight == 'none':
    return jnp.ones_like(t_n)
  if reweight == 'paper':
    return jnp.where(jnp.asarray(step) < reweight_steps, 1.0 + coef * t_n, jnp.ones_like(t_n))
  raise ValueError(f'config.ase_ft.reweight must be one of {ASE_REWEIGHTS}, got {reweight!r}')


def _is_time_embedding(path: tuple[str, ...]) -> bool:
  return path[0].startswith('temb_dense')


def ase_objective(config, backbone: Pytree | None = None) -> Objective:
  """ASE fine-tuning: the backbone (its EMA params) trained under a fixed ASE schedule.

  Every example runs the network as the sampler would at its timestep: the schedule's keep
  column for the example's interval becomes the fixed per-example mask `gates.ExampleMask`, so a dropped unit contributes exactly its skip path (identity, or the 1x1
  shortcut of a ResBlock that changes channels -- that projection runs and is trained) and gets
  exactly zero gradient from that example. Loss: mean_i lambda(t_i) ||eps - eps_theta||^2 with
  `ase_time_weight` (the DDPM UNet predicts eps only, so the paper's hybrid loss reduces to
  this). AdamW, constant (or cosine) learning rate, dropout as in pretraining
  (config.model.dropout), EMA from the loaded parameters. With
  ``config.ase_ft.freeze_time_embedding`` the temb_dense_* layers are frozen (not in the
  trainable partition, never updated). ``backbone`` params replace config.ase_ft.backbone
  (tests, benchmarks).
  """
  ac = config.ase_ft
  if ac.reweight not in ASE_REWEIGHTS:
    raise ValueError(f'config.ase_ft.reweight must be one of {ASE_REWEIGHTS}, got {ac.reweight!r}')
  if ac.lr_schedule not in ('constant', 'cosine'):
    raise ValueError(f"config.ase_ft.lr_schedule must be 'constant' or 'cosine', got {ac.lr_schedule!r}")
  model = models.build_model(config.model)
  units = model.units
  unit_names = [u.name for u in units]
  K = len(units)
  policy = resolve_ase_schedule(ac.schedule, units, config)  # before the backbone is read
  if backbone is None:
    params, backbone_dir = _read_backbone(ac.backbone or config.gates.backbone, config.model)
  else:
    params, backbone_dir = backbone, '<given parameters>'
  params = jax.tree_util.tree_map(np.asarray, flax.core.unfreeze(params))
  freeze = bool(ac.freeze_time_embedding)
  trainable, frozen = partition(params, lambda path, leaf: not (freeze and _is_time_embedding(path)))
  schedule = diffusion.schedule_from_config(config.diffusion)
  T = schedule.num_steps
  keep_table = policy.step_masks(np.arange(T), T, K)  # (T, K): unit k runs at timestep t
  num_steps = _num_steps(ac, config.data)
  lr = (optax.cosine_decay_schedule(ac.learning_rate, num_steps) if ac.lr_schedule == 'cosine'
        else optax.constant_schedule(ac.learning_rate))
  parts = [optax.clip_by_global_norm(ac.grad_clip)] if ac.grad_clip > 0 else []
  optimizer = optax.chain(*parts, optax.adamw(lr, b1=ac.b1, b2=ac.b2,
                                              weight_decay=ac.weight_decay))
  reweight, coef, rw_steps = ac.reweight, float(ac.reweight_coef), int(ac.reweight_steps)

  def loss_fn(trainable, frozen, batch, rng, step):
    x0 = batch['image']
    t, noise = draw_t_noise(rng, x0, T)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    keep = jnp.asarray(keep_table)[t]  # (B, K)
    eps = model.apply({'params': merge(trainable, frozen)}, x_t, t,
                      gates=gating.ExampleMask(keep), train=True,
                      rngs={'dropout': jax.random.fold_in(rng, 2)})
    per_example = diffusion.eps_mse(eps, noise)
    lam = ase_time_weight(t, T, step, reweight, coef, rw_steps)
    loss = jnp.mean(lam * per_example)
    return loss, {'mse': per_example.mean(), 'lambda_mean': lam.mean(),
                  'kept_fraction': keep.astype(jnp.float32).mean()}

  timesteps = sampler_timesteps(config)
  masks = policy.step_masks(timesteps, T, K)
  ratio = policies.executed_block_ratio(masks)
  flops = cost.model_cost(model).flop_fraction(masks)

  def host_scalars(state):
    return {'learning_rate': float(lr(int(state['step']))), 'executed_ratio': ratio,
            'flop_fraction': flops}

  def finish(state, workdir):
    ema = jax.device_get(state['ema_params'])
    schedule_meta = {'name': policy.name, 'matrix': policy.matrix.astype(int).tolist()}
    path = _export_backbone(
        workdir, 'ase_finetune', state, merge(ema, frozen), config,
        source='lees_jax ase_finetune', ema_decay=float(ac.ema_decay),
        base_backbone=backbone_dir, ase_schedule=schedule_meta)
    if jax.process_index() != 0:
      return
    summary = {
        'format': 'lees_jax.ase_schedule', 'version': 1, **policy.to_dict(),
        'spec': str(ac.schedule), 'units': unit_names, 'num_timesteps': T,
        'executed_block_ratio': ratio, 'flop_fraction': flops,
        'sampler': {'name': config.sampler.name, 'steps': len(timesteps),
                    'timesteps': [int(t) for t in timesteps]},
        'backbone': path, 'base_backbone': backbone_dir, 'step': int(state['step']),
        'seed': int(config.seed), 'config': config.to_dict(),
    }
    files.write_json(files.join(workdir, ASE_SCHEDULE_FILE), summary)
    print(f'ase_finetune: schedule {policy.name} executes {ratio:.3f} of the blocks '
          f'({flops:.3f} of the FLOPs) on the {len(timesteps)}-step sampler; wrote '
          f'{files.join(workdir, ASE_SCHEDULE_FILE)}', flush=True)

  n_train = models.count_params(trainable)
  return Objective(
      name='ase_finetune', section=ac, num_train_steps=num_steps,
      init_trainable=lambda rng: trainable, initial_trainable=trainable, frozen=frozen,
      loss_fn=loss_fn, loss_takes_step=True, optimizer=optimizer,
      ema_decay=float(ac.ema_decay), random_flip=bool(config.data.random_flip),
      host_scalars=host_scalars, finish=finish,
      describe=f'ASE fine-tuning under schedule {policy.name} (executed blocks {ratio:.3f}): '
               f'{n_train:,} trainable parameters'
               + (' (time embedding frozen)' if freeze else '')
               + f', AdamW lr {ac.learning_rate} ({ac.lr_schedule}), wd {ac.weight_decay}, '
               f'EMA {ac.ema_decay}, lambda(t) {reweight}'
               + (f' (1 + {coef} t for {rw_steps} steps)' if reweight == 'paper' else '')
               + f', backbone {backbone_dir}')


def load_ase_finetuned(workdir: str, expected_model_config=None
                       ) -> tuple[Pytree, policies.SchedulePolicy]:
  """(EMA params, schedule) of a finished ``ase_finetune`` run.

  ``workdir`` is the run's workdir or its ``backbone`` directory; the schedule is read from
  the backbone's metadata (``ase_schedule``), so the pair always travels together.
  ``expected_model_config`` (a config.model or a `models.UNetSpec`) is checked, dropout aside.
  """
  try:
    meta = checkpoints.read_backbone_meta(workdir)
  except checkpoints.BackboneError as e:
    raise FileNotFoundError(f'no ASE fine-tuned backbone at {workdir!r}: expected the backbone/ '
                            'that a finished `--config.mode=ase_finetune` run writes into its '
                            f'workdir ({e})') from e
  if 'ase_schedule' not in meta:
    raise ValueError(f'the backbone at {checkpoints.find_backbone_dir(workdir)} has no ASE schedule '
                     '(ase_schedule in backbone.json): it was not written by ase_finetune')
  want = expected_model_config
  with _quiet():
    model_config, params = checkpoints.load_backbone_params(
        workdir, None if isinstance(want, models.UNetSpec) or want is None else want)
  if isinstance(want, models.UNetSpec):
    have = models.UNetSpec.from_config(model_config)
    if dataclasses.replace(have, dropout=0.0) != dataclasses.replace(want, dropout=0.0):
      raise checkpoints.BackboneError(
          f'the ASE fine-tuned backbone at {workdir} ({have}) does not match the model ({want})')
  sched = meta['ase_schedule']
  return params, policies.SchedulePolicy(np.asarray(sched['matrix'], bool), name=sched['name'])


OBJECTIVES = {'pretrain': pretrain_objective, 'train_gates': gates_objective,
              'ase_finetune': ase_objective}


# ---------------------------------------------------------------------------
# Files (local paths or gs://, through `lees_jax.files`).
# ---------------------------------------------------------------------------


def _localize_backbone(path: str) -> str:
  """Copies a remote (gs://) backbone directory to a local temporary directory."""
  for cand in (path, f'{path.rstrip("/")}/backbone'):
    if files.exists(files.join(cand, checkpoints.META_FILE)):
      local = os.path.join(tempfile.mkdtemp(prefix='lees_backbone_'), 'backbone')
      files.copy_tree(cand, local)
      return local
  raise checkpoints.BackboneError(
      f'no backbone checkpoint at {path!r}: expected {checkpoints.META_FILE} and params/ in it or '
      f'in {path.rstrip("/")}/backbone')


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


@contextlib.contextmanager
def _quiet():
  """Orbax logs every save at INFO level; keep the console to our progress lines."""
  level = logging.get_verbosity()
  logging.set_verbosity(min(level, logging.WARNING))  # absl: larger is more verbose
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _checkpoint_manager(workdir: str, objective: Objective):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(
      max_to_keep=int(objective.section.get('keep_checkpoints', 3)), create=True,
      enable_async_checkpointing=False, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(files.join(workdir, CHECKPOINT_DIR, objective.name), options=options)


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
  with _quiet():
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
  batches = data.train_iterator(config.data, global_batch_size=global_batch, seed=config.seed,
                                start_step=start, random_flip=objective.random_flip)
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
      with _quiet():
        _save(manager, state, done)
  with _quiet():
    manager.wait_until_finished()
  writer.flush()
  objective.finish(state, workdir)  # idempotent: a restarted finished run rewrites the same files
  writer.close()
  with _quiet():
    manager.close()
  return state


def run_objective(name: str, config, workdir: str, *, mesh=None) -> dict:
  objective = OBJECTIVES[name](config)  # validates inputs before the workdir is touched
  return train(config, workdir, objective, mesh=mesh)


def pretrain(config, workdir: str):
  """``config.mode=pretrain``: DDPM training; exports EMA params to ``<workdir>/backbone``."""
  return run_objective('pretrain', config, workdir)


def train_gates(config, workdir: str):
  """``config.mode=train_gates``: LEES gates on the frozen ``config.gates.backbone``."""
  return run_objective('train_gates', config, workdir)


def ase_finetune(config, workdir: str):
  """``config.mode=ase_finetune``: the backbone fine-tuned under ``config.ase_ft.schedule``;
  exports ``<workdir>/backbone`` (EMA params + schedule) and ``<workdir>/ase_schedule.json``."""
  return run_objective('ase_finetune', config, workdir)
