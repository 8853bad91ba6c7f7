"""Beyond LCM, as options of the same step: multistep LCD (segments), a target without EMA,
TLCM's sub-stepped teacher solver, iCT's lognormal draw, and consistency training (mode ct)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sd_models
from lcm_jax import distill, sampling
from lcm_jax.consistency import segment_fn
from lcm_jax.schedules import (NoiseSchedule, alpha_sigma, ddim_timesteps, expand_like, lognormal_pair_weights,
                               mlcd_timesteps, segment_boundaries)
from lcd_models import B, LinearTeacher, _inputs, _jax_unets, _lcd_setup
from training import distill_spec, metrics, read_state, small_config

SCHEDULE = NoiseSchedule.from_scheduler_config(sd_models.scheduler_config())


# --------------------------------------------------------------------------- segments

def test_segment_boundaries():
    assert np.all(segment_boundaries(1000, 50, 1) == -1)  # one segment: LCD's clean-sample target
    table = ddim_timesteps(1000, 50)
    b2 = segment_boundaries(1000, 50, 2)
    np.testing.assert_array_equal(b2, np.where(table > 499, 499, -1))
    b4 = segment_boundaries(1000, 50, 4)  # edges 0, 12, 25, 37, 50 of the 50 indices
    assert sorted(set(b4)) == [-1, 239, 499, 739]
    assert np.all(b4 < table) and np.all(np.diff(b4) >= 0)
    # the sampler visits exactly the tops of the segments, each mapped to the next
    np.testing.assert_array_equal(mlcd_timesteps(4), [999, 739, 499, 239])
    np.testing.assert_array_equal(mlcd_timesteps(2), [999, 499])
    np.testing.assert_array_equal(mlcd_timesteps(1), [999])
    for s in (2, 4):
        tops = mlcd_timesteps(s)
        assert set(segment_boundaries(1000, 50, s)) - {-1} == set(tops[1:].tolist())
    with pytest.raises(ValueError, match="num_segments"):
        segment_boundaries(1000, 50, 51)
    with pytest.raises(ValueError, match="num_segments"):
        distill_spec(num_segments=0)


def test_segment_fn_is_f_for_the_clean_boundary_and_the_identity_at_the_boundary():
    rng = np.random.default_rng(0)
    z, f = (jnp.asarray(rng.standard_normal((4, 4, 8, 8)), jnp.float32) for _ in range(2))
    t = jnp.array([999, 519, 259, 19], jnp.int32)
    np.testing.assert_array_equal(segment_fn(f, z, t, jnp.full((4,), -1), SCHEDULE), f)  # S = 1 is LCD, exactly
    np.testing.assert_allclose(segment_fn(f, z, t, t, SCHEDULE), z, rtol=0, atol=2e-6)   # f(z, b) = z at b
    # otherwise the DDIM step from t to b with f as x0
    b = jnp.array([499, 499, 239, 0], jnp.int32)
    (a_t, s_t), (a_b, s_b) = alpha_sigma(SCHEDULE, t), alpha_sigma(SCHEDULE, b)
    e = lambda x: np.asarray(expand_like(x, z))  # noqa: E731
    eps = (np.asarray(z) - e(a_t) * np.asarray(f)) / e(s_t)
    np.testing.assert_allclose(segment_fn(f, z, t, b, SCHEDULE), e(a_b) * np.asarray(f) + e(s_b) * eps,
                               rtol=1e-6, atol=1e-6)


def _loss_by_hand(spec, models, s_par, e_par, t_par, latents, cond, uncond, rng):
    """The MLCD loss written out from the pieces: both sides mapped to the start's boundary."""
    d = distill.draw(rng, latents, spec, models.schedule)
    a, s = alpha_sigma(models.schedule, d.t_start)
    z = expand_like(a, latents) * latents + expand_like(s, latents) * d.noise
    z_hat = distill.lcd_target_latents(models, t_par, z, d, cond, jnp.broadcast_to(uncond, cond.shape), "ddim")
    pred = distill.student_f(models, s_par, z, d.t_start, cond, d.omega)
    target = distill.student_f(models, e_par, z_hat, d.t_end, cond, d.omega)
    return d, pred, target, z, z_hat


