"""The Flax UNet (and its embeddings) against diffusers' PyTorch UNet2DConditionModel.

Tiny random diffusers UNets (every param perturbed so zero-inits hide nothing) are
converted with lcm_jax.weights and must give the same output in float32 (<= 1e-4).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.pipelines import LatentConsistencyModelPipeline
from jax.extend.core import jaxprs_in_params

from lcm_jax.models import attention, resnet
from lcm_jax.models.embeddings import TimestepEmbedding, guidance_embedding, timestep_embedding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.weights import flax_to_torch, torch_to_flax

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            cross_attention_dim=32, sample_size=16)
CONFIGS = {
    # SD1.x: 1x1-conv proj_in/out, one head count for all blocks
    "sd1": dict(TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2),
    # SD2.x: linear proj, per-block heads, upcast attention; odd, non-square sample size
    "sd2": dict(TINY, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=[2, 4],
                use_linear_projection=True, upcast_attention=True),
    # LCM student: guidance embedding through time_embedding.cond_proj; deeper transformers
    "lcm": dict(TINY, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                transformer_layers_per_block=[1, 2], time_cond_proj_dim=256),
}
SIZES = {"sd1": (16, 16), "sd2": (9, 12), "lcm": (8, 8)}


@functools.lru_cache(maxsize=None)
def _case(name):
    """(torch model, its numpy state dict, UNetConfig, inputs) for a config of CONFIGS."""
    torch.manual_seed(0)
    tm = TorchUNet(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    rng = np.random.default_rng(0)
    h, w = SIZES[name]
    # timesteps: int [B]; sd2 a float scalar (broadcast to the batch)
    timesteps = np.array(250.5, np.float32) if name == "sd2" else np.array([999, 37], np.int64)
    inputs = dict(sample=rng.standard_normal((2, 4, h, w), dtype=np.float32), timesteps=timesteps,
                  encoder_hidden_states=rng.standard_normal((2, 7, 32), dtype=np.float32))
    if name == "lcm":
        inputs["timestep_cond"] = np.asarray(guidance_embedding(jnp.array([3.0, 7.5]), 256))
    return tm, sd, UNetConfig.from_diffusers_config(dict(tm.config)), inputs


def _torch_forward(tm, inputs):
    kw = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return tm(kw["sample"], kw["timesteps"], kw["encoder_hidden_states"],
                  timestep_cond=kw.get("timestep_cond")).sample.numpy()


def _flax_params(model, sd, inputs):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **inputs)["params"]
    params, missing = torch_to_flax(sd, shapes)
    assert missing == []
    return params


@functools.lru_cache(maxsize=None)
def _flax_case(name):
    """(converted params, our float32 output) for a config of CONFIGS."""
    _, sd, cfg, inputs = _case(name)
    model = UNet2DConditionModel(cfg)
    params = _flax_params(model, sd, inputs)
    return params, jax.jit(model.apply)({"params": params}, **inputs)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_fp32(name):
    tm, _, _, inputs = _case(name)
    _, out = _flax_case(name)
    ref = _torch_forward(tm, inputs)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("module, forced, case", [
    # per head, blocks of queries; blocks of 32, so 9x12=108 tokens are padded
    (attention, dict(CPU_MIN_SCORES=0, CPU_QUERY_BLOCK=32), "sd2"),
    # the 3x3 convs as im2col + dot, at every size and width
    (resnet, dict(CPU_IM2COL_MAX_PIXELS=1 << 30, CPU_IM2COL_MIN_CHANNELS=0), "sd1"),
], ids=["blocked_attention", "im2col_conv"])
def test_cpu_paths_match_diffusers(monkeypatch, module, forced, case):
    """The CPU-only fast paths (forced on here for a tiny UNet) give the fp32 parity of the plain ones."""
    for name, value in forced.items():
        monkeypatch.setattr(module, name, value)
    tm, sd, cfg, inputs = _case(case)
    model = UNet2DConditionModel(cfg)
    fwd = lambda p: model.apply({"params": p}, **inputs)  # noqa: E731  (a fresh function: no jit cache hit)
    params = _flax_params(model, sd, inputs)
    assert "platform_index" in str(jax.make_jaxpr(fwd)(params))  # the CPU/default switch is there
    np.testing.assert_allclose(np.asarray(jax.jit(fwd)(params)), _torch_forward(tm, inputs), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 1e-5), (jnp.bfloat16, 5e-2)])
def test_im2col_conv_matches_lax_conv(dtype, atol):
    """At SD's 8x8 level (640 channels: the im2col path is chosen on CPU), values and gradients."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 640), jnp.float32)
    conv = resnet.Conv3x3(96, dtype, None)
    ref_conv = conv.clone(conv_general_dilated=None)  # flax's own lax conv
    params = ref_conv.init(jax.random.PRNGKey(1), x)
    assert jax.tree.map(jnp.shape, conv.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, params)
    assert "convolution" not in jax.jit(conv.apply).lower(params, x).as_text()  # im2col + dot here
    out, ref = conv.apply(params, x), ref_conv.apply(params, x)
    assert out.dtype == dtype and out.shape == (2, 8, 8, 96)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), rtol=0, atol=atol)
    if dtype == jnp.float32:  # gradients too (training on CPU takes this path)
        loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))  # noqa: E731
        for g, g_ref in zip(jax.tree.leaves(jax.grad(loss(conv), (0, 1))(params, x)),
                            jax.tree.leaves(jax.grad(loss(ref_conv), (0, 1))(params, x))):
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-4)
    x32 = jnp.zeros((1, 32, 32, 640), jnp.float32)  # a 32x32 map keeps the lax conv
    assert "convolution" in jax.jit(conv.apply).lower(params, x32).as_text()


