"""lees_jax: learned early-exit gates (LEES) for diffusion samplers in JAX/Flax."""


def load_backbone(path: str):
  """``model, params = lees_jax.load_backbone(path)`` -- see `lees_jax.checkpoints.load_backbone`."""
  from lees_jax import checkpoints  # imported lazily: keeps `import lees_jax` light
  return checkpoints.load_backbone(path)


__all__ = ['load_backbone']
