"""Tiny random diffusers/transformers (PyTorch) Stable Diffusion pipelines, saved to disk.

The reference side of every parity test: diffusers builds and runs them, we load the
saved folder and must reproduce diffusers' numbers.
"""
import os

import torch

from lcm_jax.tokenizer import build_word_tokenizer

WORDS = ["a", "photo", "of", "cat", "dog", "handwritten", "digit", "seven"]


def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add noise to every parameter so zero-inits (norm biases, cond_proj) hide no bugs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def unet_kwargs(sd2: bool = False, time_cond_proj_dim=None, cross_attention_dim: int = 32) -> dict:
    kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
              block_out_channels=(32, 64), norm_num_groups=8,
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
              cross_attention_dim=cross_attention_dim, attention_head_dim=8,
              time_cond_proj_dim=time_cond_proj_dim)
    if sd2:
        kw.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    return kw


def make_unet(seed: int = 0, **kw):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_kwargs(**kw)).eval()
    perturb_(unet, seed=seed)
    return unet


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16).eval()
    perturb_(vae, seed=seed)
    return vae


def make_text_encoder(seed: int = 0, vocab_size: int = 600):
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1)
    te = CLIPTextModel(cfg).eval()
    perturb_(te, seed=seed)
    return te


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type=prediction_type, steps_offset=1, set_alpha_to_one=False,
                clip_sample=False, timestep_spacing="leading")


def make_sd_pipeline(folder: str, *, lcm: bool = False, prediction_type: str = "epsilon",
                     sd2: bool = False, seed: int = 0):
    """A tiny random StableDiffusionPipeline (or LatentConsistencyModelPipeline) saved at ``folder``."""
    from diffusers import (DDIMScheduler, LatentConsistencyModelPipeline, LCMScheduler,
                           StableDiffusionPipeline)
    from transformers import CLIPTokenizer
    build_word_tokenizer(os.path.join(folder, "_tok"), WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    parts = dict(unet=make_unet(seed, sd2=sd2, time_cond_proj_dim=256 if lcm else None),
                 vae=make_vae(seed + 1), text_encoder=make_text_encoder(seed + 2, len(tokenizer)),
                 tokenizer=tokenizer, safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    if lcm:
        pipe = LatentConsistencyModelPipeline(scheduler=LCMScheduler(**scheduler_config(prediction_type)), **parts)
    else:
        pipe = StableDiffusionPipeline(scheduler=DDIMScheduler(**scheduler_config(prediction_type)), **parts)
    pipe.save_pretrained(folder)
    import shutil
    shutil.rmtree(os.path.join(folder, "_tok"))
    return pipe


# ----------------------------------------------------------------------------- SDXL

SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim; 6 time ids
SDXL_PROJECTION_DIM = 32  # text_encoder_2's projection_dim (the pooled text_embeds width)


def make_sdxl_unet(seed: int = 0, time_cond_proj_dim=None):
    """A tiny SDXL-shaped UNet (text_time conditioning, linear projections, deeper 2nd level)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        time_cond_proj_dim=time_cond_proj_dim).eval()
    perturb_(unet, seed=seed)
    return unet


def make_text_encoder_2(tokenizer, seed: int = 0):
    """SDXL's second encoder: CLIPTextModelWithProjection (EOS pooled by id, not argmax)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="gelu",
                         projection_dim=SDXL_PROJECTION_DIM, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    te = CLIPTextModelWithProjection(cfg).eval()
    perturb_(te, seed=seed)
    return te


def make_sdxl_pipeline(folder: str, *, lcm: bool = False, seed: int = 0, vae_config: dict = None):
    """A tiny random StableDiffusionXLPipeline saved at ``folder``: DDIM ("trailing") or, with
    ``lcm``, an LCM UNet (time_cond_proj_dim=256) with an LCMScheduler. tokenizer_2 pads with
    "!" as SDXL's does; ``vae_config`` overrides the VAE's config (e.g. latents_mean/std)."""
    import shutil

    from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    build_word_tokenizer(os.path.join(folder, "_tok"), WORDS, model_max_length=16)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"), pad_token="!")
    vae = make_vae(seed + 1)
    vae.register_to_config(scaling_factor=0.13025, **(vae_config or {}))  # SDXL's VAE scale
    sched = scheduler_config() if lcm else dict(scheduler_config(), timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=make_text_encoder(seed + 2, len(tokenizer)),
        text_encoder_2=make_text_encoder_2(tokenizer_2, seed + 3), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=make_sdxl_unet(seed, time_cond_proj_dim=256 if lcm else None),
        scheduler=LCMScheduler(**sched) if lcm else DDIMScheduler(**sched), add_watermarker=False)
    pipe.save_pretrained(folder)
    shutil.rmtree(os.path.join(folder, "_tok"))
    return pipe
