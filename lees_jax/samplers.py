"""Samplers that really skip blocks: a solver and a gate policy compiled into one program.

A sampler is a *solver* (`lees_jax.solvers`: the update rule of one step, respaced DDPM, DDIM or
DPM-Solver++(2M), with its per-step coefficients precomputed in float64) plus a *gate policy*.
`compile_sampler` turns both into one jitted program ``fn(params, rng) -> x0`` along one of four
paths:

* ``'segments'`` -- the policy's per-step masks are grouped into segments (runs of steps
  with one mask); the program holds one ``fori_loop`` per segment whose model call gets a
  `gates.StaticMask`, so skipped units are absent from that loop's compiled code;
* ``'cond'`` -- one ``fori_loop`` over all steps; the (steps, K) mask matrix is a traced
  input and every unit sits behind ``lax.cond`` (one compilation for any mask);
* ``'stacked'`` -- for a backbone whose units are stacks of identical blocks
  (``model.stack``, `lees_jax.models.stacked.Stack`: DiT's one stack, U-ViT's two linked by
  the long skips): each stack's block parameters are stacked on a leading depth axis (once, by
  ``program.prepare_params``, or inside the program at each call from ordinary params), and
  each step's model call runs, per stack, a loop over only that step's kept block indices
  (from the traced (steps, K) mask matrix, as 'cond'), dynamic-indexing the stacked
  parameters: one compilation for any mask, one block body per stack in the program, no
  ``lax.cond``, nothing computed for a skipped block (beyond what the backbone's skip keeps:
  a U-ViT out-block's skip linear);
* ``'soft'`` -- soft LEES gates: every unit runs and is blended with its skip by g(t).

A *reusing* policy (`lees_jax.reuse`: DeepCache, per-step action matrices) samples on
'segments' only: its segments are runs of steps with one action vector, each step's model call
gets a `gates.ReuseUnits`, and the outputs of the reused units ride in the loop state from the
step at which they last ran (`reuse.sample_segments`); a reused unit is absent from the step.

The gate forms (`lees_jax.gates`) carry each path into the backbone; the policy
(`lees_jax.policies`) says which units run at which step.

Every path uses the same step function, step index ``i`` and per-step noise key
``fold_in(rng, i)``, so the paths give the same samples for the same key and gates.

A class-conditional backbone (``model.conditioning`` set, e.g. DiT) samples labels ``y``:
``program(params, rng, y)`` with y (batch,) given, or ``program(params, rng)`` with labels
drawn uniformly from the classes by the rng (`draw_labels`; DiT's evaluation protocol, fixed per
key: ``program.labels(rng)`` says which). With ``guidance_scale`` s != 1 every step is
classifier-free guidance (`guide`): the batch runs once with its labels and once with the null
label, as one forward pass of twice the batch under the step's one gate form -- so both halves
run exactly the same units -- and eps = eps_null + s (eps_label - eps_null). s = 1 runs the
labelled batch alone (no guidance; what DiT's scripts do at 1).

A *partial* program (``compile_sampler(..., start_step=i0)``, a `PartialSampleProgram`) runs
only steps i0, ..., S-1 from a given x at the solver's timestep of step i0 (SDEdit-style
denoising of noised inputs; `start_step` picks i0, `noise_to_step` makes that x):
``fn(params, rng, x_init) -> x0``. It keeps the absolute step index and the per-step keys of
the full program, so from the full program's state at step i0 it continues that trajectory.

Time runs from noise to data: sampler step i = 0 is the noisiest timestep.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lees_jax import cost as cost_lib
from lees_jax import gates as gating
from lees_jax import policies
from lees_jax import reuse as reuse_lib
from lees_jax.models import backbone
# The solvers live in `lees_jax.solvers`; their names are part of this module's interface.
from lees_jax.solvers import (SAMPLERS, VARIANCES, Solver, make_solver,  # noqa: F401
                              noise_to_step, solver_from_config, start_step)

PATHS = ('segments', 'cond', 'stacked', 'soft')
HARD_PATHS = ('segments', 'cond', 'stacked')  # 'stacked' only for backbones with model.stack
# Labels drawn by a program come from fold_in(rng, LABEL_STREAM): apart from the split that
# gives x_T and the step keys, so drawing labels changes no noise of an unconditional program.
LABEL_STREAM = 0x6C61626C  # 'labl'


# ---------------------------------------------------------------------------
# Compiled programs.
# ---------------------------------------------------------------------------


def to_host(x) -> np.ndarray:
  """A program's output as numpy on this process: the whole global batch, gathered from every
  process when it is sharded across several (each process then holds the same array)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def draw_labels(rng, batch_size: int, num_classes: int) -> jax.Array:
  """The labels a program draws from its key ``rng`` when none are given: uniform over
  [0, num_classes) (the null class never), one per image (DiT's sample_ddp.py protocol)."""
  return jax.random.randint(jax.random.fold_in(rng, LABEL_STREAM), (batch_size,), 0, num_classes,
                            jnp.int32)


