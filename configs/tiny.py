"""LCD from a tiny random teacher made on the fly, on the digits: tests and CPU smoke runs.

python train.py --config=configs/tiny.py --workdir=runs/tiny
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.tiny_teacher = True
    c.num_steps = 200
    c.batch_size = 8
    c.learning_rate = 1e-3
    c.checkpoint_every = 100
    c.log_every = 20
    c.sample_prompts = ("a handwritten digit seven", "a handwritten digit zero")
    c.sample_steps = (1, 2)
    c.data.source = "digits"
    c.data.resolution = 16
    c.lcd.num_ddim_timesteps = 50
    c.lcd.omega_min, c.lcd.omega_max = 2.0, 6.0
    c.lcd.ema_decay = 0.95
    return c
