"""rlm_jax: reasoning language models in JAX (see DESIGN in README)."""
__version__ = "0.1.0"
