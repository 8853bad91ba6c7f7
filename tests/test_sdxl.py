"""SDXL: the text_time UNet, both text encoders and LCMPipeline against diffusers' tiny
StableDiffusionXLPipeline (random weights, built and saved in the test; tests/sd_models.py)."""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import sd_models
from lcm_jax.models.unet import UNetConfig
from lcm_jax.models.embeddings import sdxl_time_ids
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.weights import flax_to_torch

PROMPTS = ["a photo of a cat", "a dog"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sdxl"))
    return d, sd_models.make_sdxl_pipeline(d)


@pytest.fixture(scope="module")
def pipe(sdxl_dir):
    return LCMPipeline.from_pretrained(sdxl_dir[0])


def _latents(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)


def test_unet_text_time_matches_diffusers(sdxl_dir, pipe):
    """Loaded from the saved folder (strict renaming), the text_time UNet gives diffusers' output."""
    _, ref = sdxl_dir
    assert pipe.is_sdxl and not pipe.is_lcm
    assert set(pipe.unet_params["add_embedding"]) == {"linear_1", "linear_2"}
    back = flax_to_torch(pipe.unet_params)  # the exact torch state dict, both ways
    sd = {k: v.numpy() for k, v in ref.unet.state_dict().items()}
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8), dtype=np.float32)
    t = np.array([999, 37])
    ctx = rng.standard_normal((2, 7, 64), dtype=np.float32)
    added = {"text_embeds": rng.standard_normal((2, sd_models.SDXL_PROJECTION_DIM), dtype=np.float32),
             "time_ids": np.array([[16, 16, 0, 0, 16, 16], [1024, 768, 32, 8, 1024, 1024]], np.float32)}
    with torch.no_grad():
        want = ref.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                        added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample.numpy()
    fwd = jax.jit(lambda p, a: pipe.unet.apply({"params": p}, x, t, ctx, None, a))
    got = np.asarray(fwd(pipe.unet_params, added))
    print("unet max abs diff", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    zeroed = {**added, "text_embeds": np.zeros_like(added["text_embeds"])}  # the conditioning matters
    assert np.abs(np.asarray(fwd(pipe.unet_params, zeroed)) - want).max() > 1e-2

    exported = pipe.unet.config.to_diffusers_config()
    assert UNetConfig.from_diffusers_config(exported) == pipe.unet.config
    from diffusers import UNet2DConditionModel
    rebuilt = UNet2DConditionModel.from_config(exported)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    trace = lambda a: jax.eval_shape(lambda p: pipe.unet.apply({"params": p}, x, t, ctx, None, a),  # noqa: E731
                                     pipe.unet_params)
    with pytest.raises(ValueError, match="time_ids"):
        trace({"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim is 80"):
        trace({**added, "time_ids": added["time_ids"][:, :5]})


def test_text_encoders_match_transformers(sdxl_dir, pipe):
    """Both encoders' penultimate hidden states (concatenated) and text_encoder_2's projected
    pooled output are diffusers' encode_prompt; tokenizer_2 pads with "!" (id 0), not EOS."""
    _, ref = sdxl_dir
    assert pipe.text_encoder_2.config.with_projection and not pipe.text_encoder.config.with_projection
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token != "!"
    prompts = PROMPTS + [""]
    with torch.no_grad():
        want, _, want_pooled, _ = ref.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    got, pooled = pipe.encode_prompt(prompts, return_pooled=True)
    assert got.shape == (3, 16, 64) and pooled.shape == (3, sd_models.SDXL_PROJECTION_DIM)
    print("text max abs diffs", np.abs(np.asarray(got) - want.numpy()).max(),
          np.abs(np.asarray(pooled) - want_pooled.numpy()).max())
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(pooled), want_pooled.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(pipe.encode_prompt(prompts)), np.asarray(got))


def test_ddim_cfg_matches_diffusers(sdxl_dir, pipe):
    """End to end (DDIM trailing, 3 steps, CFG, same latents): negative embeddings are zeros by
    default (force_zeros_for_empty_prompt) and the empty prompt's when the flag is off."""
    _, ref = sdxl_dir
    lat = _latents(2)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="np")
    outs = {}
    for zeros in (True, False):
        ref.register_to_config(force_zeros_for_empty_prompt=zeros)
        try:
            want = ref(PROMPTS, latents=torch.from_numpy(lat), **kw).images
        finally:
            ref.register_to_config(force_zeros_for_empty_prompt=True)
        ours = dataclasses.replace(pipe, force_zeros_for_empty_prompt=zeros)  # shares the jitted sampler
        got = ours(PROMPTS, scheduler="ddim", latents=lat, **kw)
        assert got.shape == want.shape == (2, 16, 16, 3)
        print("ddim max abs diff", zeros, np.abs(got - want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
        outs[zeros] = got
    assert np.abs(outs[True] - outs[False]).max() > 1e-2  # the flag is not a no-op here


def test_save_pretrained_loads_in_diffusers(sdxl_dir, pipe, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    src, ref = sdxl_dir
    out = str(tmp_path / "saved")
    dataclasses.replace(pipe, force_zeros_for_empty_prompt=False).save_pretrained(out)
    keys = lambda d, comp, f: {k.removeprefix("text_model.")  # noqa: E731  (transformers 5 drops it)
                               for k in load_file(os.path.join(d, comp, f"{f}.safetensors"))}
    for comp, fname in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                        ("text_encoder", "model"), ("text_encoder_2", "model")):
        assert keys(out, comp, fname) == keys(src, comp, fname), comp
    index = json.loads(open(os.path.join(out, "model_index.json")).read())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is False
    reloaded = StableDiffusionXLPipeline.from_pretrained(out, add_watermarker=False)
    assert reloaded.config.force_zeros_for_empty_prompt is False
    assert reloaded.tokenizer_2.pad_token == "!"
    lat = torch.from_numpy(_latents(1))
    kw = dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, output_type="np")
    ref.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        want = ref("a cat", latents=lat, **kw).images
    finally:
        ref.register_to_config(force_zeros_for_empty_prompt=True)
    np.testing.assert_allclose(reloaded("a cat", latents=lat, **kw).images, want, rtol=0, atol=1e-5)
    # and back into ours, unchanged
    again = LCMPipeline.from_pretrained(out)
    assert again.is_sdxl and again.force_zeros_for_empty_prompt is False
    for a, b in ((again.unet_params, pipe.unet_params), (again.text_params_2, pipe.text_params_2)):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_lcm_sampler_on_sdxl_lcm_unet_matches_diffusers(tmp_path):
    """An SDXL LCM UNet (time_cond_proj_dim) in StableDiffusionXLPipeline + LCMScheduler: our
    LCM sampler gives the same images at 2 steps (diffusers' step noise replayed). The VAE has
    latents_mean/std, which SDXL's pipeline (unlike SD1's) de-normalises with."""
    d = str(tmp_path / "lcm_sdxl")
    ref = sd_models.make_sdxl_pipeline(d, lcm=True, vae_config=dict(
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 1.0, 2.0]))
    pipe = LCMPipeline.from_pretrained(d)
    assert pipe.is_lcm and pipe.is_sdxl
    lat, steps = _latents(1), 2
    g = torch.Generator().manual_seed(7)
    noises = np.stack([torch.randn(lat.shape, generator=g).numpy() for _ in range(steps - 1)])
    want = ref("a cat", num_inference_steps=steps, guidance_scale=8.0, height=16, width=16, output_type="np",
               latents=torch.from_numpy(lat), generator=torch.Generator().manual_seed(7)).images
    got = pipe("a cat", num_inference_steps=steps, guidance_scale=8.0, height=16, width=16, output_type="np",
               latents=lat, _noises=noises)
    print("lcm max abs diff", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)


def test_time_ids_and_bad_folders(sdxl_dir, tmp_path):
    np.testing.assert_array_equal(sdxl_time_ids(768, 1024, 2), [[768, 1024, 0, 0, 768, 1024]] * 2)
    np.testing.assert_array_equal(sdxl_time_ids(64, 64, 1, (128, 96), (4, 2)), [[128, 96, 4, 2, 64, 64]])
    src, _ = sdxl_dir
    no_tok = tmp_path / "no_tok"
    shutil.copytree(src, no_tok)
    shutil.rmtree(no_tok / "tokenizer_2")
    with pytest.raises(FileNotFoundError, match="missing tokenizer_2/"):
        LCMPipeline.from_pretrained(str(no_tok))
    no_te = tmp_path / "no_te"
    shutil.copytree(src, no_te)
    for c in ("text_encoder_2", "tokenizer_2"):
        shutil.rmtree(no_te / c)
    with pytest.raises(ValueError, match="addition_embed_type='text_time' but text_encoder_2 is missing"):
        LCMPipeline.from_pretrained(str(no_te))
