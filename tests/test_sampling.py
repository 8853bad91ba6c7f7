"""Samplers step by step against diffusers' DDIMScheduler, DPMSolverMultistepScheduler and
LCMScheduler loops, with one deterministic fake model applied identically in torch and JAX;
plus the consistency function and the guidance embedding."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler
from diffusers.pipelines.latent_consistency_models import LatentConsistencyModelPipeline

from lcm_jax import sampling
from lcm_jax.consistency import consistency_fn, guidance_embedding
from lcm_jax.schedules import NoiseSchedule, lcm_timesteps

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
          beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1, clip_sample=False)
# an LCM-distilled SD's scheduler config
LCM = dict(SD, set_alpha_to_one=True, original_inference_steps=50, timestep_spacing="leading",
           timestep_scaling=10.0)
SHAPE = (2, 4, 8, 8)
_rng = np.random.default_rng(0)
Z_T = _rng.standard_normal(SHAPE).astype(np.float32)
PATTERN = _rng.standard_normal(SHAPE).astype(np.float32)


def fake_torch(z, t):
    """A fixed smooth function of (z, t), standing in for the (CFG-combined) UNet."""
    tf = t.to(torch.float32)
    return z * (0.3 + tf / 2000.0) + 0.2 * torch.from_numpy(PATTERN) * torch.cos(tf / 300.0)


def fake_jax(z, t):
    tf = t.astype(jnp.float32)[:, None, None, None]  # [B] -> [B,1,1,1]
    return z * (0.3 + tf / 2000.0) + 0.2 * jnp.asarray(PATTERN) * jnp.cos(tf / 300.0)


def diffusers_loop(sched, steps, **set_kwargs):
    """prev_sample after every step of a diffusers scheduler driven by fake_torch."""
    sched.set_timesteps(steps, **set_kwargs)
    z = torch.from_numpy(Z_T) * sched.init_noise_sigma
    out = []
    for t in sched.timesteps:
        z = sched.step(fake_torch(sched.scale_model_input(z, t), t), t, z).prev_sample
        out.append(z.numpy())
    return np.stack(out)


def close(ours, ref):
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 10])
def test_ddim_matches_diffusers(prediction_type, steps):
    cfg = dict(SD, prediction_type=prediction_type)
    ref = diffusers_loop(DDIMScheduler.from_config(cfg), steps)
    schedule = NoiseSchedule.from_scheduler_config(cfg)
    _, traj = sampling.ddim_sample(fake_jax, Z_T, schedule, steps, return_trajectory=True)
    close(traj, ref)


@pytest.mark.parametrize("algorithm", ["dpmsolver", "dpmsolver++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 3, 16])
def test_dpm_matches_diffusers(algorithm, prediction_type, steps):
    cfg = dict(SD, prediction_type=prediction_type)
    final = "zero" if algorithm == "dpmsolver++" else "sigma_min"  # diffusers rejects zero for dpmsolver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "dpmsolver" is deprecated in diffusers
        sched = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type=algorithm, solver_order=2,
                                                        final_sigmas_type=final)
    ref = diffusers_loop(sched, steps)
    schedule = NoiseSchedule.from_scheduler_config(cfg)
    sample = sampling.dpmpp_sample if algorithm == "dpmsolver++" else sampling.dpm_sample
    z0, traj = sample(fake_jax, Z_T, schedule, steps, return_trajectory=True)
    close(traj, ref)
    assert np.all(np.isfinite(np.asarray(z0)))


def test_dpm_rejects_zero_final_sigma():
    schedule = NoiseSchedule.from_scheduler_config(SD)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        sampling.dpm_sample(fake_jax, Z_T, schedule, 4, final_sigmas_type="zero")


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_diffusers(prediction_type, steps):
    cfg = dict(LCM, prediction_type=prediction_type)
    sched = LCMScheduler.from_config(cfg)
    sched.set_timesteps(steps, original_inference_steps=50)
    gen = torch.Generator().manual_seed(0)
    z, ref = torch.from_numpy(Z_T) * sched.init_noise_sigma, []
    for t in sched.timesteps:
        z, denoised = sched.step(fake_torch(z, t), t, z, generator=gen, return_dict=False)
        ref.append(z.numpy())
    # LCMScheduler.step draws randn_tensor(shape, generator) once per non-final step
    gen = torch.Generator().manual_seed(0)
    noises = np.stack([torch.randn(SHAPE, generator=gen).numpy() for _ in range(steps - 1)] or
                      [np.zeros((0,) + SHAPE, np.float32)]).reshape((steps - 1,) + SHAPE)
    schedule = NoiseSchedule.from_scheduler_config(cfg)
    ts = lcm_timesteps(steps, original_inference_steps=schedule.original_inference_steps)
    np.testing.assert_array_equal(ts, sched.timesteps.numpy())
    z0, traj = sampling.lcm_sample(fake_jax, Z_T, ts, schedule, noises=jnp.asarray(noises),
                                   return_trajectory=True)
    close(traj, np.stack(ref))
    close(z0, denoised.numpy())


def test_lcm_sample_rng_jit():
    """With an rng: deterministic, jit-traceable with the model as a closure, and the noise
    matters (different rng, different sample) for more than one step."""
    schedule = NoiseSchedule.from_scheduler_config(LCM)
    ts = lcm_timesteps(4)
    run = jax.jit(lambda z, rng: sampling.lcm_sample(fake_jax, z, ts, schedule, rng))
    a = run(Z_T, jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(run(Z_T, jax.random.PRNGKey(0))))
    assert not np.allclose(np.asarray(a), np.asarray(run(Z_T, jax.random.PRNGKey(1))))
    one = sampling.lcm_sample(fake_jax, Z_T, lcm_timesteps(1), schedule)  # no rng needed
    assert one.shape == SHAPE
    with pytest.raises(ValueError, match="rng"):
        sampling.lcm_sample(fake_jax, Z_T, ts, schedule)


def test_teacher_samplers_jit_and_dispatch():
    schedule = NoiseSchedule.from_scheduler_config(SD)
    for name in ("ddim", "dpm", "dpm++"):
        eager = sampling.teacher_sample(name, fake_jax, Z_T, schedule, 3)
        jitted = jax.jit(lambda z: sampling.teacher_sample(name, fake_jax, z, schedule, 3))(Z_T)
        close(jitted, np.asarray(eager))
    with pytest.raises(ValueError, match="scheduler"):
        sampling.teacher_sample("euler", fake_jax, Z_T, schedule, 3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_consistency_fn(prediction_type):
    """Identity at t = 0 (within 1e-5); elsewhere equal to LCMScheduler.step's `denoised`."""
    schedule = NoiseSchedule.from_scheduler_config(dict(LCM, prediction_type=prediction_type))
    out = jnp.asarray(PATTERN) * 3.0
    t0 = jnp.zeros((2,), jnp.int32)
    f0 = jax.jit(consistency_fn, static_argnums=4)(out, Z_T, t0, schedule, prediction_type)
    np.testing.assert_allclose(np.asarray(f0), Z_T, atol=1e-5)
    sched = LCMScheduler.from_config(dict(LCM, prediction_type=prediction_type))
    sched.set_timesteps(4)
    t = sched.timesteps[1]
    _, ref = sched.step(torch.from_numpy(np.array(out)), t, torch.from_numpy(Z_T),
                        generator=torch.Generator().manual_seed(0), return_dict=False)
    f = consistency_fn(out, Z_T, jnp.full((2,), int(t), jnp.int32), schedule)
    close(f, ref.numpy())


def test_guidance_embedding_matches_diffusers():
    """sin/cos of w * 1000 * freq: one float32 ulp of a frequency (XLA's exp vs torch's)
    moves the argument by up to w * 1000 * 2^-23, so that is the tolerance beyond 1e-5."""
    w = np.array([0.0, 0.5, 1.0, 7.0, 14.5], np.float32)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), 256)
    ours = np.asarray(guidance_embedding(w, 256))
    assert ours.shape == (5, 256)
    bound = 1e-5 + (w * 1000.0)[:, None] * 2.0**-23
    assert np.all(np.abs(ours - ref.numpy()) <= bound), np.abs(ours - ref.numpy()).max(1)
