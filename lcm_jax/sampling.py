"""Samplers: LCM multistep (Algorithm 3), multistep consistency (MLCD segments) and the
teachers' DDIM / DPM-Solver / DPM-Solver++.

Each is a pure, jit-traceable function over all steps (one lax.scan, so one compile per
(shape, num_steps)), reproducing the matching diffusers scheduler step by step.
``model_fn(z [B,C,H,W] float32, t [B] int32) -> model output`` is the (already
CFG-combined) network in the schedule's prediction_type; it is an ordinary closure, so the
caller can jit the whole thing (UNet + CFG + sampler + VAE decode) at once.
Latents are carried in float32 (diffusers upcasts the same way); init_noise_sigma is 1 for
all of these schedulers, so z_T is standard normal noise.

``make_sample_fn`` builds the whole program a pipeline jits (UNet with LCM's omega embedding or
CFG, the sampler loop, VAE decode) as a pure function of params and inputs.
"""
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import lora
from lcm_jax.consistency import consistency_fn, segment_fn
from lcm_jax.models.embeddings import guidance_embedding
from lcm_jax.schedules import (NoiseSchedule, ddim_sampling_timesteps, dpm_sampling_timesteps,
                               to_x0_eps)

SCHEDULERS = ("lcm", "mlcd", "ddim", "dpm", "dpm++")
CONSISTENCY_SCHEDULERS = ("lcm", "mlcd")  # the student samplers (the others: the teacher's, with CFG)
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
INIT_NOISE_SIGMA = 1.0  # DDIM, DPMSolverMultistep and LCM schedulers all start from N(0, I)


def _batch_t(t: jax.Array, z: jax.Array) -> jax.Array:
    return jnp.broadcast_to(t.astype(jnp.int32), z.shape[:1])  # [B]


def _alphas_cumprod_at(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
    """ac[t] for t >= 0, final_alpha_cumprod for t < 0 (diffusers' "prev" convention)."""
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)],
                     schedule.final_alpha_cumprod)


def _finish(z, traj, return_trajectory):
    return (z, traj) if return_trajectory else z


# --------------------------------------------------------------------------- LCM

def lcm_sample(model_fn: ModelFn, z_T: jax.Array, timesteps: Union[Sequence[int], jax.Array],
               schedule: NoiseSchedule, rng: Optional[jax.Array] = None,
               noises: Optional[jax.Array] = None, *, return_trajectory: bool = False,
               num_real: Optional[int] = None):
    """LCM multistep sampling, as diffusers' LCMScheduler.step in a loop.

    At each timestep t: denoised = c_skip(t) z + c_out(t) x0_pred (consistency_fn); then,
    except at the last step, z = sqrt(ac[t']) denoised + sqrt(1 - ac[t']) noise with t' the
    next timestep and fresh noise. Returns the final denoised latent [B,C,H,W] float32.

    timesteps: [S] descending (``lcm_timesteps``); rng: for the S-1 noises, unless
    ``noises`` [S-1, B,C,H,W] gives them (to replay a diffusers run). With
    ``return_trajectory`` also returns [S, B,C,H,W]: z after every step (diffusers' prev_sample).
    ``num_real``: only the first examples are real (the rest pad a batch to a mesh): their noise is
    drawn as for a batch of ``num_real``, so the padding changes no real example.
    """
    ts = jnp.asarray(timesteps, jnp.int32)  # [S]
    num_steps = ts.shape[0]
    z = z_T.astype(jnp.float32) * INIT_NOISE_SIGMA
    t_next = jnp.concatenate([ts[1:], ts[-1:]])  # LCMScheduler: prev_timestep = next in the list
    is_last = jnp.arange(num_steps) == num_steps - 1
    if noises is not None:
        want = (num_steps - 1,) + z.shape
        if noises.shape != want:
            raise ValueError(f"noises has shape {noises.shape}, expected [steps-1, *z.shape] = {want}")
        source = jnp.concatenate([noises.astype(jnp.float32), jnp.zeros((1,) + z.shape)], 0)
    elif num_steps > 1:
        if rng is None:
            raise ValueError("lcm_sample needs rng (or noises) for more than one step")
        source = jax.random.split(rng, num_steps)
    else:
        source = jnp.zeros((1,) + z.shape)  # one step: no noise is drawn

    def step(z, xs):
        t, t_prev, last, src = xs
        tb = _batch_t(t, z)
        denoised = consistency_fn(model_fn(z, tb), z, tb, schedule)
        if noises is None and num_steps > 1:
            real = z.shape[0] if num_real is None else num_real
            src = jax.random.normal(src, (real,) + z.shape[1:], jnp.float32)
            if real < z.shape[0]:
                src = jnp.concatenate([src, jnp.zeros((z.shape[0] - real,) + z.shape[1:], jnp.float32)])
        ac_prev = _alphas_cumprod_at(schedule, t_prev)
        renoised = jnp.sqrt(ac_prev) * denoised + jnp.sqrt(1.0 - ac_prev) * src
        z = jnp.where(last, denoised, renoised).astype(jnp.float32)
        return z, (z if return_trajectory else None)

    z, traj = jax.lax.scan(step, z, (ts, t_next, is_last, source))
    return _finish(z, traj, return_trajectory)


