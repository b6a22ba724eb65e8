"""Gate policies: which units run at which sampler step; the LEES gate g_k(t) and time.

A *policy* says, for every step of a sampler, which gateable units run: `FullPolicy`,
`SchedulePolicy` (a units x time-intervals boolean matrix: ASE schedules and fixed random
masks) and `LeesPolicy` (learned alpha, beta; hard or soft). From a policy and the sampler's
timesteps come the per-step masks and the *segments*: maximal runs of consecutive steps
sharing one mask. Samplers, cost accounting, training summaries, heat-maps and the experiment
take policies; nothing else derives masks. How one forward pass runs a unit is a gate *form*
(`lees_jax.gates`). Policies that also *reuse* a unit's cached output (DeepCache) give per-step
actions (`Policy.step_actions`: skip, run, reuse) and live in `lees_jax.reuse`; their masks are
the units that run.

LEES gate: g_k(t) = sigmoid(alpha_k * t + beta_k), t = (timestep + 1) / T in (0, 1]
(`normalized_time`, `gate_logits`, `gate_values`: the only definitions, for numpy and jax
arrays alike). A unit runs when g_k(t) > 0.5, i.e. when its logit alpha_k * t + beta_k > 0.
We decide on the logit rather than on the rounded sigmoid so that training, sampling and cost
accounting can never disagree about a gate sitting at 0.5 (at initialisation alpha = beta = 0,
g = 0.5 exactly, and the unit is *not* executed). A logit linear in t changes sign at most
once, so a LEES policy has at most K + 1 segments.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lees_jax import gates

GATES_FILE = 'gates.json'  # what a train_gates run writes into its workdir


def _check_length(n: int, num_units: int, what: str):
  if n != num_units:
    raise ValueError(f'{what} has {n} entries but the model has {num_units} gateable units')


# ---------------------------------------------------------------------------
# Time and the LEES gate.
# ---------------------------------------------------------------------------


def _xp(x):
  return jnp if isinstance(x, jax.Array) else np


def normalized_time(timesteps, num_timesteps: int, dtype=np.float32):
  """t = (timestep + 1) / T in (0, 1] for integer diffusion timesteps in [0, T).

  numpy in, numpy out (host: masks, heat-maps); jax in, jax out (training, traced).
  """
  xp = _xp(timesteps)
  t = xp.asarray(timesteps, dtype)
  return (t + dtype(1.0)) / dtype(num_timesteps)


def timesteps_for_time(t, num_timesteps: int) -> np.ndarray:
  """The inverse of `normalized_time`: the real-valued timesteps T t - 1 whose normalised
  time is t. A continuous-time solver (`lees_jax.sde`, t in (0, 1]) states its steps so,
  and its gates then read t itself: one definition of time for every solver."""
  return np.asarray(t, np.float64) * num_timesteps - 1.0


def gate_logits(params, t):
  """alpha * t + beta for normalised times t of any shape; result has a trailing K axis."""
  t = _xp(t).asarray(t)
  return params['alpha'] * t[..., None] + params['beta']


def _sigmoid(x):
  return jax.nn.sigmoid(x) if isinstance(x, jax.Array) else 1.0 / (1.0 + np.exp(-x))


def gate_values(params, t):
  """g_k(t) = sigmoid(alpha_k t + beta_k)."""
  return _sigmoid(gate_logits(params, t))


GATE_STARTS = ('zero', 'on')
# beta of the 'on' start: the logit is beta > 0 at every t, so every unit runs (g = 0.5025),
# while the gradient, sigmoid'(beta) = 0.249994, is the zero start's to 5e-5.
ON_START_BETA = 0.01


def init_gate_params(num_units: int, start: str = 'zero') -> dict[str, jax.Array]:
  """The gates' start (``config.gates.init``).

  'zero': alpha = beta = 0 -- the paper's letter. Every gate is exactly 0.5, and a unit runs
  only when g > 0.5, so every unit starts *off*: the first gradients are taken on a network
  with every block skipped.
  'on': alpha = 0, beta = +ON_START_BETA -- the same neutral g ~ 0.5, every unit executed.
  """
  if start not in GATE_STARTS:
    raise ValueError(f'config.gates.init must be one of {GATE_STARTS}, got {start!r}')
  beta = 0.0 if start == 'zero' else ON_START_BETA
  return {'alpha': jnp.zeros((num_units,), jnp.float32),
          'beta': jnp.full((num_units,), beta, jnp.float32)}


def random_gate_params(rng: np.random.Generator | int, num_units: int,
                       keep_fraction: float, slope: float = 20.0) -> dict[str, np.ndarray]:
  """Random, fixed LEES gates (ablation A3) whose executed fraction averages ``keep_fraction``.

  Each unit is on for a random fraction f_k of (0, 1] (mean ``keep_fraction``), either
  near the data (t < f_k) or near the noise (t > 1 - f_k), with a random direction.
  """
  if not 0.0 <= keep_fraction <= 1.0:
    raise ValueError(f'keep_fraction must be in [0, 1], got {keep_fraction}')
  rng = np.random.default_rng(rng)
  lo, hi = max(0.0, 2 * keep_fraction - 1), min(1.0, 2 * keep_fraction)
  frac = rng.uniform(lo, hi, size=num_units)
  on_near_data = rng.random(num_units) < 0.5
  # Near data: on for t < f  -> alpha < 0, flip at t = f.
  # Near noise: on for t > 1 - f -> alpha > 0, flip at t = 1 - f.
  alpha = np.where(on_near_data, -slope, slope).astype(np.float32)
  flip = np.where(on_near_data, frac, 1.0 - frac)
  beta = (-alpha * flip).astype(np.float32)
  return {'alpha': alpha, 'beta': beta}


# ---------------------------------------------------------------------------
# Policies.
# ---------------------------------------------------------------------------


class Policy:
  """Which units run at each sampler step. Subclasses define `step_masks`."""
  kind: str = 'policy'
  # Soft policies blend every unit at every step and so never skip.
  soft: bool = False

  def step_masks(self, timesteps: Sequence[int], num_timesteps: int,
                 num_units: int) -> np.ndarray:
    """(num_steps, K) bool: unit k runs at sampler step i (timesteps[i])."""
    raise NotImplementedError

  def step_weights(self, timesteps: Sequence[int], num_timesteps: int,
                   num_units: int) -> np.ndarray:
    """(num_steps, K) float: blend weight of each unit (1/0 for hard policies)."""
    return self.step_masks(timesteps, num_timesteps, num_units).astype(np.float32)

  # Policies that may reuse a unit's cached output (`lees_jax.reuse`) say so: the samplers
  # then carry a cache of unit outputs from step to step.
  reuses: bool = False

  def step_actions(self, timesteps: Sequence[int], num_timesteps: int,
                   num_units: int) -> np.ndarray:
    """(num_steps, K) int8 codes of `lees_jax.gates.ACTIONS`: skip 0, run 1, reuse 2,
    reuse_residual 3. A masking policy only runs and skips (its mask as 0/1)."""
    return self.step_masks(timesteps, num_timesteps, num_units).astype(np.int8)

  def to_dict(self) -> dict:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class FullPolicy(Policy):
  """Every unit at every step (B1)."""
  kind = 'full'

  def step_masks(self, timesteps, num_timesteps, num_units):
    return np.ones((len(timesteps), num_units), bool)

  def to_dict(self):
    return {'kind': self.kind}


def interval_of_time(t, num_intervals: int):
  """The interval of normalised times t: interval i covers (i/n, (i+1)/n] (t = 0 is in the
  first). numpy in, numpy out (masks of a sampler's steps); jax in, jax out (the per-example
  masks of training at a continuous t, `lees_jax.processes`)."""
  xp = _xp(t)
  i = xp.ceil(t * num_intervals - 1e-9).astype(int if xp is np else jnp.int32) - 1
  return xp.clip(i, 0, num_intervals - 1)


def interval_index(timesteps: Sequence[int], num_timesteps: int, num_intervals: int) -> np.ndarray:
  """Interval i covers normalised t in (i/n, (i+1)/n]; t = (timestep+1)/T."""
  return interval_of_time(normalized_time(timesteps, num_timesteps, np.float64), num_intervals)


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulePolicy(Policy):
  """A fixed (K x n_intervals) boolean matrix over equal intervals of t (ASE, random masks)."""
  matrix: np.ndarray
  name: str = 'schedule'
  kind = 'schedule'

  def __post_init__(self):
    m = np.asarray(self.matrix)
    if m.ndim != 2 or m.shape[1] < 1:
      raise ValueError(f'schedule matrix must be (units, intervals), got shape {m.shape}')
    object.__setattr__(self, 'matrix', m.astype(bool))

  def step_masks(self, timesteps, num_timesteps, num_units):
    _check_length(self.matrix.shape[0], num_units, f'schedule {self.name!r}')
    idx = interval_index(timesteps, num_timesteps, self.matrix.shape[1])
    return self.matrix[:, idx].T.copy()

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name, 'matrix': self.matrix.astype(int).tolist()}


@dataclasses.dataclass(frozen=True, eq=False)
class LeesPolicy(Policy):
  """Learned gates g_k(t) = sigmoid(alpha_k t + beta_k); hard (threshold 0.5) or soft."""
  alpha: np.ndarray
  beta: np.ndarray
  form: str = 'hard'
  name: str = 'lees'
  kind = 'lees'

  def __post_init__(self):
    if self.form not in ('hard', 'soft'):
      raise ValueError(f"LEES gate form must be 'hard' or 'soft', got {self.form!r}")
    a = np.asarray(self.alpha, np.float32).reshape(-1)
    b = np.asarray(self.beta, np.float32).reshape(-1)
    if a.shape != b.shape:
      raise ValueError(f'alpha {a.shape} and beta {b.shape} must have the same shape')
    object.__setattr__(self, 'alpha', a)
    object.__setattr__(self, 'beta', b)

  @property
  def soft(self) -> bool:  # type: ignore[override]
    return self.form == 'soft'

  def step_logits(self, timesteps, num_timesteps, num_units) -> np.ndarray:
    """(num_steps, K) alpha_k t + beta_k at each step's normalised time."""
    _check_length(self.alpha.shape[0], num_units, f'LEES gates {self.name!r}')
    return gate_logits(self.params, normalized_time(timesteps, num_timesteps))

  def step_masks(self, timesteps, num_timesteps, num_units):
    if self.soft:
      return np.ones((len(timesteps), num_units), bool)
    return self.step_logits(timesteps, num_timesteps, num_units) > 0

  def step_weights(self, timesteps, num_timesteps, num_units):
    logits = self.step_logits(timesteps, num_timesteps, num_units)
    if self.soft:
      return _sigmoid(logits).astype(np.float32)
    return (logits > 0).astype(np.float32)

  @property
  def params(self) -> dict[str, np.ndarray]:
    return {'alpha': self.alpha, 'beta': self.beta}

  @classmethod
  def from_params(cls, params, form: str = 'hard', name: str = 'lees') -> 'LeesPolicy':
    return cls(np.asarray(params['alpha']), np.asarray(params['beta']), form=form, name=name)

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name, 'form': self.form,
            'alpha': self.alpha.tolist(), 'beta': self.beta.tolist()}


