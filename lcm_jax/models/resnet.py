"""ResNet block shared by the UNet and the VAE (diffusers-Flax parameter names), and its 3x3 conv."""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# XLA:CPU's 3x3 conv is slow on small maps with many channels (SD's 16x16 and 8x8 levels at
# 1280-2560 input channels: 35-105 GFLOP/s on 2 AVX-512 cores, against 250-340 at 32x32 and
# up); the same conv as im2col + one dot runs at 150-280 there (benchmarks/README.md).
CPU_IM2COL_MAX_PIXELS = 16 * 16
CPU_IM2COL_MIN_CHANNELS = 512


def _im2col_conv3x3(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """A 3x3, stride-1, padding-1 conv as one dot: lhs [B, H, W, C], rhs [3, 3, C, F] -> [B, H, W, F].
    The nine shifted copies are concatenated in the kernel's (row, column, channel) order."""
    b, h, w, c = lhs.shape
    padded = jnp.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], axis=-1)
    out = lax.dot_general(cols.reshape(b * h * w, 9 * c), rhs.reshape(9 * c, -1), (((1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype).reshape(b, h, w, -1)


def _conv3x3(lhs, rhs, window_strides, padding, **kwargs):
    """``nn.Conv``'s ``conv_general_dilated`` for ``Conv3x3`` (whose geometry is fixed: 3x3, stride 1,
    padding 1, NHWC): on CPU, a map of at most CPU_IM2COL_MAX_PIXELS pixels with at least
    CPU_IM2COL_MIN_CHANNELS input channels runs as im2col + dot (same params, same result up to
    float32 summation order); everything else, and every other platform, is the lax conv."""
    conv = functools.partial(lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kwargs)
    _, h, w, c = lhs.shape
    if h * w > CPU_IM2COL_MAX_PIXELS or c < CPU_IM2COL_MIN_CHANNELS:
        return conv(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=_im2col_conv3x3, default=conv)


def Conv3x3(features: int, dtype, name: str) -> nn.Conv:
    """nn.Conv(features, (3, 3), padding 1), with the CPU im2col path of ``_conv3x3`` (params as nn.Conv's)."""
    return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, conv_general_dilated=_conv3x3,
                   name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv x2 with an optional time-embedding shift (diffusers' ResnetBlock2D).

    Params: norm1, conv1, time_emb_proj (only when the block takes temb), norm2, conv2,
    conv_shortcut (only when in != out channels).
    """

    in_channels: int
    out_channels: Optional[int] = None
    groups: int = 32
    eps: float = 1e-5
    use_temb: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
        # x: [B, H, W, C_in], temb: [B, T]
        out_channels = self.out_channels or self.in_channels
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, use_fast_variance=False, name="norm1")(x)
        h = nn.swish(h)
        h = Conv3x3(out_channels, self.dtype, "conv1")(h)
        if self.use_temb:
            t = nn.Dense(out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, use_fast_variance=False, name="norm2")(h)
        h = nn.swish(h)
        h = Conv3x3(out_channels, self.dtype, "conv2")(h)
        if out_channels != self.in_channels:
            x = nn.Conv(out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return x + h  # [B, H, W, C_out]
