"""Reuse as a gate form: policies whose units run, skip, or reuse their cached output, and DeepCache.

A *reusing* policy gives every sampler step an action per unit (`lees_jax.gates.ACTIONS`): run
it, skip it (its identity or shortcut, as every masking policy does), reuse the output it
had at the last step at which it ran ('reuse', DeepCache), or add the residual call - skip it
had then to this step's skip ('reuse_residual', Learning-to-Cache: `lees_jax.learned_reuse`).
Its ``step_masks`` still say which units execute, so cost, heat-maps and block ratios read it
like any policy; a reused unit costs 0 FLOPs, a residual-reused one its skip's
(`lees_jax.cost`). The 'segments' sampler (`lees_jax.samplers`) carries the cached outputs of
the reused units in its loop state (`sample_segments`); a reused unit is absent from the
compiled step.

* `StepActionPolicy` -- an explicit (steps, K) action matrix for one sampler length;
* `DeepCachePolicy` -- DeepCache (Ma, Fang & Wang, CVPR 2024), training-free: a full step every
  N steps, and in between only the *shallow branch* -- the units that make the long skips
  0..b and those that consume them -- runs, on the fresh skips and the cached output of the
  deep part (`deepcache`, `shallow_branch`). It reads only the backbone's ``units`` and
  ``skip_connections`` (`lees_jax.models.backbone.SkipConnection`), so it serves the DDPM
  UNet and ADM alike.

Spec strings (`lees_jax.evaluate.resolve_policy`):
  deepcache:<N>[:uniform|:nonuniform][@<branch>]
N >= 1 the interval (1 = every step full), 'uniform' (default: full steps 0, N, 2N, ...) or
'nonuniform' (DeepCache's non-uniform 1:N, `nonuniform_full_steps`), branch b the long skip
(0 = the stem's, the shallowest; default 1, the first encoder block's: DeepCache's
cache_layer_id=0, cache_block_id=0).

What the FLOP fraction does not see: the resampling outside the units is counted as always
run, though at a partial step XLA removes what feeds only reused units, so for a partial step
it is an upper bound.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import gates as gating
from lees_jax import policies
from lees_jax.gates import ACTIONS, REUSE, REUSE_RESIDUAL, RUN, SKIP

KINDS = ('actions', 'deepcache')
SCHEDULES = ('uniform', 'nonuniform')
DEFAULT_BRANCH = 1
# DeepCache's non-uniform schedule as its authors run it on Stable Diffusion (their README:
# pow=1.4, center=15 of 50 steps): the center as a fraction of the steps.
NONUNIFORM_CENTER, NONUNIFORM_POWER = 0.3, 1.4


def action_codes(actions) -> np.ndarray:
  """(steps, K) int8 codes from codes or from the names of `ACTIONS`."""
  a = np.asarray(actions)
  if a.dtype.kind in 'US':
    bad = sorted(set(a.ravel().tolist()) - set(ACTIONS))
    if bad:
      raise ValueError(f'unknown unit actions {bad}; expected {ACTIONS}')
    a = np.vectorize(ACTIONS.index)(a) if a.size else a.astype(int)
  if a.ndim != 2 or (a.size and not np.isin(a, (SKIP, RUN, REUSE, REUSE_RESIDUAL)).all()):
    raise ValueError(f'actions must be (steps, units) codes of {ACTIONS}, got shape {a.shape}')
  return a.astype(np.int8)


def check_actions(actions: np.ndarray, unit_names=None, first_step: int = 0):
  """Refuses a unit reused at step i before it ran at some step < i (nothing to reuse), and
  a unit reused both whole and by its residual (its cache holds one of the two)."""
  actions = action_codes(actions)
  both = np.flatnonzero((actions == REUSE).any(axis=0) & (actions == REUSE_RESIDUAL).any(axis=0))
  if both.size:
    k = int(both[0])
    name = unit_names[k] if unit_names is not None else f'unit {k}'
    raise ValueError(f"{name} (unit {k}) is reused both whole ('reuse') and by its residual "
                     "('reuse_residual'): a unit's cache holds one of the two")
  ran = np.zeros(actions.shape[1], bool)
  for i, row in enumerate(actions):
    early = np.flatnonzero(((row == REUSE) | (row == REUSE_RESIDUAL)) & ~ran)
    if early.size:
      k = int(early[0])
      name = unit_names[k] if unit_names is not None else f'unit {k}'
      raise ValueError(f'{name} (unit {k}) is reused at step {i + first_step} but has not run at '
                       'an earlier step: a unit may reuse only an output it computed')
    ran |= row == RUN


def cached_units(actions: np.ndarray) -> tuple[int, ...]:
  """The units some step reuses (whole or by residual): those whose outputs the sampler carries."""
  a = np.asarray(actions)
  return tuple(int(k) for k in np.flatnonzero(((a == REUSE) | (a == REUSE_RESIDUAL)).any(axis=0)))


def residual_units(actions: np.ndarray) -> tuple[int, ...]:
  """The units some step reuses by residual: their cache entry is call - skip."""
  return tuple(int(k) for k in np.flatnonzero((np.asarray(actions) == REUSE_RESIDUAL).any(axis=0)))


def check_steps_by_units(what: str, shape, timesteps, num_units: int):
  """Refuses a per-(step, unit) table (actions, routers) that is not (this sampler's steps, the
  model's units); ``what`` starts the message ("policy 'x' has actions")."""
  steps, k = shape
  if len(timesteps) != steps or k != num_units:
    raise ValueError(f'{what} for {steps} steps x {k} units; this sampler has '
                     f'{len(timesteps)} steps and the model {num_units} units')


class ReusingPolicy(policies.Policy):
  """A policy given by per-step actions (`step_actions`); masks are its 'run' actions."""
  reuses = True

  def step_masks(self, timesteps, num_timesteps, num_units):
    return self.step_actions(timesteps, num_timesteps, num_units) == RUN


@dataclasses.dataclass(frozen=True, eq=False)
class StepActionPolicy(ReusingPolicy):
  """An explicit (steps, K) matrix of actions (codes or names) for samplers of that many steps."""
  actions: np.ndarray
  name: str = 'actions'
  kind = 'actions'

  def __post_init__(self):
    object.__setattr__(self, 'actions', action_codes(self.actions))
    check_actions(self.actions)

  def step_actions(self, timesteps, num_timesteps, num_units):
    del num_timesteps
    check_steps_by_units(f'policy {self.name!r} has actions', self.actions.shape, timesteps,
                         num_units)
    return self.actions.copy()

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name, 'actions': self.actions.tolist()}