# --------------------------------------------------------------------------- multistep consistency

def mlcd_sample(model_fn: ModelFn, z_T: jax.Array, timesteps: Union[Sequence[int], jax.Array],
                schedule: NoiseSchedule, *, return_trajectory: bool = False):
    """Multistep consistency sampling through segment boundaries (``mlcd_timesteps``): at each
    timestep t, z = segment_fn(f_theta(z, t)) at the next timestep (the last step: the clean
    sample f). Deterministic, one model call per segment; a student trained with S segments
    (lcd.num_segments) is sampled with S steps. Returns [B,C,H,W] float32 (and with
    ``return_trajectory`` z after every step, [S, B,C,H,W])."""
    ts = jnp.asarray(timesteps, jnp.int32)  # [S]
    boundaries = jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])  # [S]

    def step(z, xs):
        t, b = xs
        tb = _batch_t(t, z)
        f = consistency_fn(model_fn(z, tb), z, tb, schedule)
        z = segment_fn(f, z, tb, _batch_t(b, z), schedule).astype(jnp.float32)
        return z, (z if return_trajectory else None)

    z, traj = jax.lax.scan(step, z_T.astype(jnp.float32) * INIT_NOISE_SIGMA, (ts, boundaries))
    return _finish(z, traj, return_trajectory)


# --------------------------------------------------------------------------- DDIM

def ddim_sample(model_fn: ModelFn, z_T: jax.Array, schedule: NoiseSchedule, num_steps: int, *,
                timestep_spacing: Optional[str] = None, return_trajectory: bool = False):
    """Deterministic DDIM (eta = 0), as diffusers' DDIMScheduler (set_timesteps + step):
    x0, eps from the model output; z' = sqrt(ac_prev) x0 + sqrt(1 - ac_prev) eps with
    prev = t - T // num_steps (final_alpha_cumprod below 0). num_steps model calls."""
    ts = ddim_sampling_timesteps(num_steps, schedule, timestep_spacing)  # numpy [S]
    prev = ts - schedule.num_train_timesteps // num_steps
    z = z_T.astype(jnp.float32) * INIT_NOISE_SIGMA

    def step(z, xs):
        t, t_prev = xs
        tb = _batch_t(t, z)
        ac = schedule.alphas_cumprod[t]
        x0, eps = to_x0_eps(model_fn(z, tb), z, jnp.sqrt(ac), jnp.sqrt(1.0 - ac),
                            schedule.prediction_type)
        ac_prev = _alphas_cumprod_at(schedule, t_prev)
        z = (jnp.sqrt(ac_prev) * x0 + jnp.sqrt(1.0 - ac_prev) * eps).astype(jnp.float32)
        return z, (z if return_trajectory else None)

    z, traj = jax.lax.scan(step, z, (jnp.asarray(ts), jnp.asarray(prev)))
    return _finish(z, traj, return_trajectory)


# --------------------------------------------------------------------------- DPM-Solver (multistep)

