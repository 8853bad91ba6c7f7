"""Cross-attention transformer blocks of the SD UNet (diffusers-Flax parameter names).

Attention -> FeedForward(GEGLU) -> BasicTransformerBlock -> Transformer2DModel, each the
counterpart of the diffusers PyTorch module of the same name (default "layer_norm" block,
no dropout, no attention mask).
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
    """Multi-head (self or cross) attention: query/key/value (no bias) -> SDPA -> proj_attn.

    ``upcast_attention`` runs the attention itself in float32 whatever the compute dtype
    (SD2.x was trained so). Output width = input width.
    """

    heads: int
    dim_head: int
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        # x: [B, T, C], context: [B, S, D] (None: self-attention)
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)  # noqa: E731
        q = dense("query")(x)
        k = dense("key")(context)
        v = dense("value")(context)
        split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # [B, T|S, N, H]
        if self.upcast_attention:
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, scale=self.dim_head ** -0.5)  # [B, T, N, H]
        out = out.reshape(out.shape[:2] + (inner,)).astype(self.dtype)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="proj_attn")(out)  # [B, T, C]


class GEGLU(nn.Module):
    """proj to 2*inner, split in (hidden, gate), hidden * gelu(gate) (exact erf GELU)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, name="proj")(x)
        hidden, gate = jnp.split(h, 2, axis=-1)
        return hidden * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net_0 = GEGLU(dim -> mult*dim), net_2 = Dense back to dim (net_1 is dropout in PyTorch)."""

    mult: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    heads: int
    dim_head: int
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, T, C], context: [B, S, D]
        norm = lambda name: nn.LayerNorm(epsilon=1e-5, use_fast_variance=False,  # noqa: E731
                                         dtype=self.dtype, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, self.upcast_attention,  # noqa: E731
                                      dtype=self.dtype, name=name)
        x = attn("attn1")(norm("norm1")(x)) + x
        x = attn("attn2")(norm("norm2")(x), context) + x
        x = FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x)) + x
        return x


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> ``depth`` BasicTransformerBlocks over H*W tokens -> proj_out, residual.

    ``use_linear_projection``: proj_in/out are Dense (SD2.x, SDXL); else 1x1 convs (SD1.x).
    The inner width is ``heads * dim_head``.
    """

    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        # x: [B, H, W, C], context: [B, S, D]
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = nn.GroupNorm(self.norm_num_groups, epsilon=1e-6, use_fast_variance=False,
                         dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            x = nn.Dense(inner, dtype=self.dtype, name="proj_in")(x.reshape(b, h * w, c))
        else:
            x = nn.Conv(inner, (1, 1), padding="VALID", dtype=self.dtype, name="proj_in")(x)
            x = x.reshape(b, h * w, inner)
        for i in range(self.depth):  # [B, H*W, inner]
            x = BasicTransformerBlock(self.heads, self.dim_head, self.upcast_attention,
                                      dtype=self.dtype, name=f"transformer_blocks_{i}")(x, context)
        if self.use_linear_projection:
            x = nn.Dense(c, dtype=self.dtype, name="proj_out")(x).reshape(b, h, w, c)
        else:
            x = nn.Conv(c, (1, 1), padding="VALID", dtype=self.dtype,
                        name="proj_out")(x.reshape(b, h, w, inner))
        return x + residual  # [B, H, W, C]
