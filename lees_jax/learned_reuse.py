"""Learned reuse policies: Learning-to-Cache's per-step router and three-choice LEES.

Both reuse a unit by its *residual* (`lees_jax.gates.REUSE_RESIDUAL`): the reused unit returns
its skip on this step's input plus the residual call - skip it had at the last step at which
it ran -- Learning-to-Cache's layer caching, for a DiT block x + the block's last update. They
are `lees_jax.reuse.ReusingPolicy` objects, so the 'segments' sampler, cost accounting
(a residual-reused unit costs its skip FLOPs) and heat-maps read them like DeepCache.

* `L2CPolicy` -- Learning-to-Cache (Ma, Fang, Mi & Wang, NeurIPS 2024): a router
  r[i, k] = sigmoid(beta[i, k]) per sampler step i (sampling order, noisiest first) and unit k,
  learned for one sampler (`lees_jax.objectives.learning_to_cache`); unit k reuses its residual
  at step i when r[i, k] < threshold and runs otherwise. Step 0 runs every unit (nothing is
  cached yet; L2C's first step is always a full one).
* `Lees3Policy` -- LEES with three choices per unit as functions of the normalised time t
  (`lees_jax.objectives.lees_reuse`): the LEES gate a_k t + b_k > 0 runs the unit; otherwise
  a second linear logit c_k t + d_k > 0 reuses its residual, else it is skipped. A reuse
  decision for a unit that has not run at an earlier step (always the case at step 0) becomes
  *run*: there is nothing to reuse, and running is what the trained blend approximates there
  (at t = T the training's previous step is the step itself, so reuse equals run). With the
  reuse logits negative at every t the actions are exactly LEES's masks.

Spec strings (`lees_jax.evaluate.resolve_policy`):
  l2c:<workdir or routers.json>[@<threshold>]   routers of a train_l2c run (threshold default:
                                                the one it was trained with)
  lees3:<workdir or lees3_gates.json>           three-choice gates of a train_lees3 run
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from lees_jax import files
from lees_jax import gates as gating
from lees_jax import policies
from lees_jax import reuse
from lees_jax.gates import REUSE_RESIDUAL, RUN, SKIP

KINDS = ('l2c', 'lees3')
ROUTERS_FILE = 'routers.json'      # what a train_l2c run writes into its workdir
LEES3_FILE = 'lees3_gates.json'    # what a train_lees3 run writes into its workdir
DEFAULT_THRESHOLD = 0.5


def unit_residuals(model, params, x, t, y=None) -> dict:
  """{k: call - skip} of every unit in one full forward pass at (x, t): what a later step's
  residual reuse of unit k adds to its skip (the training's "cached" features)."""
  k = model.num_units
  form = gating.ReuseUnits((RUN,) * k, record=frozenset(range(k)), residual=frozenset(range(k)))
  from lees_jax.models import backbone  # pylint: disable=g-import-not-at-top
  backbone.predict_eps(model, params, x, t, y, gates=form)
  return dict(form.recorded)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


@dataclasses.dataclass(frozen=True, eq=False)
class L2CPolicy(reuse.ReusingPolicy):
  """Learning-to-Cache's router: beta (steps, K) for the sampler of ``timesteps`` (sampling
  order); reuse unit k's residual at step i > 0 when sigmoid(beta[i, k]) < threshold."""
  beta: np.ndarray
  threshold: float = DEFAULT_THRESHOLD
  timesteps: tuple = ()  # the sampler's timesteps the routers were trained for (() = unchecked)
  name: str = 'l2c'
  kind = 'l2c'

  def __post_init__(self):
    b = np.asarray(self.beta, np.float32)
    if b.ndim != 2 or b.shape[0] < 1:
      raise ValueError(f'L2C routers must be (steps, units), got shape {b.shape}')
    if not 0.0 < float(self.threshold) < 1.0:
      raise ValueError(f'L2C threshold must be in (0, 1), got {self.threshold}')
    object.__setattr__(self, 'beta', b)
    object.__setattr__(self, 'threshold', float(self.threshold))
    object.__setattr__(self, 'timesteps', tuple(int(t) for t in self.timesteps))

  def step_actions(self, timesteps, num_timesteps, num_units):
    del num_timesteps
    reuse.check_steps_by_units(f'L2C routers {self.name!r} are', self.beta.shape, timesteps,
                               num_units)
    if self.timesteps and tuple(int(t) for t in timesteps) != self.timesteps:
      raise ValueError(f'L2C routers {self.name!r} were trained for the sampler timesteps '
                       f'{list(self.timesteps)}, not {[int(t) for t in timesteps]}: a router is '
                       'per sampler step, so train it for this sampler')
    actions = np.where(_sigmoid(self.beta) < self.threshold, REUSE_RESIDUAL, RUN).astype(np.int8)
    actions[0] = RUN
    return actions

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name, 'beta': self.beta.tolist(),
            'threshold': self.threshold, 'timesteps': list(self.timesteps)}


