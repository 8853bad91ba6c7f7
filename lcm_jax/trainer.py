"""train(config, workdir): LCD / LCF / LCM-LoRA, read top to bottom in sections (big_vision style).

mesh -> teacher & student -> data -> sharded init -> restore -> compiled step -> loop
(log, checkpoint, sample grids, pre-emption) -> export WORKDIR/final (diffusers layout).

LCM-LoRA (``config.lora.rank > 0``, mode lcd): the student is the teacher's own UNet plus a
LoRA (``config.lora``); the train state, its sharding and its checkpoints hold only the LoRA
(base weights: the frozen teacher). WORKDIR/final is the teacher's pipeline, UNet *unfused*
(the base, as a diffusers user expects beside a LoRA file), plus the LoRA as
``pytorch_lora_weights.safetensors``: ``StableDiffusionPipeline.from_pretrained(final)
.load_lora_weights(final)`` (diffusers) or ``LCMPipeline.load_lora_weights`` (ours), then
LCM sampling (an LCMScheduler / ``scheduler="lcm"``) at guidance 1-2.

SDXL teachers (text_encoder_2/, a "text_time" UNet) train the same way, full or LoRA: the
step also carries the pooled embedding and the size/crop ids of ``data.resolution``.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any

import jax
import numpy as np

from lcm_jax import atomic
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import distill, lora, lora_files, loop, sharding, train_state
from lcm_jax.data.input_pipeline import make_pipeline
from lcm_jax.data.sources import DIGIT_WORDS
from lcm_jax.data.resolve import resolve_data
from lcm_jax.data.teacher_data import check_teacher_data_config
from lcm_jax.errors import ConfigError, UserError
from lcm_jax.eval.inloop import evaluator_module, make_evaluator
from lcm_jax.images import save_grid
from lcm_jax.loop import NonFiniteError  # noqa: F401 -- raised from here; part of the trainer API
from lcm_jax.models.clip import tokenize
from lcm_jax.models.unet import REMAT_MODES, UNet2DConditionModel
from lcm_jax.models.embeddings import sdxl_time_ids
from lcm_jax.models.params import init_cond_proj, place, resolve_dtype
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.pipeline_folder import COMPONENTS, SDXL_COMPONENTS, check_pipeline_folder
from lcm_jax.sampling import CONSISTENCY_SCHEDULERS

PIPELINE_COMPONENTS = COMPONENTS + SDXL_COMPONENTS  # what the fingerprint covers (absent ones add nothing)
EXPORT = ("ema", "online")


def validate_config(config) -> distill.DistillSpec:
    """Every check that can fail on the config alone, before any model is loaded or compiled.
    What fails here is the config's fault: a ``ConfigError`` (a missing folder: FileNotFoundError)."""
    try:
        return _check_config(config)
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"the config has no key {e} (configs/common.py declares every key)") from e
    except (ValueError, TypeError) as e:
        if isinstance(e, UserError):
            raise
        raise ConfigError(str(e)) from e