def test_one_segment_is_lcd_and_segments_map_both_sides_to_the_boundary():
    t_mod, t_par, s_mod, s_par, e_par = _jax_unets()
    models = distill.Models(s_mod, t_mod, None, None, SCHEDULE)
    latents, cond, uncond = _inputs(4)
    frozen = {"teacher": t_par, "uncond": uncond}
    rng = jax.random.PRNGKey(3)

    lcd = distill_spec(num_ddim_timesteps=4)  # t_start in {249, 499, 749, 999}
    d, pred, target, _, _ = _loss_by_hand(lcd, models, s_par, e_par, t_par, latents, cond, uncond, rng)
    assert np.all(np.asarray(d.t_boundary) == -1)
    loss, _ = distill.distill_loss(s_par, e_par, frozen, latents, cond, rng, lcd, models)
    assert float(loss) == float(jnp.mean((pred - target) ** 2))  # the LCD loss, bit for bit

    mlcd = distill_spec(num_ddim_timesteps=4, num_segments=2)  # boundary 499 above, clean below
    d, pred, target, z, z_hat = _loss_by_hand(mlcd, models, s_par, e_par, t_par, latents, cond, uncond, rng)
    t_start, bnd = np.asarray(d.t_start), np.asarray(d.t_boundary)
    np.testing.assert_array_equal(bnd, np.where(t_start > 499, 499, -1))
    assert (bnd == 499).any() and (bnd == -1).any(), "the draw must cover both segments"
    pred_b = segment_fn(pred, z, d.t_start, d.t_boundary, SCHEDULE)
    target_b = segment_fn(target, z_hat, d.t_end, d.t_boundary, SCHEDULE)
    at_boundary = np.asarray(d.t_end) == bnd  # t_start = 749 -> t_end = 499: the target is z_hat itself
    assert at_boundary.any()
    np.testing.assert_allclose(np.asarray(target_b)[at_boundary], np.asarray(z_hat)[at_boundary], atol=1e-5)
    loss, _ = distill.distill_loss(s_par, e_par, frozen, latents, cond, rng, mlcd, models)
    np.testing.assert_allclose(float(loss), float(jnp.mean((pred_b - target_b) ** 2)), rtol=1e-6)


# --------------------------------------------------------------------------- the sampler

def _toy_model(z, t):  # an eps-prediction "network": smooth in z and t
    return jnp.tanh(0.7 * z) * (0.4 + t[:, None, None, None].astype(jnp.float32) / 2000.0)


@pytest.mark.parametrize("segments", [1, 2, 4])
def test_mlcd_sampler_takes_one_step_per_segment_and_matches_a_reference_loop(segments):
    z_T = np.random.default_rng(segments).standard_normal((3, 4, 4, 4)).astype(np.float32)
    ts = mlcd_timesteps(segments)
    z, traj = jax.jit(lambda z: sampling.mlcd_sample(_toy_model, z, ts, SCHEDULE, return_trajectory=True))(z_T)
    assert traj.shape[0] == segments

    ac = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
    x = z_T.astype(np.float64)
    for i, t in enumerate(ts):  # numpy, float64: f, then DDIM along f's line to the next top
        eps = np.asarray(_toy_model(jnp.asarray(x, jnp.float32), jnp.full((3,), t)), np.float64)
        x0 = (x - np.sqrt(1 - ac[t]) * eps) / np.sqrt(ac[t])
        c_skip = 0.25 / ((10.0 * t) ** 2 + 0.25)
        c_out = 10.0 * t / np.sqrt((10.0 * t) ** 2 + 0.25)
        f = c_skip * x + c_out * x0
        if i == len(ts) - 1:
            x = f
        else:
            b = ts[i + 1]
            x = np.sqrt(ac[b]) * f + np.sqrt(1 - ac[b]) * (x - np.sqrt(ac[t]) * f) / np.sqrt(1 - ac[t])
        np.testing.assert_allclose(np.asarray(traj[i]), x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(z), x, rtol=1e-4, atol=1e-4)
    if segments == 1:  # one step: the LCM sampler's one step
        one = sampling.lcm_sample(_toy_model, jnp.asarray(z_T), ts, SCHEDULE)
        np.testing.assert_allclose(np.asarray(z), np.asarray(one), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- TLCM's sub-stepped teacher

def test_solver_steps_one_is_the_single_step_and_more_walk_the_interval():
    schedule, d, z, cond, uncond = _lcd_setup(4.0, "ddim", seed=2)
    teacher = LinearTeacher()
    models = distill.Models(None, teacher, None, None, schedule)
    tp = {"scale": jnp.float32(0.8)}
    one = distill.lcd_target_latents(models, tp, z, d, cond, uncond, "ddim")
    same = distill.lcd_target_latents(models, tp, z, d, cond, uncond, "ddim", solver_steps=1)
    np.testing.assert_array_equal(one, same)
    teacher.calls.clear()
    three = distill.lcd_target_latents(models, tp, z, d, cond, uncond, "ddim", solver_steps=3)
    assert teacher.calls == [2 * B] * 3
    # by hand: three guided DDIM steps over integer thirds of [t_end, t_start]
    x, span = z, d.t_start - d.t_end
    for i in range(3):
        s, t = d.t_start - (i * span) // 3, d.t_start - ((i + 1) * span) // 3
        x = distill.lcd_target_latents(models, tp, x, d._replace(t_start=s, t_end=t), cond, uncond, "ddim")
    np.testing.assert_allclose(np.asarray(three), np.asarray(x), rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(three - one))) > 1e-4
    with pytest.raises(ValueError, match="solver_steps"):
        distill_spec(solver_steps=0)


