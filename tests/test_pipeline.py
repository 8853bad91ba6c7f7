"""LCMPipeline end to end against diffusers on tiny random pipelines saved to disk."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import sd_models
from lcm_jax.pipeline import LCMPipeline


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sd"))
    ref = sd_models.make_sd_pipeline(d)
    return d, ref


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("lcm"))
    ref = sd_models.make_sd_pipeline(d, lcm=True)
    return d, ref


@pytest.fixture(scope="module")
def pipe(sd_dir):
    return LCMPipeline.from_pretrained(sd_dir[0])


def _latents(n, seed=0, size=8):
    return np.random.default_rng(seed).standard_normal((n, 4, size, size)).astype(np.float32)


def test_ddim_cfg_matches_diffusers(sd_dir, pipe):
    _, ref = sd_dir
    lat = _latents(2)
    want = ref(["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, output_type="np",
               height=16, width=16, latents=torch.from_numpy(lat)).images
    got = pipe(["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, scheduler="ddim",
               latents=lat, height=16, width=16, output_type="np")
    assert got.shape == want.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, want, atol=2e-3)
    u8 = pipe(["a cat", "a dog"], num_inference_steps=3, guidance_scale=7.5, scheduler="ddim",
              latents=lat, height=16, width=16)
    assert u8.dtype == np.uint8 and u8.shape == (2, 16, 16, 3)


def test_save_pretrained_loads_in_diffusers(sd_dir, pipe, tmp_path):
    from diffusers import StableDiffusionPipeline
    _, ref = sd_dir
    out = str(tmp_path / "saved")
    pipe.save_pretrained(out)
    # exactly the key set diffusers/transformers write
    from safetensors.numpy import load_file
    for comp, fname, model in (("unet", "diffusion_pytorch_model", ref.unet), ("vae", "diffusion_pytorch_model", ref.vae)):
        keys = set(load_file(os.path.join(out, comp, f"{fname}.safetensors")))
        assert keys == set(model.state_dict()), comp
    reloaded = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    g = torch.Generator().manual_seed(0)
    x, t, c = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 32, generator=g)
    with torch.no_grad():
        a = reloaded.unet(x, t, c).sample.numpy()
        b = ref.unet(x, t, c).sample.numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    ours = np.asarray(pipe.unet.apply({"params": pipe.unet_params}, x.numpy(), t.numpy(), c.numpy()))
    np.testing.assert_allclose(ours, b, atol=1e-4)
    # and it comes back into our pipeline with the same images
    again = LCMPipeline.from_pretrained(out)
    lat = _latents(1)
    np.testing.assert_allclose(again("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np"),
                               pipe("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np"),
                               atol=1e-6)


def test_flax_msgpack_checkpoint_loads(sd_dir, pipe, tmp_path):
    from flax import serialization
    src, _ = sd_dir
    out = tmp_path / "flax"
    shutil.copytree(src, out)
    for comp, name, params in (("unet", "diffusion_flax_model.msgpack", pipe.unet_params),
                               ("vae", "diffusion_flax_model.msgpack", pipe.vae_params),
                               ("text_encoder", "flax_model.msgpack", pipe.text_params)):
        for f in os.listdir(out / comp):
            if f.endswith(".safetensors"):
                os.remove(out / comp / f)
        (out / comp / name).write_bytes(serialization.msgpack_serialize(
            __import__("jax").tree.map(np.asarray, params)))
    flax_pipe = LCMPipeline.from_pretrained(str(out))
    lat = _latents(1)
    np.testing.assert_allclose(flax_pipe("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np"),
                               pipe("a cat", 2, 7.5, "ddim", latents=lat, height=16, width=16, output_type="np"),
                               atol=1e-6)


def test_lcm_matches_diffusers_one_step_and_multistep(lcm_dir):
    d, ref = lcm_dir
    pipe = LCMPipeline.from_pretrained(d)
    assert pipe.is_lcm
    lat = _latents(1)
    want = ref("a cat", num_inference_steps=1, guidance_scale=8.0, output_type="np", height=16, width=16,
               latents=torch.from_numpy(lat)).images
    got = pipe("a cat", num_inference_steps=1, guidance_scale=8.0, latents=lat, height=16, width=16,
               output_type="np")
    np.testing.assert_allclose(got, want, atol=2e-3)
    # multistep: replay diffusers' per-step noise (LCMScheduler.step draws it from the generator)
    steps = 4
    g = torch.Generator().manual_seed(7)
    noises = np.stack([torch.randn(lat.shape, generator=g).numpy() for _ in range(steps - 1)])
    want = ref("a cat", num_inference_steps=steps, guidance_scale=8.0, output_type="np", height=16, width=16,
               latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(7)).images
    got = pipe("a cat", num_inference_steps=steps, guidance_scale=8.0, latents=lat, height=16, width=16,
               output_type="np", _noises=noises)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_bad_inputs_name_the_problem(sd_dir, pipe, tmp_path):
    src, _ = sd_dir
    with pytest.raises(FileNotFoundError, match="not a folder"):
        LCMPipeline.from_pretrained(str(tmp_path / "nope"))
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="missing vae/"):
        LCMPipeline.from_pretrained(str(broken))
    with pytest.raises(ValueError, match="empty list"):
        pipe([])
    with pytest.raises(ValueError, match="divisible by 2"):
        pipe("a cat", height=15, width=16)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"):
        pipe("a cat", height=16, width=16, latents=np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(ValueError, match="scheduler 'euler'"):
        pipe("a cat", scheduler="euler")
    with pytest.raises(ValueError, match="original_inference_steps|50"):
        pipe("a cat", num_inference_steps=51, scheduler="lcm")
    bad_cfg = tmp_path / "badcfg"
    shutil.copytree(src, bad_cfg)
    cfg = json.loads((bad_cfg / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [32, 32]
    (bad_cfg / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatches"):
        LCMPipeline.from_pretrained(str(bad_cfg))


def test_with_unet_shares_compiled_samplers(lcm_dir):
    """A student evaluated every N steps through ``with_unet`` compiles each sampler once: the
    derived pipelines share one cache, keyed by the UNet definition (params are arguments)."""
    import jax
    base = LCMPipeline.from_pretrained(lcm_dir[0])
    z = _latents(1)
    first = base("a cat", num_inference_steps=2, latents=z, output_type="np", height=16, width=16)
    n = len(base._compiled)
    scaled = jax.tree.map(lambda x: x * 0.5, base.unet_params)
    student = base.with_unet(base.unet.clone(remat="block"), scaled, guidance_range=(3.0, 7.0))
    assert student._compiled is base._compiled and student.unet.remat == "none"
    assert student.guidance_range == (3.0, 7.0) and not student._lora
    other = student("a cat", num_inference_steps=2, latents=z, output_type="np", height=16, width=16)
    assert len(base._compiled) == n  # the same program, other params
    assert not np.allclose(first, other)
    np.testing.assert_array_equal(base.with_unet(base.unet, base.unet_params)(
        "a cat", num_inference_steps=2, latents=z, output_type="np", height=16, width=16), first)


def test_weights_stay_on_the_device(sd_dir, lcm_dir, tmp_path):
    """The params go to the device once, at load: a second call (LCM with an unfused LoRA, DDIM + CFG,
    given latents) sends only what it must, explicitly, and no weight crosses from the host. A bf16
    pipeline holds bf16 params; ``param_dtype`` keeps float32 masters."""
    import jax
    import jax.numpy as jnp
    from lcm_jax import lora, lora_files
    lcm = LCMPipeline.from_pretrained(lcm_dir[0])
    lora_files.save_lora_weights(str(tmp_path), lora.init_lora(lcm.unet_params, 2, rng=jax.random.PRNGKey(0)),
                                 alpha=2.0)
    lcm.load_lora_weights(str(tmp_path))
    sd = LCMPipeline.from_pretrained(sd_dir[0])
    calls = [lambda: lcm(["a cat"], 2, 8.0, seed=1), lambda: sd(["a cat", "a dog"], 2, 7.5, "ddim"),
             lambda: sd(["a cat"], 1, 7.5, "dpm++", latents=_latents(1))]
    for call in calls:
        first = call()
        with jax.transfer_guard_host_to_device("disallow"):
            np.testing.assert_array_equal(call(), first)
    np.testing.assert_array_equal(lcm(["a cat"], 2, 8.0, seed=-1), lcm(["a cat"], 2, 8.0, seed=2 ** 32 - 1))
    leaves = jax.tree.leaves((lcm.unet_params, lcm.vae_params, lcm.text_params))
    assert all(isinstance(x, jax.Array) for x in leaves)
    half = LCMPipeline.from_pretrained(sd_dir[0], dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half.unet_params)} == {jnp.dtype(jnp.bfloat16)}
    masters = LCMPipeline.from_pretrained(sd_dir[0], dtype="bfloat16", param_dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(masters.unet_params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.slow
@pytest.mark.parametrize("n", [3, 8])
def test_sampling_over_a_mesh_matches_one_device(sd_dir, lcm_dir, tmp_path, n):
    """A pipeline over 8 devices (the batch split and zero-padded to them, params replicated; at N = 8
    also data=2 x fsdp=4, params sharded by the partition rules) makes the images one device makes:
    LCM 4 steps (with an unfused LoRA), DDIM + CFG 3 steps; 'auto' on CPU is one device."""
    import jax
    from lcm_jax import lora, lora_files, sharding
    prompts = ["a cat", "a dog", "a photo of a cat", "", "a dog dog", "cat", "a photo", "a"][:n]
    lora_files.save_lora_weights(str(tmp_path), lora.init_lora(LCMPipeline.from_pretrained(lcm_dir[0]).unet_params,
                                                               2, rng=jax.random.PRNGKey(1)), alpha=2.0)
    data8 = sharding.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    fsdp = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    for folder, kw in ((lcm_dir[0], dict(num_inference_steps=4, guidance_scale=8.0)),
                       (sd_dir[0], dict(num_inference_steps=3, guidance_scale=7.5, scheduler="ddim"))):
        one, *meshed = (LCMPipeline.from_pretrained(folder, mesh=m) for m in (None, data8) + ((fsdp,) if n == 8 else ()))
        assert one.mesh is None and LCMPipeline.from_pretrained(folder).mesh is None  # auto, CPU
        for p in (one, *meshed):
            if p.is_lcm:
                p.load_lora_weights(str(tmp_path))
        want = one(prompts, seed=3, output_type="np", **kw)
        assert want.shape[0] == n
        for p in meshed:
            got = p(prompts, seed=3, output_type="np", **kw)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mesh axes"):
        LCMPipeline.from_pretrained(sd_dir[0], mesh=jax.sharding.Mesh(np.array(jax.devices()), ("batch",)))
