"""LoRA: diffusers/PEFT and kohya files in, diffusers files out, fused == unfused, on tiny UNets."""
import dataclasses
import logging

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util
from safetensors.numpy import save_file

import sd_models
from lcm_jax import lora, lora_files, weights
from lcm_jax.lora import LoraError
from lcm_jax.pipeline import LCMPipeline

RANK, ALPHA = 4, 8.0  # alpha != r: PEFT's scaling alpha / r = 2
RANK_PATTERN = {"conv_shortcut": 2}  # per-module rank and alpha, as PEFT allows
ALPHA_PATTERN = {"time_emb_proj": 3.0}
# The original SD (LDM/SGM) UNet names of the tiny UNet's blocks (layers_per_block=1, down:
# CrossAttn + plain, up: plain + CrossAttn), written out by hand for the kohya SGM-name form.
SGM_BLOCKS = {
    "down_blocks.0.resnets.0": "input_blocks.1.0", "down_blocks.0.attentions.0": "input_blocks.1.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.2.0.op", "down_blocks.1.resnets.0": "input_blocks.3.0",
    "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
    "mid_block.resnets.1": "middle_block.2",
    "up_blocks.0.resnets.0": "output_blocks.0.0", "up_blocks.0.resnets.1": "output_blocks.1.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.1.1.conv",
    "up_blocks.1.resnets.0": "output_blocks.2.0", "up_blocks.1.attentions.0": "output_blocks.2.1",
    "up_blocks.1.resnets.1": "output_blocks.3.0", "up_blocks.1.attentions.1": "output_blocks.3.1",
}
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sd"))
    sd_models.make_sd_pipeline(d)
    return d


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return LCMPipeline.from_pretrained(sd_dir)


def _diffusers_pipe(sd_dir):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None)


def _module_alpha(name):
    for pattern, value in ALPHA_PATTERN.items():
        if name.endswith("." + pattern):
            return value
    return ALPHA


