"""SDXL through the real trainer (issue 9, item 4): LCD and LCM-LoRA distil a tiny random SDXL
teacher (diffusers' StableDiffusionXLPipeline, tests/sd_models.py), and what they export runs in
diffusers' SDXL pipeline as it runs in ours."""
import os
import sys

import jax
import numpy as np
import pytest
import torch

import sd_models

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import distill, lora, trainer  # noqa: E402
from lcm_jax.pipeline import LCMPipeline  # noqa: E402
from training import small_config  # noqa: E402

PROMPT = "a photo of a cat"
MESH = {}  # one device: sharding is tested on the SD path (test_train, test_lora_distill)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("sdxl_teacher"))
    sd_models.make_sdxl_pipeline(d)
    return d


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)


def test_training_encodes_prompts_as_the_pipeline_does(sdxl_teacher):
    """The step's conditioning (both encoders' penultimate states, the pooled projection, the
    size ids of data.resolution) is what LCMPipeline samples with; the unconditional one is
    zeros (force_zeros_for_empty_prompt, as diffusers' SDXL LCM script)."""
    pipe = LCMPipeline.from_pretrained(sdxl_teacher)
    models = distill.Models(pipe.unet, pipe.unet, pipe.vae, pipe.text_encoder, pipe.schedule, pipe.text_encoder_2)
    frozen = {"text": pipe.text_params, "text_2": pipe.text_params_2, **trainer._unconditional(pipe, 16)}
    batch = trainer._tokenize(pipe, [PROMPT, "a dog"])
    cond, added = jax.jit(lambda f, b: distill.encode_text(models, f, b))(frozen, batch)
    want, pooled = pipe.encode_prompt([PROMPT, "a dog"], return_pooled=True)
    np.testing.assert_allclose(cond, want, atol=1e-6)
    np.testing.assert_allclose(added["text_embeds"], pooled, atol=1e-6)
    np.testing.assert_array_equal(added["time_ids"], [[16, 16, 0, 0, 16, 16]] * 2)
    assert not np.any(frozen["uncond"]) and not np.any(frozen["uncond_pooled"])


@pytest.mark.slow
def test_sdxl_lcd_exports_an_lcm_that_diffusers_runs(sdxl_teacher, tmp_path):
    """3 LCD steps; final/ is an SDXL LCM (time_cond_proj_dim) that
    StableDiffusionXLPipeline with an LCMScheduler runs to the same 1-step image as ours."""
    from diffusers import StableDiffusionXLPipeline
    final = trainer.train(small_config(sdxl_teacher, **MESH), str(tmp_path))
    ours = LCMPipeline.from_pretrained(final)
    assert ours.is_sdxl and ours.is_lcm
    teacher = LCMPipeline.from_pretrained(sdxl_teacher)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(ours.unet_params["down_blocks_1"]),
                                                   jax.tree.leaves(teacher.unet_params["down_blocks_1"]))]
    assert max(moved) > 0  # trained (the export is the EMA target, mu = config.lcd.ema_decay)
    ref = StableDiffusionXLPipeline.from_pretrained(final)
    assert type(ref.scheduler).__name__ == "LCMScheduler"
    lat = _latents()
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=1, guidance_scale=6.0, height=16, width=16, output_type="np",
                   latents=torch.from_numpy(lat)).images
    got = ours(PROMPT, num_inference_steps=1, guidance_scale=6.0, height=16, width=16, latents=lat, output_type="np")
    err = np.abs(got - want).max()
    print(f"SDXL LCM exported by LCD: ours vs diffusers, 1 step, max abs diff {err:.2e}")
    assert err <= 2e-3


@pytest.mark.slow
def test_sdxl_lcm_lora_exports_a_lora_diffusers_loads(sdxl_teacher, tmp_path):
    """3 LCM-LoRA steps: only the LoRA is trained; StableDiffusionXLPipeline.load_lora_weights(final)
    gives our merged student's UNet output (with the text_time conditioning)."""
    from diffusers import StableDiffusionXLPipeline
    cfg = small_config(sdxl_teacher, learning_rate=1e-3, **{"lora.rank": 4, "lora.alpha": 8.0, **MESH})
    final = trainer.train(cfg, str(tmp_path))
    from training import read_state
    trained = read_state(str(tmp_path))[0]["params"]
    base = LCMPipeline.from_pretrained(sdxl_teacher)
    merged = lora.merge(base.unet_params, trained, alpha=8.0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    t = np.array([499], np.int64)
    c, pooled = (np.asarray(v) for v in base.encode_prompt([PROMPT], return_pooled=True))
    ids = np.array([[16, 16, 0, 0, 16, 16]], np.float32)
    run = jax.jit(lambda p: base.unet.apply({"params": p}, x, t.astype(np.int32), c, None,
                                            {"text_embeds": pooled, "time_ids": ids}))
    want = np.asarray(run(merged))
    assert np.abs(want - np.asarray(run(base.unet_params))).max() > 1e-4  # the LoRA matters
    ref = StableDiffusionXLPipeline.from_pretrained(final)
    ref.load_lora_weights(final)
    with torch.no_grad():
        got = ref.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c.copy()),
                       added_cond_kwargs={"text_embeds": torch.from_numpy(pooled.copy()),
                                          "time_ids": torch.from_numpy(ids)}).sample.numpy()
    err = np.abs(got - want).max()
    print(f"SDXL LCM-LoRA in diffusers vs our merged student: max abs diff {err:.2e}")
    assert err <= 1e-4


def test_sdxl_from_a_cache_is_refused_before_any_work(sdxl_teacher, tmp_path):
    cfg = small_config(sdxl_teacher, **{"data.source": "cache", "data.path": str(tmp_path / "cache")})
    with pytest.raises(ValueError, match="SDXL from images"):
        trainer.train(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
