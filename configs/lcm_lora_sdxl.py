"""LCM-LoRA for SDXL (rank 64 at 1024^2): the step carries SDXL's pooled text embedding and
size/crop ids (the output size, no crop), its negative conditioning zeros as diffusers' SDXL LCM
script. Train from images: a latent cache holds no pooled embeddings yet.

python train.py --config=configs/lcm_lora_sdxl.py --workdir=runs/lcm_lora_sdxl --config.pretrained=/path/to/sdxl

Settings as configs/lcm_lora_sd15.py, at diffusers' SDXL LoRA example command
(train_lcm_distill_lora_sdxl_wds.py README: resolution 1024, lora_rank 64, learning_rate 1e-4,
huber loss, adam_weight_decay 0.0, train_batch_size 12 per GPU).
"""
from configs import lcm_lora_sd15


def get_config():
    c = lcm_lora_sd15.get_config()
    c.pretrained = "stable-diffusion-xl-base-1.0"
    c.data.resolution = 1024
    c.sample_prompts = ("a photograph of an astronaut riding a horse",)
    return c
