"""``config.data`` -> the data config the input pipeline reads, with the checks that need the teacher.

Data-free LCD (``data.source = "teacher"``) is generated once by the teacher into a latent cache (or
a complete one is reused) and read as ``source = "cache"``; a cache is refused when another VAE or
text encoder made it, before anything compiles.
"""
from __future__ import annotations

from lcm_jax.data.cache import check_compatible
from lcm_jax.data.sources import as_dict
from lcm_jax.data.teacher_data import teacher_data_config


def resolve_data(config, pipe, workdir: str, teacher: str) -> dict:
    """The data config to train from (a plain dict); ``teacher`` names ``pipe``'s folder in errors."""
    data = teacher_data_config(config, pipe, workdir) if config.data.source == "teacher" else as_dict(config.data)
    if data["source"] == "cache":  # latents + prompt embeddings, made by these encoders and this resolution
        check_compatible(data["path"], pipe, config.data.resolution, teacher)
    return data