def _check_config(config) -> distill.DistillSpec:
    spec = distill.DistillSpec.from_config(config)
    resolve_dtype(config.dtype)
    train_state.lr_schedule(config)  # raises on an unknown schedule
    for key in ("num_steps", "batch_size", "grad_accum", "keep_checkpoints"):
        if int(config[key]) < 1:
            raise ValueError(f"config.{key} must be >= 1, got {config[key]}")
    if config.learning_rate <= 0:
        raise ValueError(f"config.learning_rate must be > 0, got {config.learning_rate}")
    if config.remat not in REMAT_MODES:
        raise ValueError(f"config.remat {config.remat!r} is not supported: expected one of {REMAT_MODES}")
    if config.export_params not in EXPORT:
        raise ValueError(f"config.export_params {config.export_params!r}: expected one of {EXPORT}")
    if config.sample_scheduler not in CONSISTENCY_SCHEDULERS:
        raise ValueError(f"config.sample_scheduler {config.sample_scheduler!r}: expected one of {CONSISTENCY_SCHEDULERS}")
    if config.cond_proj_init not in ("zeros", "default"):
        raise ValueError(f"config.cond_proj_init {config.cond_proj_init!r}: expected zeros | default")
    if not config.pretrained and not (config.tiny_teacher and config.mode in ("lcd", "ct")):
        raise ValueError("config.pretrained is empty: set it to a diffusers-layout pipeline folder "
                         "(unet/ vae/ text_encoder/ tokenizer/ scheduler/), or tiny_teacher=True for lcd / ct")
    if config.pretrained:
        check_pipeline_folder(config.pretrained)
        if config.data.source == "cache" and os.path.isdir(os.path.join(config.pretrained, "text_encoder_2")):
            raise ValueError(f"data.source='cache' with the SDXL pipeline {config.pretrained!r}: a latent cache "
                             "holds no pooled text embeddings yet; train SDXL from images (folder | tar | tfds)")
    check_teacher_data_config(config)  # data.source="teacher": mode lcd, the prompts, the generation keys
    if spec.lora:
        targets = config.lora.targets
        if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
            raise ValueError(f"config.lora.targets {targets!r}: expected a regex string or a tuple of module "
                             f"names (diffusers', as PEFT's target_modules; default lora.LCM_LORA_TARGETS)")
    clip = config.eval.clip_model
    if clip and not os.path.isdir(clip):
        raise FileNotFoundError(f"config.eval.clip_model {clip!r} is not a folder: expected a transformers CLIPModel "
                                "folder (config.json, model.safetensors, tokenizer, preprocessor_config.json)")
    evaluator_module(config.eval.evaluator)  # raises on a name that is neither known nor a module path
    if clip and config.eval.evaluator == "digits":
        raise ValueError(f"config.eval.clip_model {clip!r} with eval.evaluator='digits': digits are scored by the "
                         "digit classifier (FD, accuracy); the CLIP score is the reference evaluator's")
    if not 0.0 <= config.lcd.ema_decay <= 1.0:
        raise ValueError(f"config.lcd.ema_decay must be in [0, 1], got {config.lcd.ema_decay}")
    return spec


def build_student(teacher_unet: UNet2DConditionModel, teacher_params: Any, config) -> tuple[UNet2DConditionModel, Any]:
    """The teacher's UNet plus a bias-free time_embedding.cond_proj (omega embedding).

    cond_proj is zero-initialised by default so the student starts exactly as the teacher.
    """
    cfg = dataclasses.replace(teacher_unet.config, time_cond_proj_dim=config.time_cond_proj_dim)
    student = UNet2DConditionModel(cfg, dtype=teacher_unet.dtype, remat=config.remat,
                                   zero_init_cond_proj=config.cond_proj_init == "zeros")
    params = jax.tree.map(np.asarray, teacher_params)
    params["time_embedding"] = dict(params["time_embedding"],
                                    cond_proj=init_cond_proj(cfg, config.cond_proj_init == "zeros", config.seed))
    return student, params


