"""Latent Consistency Distillation (LCD), Fine-tuning (LCF) and Training (CT): the loss and the train step.

Pure functions of pytrees. The models are static Flax definitions (``Models``); the frozen
teacher, VAE, text encoder and empty-prompt embedding are one pytree argument (``frozen``)
that is never part of the train state; the EMA target theta^- lives in ``opt_state``.

LCM-LoRA (``DistillSpec.lora_alpha`` set): the trained params are a LoRA tree (lcm_jax.lora)
on the teacher's own UNet, merged into ``frozen["teacher"]`` inside the step (so the base
weights are held once and only the LoRA is in the state); the student has no omega embedding
(omega only guides the teacher's target) and the target is the same LoRA student under
stop-gradient, no EMA, as diffusers' train_lcm_distill_lora_*.py.

The LCM successors are options of the same step:
- multistep LCD (``num_segments`` S > 1; Multistep / Phased CMs, TLCM): the skipping schedule is
  cut into S segments and both sides of the loss are mapped to the lower boundary of the start's
  segment (consistency.segment_fn), sampled with S steps (``scheduler="mlcd"``); S = 1 is LCD;
- a target without EMA (``ema_target=False``: the online student under stop-gradient);
- TLCM's multistep teacher solver (``solver_steps`` m > 1 sub-steps of Psi between the sparse
  timesteps t_{n+k} and t_n, guidance at each);
- iCT's lognormal draw of the interval (``timestep_draw="lognormal"``) and pseudo-Huber loss
  (``loss="huber"``, ``huber_c <= 0``: c = 0.00054 sqrt(d));
- consistency training without a teacher (``mode="ct"``): LCF's pair from real data, the student
  initialised from a plain diffusion model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lcm_jax import lora
from lcm_jax.consistency import consistency_fn, segment_fn
from lcm_jax.data.decode import check_caption_dropout
from lcm_jax.ema import ema_params
from lcm_jax.models.clip import CLIPTextModel
from lcm_jax.models.embeddings import guidance_embedding
from lcm_jax.models.unet import UNet2DConditionModel
from lcm_jax.models.vae import AutoencoderKL, sample_latent
from lcm_jax.schedules import (NoiseSchedule, alpha_sigma, expand_like, lognormal_pair_weights,
                               sample_timestep_pair, segment_boundaries, segment_edges, to_x0_eps)
from lcm_jax.solvers import get_solver
from lcm_jax.train_state import TrainState, apply_loss

MODES = ("lcd", "lcf", "ct")
LOSSES = ("l2", "huber")
TIMESTEP_DRAWS = ("uniform", "lognormal")
TARGETS = ("ema", "online")


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """The static hyperparameters of the step (hashable), made by ``from_config``: their defaults and
    meanings are configs/common.py's (``config.lcd`` and friends), the one place they are declared."""

    mode: str
    num_ddim_timesteps: int
    omega_min: float
    omega_max: float
    solver: str
    loss: str
    huber_c: float
    caption_dropout: float
    lora_alpha: Optional[float]  # None: params are the student; else a LoRA tree (alpha / r)
    num_segments: int            # MLCD segments S (1: LCD, the target maps to the clean sample)
    ema_target: bool             # theta^- = EMA in opt_state; False: the online student, stop-gradient
    solver_steps: int            # teacher sub-steps of Psi per interval (TLCM's multistep solver)
    timestep_draw: str           # uniform n | lognormal (iCT)
    lognormal_mean: float
    lognormal_std: float

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not supported: expected one of {MODES}")
        if self.loss not in LOSSES:
            raise ValueError(f"lcd.loss {self.loss!r} is not supported: expected one of {LOSSES}")
        get_solver(self.solver)  # raises on an unknown solver
        if not self.omega_min <= self.omega_max:
            raise ValueError(f"lcd.omega_min {self.omega_min} > lcd.omega_max {self.omega_max}")
        check_caption_dropout(self.caption_dropout)
        if self.lora_alpha is not None and self.mode != "lcd":
            raise ValueError(f"LoRA training (lora.rank > 0) is LCM-LoRA distillation: it needs mode='lcd', "
                             f"got mode={self.mode!r}")
        segment_edges(self.num_ddim_timesteps, self.num_segments)  # raises on S outside [1, N]
        if self.solver_steps < 1:
            raise ValueError(f"lcd.solver_steps must be >= 1, got {self.solver_steps}")
        if self.solver_steps > 1 and self.mode != "lcd":
            raise ValueError(f"lcd.solver_steps={self.solver_steps} sub-steps the teacher's solver: it needs mode='lcd'")
        if self.timestep_draw not in TIMESTEP_DRAWS:
            raise ValueError(f"lcd.timestep_draw {self.timestep_draw!r}: expected one of {TIMESTEP_DRAWS}")
        if self.lognormal_std <= 0:
            raise ValueError(f"lcd.lognormal_std must be > 0, got {self.lognormal_std}")

    @property
    def lora(self) -> bool:
        return self.lora_alpha is not None

    @property
    def uses_ema(self) -> bool:
        """theta^- is an EMA held in opt_state (not with LCM-LoRA or lcd.target='online')."""
        return self.ema_target and not self.lora

    @classmethod
    def from_config(cls, config) -> "DistillSpec":
        c = config.lcd
        target = c.target
        if target not in TARGETS:
            raise ValueError(f"lcd.target {target!r}: expected one of {TARGETS} (ema: theta^- = EMA of theta; "
                             "online: the student itself under stop-gradient)")
        alpha = lora_alpha(config)
        return cls(mode=config.mode, num_ddim_timesteps=c.num_ddim_timesteps, omega_min=c.omega_min,
                   omega_max=c.omega_max, solver=c.solver, loss=c.loss, huber_c=c.huber_c,
                   caption_dropout=config.data.caption_dropout, lora_alpha=alpha,
                   num_segments=int(c.num_segments),
                   ema_target=target == "ema",  # LCM-LoRA: always the online LoRA (uses_ema)
                   solver_steps=int(c.solver_steps), timestep_draw=c.timestep_draw,
                   lognormal_mean=float(c.lognormal_mean), lognormal_std=float(c.lognormal_std))