def uniform_full_steps(num_steps: int, interval: int) -> list[int]:
  return list(range(0, num_steps, interval))


def nonuniform_full_steps(num_steps: int, interval: int, center: float = NONUNIFORM_CENTER,
                          power: float = NONUNIFORM_POWER) -> list[int]:
  """DeepCache's non-uniform 1:N strategy (its paper's formula for the full steps, as the
  authors' ``sample_from_quad_center`` computes it): ceil(S / N) full steps placed at
  c + sign(l) |l|^p for l evenly spaced in [-c^(1/p), (S - c)^(1/p)] -- dense around the
  center step c = center * S, where by the paper adjacent steps' deep features change most --
  with step 0 always full and the ends dropped (|l|^p with l's sign: the real reading of l^p
  for l < 0). As in the authors' code, p is lowered by 0.02
  until the truncated positions are distinct; uniform steps if no p > 1 gives enough."""
  count = -(-num_steps // interval)
  c = int(round(center * num_steps))
  p = float(power)
  while count > 1 and p > 1:
    grid = np.linspace(-(c ** (1 / p)), (num_steps - c) ** (1 / p), count + 1)
    inner = np.unique(np.trunc(np.sign(grid) * np.abs(grid) ** p).astype(int))[1:-1] + c
    steps = [0] + [int(s) for s in inner if 0 < s < num_steps]
    if len(steps) == count:
      return steps
    p -= 0.02
  return uniform_full_steps(num_steps, interval)


def shallow_branch(model, branch: int) -> tuple[bool, ...]:
  """(K,) the units of DeepCache's shallow branch b: those run before long skip b is saved
  (units 0..source_b, making skips 0..b fresh) and those from its consumer on (target_b..K-1,
  fed the fresh skips). The units between -- the deep part -- are reused; the last of them,
  target_b - 1, is the cached feature the shallow decoder continues from."""
  skips = getattr(model, 'skip_connections', None)
  if not skips:
    raise ValueError(f'DeepCache needs a U-Net with long skips; {type(model).__name__} declares no '
                     'skip_connections')
  if not 0 <= branch < len(skips):
    raise ValueError(f'DeepCache branch must be in [0, {len(skips) - 1}] (the long skips of '
                     f'{type(model).__name__}, 0 = the shallowest), got {branch}')
  s = skips[branch]
  return tuple(k <= s.source or k >= s.target for k in range(model.num_units))


@dataclasses.dataclass(frozen=True, eq=False)
class DeepCachePolicy(ReusingPolicy):
  """DeepCache: full steps by ``schedule`` every ``interval`` steps; in between the units of
  ``shallow`` run and the others reuse their output from the last full step."""
  interval: int
  shallow: tuple[bool, ...]
  schedule: str = 'uniform'
  branch: int = DEFAULT_BRANCH  # what ``shallow`` was made from (names and records)
  name: str = ''
  kind = 'deepcache'

  def __post_init__(self):
    if int(self.interval) < 1:
      raise ValueError(f'DeepCache interval N must be >= 1, got {self.interval}')
    if self.schedule not in SCHEDULES:
      raise ValueError(f'DeepCache schedule must be one of {SCHEDULES}, got {self.schedule!r}')
    object.__setattr__(self, 'interval', int(self.interval))
    object.__setattr__(self, 'shallow', tuple(bool(v) for v in self.shallow))
    if not self.name:
      object.__setattr__(self, 'name', f'deepcache_{self.interval}_{self.schedule}_b{self.branch}')

  def full_steps(self, num_steps: int) -> list[int]:
    if self.schedule == 'uniform':
      return uniform_full_steps(num_steps, self.interval)
    return nonuniform_full_steps(num_steps, self.interval)

  def step_actions(self, timesteps, num_timesteps, num_units):
    del num_timesteps
    policies._check_length(len(self.shallow), num_units, f'DeepCache {self.name!r}')  # pylint: disable=protected-access
    partial = np.where(self.shallow, RUN, REUSE).astype(np.int8)
    actions = np.tile(partial, (len(timesteps), 1))
    actions[self.full_steps(len(timesteps))] = RUN
    return actions

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name, 'interval': self.interval,
            'schedule': self.schedule, 'branch': self.branch, 'shallow': list(self.shallow)}


