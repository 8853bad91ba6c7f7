"""ResNet block shared by the UNet and the VAE (diffusers-Flax parameter names)."""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


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
        h = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv1")(h)
        if self.use_temb:
            t = nn.Dense(out_channels, dtype=self.dtype, name="time_emb_proj")(nn.swish(temb))
            h = h + t[:, None, None, :]
        h = nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, use_fast_variance=False, name="norm2")(h)
        h = nn.swish(h)
        h = nn.Conv(out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name="conv2")(h)
        if out_channels != self.in_channels:
            x = nn.Conv(out_channels, (1, 1), padding="VALID", dtype=self.dtype, name="conv_shortcut")(x)
        return x + h  # [B, H, W, C_out]
