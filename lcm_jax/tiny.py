"""Tiny Stable-Diffusion-shaped pipelines built from our own modules (no PyTorch needed).

Used by ``configs/tiny.py`` (a random teacher made on the fly) and as the starting point of
the digits teacher. The folder is written in diffusers layout, so diffusers loads it too.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.tokenizer import build_word_tokenizer

SD_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                    beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                    steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                    timestep_spacing="leading")


def tiny_configs(resolution: int = 16, vocab_size: int = 600, max_length: int = 16,
                 width: int = 32, latent_channels: int = 4):
    """(unet, vae, text) configs of a 2-level SD-shaped model; latents are resolution / 2."""
    vae = VAEConfig.from_diffusers_config(dict(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=[width, 2 * width],
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=resolution, scaling_factor=0.18215))
    unet = UNetConfig.from_diffusers_config(dict(
        sample_size=resolution // vae.downsample_factor, in_channels=latent_channels,
        out_channels=latent_channels, layers_per_block=1, block_out_channels=[width, 2 * width],
        norm_num_groups=8, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=width,
        attention_head_dim=8))
    text = CLIPTextConfig.from_transformers_config(dict(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    return unet, vae, text


def make_tiny_pipeline(folder: str, words: Sequence[str], resolution: int = 16, seed: int = 0,
                       max_length: int = 16) -> LCMPipeline:
    """A random tiny SD pipeline whose tokenizer knows ``words``; saved at ``folder``."""
    import os
    tok_dir = os.path.join(folder, "tokenizer")
    tokenizer = build_word_tokenizer(tok_dir, words, model_max_length=max_length)
    unet_cfg, vae_cfg, text_cfg = tiny_configs(resolution, len(tokenizer), max_length)
    unet, vae, te = UNet2DConditionModel(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
    r_u, r_v, r_t = jax.random.split(jax.random.PRNGKey(seed), 3)
    f = vae_cfg.downsample_factor
    unet_params = unet.init(r_u, jnp.zeros((1, 4, resolution // f, resolution // f)),
                            jnp.zeros((1,), jnp.int32), jnp.zeros((1, max_length, text_cfg.hidden_size)))["params"]
    vae_params = vae.init(r_v, jnp.zeros((1, 3, resolution, resolution)))["params"]
    text_params = te.init(r_t, jnp.zeros((1, max_length), jnp.int32))["params"]
    pipe = LCMPipeline(unet, jax.device_get(unet_params), vae, jax.device_get(vae_params), te,
                       jax.device_get(text_params), tokenizer, dict(SD_SCHEDULER))
    pipe.save_pretrained(folder)
    return pipe
