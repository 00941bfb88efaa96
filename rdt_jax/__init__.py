"""rdt-jax: RDT-1B (Robotics Diffusion Transformer) in JAX/Flax NNX."""

from rdt_jax.model.config import RDTConfig
from rdt_jax.runner import RDTRunner, load_pretrained

__all__ = ["RDTConfig", "RDTRunner", "load_pretrained"]
__version__ = "0.1.0"
