"""Latent Consistency Models in JAX/Flax."""
