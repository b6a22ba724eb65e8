"""What every training objective shares: the `Objective` record the training loop runs,
trainable/frozen partitions, step counts and the sampler's timesteps. How an example is noised
(the draw of t and eps, the network's and the gates' time, the loss terms) is the diffusion
process's (`lees_jax.processes`; `draw_t_noise` is the DDPM one's draw, kept here by name).

An `Objective` says what is trained and how (`lees_jax.train` owns the loop):

* ``init_trainable(rng)`` -- the trainable pytree: the ONLY thing that is differentiated,
  updated by the optimiser and kept in the optimiser state;
* ``frozen`` -- everything else the loss reads (e.g. the backbone); passed through
  ``jax.lax.stop_gradient`` and never updated or checkpointed by the loop;
* ``loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)``; ``batch['image']`` and, for
  a class-conditional backbone, ``batch['label']`` (`batch_labels`);
* host-side hooks for extra scalars, images and the final export.

An objective that trains part of a parameter tree splits it with `partition` / `merge`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lees_jax import data
from lees_jax.processes import draw_t_noise  # noqa: F401  (part of this module's interface)

Pytree = Any
CHECKPOINT_DIR = 'checkpoints'  # <workdir>/checkpoints/<objective name>/<step>


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


def batch_labels(model, batch: dict):
  """The class labels a conditional backbone is trained on (``batch['label']``, int32), None
  for an unconditional one (whose batches may carry labels it never reads)."""
  if model.conditioning is None:
    return None
  if 'label' not in batch:
    raise ValueError(f'{type(model).__name__} is class-conditional but the batch has no '
                     f"'label' (keys: {sorted(batch)}): the dataset must provide labels")
  return jnp.asarray(batch['label'], jnp.int32)


def num_steps(section, data_config) -> int:
  """``section.num_train_steps`` when > 0, else ``num_epochs`` passes over the training split."""
  if section.get('num_train_steps', -1) > 0:
    return int(section.num_train_steps)
  epochs = section.get('num_epochs', -1.0)
  if epochs <= 0:
    raise ValueError('set num_train_steps > 0 or num_epochs > 0')
  n = data.num_examples(data_config)
  return max(1, int(math.floor(epochs * n / section.batch_size)))


def backbone_params(config, backbone: Pytree | None = None) -> tuple[Pytree, str]:
  """(parameters, where they came from) of the backbone an objective starts from: ``backbone``
  when the caller holds it already (the experiment), else read from ``config.backbone`` and
  checked against ``config.model`` and ``config.diffusion`` (`checkpoints.read_backbone`)."""
  if backbone is not None:
    return backbone, '<given parameters>'
  from lees_jax import checkpoints  # pylint: disable=g-import-not-at-top
  return checkpoints.read_backbone(config.backbone, config.model, config.diffusion)


def sampler_timesteps(config) -> list[int] | list[float]:
  """Original timesteps of the configured sampler, ascending: the solver's own grid (50-step
  respaced DDPM in the paper, ``ddim<steps>`` spacing for DDIM; a continuous-time sampler's
  real-valued T t - 1, `solvers.Solver.timestep_values`), so that the hard masks, ratios and
  FLOP fractions a gate run reports are those the sampler will run."""
  from lees_jax import samplers  # pylint: disable=g-import-not-at-top
  solver = samplers.solver_from_config(config.diffusion, config.sampler)
  return sorted(solver.timestep_values())
