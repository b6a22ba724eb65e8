"""Backbones. Each exposes its ordered gateable units and accepts ``gates=`` (see gates.py)."""

import jax.numpy as jnp

from lees_jax.models.unet import UNet, UNetSpec, gateable_units, init_params, count_params

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f'unsupported compute dtype {name!r}; choose one of {sorted(_DTYPES)}')
  return _DTYPES[name]


def build_model(model_config, dtype: str | None = None) -> UNet:
  """The backbone described by ``config.model`` (compute dtype overridable, e.g. for sampling)."""
  if model_config.name != 'ddpm_unet':
    raise ValueError(f"unknown model {model_config.name!r}; available: 'ddpm_unet'")
  return UNet(UNetSpec.from_config(model_config),
              dtype=compute_dtype(dtype or model_config.get('dtype', 'float32')))


__all__ = ['UNet', 'UNetSpec', 'build_model', 'compute_dtype', 'count_params', 'gateable_units',
           'init_params']