def _dpm_multistep(model_fn, z_T, schedule, num_steps, algorithm, final_sigmas_type,
                   timestep_spacing, lower_order_final, return_trajectory):
    """diffusers DPMSolverMultistepScheduler, solver_order=2, solver_type="midpoint"."""
    if final_sigmas_type not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigmas_type={final_sigmas_type!r}, expected 'zero' or 'sigma_min'")
    if algorithm == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError("final_sigmas_type='zero' is not supported for algorithm 'dpmsolver' "
                         "(as in diffusers); use 'sigma_min'")
    ts = dpm_sampling_timesteps(num_steps, schedule, timestep_spacing)  # numpy [S]
    S = len(ts)
    ac = schedule.alphas_cumprod
    sig_all = ((1.0 - ac) / ac) ** 0.5  # [T] float32, diffusers' sigmas
    last = jnp.zeros((1,), jnp.float32) if final_sigmas_type == "zero" else sig_all[:1]
    sigmas = jnp.concatenate([sig_all[ts], last])  # [S + 1]
    sig_s0, sig_t = sigmas[:-1], sigmas[1:]
    sig_s1 = jnp.concatenate([sigmas[:1], sigmas[:-2]])  # sigmas[i - 1] (unused at i = 0)
    final_low = np.arange(S) == S - 1
    final_low &= (lower_order_final and S < 15) or final_sigmas_type == "zero"
    second = (np.arange(S) >= 1) & ~final_low  # static per step: 2nd order or 1st

    def alpha_sigma_of(sig):  # DPMSolverMultistepScheduler._sigma_to_alpha_sigma_t
        alpha = 1.0 / ((sig**2 + 1.0) ** 0.5)
        return alpha, sig * alpha

    def step(carry, xs):
        z, m1 = carry
        t, s0, st, s1, use2 = xs
        a_s0, g_s0 = alpha_sigma_of(s0)
        a_t, g_t = alpha_sigma_of(st)
        a_s1, g_s1 = alpha_sigma_of(s1)
        x0, eps = to_x0_eps(model_fn(z, _batch_t(t, z)), z, a_s0, g_s0, schedule.prediction_type)
        m0 = x0 if algorithm == "dpmsolver++" else eps
        lam_t, lam_s0, lam_s1 = (jnp.log(a) - jnp.log(g) for a, g in
                                 ((a_t, g_t), (a_s0, g_s0), (a_s1, g_s1)))
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = jnp.where(use2, h_0 / h, 1.0)  # safe where the 2nd-order branch is unused
        d1 = (1.0 / r0) * (m0 - m1)
        if algorithm == "dpmsolver++":
            coef = a_t * (jnp.exp(-h) - 1.0)
            first = (g_t / g_s0) * z - coef * m0
        else:
            coef = g_t * (jnp.exp(h) - 1.0)
            first = (a_t / a_s0) * z - coef * m0
        z_next = jnp.where(use2, first - 0.5 * coef * d1, first).astype(jnp.float32)
        return (z_next, m0), (z_next if return_trajectory else None)

    z = z_T.astype(jnp.float32) * INIT_NOISE_SIGMA
    xs = (jnp.asarray(ts), sig_s0, sig_t, sig_s1, jnp.asarray(second))
    (z, _), traj = jax.lax.scan(step, (z, jnp.zeros_like(z)), xs)
    return _finish(z, traj, return_trajectory)


def dpm_sample(model_fn: ModelFn, z_T: jax.Array, schedule: NoiseSchedule, num_steps: int, *,
               timestep_spacing: Optional[str] = None, final_sigmas_type: str = "sigma_min",
               lower_order_final: bool = True, return_trajectory: bool = False):
    """Multistep DPM-Solver-2 (noise prediction), as diffusers' DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver", solver_order=2, solver_type="midpoint",
    final_sigmas_type="sigma_min" — diffusers rejects "zero" for this algorithm). num_steps
    model calls; first step (and the last when lower_order_final and num_steps < 15) 1st order."""
    return _dpm_multistep(model_fn, z_T, schedule, num_steps, "dpmsolver", final_sigmas_type,
                          timestep_spacing, lower_order_final, return_trajectory)


def dpmpp_sample(model_fn: ModelFn, z_T: jax.Array, schedule: NoiseSchedule, num_steps: int, *,
                 timestep_spacing: Optional[str] = None, final_sigmas_type: str = "zero",
                 lower_order_final: bool = True, return_trajectory: bool = False):
    """DPM-Solver++(2M), as diffusers' DPMSolverMultistepScheduler defaults
    (algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
    lower_order_final=True, final_sigmas_type="zero": the last step returns x0_pred)."""
    return _dpm_multistep(model_fn, z_T, schedule, num_steps, "dpmsolver++", final_sigmas_type,
                          timestep_spacing, lower_order_final, return_trajectory)


TEACHER_SAMPLERS = {"ddim": ddim_sample, "dpm": dpm_sample, "dpm++": dpmpp_sample}


