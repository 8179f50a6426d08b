"""xinst_jax: X-Instruction data curation and LLaMA training in JAX."""

__version__ = "0.1.0"
