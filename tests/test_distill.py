"""LCD / LCF loss pieces against a literal PyTorch re-computation of diffusers'
examples/consistency_distillation/train_lcm_distill_sd_wds.py, on tiny random UNets.

The JAX side draws (distill.draw); the torch side replays the same numbers through the
script's own formulas (DDIMSolver, scalings_for_boundary_conditions, get_predicted_*),
so the two must agree on z_hat (x_prev), the student prediction, the target and the loss.
"""
import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import sd_models
from lcd_models import B, D, LinearTeacher, _inputs, _jax_unets, _lcd_setup, _unets
from lcm_jax import distill
from training import distill_spec
from lcm_jax.models.embeddings import guidance_embedding
from lcm_jax.models.unet import UNet2DConditionModel
from lcm_jax.schedules import NoiseSchedule, alpha_sigma, ddim_timesteps, expand_like, to_x0_eps
from lcm_jax.solvers import SOLVER_EVALS, get_solver



# --------------------------------------------------------------------------- the script, in torch
# diffusers' train_lcm_distill_sd_wds.py, re-typed line for line (steps 2-10 of its loop).

def guidance_scale_embedding(w, embedding_dim=512, dtype=torch.float32):
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.tensor(10000.0)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=dtype) * -emb)
    emb = w.to(dtype)[:, None] * emb[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


def scalings_for_boundary_conditions(timestep, sigma_data=0.5, timestep_scaling=10.0):
    scaled_timestep = timestep_scaling * timestep
    c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
    c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def extract_into_tensor(a, t, x_shape):
    b, *_ = t.shape
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def get_predicted_original_sample(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return (sample - sigmas * model_output) / alphas
    if prediction_type == "v_prediction":
        return alphas * sample - sigmas * model_output
    raise ValueError(prediction_type)


def get_predicted_noise(model_output, timesteps, sample, prediction_type, alphas, sigmas):
    alphas = extract_into_tensor(alphas, timesteps, sample.shape)
    sigmas = extract_into_tensor(sigmas, timesteps, sample.shape)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alphas * model_output + sigmas * sample
    raise ValueError(prediction_type)


class DDIMSolver:
    def __init__(self, alpha_cumprods, timesteps=1000, ddim_timesteps=50):
        step_ratio = timesteps // ddim_timesteps
        self.ddim_timesteps = (np.arange(1, ddim_timesteps + 1) * step_ratio).round().astype(np.int64) - 1
        self.ddim_alpha_cumprods = alpha_cumprods[self.ddim_timesteps]
        self.ddim_alpha_cumprods_prev = np.asarray(
            [alpha_cumprods[0]] + alpha_cumprods[self.ddim_timesteps[:-1]].tolist())
        self.ddim_timesteps = torch.from_numpy(self.ddim_timesteps).long()
        self.ddim_alpha_cumprods = torch.from_numpy(self.ddim_alpha_cumprods)
        self.ddim_alpha_cumprods_prev = torch.from_numpy(self.ddim_alpha_cumprods_prev)

    def ddim_step(self, pred_x0, pred_noise, timestep_index):
        alpha_cumprod_prev = extract_into_tensor(self.ddim_alpha_cumprods_prev, timestep_index, pred_x0.shape)
        dir_xt = (1.0 - alpha_cumprod_prev).sqrt() * pred_noise
        return alpha_cumprod_prev.sqrt() * pred_x0 + dir_xt


@torch.no_grad()
def script_lcd_step(unet, teacher_unet, target_unet, scheduler_config, num_ddim_timesteps, latents,
                    prompt_embeds, uncond_prompt_embeds, index, noise, w, timestep_scaling=10.0):
    """Steps 2-10 of the script's training loop with the random draws given."""
    from diffusers import DDPMScheduler
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    alpha_schedule = torch.sqrt(noise_scheduler.alphas_cumprod)
    sigma_schedule = torch.sqrt(1 - noise_scheduler.alphas_cumprod)
    solver = DDIMSolver(noise_scheduler.alphas_cumprod.numpy(),
                        timesteps=noise_scheduler.config.num_train_timesteps, ddim_timesteps=num_ddim_timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    bsz = latents.shape[0]

    topk = noise_scheduler.config.num_train_timesteps // num_ddim_timesteps
    start_timesteps = solver.ddim_timesteps[index]
    timesteps = start_timesteps - topk
    timesteps = torch.where(timesteps < 0, torch.zeros_like(timesteps), timesteps)
    c_skip_start, c_out_start = scalings_for_boundary_conditions(start_timesteps, timestep_scaling=timestep_scaling)
    c_skip_start, c_out_start = [x.reshape(bsz, 1, 1, 1) for x in (c_skip_start, c_out_start)]
    c_skip, c_out = scalings_for_boundary_conditions(timesteps, timestep_scaling=timestep_scaling)
    c_skip, c_out = [x.reshape(bsz, 1, 1, 1) for x in (c_skip, c_out)]

    noisy_model_input = noise_scheduler.add_noise(latents, noise, start_timesteps)

    w_embedding = guidance_scale_embedding(w, embedding_dim=unet.config.time_cond_proj_dim)
    w = w.reshape(bsz, 1, 1, 1)

    noise_pred = unet(noisy_model_input, start_timesteps, timestep_cond=w_embedding,
                      encoder_hidden_states=prompt_embeds.float()).sample
    pred_x_0 = get_predicted_original_sample(noise_pred, start_timesteps, noisy_model_input, prediction_type,
                                             alpha_schedule, sigma_schedule)
    model_pred = c_skip_start * noisy_model_input + c_out_start * pred_x_0

    cond_teacher_output = teacher_unet(noisy_model_input, start_timesteps, encoder_hidden_states=prompt_embeds).sample
    cond_pred_x0 = get_predicted_original_sample(cond_teacher_output, start_timesteps, noisy_model_input,
                                                 prediction_type, alpha_schedule, sigma_schedule)
    cond_pred_noise = get_predicted_noise(cond_teacher_output, start_timesteps, noisy_model_input,
                                          prediction_type, alpha_schedule, sigma_schedule)
    uncond_teacher_output = teacher_unet(noisy_model_input, start_timesteps,
                                         encoder_hidden_states=uncond_prompt_embeds).sample
    uncond_pred_x0 = get_predicted_original_sample(uncond_teacher_output, start_timesteps, noisy_model_input,
                                                   prediction_type, alpha_schedule, sigma_schedule)
    uncond_pred_noise = get_predicted_noise(uncond_teacher_output, start_timesteps, noisy_model_input,
                                            prediction_type, alpha_schedule, sigma_schedule)
    pred_x0 = cond_pred_x0 + w * (cond_pred_x0 - uncond_pred_x0)
    pred_noise = cond_pred_noise + w * (cond_pred_noise - uncond_pred_noise)
    x_prev = solver.ddim_step(pred_x0, pred_noise, index)

    target_noise_pred = target_unet(x_prev.float(), timesteps, timestep_cond=w_embedding,
                                    encoder_hidden_states=prompt_embeds.float()).sample
    pred_x_0 = get_predicted_original_sample(target_noise_pred, timesteps, x_prev, prediction_type,
                                             alpha_schedule, sigma_schedule)
    target = c_skip * x_prev + c_out * pred_x_0
    loss = torch.nn.functional.mse_loss(model_pred.float(), target.float(), reduction="mean")
    return dict(start_timesteps=start_timesteps.numpy(), timesteps=timesteps.numpy(),
                x_prev=x_prev.float().numpy(), model_pred=model_pred.numpy(), target=target.float().numpy(),
                loss=float(loss))


# --------------------------------------------------------------------------- (a) LCD vs the script

@pytest.mark.parametrize("prediction_type,num_ddim,seed", [("epsilon", 50, 0), ("v_prediction", 50, 1),
                                                           ("epsilon", 4, 3)])
def test_lcd_matches_diffusers_script(prediction_type, num_ddim, seed):
    sched_cfg = sd_models.scheduler_config(prediction_type)
    schedule = NoiseSchedule.from_scheduler_config(sched_cfg)
    t_mod, t_par, s_mod, s_par, e_par = _jax_unets()
    models = distill.Models(s_mod, t_mod, None, None, schedule)
    spec = distill_spec(num_ddim_timesteps=num_ddim, omega_min=5.0, omega_max=15.0)  # the script's w range
    latents, cond, uncond = _inputs(seed)
    frozen = {"teacher": t_par, "uncond": uncond}
    rng = jax.random.PRNGKey(seed)

    d = distill.draw(rng, latents, spec, schedule)
    a, s = alpha_sigma(schedule, d.t_start)
    z = expand_like(a, latents) * latents + expand_like(s, latents) * d.noise
    z_hat = distill.lcd_target_latents(models, t_par, z, d, cond, jnp.broadcast_to(uncond, cond.shape), "ddim")
    pred = distill.student_f(models, s_par, z, d.t_start, cond, d.omega)
    target = distill.student_f(models, e_par, z_hat, d.t_end, cond, d.omega)
    loss, _ = distill.distill_loss(s_par, e_par, frozen, latents, cond, rng, spec, models)
    d, z_hat, pred, target, loss = jax.device_get((d, z_hat, pred, target, loss))
    table = ddim_timesteps(1000, num_ddim)
    index = np.searchsorted(table, d.t_start)
    assert np.array_equal(table[index], d.t_start)
    assert np.all((d.omega >= 5.0) & (d.omega <= 15.0)) and not d.drop.any()
    if num_ddim == 4:
        assert (index == 0).any(), "this case must cover index 0 (t_start 249, t_end clamped to 0)"

    teacher, student, target_unet = _unets()
    ref = script_lcd_step(student, teacher, target_unet, sched_cfg, num_ddim, torch.from_numpy(latents),
                          torch.from_numpy(cond), torch.from_numpy(np.broadcast_to(uncond, cond.shape).copy()),
                          torch.from_numpy(index.astype(np.int64)), torch.from_numpy(np.array(d.noise)),
                          torch.from_numpy(np.array(d.omega)))
    np.testing.assert_array_equal(ref["start_timesteps"], d.t_start)
    np.testing.assert_array_equal(ref["timesteps"], d.t_end)
    for name, got in (("x_prev", z_hat), ("model_pred", pred), ("target", target)):
        # within 1e-5 of the array's scale: fp32 UNet differences (~1e-6; the guidance embedding
        # sin(w * 1000 * f) at arguments ~1e4 differs by an ulp of the argument) grow with
        # 1/alpha_t (~15 at t=999) and 1 + w (<= 16); measured <= 7e-6
        err, scale = np.abs(got - ref[name]).max(), np.abs(ref[name]).max()
        assert err <= 1e-5 * scale, f"{name}: max |ours - script| = {err:.3g} > 1e-5 * {scale:.3g}"
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-5, atol=1e-7)


def test_draw_is_the_skipping_step_schedule():
    schedule = NoiseSchedule.from_scheduler_config(sd_models.scheduler_config())
    spec = distill_spec(omega_min=2.0, omega_max=14.0, caption_dropout=0.5)
    d = jax.jit(distill.draw, static_argnums=2)(jax.random.PRNGKey(0), jnp.zeros((512, 4, 2, 2)), spec, schedule)
    t_start, t_end = np.asarray(d.t_start), np.asarray(d.t_end)
    assert set(t_start) <= set(ddim_timesteps(1000, 50)) and len(set(t_start)) > 40
    np.testing.assert_array_equal(t_end, np.maximum(t_start - 20, 0))
    assert 2.0 <= d.omega.min() and d.omega.max() <= 14.0
    assert 0.4 < d.drop.mean() < 0.6
    assert abs(float(d.noise.std()) - 1.0) < 0.05


# --------------------------------------------------------------------------- (b) zero-init student

def test_zero_init_student_equals_teacher():
    t_mod, t_par, _, _, _ = _jax_unets()
    try:
        from lcm_jax.trainer import build_student
    except ImportError:  # trainer not importable (it pulls the data stack): build it the same way
        build_student = None
    if build_student is not None:
        config = ml_collections.ConfigDict(dict(time_cond_proj_dim=256, remat="none", cond_proj_init="zeros",
                                                seed=0))
        student, params = build_student(t_mod.module, t_par, config)
    else:
        student = UNet2DConditionModel(dataclasses.replace(t_mod.config, time_cond_proj_dim=256),
                                       zero_init_cond_proj=True)
        init = student.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 8, 8)), jnp.zeros((1,), jnp.int32),
                            jnp.zeros((1, 1, D)), jnp.zeros((1, 256)))["params"]
        params = dict(t_par, time_embedding=dict(t_par["time_embedding"], cond_proj=init["time_embedding"]["cond_proj"]))
    assert student.config.time_cond_proj_dim == 256
    np.testing.assert_array_equal(params["time_embedding"]["cond_proj"]["kernel"], 0.0)
    assert "bias" not in params["time_embedding"]["cond_proj"]

    latents, cond, _ = _inputs(5)
    # batch 2B (the teacher's LCD shape, already compiled): two omega sets per example
    latents, cond = np.concatenate([latents, latents]), np.concatenate([cond, cond])
    t = jnp.array([999, 500, 19, 0] * 2, jnp.int32)
    omega = jnp.array([0.0, 1.0, 7.0, 14.0, 3.5, 3.5, 100.0, -1.0], jnp.float32)
    want = t_mod.apply({"params": t_par}, latents, t, cond)
    got = jax.jit(student.apply)({"params": params}, latents, t, cond, guidance_embedding(omega, 256))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # t_emb + 0 is exact


