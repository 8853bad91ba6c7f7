"""The attention kernel dispatch: which implementation each backend, dtype and shape gets, and every
implementation that runs here (XLA, the CPU loop, Pallas' TPU kernel in interpret mode) against
XLA's reference, forward and gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lcm_jax.models import attention
from lcm_jax.models.attention import attention_implementation as choose

BF16, F32, F16 = jnp.bfloat16, jnp.float32, jnp.float16


def shapes(t, s, h, n=8, b=2):
    return (b, t, n, h), (b, s, n, h)


@pytest.mark.parametrize("platform, dtype, t, s, h, cap, devices, want", [
    # GPU: cuDNN for half precision, head dim a multiple of 8, <= 256 on Hopper and <= 128 on Ampere
    ("gpu", BF16, 4096, 4096, 40, 9.0, 1, "cudnn"),        # SD1.5's first level, self-attention
    ("gpu", BF16, 4096, 77, 40, 9.0, 8, "cudnn"),          # cross-attention, sharded: cuDNN partitions
    ("gpu", F16, 256, 256, 160, 9.0, 1, "cudnn"),          # SD1.5's 160-dim level on Hopper ...
    ("gpu", BF16, 256, 256, 160, 8.0, 1, "xla"),           # ... but not on Ampere (<= 128)
    ("gpu", BF16, 4096, 4096, 64, 8.6, 1, "cudnn"),
    ("gpu", BF16, 4096, 4096, 64, 7.5, 1, "xla"),          # pre-Ampere: no flash attention
    ("gpu", F32, 4096, 4096, 64, 9.0, 1, "xla"),           # fp32 compute, SD2's upcast attention
    ("gpu", BF16, 4096, 4096, 512, 9.0, 1, "xla"),         # the VAE's single 512-wide head
    ("gpu", BF16, 4096, 4096, 44, 9.0, 1, "xla"),          # not a multiple of 8
    ("cuda", BF16, 1024, 1024, 64, 9.0, 1, "cudnn"),
    # TPU: Pallas flash attention for whole 128-blocks on one chip
    ("tpu", BF16, 4096, 4096, 40, None, 1, "pallas_tpu"),
    ("tpu", F32, 1024, 1024, 160, None, 1, "pallas_tpu"),  # fp32 and upcast attention too
    ("tpu", BF16, 4096, 77, 40, None, 1, "xla"),           # 77 text tokens: not whole blocks
    ("tpu", BF16, 64, 64, 160, None, 1, "xla"),            # SD1.5's 8x8 mid block
    ("tpu", BF16, 4096, 4096, 512, None, 1, "xla"),        # the VAE's head
    ("tpu", BF16, 4096, 4096, 40, None, 8, "xla"),         # sharded over chips: no partitioning rule
    # CPU: the blocked loop for long sequences, else XLA
    ("cpu", F32, 4096, 4096, 40, None, 8, "cpu_blocked"),
    ("cpu", F32, 4096, 77, 40, None, 1, "cpu_blocked"),
    ("cpu", BF16, 256, 77, 40, None, 1, "xla"),
    ("rocm", BF16, 4096, 4096, 64, None, 1, "xla"),
])
def test_dispatch(platform, dtype, t, s, h, cap, devices, want):
    got = choose(platform, dtype, *shapes(t, s, h), gpu_capability=cap, num_devices=devices)
    assert got == want and got in attention.IMPLEMENTATIONS


def _qkv(t, s, h, dtype, n=2, b=1):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    return tuple(jax.random.normal(key, (b, length, n, h), jnp.float32).astype(dtype)
                 for key, length in zip(keys, (t, s, s)))


def _check(ours, q, k, v, atol, scale):
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=scale)  # noqa: E731  XLA's
    up = lambda x: np.asarray(x, np.float32)  # noqa: E731
    np.testing.assert_allclose(up(ours(q, k, v)), up(ref(*(x.astype(F32) for x in (q, k, v)))), rtol=0, atol=atol)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v).astype(F32)))  # noqa: E731
    grads = jax.grad(loss(ours), (0, 1, 2))(q, k, v)
    grads_ref = jax.grad(loss(ref), (0, 1, 2))(*(x.astype(F32) for x in (q, k, v)))
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(up(g), up(g_ref), rtol=0, atol=atol)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, atol", [(F32, 1e-5), (BF16, 2e-2)])
@pytest.mark.parametrize("t, s, h", [(256, 256, 40), (128, 256, 80)])
def test_pallas_tpu_kernel_matches_xla(t, s, h, dtype, atol):
    """Pallas' TPU flash kernel (forward and its backward kernels) run in TPU interpret mode on CPU."""
    from jax.experimental.pallas import tpu as pltpu
    q, k, v = _qkv(t, s, h, dtype)
    with pltpu.force_tpu_interpret_mode():
        _check(lambda q, k, v: attention.pallas_tpu_attention(q, k, v, h ** -0.5), q, k, v, atol, h ** -0.5)


@pytest.mark.parametrize("dtype, atol", [(F32, 1e-5), (BF16, 2e-2)])
def test_cpu_dispatch_matches_xla(dtype, atol, monkeypatch):
    """What the model calls on this backend, short (XLA) and long (the blocked loop) sequences alike."""
    monkeypatch.setattr(attention, "CPU_MIN_SCORES", 300 * 200)
    for t, s in ((64, 77), (300, 200)):
        q, k, v = _qkv(t, s, 40, dtype)
        _check(lambda q, k, v: attention.dot_product_attention(q, k, v, 40 ** -0.5), q, k, v, atol, 40 ** -0.5)
