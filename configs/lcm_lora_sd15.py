"""LCM-LoRA: distil SD1.5 into a rank-64 LoRA on its own UNet (4-step sampling with the LoRA).

python train.py --config=configs/lcm_lora_sd15.py --workdir=runs/lcm_lora_sd15 --config.pretrained=/path/to/sd15

Only the LoRA is trained, checkpointed and sharded; the target is the LoRA student itself under
stop-gradient (no EMA) and the student has no omega embedding (LCM-LoRA report; diffusers'
examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py). WORKDIR/final = the
teacher's pipeline + pytorch_lora_weights.safetensors; sample with the LoRA loaded,
scheduler="lcm" (diffusers: LCMScheduler) and guidance 1-2.
Settings: diffusers' script defaults and its README command (lora_rank 64, lora_alpha 64,
learning_rate 1e-4, constant lr, adam_weight_decay 0.0, huber loss c = 0.001,
num_ddim_timesteps 50, DDIM solver, max_grad_norm 1, train_batch_size 12 per GPU).
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.pretrained = "stable-diffusion-v1-5"   # a local diffusers-layout folder
    c.mode = "lcd"
    c.lora.rank = 64
    c.lora.alpha = 64.0                      # = rank: scale 1 (the script's --lora_alpha default)
    c.num_steps = 1000                       # the script's README command: --max_train_steps=1000
    c.batch_size = 96                        # 12 per GPU x 8 GPUs
    c.learning_rate = 1e-4
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.grad_clip = 1.0
    c.dtype = "bfloat16"
    c.remat = "block"
    c.checkpoint_every = 200
    c.log_every = 50
    c.sample_every = 200
    c.sample_prompts = ("a photograph of an astronaut riding a horse",
                        "a red sports car on a mountain road, golden hour")
    c.sample_steps = (1, 2, 4)
    c.sample_guidance = 1.0                  # LCM-LoRA samples without CFG (diffusers: 1.0-2.0)
    c.eval.guidance_scale = 1.0
    c.data.source = "tar"
    c.data.path = "laion/{00000..00999}.tar"
    c.data.resolution = 512
    c.lcd.num_ddim_timesteps = 50
    # The fixed guidance of LCM-LoRA distillation (the report's omega = 7.5, as issue 9 reads
    # it). diffusers' script draws omega ~ U[w_min, w_max] = U[5, 15] per example (its w
    # multiplies cond - uncond, i.e. our omega): --config.lcd.omega_min=5 --config.lcd.omega_max=15
    c.lcd.omega_min, c.lcd.omega_max = 7.5, 7.5
    c.lcd.solver = "ddim"
    c.lcd.loss = "huber"
    c.lcd.huber_c = 0.001
    return c
