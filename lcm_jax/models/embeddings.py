"""Sinusoidal timestep / guidance embeddings and the UNet's TimestepEmbedding MLP.

Both embeddings reproduce diffusers' float32 arithmetic step by step, so a converted
checkpoint sees the same inputs it was trained on.
"""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _exp_f32(x: np.ndarray) -> jax.Array:
    """exp of a float32 table, correctly rounded to float32 (computed on the host in float64).

    XLA's float32 exp is off by an ulp on ~1 in 8 entries; the embeddings multiply these
    frequencies by timesteps up to 1e3 (guidance up to ~1.5e4), which would turn that ulp
    into ~1e-4..1e-3 differences from diffusers. Correct rounding matches PyTorch's CPU exp
    almost everywhere.
    """
    return jnp.asarray(np.exp(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32))


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
    """diffusers' ``get_timestep_embedding``: [N] (int or float) -> [N, dim] float32."""
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [N], got shape {timesteps.shape}")
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = _exp_f32(exponent / np.float32(half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]  # [N, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb  # [N, dim]


def guidance_embedding(w: jax.Array, dim: int = 256) -> jax.Array:
    """LCM's guidance-scale embedding, as diffusers' ``get_guidance_scale_embedding``.

    ``w`` [N] (the value the student embeds: omega = guidance_scale - 1) -> [N, dim] float32,
    sin then cos of ``w * 1000`` at ``dim // 2`` log-spaced frequencies.
    """
    w = jnp.asarray(w)
    if w.ndim != 1:
        raise ValueError(f"w must be 1-D [N], got shape {w.shape}")
    w = w.astype(jnp.float32) * 1000.0
    half = dim // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)
    freqs = _exp_f32(np.arange(half, dtype=np.float32) * -step)
    args = w[:, None] * freqs[None, :]  # [N, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb  # [N, dim]


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2, with an optional bias-free ``cond_proj`` of an extra
    condition (LCM's guidance embedding) added to the input *before* linear_1, as diffusers.

    ``cond_proj_dim`` declares the condition's width; ``zero_init_cond_proj`` zero-initialises
    it so a freshly added ``cond_proj`` leaves the model unchanged.
    """

    time_embed_dim: int
    cond_proj_dim: Optional[int] = None
    zero_init_cond_proj: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, sample: jax.Array, condition: Optional[jax.Array] = None) -> jax.Array:
        # sample: [B, C_in], condition: [B, cond_proj_dim]
        if condition is not None and self.cond_proj_dim is None:
            raise ValueError("a timestep condition was given but this TimestepEmbedding has no "
                             "cond_proj (time_cond_proj_dim is None)")
        if self.cond_proj_dim is not None:
            if condition is None and self.is_initializing():
                # create cond_proj's params even when init is called without a condition
                condition = jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), sample.dtype)
            if condition is not None:
                if condition.shape[-1] != self.cond_proj_dim:
                    raise ValueError(f"condition has width {condition.shape[-1]}, expected "
                                     f"time_cond_proj_dim={self.cond_proj_dim}")
                init = (nn.initializers.zeros if self.zero_init_cond_proj
                        else nn.linear.default_kernel_init)
                sample = sample + nn.Dense(sample.shape[-1], use_bias=False, kernel_init=init,
                                           dtype=self.dtype, name="cond_proj")(condition)
        sample = nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_1")(sample)
        sample = nn.silu(sample)
        return nn.Dense(self.time_embed_dim, dtype=self.dtype, name="linear_2")(sample)  # [B, T]


def sdxl_time_ids(height: int, width: int, n: int, original_size: Optional[tuple[int, int]] = None,
                  crops_coords_top_left: tuple[int, int] = (0, 0),
                  target_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """SDXL's size/crop micro-conditioning, float32 [n, 6] = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w); by default the output size and no crop (diffusers' _get_add_time_ids)."""
    ids = (tuple(original_size or (height, width)) + tuple(crops_coords_top_left)
           + tuple(target_size or (height, width)))
    return np.tile(np.asarray(ids, np.float32), (n, 1))