def lora_rank(config) -> int:
    """``config.lora.rank`` (0, or no ``lora`` section: full-parameter training)."""
    section = config.get("lora")
    rank = int(section.rank) if section is not None else 0
    if rank < 0:
        raise ValueError(f"config.lora.rank must be >= 0 (0: no LoRA), got {rank}")
    return rank


def lora_alpha(config) -> Optional[float]:
    """The LoRA alpha (``config.lora.alpha``; 0 means alpha = rank, factor 1), None without LoRA."""
    rank = lora_rank(config)
    if not rank:
        return None
    alpha = float(config.lora.alpha)
    if alpha < 0:
        raise ValueError(f"config.lora.alpha must be >= 0 (0: alpha = rank), got {alpha}")
    return alpha or float(rank)


class Models(NamedTuple):
    """Static module definitions the step closes over (the teacher is None for LCF)."""

    student: UNet2DConditionModel
    teacher: Optional[UNet2DConditionModel]
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    schedule: NoiseSchedule
    text_encoder_2: Optional[CLIPTextModel] = None  # SDXL's second encoder (with projection)


# --------------------------------------------------------------------------- pieces

def encode_batch(models: Models, frozen: Any, batch: dict, rng: jax.Array, with_added: bool = False):
    """Scaled latents [B, C, h, w] and prompt embeddings [B, L, D] for a batch (``with_added``:
    also the UNet's added conditioning, see ``encode_text``).

    Takes cached ``latent_mean``/``latent_logvar`` and ``prompt_embeds`` when present,
    else runs the frozen VAE on ``pixels`` [B, 3, H, W] and the text encoder(s) on ``input_ids``.
    Latents are a posterior sample times the VAE's scaling factor, as diffusers trains.
    """
    if "latent_mean" in batch:
        mean, logvar = batch["latent_mean"], batch["latent_logvar"]
    else:
        mean, logvar = models.vae.apply({"params": frozen["vae"]}, batch["pixels"], method=models.vae.encode)
    latents = sample_latent(mean, logvar, rng) * models.vae.config.scaling_factor
    cond, added = (batch["prompt_embeds"], None) if "prompt_embeds" in batch else encode_text(models, frozen, batch)
    latents, cond, added = jax.lax.stop_gradient((latents, cond.astype(jnp.float32), added))
    return (latents, cond, added) if with_added else (latents, cond)


def encode_text(models: Models, frozen: Any, batch: dict) -> tuple[jax.Array, Optional[dict]]:
    """Prompt embeddings [B, L, D] and the UNet's added conditioning: None for SD1/SD2; SDXL
    (``models.text_encoder_2``): both encoders' penultimate hidden states concatenated, and
    {"text_embeds": encoder 2's pooled projection [B, P], "time_ids": ``frozen["time_ids"]``
    [B, 6]}, as diffusers' SDXL pipeline and LCM script encode (ids: ``input_ids``, ``input_ids_2``)."""
    if models.text_encoder_2 is None:
        return models.text_encoder.apply({"params": frozen["text"]}, batch["input_ids"]).last_hidden_state, None
    o1 = models.text_encoder.apply({"params": frozen["text"]}, batch["input_ids"], output_hidden_states=True)
    o2 = models.text_encoder_2.apply({"params": frozen["text_2"]}, batch["input_ids_2"], output_hidden_states=True)
    cond = jnp.concatenate([o1.hidden_states[-2], o2.hidden_states[-2]], axis=-1)
    b = cond.shape[0]
    time_ids = jnp.broadcast_to(frozen["time_ids"], (b, frozen["time_ids"].shape[-1]))
    return cond, {"text_embeds": o2.text_embeds.astype(jnp.float32), "time_ids": time_ids}


