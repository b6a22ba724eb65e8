"""What every backbone declares, and the registry keyed by ``config.model.name``.

A backbone is a Flax module ``model.apply({'params': p}, x, t[, y], gates=form)`` (NHWC input,
integer timesteps, optional class labels) that also exposes, as properties, everything the
rest of the package reads -- and nothing else is read:

* ``units``: its gateable units in execution order (`Unit`: name, kind, position, FLOPs when
  run and when skipped, what a skip does, whether ASE may drop it);
* ``always_flops``: per-image FLOPs that no gate can skip (stem, embeddings, head, resampling);
* ``input``: pixels or latents, and their shape (`InputSpec`);
* ``conditioning``: ``None`` or `ClassConditioning` (with the null class used for guidance, or
  ``null_class=None`` for a backbone without one, e.g. ADM: no classifier-free guidance);
* ``output``: ``'eps'`` or ``'eps_variance'`` (epsilon plus a learned variance);
* ``time_embedding``: the top-level parameter subtrees of its timestep MLP (what ASE
  fine-tuning's ``freeze_time_embedding`` freezes);
* ``init_params(rng)``: the full parameter tree;
* optionally ``skip_connections``: a U-Net's long skips in the order they are saved
  (`SkipConnection`: which units ran before the tensor was saved, which unit concatenates it;
  `skip_connections_of_layout` derives them from a layout of 'push'/'pop' ops), what DeepCache's
  shallow branch is made of (`lees_jax.reuse`); absent for a backbone without long skips;
* optionally ``stack``: a `Stack` when the gateable units are stacks of identical blocks (DiT:
  one, U-ViT: two; `lees_jax.models.stacked`), which the 'stacked' sampling path needs
  (`stack_of`); absent or None otherwise.

`predict_eps` is the one place that calls a backbone for epsilon (samplers, objectives): it
passes the labels only to a conditional backbone and splits an ``'eps_variance'`` output. With
``gates=`` a `StackMask` it runs the backbone's `Stack` instead of ``model.apply``.

Unit k of a forward pass runs through the gate form (``lees_jax.gates``): the backbone passes
the unit's call and its skip and never looks at the form. Cost accounting (`lees_jax.cost`),
the samplers, ASE schedules, training objectives, evaluation and ``describe`` go through this
interface only, so a new backbone registers here and needs no change elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

# The stacked path's declarations are part of the backbone interface (``model.stack``).
from lees_jax.models.stacked import (BlockOutputs, BlockStack, Stack, StackMask,  # noqa: F401
                                     stack_of)

POSITIONS = ('encoder', 'middle', 'decoder')


@dataclasses.dataclass(frozen=True)
class Unit:
  """One gateable unit. ``index`` is its gate index k (execution order)."""
  index: int
  name: str
  kind: str            # 'res', 'attn', 'transformer', ...
  position: str        # 'encoder' | 'middle' | 'decoder'
  block: int           # index within its position
  run_flops: float     # per image, when the unit runs
  skip_flops: float    # per image, when skipped (e.g. a kept 1x1 shortcut projection)
  # What a skipped unit returns: 'identity' | 'shortcut_projection' | 'resample' (a
  # parameter-free resample of its input: ADM's resampling ResBlocks).
  skip: str
  ase_droppable: bool  # ASE may drop it (ASE drops from the last droppable unit backwards)
  resolution: int = 0  # spatial size it works at (describe)
  in_ch: int = 0
  out_ch: int = 0

  def __post_init__(self):
    if self.position not in POSITIONS:
      raise ValueError(f'unit {self.name!r}: position must be one of {POSITIONS}, got {self.position!r}')


@dataclasses.dataclass(frozen=True)
class SkipConnection:
  """A long skip of a U-Net: a tensor the encoder saves and a decoder unit concatenates onto its
  input. ``source``: the last unit run before it is saved (-1: the stem's output, no unit), so
  it is fresh whenever units 0..source ran; ``target``: the unit that consumes it."""
  source: int
  target: int


def skip_connections_of_layout(ops) -> tuple[SkipConnection, ...]:
  """The long skips of a layout whose ops have ``kind`` ('push' saves the current tensor,
  'pop' concatenates the newest saved one onto the next unit's input) and ``gateable``
  (a unit), in the order they are saved."""
  sources, pushed, out = [], [], {}
  k, waiting = 0, None
  for op in ops:
    if op.kind == 'push':
      pushed.append(len(sources))
      sources.append(k - 1)
    elif op.kind == 'pop':
      waiting = pushed.pop()
    elif op.gateable:
      if waiting is not None:
        out[waiting] = SkipConnection(sources[waiting], k)
        waiting = None
      k += 1
  if pushed or waiting is not None or len(out) != len(sources):
    raise ValueError('layout has unmatched skip tensors')
  return tuple(out[i] for i in range(len(sources)))


@dataclasses.dataclass(frozen=True)
class InputSpec:
  """What the network denoises: ``kind`` 'pixels' or 'latents', ``shape`` (H, W, C)."""
  kind: str
  shape: tuple[int, int, int]
  decoder: str | None = None  # latents: the autoencoder that turns them into pixels


@dataclasses.dataclass(frozen=True)
class ClassConditioning:
  """Class-label conditioning; label ``null_class`` is the unconditional one (classifier-free
  guidance), or None for a backbone trained without one (labels 0..num_classes-1 only, no
  guidance: ADM, U-ViT's ImageNet 64 models)."""
  num_classes: int
  null_class: int | None


@dataclasses.dataclass(frozen=True)
class Family:
  """A registered backbone: how to build its module from ``config.model``.

  ``spec_from_config`` gives the family's frozen architecture dataclass (validating it): two
  configs describe the same network iff their specs are equal once ``training_fields``
  (settings of training such as dropout, not of the network) are set aside.
  """
  name: str
  build: Callable[[Any, Any], Any]  # (model_config, compute dtype) -> Flax module
  description: str
  spec_from_config: Callable[[Any], Any]  # model_config -> frozen spec dataclass
  training_fields: tuple[str, ...] = ()


_REGISTRY: dict[str, Family] = {}
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def register(family: Family) -> Family:
  if family.name in _REGISTRY:
    raise ValueError(f'backbone {family.name!r} is registered twice')
  _REGISTRY[family.name] = family
  return family


def names() -> list[str]:
  return sorted(_REGISTRY)


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f'unsupported compute dtype {name!r}; choose one of {sorted(_DTYPES)}')
  return _DTYPES[name]


def family(name: str) -> Family:
  if name not in _REGISTRY:
    raise ValueError(f'unknown config.model.name {name!r}; registered backbones: '
                     f'{", ".join(names())}')
  return _REGISTRY[name]


def build_model(model_config, dtype: str | None = None):
  """The backbone ``config.model`` names (compute dtype overridable, e.g. for sampling)."""
  return family(model_config.name).build(
      model_config, compute_dtype(dtype or model_config.get('dtype', 'float32')))


def spec_from_config(model_config):
  """The validated architecture spec of ``config.model`` (its family's ``spec_from_config``)."""
  return family(model_config.name).spec_from_config(model_config)


def architecture_differences(want_config, have_config) -> list[tuple[str, Any, Any]]:
  """(field, have, want) for every field whose value differs between the networks of two
  configs, training settings aside ([] if they are the same network); a different family is
  the one difference ('name', ...)."""
  if want_config.name != have_config.name:
    return [('name', have_config.name, want_config.name)]
  fam = family(want_config.name)
  want, have = fam.spec_from_config(want_config), fam.spec_from_config(have_config)
  return [(f.name, getattr(have, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
          if f.name not in fam.training_fields and getattr(have, f.name) != getattr(want, f.name)]


def init_params(model, rng, batch_size: int = 1):
  """The full parameter tree of a backbone (every unit executed, so every parameter exists)."""
  x = jnp.zeros((batch_size,) + tuple(model.input.shape), jnp.float32)
  t = jnp.zeros((batch_size,), jnp.int32)
  if model.conditioning is None:
    return model.init({'params': rng}, x, t)['params']
  null = model.conditioning.null_class
  y = jnp.full((batch_size,), 0 if null is None else null, jnp.int32)
  return model.init({'params': rng}, x, t, y)['params']


OUTPUTS = ('eps', 'eps_variance')


def _inputs(model, x, t, y):
  """(x, t) for an unconditional backbone, (x, t, y) for a conditional one (y required)."""
  if model.conditioning is None:
    if y is not None:
      raise ValueError(f'{type(model).__name__} is unconditional (conditioning None) but class '
                       'labels were given')
    return (x, t)
  if y is None:
    cond = model.conditioning
    labels = (f'[0, {cond.num_classes - 1}] (no null class)' if cond.null_class is None else
              f'[0, {cond.num_classes}] ({cond.null_class} is the null class)')
    raise ValueError(f'{type(model).__name__} is class-conditional: give labels y in {labels}')
  return (x, t, y)


def call(model, params, x, t, y=None, *, gates=None, train: bool = False, rngs=None):
  """The backbone's raw output (B, H, W, C or 2C): ``model.apply`` with y passed only when the
  model is conditional. `predict_eps` splits it; FLOP counts (`lees_jax.cost`) read this.
  ``gates`` a `StackMask`: the backbone's `Stack` with its kept blocks (sampling only)."""
  if isinstance(gates, StackMask):
    if train or rngs:
      raise ValueError('the stacked forward pass is for sampling: train=True and rngs are not '
                       'supported')
    inputs = _inputs(model, x, t, y)
    return stack_of(model).forward(params, gates.stacked, inputs[0], inputs[1],
                                   inputs[2] if len(inputs) == 3 else None, gates.keep)
  return model.apply({'params': params}, *_inputs(model, x, t, y), gates=gates, train=train,
                     rngs=rngs)


def predict_eps(model, params, x, t, y=None, *, gates=None, train: bool = False, rngs=None):
  """(eps, v): the backbone's epsilon prediction and, for ``model.output == 'eps_variance'``,
  its variance interpolation v in [-1, 1] (improved DDPM's learned range; None for 'eps').

  Channels [:C] of an 'eps_variance' output are epsilon and [C:] are v, C = the input's
  channels (REFERENCE §9). An 'eps' output is returned as it is (no copy, no slice), so callers
  of an epsilon-only backbone compute exactly ``model.apply``'s result.
  """
  out = call(model, params, x, t, y, gates=gates, train=train, rngs=rngs)
  if model.output == 'eps':
    return out, None
  if model.output != 'eps_variance':
    raise ValueError(f'unknown backbone output {model.output!r}; expected one of {OUTPUTS}')
  c = model.input.shape[-1]
  if out.shape[-1] != 2 * c:
    raise ValueError(f"an 'eps_variance' backbone must output 2 x {c} channels, got "
                     f'{out.shape[-1]}')
  return out[..., :c], out[..., c:]


def count_params(params) -> int:
  return int(sum(p.size for p in jax.tree_util.tree_leaves(params)))