def train(config, workdir: str) -> str:
    """Run (or resume) training; returns the path of the exported ``WORKDIR/final`` pipeline.

    Raises ``errors.Interrupted`` on SIGINT / SIGTERM (the step reached is saved) and
    ``loop.NonFiniteError`` on a divergence (the newest good checkpoint kept)."""
    # ------------------------------------------------------------------ config and mesh
    spec = validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh)
    is_main = jax.process_index() == 0
    logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by data x fsdp = "
                         f"{mesh.shape['data'] * mesh.shape['fsdp']} devices")

    # before any work: a workdir already past num_steps is an error, not a mislabelled export
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                                 every=config.checkpoint_every)
    ckpt.check_within(config.num_steps)

    # ------------------------------------------------------------------ teacher and student
    pretrained = config.pretrained
    if not pretrained:
        pretrained = os.path.join(workdir, "teacher")
        if not os.path.isfile(os.path.join(pretrained, "model_index.json")):  # (written whole: lcm_jax.atomic)
            from lcm_jax.tiny import make_tiny_pipeline
            if is_main:
                make_tiny_pipeline(pretrained, DIGIT_WORDS, resolution=config.data.resolution, seed=config.seed)
        sharding.sync_processes("tiny_teacher")  # the others read what process 0 wrote
    # float32 masters, on the host: the step's frozen trees are placed over the training mesh below
    pipe = LCMPipeline.from_pretrained(pretrained, dtype=config.dtype, param_dtype="float32", on_device=False)
    # the checkpoints' record of which model they continue (a moved folder still matches)
    teacher_id = {"fingerprint": ckpt_lib.fingerprint(pretrained, PIPELINE_COMPONENTS),
                  "path": os.path.abspath(pretrained)}
    if spec.mode == "lcd":
        if pipe.is_lcm:
            raise ConfigError(f"{pretrained!r} is already an LCM (its UNet has time_cond_proj_dim); "
                             "LCD needs a plain diffusion teacher (use mode=lcf to fine-tune an LCM)")
        if spec.lora:  # the teacher's UNet, no omega embedding; trained: the LoRA alone
            student = pipe.unet.clone(remat=config.remat)
            params = jax.tree.map(np.asarray, lora.init_lora(
                pipe.unet_params, distill.lora_rank(config), _lora_targets(config),
                rng=jax.random.PRNGKey(config.seed)))
            logging.info("LCM-LoRA: rank %d, alpha %g, %d modules, %d params", distill.lora_rank(config),
                         spec.lora_alpha, len(lora.adapted(params)), lora.num_params(params))
        else:
            student, params = build_student(pipe.unet, pipe.unet_params, config)
        teacher = pipe.unet
    elif spec.mode == "ct":  # consistency training: a diffusion model's weights, no teacher in the loss
        if pipe.is_lcm:
            raise ConfigError(f"mode=ct starts from a plain diffusion model, but {pretrained!r} is already an LCM "
                             "(its UNet has time_cond_proj_dim): fine-tune it with mode=lcf")
        student, params = build_student(pipe.unet, pipe.unet_params, config)
        teacher = None
    else:
        if not pipe.is_lcm:
            raise ConfigError(f"mode=lcf fine-tunes an LCM, but {pretrained!r} has no time_cond_proj_dim "
                             "(distil it with mode=lcd first, or train it with mode=ct)")
        student = pipe.unet.clone(remat=config.remat)
        params, teacher = pipe.unet_params, None
    models = distill.Models(student, teacher, pipe.vae, pipe.text_encoder, pipe.schedule, pipe.text_encoder_2)

    # ------------------------------------------------------------------ data
    data_config = resolve_data(config, pipe, workdir, pretrained)  # data-free: the teacher's samples, cached
    cached = data_config["source"] == "cache"  # latents + prompt embeddings from lcm_jax.data.cache
    batcher = make_pipeline(data_config, functools.partial(_tokenize, pipe), config.batch_size,
                            config.seed, jax.process_index(), jax.process_count(),
                            caption_dropout=0.0)  # the train step drops captions (DistillSpec)

    # the in-loop evaluator loads (or trains) its scorer and fails on a bad one before any state or compile
    evaluate = make_evaluator(config, pipe, workdir) if config.eval_every else None

    # ------------------------------------------------------------------ sharded init
    # the frozen models in the compute dtype, cast once here rather than inside every call (only the
    # trained params stay float32); LCM-LoRA's base stays float32: the LoRA is merged into it in the step
    compute = functools.partial(place, dtype=resolve_dtype(config.dtype), device=False)
    frozen = _unconditional(pipe, config.data.resolution)
    if not cached:  # from a cache the step runs neither the VAE nor the text encoder
        frozen.update(vae=compute(pipe.vae_params), text=compute(pipe.text_params))
        if pipe.is_sdxl:
            frozen.update(text_2=compute(pipe.text_params_2))
    if teacher is not None:  # LCD's teacher; LCM-LoRA: the student's base weights
        frozen["teacher"] = pipe.unet_params if spec.lora else compute(pipe.unet_params)
    frozen = sharding.put(frozen, sharding.tree_shardings(frozen, mesh))
    tx = train_state.make_optimizer(config, config.lcd.ema_decay if spec.uses_ema else None)  # else: the online target
    state, state_sh = train_state.init_sharded(params, tx, config.seed, mesh)
    del params

    # ------------------------------------------------------------------ restore, compile, loop
    # the student UNet's params from the exported ones (LCM-LoRA: base + LoRA, merged once, jitted)
    full = jax.jit(functools.partial(lora.merge, alpha=spec.lora_alpha)) if spec.lora else None

    def after_step(step, state):
        if config.sample_every and step % config.sample_every == 0:
            params = _host_params(state, spec, config)  # every process takes part in the gather
            if is_main:
                params = params if full is None else jax.device_get(full(pipe.unet_params, params))
                _sample_grids(pipe, student, params, config, os.path.join(workdir, "samples", f"step_{step:07d}"))
        if evaluate is not None and step % config.eval_every == 0:  # (host params: every process joins the
            params = _host_params(state, spec, config)          # gather; a pipeline samples on its own devices)
            return evaluate(student, params if full is None else jax.device_get(full(pipe.unet_params, params)))
        return None

    try:
        state = loop.fit(functools.partial(distill.train_step, spec=spec, models=models, tx=tx), state, state_sh,
                         batcher, frozen, mesh=mesh, ckpt=ckpt, config_dict=ckpt_lib.config_record(config),
                         num_steps=config.num_steps, batch_size=config.batch_size, log_every=config.log_every,
                         desc=spec.mode, metrics_dir=workdir, lr_fn=train_state.lr_schedule(config),
                         after_step=after_step, teacher=teacher_id)
    finally:
        batcher.close()

    # ------------------------------------------------------------------ export
    final = os.path.join(workdir, "final")
    params = _host_params(state, spec, config)
    # final/ appears whole or not at all (a rerun after a crash exports again; digits trusts it)
    if is_main and spec.lora:  # the teacher's folder (base UNet, unfused) + the LoRA file
        with atomic.folder(final, overwrite=True) as tmp:
            pipe.save_pretrained(tmp)
            name = os.path.basename(lora_files.save_lora_weights(tmp, params, alpha=spec.lora_alpha))
        logging.info("LCM-LoRA weights: %s", os.path.join(final, name))
        merged = jax.device_get(full(pipe.unet_params, params))
        _sample_grids(pipe, pipe.unet, merged, config, os.path.join(workdir, "samples", "final"))
    elif is_main:
        out = pipe.with_unet(student, params, guidance_range=(1 + config.lcd.omega_min, 1 + config.lcd.omega_max))
        # (the w range its omega embedding was trained on: final/training.json, read back by sampling)
        with atomic.folder(final, overwrite=True) as tmp:
            out.save_pretrained(tmp)
        _sample_grids(out, out.unet, out.unet_params, config, os.path.join(workdir, "samples", "final"))
    sharding.sync_processes("exported")  # no process returns before final/ is complete
    return final


