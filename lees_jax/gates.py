"""Gate forms: how one forward pass runs its gateable units (the ``gates=`` argument).

Every backbone runs unit k through ``form.run(k, unit, call, skip, *args)``, where
``call(unit, *args)`` is the unit and ``skip(unit, *args)`` what replaces it when it does not
run (the identity, or a ResBlock's 1x1 shortcut projection). A backbone never inspects the
form, so a new form needs no backbone change:

* `AllUnits` (``gates=None``) -- every unit runs;
* `StaticMask` -- Python bools in the traced program: a skipped unit is never traced;
* `CondMask` -- a traced boolean vector (one per forward pass): each unit behind ``lax.cond``,
  one compilation for every mask;
* `StraightThrough` -- LEES training with hard gates: forward 0/1 (logit > 0), backward the
  sigmoid's gradient;
* `SoftGates` -- the unit blended with its skip by g = sigmoid(logit) (LEES soft training and
  soft sampling);
* `ExampleMask` -- a fixed 0/1 decision per example and unit (ASE fine-tuning: each example
  runs the network as the sampler would at its timestep; a dropped unit gets no gradient);
* `ReuseUnits` -- a static action per unit: run it, skip it, *reuse* its output from an
  earlier forward pass (DeepCache-style caching; `lees_jax.reuse`): a reused unit is not
  traced -- or reuse its *residual* ``call - skip`` on a fresh skip (Learning-to-Cache);
* `CacheBlend` -- training of learned reuse (Learning-to-Cache's router, three-choice LEES):
  the unit blended with its skip and with its skip plus a cached residual.

The three blending forms compute both the unit and its skip: training needs
d(out)/d(gate) = unit - skip. Real skipping is for sampling (`StaticMask`, `CondMask`).
Which units run at which sampler step is a *policy* (`lees_jax.policies`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


def _check_length(n: int, num_units: int, what: str):
  if n != num_units:
    raise ValueError(f'{what} has {n} entries but the model has {num_units} gateable units')


UnitCall = Callable[..., jax.Array]  # (unit module, *args) -> output


@dataclasses.dataclass(frozen=True)
class AllUnits:
  """Every unit runs (what ``gates=None`` means)."""

  def check(self, num_units: int):
    del num_units

  def run(self, k: int, unit: nn.Module, call: UnitCall, skip: UnitCall, *args):
    del k, skip
    return call(unit, *args)


@dataclasses.dataclass(frozen=True)
class StaticMask:
  """A mask known at trace time: ``keep[k]`` False means unit k is not traced."""
  keep: tuple[bool, ...]

  def __post_init__(self):
    object.__setattr__(self, 'keep', tuple(bool(v) for v in self.keep))

  def check(self, num_units: int):
    _check_length(len(self.keep), num_units, 'StaticMask')

  def run(self, k, unit, call, skip, *args):
    return call(unit, *args) if self.keep[k] else skip(unit, *args)

  @classmethod
  def all(cls, num_units: int) -> 'StaticMask':
    return cls((True,) * num_units)


@flax.struct.dataclass
class CondMask:
  """A traced boolean vector (K,): one ``lax.cond`` per unit, one compilation for all masks.

  Gates are per forward pass, never per sample: ``lax.cond`` under ``vmap`` becomes
  a select that runs both branches.
  """
  keep: jax.Array

  def check(self, num_units: int):
    if self.keep.ndim != 1:
      raise ValueError(f'CondMask must be one vector of {num_units} booleans for the whole batch '
                       f'(per-sample masks would execute both branches), got shape {self.keep.shape}')
    _check_length(self.keep.shape[0], num_units, 'CondMask')

  def run(self, k, unit, call, skip, *args):
    return nn.cond(self.keep[k], call, skip, unit, *args)


class _Blend:
  """Runs unit and skip and returns skip + w * (unit - skip), w per unit (K,) or (batch, K)."""

  def weights(self) -> jax.Array:
    raise NotImplementedError

  @staticmethod
  def unit_weight(weights: jax.Array, k: int, like: jax.Array) -> jax.Array:
    """Unit k's weight from (K,) or (batch, K) weights, shaped to broadcast against ``like``."""
    weight = jnp.asarray(weights[..., k], like.dtype)
    if weight.ndim == 1:  # one weight per sample
      weight = weight.reshape(weight.shape + (1,) * (like.ndim - 1))
    return weight

  def run(self, k, unit, call, skip, *args):
    full = call(unit, *args)
    skipped = skip(unit, *args)
    return skipped + self.unit_weight(self.weights(), k, full) * (full - skipped)


@flax.struct.dataclass
class StraightThrough(_Blend):
  """Hard LEES gates for training: logits (K,) or (batch, K); forward the 0/1 decision
  (logit > 0), backward the sigmoid's gradient."""
  logits: jax.Array

  def check(self, num_units: int):
    _check_length(self.logits.shape[-1], num_units, 'StraightThrough')

  def weights(self):
    return straight_through(self.logits)


@flax.struct.dataclass
class SoftGates(_Blend):
  """Soft LEES gates: each unit blended with its skip by g = sigmoid(logit)."""
  logits: jax.Array

  def check(self, num_units: int):
    _check_length(self.logits.shape[-1], num_units, 'SoftGates')

  def weights(self):
    return jax.nn.sigmoid(self.logits)


@flax.struct.dataclass
class ExampleMask(_Blend):
  """Fixed decisions (batch, K): example i runs unit k iff ``keep[i, k]``; a dropped unit
  contributes exactly its skip and no gradient (ASE fine-tuning)."""
  keep: jax.Array

  def check(self, num_units: int):
    _check_length(self.keep.shape[-1], num_units, 'ExampleMask')

  def weights(self):
    return self.keep.astype(jnp.float32)


