"""Latent Consistency Models in JAX/Flax.

The names users script against, imported on first use (``import lcm_jax.schedules`` stays
light):

    from lcm_jax import LCMPipeline          # load, sample, save diffusers-layout folders
    from lcm_jax import train                # train(config, workdir) -> WORKDIR/final
    from lcm_jax import UserError            # the base of every error a user can cause

See ARCHITECTURE.md for the modules and the arrows between them.
"""
import importlib

_EXPORTS = {
    "LCMPipeline": "lcm_jax.pipeline",
    "train": "lcm_jax.trainer",
    "validate_config": "lcm_jax.trainer",
    "UserError": "lcm_jax.errors",
    "ConfigError": "lcm_jax.errors",
    "Interrupted": "lcm_jax.errors",
    "WeightsError": "lcm_jax.weights",
    "ConfigFileError": "lcm_jax.component_config",
    "CheckpointMismatchError": "lcm_jax.checkpoint",
    "CheckpointWriteError": "lcm_jax.checkpoint",
    "NonFiniteError": "lcm_jax.loop",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lcm_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
