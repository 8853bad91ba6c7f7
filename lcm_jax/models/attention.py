"""Cross-attention transformer blocks of the SD UNet (diffusers-Flax parameter names).

Attention -> FeedForward(GEGLU) -> BasicTransformerBlock -> Transformer2DModel, each the
counterpart of the diffusers PyTorch module of the same name (default "layer_norm" block,
no dropout, no attention mask).
"""
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# CPU attention: above this many scores per head (T * S) it runs head by head over blocks of
# CPU_QUERY_BLOCK queries, so each [block, S] score tile stays in cache (XLA:CPU otherwise
# writes the whole [B, N, T, S] float32 tensor to memory, ~7x slower at SD's 4096 tokens).
CPU_MIN_SCORES = 1 << 18
CPU_QUERY_BLOCK = 256
# cuDNN flash attention (jax.nn.dot_product_attention(implementation="cudnn")): half precision,
# head dim a multiple of 8, at most 256 on Hopper and later (compute capability >= 9), 128 on Ampere.
CUDNN_DTYPES = ("bfloat16", "float16")
# Pallas TPU flash attention (jax.experimental.pallas.ops.tpu): sequence lengths in whole blocks.
PALLAS_BLOCK = 128
PALLAS_MAX_HEAD_DIM = 256
IMPLEMENTATIONS = ("xla", "cpu_blocked", "cudnn", "pallas_tpu")


def attention_implementation(platform: str, dtype, q_shape: tuple, k_shape: tuple,
                             gpu_capability: Optional[float] = None, num_devices: int = 1) -> str:
    """The attention kernel for a backend, compute dtype and q [B, T, N, H] / k [B, S, N, H] shapes.

    GPU: cuDNN's fused flash attention where it is allowed (else XLA, e.g. fp32, SD2's upcast
    attention, the VAE's 512-wide head, pre-Ampere cards); TPU: the Pallas flash kernel for whole
    128-blocks on one chip (a Pallas call has no SPMD partitioning rule, so a sharded program keeps
    XLA's); CPU: the blocked loop for long sequences. Pure: tests call it for every backend.
    """
    t, h, s = q_shape[1], q_shape[3], k_shape[1]
    if platform == "cpu":
        return "cpu_blocked" if t * s >= CPU_MIN_SCORES else "xla"
    if platform in ("gpu", "cuda"):
        cap = gpu_capability or 0.0
        max_h = 256 if cap >= 9.0 else 128
        if jnp.dtype(dtype).name in CUDNN_DTYPES and cap >= 8.0 and h % 8 == 0 and h <= max_h:
            return "cudnn"
        return "xla"
    if platform == "tpu":
        if num_devices == 1 and t % PALLAS_BLOCK == 0 and s % PALLAS_BLOCK == 0 and h <= PALLAS_MAX_HEAD_DIM:
            return "pallas_tpu"
        return "xla"
    return "xla"


def _gpu_capability() -> Optional[float]:
    """An NVIDIA device's compute capability (9.0 for Hopper); None elsewhere (ROCm names an arch, "gfx90a")."""
    device = jax.devices()[0]
    if "cuda" not in getattr(device.client, "platform_version", "").lower():
        return None
    try:
        return float(device.compute_capability)
    except (AttributeError, TypeError, ValueError):
        return None


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v: q [B, T, N, H], k/v [B, S, N, H] -> [B, T, N, H].

    The kernel is chosen when the program is traced, for the default backend
    (``attention_implementation``); cuDNN's and Pallas' raise at trace time elsewhere, so they are
    not behind ``lax.platform_dependent``. XLA's and the CPU loop are: a program lowered on a CPU
    host for a GPU (the benchmarks' FLOP count) gets XLA's.
    """
    backend = jax.default_backend()
    impl = attention_implementation(backend, q.dtype, q.shape, k.shape,
                                    _gpu_capability() if backend == "gpu" else None, jax.device_count())
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    if impl == "pallas_tpu":
        return pallas_tpu_attention(q, k, v, scale)
    full = functools.partial(jax.nn.dot_product_attention, scale=scale)
    if impl == "xla":
        return full(q, k, v)
    return lax.platform_dependent(q, k, v, cpu=functools.partial(_blocked_attention, scale=scale),
                                  default=full)


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Pallas' TPU flash attention (forward and backward kernels) in our [B, T, N, H] layout; runs
    on CPU under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (the tests)."""
    from jax.experimental.pallas.ops.tpu.flash_attention import flash_attention
    heads_first = lambda x: jnp.transpose(x, (0, 2, 1, 3))  # noqa: E731  [B, N, T, H]
    out = flash_attention(heads_first(q), heads_first(k), heads_first(v), sm_scale=float(scale))
    return heads_first(out)


def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Exact attention, one (batch, head) at a time and CPU_QUERY_BLOCK queries at a time.

    Scores and softmax are float32; the normalisation is applied to the [block, H] output.
    """
    b, t, n, h = q.shape
    blk = min(CPU_QUERY_BLOCK, t)
    nb = -(-t // blk)
    heads = lambda x: jnp.transpose(x, (0, 2, 1, 3)).reshape(b * n, x.shape[1], h)  # noqa: E731
    qh = heads(q * jnp.asarray(scale, q.dtype))
    qh = jnp.pad(qh, ((0, 0), (0, nb * blk - t), (0, 0))).reshape(b * n, nb, blk, h)
    kh, vh = heads(k), heads(v)  # [B*N, S, H]

    def one_head(args):
        qs, kk, vv = args  # [nb, blk, H], [S, H], [S, H]

        def one_block(qb):  # [blk, H]
            scores = jnp.dot(qb, kk.T, preferred_element_type=jnp.float32)  # [blk, S]
            p = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
            out = jnp.dot(p.astype(vv.dtype), vv, preferred_element_type=jnp.float32)  # [blk, H]
            return (out / jnp.sum(p, axis=-1, keepdims=True)).astype(q.dtype)

        return lax.map(one_block, qs)

    out = lax.map(one_head, (qh, kh, vh))  # [B*N, nb, blk, H]
    out = out.reshape(b, n, nb * blk, h)[:, :, :t]
    return jnp.transpose(out, (0, 2, 1, 3))  # [B, T, N, H]


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
        out = dot_product_attention(q, k, v, self.dim_head ** -0.5)  # [B, T, N, H]
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
