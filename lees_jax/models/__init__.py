"""Backbones behind one interface (`backbone`): each registers itself by ``config.model.name``.

Importing this package registers every backbone module listed here.
"""

from lees_jax.models import unet  # noqa: F401  (registers 'ddpm_unet')
from lees_jax.models.backbone import (ClassConditioning, InputSpec, Unit, build_model,
                                      compute_dtype, count_params, init_params, names)
from lees_jax.models.unet import UNet, UNetSpec

__all__ = ['ClassConditioning', 'InputSpec', 'UNet', 'UNetSpec', 'Unit', 'build_model',
           'compute_dtype', 'count_params', 'init_params', 'names']
