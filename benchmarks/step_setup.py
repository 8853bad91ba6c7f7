"""The set-up benchmarks/train_step.py times: model sizes (tiny, SD1.5-shaped), the step as the trainer
builds it, compiled by the library's loop.compile_step (shapes only for the SD size), FLOPs and memory."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from configs import lcd_512 as lcd_512_config
from configs import tiny as tiny_config
from lcm_jax import distill, loop, sharding, train_state, trainer
from lcm_jax.models.params import resolve_dtype
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL
from lcm_jax.schedules import NoiseSchedule
from lcm_jax.tiny import SD_SCHEDULER, random_params, tiny_configs

SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
               block_out_channels=[320, 640, 1280, 1280], norm_num_groups=32, cross_attention_dim=768,
               attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
               up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
# diffusers' stable-diffusion-xl-base-1.0 unet/config.json (the fields that shape the params)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=[320, 640, 1280], norm_num_groups=32, cross_attention_dim=2048,
                 attention_head_dim=[5, 10, 20], transformer_layers_per_block=[1, 2, 10],
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])
TEXT_LEN = {"tiny": 16, "sd": 77}
# The LCM-LoRA report (Luo et al. 2023, Table 1) at rank 64.
LCM_LORA_REPORT_PARAMS = {"SD1.5": 67.5e6, "SDXL": 197e6}


# --------------------------------------------------------------------------- set-up

@dataclasses.dataclass
class Setup:
    """One model size: config, models, spec, optimizer, student params (numpy or abstract),
    frozen tree (teacher + uncond) and a host batch of cached latents / prompt embeddings."""

    config: Any
    models: distill.Models
    spec: distill.DistillSpec
    tx: Any
    params: Any
    frozen: dict
    batch: dict


def make_setup(size: str, dtype: str = "float32", remat: str = "none", batch_size: int = 0,
               abstract: bool = False) -> Setup:
    config = tiny_config.get_config() if size == "tiny" else lcd_512_config.get_config()
    config.dtype, config.remat = dtype, remat
    if batch_size:
        config.batch_size = batch_size
    if size == "tiny":
        unet_cfg, vae_cfg, _ = tiny_configs(config.data.resolution)
    else:
        unet_cfg, vae_cfg = UNetConfig.from_diffusers_config(SD_UNET), tiny_configs()[1]  # VAE: scaling only
    teacher = UNet2DConditionModel(unet_cfg, dtype=resolve_dtype(dtype))
    h = unet_cfg.sample_size
    length, width = TEXT_LEN[size], unet_cfg.cross_attention_dim
    args = (jnp.zeros((1, 4, h, h)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, length, width)))
    if abstract:  # shapes only: no weights are drawn (the SD UNet's 860M would take minutes)
        t_params = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), *args))["params"]
        scfg = dataclasses.replace(unet_cfg, time_cond_proj_dim=config.time_cond_proj_dim)
        student = UNet2DConditionModel(scfg, dtype=teacher.dtype, remat=remat, zero_init_cond_proj=True)
        s_params = jax.eval_shape(lambda: student.init(jax.random.PRNGKey(0), *args,
                                                       jnp.zeros((1, config.time_cond_proj_dim))))["params"]
    else:
        t_params = random_params(teacher, 0, *args)
        student, s_params = trainer.build_student(teacher, t_params, config)
    schedule = NoiseSchedule.from_scheduler_config(SD_SCHEDULER)
    models = distill.Models(student, teacher, AutoencoderKL(vae_cfg), None, schedule)
    rng = np.random.default_rng(0)
    b = config.batch_size
    batch = {"latent_mean": rng.standard_normal((b, 4, h, h)).astype(np.float32),
             "latent_logvar": np.full((b, 4, h, h), -4.0, np.float32),
             "prompt_embeds": rng.standard_normal((b, length, width)).astype(np.float32)}
    frozen = {"teacher": t_params, "uncond": rng.standard_normal((1, length, width)).astype(np.float32)}
    spec = distill.DistillSpec.from_config(config)
    return Setup(config, models, spec, make_tx(config, spec), s_params, frozen, batch)


def make_tx(config, spec: distill.DistillSpec):
    """The optimizer as trainer.train builds it: the EMA target only where the spec uses one."""
    return train_state.make_optimizer(config, config.lcd.ema_decay if spec.uses_ema else None)


def step_fn(s: Setup):
    """``(state, batch, frozen) -> (state, metrics)``: the step trainer.train hands to loop.fit."""
    return functools.partial(distill.train_step, spec=s.spec, models=s.models, tx=s.tx)


def abstract_state(s: Setup) -> train_state.TrainState:
    """The train state's shapes and dtypes (nothing allocated)."""
    return jax.eval_shape(functools.partial(train_state.init_state, tx=s.tx, seed=0), s.params)


def compile_timed(s: Setup, state, state_sh, mesh) -> dict:
    """loop.compile_step (the trainer's jit: shardings, donated state) for ``state`` (arrays or
    ShapeDtypeStructs), timed; with XLA's FLOP count and memory of the compiled program."""
    frozen_sh = sharding.tree_shardings(s.frozen, mesh)
    t0 = time.perf_counter()
    compiled = loop.compile_step(step_fn(s), state, state_sh, s.batch, s.config.batch_size, s.frozen,
                                 frozen_sh, mesh)
    compile_s = time.perf_counter() - t0
    return dict(compiled=compiled, compile_s=compile_s, frozen_sh=frozen_sh,
                flops=_cost(compiled.cost_analysis()), mem=memory(compiled.memory_analysis()))


def _cost(ca) -> float:
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def gpu_flops(s: Setup) -> float:
    """FLOPs of the same step lowered for GPU (unsharded, not compiled): XLA:CPU runs SD-length
    attention as a loop (lcm_jax.models.attention) whose body its cost analysis counts once."""
    sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)  # noqa: E731
    try:
        return _cost(jax.jit(step_fn(s)).trace(abstract_state(s), sds(s.batch), sds(s.frozen))
                     .lower(lowering_platforms=("cuda",)).cost_analysis())
    except Exception as e:  # noqa: BLE001 -- reported in the table as n/a
        print(f"  (GPU lowering for the FLOP count failed: {type(e).__name__}: {e})")
        return float("nan")


def memory(m) -> dict:
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"]
    return out


def start(s: Setup, mesh) -> dict:
    """The tiny step ready to run: state built on the mesh (train_state.init_sharded), the step
    compiled (loop.compile_step), frozen tree and batch placed."""
    state, state_sh = train_state.init_sharded(s.params, s.tx, 0, mesh)
    c = compile_timed(s, state, state_sh, mesh)
    return dict(c=c, state=state, state_sh=state_sh, frozen=sharding.put(s.frozen, c["frozen_sh"]),
                batch=sharding.global_batch(s.batch, mesh), times=[])