def policy_from_dict(d: dict) -> Policy:
  """Inverse of `Policy.to_dict` (for results files and checkpoints)."""
  kind = d.get('kind')
  if kind == 'full':
    return FullPolicy()
  if kind == 'schedule':
    return SchedulePolicy(np.asarray(d['matrix'], bool), name=d.get('name', 'schedule'))
  if kind == 'lees':
    return LeesPolicy(d['alpha'], d['beta'], form=d.get('form', 'hard'), name=d.get('name', 'lees'))
  from lees_jax import reuse  # pylint: disable=g-import-not-at-top  (reuse builds on this module)
  if kind in reuse.KINDS:
    return reuse.policy_from_dict(d)
  from lees_jax import learned_reuse  # pylint: disable=g-import-not-at-top
  if kind in learned_reuse.KINDS:
    return learned_reuse.policy_from_dict(d)
  raise ValueError(f"unknown policy kind {kind!r}; expected 'full', 'schedule', 'lees' or one of "
                   f'{reuse.KINDS + learned_reuse.KINDS}')


# ---------------------------------------------------------------------------
# Segments.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Segment:
  """Sampler steps [start, stop) all run with the same mask ``keep`` (and, for a reusing
  policy, the same ``actions``: `segments_from_actions`)."""
  start: int
  stop: int
  keep: tuple[bool, ...]
  actions: tuple[int, ...] | None = None

  @property
  def length(self) -> int:
    return self.stop - self.start