# --------------------------------------------------------------------------- (c) DPM / DPM++ targets

@pytest.mark.parametrize("solver", ["ddim", "dpm", "dpm++"])
def test_lcd_target_batches_both_branches_and_is_cfg_for_linear_teacher(solver):
    """2B examples per teacher call, SOLVER_EVALS calls; for a teacher linear in (z, c) the
    augmented target (1+w)Psi_c - w Psi_u is Psi of the CFG-combined teacher (any solver)."""
    schedule, d, z, cond, uncond = _lcd_setup(6.0, solver)
    teacher = LinearTeacher()
    models = distill.Models(None, teacher, None, None, schedule)
    tp = {"scale": jnp.float32(0.8)}
    z_hat = distill.lcd_target_latents(models, tp, z, d, cond, uncond, solver)
    assert teacher.calls == [2 * B] * SOLVER_EVALS[solver]

    def guided(zz, t):
        w = expand_like(d.omega, zz)
        out_c, out_u = teacher.apply({"params": tp}, zz, t, cond), teacher.apply({"params": tp}, zz, t, uncond)
        a, s = alpha_sigma(schedule, t)
        (x_c, e_c), (x_u, e_u) = (to_x0_eps(o, zz, a, s, "epsilon") for o in (out_c, out_u))
        return x_c + w * (x_c - x_u), e_c + w * (e_c - e_u)  # the script's (LCM paper's) CFG

    want = get_solver(solver)(guided, z, d.t_start, d.t_end, schedule)
    np.testing.assert_allclose(np.asarray(z_hat), np.asarray(want), rtol=1e-5, atol=1e-5)
    if solver != "ddim":  # a real two-stage step, not DDIM in disguise
        ddim = distill.lcd_target_latents(models, tp, z, d, cond, uncond, "ddim")
        assert float(jnp.max(jnp.abs(z_hat - ddim))) > 1e-3


