"""The diffusers (PyTorch) side of benchmarks/device.py, run in its own process.

    python -m benchmarks.device_torch --folder=DIR --make [--tiny]   # a random SD1.5-shaped LCM folder
    python -m benchmarks.device_torch --folder=DIR --time --batch=1,8  # LCM-4 at 512^2, bf16, SDPA: JSON lines

The folder is diffusers' own layout (LatentConsistencyModelPipeline.save_pretrained), so both sides
load the same weights; the tokenizer is lcm_jax's word-level CLIP tokenizer (nothing is downloaded).
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

_FOLDER = flags.DEFINE_string("folder", None, "pipeline folder")
_MAKE = flags.DEFINE_bool("make", False, "write a random SD1.5-shaped LCM pipeline to --folder")
_TIME = flags.DEFINE_bool("time", False, "time LCM-4 from --folder and print one JSON line")
_BATCH = flags.DEFINE_list("batch", ["1"], "images per call (a comma list: one JSON line each)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed calls (after one warm-up)")
_TINY = flags.DEFINE_bool("tiny", False, "tiny models at 64^2 (a CPU check of this script)")

WORDS = ("a", "photo", "of", "cat", "dog", "astronaut", "riding", "horse")
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), norm_num_groups=32, cross_attention_dim=768,
                 attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, time_cond_proj_dim=256)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
TINY_UNET = dict(SD15_UNET, sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VAE = dict(SD15_VAE, block_out_channels=(16, 32, 32), norm_num_groups=8, sample_size=64,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3)
TINY_TEXT = dict(SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 projection_dim=32)
LCM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", original_inference_steps=50, timestep_scaling=10.0,
                     set_alpha_to_one=True, steps_offset=1, clip_sample=False)


def make(folder: str, tiny: bool) -> None:
    import torch
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from lcm_jax.tokenizer import build_word_tokenizer
    torch.manual_seed(0)
    length = 16 if tiny else 77
    build_word_tokenizer(os.path.join(folder, "_tok"), WORDS, model_max_length=length)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    text = dict(TINY_TEXT if tiny else SD15_TEXT, vocab_size=len(tokenizer), max_position_embeddings=length,
                bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    pipe = LatentConsistencyModelPipeline(
        unet=UNet2DConditionModel(**(TINY_UNET if tiny else SD15_UNET)), vae=AutoencoderKL(**(TINY_VAE if tiny else SD15_VAE)),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)), tokenizer=tokenizer,
        scheduler=LCMScheduler(**LCM_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(folder)
    import shutil
    shutil.rmtree(os.path.join(folder, "_tok"))


def load(folder: str):
    import torch
    from diffusers import LatentConsistencyModelPipeline
    cuda = torch.cuda.is_available()
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16 if cuda else torch.float32,
                                                          safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if cuda else "cpu")


def time_lcm(pipe, batch: int, repeats: int, tiny: bool) -> dict:
    import torch
    cuda, dtype = torch.cuda.is_available(), pipe.unet.dtype
    size = 64 if tiny else 512
    call = lambda: pipe(["a photo of a cat"] * batch, num_inference_steps=4, guidance_scale=8.0,  # noqa: E731
                        height=size, width=size, output_type="np")
    call()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"batch": batch, "ms_per_call": 1e3 * times[len(times) // 2], "dtype": str(dtype),
            "attention": "SDPA (torch 2 default)", "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main(argv) -> None:
    del argv
    if _MAKE.value:
        make(_FOLDER.value, _TINY.value)
    if _TIME.value:
        pipe = load(_FOLDER.value)
        for b in _BATCH.value:
            print(json.dumps(time_lcm(pipe, int(b), _REPEATS.value, _TINY.value)), flush=True)


if __name__ == "__main__":
    flags.mark_flag_as_required("folder")
    app.run(main)
