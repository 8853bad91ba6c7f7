"""LCD from an SD1.5-style epsilon teacher at 512^2 with the paper's settings.

python train.py --config=configs/lcd_512.py --workdir=runs/lcd_512 --config.pretrained=/path/to/sd15
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.pretrained = "stable-diffusion-v1-5"   # a local diffusers-layout folder
    c.num_steps = 100_000
    c.batch_size = 72
    c.learning_rate = 8e-6
    c.warmup_steps = 500
    c.dtype = "bfloat16"
    c.remat = "block"
    c.checkpoint_every = 1000
    c.log_every = 100
    c.sample_every = 2000
    c.sample_prompts = ("a photograph of an astronaut riding a horse",
                        "a red sports car on a mountain road, golden hour")
    c.data.source = "tar"
    c.data.path = "laion/{00000..00999}.tar"
    c.data.resolution = 512
    c.lcd.num_ddim_timesteps = 50
    c.lcd.omega_min, c.lcd.omega_max = 2.0, 14.0
    c.lcd.solver = "ddim"
    c.lcd.loss = "l2"
    c.lcd.ema_decay = 0.999943
    return c