@pytest.fixture(scope="module")
def peft_lora(sd_dir, tmp_path_factory):
    """A diffusers UNet with a PEFT LoRA (random A and B, per-module rank/alpha), saved by
    diffusers' save_lora_weights: (folder, the UNet with the LoRA active)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    unet = _diffusers_pipe(sd_dir).unet
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(lora.LCM_LORA_TARGETS),
                                rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN,
                                init_lora_weights=False))
    with torch.no_grad():  # keep the delta modest beside W
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    d = str(tmp_path_factory.mktemp("peft"))
    StableDiffusionPipeline.save_lora_weights(
        d, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return d, unet


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)


def _torch_out(unet, x, t, c):
    with torch.no_grad():
        return unet(x, t, c).sample.numpy()


@pytest.fixture(scope="module")
def run_unet(pipe):
    fn = jax.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    return lambda params, x, t, c: np.asarray(fn(params, x.numpy(), t.numpy(), c.numpy()))


def _peft_state(folder):
    return weights.read_safetensors(f"{folder}/{lora_files.LORA_WEIGHT_NAME}")


def _assert_same_tree(a, b, atol=1e-6):
    fa, fb = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
    assert [p for p, _ in fa] == [p for p, _ in fb]
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=str(path))


def test_peft_lora_matches_diffusers(pipe, peft_lora, run_unet):
    folder, unet = peft_lora
    x, t, c = _inputs()
    want = _torch_out(unet, x, t, c)
    tree = lora_files.load_lora(folder, pipe.unet_params)
    # the same modules as PEFT adapts for the same targets (and the same ranks)
    peft_names = {k[len("unet."):-len(".lora_A.weight")] for k in _peft_state(folder) if ".lora_A." in k}
    assert set(lora.target_modules(pipe.unet_params)) == peft_names
    ranks = {p: m["down"].shape[-1] for p, m in lora.adapted(tree).items()}
    assert {r for p, r in ranks.items() if p[-1] == "conv_shortcut"} == {2}  # rank_pattern
    assert {r for p, r in ranks.items() if p[-1] != "conv_shortcut"} == {RANK}
    got = run_unet(lora.merge(pipe.unet_params, tree), x, t, c)
    base = run_unet(pipe.unet_params, x, t, c)
    assert np.abs(want - base).max() > 0.1  # the LoRA matters
    err = np.abs(got - want).max()
    print(f"PEFT LoRA loaded by us vs diffusers: max abs diff {err:.2e}")
    assert err <= 1e-4
    # scaled: diffusers' set_adapters strength == our merge scale
    unet.set_adapters(["default"], [0.5])
    try:
        np.testing.assert_allclose(run_unet(lora.merge(pipe.unet_params, tree, 0.5), x, t, c),
                                   _torch_out(unet, x, t, c), atol=1e-4)
    finally:
        unet.set_adapters(["default"], [1.0])


def test_export_loads_in_diffusers(sd_dir, pipe, peft_lora, run_unet, tmp_path):
    folder, unet = peft_lora
    x, t, c = _inputs()
    want = _torch_out(unet, x, t, c)
    p = dataclasses.replace(pipe)
    p.load_lora_weights(folder)
    path = p.save_lora_weights(str(tmp_path / "ours"))
    assert path.endswith("ours/pytorch_lora_weights.safetensors")
    assert set(weights.read_safetensors(path)) == set(_peft_state(folder))  # diffusers' own key names
    ref = _diffusers_pipe(sd_dir)
    ref.load_lora_weights(str(tmp_path / "ours"))
    err = np.abs(_torch_out(ref.unet, x, t, c) - want).max()
    print(f"our exported LoRA loaded by diffusers vs diffusers' LoRA: max abs diff {err:.2e}")
    assert err <= 1e-4

    # a fresh LoRA of ours (rank 3, alpha 6 != r), trained a bit (random up), exported with its alpha
    fresh = lora.init_lora(pipe.unet_params, 3, rng=jax.random.PRNGKey(1))
    leaves, tdef = jax.tree_util.tree_flatten_with_path(fresh)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    fresh = jax.tree_util.tree_unflatten(tdef, [
        0.1 * jax.random.normal(k, v.shape) if path[-1].key == "up" else v for k, (path, v) in zip(keys, leaves)])
    lora_files.save_lora_weights(str(tmp_path / "fresh"), fresh, alpha=6.0)
    ours = run_unet(lora.merge(pipe.unet_params, fresh, alpha=6.0), x, t, c)
    ref = _diffusers_pipe(sd_dir)
    ref.load_lora_weights(str(tmp_path / "fresh"))
    err = np.abs(_torch_out(ref.unet, x, t, c) - ours).max()
    print(f"fresh LoRA (r=3, alpha=6) exported, diffusers vs ours: max abs diff {err:.2e}")
    assert err <= 1e-4
    # and it comes back to us as the same delta (alpha folded into up)
    _assert_same_tree(lora_files.load_lora(str(tmp_path / "fresh"), pipe.unet_params), lora.fold_alpha(fresh, 6.0))


def _kohya_state(peft_state, sgm=False):
    """The PEFT file's tensors under kohya names (lora_down/lora_up + per-module .alpha)."""
    out = {}
    for key, v in peft_state.items():
        name, part = key[len("unet."):].rsplit(".lora_", 1)
        alpha = _module_alpha(name)
        if sgm:
            head = max((h for h in SGM_BLOCKS if name == h or name.startswith(h + ".")), key=len)
            tail = name[len(head) + 1:]
            if ".resnets." in head:
                tail = SGM_RESNET[tail]
            name = ".".join(x for x in (SGM_BLOCKS[head], tail) if x)
        kohya = "lora_unet_" + name.replace(".", "_")
        out[f"{kohya}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = v
        out[f"{kohya}.alpha"] = np.array(alpha, np.float32)
    return out


def _old_diffusers_state(peft_state):
    """diffusers < 0.22 names (attn processors' to_q_lora, .lora.down/.lora.up), alpha folded in."""
    out = {}
    for key, v in peft_state.items():
        name, part = key[len("unet."):].rsplit(".lora_", 1)
        updown = "down" if part == "A.weight" else "up"
        if updown == "up":
            v = v * (_module_alpha(name) / v.shape[1])
        attn = name.rsplit(".", 1)[0] if name.endswith((".to_q", ".to_k", ".to_v")) else None
        if name.endswith(".to_out.0"):
            out[f"unet.{name[:-len('.to_out.0')]}.processor.to_out_lora.{updown}.weight"] = v
        elif attn:
            out[f"unet.{attn}.processor.{name.rsplit('.', 1)[1]}_lora.{updown}.weight"] = v
        else:
            out[f"unet.{name}.lora.{updown}.weight"] = v
    return out


def test_kohya_and_old_diffusers_keys_give_the_same_deltas(sd_dir, pipe, peft_lora, run_unet, tmp_path, caplog):
    folder, unet = peft_lora
    want = lora_files.load_lora(folder, pipe.unet_params)
    peft_state = _peft_state(folder)
    kohya = _kohya_state(peft_state)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    text = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.zeros((4, 32), np.float32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": np.zeros((32, 4), np.float32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": np.array(4.0, np.float32)}
    save_file({**kohya, **text}, str(tmp_path / "kohya.safetensors"))
    with caplog.at_level(logging.WARNING):
        _assert_same_tree(lora_files.load_lora(str(tmp_path / "kohya.safetensors"), pipe.unet_params), want)
    assert "skipped 3 text-encoder LoRA tensors" in caplog.text

    sgm = _kohya_state(peft_state, sgm=True)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm
    assert "lora_unet_output_blocks_1_1_conv.lora_up.weight" in sgm
    _assert_same_tree(lora_files.load_lora(sgm, pipe.unet_params), want)
    _assert_same_tree(lora_files.load_lora(_old_diffusers_state(peft_state), pipe.unet_params), want)
    # PEFT keys without diffusers' "unet." prefix (unet.save_attn_procs-era files)
    bare = {k[len("unet."):]: v * (_module_alpha(k[5:].rsplit(".lora_", 1)[0]) / v.shape[1] if ".lora_B." in k else 1)
            for k, v in peft_state.items()}
    _assert_same_tree(lora_files.load_lora(bare, pipe.unet_params), want)

    # diffusers reads our kohya file the same way
    save_file(kohya, str(tmp_path / "kohya_unet.safetensors"))
    ref = _diffusers_pipe(sd_dir)
    ref.load_lora_weights(str(tmp_path / "kohya_unet.safetensors"))
    x, t, c = _inputs()
    np.testing.assert_allclose(_torch_out(ref.unet, x, t, c), _torch_out(unet, x, t, c), atol=1e-4)


def test_pipeline_fused_unfused_and_scales(sd_dir, pipe, peft_lora):
    folder, _ = peft_lora
    p = dataclasses.replace(pipe)  # shares the compiled samplers: none may keep stale weights
    lat = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    sample = lambda: p("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np")  # noqa: E731
    base = sample()
    p.load_lora_weights(folder, adapter_name="lcm")
    unfused = sample()
    ref = _diffusers_pipe(sd_dir)
    ref.load_lora_weights(folder, adapter_name="lcm")
    want = ref("a cat", num_inference_steps=2, guidance_scale=7.5, output_type="np", height=16, width=16,
               latents=torch.from_numpy(lat)).images
    assert np.abs(unfused - base).max() > 0.05
    print(f"images with LoRA (unfused), ours vs diffusers: max abs diff {np.abs(unfused - want).max():.2e}")
    np.testing.assert_allclose(unfused, want, atol=2e-3)

    p.fuse_lora()
    assert p._unfused_lora() == ()
    np.testing.assert_allclose(sample(), unfused, atol=1e-5)
    p.unfuse_lora()
    restored = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
                   zip(jax.tree_util.tree_leaves(p.unet_params), jax.tree_util.tree_leaves(pipe.unet_params)))
    print(f"fuse then unfuse vs base params: max abs diff {restored:.2e}")
    assert restored <= 1e-6
    np.testing.assert_allclose(sample(), unfused, atol=1e-5)

    p.set_adapters("lcm", 0.5)  # strength, unfused; then fused at lora_scale 0.5 -> the same images
    half = sample()
    ref.set_adapters("lcm", 0.5)
    np.testing.assert_allclose(half, ref("a cat", num_inference_steps=2, guidance_scale=7.5, output_type="np",
                                         height=16, width=16, latents=torch.from_numpy(lat)).images, atol=2e-3)
    p.set_adapters("lcm", 1.0)
    p.fuse_lora(lora_scale=0.5)
    np.testing.assert_allclose(sample(), half, atol=1e-5)
    p.unload_lora_weights()  # fused weights stay, as in diffusers
    np.testing.assert_allclose(sample(), half, atol=1e-5)

    q = dataclasses.replace(pipe)
    q.load_lora_weights(folder)
    q.unload_lora_weights()
    np.testing.assert_array_equal(q("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np"),
                                  base)
    assert pipe._lora == {}  # the original pipeline never saw the adapters


