"""LCD from an SD2.1-style v-prediction teacher at 768^2 (paper settings, global batch 16).

python train.py --config=configs/lcd_768.py --workdir=runs/lcd_768 --config.pretrained=/path/to/sd21
"""
from configs import lcd_512


def get_config():
    c = lcd_512.get_config()
    c.pretrained = "stable-diffusion-2-1"
    c.batch_size = 16
    c.data.resolution = 768
    return c