def guide(eps_label, eps_null, scale: float, channels: int | None = None):
  """Classifier-free guidance: eps_null + scale (eps_label - eps_null) on the first ``channels``
  channels (NHWC, last axis; None = every channel), the labelled eps on the others.

  None is the standard rule and diffusers' DiTPipeline's. DiT's released ``forward_with_cfg``
  guides only the first 3 of its 4 latent channels ("for exact reproducibility reasons", its
  comment says; REFERENCE §9): ``channels=3`` reproduces that sampler.
  """
  guided = eps_null + scale * (eps_label - eps_null)
  if channels is None or channels >= eps_label.shape[-1]:
    return guided
  return jnp.concatenate([guided[..., :channels], eps_label[..., channels:]], axis=-1)


@dataclasses.dataclass(eq=False)
class SampleProgram:
  """A compiled sampler for one policy: ``program(params, rng[, y]) -> x0`` (float32 NHWC,
  [-1, 1]); ``y`` (batch,) the labels of a conditional backbone, drawn from rng when None."""
  jitted: Callable[..., jax.Array]
  operand: jax.Array                 # the traced per-step masks / logits (empty for segments)
  path: str
  policy: policies.Policy
  masks: np.ndarray                  # (steps, K) executed units per step
  segments: list[policies.Segment]
  block_ratio: float                 # executed (step, unit) pairs / all
  flop_fraction: float               # executed FLOPs / full model FLOPs, per model call
  batch_size: int
  sampler: str = ''                  # the solver, e.g. 'ddpm, 50 steps, variance fixed_large'
  conditioning: backbone.ClassConditioning | None = None
  guidance_scale: float = 1.0        # != 1: classifier-free guidance (two halves per call)
  prepare: Callable | None = None    # 'stacked': params -> the stacked layout (jitted)

  def labels(self, rng) -> jax.Array | None:
    """The labels ``program(params, rng)`` samples (None for an unconditional backbone)."""
    if self.conditioning is None:
      return None
    return draw_labels(rng, self.batch_size, self.conditioning.num_classes)

  def _args(self, *leading, y=None) -> tuple:
    """The jitted function's arguments: labels appended only when given, so that a call
    without them is the program of an unconditional sampler (``lower(...).compile()`` then
    takes ``(params, rng, operand)``, as benchmarks/sampling.py calls it)."""
    labels = self._checked_labels(y)
    return leading + (self.operand,) + (() if labels is None else (labels,))

  def _checked_labels(self, y):
    """None stays None (drawn in the program); given labels must be (batch,) ints in
    [0, num_classes] (the null class allowed: an unconditional sample), [0, num_classes - 1]
    for a backbone without a null class."""
    if y is None:
      return None
    if self.conditioning is None:
      raise ValueError('this program samples an unconditional backbone: it takes no labels')
    y = np.asarray(y)
    n = self.conditioning.num_classes
    if y.shape != (self.batch_size,) or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f'labels must be {self.batch_size} integers, got {y.dtype} {y.shape}')
    top, which = ((n - 1, 'no null class') if self.conditioning.null_class is None
                  else (n, f'{n} = the null class'))
    if y.min() < 0 or y.max() > top:
      raise ValueError(f'labels must lie in [0, {top}] ({which}), got [{y.min()}, {y.max()}]')
    return jnp.asarray(y, jnp.int32)

  def prepare_params(self, params):
    """The params as this program runs them fastest, to make once and pass to every call:
    the 'stacked' path's stacked layout (`lees_jax.models.backbone.Stack.prepare`; ordinary
    params work too, stacked inside the program at each call, a copy of every block); other
    paths' params as they are."""
    return params if self.prepare is None else self.prepare(params)

  def __call__(self, params, rng, y=None):
    return self.jitted(*self._args(params, rng, y=y))

  def lower(self, params, rng, y=None):
    """For compile-time measurement and HLO inspection."""
    return self.jitted.lower(*self._args(params, rng, y=y))


