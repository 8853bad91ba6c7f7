"""Schedules and timestep lists against diffusers' DDIM / LCM / DPMSolverMultistep schedulers."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler

from lcm_jax import schedules
from lcm_jax.schedules import NoiseSchedule

# Stable Diffusion v1's scheduler_config.json (a PNDMScheduler config)
SD = dict(_class_name="PNDMScheduler", num_train_timesteps=1000, beta_start=0.00085,
          beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
          skip_prk_steps=True, trained_betas=None, clip_sample=False)
BETAS = [dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
         dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
         dict(beta_schedule="squaredcos_cap_v2")]


@pytest.mark.parametrize("betas", BETAS, ids=lambda b: b["beta_schedule"])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_alphas_cumprod_match_diffusers(betas, set_alpha_to_one):
    cfg = dict(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=set_alpha_to_one, **betas)
    ref = DDIMScheduler(**cfg)
    ours = NoiseSchedule.from_scheduler_config(cfg)
    np.testing.assert_array_equal(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy())
    assert ours.alphas_cumprod.dtype == np.float32
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_from_sd_config_fields():
    s = NoiseSchedule.from_scheduler_config(dict(SD, prediction_type="v_prediction"))
    assert (s.num_train_timesteps, s.prediction_type, s.steps_offset) == (1000, "v_prediction", 1)
    assert s.timestep_spacing is None and s.original_inference_steps == 50
    assert float(s.final_alpha_cumprod) == float(s.alphas_cumprod[0])


@pytest.mark.parametrize("bad, match", [
    (dict(clip_sample=True), "clip_sample"), (dict(thresholding=True), "thresholding"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"), (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas"),
])
def test_unsupported_config_raises(bad, match):
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.from_scheduler_config(dict(SD, **bad))


def test_ddim_timesteps_and_pairs():
    ts = schedules.ddim_timesteps(1000, 50)
    np.testing.assert_array_equal(ts, np.arange(19, 1000, 20))
    import jax
    t_start, t_end = schedules.sample_timestep_pair(jax.random.PRNGKey(0), 4096, 50, 1000)
    t_start, t_end = np.asarray(t_start), np.asarray(t_end)
    assert t_start.shape == t_end.shape == (4096,) and t_start.dtype == np.int32
    assert set(t_start) == set(ts)  # every index drawn
    np.testing.assert_array_equal(t_end, np.maximum(t_start - 20, 0))
    assert t_end.min() == 0


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8])
def test_lcm_timesteps_match_diffusers(steps):
    ref = LCMScheduler()
    ref.set_timesteps(num_inference_steps=steps, original_inference_steps=50)
    np.testing.assert_array_equal(schedules.lcm_timesteps(steps), ref.timesteps.numpy())
    ref.set_timesteps(num_inference_steps=steps, original_inference_steps=50, strength=0.6)
    np.testing.assert_array_equal(schedules.lcm_timesteps(steps, strength=0.6), ref.timesteps.numpy())


def test_lcm_timesteps_four_steps():
    assert schedules.lcm_timesteps(4).tolist() == [999, 759, 499, 259]


@pytest.mark.parametrize("kwargs", [
    dict(num_inference_steps=51),  # more than original_inference_steps
    dict(num_inference_steps=4, original_inference_steps=1001),  # more than T
    dict(num_inference_steps=8, strength=0.1),  # 50 * 0.1 = 5 < 8
    dict(num_inference_steps=1001),
])
def test_lcm_timesteps_errors_match_diffusers(kwargs):
    ref = LCMScheduler()
    with pytest.raises(ValueError):
        ref.set_timesteps(**kwargs)
    with pytest.raises(ValueError):
        schedules.lcm_timesteps(**kwargs)


@pytest.mark.parametrize("spacing", [None, "leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 7, 50])
def test_sampling_timesteps_match_diffusers(spacing, steps):
    cfg = dict(SD) if spacing is None else dict(SD, timestep_spacing=spacing)
    ours = NoiseSchedule.from_scheduler_config(cfg)
    ddim = DDIMScheduler.from_config(cfg)
    ddim.set_timesteps(steps)
    np.testing.assert_array_equal(schedules.ddim_sampling_timesteps(steps, ours), ddim.timesteps.numpy())
    dpm = DPMSolverMultistepScheduler.from_config(cfg)
    dpm.set_timesteps(steps)
    np.testing.assert_array_equal(schedules.dpm_sampling_timesteps(steps, ours), dpm.timesteps.numpy())


def test_sampling_timestep_spacing_argument_overrides():
    ours = NoiseSchedule.from_scheduler_config(SD)
    ref = DDIMScheduler.from_config(dict(SD, timestep_spacing="trailing"))
    ref.set_timesteps(4)
    np.testing.assert_array_equal(schedules.ddim_sampling_timesteps(4, ours, "trailing"),
                                  ref.timesteps.numpy())


def test_scalings_match_diffusers():
    ref = LCMScheduler()
    t = torch.arange(1000)
    c_skip_ref, c_out_ref = ref.get_scalings_for_boundary_condition_discrete(t)
    c_skip, c_out = schedules.scalings_for_boundary_conditions(np.arange(1000))
    np.testing.assert_allclose(np.asarray(c_skip), c_skip_ref.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(c_out), c_out_ref.numpy(), rtol=1e-6, atol=1e-7)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_eps_conversions_round_trip(prediction_type):
    rng = np.random.default_rng(0)
    s = NoiseSchedule.from_scheduler_config(SD)
    x0, eps = rng.standard_normal((2, 3, 4, 4, 4)).astype(np.float32)
    t = np.array([0, 500, 999])
    alpha, sigma = schedules.alpha_sigma(s, t)
    z = schedules.expand_like(alpha, x0) * x0 + schedules.expand_like(sigma, x0) * eps
    out = schedules.from_x0_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = schedules.to_x0_eps(out, z, alpha, sigma, prediction_type)
    np.testing.assert_allclose(np.asarray(x0_back), x0, atol=2e-4)  # /alpha(999) = 15x
    np.testing.assert_allclose(np.asarray(eps_back), eps, atol=2e-4)
    if prediction_type == "v_prediction":  # diffusers' get_velocity
        ref = DDIMScheduler.from_config(SD).get_velocity(torch.from_numpy(x0), torch.from_numpy(eps),
                                                         torch.from_numpy(t))
        np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-6)
