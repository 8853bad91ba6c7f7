"""Keys every training config has (ARCHITECTURE.md, "Conventions"); experiments override values."""
import ml_collections

from lcm_jax.lora import LCM_LORA_TARGETS


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.mode = "lcd"                  # lcd (distil from a teacher) | lcf (fine-tune an LCM) | ct (consistency
                                    # training from a diffusion model's weights; no teacher in the loss)
    c.pretrained = ""               # diffusers-layout pipeline folder: the teacher (lcd) or an LCM (lcf)
    c.tiny_teacher = False          # make a tiny random teacher at WORKDIR/teacher when pretrained == ""
    c.num_steps = 1000
    c.batch_size = 8                # global
    c.learning_rate = 1e-4
    c.warmup_steps = 0
    c.lr_schedule = "constant"      # constant (after warmup; diffusers' constant_with_warmup) | cosine
    c.adam_b1, c.adam_b2, c.adam_eps, c.weight_decay = 0.9, 0.999, 1e-8, 0.0
    c.grad_clip = 1.0               # global-norm clip; 0 disables
    c.grad_accum = 1                # micro-batches per optimizer step (optax.MultiSteps)
    c.seed = 0
    c.dtype = "float32"             # compute dtype: float32 | bfloat16 (master params stay float32)
    c.remat = "none"                # none | block | full | dots (lcm_jax/models/unet.py REMAT_MODES)
    c.time_cond_proj_dim = 256      # student's omega-embedding width
    c.cond_proj_init = "zeros"      # zeros (student starts as the teacher) | default (diffusers' Linear init)
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 50
    c.sample_every = 0              # 0: only at the end
    c.sample_prompts = ("a photo of a cat",)
    c.sample_steps = (1, 2, 4)
    c.sample_guidance = 8.0
    c.sample_scheduler = "lcm"      # the student's sampler (grids, in-loop eval): lcm | mlcd (multistep, S steps)
    c.export_params = "ema"         # what final/ holds: ema (theta^-) | online (the student); no EMA: online
    c.eval_every = 0                # in-loop evaluation every N steps (0: off); see lcm_jax/eval/inloop.py
    c.eval = ml_collections.ConfigDict()
    c.eval.steps = (1, 2, 4)        # LCM steps scored
    c.eval.guidance_scale = 8.0     # w of the scored samples
    c.eval.prompts = ()             # the fixed prompt set (empty: sample_prompts; digits: the ten captions)
    c.eval.images_per_prompt = 4
    c.eval.evaluator = "reference"  # reference (latent MSE to the teacher, CLIP score) | digits | a.module.path
    c.eval.scorer = ""              # digits: classifier file (empty: WORKDIR/scorer.safetensors, trained once)
    c.eval.clip_model = ""          # SD data: a transformers CLIP folder -> clip_score_{s} ("" = off)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"        # digits | folder | tar | tfds | cache (python -m lcm_jax.data.cache)
    #                                 | teacher (data-free: the teacher generates the latents, see below)
    c.data.path = ""                # source=teacher: the generated cache's folder ("" = WORKDIR/teacher_data)
    c.data.resolution = 32
    c.data.center_crop = True
    c.data.random_flip = False
    c.data.caption_dropout = 0.0    # probability of the empty prompt (the unconditional embedding)
    c.data.missing_caption = "empty"  # an image without a caption: empty (the empty prompt) | skip (counted)
    c.data.split = "train"          # digits: train | heldout | all; tfds: the split name
    c.data.tfds_name = ""           # source=tfds: the builder name (data.path: its data_dir)
    c.data.image_key = "image"      # tfds: the record's image feature ("a/b" for nested ones)
    c.data.caption_key = "caption"  # tfds: the caption feature; tar: the caption's extension in a sample
    c.data.num_threads = 16         # decode threads per process
    c.data.worker_count = 0         # decode processes (grain workers; 0: threads only)
    c.data.prefetch = 0             # examples buffered ahead (0: 2 x the local batch + num_threads)
    # data.source = "teacher" (lcm_jax/data/teacher_data.py): num_examples latents sampled once by the
    # teacher from noise (teacher_scheduler, teacher_steps, CFG w = teacher_guidance, teacher_batch at
    # a time, seed + batch index), example i from prompts[i % len(prompts)], cached, then trained on
    c.data.prompts = ml_collections.FieldReference((), field_type=object)  # tuple of str | text file, 1 a line
    c.data.num_examples = 1024
    c.data.teacher_scheduler = "dpm++"  # ddim | dpm | dpm++
    c.data.teacher_steps = 8
    c.data.teacher_guidance = 7.5
    c.data.teacher_batch = 32

    c.lcd = ml_collections.ConfigDict()
    c.lcd.num_ddim_timesteps = 50   # N; skipping step k = T // N
    c.lcd.omega_min = 2.0           # omega = w - 1, one value per example ~ U[omega_min, omega_max]
    c.lcd.omega_max = 14.0
    c.lcd.solver = "ddim"           # ddim | dpm | dpm++  (the ODE solver Psi)
    c.lcd.loss = "l2"               # l2 | huber
    c.lcd.huber_c = 0.001           # pseudo-Huber c; <= 0 uses iCT's 0.00054 * sqrt(d)
    c.lcd.ema_decay = 0.999943      # mu of the target theta^- (unused with LoRA: no EMA)
    c.lcd.target = "ema"            # ema (theta^- above) | online (the student, stop-gradient: MLCD, iCT)
    c.lcd.num_segments = 1          # multistep LCD: S segments, sampled with S steps of scheduler="mlcd"
    c.lcd.solver_steps = 1          # teacher sub-steps of Psi per interval (TLCM, with sparse timesteps)
    c.lcd.timestep_draw = "uniform" # uniform n | lognormal (iCT, over the intervals' EDM sigmas)
    c.lcd.lognormal_mean, c.lcd.lognormal_std = -1.1, 2.0

    # LCM-LoRA (configs/lcm_lora_sd15.py): rank > 0 trains only a LoRA on the teacher's UNet
    # (no omega embedding, target = the LoRA student itself); 0 = full LCD / LCF as above.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 0.0              # scale alpha / rank; 0 means alpha = rank (factor 1)
    c.lora.targets = LCM_LORA_TARGETS  # diffusers module names (PEFT target_modules; a str is a regex)
    return c