def teacher_sample(scheduler: str, model_fn: ModelFn, z_T: jax.Array, schedule: NoiseSchedule,
                   num_steps: int, **kwargs):
    """Dispatches on the pipeline's scheduler name: "ddim" | "dpm" | "dpm++"."""
    if scheduler not in TEACHER_SAMPLERS:
        raise ValueError(f"scheduler={scheduler!r}, expected one of {sorted(TEACHER_SAMPLERS)} "
                         "(or 'lcm', see lcm_sample)")
    return TEACHER_SAMPLERS[scheduler](model_fn, z_T, schedule, num_steps, **kwargs)


# ---------------------------------------------------------------- the programs a pipeline jits

def make_model_fn(unet: Any, params: Any, cond: jax.Array,
                  uncond: Optional[jax.Array], guidance_scale: jax.Array,
                  added_cond: Optional[dict] = None, added_uncond: Optional[dict] = None):
    """model_fn(z, t) -> model output for the samplers: LCM omega-embedding or CFG.

    ``added_cond`` / ``added_uncond``: the UNet's added_cond_kwargs (SDXL: text_embeds [B, P],
    time_ids [B, 6]) for cond / uncond; None for SD1/SD2."""
    if uncond is not None and (added_cond is None) != (added_uncond is None):
        raise ValueError("CFG needs added conditioning for both cond and uncond, or for neither")

    def model_fn(z, t):  # z: [B, C, h, w], t: [B]
        if unet.config.time_cond_proj_dim is not None:
            w = jnp.full((z.shape[0],), guidance_scale - 1.0, jnp.float32)
            w_emb = guidance_embedding(w, unet.config.time_cond_proj_dim)
            return unet.apply({"params": params}, z, t, cond, w_emb, added_cond)
        if uncond is None:
            return unet.apply({"params": params}, z, t, cond, None, added_cond)
        both = lambda u, c: jnp.concatenate([u, c])  # noqa: E731  [2B, ...], uncond first
        out = unet.apply({"params": params}, both(z, z), both(t, t), both(uncond, cond), None,
                         jax.tree.map(both, added_uncond, added_cond))
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return model_fn


def make_sample_fn(unet: Any, vae: Any, schedule: NoiseSchedule,
                   scheduler: str, steps: int, use_cfg: bool, decode: bool = True,
                   num_real: Optional[int] = None):
    """The pure function the pipeline jits: initial latents -> images [N, H, W, 3] in [0, 1]
    (``decode=False``: the final latents [N, C, h, w]). ``params["lora"]`` (optional):
    ((lora tree, strength), ...) merged into ``params["unet"]`` first (unfused LoRA).
    ``added`` (SDXL): (added_cond_kwargs for cond, for uncond or None), see make_model_fn."""
    vcfg = vae.config
    # diffusers' SDXL pipeline (not SD1's) de-normalises with the VAE's latents_mean/std when given
    stats = (unet.config.addition_embed_type == "text_time" and vcfg.latents_mean is not None
             and vcfg.latents_std is not None)

    def unet_params(params):
        out = params["unet"]
        for tree, strength in params.get("lora", ()):
            out = lora.merge(out, tree, strength)
        return out

    def model(params, cond, uncond, guidance_scale, added):
        added_cond, added_uncond = (None, None) if added is None else added
        return make_model_fn(unet, unet_params(params), cond, uncond if use_cfg else None, guidance_scale,
                             added_cond, added_uncond if use_cfg else None)

    def finish(params, z0):
        if not decode:
            return z0
        if stats:
            mean, std = (jnp.asarray(v, jnp.float32).reshape(1, -1, 1, 1) for v in (vcfg.latents_mean, vcfg.latents_std))
            z0 = z0 * std / vcfg.scaling_factor + mean
        else:
            z0 = z0 / vcfg.scaling_factor
        x = vae.apply({"params": params["vae"]}, z0, method=vae.decode)  # [N, 3, H, W]
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    if scheduler in CONSISTENCY_SCHEDULERS:
        def sample(params, z, cond, uncond, guidance_scale, rng, noises, timesteps, added=None):
            model_fn = model(params, cond, uncond, guidance_scale, added)
            if scheduler == "lcm":
                z0 = lcm_sample(model_fn, z, timesteps, schedule, rng=rng, noises=noises, num_real=num_real)
            else:  # deterministic: no per-step noise
                z0 = mlcd_sample(model_fn, z, timesteps, schedule)
            return finish(params, z0)
    else:
        def sample(params, z, cond, uncond, guidance_scale, added=None):
            z0 = teacher_sample(scheduler, model(params, cond, uncond, guidance_scale, added), z,
                                         schedule, steps)
            return finish(params, z0)
    return sample
