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
# diffusers' beta_schedule names -> ours ('squaredcos_cap_v2' is improved DDPM's cosine schedule,
# betas_for_alpha_bar with max_beta 0.999: `lees_jax.diffusion.cosine_betas`).
BETA_SCHEDULES = {'linear': 'linear', 'squaredcos_cap_v2': 'cosine'}
# Schedulers of other model families: their UNet is not a DDPM epsilon predictor.
NOT_DDPM = {'CMStochasticIterativeScheduler': 'a consistency model (EDM-preconditioned consistency '
                                              'function, not a DDPM epsilon predictor)'}
# The scheduler variances our DDPM sampler can reproduce (config.sampler.variance); the others
# need a model that predicts its variance (out_channels = 2 x in_channels), which we refuse.
SUPPORTED_VARIANCE_TYPES = ('fixed_small', 'fixed_large')


def scheduler_variance_type(scheduler_config: Mapping[str, Any] | None) -> str:
  """The DDPM variance the checkpoint's scheduler samples with (diffusers' default when the
  scheduler config is absent or does not say: 'fixed_small')."""
  return str(dict(scheduler_config or {}).get('variance_type', SCHEDULER_DEFAULTS['variance_type']))


def diffusion_config_from_scheduler(scheduler_config: Mapping[str, Any] | None, *,
                                    learned_variance: bool = False) -> ml_collections.ConfigDict:
  """`config.diffusion` from a diffusers ``scheduler_config.json`` (None: the DDPM schedule).
  ``learned_variance``: the model predicts its variance (2C outputs), so the scheduler may
  sample with it ('learned_range', which `lees_jax.solvers` reproduces)."""
  s = dict(scheduler_config or {})
  get = lambda k: s[k] if k in s else SCHEDULER_DEFAULTS[k]  # noqa: E731
  problems = []
  if s.get('_class_name') in NOT_DDPM:
    problems.append(f"_class_name={s['_class_name']!r}: the checkpoint is "
                    f"{NOT_DDPM[s['_class_name']]}; lees_jax samples DDPM epsilon models")
  if get('beta_schedule') not in BETA_SCHEDULES:
    problems.append(f"beta_schedule={get('beta_schedule')!r}: only {sorted(BETA_SCHEDULES)} are "
                    'supported')
  if get('trained_betas') is not None:
    problems.append('trained_betas is set: only the linear schedule from beta_start/beta_end is supported')
  if get('prediction_type') != 'epsilon':
    problems.append(f"prediction_type={get('prediction_type')!r}: only 'epsilon' is supported")
  if get('variance_type') not in SUPPORTED_VARIANCE_TYPES + (
      ('learned_range',) if learned_variance else ()):
    problems.append(f"variance_type={get('variance_type')!r}: only {SUPPORTED_VARIANCE_TYPES} "
                    '(fixed variances of an epsilon-only model) are supported')
  if problems:
    raise ConversionError('unsupported diffusers scheduler config:\n  - ' + '\n  - '.join(problems))
  if BETA_SCHEDULES[get('beta_schedule')] == 'cosine':
    return ml_collections.ConfigDict(dict(num_timesteps=int(get('num_train_timesteps')),
                                          beta_schedule='cosine'))
  return ml_collections.ConfigDict(dict(
      num_timesteps=int(get('num_train_timesteps')), beta_schedule='linear',
      beta_start=float(get('beta_start')), beta_end=float(get('beta_end'))))