@pytest.mark.parametrize("dtype, atol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_blocked_attention_matches_reference(dtype, atol):
    b, t, s, n, h = 2, 700, 520, 3, 8  # t not a multiple of the block: padded queries
    q, k, v = (jax.random.normal(key, (b, length, n, h), jnp.float32)
               for key, length in zip(jax.random.split(jax.random.PRNGKey(0), 3), (t, s, s)))
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)  # noqa: E731
    ours = functools.partial(attention._blocked_attention, scale=0.3)
    out = ours(*(x.astype(dtype) for x in (q, k, v)))
    assert out.dtype == dtype and out.shape == q.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), ref(q, k, v), rtol=0, atol=atol)
    if dtype == jnp.float32:  # gradients too (training on CPU takes this path)
        loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
        for g, g_ref in zip(jax.grad(loss(ours), (0, 1, 2))(q, k, v), jax.grad(loss(ref), (0, 1, 2))(q, k, v)):
            np.testing.assert_allclose(g, g_ref, rtol=0, atol=1e-5)


def test_weights_round_trip_exact():
    _, sd, _, _ = _case("lcm")
    back = flax_to_torch(_flax_case("lcm")[0])
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def _count_remats(jaxpr) -> int:
    """jax.checkpoint (remat) equations in a closed jaxpr, nested ones included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name.startswith(("remat", "checkpoint"))  # "remat2" in jax 0.10
        for sub in jaxprs_in_params(eqn.params):
            n += _count_remats(sub)
    return n


@pytest.mark.slow
def test_remat_keeps_params_and_gradients():
    """remat="block"/"dots" checkpoint the 5 blocks of the lcm config (2 down + mid + 2 up), "full"
    its 15 layers instead (8 resnets + 7 transformers, not nested in the blocks), with the same
    param tree and gradients; XLA's FLOPs: each recomputes the forward at most once ("full" no
    more than "block"), "dots" less than "block" (matmul and conv outputs kept)."""
    _, _, cfg, inputs = _case("lcm")
    params = _flax_case("lcm")[0]
    target = np.random.default_rng(1).standard_normal(inputs["sample"].shape, dtype=np.float32)

    def grads(remat):
        model = UNet2DConditionModel(cfg, remat=remat)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), **inputs)["params"]
        loss = lambda p: jnp.mean((model.apply({"params": p}, **inputs) - target) ** 2)  # noqa: E731
        n_remat = _count_remats(jax.make_jaxpr(loss)(params).jaxpr)
        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        cost = compiled.cost_analysis()
        flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        return shapes, n_remat, compiled(params), flops

    ref_shapes, n_ref, ref, flops_ref = grads("none")
    assert n_ref == 0
    flops = {}
    for remat, n_expected in (("block", 5), ("full", 15), ("dots", 5)):
        shapes, n, g, flops[remat] = grads(remat)
        assert jax.tree.structure(shapes) == jax.tree.structure(ref_shapes)
        assert jax.tree.map(lambda a, b: a.shape == b.shape, shapes, ref_shapes) == \
            jax.tree.map(lambda a: True, ref_shapes)
        assert n == n_expected, (remat, n)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=remat), g, ref)
    forward = flops_ref / 3  # a grad step is ~3 forwards
    assert flops_ref < flops["dots"] < flops["block"] <= flops_ref + 1.05 * forward, (flops_ref, flops)
    assert flops["full"] <= flops["block"], flops


def test_remat_unknown_mode_raises():
    with pytest.raises(ValueError, match="'blocks'"):
        UNet2DConditionModel(_case("sd1")[2], remat="blocks")


def test_bfloat16_compute_close_to_fp32():
    _, _, cfg, inputs = _case("sd2")
    params, ref = _flax_case("sd2")
    bf16 = UNet2DConditionModel(cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), **inputs)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))  # params stay fp32
    out = jax.jit(bf16.apply)({"params": params}, **inputs)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
    assert err < 0.05, err


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_diffusers(name):
    tm, sd, cfg, _ = _case(name)
    exported = cfg.to_diffusers_config()
    assert exported["_class_name"] == "UNet2DConditionModel"
    assert UNetConfig.from_diffusers_config(exported) == cfg
    rebuilt = TorchUNet.from_config(exported)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == \
           {k: v.shape for k, v in sd.items()}


def test_num_attention_heads_quirk():
    base = dict(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    assert UNetConfig.from_diffusers_config(dict(base, attention_head_dim=[2, 4])).heads_per_block == (2, 4)
    cfg = UNetConfig.from_diffusers_config(dict(base, attention_head_dim=8, num_attention_heads=4))
    assert cfg.heads_per_block == (4, 4)
    assert cfg.to_diffusers_config()["attention_head_dim"] == 4
    assert cfg.to_diffusers_config()["num_attention_heads"] is None


@pytest.mark.parametrize("bad, match", [
    (dict(addition_embed_type="text_time"), "addition_time_embed_dim"),  # SDXL needs its sizes
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(down_block_types=("SimpleCrossAttnDownBlock2D", "DownBlock2D")), "down block type"),
    (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")), "up block type"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(only_cross_attention=[True, False]), "only_cross_attention"),
    (dict(_class_name="UNet2DModel"), "UNet2DModel"),
])
def test_unsupported_config_raises(bad, match):
    cfg = dict(CONFIGS["sd1"], _diffusers_version="0.30.0", some_future_key=1)
    UNetConfig.from_diffusers_config(cfg)  # unknown and private keys are ignored
    with pytest.raises(ValueError, match=match):
        UNetConfig.from_diffusers_config(dict(cfg, **bad))


def _assert_close_up_to_freq_ulp(ours, ref, args):
    """|ours - ref| <= 1e-5 + arg * 2**-23 elementwise: the embeddings are sin/cos of t * freq
    with float32 frequencies, and PyTorch's float32 exp (like XLA's) is only accurate to an ulp,
    so at arguments of 1e3..1e4 (t ~ 999, guidance * 1000) the sines may differ by that much."""
    bound = 1e-5 + 2.0 ** -23 * np.concatenate([args, args], axis=1)
    bound = np.pad(bound, ((0, 0), (0, ours.shape[1] - bound.shape[1])), constant_values=1e-5)
    excess = np.abs(np.asarray(ours) - ref) - bound
    assert excess.max() <= 0, f"max excess {excess.max()} at {np.unravel_index(excess.argmax(), excess.shape)}"


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (320, True, 0), (320, False, 1), (33, True, 1)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    t = np.array([0, 1, 19, 259.5, 500, 999], np.float32)
    ours = timestep_embedding(jnp.asarray(t), dim, flip, shift)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert ours.shape == (len(t), dim) and ours.dtype == jnp.float32
    half = dim // 2
    args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - shift))[None]
    _assert_close_up_to_freq_ulp(ours, ref.numpy(), args)


@pytest.mark.parametrize("dim", [256, 255, 512])
def test_guidance_embedding_matches_diffusers(dim):
    w = np.array([0.0, 0.1, 1.0, 3.0, 7.0, 14.0], np.float32)
    ours = guidance_embedding(jnp.asarray(w), dim)
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.from_numpy(w), dim)
    assert ours.shape == (len(w), dim) and ours.dtype == jnp.float32
    half = dim // 2
    args = 1000 * w[:, None] * np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))[None]
    _assert_close_up_to_freq_ulp(ours, ref.numpy(), args)
    np.testing.assert_allclose(np.asarray(ours)[:2], ref.numpy()[:2], rtol=0, atol=1e-5)  # small w: tight


def test_cond_proj_zero_init_and_required_width():
    emb = TimestepEmbedding(64, cond_proj_dim=16, zero_init_cond_proj=True)
    x, c = jnp.ones((2, 32)), jnp.ones((2, 16))
    params = emb.init(jax.random.PRNGKey(0), x)["params"]  # params made even without a condition
    assert params["cond_proj"]["kernel"].shape == (16, 32) and "bias" not in params["cond_proj"]
    assert not params["cond_proj"]["kernel"].any()
    np.testing.assert_array_equal(emb.apply({"params": params}, x, c), emb.apply({"params": params}, x))
    with pytest.raises(ValueError, match="time_cond_proj_dim=16"):
        emb.apply({"params": params}, x, jnp.ones((2, 8)))