def consistency_distance(x: jax.Array, y: jax.Array, loss: str, huber_c: float) -> jax.Array:
    """d(x, y) averaged over the batch: L2 = mean squared error (diffusers' F.mse_loss);
    pseudo-Huber = sqrt(||x - y||^2 + c^2) - c per example (||.|| over C, H, W), with
    c <= 0 meaning iCT's c = 0.00054 * sqrt(d)."""
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    if loss == "l2":
        return jnp.mean((x - y) ** 2)
    d = math.prod(x.shape[1:])
    c = huber_c if huber_c > 0 else 0.00054 * math.sqrt(d)
    sq = jnp.sum((x - y) ** 2, axis=tuple(range(1, x.ndim)))
    return jnp.mean(jnp.sqrt(sq + c * c) - c)


class Draws(NamedTuple):
    """The random quantities of one example set (exposed so tests can replay them)."""

    t_start: jax.Array  # [B] int32, t_{n+k}
    t_end: jax.Array    # [B] int32, t_n
    noise: jax.Array    # [B, C, h, w]
    omega: jax.Array    # [B]
    drop: jax.Array     # [B] bool, caption dropped
    t_boundary: jax.Array  # [B] int32, the start's segment boundary (-1: the clean sample; always for S = 1)


def draw(rng: jax.Array, latents: jax.Array, spec: DistillSpec, schedule: NoiseSchedule) -> Draws:
    r_t, r_noise, r_omega, r_drop = jax.random.split(rng, 4)
    b, T, N = latents.shape[0], schedule.num_train_timesteps, spec.num_ddim_timesteps
    weights = None if spec.timestep_draw == "uniform" else lognormal_pair_weights(
        schedule, N, spec.lognormal_mean, spec.lognormal_std)
    t_start, t_end = sample_timestep_pair(r_t, b, N, T, weights)
    noise = jax.random.normal(r_noise, latents.shape, jnp.float32)
    omega = jax.random.uniform(r_omega, (b,), jnp.float32, spec.omega_min, spec.omega_max)
    drop = jax.random.uniform(r_drop, (b,)) < spec.caption_dropout
    n = (t_start + 1) // (T // N) - 1  # the skipping-step index of t_start
    t_boundary = jnp.asarray(segment_boundaries(T, N, spec.num_segments))[n]
    return Draws(t_start, t_end, noise, omega, drop, t_boundary)


def lcd_target_latents(models: Models, teacher_params: Any, z_start: jax.Array, d: Draws,
                       cond: jax.Array, uncond: jax.Array, solver: str, added: Optional[dict] = None,
                       added_uncond: Optional[dict] = None, solver_steps: int = 1) -> jax.Array:
    """The guidance-augmented ODE target z_hat_{t_n} = (1 + w) Psi(z, c) - w Psi(z, empty),
    written as z + (1+w)(Psi_c - z) - w(Psi_u - z); both branches in one batched teacher call
    per solver stage (2B examples). ``solver_steps`` m > 1: that guided step m times over equal
    integer sub-intervals of [t_n, t_{n+k}] (TLCM's multistep teacher between sparse timesteps).
    ``added``/``added_uncond``: SDXL's added conditioning of each branch (None for SD1/SD2).
    [B, C, h, w], no gradient."""
    schedule = models.schedule
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), added, added_uncond)

    def denoise(z, t):  # z: [2B, C, h, w], t: [2B]
        out = models.teacher.apply({"params": teacher_params}, z, t, jnp.concatenate([cond, uncond]), None, both)
        alpha, sigma = alpha_sigma(schedule, t)
        return to_x0_eps(out.astype(jnp.float32), z, alpha, sigma, schedule.prediction_type)

    w = expand_like(d.omega, z_start)
    span = d.t_start - d.t_end
    z = z_start
    for i in range(solver_steps):  # sub-step i: t_start - i span / m -> t_start - (i + 1) span / m
        s, t = d.t_start - (i * span) // solver_steps, d.t_start - ((i + 1) * span) // solver_steps
        z_end = get_solver(solver)(denoise, jnp.concatenate([z, z]), jnp.concatenate([s, s]),
                                   jnp.concatenate([t, t]), schedule)
        z_c, z_u = jnp.split(z_end, 2)
        z = z + (1.0 + w) * (z_c - z) - w * (z_u - z)
    return jax.lax.stop_gradient(z)