def segments_from_masks(masks: np.ndarray) -> list[Segment]:
  """Maximal runs of consecutive steps (rows of ``masks``) sharing one mask."""
  return _runs(np.asarray(masks, bool))


def segments_from_actions(actions: np.ndarray) -> list[Segment]:
  """Maximal runs of consecutive steps sharing one action vector ((steps, K) codes of
  `lees_jax.gates.ACTIONS`); ``keep`` says which units run."""
  return [Segment(s.start, s.stop, tuple(a == gates.RUN for a in s.keep), tuple(s.keep))
          for s in _runs(np.asarray(actions, np.int8))]


def _runs(rows: np.ndarray) -> list[Segment]:
  """`segments_from_masks` for rows of any dtype: ``keep`` holds the row's values."""
  if rows.ndim != 2 or rows.shape[0] == 0:
    raise ValueError(f'masks must be (num_steps >= 1, K), got shape {rows.shape}')
  out, start = [], 0
  for i in range(1, rows.shape[0] + 1):
    if i == rows.shape[0] or not np.array_equal(rows[i], rows[start]):
      out.append(Segment(start, i, tuple(v.item() for v in rows[start])))
      start = i
  return out


def executed_block_ratio(masks: np.ndarray) -> float:
  """Fraction of (step, unit) pairs executed."""
  return float(np.asarray(masks, bool).mean())


# ---------------------------------------------------------------------------
# Gate files.
# ---------------------------------------------------------------------------


def load_gates(workdir: str) -> LeesPolicy:
  """The gates of a finished ``train_gates`` run (``<workdir>/gates.json``) as a LeesPolicy.

  ``workdir`` may also be the path of a gates.json file (local or gs://).
  """
  from lees_jax import files  # pylint: disable=g-import-not-at-top
  path = files.join(workdir) if files.path(workdir).name.endswith('.json') else files.join(workdir, GATES_FILE)
  if not files.exists(path):
    raise FileNotFoundError(f'no learned gates at {path}: expected the {GATES_FILE} that a finished '
                            '`--config.mode=train_gates` run writes into its workdir')
  d = files.read_json(path)
  if 'alpha' not in d or 'beta' not in d:
    raise ValueError(f'{path} is not a gates summary (no alpha/beta)')
  return LeesPolicy(np.asarray(d['alpha'], np.float32), np.asarray(d['beta'], np.float32),
                    form=d.get('form', 'hard'), name=d.get('name', 'lees'))
