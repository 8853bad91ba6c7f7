"""Train a small latent-diffusion teacher from images: an autoencoder, then an epsilon UNet.

Stable Diffusion's recipe at toy size, for the digits reproduction (configs/digits.py):
- AutoencoderKL trained with reconstruction + a small KL term (no GAN or LPIPS at 16x16);
  its ``scaling_factor`` is 1/std of the trained latents, which is how SD's 0.18215 was set.
- The text encoder is a frozen random CLIP over a word-level tokenizer: SD freezes its
  encoder too, and the ten captions differ in one token, so a random encoder already maps
  them to distinct embeddings for the UNet's cross-attention to read.
- The UNet learns the epsilon-prediction DDPM loss with caption dropout (the empty prompt),
  so classifier-free guidance works.
Both stages run through the loop, optimizer + EMA and checkpointing that LCD uses
(``loop.py``); each is resumable, and the result is a diffusers-layout pipeline folder.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lcm_jax import atomic
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import distill, loop, sharding, train_state
from lcm_jax.data.batcher import Batcher
from lcm_jax.data.sources import DIGIT_WORDS, load_source
from lcm_jax.ema import ema_params
from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel, tokenize
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig, sample_latent
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.schedules import NoiseSchedule, alpha_sigma, expand_like
from lcm_jax.tiny import random_params
from lcm_jax.tokenizer import build_word_tokenizer

# Optimizer keys a stage may leave out (the names of configs/common.py).
STAGE_DEFAULTS = dict(warmup_steps=0, lr_schedule="cosine", grad_clip=1.0, grad_accum=1, adam_b1=0.9,
                      adam_b2=0.999, adam_eps=1e-8, weight_decay=0.0, ema_decay=0.999, seed=0,
                      checkpoint_every=500, log_every=50)


def stage_config(stage) -> ml_collections.ConfigDict:
    """A stage's config with the optimizer defaults filled in (what its checkpoint records)."""
    return ml_collections.ConfigDict({**STAGE_DEFAULTS, **dict(stage)})


# --------------------------------------------------------------------------- losses (pure)

def autoencoder_loss(params: Any, frozen: Any, batch: dict, rng: jax.Array, *, vae: AutoencoderKL,
                     kl_weight: float) -> tuple[jax.Array, dict]:
    """Mean squared reconstruction through a posterior sample + kl_weight * KL(q || N(0, 1)),
    both per element. pixels: [B, 3, H, W] in [-1, 1]."""
    del frozen
    x = batch["pixels"]
    mean, logvar = vae.apply({"params": params}, x, method=vae.encode)  # [B, C, h, w] each
    recon = vae.apply({"params": params}, sample_latent(mean, logvar, rng), method=vae.decode)
    rec = jnp.mean((recon - x) ** 2)
    kl = 0.5 * jnp.mean(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar)
    return rec + kl_weight * kl, {"reconstruction": rec, "kl": kl}