def deepcache(model, interval: int, schedule: str = 'uniform', branch: int = DEFAULT_BRANCH,
              name: str = '') -> DeepCachePolicy:
  """DeepCache with interval N, its uniform or non-uniform full steps and skip branch b."""
  return DeepCachePolicy(interval, shallow_branch(model, branch), schedule, branch, name)


def parse_spec(arg: str, model) -> DeepCachePolicy:
  """The policy of ``deepcache:<arg>``, arg = <N>[:uniform|:nonuniform][@<branch>]."""
  body, _, branch = arg.partition('@')
  interval, _, schedule = body.partition(':')
  try:
    n, b = int(interval), int(branch) if branch else DEFAULT_BRANCH
  except ValueError:
    raise ValueError(f'policy deepcache:{arg!r}: expected deepcache:<N>[:uniform|:nonuniform]'
                     '[@<branch>] with integers N >= 1 and branch') from None
  return deepcache(model, n, schedule or 'uniform', b)


def policy_from_dict(d: dict) -> policies.Policy:
  if d['kind'] == 'actions':
    return StepActionPolicy(np.asarray(d['actions']), name=d.get('name', 'actions'))
  return DeepCachePolicy(d['interval'], d['shallow'], d.get('schedule', 'uniform'),
                         d.get('branch', DEFAULT_BRANCH), d.get('name', ''))


