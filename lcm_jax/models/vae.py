"""AutoencoderKL (Stable Diffusion's VAE) in Flax linen, with diffusers-Flax parameter names.

Params: encoder{conv_in, down_blocks_i{resnets_j, downsamplers_0{conv}}, mid_block{resnets_0,
attentions_0{group_norm, query, key, value, proj_attn}, resnets_1}, conv_norm_out, conv_out},
quant_conv, post_quant_conv, decoder{conv_in, mid_block, up_blocks_i{resnets_j,
upsamplers_0{conv}}, conv_norm_out, conv_out}. ``lcm_jax.weights`` maps them one-to-one onto a
diffusers ``AutoencoderKL`` state dict. Inputs and outputs are NCHW like diffusers; the
``scaling_factor`` is config metadata, applied by the caller (as in diffusers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import component_config
from lcm_jax.models.attention import dot_product_attention
from lcm_jax.models.resnet import ResnetBlock2D

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
RESNET_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code this for every norm
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp
# AutoencoderKL's __init__ arguments that are not VAEConfig fields: checked against the one
# value we implement (the two together are exactly diffusers' arguments; tests/test_strict_inputs.py).
CHECKED_KEYS = ("down_block_types", "up_block_types", "act_fn")


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json (defaults are diffusers')."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: Union[int, tuple[int, ...]] = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    latents_mean: Optional[tuple[float, ...]] = None
    latents_std: Optional[tuple[float, ...]] = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for f in ("block_out_channels", "sample_size", "latents_mean", "latents_std"):
            object.__setattr__(self, f, _tuple(getattr(self, f)))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                                 f"norm_num_groups={self.norm_num_groups}")

    @classmethod
    def from_diffusers_config(cls, cfg: Mapping[str, Any], source: str = "VAE config") -> "VAEConfig":
        """From a diffusers vae/config.json dict (``source``: its path, for the messages); raises
        ValueError on what we do not implement and on a value of the wrong type; warns on a key
        diffusers does not know."""
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        kwargs = component_config.config_fields(cls, cfg, CHECKED_KEYS, source=source, what="AutoencoderKL")
        n = len(kwargs.get("block_out_channels", cls.block_out_channels))
        down = tuple(cfg.get("down_block_types", (DOWN_BLOCK,) * n))
        up = tuple(cfg.get("up_block_types", (UP_BLOCK,) * n))
        if any(b != DOWN_BLOCK for b in down) or len(down) != n:
            raise ValueError(f"unsupported VAE down_block_types {down}: expected {n} x {DOWN_BLOCK!r}")
        if any(b != UP_BLOCK for b in up) or len(up) != n:
            raise ValueError(f"unsupported VAE up_block_types {up}: expected {n} x {UP_BLOCK!r}")
        act = cfg.get("act_fn", "silu")
        if act != "silu":
            raise ValueError(f"unsupported VAE act_fn {act!r}: expected 'silu'")
        return cls(**kwargs)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A config.json dict that diffusers' ``AutoencoderKL.from_config`` accepts."""
        n = len(self.block_out_channels)
        out = {"_class_name": "AutoencoderKL", "act_fn": "silu",
               "down_block_types": [DOWN_BLOCK] * n, "up_block_types": [UP_BLOCK] * n}
        for k, v in dataclasses.asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def _conv(features: int, dtype, name: str, kernel: int = 3) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def _group_norm(groups: int, dtype, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(groups, epsilon=RESNET_EPS, dtype=dtype, use_fast_variance=False, name=name)


class Downsample2D(nn.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 conv (diffusers' padding=0 Downsample2D)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, self.dtype, "conv")(x)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with GroupNorm and residual (the VAE mid-block's)."""

    channels: int
    groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        y = _group_norm(self.groups, self.dtype, "group_norm")(x).reshape(b, h * w, 1, c)
        q = nn.Dense(c, dtype=self.dtype, name="query")(y)
        k = nn.Dense(c, dtype=self.dtype, name="key")(y)
        v = nn.Dense(c, dtype=self.dtype, name="value")(y)
        y = dot_product_attention(q, k, v, 1.0 / math.sqrt(c))  # [B, HW, 1, C]; blocked on CPU at SD's 4096 tokens
        y = nn.Dense(c, dtype=self.dtype, name="proj_attn")(y.reshape(b, h * w, c))
        return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnets_0, attentions_0 (optional), resnets_1."""

    channels: int
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        res = lambda i: ResnetBlock2D(self.channels, self.channels, self.groups, RESNET_EPS, use_temb=False,
                                      dtype=self.dtype, name=f"resnets_{i}")
        x = res(0)(x)
        if self.add_attention:
            x = AttentionBlock(self.channels, self.groups, self.dtype, name="attentions_0")(x)
        return res(1)(x)


class DownEncoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            cin = self.in_channels if j == 0 else self.out_channels
            x = ResnetBlock2D(cin, self.out_channels, self.groups, RESNET_EPS, use_temb=False,
                              dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_layers):
            cin = self.in_channels if j == 0 else self.out_channels
            x = ResnetBlock2D(cin, self.out_channels, self.groups, RESNET_EPS, use_temb=False,
                              dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C_in] -> [B, h, w, 2 * latent]
        cfg, chans = self.config, self.config.block_out_channels
        x = _conv(chans[0], self.dtype, "conv_in")(x)
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            x = DownEncoderBlock2D(cin, cout, cfg.layers_per_block, cfg.norm_num_groups,
                                   add_downsample=i < len(chans) - 1, dtype=self.dtype,
                                   name=f"down_blocks_{i}")(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        x = nn.swish(_group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out")(x))
        return _conv(2 * cfg.latent_channels, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:  # [B, h, w, latent] -> [B, H, W, C_out]
        cfg, chans = self.config, tuple(reversed(self.config.block_out_channels))
        x = _conv(chans[0], self.dtype, "conv_in")(z)
        x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.dtype,
                     name="mid_block")(x)
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            x = UpDecoderBlock2D(cin, cout, cfg.layers_per_block + 1, cfg.norm_num_groups,
                                 add_upsample=i < len(chans) - 1, dtype=self.dtype,
                                 name=f"up_blocks_{i}")(x)
        x = nn.swish(_group_norm(cfg.norm_num_groups, self.dtype, "conv_norm_out")(x))
        return _conv(cfg.out_channels, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL: ``encode(x) -> (mean, logvar)``, ``decode(z) -> x``, all NCHW.

    ``dtype`` is the compute dtype (params stay float32); outputs are returned as float32.
    Call as ``model.apply(params, x, method=model.encode)`` / ``method=model.decode``.
    """

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype)
        self.decoder = Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, self.dtype, "quant_conv", kernel=1)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, self.dtype, "post_quant_conv", kernel=1)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, C_in, H, W] in [-1, 1] -> (mean, logvar), each [B, latent, H/f, W/f] float32."""
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"encode expects [B, {self.config.in_channels}, H, W] (NCHW), got {x.shape}")
        h = self.encoder(jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        h = jnp.transpose(h.astype(jnp.float32), (0, 3, 1, 2))  # [B, 2 * latent, h, w]
        mean, logvar = jnp.split(h, 2, axis=1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """z: [B, latent, h, w] (unscaled latents) -> [B, C_out, h*f, w*f] float32, roughly [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"decode expects [B, {self.config.latent_channels}, h, w] (NCHW), got {z.shape}")
        z = jnp.transpose(z, (0, 2, 3, 1)).astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        x = self.decoder(z)
        return jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2))

    def __call__(self, x: jax.Array, rng: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruct x through the posterior mode (or a sample when ``rng`` is given)."""
        mean, logvar = self.encode(x)
        z = latent_mode(mean, logvar) if rng is None else sample_latent(mean, logvar, rng)
        return self.decode(z)


def sample_latent(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * eps."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def latent_mode(mean: jax.Array, logvar: Optional[jax.Array] = None) -> jax.Array:
    """The posterior's mode (its mean), as diffusers' ``latent_dist.mode()``."""
    del logvar
    return mean


def init_vae_params(model: AutoencoderKL, rng: jax.Array) -> Any:
    """Random float32 params for ``model``.

    ``jax.eval_shape(functools.partial(init_vae_params, model), rng)`` gives the shapes only.
    """
    size = 2 * model.config.downsample_factor
    x = jnp.zeros((1, model.config.in_channels, size, size), jnp.float32)
    return model.init(rng, x)["params"]