@dataclasses.dataclass(eq=False)
class PartialSampleProgram(SampleProgram):
  """Steps ``start_step``..S-1 only: ``program(params, rng, x_init[, y]) -> x0``, ``x_init`` the
  (batch_size, H, W, C) state at step ``start_step`` (e.g. `noise_to_step`).

  ``masks``, ``block_ratio`` and ``flop_fraction`` count the steps run only; ``segments``
  cover them, numbered by the solver's (absolute) step index.
  """
  start_step: int = 0

  def __call__(self, params, rng, x_init, y=None):  # pylint: disable=arguments-differ
    return self.jitted(*self._args(params, rng, x_init, y=y))

  def lower(self, params, rng, x_init, y=None):  # pylint: disable=arguments-differ
    return self.jitted.lower(*self._args(params, rng, x_init, y=y))


def guidance_from_config(sampler_config) -> dict:
  """`compile_sampler`'s guidance arguments from ``config.sampler``: ``guidance_scale`` (absent:
  1, no guidance) and ``guidance_channels`` (absent or 0: every epsilon channel)."""
  channels = int(sampler_config.get('guidance_channels', 0))
  return dict(guidance_scale=float(sampler_config.get('guidance_scale', 1.0)),
              guidance_channels=channels or None)


def default_path(policy: policies.Policy) -> str:
  return 'soft' if policy.soft else 'segments'


