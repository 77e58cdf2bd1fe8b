"""blip2_jax: BLIP-2 in JAX/Flax. Public API: see README.md and docs/architecture.md."""
from blip2_jax.convert.pretrained import from_pretrained, save_pretrained
from blip2_jax.generate import generate

__all__ = ["from_pretrained", "save_pretrained", "generate"]