# --------------------------------------------------------------------------- iCT's lognormal draw

def test_lognormal_draw_follows_ict_weights():
    w = lognormal_pair_weights(SCHEDULE, 50, -1.1, 2.0)
    w = np.asarray(w, np.float64)
    assert w.shape == (50,) and abs(w.sum() - 1) < 1e-5 and np.all(w > 0)
    assert w.argmax() == 0 and w[0] > 0.2  # P_mean = -1.1: sigma ~ 0.33, the low-noise end
    assert int(jnp.argmax(lognormal_pair_weights(SCHEDULE, 50, 2.0, 0.5))) > 40  # sigma ~ 7.4: t near 950
    spec = distill_spec(timestep_draw="lognormal")
    d = jax.jit(distill.draw, static_argnums=2)(jax.random.PRNGKey(0), jnp.zeros((20000, 1, 1, 1)), spec, SCHEDULE)
    n = np.searchsorted(ddim_timesteps(1000, 50), np.asarray(d.t_start))
    freq = np.bincount(n, minlength=50) / len(n)
    assert np.all(np.abs(freq - w) <= 4 * np.sqrt(w * (1 - w) / len(n)) + 1e-3), np.abs(freq - w).max()
    with pytest.raises(ValueError, match="timestep_draw"):
        distill_spec(timestep_draw="beta")


# --------------------------------------------------------------------------- through the trainer

@pytest.mark.slow
def test_mlcd_trains_sharded_without_ema_resumes_and_exports(teacher, tmp_path):
    """MLCD (S = 2) with every option of the step (online target, 2 solver sub-steps, lognormal
    draw, iCT's pseudo-Huber) on 8 devices: a checkpoint without EMA, resume, export, mlcd sampler."""
    from lcm_jax import trainer
    from lcm_jax.pipeline import LCMPipeline
    overrides = {"mesh.data": 8, "lcd.num_segments": 2, "lcd.target": "online", "lcd.solver_steps": 2,
                 "lcd.timestep_draw": "lognormal", "lcd.loss": "huber", "lcd.huber_c": 0.0,
                 "sample_scheduler": "mlcd", "num_steps": 2}
    wd = str(tmp_path / "mlcd")
    trainer.train(small_config(teacher, **overrides), wd)
    state, _ = read_state(wd, 2)
    leaves = jax.tree_util.tree_leaves_with_path(state["opt_state"])
    assert not any("ema" in jax.tree_util.keystr(p).lower() for p, _ in leaves)  # Adam only: no theta^- copy
    final = trainer.train(small_config(teacher, **dict(overrides, num_steps=3)), wd)  # resumes at 2
    assert [r["step"] for r in metrics(wd)] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in metrics(wd))
    state, _ = read_state(wd, 3)
    pipe = LCMPipeline.from_pretrained(final)
    jax.tree.map(np.testing.assert_array_equal, pipe.unet_params, jax.device_get(state["params"]))  # online params
    images = pipe(["a handwritten digit three"], num_inference_steps=2, guidance_scale=3.0, scheduler="mlcd")
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8


@pytest.mark.slow
def test_consistency_training_from_a_diffusion_model(teacher, tmp_path):
    """mode ct: LCF's pair from real data, the student from the teacher's weights (no teacher in
    the loss); an LCM comes out. An LCM as the start is refused."""
    from lcm_jax import trainer
    from lcm_jax.pipeline import LCMPipeline
    c = small_config(teacher, mode="ct", num_steps=2, **{"lcd.omega_min": 0.0, "lcd.omega_max": 0.0,
                                                          "lcd.timestep_draw": "lognormal", "lcd.loss": "huber",
                                                          "lcd.huber_c": 0.0})
    final = trainer.train(c, str(tmp_path / "ct"))
    assert all(np.isfinite(r["loss"]) for r in metrics(str(tmp_path / "ct")))
    assert LCMPipeline.from_pretrained(final).is_lcm
    with pytest.raises(ValueError, match="already an LCM"):
        trainer.train(small_config(final, mode="ct"), str(tmp_path / "ct2"))
    assert not os.path.exists(tmp_path / "ct2" / "checkpoints" / "0")


def test_mlcd_configs():
    from configs import mlcd
    for arg in ("", "datafree"):
        c = mlcd.get_config(arg)
        spec = distill.DistillSpec.from_config(c)
        assert spec.num_segments == 4 and not spec.uses_ema and c.sample_scheduler == "mlcd"
        assert tuple(c.sample_steps) == (4,)
    assert spec.solver_steps == 2 and spec.num_ddim_timesteps == 25 and c.data.source == "teacher"
    assert c.data.prompts == "prompts.txt"  # a file path stays a string
    with pytest.raises(ValueError, match="datafree"):
        mlcd.get_config("bogus")
