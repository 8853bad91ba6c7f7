"""Evaluation: Fréchet distance, CLIP score and the in-loop evaluators (the digit classifier: lcm_jax/digits)."""
from lcm_jax.eval.fd import fd_between, frechet_distance, gaussian_stats

__all__ = ["fd_between", "frechet_distance", "gaussian_stats"]
