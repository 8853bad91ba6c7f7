"""The main job: the LCM paper's Table 1, reproduced offline on scikit-learn's digits.

python train.py --config=configs/digits.py --workdir=runs/digits
python train.py --config=configs/digits.py:smoke --workdir=/tmp/digits_smoke   # a minute or two

Stages (lcm_jax/digits.py), each resumable and skipped when its output exists:
teacher (autoencoder -> frozen random CLIP -> epsilon UNet; WORKDIR/teacher) -> LCD
(WORKDIR/final) -> ablations over the solver Psi and the skipping step k (WORKDIR/ablations)
-> evaluation (WORKDIR/results.md, results.json, grids/, fd_vs_steps.png).
"""
import ml_collections

from configs.common import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.reproduce = "digits"
    c.mode = "lcd"
    c.pretrained = ""                  # set by the reproduction to WORKDIR/teacher

    # ---------------------------------------------------------------- data: 16x16 RGB digits
    c.data.source = "digits"
    c.data.resolution = 16
    c.data.caption_dropout = 0.0

    # ---------------------------------------------------------------- teacher (stage 1)
    t = c.teacher = ml_collections.ConfigDict()
    t.max_length = 8                   # bos + "a handwritten digit seven" + eos = 6 tokens
    t.vae_model = dict(block_out_channels=(16, 32, 32), layers_per_block=1, latent_channels=4,
                       norm_num_groups=8)                       # 16x16x3 -> 4x4x4
    t.text_model = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4)                  # frozen random (see lcm_jax/teacher.py)
    t.unet_model = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                        attention_head_dim=8,                   # 4x4 (cross-attention) -> 2x2 (+ mid)
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    # SD's DDPM schedule; "trailing" so a 1-step teacher sampler starts at t = 999 (a fair baseline).
    t.scheduler = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085,
                       beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                       steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                       timestep_spacing="trailing")
    t.vae = dict(num_steps=700, batch_size=32, learning_rate=2e-3, warmup_steps=50, kl_weight=1e-4,
                 ema_decay=0.99)
    t.unet = dict(num_steps=1400, batch_size=64, learning_rate=2e-3, warmup_steps=100, ema_decay=0.999,
                  caption_dropout=0.1)

    # ---------------------------------------------------------------- LCD (stage 2; the paper's Algorithm 1)
    c.num_steps = 500                  # the in-loop FD/accuracy move little after ~500 (measured)
    c.batch_size = 32
    c.learning_rate = 3e-4
    c.warmup_steps = 100
    c.checkpoint_every = 250
    c.log_every = 50
    c.lcd.num_ddim_timesteps = 50      # k = 20
    c.lcd.omega_min, c.lcd.omega_max = 2.0, 14.0
    c.lcd.solver = "ddim"
    c.lcd.loss = "l2"
    c.lcd.ema_decay = 0.95             # diffusers' script; the paper's 0.999943 is for 100k steps
    c.sample_prompts = tuple(f"a handwritten digit {d}" for d in ("zero", "three", "seven", "nine"))
    c.sample_steps = ()                # the evaluation writes a grid per method and step count
    c.sample_guidance = 9.0            # omega = 8, as in Table 1
    c.eval_every = 250
    c.eval.steps = (1, 2, 4)
    c.eval.guidance_scale = 9.0
    c.eval.images_per_prompt = 20      # x 10 classes; = table.per_class, so the samplers compile once

    # ---------------------------------------------------------------- ablations (stage 3, reduced budget)
    a = c.ablation = ml_collections.ConfigDict()
    a.num_steps = 150
    a.solvers = ("ddim", "dpm", "dpm++")        # at k = 20
    a.skipping_steps = (1, 5, 20)               # k, with the DDIM solver
    a.sample_steps = (1, 2, 4)          # scored in the table (one seed)

    # ---------------------------------------------------------------- evaluation (stage 4)
    e = c.table = ml_collections.ConfigDict()
    e.per_class = 20                   # images per class and method (x 10 classes)
    e.seeds = (0, 1, 2)                # sampling seeds: mean and spread
    e.steps = (1, 2, 4, 8)
    e.guidance_scale = 9.0             # omega = 8 (Table 1), for the teacher's CFG and the LCM
    e.reference_steps = 50             # the teacher's DDIM-50 reference ...
    e.reference_guidances = (1.0, 3.0, 5.0, 9.0)  # ... at these w (all seeds at the table's w, else the first)
    e.classifier_steps = 0             # 0: the scorer's default

    if arg == "smoke":                 # every stage end to end in a minute or two (the test)
        t.vae_model = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4,
                           norm_num_groups=4)
        t.text_model = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
        t.unet_model.update(block_out_channels=(16, 32), norm_num_groups=4)
        t.vae.update(num_steps=30, batch_size=32, warmup_steps=5)
        t.unet.update(num_steps=30, batch_size=32, warmup_steps=5)
        c.num_steps, c.batch_size, c.warmup_steps = 20, 16, 0
        c.checkpoint_every, c.log_every, c.eval_every = 10, 10, 20
        c.eval.steps, c.eval.images_per_prompt = (1,), 2
        c.sample_steps = (1,)
        a.num_steps, a.solvers, a.skipping_steps, a.sample_steps = 10, ("dpm++",), (), (1,)
        e.per_class, e.seeds, e.steps = 4, (0, 1), (1, 2)
        e.reference_steps, e.reference_guidances = 2, (9.0,)
        e.classifier_steps = 50
    elif arg:
        raise ValueError(f"configs/digits.py takes '' or 'smoke', got {arg!r}")
    return c