def _tokenize(pipe: LCMPipeline, captions: list[str]):
    """Token ids [B, L] for the text encoder; SDXL: {"input_ids", "input_ids_2"} for both."""
    if not pipe.is_sdxl:  # training captions are cut to the encoder's length as diffusers' scripts do, unlogged
        return tokenize(pipe.tokenizer, captions, warn_truncated=False)
    return {"input_ids": tokenize(pipe.tokenizer, captions, warn_truncated=False),
            "input_ids_2": tokenize(pipe.tokenizer_2, captions, warn_truncated=False)}


def _unconditional(pipe: LCMPipeline, resolution: int) -> dict:
    """The frozen conditioning of dropped captions and CFG's negative branch ("uncond" [1, L, D],
    ``LCMPipeline.negative_prompt_embeds``); SDXL: also its pooled embedding and the size/crop ids
    of the output."""
    cond, pooled = (None if x is None else np.asarray(x) for x in pipe.negative_prompt_embeds())
    if not pipe.is_sdxl:
        return {"uncond": cond}
    return {"uncond": cond, "uncond_pooled": pooled, "time_ids": sdxl_time_ids(resolution, resolution, 1)}


def _lora_targets(config) -> lora.Targets:
    targets = config.lora.targets
    return targets if isinstance(targets, str) else tuple(targets)


def _export_params(state: train_state.TrainState, spec: distill.DistillSpec, config) -> Any:
    """theta^- (the EMA target; default ``config.export_params``) or the online student params;
    without an EMA (``spec.uses_ema`` false: LCM-LoRA, lcd.target='online') the online params."""
    from lcm_jax.ema import ema_params
    if spec.uses_ema and config.export_params == "ema":
        return ema_params(state.opt_state)
    return state.params


def _host_params(state: train_state.TrainState, spec: distill.DistillSpec, config) -> Any:
    """The export params as host numpy arrays. With several processes the params span devices
    that process 0 cannot read, so every process joins an all-gather (call it on all of them)."""
    params = _export_params(state, spec, config)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return multihost_utils.process_allgather(params, tiled=True)
    return jax.device_get(params)


def _sample_grids(pipe: LCMPipeline, unet: UNet2DConditionModel, params: Any, config, prefix: str) -> None:
    """PNG grids of the fixed prompts at each of config.sample_steps LCM steps."""
    lcm = pipe.with_unet(unet, params)  # the samplers compile once per run, not at every sample_every
    prompts = list(config.sample_prompts)
    for steps in config.sample_steps:
        images = lcm(prompts, num_inference_steps=int(steps), guidance_scale=config.sample_guidance,
                     scheduler=config.sample_scheduler, seed=config.seed, num_images_per_prompt=4)
        save_grid(images, len(prompts), f"{prefix}_lcm{steps}.png")
