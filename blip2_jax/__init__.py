"""blip2_jax: BLIP-2 in JAX/Flax. Public API: see README.md and docs/architecture.md."""
from blip2_jax.pretrained import from_pretrained, save_pretrained
from blip2_jax.decoding import generate
from blip2_jax.processor import load_processor

__all__ = ["from_pretrained", "save_pretrained", "generate", "load_processor"]
