"""Evaluation: Fréchet distance and a digit classifier scorer (FID / CLIP-score analogues on digits)."""
from lcm_jax.eval.classifier import DigitClassifier, DigitScorer, classify, train_classifier
from lcm_jax.eval.fd import fd_between, frechet_distance, gaussian_stats

__all__ = ["DigitClassifier", "DigitScorer", "classify", "train_classifier",
           "fd_between", "frechet_distance", "gaussian_stats"]