def compile_sampler(model, solver: Solver, policy: policies.Policy, batch_size: int, *,
                    path: str | None = None, mesh: Mesh | None = None,
                    start_step: int | None = None, guidance_scale: float = 1.0,
                    guidance_channels: int | None = None) -> SampleProgram:
  """One jitted program sampling ``batch_size`` images under ``policy``.

  ``path`` is one of `PATHS` (None: 'soft' for a soft policy, else 'segments'); 'stacked'
  needs a backbone with ``model.stack`` (`lees_jax.models.backbone.stack_of` refuses others).
  Its program, like the 'cond' one, takes the (steps, K) mask matrix as its traced operand: one
  compilation serves every policy of the sampler.

  With a ``mesh`` the batch is sharded over its 'batch' axis and params are replicated.
  ``start_step=i0`` gives a `PartialSampleProgram` running steps i0..S-1 from a given x
  (i0 = 0 included: the whole sampler from a given x_T); None, the default, the full sampler
  from its own Gaussian draw.

  A conditional backbone's labels are the program's ``y`` argument or drawn from its key
  (`draw_labels`). ``guidance_scale`` != 1 (conditional backbones only) makes every step
  classifier-free guidance with `guide` on ``guidance_channels`` (None = all epsilon channels;
  3 = DiT's released sampler); the variance v of a 'learned_range' DDPM is then the labelled
  half's, as in DiT's ``forward_with_cfg`` (it guides epsilon only and keeps each half's other
  channels; its samples are the labelled half). A solver that reads v ('learned_range') needs a
  backbone with output 'eps_variance'; other solvers use epsilon only (v is ignored).
  """
  conditioning = model.conditioning
  guidance_scale = float(guidance_scale)
  guided = guidance_scale != 1.0
  if not np.isfinite(guidance_scale):
    raise ValueError(f'guidance_scale must be finite, got {guidance_scale}')
  if guided and conditioning is None:
    raise ValueError(f'guidance_scale {guidance_scale}: classifier-free guidance needs a '
                     f'class-conditional backbone; {type(model).__name__} is unconditional '
                     '(use guidance_scale 1)')
  if guided and conditioning.null_class is None:
    raise ValueError(f'guidance_scale {guidance_scale}: {type(model).__name__} has no null class '
                     '(it was trained without label dropout), so it cannot be guided')
  channels = model.input.shape[-1]
  if guidance_channels is not None and not 1 <= guidance_channels <= channels:
    raise ValueError(f'guidance_channels must be in [1, {channels}] or None (all), got '
                     f'{guidance_channels}')
  if solver.needs_variance and model.output != 'eps_variance':
    raise ValueError(f"sampler variance {solver.variance!r} uses the backbone's learned variance, "
                     f"but {type(model).__name__} outputs {model.output!r} (no variance): choose "
                     "'fixed_large' or 'fixed_small'")
  path = path or default_path(policy)
  if path not in PATHS:
    raise ValueError(f'unknown sampling path {path!r}; choose one of {PATHS}')
  if policy.soft != (path == 'soft'):
    raise ValueError(f"policy {policy.kind!r} ({'soft' if policy.soft else 'hard'}) cannot use path "
                     f"{path!r}: soft gates need path='soft', hard policies one of {HARD_PATHS}")
  if policy.reuses and path != 'segments':
    raise ValueError(f"policy {policy.name!r} reuses cached unit outputs, which only path "
                     f"'segments' carries from step to step; got path {path!r}")
  stack = backbone.stack_of(model, ('segments', 'cond')) if path == 'stacked' else None
  first = 0 if start_step is None else int(start_step)
  if start_step is not None:
    solver = solver.starting_at(first)
  k = model.num_units
  # Actions and masks of every step (the traced operand is indexed by the absolute step), then
  # those run; a reusing policy's segments are runs of one action vector.
  all_actions = policy.step_actions(solver.timesteps, solver.num_original_timesteps, k)
  all_masks = all_actions == gating.RUN
  actions, masks = all_actions[first:], all_masks[first:]
  if policy.reuses:
    reuse_lib.check_actions(actions, [u.name for u in model.units], first)
  cached = reuse_lib.cached_units(actions)
  segments = [policies.Segment(s.start + first, s.stop + first, s.keep, s.actions)
              for s in (policies.segments_from_actions(actions) if policy.reuses
                        else policies.segments_from_masks(masks))]
  mc = cost_lib.model_cost(model)
  shape = (batch_size,) + tuple(model.input.shape)
  if mesh is not None and batch_size % mesh.devices.size:
    raise ValueError(f'batch size {batch_size} is not divisible by the {mesh.devices.size} devices '
                     'of the mesh')
  x_sharding = NamedSharding(mesh, P('batch')) if mesh is not None else None
  # The network's time input per step: the integer timesteps, or a continuous-time solver's
  # own (`Solver.model_times`, e.g. U-ViT's 999 t of the VP SDE, `lees_jax.sde`).
  model_times = (jnp.asarray(solver.timesteps, jnp.int32) if solver.model_times is None
                 else jnp.asarray(solver.model_times, jnp.float32))

  def model_eps(params, x, t, y, gates_arg):
    """(eps, v) of one step: the backbone, or the guided pair of halves."""
    if not guided:
      return backbone.predict_eps(model, params, x, t, y, gates=gates_arg)
    # Both halves in one forward pass of 2B under one gate form: the policy's units of this
    # step run (or are skipped) for the labelled and the null half alike.
    null = jnp.full_like(y, conditioning.null_class)
    eps, v = backbone.predict_eps(model, params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                                  jnp.concatenate([y, null]), gates=gates_arg)
    eps = guide(eps[:batch_size], eps[batch_size:], guidance_scale, guidance_channels)
    return eps, None if v is None else v[:batch_size]

  def step(params, rng, y, i, state, gates_arg):
    x = state[0]
    t = jnp.full((batch_size,), model_times[i], model_times.dtype)
    eps, v = model_eps(params, x, t, y, gates_arg)
    return solver.update(i, state, eps, jax.random.fold_in(rng, i), v)

  def steps(params, rng, y, state, mask_matrix):
    """Steps ``first``..S-1 from ``state`` (step noise keys fold_in(rng, i))."""
    if path == 'stacked':
      params, stacked = stack.split(params)  # either layout; stacked outside the step loop
      state = jax.lax.fori_loop(
          first, solver.num_steps,
          lambda i, s: step(params, rng, y, i, s, backbone.StackMask(stacked, mask_matrix[i])),
          state)
    elif policy.reuses:
      x_first, t_first = state[0], jnp.full((batch_size,), model_times[first], model_times.dtype)
      state = reuse_lib.sample_segments(
          segments, cached, lambda i, s, form: step(params, rng, y, i, s, form),
          lambda form: model_eps(params, x_first, t_first, y, form), state)
    elif path == 'segments':
      for seg in segments:
        mask = gating.StaticMask(seg.keep)
        body = functools.partial(lambda m, i, s: step(params, rng, y, i, s, m), mask)
        state = jax.lax.fori_loop(seg.start, seg.stop, body, state)
    elif path == 'cond':
      state = jax.lax.fori_loop(
          first, solver.num_steps,
          lambda i, s: step(params, rng, y, i, s, gating.CondMask(mask_matrix[i])), state)
    else:
      state = jax.lax.fori_loop(
          first, solver.num_steps,
          lambda i, s: step(params, rng, y, i, s, gating.SoftGates(mask_matrix[i])),
          state)
    return state[0]

  def labels_for(rng, labels):
    if conditioning is None:
      return None  # nothing drawn: an unconditional program is unchanged by labels
    return draw_labels(rng, batch_size, conditioning.num_classes) if labels is None else labels

  def constrain(x):
    return jax.lax.with_sharding_constraint(x, x_sharding) if x_sharding is not None else x

  def run(params, rng, mask_matrix, labels=None):
    y = labels_for(rng, labels)
    init_key, rng = jax.random.split(rng)
    x = constrain(jax.random.normal(init_key, shape, jnp.float32))
    return steps(params, rng, y, solver.init_state(x), mask_matrix)

  def run_from(params, rng, x_init, mask_matrix, labels=None):
    # The same labels and split as `run`, so that the step keys are those of the full program.
    y = labels_for(rng, labels)
    _, rng = jax.random.split(rng)
    if tuple(x_init.shape) != shape:
      raise ValueError(f'x_init has shape {tuple(x_init.shape)}; this program runs {shape}')
    x = constrain(jnp.asarray(x_init, jnp.float32))
    return steps(params, rng, y, solver.init_state(x), mask_matrix)

  if path == 'segments':
    operand = jnp.zeros((0,), bool)  # masks are baked into the program
  elif path in ('cond', 'stacked'):
    operand = jnp.asarray(all_masks)
  else:
    # SoftGates blends each unit by sigmoid(logit) = g_k(t).
    operand = jnp.asarray(policy.step_logits(solver.timesteps, solver.num_original_timesteps, k))
  fn = run if start_step is None else run_from
  jitted = jax.jit(fn, out_shardings=x_sharding) if x_sharding is not None else jax.jit(fn)
  described = solver.describe() + (f', guidance {guidance_scale:g}' if guided else '')
  if guided and guidance_channels is not None and guidance_channels < channels:
    described += f' on {guidance_channels} of {channels} channels'
  fields = (jitted, operand, path, policy, masks, segments, policies.executed_block_ratio(masks),
            mc.flop_fraction_of_actions(actions), batch_size, described, conditioning, guidance_scale)
  prepare = jax.jit(stack.prepare) if stack is not None else None
  if start_step is None:
    return SampleProgram(*fields, prepare=prepare)
  return PartialSampleProgram(*fields, prepare=prepare, start_step=first)