@pytest.mark.parametrize("solver", ["dpm", "dpm++"])
def test_lcd_target_omega_zero_is_conditional_solver_step(solver):
    t_mod, t_par, _, _, _ = _jax_unets()
    schedule, d, z, cond, uncond = _lcd_setup(0.0, solver, seed=7)
    models = distill.Models(None, t_mod, None, None, schedule)

    z_hat = distill.lcd_target_latents(models, t_par, z, d, cond, uncond, solver)

    def denoise(zz, t):  # the conditional branch alone, batch B
        a, s = alpha_sigma(schedule, t)
        return to_x0_eps(t_mod.apply({"params": t_par}, zz, t, cond), zz, a, s, schedule.prediction_type)

    want = get_solver(solver)(denoise, z, d.t_start, d.t_end, schedule)
    np.testing.assert_allclose(np.asarray(z_hat), np.asarray(want), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- (d) LCF

class RecordingStudent:
    """A student stand-in (output = a * z) that records every (z, t) it is called on."""

    config = types.SimpleNamespace(time_cond_proj_dim=8)

    def __init__(self):
        self.seen = []

    def apply(self, variables, z, t, cond, w_emb, added_cond_kwargs=None):
        assert added_cond_kwargs is None
        self.seen.append((np.asarray(z), np.asarray(t)))
        return variables["params"]["a"] * z


def test_lcf_uses_the_same_noise_at_both_timesteps():
    schedule = NoiseSchedule.from_scheduler_config(sd_models.scheduler_config())
    spec = distill_spec(mode="lcf", num_ddim_timesteps=4)  # t_start = 249 gives t_end = 0
    student = RecordingStudent()
    models = distill.Models(student, None, None, None, schedule)
    latents, cond, uncond = _inputs(2)
    params, target_params = {"a": jnp.float32(0.3)}, {"a": jnp.float32(-0.2)}
    rng = jax.random.PRNGKey(1)
    loss, _ = distill.distill_loss(params, target_params, {"uncond": uncond}, latents, cond, rng, spec, models)
    d = distill.draw(rng, latents, spec, schedule)
    assert (np.asarray(d.t_end) == 0).any() and (np.asarray(d.t_end) > 0).any()

    assert len(student.seen) == 2
    by_t = {tuple(t): z for z, t in student.seen}
    z_end, z_start = by_t[tuple(np.asarray(d.t_end))], by_t[tuple(np.asarray(d.t_start))]
    for z, t in ((z_start, d.t_start), (z_end, d.t_end)):
        a, s = (np.asarray(expand_like(v, latents)) for v in alpha_sigma(schedule, t))
        np.testing.assert_allclose((z - a * latents) / s, d.noise, rtol=0, atol=2e-5)

    f = lambda p, z, t: distill.student_f(models, p, jnp.asarray(z), t, cond, d.omega)  # noqa: E731
    want = np.mean((np.asarray(f(params, z_start, d.t_start)) - np.asarray(f(target_params, z_end, d.t_end))) ** 2)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)


# --------------------------------------------------------------------------- (e) distances

def test_consistency_distance():
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((2, 3, 4, 8, 8)).astype(np.float32)
    dim = 4 * 8 * 8
    np.testing.assert_allclose(distill.consistency_distance(x, y, "l2", 0.0), np.mean((x - y) ** 2), rtol=1e-6)
    sq = ((x - y) ** 2).reshape(3, -1).sum(1)
    for c in (0.001, 0.5, 3.0):
        np.testing.assert_allclose(distill.consistency_distance(x, y, "huber", c),
                                   np.mean(np.sqrt(sq + c * c) - c), rtol=1e-6)
    ict = 0.00054 * np.sqrt(dim)
    for c in (0.0, -1.0):
        np.testing.assert_allclose(distill.consistency_distance(x, y, "huber", c),
                                   np.mean(np.sqrt(sq + ict**2) - ict), rtol=1e-6)
    assert float(distill.consistency_distance(x, x, "huber", 0.0)) == 0.0
    with pytest.raises(ValueError, match="huber"):
        distill_spec(loss="l1")