def student_params(params: Any, frozen: Any, spec: DistillSpec) -> Any:
    """The student UNet's params: ``params`` itself, or (LCM-LoRA) the teacher's with the LoRA
    tree ``params`` merged in (W + alpha / r * down @ up; differentiable in the LoRA)."""
    if not spec.lora:
        return params
    return lora.merge(frozen["teacher"], params, alpha=spec.lora_alpha)


def student_f(models: Models, params: Any, z: jax.Array, t: jax.Array, cond: jax.Array,
              omega: jax.Array, added: Optional[dict] = None) -> jax.Array:
    """f_theta(z, omega, c, t) = c_skip z + c_out x0_pred from the student UNet. [B, C, h, w]

    A student without ``time_cond_proj_dim`` (LCM-LoRA) is not conditioned on omega; ``added``:
    SDXL's added conditioning (``encode_text``)."""
    dim = models.student.config.time_cond_proj_dim
    w_emb = None if dim is None else guidance_embedding(omega, dim)
    out = models.student.apply({"params": params}, z, t, cond, w_emb, added)
    return consistency_fn(out.astype(jnp.float32), z, t, models.schedule)


def distill_loss(params: Any, target_params: Any, frozen: Any, latents: jax.Array, cond: jax.Array,
                 rng: jax.Array, spec: DistillSpec, models: Models,
                 added: Optional[dict] = None) -> tuple[jax.Array, dict]:
    """LCD (Algorithm 1) or LCF loss for one batch of latents [B, C, h, w] and prompts [B, L, D].

    ``params``/``target_params``: the trained tree (student or LoRA, see ``student_params``) and
    theta^-; ``target_params=None`` makes the target the online student under stop-gradient.
    ``added``: SDXL's added conditioning (its unconditional pooled embedding: ``frozen["uncond_pooled"]``)."""
    online = student_params(params, frozen, spec)
    target_params = online if target_params is None else student_params(target_params, frozen, spec)
    d = draw(rng, latents, spec, models.schedule)
    uncond = jnp.broadcast_to(frozen["uncond"], cond.shape)
    cond = jnp.where(d.drop[:, None, None], uncond, cond)
    added_uncond = None
    if added is not None:  # the dropped captions' pooled embedding too; time ids stay
        pooled_u = jnp.broadcast_to(frozen["uncond_pooled"], added["text_embeds"].shape)
        added_uncond = dict(added, text_embeds=pooled_u)
        added = dict(added, text_embeds=jnp.where(d.drop[:, None], pooled_u, added["text_embeds"]))
    a_s, s_s = alpha_sigma(models.schedule, d.t_start)
    z_start = expand_like(a_s, latents) * latents + expand_like(s_s, latents) * d.noise
    if spec.mode == "lcd":
        z_end = lcd_target_latents(models, frozen["teacher"], z_start, d, cond, uncond, spec.solver, added,
                                   added_uncond, spec.solver_steps)
    else:  # LCF / CT: the same noise at the earlier timestep, from real data
        a_e, s_e = alpha_sigma(models.schedule, d.t_end)
        z_end = expand_like(a_e, latents) * latents + expand_like(s_e, latents) * d.noise
    target = student_f(models, target_params, z_end, d.t_end, cond, d.omega, added)
    target = jax.lax.stop_gradient(segment_fn(target, z_end, d.t_end, d.t_boundary, models.schedule))
    pred = student_f(models, online, z_start, d.t_start, cond, d.omega, added)
    pred = segment_fn(pred, z_start, d.t_start, d.t_boundary, models.schedule)  # S = 1: pred itself
    loss = consistency_distance(pred, target, spec.loss, spec.huber_c)
    return loss, {"omega_mean": jnp.mean(d.omega), "t_start_mean": jnp.mean(d.t_start.astype(jnp.float32))}


def train_step(state: TrainState, batch: dict, frozen: Any, *, spec: DistillSpec, models: Models,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One optimizer (micro-)step. ``frozen`` = {teacher, vae, text, uncond} (SDXL: + text_2,
    uncond_pooled, time_ids); jit with
    ``donate_argnums=0``. Returns the new state and scalar metrics (incl. ``finite``).
    The target is theta^- from ``opt_state``, or for LCM-LoRA the online student (no EMA)."""
    rng, r_enc, r_loss = jax.random.split(state.rng, 3)
    latents, cond, added = encode_batch(models, frozen, batch, r_enc, with_added=True)
    target = ema_params(state.opt_state) if spec.uses_ema else None
    return apply_loss(state, tx, lambda p: distill_loss(p, target, frozen, latents, cond, r_loss, spec, models,
                                                        added), rng)
