"""LCF: consistency fine-tuning of an LCM on a folder of the user's own images (no teacher).

python train.py --config=configs/lcf.py --workdir=runs/lcf --config.pretrained=runs/lcd_512/final \
    --config.data.path=/path/to/images
"""
from configs.common import base_config


def get_config():
    c = base_config()
    c.mode = "lcf"
    c.pretrained = ""                # an LCM pipeline folder (e.g. WORKDIR/final of an LCD run)
    c.num_steps = 2000
    c.batch_size = 8
    c.learning_rate = 5e-6
    c.dtype = "bfloat16"
    c.checkpoint_every = 500
    c.data.source = "folder"
    c.data.path = ""
    c.data.resolution = 512
    c.data.random_flip = True
    c.data.caption_dropout = 0.1
    c.lcd.ema_decay = 0.999
    return c