# ---------------------------------------------------------------------------
# The sampler's loop with a cache.
# ---------------------------------------------------------------------------


def repeated_groups(segments, max_group: int = 4) -> list[tuple[list, int]]:
  """The segments as (group, repeats): ``group`` a run of up to ``max_group`` consecutive
  segments that the next ``repeats - 1`` runs repeat step for step (same lengths and actions),
  e.g. DeepCache's [full step, N - 1 partial steps] S // N times. One loop over the repeats
  then holds one body per segment of the group, so the program and its compile time do not
  grow with the number of full steps."""
  out, j = [], 0
  same = lambda a, b: (a.length, a.actions) == (b.length, b.actions)  # noqa: E731
  while j < len(segments):
    best = ([segments[j]], 1)
    for size in range(2, max_group + 1):
      group = segments[j:j + size]
      if len(group) < size:
        break
      reps = 1
      while all(j + reps * size + q < len(segments) and same(segments[j + reps * size + q], g)
                for q, g in enumerate(group)):
        reps += 1
      if reps > 1 and reps * size > len(best[0]) * best[1]:
        best = (group, reps)
    out.append(best)
    j += len(best[0]) * best[1]
  return out


def sample_segments(segments, cached: tuple[int, ...], step, probe, state):
  """Runs the segments of a reusing policy with the cached outputs of units ``cached`` in the
  loop state: ``(solver state, {unit: its output -- or for a unit some step reuses by residual,
  its residual call - skip -- at the last step it ran})``.

  ``step(i, state, form) -> state`` is one sampler step with its model call under ``form``;
  ``probe(form)`` one model call at the program's shapes, traced only for the shapes of the
  cached outputs (`jax.eval_shape`: nothing of it is computed). The cache starts as zeros,
  which no step reads: `check_actions` has made sure each reused unit ran before. Repeating
  groups of segments (`repeated_groups`) run as one loop over their repeats.
  """
  residual = frozenset(k for seg in segments for k, a in enumerate(seg.actions)
                       if a == REUSE_RESIDUAL)

  def shapes():
    form = gating.ReuseUnits((RUN,) * len(segments[0].actions), record=frozenset(cached),
                             residual=residual)
    probe(form)
    return {k: form.recorded[k] for k in cached}

  def body(i, carry, actions):
    state, cache = carry
    form = gating.ReuseUnits(actions, cached=cache, record=frozenset(cached), residual=residual)
    state = step(i, state, form)
    return state, {k: form.recorded.get(k, cache[k]) for k in cached}

  def run_group(group, offset, carry):
    """The group's segments, shifted by ``offset`` steps (traced inside a loop of repeats)."""
    for seg in group:
      run = functools.partial(body, actions=seg.actions)
      # A one-step segment (DeepCache's full step) is the step itself, not a loop around it.
      carry = (run(seg.start + offset, carry) if seg.length == 1 else
               jax.lax.fori_loop(0, seg.length, lambda j, c, s=seg.start + offset, f=run:
                                 f(s + j, c), carry))
    return carry

  carry = (state, {k: jnp.zeros(s.shape, s.dtype) for k, s in jax.eval_shape(shapes).items()})
  for group, repeats in repeated_groups(segments):
    if repeats == 1:
      carry = run_group(group, 0, carry)
    else:
      period = group[-1].stop - group[0].start
      carry = jax.lax.fori_loop(0, repeats, lambda r, c, g=group, p=period: run_group(g, r * p, c),
                                carry)
  return carry[0]