def init_lees3_params(num_units: int, start: str = 'zero', reuse_init: float = 0.0) -> dict:
  """LEES's (alpha, beta) start (`policies.init_gate_params`) plus the reuse logit's
  (gamma = 0, delta = ``reuse_init``: at 0 the hard reuse decision starts off, 0 > 0 false)."""
  params = policies.init_gate_params(num_units, start)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  params['gamma'] = jnp.zeros((num_units,), jnp.float32)
  params['delta'] = jnp.full((num_units,), reuse_init, jnp.float32)
  return params


def reuse_logits(params, t):
  """gamma * t + delta for normalised times t of any shape; trailing K axis."""
  return policies.gate_logits({'alpha': params['gamma'], 'beta': params['delta']}, t)


@dataclasses.dataclass(frozen=True, eq=False)
class Lees3Policy(reuse.ReusingPolicy):
  """Three-choice LEES: run when alpha t + beta > 0, else reuse the residual when
  gamma t + delta > 0 (and the unit ran at an earlier step; otherwise run), else skip."""
  alpha: np.ndarray
  beta: np.ndarray
  gamma: np.ndarray
  delta: np.ndarray
  name: str = 'lees3'
  kind = 'lees3'

  def __post_init__(self):
    for field in ('alpha', 'beta', 'gamma', 'delta'):
      object.__setattr__(self, field, np.asarray(getattr(self, field), np.float32).reshape(-1))
    if len({self.alpha.shape, self.beta.shape, self.gamma.shape, self.delta.shape}) != 1:
      raise ValueError('three-choice LEES: alpha, beta, gamma, delta must have one shape each')

  @property
  def run_gates(self) -> policies.LeesPolicy:
    """The run-vs-not gate alone: the LEES policy these gates reduce to without reuse."""
    return policies.LeesPolicy(self.alpha, self.beta, name=self.name)

  def step_actions(self, timesteps, num_timesteps, num_units):
    run = self.run_gates.step_masks(timesteps, num_timesteps, num_units)
    t = policies.normalized_time(timesteps, num_timesteps)
    wants_reuse = ~run & (reuse_logits(self.params, t) > 0)
    actions = np.where(run, RUN, np.where(wants_reuse, REUSE_RESIDUAL, SKIP)).astype(np.int8)
    ran = np.zeros(num_units, bool)
    for row in actions:  # a reuse with nothing cached yet becomes a run
      row[(row == REUSE_RESIDUAL) & ~ran] = RUN
      ran |= row == RUN
    return actions

  @property
  def params(self) -> dict:
    return {'alpha': self.alpha, 'beta': self.beta, 'gamma': self.gamma, 'delta': self.delta}

  @classmethod
  def from_params(cls, params, name: str = 'lees3') -> 'Lees3Policy':
    p = jax.device_get(params)
    return cls(p['alpha'], p['beta'], p['gamma'], p['delta'], name=name)

  def to_dict(self):
    return {'kind': self.kind, 'name': self.name,
            **{k: v.tolist() for k, v in self.params.items()}}


def policy_from_dict(d: dict) -> policies.Policy:
  if d['kind'] == 'l2c':
    return L2CPolicy(np.asarray(d['beta']), d.get('threshold', DEFAULT_THRESHOLD),
                     tuple(d.get('timesteps', ())), d.get('name', 'l2c'))
  return Lees3Policy(d['alpha'], d['beta'], d['gamma'], d['delta'], d.get('name', 'lees3'))


def _summary(path_or_dir: str, filename: str, what: str) -> dict:
  path = (files.join(path_or_dir) if files.path(path_or_dir).name.endswith('.json')
          else files.join(path_or_dir, filename))
  if not files.exists(path):
    raise FileNotFoundError(f'no {what} at {path}: expected the {filename} that a finished '
                            f'run writes into its workdir')
  return files.read_json(path)


def parse_spec(kind: str, arg: str) -> policies.Policy:
  """The policy of ``l2c:<arg>`` (arg = <dir or file>[@<threshold>]) or ``lees3:<arg>``."""
  import os  # pylint: disable=g-import-not-at-top
  if kind == 'l2c':
    where, _, threshold = arg.rpartition('@') if '@' in arg else (arg, '', '')
    d = _summary(where, ROUTERS_FILE, 'Learning-to-Cache routers (config.mode=train_l2c)')
    try:
      thr = float(threshold) if threshold else float(d.get('threshold', DEFAULT_THRESHOLD))
    except ValueError:
      raise ValueError(f'policy l2c:{arg!r}: expected l2c:<workdir or file>[@<threshold>] with '
                       'a threshold in (0, 1)') from None
    name = f'l2c_{os.path.basename(os.path.normpath(where))}' + (f'@{thr:g}' if threshold else '')
    return L2CPolicy(np.asarray(d['beta']), thr, tuple(d.get('timesteps', ())), name)
  d = _summary(arg, LEES3_FILE, 'three-choice LEES gates (config.mode=train_lees3)')
  return Lees3Policy(d['alpha'], d['beta'], d['gamma'], d['delta'],
                     name=f'lees3_{os.path.basename(os.path.normpath(arg))}')