# The actions of `ReuseUnits`, as codes in per-step action matrices (`lees_jax.reuse`):
# SKIP and RUN are a mask's False and True; REUSE returns the whole cached output (DeepCache),
# REUSE_RESIDUAL the fresh skip plus the cached residual call - skip (Learning-to-Cache).
SKIP, RUN, REUSE, REUSE_RESIDUAL = 0, 1, 2, 3
ACTIONS = ('skip', 'run', 'reuse', 'reuse_residual')


@dataclasses.dataclass(frozen=True, eq=False)
class ReuseUnits:
  """Static actions (K,) over `ACTIONS` codes: unit k runs (RUN), returns its skip (SKIP),
  returns ``cached[k]`` (REUSE), the whole output it had when it last ran -- DeepCache's
  semantics -- or returns ``skip(unit, *args) + cached[k]`` (REUSE_RESIDUAL), its skip on
  this step's input plus the residual ``call - skip`` it had when it last ran --
  Learning-to-Cache's layer caching (for a DiT block, whose skip is the identity: x plus the
  block's last residual update). A reused unit is not traced at all, and for REUSE neither is
  what only fed it.

  The running units listed in ``record`` write into ``recorded`` during the forward pass --
  their output, or for those also in ``residual`` their residual ``call - skip`` (what a
  later REUSE_RESIDUAL needs): the sampler reads them after the call to carry them to later
  steps (the backbone returns only its output, and the form is the one place that sees each
  unit's). A form is therefore made afresh for every traced call and read in that same trace;
  a backbone that ran its units under a lifted transform (``nn.scan``, ``nn.remat``) would
  leak the recorded tracers, which JAX refuses loudly.
  """
  actions: tuple[int, ...]
  cached: dict = dataclasses.field(default_factory=dict)   # unit index -> its cached output
  record: frozenset = frozenset()                          # units whose outputs to record
  recorded: dict = dataclasses.field(default_factory=dict)  # filled by `run`
  residual: frozenset = frozenset()  # recorded units whose entry is the residual call - skip

  def __post_init__(self):
    object.__setattr__(self, 'actions', tuple(int(a) for a in self.actions))
    object.__setattr__(self, 'record', frozenset(int(k) for k in self.record))
    object.__setattr__(self, 'residual', frozenset(int(k) for k in self.residual))
    bad = [a for a in self.actions if not 0 <= a < len(ACTIONS)]
    if bad:
      raise ValueError(f'ReuseUnits actions must be codes of {ACTIONS} (0..{len(ACTIONS) - 1}), '
                       f'got {bad}')
    missing = [k for k, a in enumerate(self.actions)
               if a in (REUSE, REUSE_RESIDUAL) and k not in self.cached]
    if missing:
      raise ValueError(f'ReuseUnits: units {missing} are reused but have no cached output')
    # A unit's cache entry is either its output or its residual: one unit, one kind of reuse.
    mixed = [k for k, a in enumerate(self.actions)
             if (a == REUSE and k in self.residual) or (a == REUSE_RESIDUAL and k not in
                                                        self.residual)]
    if mixed:
      raise ValueError(f'ReuseUnits: units {mixed} reuse a cache entry of the other kind (REUSE '
                       'reads a whole output, REUSE_RESIDUAL a residual: list those in residual)')

  def check(self, num_units: int):
    _check_length(len(self.actions), num_units, 'ReuseUnits')

  def run(self, k, unit, call, skip, *args):
    action = self.actions[k]
    if action == REUSE:
      return self.cached[k]
    if action == REUSE_RESIDUAL:
      return skip(unit, *args) + self.cached[k]
    if action == SKIP:
      return skip(unit, *args)
    out = call(unit, *args)
    if k in self.record:
      self.recorded[k] = out - skip(unit, *args) if k in self.residual else out
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class CacheBlend(_Blend):
  """Training form of learned residual reuse: unit k returns
      skip + w_run (call - skip) + (1 - w_run) w_reuse cached[k],
  with ``cached[k]`` the unit's residual call - skip from an earlier forward pass (the
  previous sampler step), w_run, w_reuse (batch, K) weights (soft, or straight-through hard
  0/1 with a sigmoid's gradient). That is w_run fresh + (1 - w_run)(w_reuse reused +
  (1 - w_reuse) skipped), reused = skip + cached residual: Learning-to-Cache's interpolation
  (w_reuse = 1) and three-choice LEES's run / reuse / skip. ``reuse_weight`` None means 0:
  exactly `StraightThrough` / `SoftGates` arithmetic (LEES)."""
  run_weight: jax.Array
  cached: dict = dataclasses.field(default_factory=dict)
  reuse_weight: jax.Array | None = None

  def check(self, num_units: int):
    _check_length(self.run_weight.shape[-1], num_units, 'CacheBlend')

  def weights(self):
    return self.run_weight

  def run(self, k, unit, call, skip, *args):
    out = super().run(k, unit, call, skip, *args)  # skip + w_run (call - skip)
    if self.reuse_weight is None:
      return out
    w_run = self.unit_weight(self.run_weight, k, out)
    return out + (1 - w_run) * self.unit_weight(self.reuse_weight, k, out) * self.cached[k]


def straight_through(logits: jax.Array) -> jax.Array:
  """The hard decision (logit > 0) forward, the sigmoid's gradient backward."""
  soft = jax.nn.sigmoid(logits)
  return (logits > 0).astype(soft.dtype) + soft - jax.lax.stop_gradient(soft)


ALL_UNITS = AllUnits()