def test_lcm_lora_sampling_matches_diffusers(sd_dir, pipe, peft_lora):
    """The LCM-LoRA use: a plain SD UNet + LoRA sampled with scheduler="lcm", as diffusers'
    StableDiffusionPipeline with an LCMScheduler (guidance 1: no CFG)."""
    from diffusers import LCMScheduler
    folder, _ = peft_lora
    p = dataclasses.replace(pipe)
    p.load_lora_weights(folder)
    ref = _diffusers_pipe(sd_dir)
    ref.scheduler = LCMScheduler.from_config(ref.scheduler.config)
    ref.load_lora_weights(folder)
    lat = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    steps = 3
    g = torch.Generator().manual_seed(7)
    noises = np.stack([torch.randn(lat.shape, generator=g).numpy() for _ in range(steps - 1)])
    want = ref("a dog", num_inference_steps=steps, guidance_scale=1.0, output_type="np", height=16, width=16,
               latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(7)).images
    got = p("a dog", num_inference_steps=steps, guidance_scale=1.0, scheduler="lcm", latents=lat, height=16,
            width=16, output_type="np", _noises=noises)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_init_targets_and_merge_roundtrip(pipe):
    params = pipe.unet_params
    fresh = lora.init_lora(params, 4, rng=jax.random.PRNGKey(0))
    mods = lora.adapted(fresh)
    assert len(mods) == len(lora.target_modules(params))
    flat = traverse_util.flatten_dict(params)
    for path, m in mods.items():
        *lead, n_out = flat[path + ("kernel",)].shape
        assert m["down"].shape == (*lead, 4) and m["up"].shape == (4, n_out)
        assert not np.any(m["up"]) and np.abs(m["down"]).max() <= 1 / np.sqrt(np.prod(lead))
    merged = lora.merge(params, fresh, alpha=8.0)  # up = 0: the base, exactly
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), merged, params)
    assert lora.num_params(fresh) == sum(m["down"].size + m["up"].size for m in mods.values())
    gauss = lora.init_lora(params, 8, rng=jax.random.PRNGKey(0), init="gaussian")
    assert abs(float(np.std(np.concatenate([np.ravel(m["down"]) for m in lora.adapted(gauss).values()]))) - 1 / 8) < 0.01
    # targets: a regex (PEFT's string form) or a list of name suffixes
    only_q = lora.target_modules(params, r".*attn1\.to_q")
    assert set(only_q) == {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                           "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                           "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                           "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"}
    assert set(lora.target_modules(params, ["conv_in"])) == {"conv_in"}
    with pytest.raises(ValueError, match="match no Dense/Conv module"):
        lora.target_modules(params, ["nope"])
    # fuse/unfuse arithmetic: unmerge(merge) restores within float rounding
    rng = iter(jax.random.split(jax.random.PRNGKey(3), 2 * len(mods)))
    noisy = jax.tree_util.tree_map(lambda v: jax.random.normal(next(rng), v.shape), fresh)
    back = lora.unmerge(lora.merge(params, noisy, 0.7, alpha=8.0), noisy, 0.7, alpha=8.0)
    assert max(float(np.abs(np.asarray(a) - b).max()) for a, b in
               zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params))) <= 1e-6


