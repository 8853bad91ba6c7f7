"""The UNet's down / mid / up blocks (diffusers' unet_2d_blocks), with their remat variants.

CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D / UpBlock2D with
diffusers-Flax parameter names; the blocks read ``remat_layers``, ``attn`` and ``dtype`` from the
block module itself (see ``_resnet`` / ``_transformer``), set by UNet2DConditionModel.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models.attention import Transformer2DModel
from lcm_jax.models.resnet import Conv3x3, ResnetBlock2D


def _upsample_nearest(x: jax.Array, size: Optional[Sequence[int]]) -> jax.Array:
    """torch ``F.interpolate(mode="nearest")``: x2, or to ``size`` (src = floor(dst * in/out))."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    for axis, (n_in, n_out) in enumerate(zip((h, w), size), start=1):
        scale = np.float32(n_in) / np.float32(n_out)
        idx = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int32), n_in - 1)
        x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


class Downsample2D(nn.Module):
    """3x3 conv, stride 2, padding 1 (param ``conv``)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(self.out_channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                       dtype=self.dtype, name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest upsampling (x2 or to ``size``) then a 3x3 conv (param ``conv``)."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: Optional[Sequence[int]] = None) -> jax.Array:
        x = _upsample_nearest(x, size)
        return Conv3x3(self.out_channels, self.dtype, "conv")(x)


@dataclasses.dataclass(frozen=True)
class AttnSpec:
    """What every Transformer2DModel of a UNet shares."""

    use_linear_projection: bool
    upcast_attention: bool
    groups: int
    eps: float


class DownBlock(nn.Module):
    """diffusers' CrossAttnDownBlock2D (``depths`` given) or DownBlock2D (``depths`` None):
    resnets_j [+ attentions_j], then downsamplers_0. Returns (x, skip outputs)."""

    out_channels: int
    num_layers: int
    add_downsample: bool
    attn: AttnSpec
    heads: int = 1
    depths: Optional[tuple[int, ...]] = None
    dtype: jnp.dtype = jnp.float32
    remat_layers: bool = False

    @nn.compact
    def __call__(self, x, temb, context):
        # x: [B, H, W, C_in] -> [B, H/2, W/2, C_out]
        skips = []
        for j in range(self.num_layers):
            x = _resnet(self)(x.shape[-1], self.out_channels, self.attn.groups, self.attn.eps,
                              dtype=self.dtype, name=f"resnets_{j}")(x, temb)
            if self.depths is not None:
                x = _transformer(self, f"attentions_{j}", self.out_channels, self.heads,
                                 self.depths[j])(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, dtype=self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UNetMidBlock2DCrossAttn(nn.Module):
    """resnets_0, then (attentions_j, resnets_{j+1}) for each transformer."""

    attn: AttnSpec
    heads: int
    depths: tuple[int, ...] = (1,)
    dtype: jnp.dtype = jnp.float32
    remat_layers: bool = False

    @nn.compact
    def __call__(self, x, temb, context):
        c = x.shape[-1]
        x = _resnet(self)(c, c, self.attn.groups, self.attn.eps, dtype=self.dtype, name="resnets_0")(x, temb)
        for j, depth in enumerate(self.depths):
            x = _transformer(self, f"attentions_{j}", c, self.heads, depth)(x, context)
            x = _resnet(self)(c, c, self.attn.groups, self.attn.eps, dtype=self.dtype,
                              name=f"resnets_{j + 1}")(x, temb)
        return x


class UpBlock(nn.Module):
    """diffusers' CrossAttnUpBlock2D (``depths`` given) or UpBlock2D: for each layer concat
    the last skip, resnets_j [+ attentions_j]; then upsamplers_0."""

    out_channels: int
    num_layers: int
    add_upsample: bool
    attn: AttnSpec
    heads: int = 1
    depths: Optional[tuple[int, ...]] = None
    dtype: jnp.dtype = jnp.float32
    remat_layers: bool = False

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        # x: [B, h, w, C_prev], skips: num_layers arrays [B, h, w, C_skip] (last is used first)
        for j in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - j].astype(x.dtype)], axis=-1)
            x = _resnet(self)(x.shape[-1], self.out_channels, self.attn.groups, self.attn.eps,
                              dtype=self.dtype, name=f"resnets_{j}")(x, temb)
            if self.depths is not None:
                x = _transformer(self, f"attentions_{j}", self.out_channels, self.heads,
                                 self.depths[j])(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x, upsample_size)
        return x


def save_matmuls_and_convs(prim, *args, **params) -> bool:
    """A jax.checkpoint policy: keep the outputs of convolutions and of matmuls without batch
    dimensions (the projections and feed-forwards); recompute the rest, attention's batched
    [T, S] score matmuls and softmax included (they are the largest activations)."""
    return (prim.name == "conv_general_dilated"
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# nn.remat'd twins of the modules (same names and params; only the backward pass differs).
# UpBlock's ``upsample_size`` (argnum 5, counting self) is a shape tuple, hence static.
_RematResnet = nn.remat(ResnetBlock2D)
_RematTransformer = nn.remat(Transformer2DModel)
REMAT_BLOCKS = {  # UNet remat mode -> its (down, mid, up) block classes
    "block": (nn.remat(DownBlock), nn.remat(UNetMidBlock2DCrossAttn), nn.remat(UpBlock, static_argnums=(5,))),
    "dots": (nn.remat(DownBlock, policy=save_matmuls_and_convs),
             nn.remat(UNetMidBlock2DCrossAttn, policy=save_matmuls_and_convs),
             nn.remat(UpBlock, static_argnums=(5,), policy=save_matmuls_and_convs)),
}


def _resnet(parent: nn.Module) -> type:
    return _RematResnet if parent.remat_layers else ResnetBlock2D


def _transformer(parent: nn.Module, name: str, channels: int, heads: int, depth: int) -> Transformer2DModel:
    a = parent.attn
    cls = _RematTransformer if parent.remat_layers else Transformer2DModel
    return cls(heads, channels // heads, depth, a.use_linear_projection, a.upcast_attention,
                              a.groups, dtype=parent.dtype, name=name)
