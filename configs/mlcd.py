"""Multistep LCD (MLCD; Multistep / Phased Consistency Models, TLCM) from an SD1.5-style teacher:
the 50-step skipping schedule cut into S = 4 segments, each consistency map to its segment's
lower boundary, sampled with 4 steps of scheduler="mlcd". No EMA: the target is the online
student under stop-gradient. ``:datafree`` trains on the teacher's own samples (TLCM's
data-free stage) from a prompt file, with a 2-sub-step teacher solver between sparse timesteps.

python train.py --config=configs/mlcd.py --workdir=runs/mlcd --config.pretrained=/path/to/sd15
python train.py --config=configs/mlcd.py:datafree --workdir=runs/mlcd_df \
    --config.pretrained=/path/to/sd15 --config.data.prompts=prompts.txt
python sample.py --pretrained=runs/mlcd/final --scheduler=mlcd --steps=4 --guidance=8 --prompt="..."
"""
from configs import lcd_512


def get_config(arg: str = ""):
    c = lcd_512.get_config()
    c.lcd.num_segments = 4
    c.lcd.target = "online"
    c.sample_scheduler = "mlcd"
    c.sample_steps = (4,)              # = num_segments: one step per segment
    c.eval.steps = (4,)
    if arg == "datafree":
        c.data.source = "teacher"
        c.data.path = ""               # WORKDIR/teacher_data
        c.data.prompts = "prompts.txt"  # one prompt per line
        c.data.num_examples = 100_000
        c.data.teacher_scheduler, c.data.teacher_steps, c.data.teacher_guidance = "dpm++", 25, 7.5
        c.lcd.num_ddim_timesteps = 25  # sparse timesteps (k = 40) ...
        c.lcd.solver_steps = 2         # ... with two teacher DDIM sub-steps (k = 20 each) between them
    elif arg:
        raise ValueError(f"configs/mlcd.py takes '' or 'datafree', got {arg!r}")
    return c
