"""Psi: one-interval PF-ODE steps z_s -> z_t (s > t) of the teacher, used by LCD training.

Each solver takes ``denoise(z [B,C,H,W], t [B] int32) -> (x0_pred, eps_pred)``, so the
caller decides what the teacher is (unguided, or with CFG folded in) and the solvers share
one code path. Timesteps are discrete (the teacher was trained on integers), per example.
"""
from typing import Callable, Tuple

import jax
import jax.numpy as jnp

from lcm_jax.schedules import NoiseSchedule, expand_like, alpha_sigma, to_x0_eps

Denoiser = Callable[[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]


def denoiser_from_model_fn(model_fn: Callable[[jax.Array, jax.Array], jax.Array],
                           schedule: NoiseSchedule) -> Denoiser:
    """Wraps ``model_fn(z, t) -> output in schedule.prediction_type`` as ``denoise``."""
    def denoise(z, t):
        alpha, sigma = alpha_sigma(schedule, t)
        return to_x0_eps(model_fn(z, t), z, alpha, sigma, schedule.prediction_type)
    return denoise


def _per_example(t: jax.Array, z: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(t, jnp.int32), z.shape[:1])  # [B]


def _lambda(alpha: jax.Array, sigma: jax.Array) -> jax.Array:
    return jnp.log(alpha) - jnp.log(sigma)  # half log-SNR


def ddim_step(denoise: Denoiser, z_s: jax.Array, s: jax.Array, t: jax.Array,
              schedule: NoiseSchedule) -> jax.Array:
    """DDIM (eta = 0) from s to t: z_t = alpha_t x0 + sigma_t eps. 1 teacher evaluation.

    Equals diffusers' DDIMSolver.ddim_step (train_lcm_distill_sd_wds.py); t = 0 uses
    alphas_cumprod[0] (not set_alpha_to_one), as that script does.
    """
    s, t = _per_example(s, z_s), _per_example(t, z_s)
    x0, eps = denoise(z_s, s)
    alpha_t, sigma_t = alpha_sigma(schedule, t)
    return expand_like(alpha_t, z_s) * x0 + expand_like(sigma_t, z_s) * eps


def _midpoint(schedule: NoiseSchedule, s: jax.Array, t: jax.Array) -> jax.Array:
    """The integer timestep strictly between t and s nearest in lambda to the lambda-midpoint
    of [s, t]; t itself when s - t < 2 (no integer between). [B] int32."""
    alpha, sigma = alpha_sigma(schedule, jnp.arange(schedule.num_train_timesteps))
    lam = _lambda(alpha, sigma)  # [T], decreasing in t
    target = 0.5 * (lam[s] + lam[t])  # [B]
    idx = jnp.arange(schedule.num_train_timesteps)[None, :]
    inside = (idx > t[:, None]) & (idx < s[:, None])  # [B, T]
    cost = jnp.where(inside, jnp.abs(lam[None, :] - target[:, None]), jnp.inf)
    mid = jnp.argmin(cost, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(inside, axis=1), mid, t)


def _two_stage_coeffs(schedule, s, t, z):
    """alpha/sigma at s, s1, t, h = lambda_t - lambda_s and r = (lambda_s1 - lambda_s) / h."""
    s1 = _midpoint(schedule, s, t)
    (a_s, sg_s), (a_1, sg_1), (a_t, sg_t) = (alpha_sigma(schedule, u) for u in (s, s1, t))
    lam_s, lam_1, lam_t = _lambda(a_s, sg_s), _lambda(a_1, sg_1), _lambda(a_t, sg_t)
    h = lam_t - lam_s
    # s1 == t (intervals of one timestep) is the r = 1 (exponential-Heun) variant
    r = jnp.where(s1 == t, 1.0, (lam_1 - lam_s) / jnp.where(h == 0, 1.0, h))
    e = lambda x: expand_like(x, z)  # noqa: E731
    return s1, e(a_s), e(sg_s), e(a_1), e(sg_1), e(a_t), e(sg_t), e(h), e(r)


def dpm_solver_2_step(denoise: Denoiser, z_s: jax.Array, s: jax.Array, t: jax.Array,
                      schedule: NoiseSchedule) -> jax.Array:
    """Singlestep DPM-Solver-2 (Lu et al. 2022, noise prediction) from s to t, intermediate
    point at the lambda-midpoint (r = 0.5, rounded to the nearest integer timestep; the
    general-r formula keeps it second order). 2 teacher evaluations (sequential).
    """
    s, t = _per_example(s, z_s), _per_example(t, z_s)
    s1, a_s, sg_s, a_1, sg_1, a_t, sg_t, h, r = _two_stage_coeffs(schedule, s, t, z_s)
    _, eps_s = denoise(z_s, s)
    u = (a_1 / a_s) * z_s - sg_1 * jnp.expm1(r * h) * eps_s
    _, eps_1 = denoise(u, s1)
    phi = sg_t * jnp.expm1(h)
    return (a_t / a_s) * z_s - phi * eps_s - (0.5 / r) * phi * (eps_1 - eps_s)


def dpm_solver_pp_2_step(denoise: Denoiser, z_s: jax.Array, s: jax.Array, t: jax.Array,
                         schedule: NoiseSchedule) -> jax.Array:
    """Singlestep DPM-Solver++(2S) (Lu et al. 2022b, data prediction) from s to t, with the
    same intermediate point as ``dpm_solver_2_step``. 2 teacher evaluations (sequential).
    """
    s, t = _per_example(s, z_s), _per_example(t, z_s)
    s1, a_s, sg_s, a_1, sg_1, a_t, sg_t, h, r = _two_stage_coeffs(schedule, s, t, z_s)
    x0_s, _ = denoise(z_s, s)
    u = (sg_1 / sg_s) * z_s - a_1 * jnp.expm1(-r * h) * x0_s
    x0_1, _ = denoise(u, s1)
    d = (1.0 - 0.5 / r) * x0_s + (0.5 / r) * x0_1
    return (sg_t / sg_s) * z_s - a_t * jnp.expm1(-h) * d


SOLVERS = {"ddim": ddim_step, "dpm": dpm_solver_2_step, "dpm++": dpm_solver_pp_2_step}
# teacher evaluations per step (each one a batch of B)
SOLVER_EVALS = {"ddim": 1, "dpm": 2, "dpm++": 2}


def get_solver(name: str) -> Callable[..., jax.Array]:
    """The Psi step for config value ``lcd.solver`` (ddim | dpm | dpm++)."""
    if name not in SOLVERS:
        raise ValueError(f"solver={name!r}, expected one of {sorted(SOLVERS)}")
    return SOLVERS[name]