def diffusion_loss(params: Any, frozen: Any, batch: dict, rng: jax.Array, *, models: distill.Models,
                   caption_dropout: float) -> tuple[jax.Array, dict]:
    """The DDPM loss: t ~ U{0..T-1}, z_t = alpha_t z + sigma_t eps, MSE of the UNet's output to
    its target (eps, v or the sample, by the schedule's prediction type); the prompt is
    replaced by the empty one with probability ``caption_dropout``."""
    r_enc, r_t, r_noise, r_drop = jax.random.split(rng, 4)
    latents, cond = distill.encode_batch(models, frozen, batch, r_enc)  # [B, C, h, w], [B, L, D]
    schedule = models.schedule
    b = latents.shape[0]
    t = jax.random.randint(r_t, (b,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(r_noise, latents.shape, jnp.float32)
    alpha, sigma = alpha_sigma(schedule, t)
    alpha, sigma = expand_like(alpha, latents), expand_like(sigma, latents)
    z_t = alpha * latents + sigma * noise
    drop = jax.random.uniform(r_drop, (b,)) < caption_dropout
    cond = jnp.where(drop[:, None, None], jnp.broadcast_to(frozen["uncond"], cond.shape), cond)
    out = models.student.apply({"params": params}, z_t, t, cond).astype(jnp.float32)
    target = {"epsilon": noise, "v_prediction": alpha * noise - sigma * latents,
              "sample": latents}[schedule.prediction_type]
    return jnp.mean((out - target) ** 2), {}


def fit_step(state: train_state.TrainState, batch: dict, frozen: Any, *, loss_fn: Callable,
             tx: optax.GradientTransformation) -> tuple[train_state.TrainState, dict]:
    """One optimizer step of ``loss_fn(params, frozen, batch, rng) -> (loss, aux)``."""
    rng, r_loss = jax.random.split(state.rng)
    return train_state.apply_loss(state, tx, lambda p: loss_fn(p, frozen, batch, r_loss), rng)


# --------------------------------------------------------------------------- the loop around them

def fit(loss_fn: Callable, params: Any, frozen: Any, batches: Batcher, stage, directory: str, mesh,
        desc: str) -> Any:
    """Train ``params`` on ``loss_fn`` for ``stage.num_steps``, resumable from ``directory``.

    Returns the EMA params (host numpy); a signal raises ``errors.Interrupted`` (its step saved).
    """
    stage = stage_config(stage)
    tx = train_state.make_optimizer(stage, stage.ema_decay, ema_warmup=True)  # from scratch: diffusers' EMAModel
    state, state_sh = train_state.init_sharded(params, tx, stage.seed, mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(directory, "checkpoints"), keep=1, every=stage.checkpoint_every)
    ckpt.check_within(stage.num_steps)
    state = loop.fit(functools.partial(fit_step, loss_fn=loss_fn, tx=tx), state, state_sh, batches,
                     sharding.put(frozen, sharding.tree_shardings(frozen, mesh)), mesh=mesh, ckpt=ckpt,
                     config_dict=stage.to_dict(), num_steps=stage.num_steps, batch_size=stage.batch_size,
                     log_every=stage.log_every, desc=desc, metrics_dir=directory,
                     lr_fn=train_state.lr_schedule(stage))
    return jax.device_get(ema_params(state.opt_state))


# --------------------------------------------------------------------------- the teacher

def build_modules(config, tokenizer) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The three modules from ``config.teacher.{vae,text,unet}_model`` (diffusers/transformers
    config keys), sized to the tokenizer and the resolution."""
    t = config.teacher
    vae_cfg = VAEConfig.from_diffusers_config(dict(
        in_channels=3, out_channels=3, sample_size=config.data.resolution, scaling_factor=1.0,
        down_block_types=["DownEncoderBlock2D"] * len(t.vae_model.block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(t.vae_model.block_out_channels), **t.vae_model))
    max_length = tokenizer.model_max_length
    text_cfg = CLIPTextConfig.from_transformers_config(dict(
        vocab_size=len(tokenizer), max_position_embeddings=max_length, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1, **t.text_model))
    if config.data.resolution % vae_cfg.downsample_factor:
        raise ValueError(f"data.resolution {config.data.resolution} is not divisible by the autoencoder's "
                         f"downsample factor {vae_cfg.downsample_factor}")
    unet_cfg = UNetConfig.from_diffusers_config(dict(
        sample_size=config.data.resolution // vae_cfg.downsample_factor, in_channels=vae_cfg.latent_channels,
        out_channels=vae_cfg.latent_channels, cross_attention_dim=text_cfg.hidden_size, **t.unet_model))
    return AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg), UNet2DConditionModel(unet_cfg)


def latent_scaling_factor(vae: AutoencoderKL, params: Any, images: np.ndarray, batch: int = 256) -> float:
    """1 / std of the posterior means over ``images`` (uint8 [N, R, R, 3]), rounded to 5 digits."""
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0])
    means = [np.asarray(encode(params, images[i:i + batch].astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1))
             for i in range(0, len(images), batch)]
    return float(np.round(1.0 / np.std(np.concatenate(means)), 5))


def train_teacher(config, workdir: str) -> str:
    """Train (or resume, or skip when done) the teacher; returns ``WORKDIR/teacher`` (a signal
    raises ``errors.Interrupted`` with its stage's step saved).

    Stage outputs: WORKDIR/teacher_stages/{vae,unet}/ (checkpoints, metrics.jsonl, tensorboard)
    and WORKDIR/teacher (diffusers layout: StableDiffusionPipeline loads it).
    """
    out = os.path.join(workdir, "teacher")
    if os.path.isfile(os.path.join(out, "model_index.json")):
        logging.info("teacher: %s exists, skipping", out)
        return out
    atomic.check_absent(out)  # before training, not after: a folder there without model_index.json
    t = config.teacher
    mesh = sharding.make_mesh(config.mesh)
    stages = os.path.join(workdir, "teacher_stages")
    tokenizer = build_word_tokenizer(os.path.join(stages, "tokenizer"), DIGIT_WORDS,
                                     model_max_length=t.max_length)
    vae, text_encoder, unet = build_modules(config, tokenizer)
    images, captions = load_source(config.data.source, config.data.path, config.data.resolution,
                                   config.data.center_crop)
    ids = tokenize(tokenizer, captions)
    r = config.data.resolution
    f = vae.config.downsample_factor

    def batcher(stage):
        return Batcher(images, ids, stage.batch_size, config.seed, config.data.random_flip,
                       jax.process_index(), jax.process_count())

    # ------------------------------------------------------------------ autoencoder
    vae_params = random_params(vae, config.seed, jnp.zeros((1, 3, r, r)))
    vae_params = fit(functools.partial(autoencoder_loss, vae=vae, kl_weight=t.vae.kl_weight), vae_params, {},
                     batcher(t.vae), t.vae, os.path.join(stages, "vae"), mesh, "teacher autoencoder")
    scaling = latent_scaling_factor(vae, vae_params, images)
    vae = AutoencoderKL(dataclasses.replace(vae.config, scaling_factor=scaling))
    logging.info("teacher autoencoder: latent scaling factor %.5f", scaling)

    # ------------------------------------------------------------------ UNet
    text_params = random_params(text_encoder, config.seed + 1, jnp.zeros((1, t.max_length), jnp.int32))
    uncond = text_encoder.apply({"params": text_params}, jnp.asarray(tokenize(tokenizer, [""]))).last_hidden_state
    unet_params = random_params(unet, config.seed + 2, jnp.zeros((1, vae.config.latent_channels, r // f, r // f)),
                                jnp.zeros((1,), jnp.int32), jnp.zeros((1, t.max_length, text_encoder.config.hidden_size)))
    schedule = NoiseSchedule.from_scheduler_config(t.scheduler.to_dict())
    models = distill.Models(unet, None, vae, text_encoder, schedule)
    frozen = {"vae": vae_params, "text": text_params, "uncond": np.asarray(uncond)}
    unet_params = fit(functools.partial(diffusion_loss, models=models, caption_dropout=t.unet.caption_dropout),
                      unet_params, frozen, batcher(t.unet), t.unet, os.path.join(stages, "unet"), mesh,
                      "teacher unet")
    if jax.process_index() == 0:
        pipe = LCMPipeline(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer,
                           t.scheduler.to_dict())
        with atomic.folder(out) as tmp:  # the folder appears whole or not at all
            pipe.save_pretrained(tmp)
    return out