def test_errors_name_the_problem(pipe, peft_lora, tmp_path):
    folder, _ = peft_lora
    params = pipe.unet_params
    state = _peft_state(folder)
    a_key = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"

    bad = dict(state)
    bad["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = state[a_key]
    bad["lora_unet_down_blocks_0_resnets_9_conv1.lora_down.weight"] = state[a_key]
    bad["unet.down_blocks.0.resnets.0.norm1.lora_A.weight"] = state[a_key]
    with pytest.raises(LoraError) as e:
        lora_files.load_lora(bad, params)
    msg = str(e.value)
    assert "not a Dense/Conv of the UNet (3)" in msg
    for name in ("'down_blocks.7.attentions.0.proj_in'", "'down_blocks_0_resnets_9_conv1'",
                 "'down_blocks.0.resnets.0.norm1'"):
        assert name in msg

    bad = dict(state)
    bad[a_key] = state[a_key][:, :-1]
    del bad["unet.down_blocks.0.attentions.0.proj_out.lora_B.weight"]
    bad["unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"] = np.ones(32, np.float32)
    with pytest.raises(LoraError) as e:
        lora_files.load_lora(bad, params)
    msg = str(e.value)
    assert (f"module 'down_blocks.0.attentions.0.proj_in': {a_key} (4, 31, 1, 1)" in msg
            and "expected (4, 32, 1, 1)" in msg)
    assert "module 'down_blocks.0.attentions.0.proj_out': has unet.down_blocks.0.attentions.0.proj_out" \
           ".lora_A.weight but needs both" in msg
    assert "lora_magnitude_vector" in msg and "DoRA" in msg

    torch.save({a_key: torch.zeros(3)}, tmp_path / "lora.bin")
    with pytest.raises(LoraError, match=r"lora\.bin' is a pickled PyTorch file.*safetensors only"):
        lora_files.load_lora(str(tmp_path / "lora.bin"), params)
    (tmp_path / "html.safetensors").write_bytes(b"<html>not found</html>")
    with pytest.raises(LoraError, match=r"html\.safetensors.*safetensors files only"):
        lora_files.load_lora(str(tmp_path / "html.safetensors"), params)
    with pytest.raises(FileNotFoundError, match="no such file"):
        lora_files.load_lora(str(tmp_path / "missing.safetensors"), params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no pytorch_lora_weights.safetensors"):
        lora_files.load_lora(str(tmp_path / "empty"), params)
    with pytest.raises(LoraError, match="no UNet LoRA tensors"):
        lora_files.load_lora({"text_encoder.x.lora_A.weight": np.zeros((1, 1), np.float32)}, params)

    p = dataclasses.replace(pipe)
    p.load_lora_weights(folder)
    with pytest.raises(ValueError, match="adapter name 'default_0' is already in use"):
        p.load_lora_weights(folder, adapter_name="default_0")
    with pytest.raises(ValueError, match=r"unknown adapters \['nope'\]"):
        p.set_adapters("nope")
    other = lora.init_lora(_narrower_unet_shapes(), 2)
    with pytest.raises(LoraError, match="does not make the kernel"):
        lora.merge(params, other)


def _narrower_unet_shapes():
    """Params of a UNet with other widths (for a LoRA that does not fit ``pipe``)."""
    from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
    from lcm_jax.models.params import unet_shapes
    torch_unet = sd_models.make_unet()
    cfg = dict(torch_unet.config)
    cfg["block_out_channels"] = [16, 32]
    return unet_shapes(UNet2DConditionModel(UNetConfig.from_diffusers_config(cfg)))
