"""Tiny Stable-Diffusion-shaped pipelines built from our own modules (no PyTorch needed).

Used by ``configs/tiny.py`` (a random teacher made on the fly) and as the starting point of
the digits teacher. The folder is written in diffusers layout, so diffusers loads it too.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import atomic
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


def random_params(module, seed: int, *args) -> dict:
    """Flax's default initialisation, drawn in numpy from the param shapes.

    Same distributions as ``module.init`` (kernels: LeCun truncated normal over fan-in,
    embeddings: normal(1/sqrt(dim)), biases 0, norm scales 1), but no XLA compile: jitting
    a whole UNet's init costs a minute on 2 CPU cores (every truncated-normal initialiser is
    its own erfinv polynomial).
    """
    from flax import traverse_util
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        leaf = path[-1]
        if leaf == "kernel":
            std = 1.0 / np.sqrt(np.prod(shape[:-1])) / 0.87962566103423978  # truncated at +-2
            x = rng.standard_normal(shape)
            while (bad := np.abs(x) > 2).any():
                x[bad] = rng.standard_normal(int(bad.sum()))
            return (x * std).astype(np.float32)
        if leaf == "embedding":
            return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        if leaf == "scale":
            return np.ones(shape, np.float32)
        if leaf == "bias":
            return np.zeros(shape, np.float32)
        raise ValueError(f"no initialiser for param {'/'.join(path)}")

    flat = traverse_util.flatten_dict(shapes)
    return traverse_util.unflatten_dict({p: draw(p, s.shape) for p, s in flat.items()})


def make_tiny_pipeline(folder: str, words: Sequence[str], resolution: int = 16, seed: int = 0,
                       max_length: int = 16) -> LCMPipeline:
    """A random tiny SD pipeline whose tokenizer knows ``words``; saved at ``folder`` (absent or
    empty), which appears only when complete: an interrupted write is redone, never trusted."""
    import os
    with atomic.folder(folder) as tmp:
        tokenizer = build_word_tokenizer(os.path.join(tmp, "tokenizer"), words, model_max_length=max_length)
        unet_cfg, vae_cfg, text_cfg = tiny_configs(resolution, len(tokenizer), max_length)
        unet, vae, te = UNet2DConditionModel(unet_cfg), AutoencoderKL(vae_cfg), CLIPTextModel(text_cfg)
        f = vae_cfg.downsample_factor
        unet_params = random_params(unet, seed, jnp.zeros((1, 4, resolution // f, resolution // f)),
                                    jnp.zeros((1,), jnp.int32), jnp.zeros((1, max_length, text_cfg.hidden_size)))
        vae_params = random_params(vae, seed + 1, jnp.zeros((1, 3, resolution, resolution)))
        text_params = random_params(te, seed + 2, jnp.zeros((1, max_length), jnp.int32))
        pipe = LCMPipeline(unet, unet_params, vae, vae_params, te, text_params, tokenizer, dict(SD_SCHEDULER))
        pipe.save_pretrained(tmp)
    return pipe
