"""The consistency function f_theta = c_skip(t) z + c_out(t) x0_pred, its multistep (segment)
form, and the guidance (omega) embedding the student is conditioned on. Model-agnostic: the
UNet call happens outside."""
from typing import Optional

import jax
import jax.numpy as jnp

from lcm_jax.models.embeddings import guidance_embedding  # noqa: F401  (re-exported)
from lcm_jax.schedules import (NoiseSchedule, alpha_sigma, expand_like,
                               scalings_for_boundary_conditions, to_x0_eps)

__all__ = ["consistency_fn", "guidance_embedding", "segment_fn"]


def consistency_fn(model_output: jax.Array, z: jax.Array, t: jax.Array, schedule: NoiseSchedule,
                   prediction_type: Optional[str] = None, sigma_data: float = 0.5,
                   timestep_scaling: Optional[float] = None) -> jax.Array:
    """f(z, t) = c_skip(t) z + c_out(t) x0_pred(model_output, z, t) (diffusers' convention).

    model_output, z: [B, C, H, W]; t: [B] int. ``prediction_type`` and ``timestep_scaling``
    default to the schedule's. At t = 0, c_skip = 1 and c_out = 0: f is the identity.
    """
    prediction_type = prediction_type or schedule.prediction_type
    scaling = schedule.timestep_scaling if timestep_scaling is None else timestep_scaling
    alpha, sigma = alpha_sigma(schedule, t)
    x0, _ = to_x0_eps(model_output, z, alpha, sigma, prediction_type)
    c_skip, c_out = scalings_for_boundary_conditions(t, sigma_data, scaling)
    return expand_like(c_skip, z) * z + expand_like(c_out, z) * x0


def segment_fn(f: jax.Array, z: jax.Array, t: jax.Array, t_boundary: jax.Array,
               schedule: NoiseSchedule) -> jax.Array:
    """Multistep consistency (MLCD): z_t mapped to its segment's boundary b along the DDIM line
    through LCD's f = f_theta(z, t): z_b = alpha_b f + sigma_b eps_f, eps_f = (z - alpha_t f) / sigma_t.

    f, z: [B, C, H, W]; t, t_boundary: [B] int. t_boundary < 0 is the clean sample: z_b = f
    exactly, so one segment is LCD. At t = b the map is the identity whatever f is (the
    boundary condition comes free); the DDIM form is Phased/Multistep CMs' parameterisation.
    """
    alpha_t, sigma_t = alpha_sigma(schedule, t)
    alpha_b, sigma_b = alpha_sigma(schedule, jnp.maximum(t_boundary, 0))
    e = lambda x: expand_like(x, z)  # noqa: E731
    eps = (z - e(alpha_t) * f) / e(sigma_t)
    return jnp.where(e(t_boundary < 0), f, e(alpha_b) * f + e(sigma_b) * eps)
