"""Backbones behind one interface (`backbone`): each registers itself by ``config.model.name``.

Importing this package registers every backbone module listed here.
"""

from lees_jax.models import adm  # noqa: F401  (registers 'adm_unet')
from lees_jax.models import dit  # noqa: F401  (registers 'dit')
from lees_jax.models import unet  # noqa: F401  (registers 'ddpm_unet')
from lees_jax.models import uvit  # noqa: F401  (registers 'uvit')
from lees_jax.models.backbone import (ClassConditioning, InputSpec, Unit, architecture_differences,
                                      build_model, compute_dtype, count_params, init_params, names,
                                      predict_eps, spec_from_config)
from lees_jax.models.adm import ADM, ADMSpec
from lees_jax.models.dit import DiT, DiTSpec, dit_size
from lees_jax.models.unet import UNet, UNetSpec
from lees_jax.models.uvit import UViT, UViTSpec

__all__ = ['ADM', 'ADMSpec', 'ClassConditioning', 'DiT', 'DiTSpec', 'InputSpec', 'UNet',
           'UNetSpec', 'UViT', 'UViTSpec', 'Unit', 'architecture_differences', 'build_model',
           'compute_dtype',
           'count_params', 'dit_size', 'init_params', 'names', 'predict_eps', 'spec_from_config']
