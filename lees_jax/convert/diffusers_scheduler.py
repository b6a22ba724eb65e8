"""The diffusion schedule of a diffusers ``scheduler_config.json`` as our `config.diffusion`.

Separate from the network mapping (`diffusers_unet`) because the scheduler config is the same
file, with the same meaning, whichever diffusers model it comes with.
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from lees_jax.convert.errors import ConversionError

# DDPMScheduler defaults, which are also the DDPM schedule of Ho et al. (2020).
SCHEDULER_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
    trained_betas=None, prediction_type='epsilon', variance_type='fixed_small')
# The scheduler variances our DDPM sampler can reproduce (config.sampler.variance); the others
# need a model that predicts its variance (out_channels = 2 x in_channels), which we refuse.
SUPPORTED_VARIANCE_TYPES = ('fixed_small', 'fixed_large')


def scheduler_variance_type(scheduler_config: Mapping[str, Any] | None) -> str:
  """The DDPM variance the checkpoint's scheduler samples with (diffusers' default when the
  scheduler config is absent or does not say: 'fixed_small')."""
  return str(dict(scheduler_config or {}).get('variance_type', SCHEDULER_DEFAULTS['variance_type']))


def diffusion_config_from_scheduler(scheduler_config: Mapping[str, Any] | None
                                    ) -> ml_collections.ConfigDict:
  """`config.diffusion` from a diffusers ``scheduler_config.json`` (None: the DDPM schedule)."""
  s = dict(scheduler_config or {})
  get = lambda k: s[k] if k in s else SCHEDULER_DEFAULTS[k]  # noqa: E731
  problems = []
  if get('beta_schedule') != 'linear':
    problems.append(f"beta_schedule={get('beta_schedule')!r}: only 'linear' is supported")
  if get('trained_betas') is not None:
    problems.append('trained_betas is set: only the linear schedule from beta_start/beta_end is supported')
  if get('prediction_type') != 'epsilon':
    problems.append(f"prediction_type={get('prediction_type')!r}: only 'epsilon' is supported")
  if get('variance_type') not in SUPPORTED_VARIANCE_TYPES:
    problems.append(f"variance_type={get('variance_type')!r}: only {SUPPORTED_VARIANCE_TYPES} "
                    '(fixed variances of an epsilon-only model) are supported')
  if problems:
    raise ConversionError('unsupported diffusers scheduler config:\n  - ' + '\n  - '.join(problems))
  return ml_collections.ConfigDict(dict(
      num_timesteps=int(get('num_train_timesteps')), beta_schedule='linear',
      beta_start=float(get('beta_start')), beta_end=float(get('beta_end'))))
