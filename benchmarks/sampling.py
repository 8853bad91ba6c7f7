"""Sampling speed: LCM 1/2/4/8 steps against the teacher's DDIM-50 + CFG and DPM-Solver++-25
+ CFG (one process, one set of random weights), then JAX against diffusers (PyTorch) for LCM-4
on the same weights in float32 and bfloat16.

  python -m benchmarks.sampling --model=tiny                    # ~1 min on 2 CPU cores
  python -m benchmarks.sampling --model=sd15 --dtype=bfloat16   # SD1.5-shaped, 512x512, ~20 min

``sd15`` is an SD1.5-shaped UNet (860M params), the SD VAE and a CLIP-L-shaped text encoder
with random weights built from our modules (nothing is downloaded); ``tiny`` is
lcm_jax.tiny's 2-level model. The teacher is the UNet without ``time_cond_proj_dim``; the
LCM is the same UNet plus ``time_embedding.cond_proj`` (weights shared), so the only
difference between rows is the sampler. The diffusers side loads what
``LCMPipeline.save_pretrained`` wrote. Latency is one image (batch 1) end to end through
``pipe(prompt, ...)``: prompt encoding, all UNet steps, VAE decode, uint8 output.
Compile time is what JAX's monitoring reports for tracing, lowering and XLA compilation
during the first call. Rows marked ``*`` were too slow to repeat: latency is the first
call minus its compile time (their CPU seconds, less the compile's wall time, are a lower bound).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util

from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.models.params import text_shapes, unet_shapes, vae_shapes
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.tiny import SD_SCHEDULER, tiny_configs
from lcm_jax.tokenizer import build_word_tokenizer

flags.DEFINE_enum("model", "tiny", ["tiny", "sd15"], "lcm_jax.tiny's model or an SD1.5-shaped one")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "compute dtype of the sampler table (default: float32 tiny, bfloat16 sd15)")
flags.DEFINE_integer("size", None, "image side (default: 32 tiny, 512 sd15)")
flags.DEFINE_string("lcm_steps", "1,2,4,8", "LCM step counts, one row each")
flags.DEFINE_string("teacher", "ddim:50,dpm++:25", "scheduler:steps,... ('' to skip)")
flags.DEFINE_string("compare_dtypes", "float32,bfloat16",
                    "dtypes of the JAX vs diffusers LCM-4 comparison ('' to skip)")
flags.DEFINE_integer("repeats", None, "timed calls per row (default 5 tiny, 1 sd15)")
flags.DEFINE_float("max_repeat_s", 60.0, "a row whose first call runs longer than this is not repeated")
flags.DEFINE_string("workdir", None, "where the pipeline is saved for diffusers (default: a temp dir)")
FLAGS = flags.FLAGS

PROMPT = "a photo of a cat"
WORDS = ["a", "photo", "of", "cat", "dog"]
GUIDANCE = 8.0  # diffusers' LCM default; CFG scale for the teacher rows
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


# --------------------------------------------------------------------------- models

def sd15_configs(vocab_size: int, bos: int, eos: int):
    """SD1.5's UNet / VAE configs and a CLIP ViT-L/14 text tower (as in the published model)."""
    unet = UNetConfig.from_diffusers_config(dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280], norm_num_groups=32, cross_attention_dim=768,
        attention_head_dim=8, down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3))
    vae = VAEConfig.from_diffusers_config(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215))
    text = CLIPTextConfig.from_transformers_config(dict(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    return unet, vae, text


def random_params(shapes, rng: np.random.Generator):
    """Fan-in-scaled normal kernels, N(0, 0.02) embeddings, unit norm scales, zero biases
    (numpy on the host: no XLA compile of a 1B-parameter init)."""
    out = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        shape, leaf = tuple(s.shape), path[-1]
        if leaf == "kernel":
            a = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(math.prod(shape[:-1])))
        elif leaf == "embedding":
            a = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        elif leaf == "scale":
            a = np.ones(shape, np.float32)
        else:
            a = np.zeros(shape, np.float32)
        out[path] = jax.device_put(a)
    return traverse_util.unflatten_dict(out)


@dataclasses.dataclass
class Weights:
    unet_cfg: UNetConfig
    vae_cfg: VAEConfig
    text_cfg: CLIPTextConfig
    tokenizer: object
    teacher: dict  # UNet params without cond_proj
    lcm: dict  # the same arrays plus time_embedding.cond_proj
    vae: dict
    text: dict


def build_weights(model: str, folder: str, seed: int = 0) -> Weights:
    max_len = 77 if model == "sd15" else 16
    tok = build_word_tokenizer(os.path.join(folder, "tokenizer"), WORDS, model_max_length=max_len)
    if model == "sd15":
        unet_cfg, vae_cfg, text_cfg = sd15_configs(49408, len(tok) - 2, len(tok) - 1)
    else:
        unet_cfg, vae_cfg, text_cfg = tiny_configs(resolution=32, vocab_size=len(tok), max_length=max_len)
    rng = np.random.default_rng(seed)
    lcm_cfg = dataclasses.replace(unet_cfg, time_cond_proj_dim=256)
    lcm = random_params(unet_shapes(UNet2DConditionModel(lcm_cfg)), rng)
    teacher = dict(lcm, time_embedding={k: v for k, v in lcm["time_embedding"].items() if k != "cond_proj"})
    return Weights(unet_cfg, vae_cfg, text_cfg, tok, teacher, lcm,
                   random_params(vae_shapes(AutoencoderKL(vae_cfg)), rng),
                   random_params(text_shapes(CLIPTextModel(text_cfg)), rng))


def make_pipe(w: Weights, lcm: bool, dtype) -> LCMPipeline:
    cfg = dataclasses.replace(w.unet_cfg, time_cond_proj_dim=256) if lcm else w.unet_cfg
    return LCMPipeline(UNet2DConditionModel(cfg, dtype=dtype), w.lcm if lcm else w.teacher,
                       AutoencoderKL(w.vae_cfg, dtype=dtype), w.vae, CLIPTextModel(w.text_cfg, dtype=dtype),
                       w.text, w.tokenizer, dict(SD_SCHEDULER), dtype)


def n_params(tree) -> float:
    return sum(x.size for x in jax.tree.leaves(tree)) / 1e6


# --------------------------------------------------------------------------- timing

@contextlib.contextmanager
def compile_seconds():
    """Yields a one-element list that ends up holding the JAX compile seconds spent inside."""
    total = [0.0]

    def listener(event, duration, **_):
        if event in COMPILE_EVENTS:
            total[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield total
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@dataclasses.dataclass
class Timing:
    compile_s: float  # JAX: compile seconds in the first call; diffusers: the first (warm-up) call
    wall_s: float  # per-image latency: median over the repeats, or the first call less compile
    cpu_s: float  # process CPU seconds (all threads) of the same call(s): robust to a busy machine
    repeated: bool

    @property
    def mark(self) -> str:
        return "" if self.repeated else "*"


def _timed(run):
    w0, c0 = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - w0, time.process_time() - c0


def time_call(run, repeats: int, max_repeat_s: float, jax_compiles: bool = True) -> Timing:
    """Times a callable that returns a host array: one first call (compiling, for JAX),
    then ``repeats`` timed calls unless the first one ran longer than ``max_repeat_s``."""
    with compile_seconds() as comp:
        first_wall, first_cpu = _timed(run)
    compile_s = comp[0] if jax_compiles else first_wall
    if jax_compiles:  # the compile ran on one thread: take it off both clocks
        first_wall, first_cpu = max(first_wall - comp[0], 0.0), max(first_cpu - comp[0], 0.0)
    if repeats < 1 or first_wall > max_repeat_s:
        return Timing(compile_s, first_wall, first_cpu, False)
    walls, cpus = zip(*(_timed(run) for _ in range(repeats)))
    return Timing(compile_s, statistics.median(walls), statistics.median(cpus), True)


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------- main

def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dtype_name = FLAGS.dtype or ("bfloat16" if FLAGS.model == "sd15" else "float32")
    size = FLAGS.size or (512 if FLAGS.model == "sd15" else 32)
    repeats = FLAGS.repeats if FLAGS.repeats is not None else (1 if FLAGS.model == "sd15" else 5)
    lcm_steps = [int(s) for s in FLAGS.lcm_steps.split(",") if s]
    teacher = [(s.split(":")[0], int(s.split(":")[1])) for s in FLAGS.teacher.split(",") if s]
    compare = [d for d in FLAGS.compare_dtypes.split(",") if d]
    tmp = tempfile.TemporaryDirectory(prefix="lcm_bench_") if FLAGS.workdir is None else None
    workdir = FLAGS.workdir or tmp.name

    t0 = time.perf_counter()
    w = build_weights(FLAGS.model, workdir)
    log(f"# {FLAGS.model}: UNet {n_params(w.teacher):.1f}M (+cond_proj {n_params(w.lcm) - n_params(w.teacher):.2f}M), "
        f"VAE {n_params(w.vae):.1f}M, text {n_params(w.text):.1f}M params; {size}x{size}, 1 image, "
        f"guidance {GUIDANCE}; jax {jax.__version__} on {jax.devices()[0].platform} x{os.cpu_count()} cores; "
        f"random weights built in {time.perf_counter() - t0:.0f}s")

    # ------------------------------------------------------------------ LCM vs teacher samplers
    jdtype = jnp.bfloat16 if dtype_name == "bfloat16" else jnp.float32
    lcm_pipe, teacher_pipe = make_pipe(w, True, jdtype), make_pipe(w, False, jdtype)
    plan = [("lcm", s, lcm_pipe) for s in lcm_steps] + [(n, s, teacher_pipe) for n, s in teacher]
    results = {}
    for sched, steps, pipe in plan:
        r = results[(sched, steps)] = time_call(sampler_call(pipe, sched, steps, size), repeats, FLAGS.max_repeat_s)
        log(f"{row_name(sched, steps)}: compile {r.compile_s:.1f}s, latency {r.wall_s:.3f}s (cpu {r.cpu_s:.2f}s)")

    ref = results.get(("ddim", 50))
    log(f"\n## JAX samplers, {FLAGS.model}, {size}x{size}, {dtype_name} "
        f"(median of {repeats} call(s) after the compiling one)\n")
    log("| sampler | UNet evals (batch) | compile s | latency s | CPU s | DDIM-50 + CFG / this (latency) |")
    log("|---|---|---|---|---|---|")
    for (sched, steps), r in results.items():
        evals = f"{steps} (1)" if sched == "lcm" else f"{steps} (2)"
        ratio = f"{ref.wall_s / r.wall_s:.1f}x" if ref else "-"
        log(f"| {row_name(sched, steps)} | {evals} | {r.compile_s:.1f} | {r.wall_s:.3f}{r.mark} | {r.cpu_s:.2f} | {ratio} |")
    if ref and ("lcm", 4) in results:
        lcm4 = results[("lcm", 4)]
        log(f"\nLCM-4 vs DDIM-50 + CFG: {ref.wall_s / lcm4.wall_s:.1f}x faster per image "
            f"({ref.cpu_s / lcm4.cpu_s:.1f}x in CPU seconds) (goal >= 20x)")

    # ------------------------------------------------------------------ JAX vs diffusers, LCM-4
    if not compare:
        return 0
    jax_lcm4 = {}
    for d in compare:
        if d == dtype_name and ("lcm", 4) in results:
            jax_lcm4[d] = results[("lcm", 4)]
            continue
        pipe = make_pipe(w, True, jnp.bfloat16 if d == "bfloat16" else jnp.float32)
        r = jax_lcm4[d] = time_call(sampler_call(pipe, "lcm", 4, size), max(repeats, 1), FLAGS.max_repeat_s)
        log(f"JAX LCM-4 {d}: compile {r.compile_s:.1f}s, latency {r.wall_s:.3f}s (cpu {r.cpu_s:.2f}s)")
        del pipe
    folder = os.path.join(workdir, "lcm")
    t0 = time.perf_counter()
    lcm_pipe.save_pretrained(folder)
    log(f"(saved the LCM pipeline for diffusers in {time.perf_counter() - t0:.0f}s)")
    del lcm_pipe, teacher_pipe, w
    jax.clear_caches()
    gc.collect()

    import torch
    from diffusers import LatentConsistencyModelPipeline
    torch_lcm4 = {}
    for d in compare:
        tdtype = torch.bfloat16 if d == "bfloat16" else torch.float32
        pipe = LatentConsistencyModelPipeline.from_pretrained(folder, torch_dtype=tdtype, safety_checker=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def run(pipe=pipe):
            with torch.inference_mode():
                pipe(PROMPT, num_inference_steps=4, guidance_scale=GUIDANCE, height=size, width=size,
                     generator=torch.Generator().manual_seed(0), output_type="np")

        r = torch_lcm4[d] = time_call(run, max(repeats, 1), FLAGS.max_repeat_s, jax_compiles=False)
        log(f"diffusers LCM-4 {d}: first call {r.compile_s:.2f}s, latency {r.wall_s:.3f}s (cpu {r.cpu_s:.2f}s)")
        del pipe
        gc.collect()

    log(f"\n## LCM-4, {size}x{size}, JAX vs diffusers {__import__('diffusers').__version__} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads) on the same weights\n")
    log("| dtype | JAX compile s | JAX latency s (CPU s) | diffusers latency s (CPU s) | JAX speed-up: latency (CPU) |")
    log("|---|---|---|---|---|")
    for d in compare:
        j, t = jax_lcm4[d], torch_lcm4[d]
        log(f"| {d} | {j.compile_s:.1f} | {j.wall_s:.3f}{j.mark} ({j.cpu_s:.2f}) | {t.wall_s:.3f}{t.mark} "
            f"({t.cpu_s:.2f}) | {t.wall_s / j.wall_s:.2f}x ({t.cpu_s / j.cpu_s:.2f}x) |")
    log("\n(goal: JAX >= 1.2x diffusers on CPU)")
    return 0


def sampler_call(pipe: LCMPipeline, scheduler: str, steps: int, size: int):
    return lambda: pipe(PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, scheduler=scheduler,
                        height=size, width=size, seed=0)


def row_name(scheduler: str, steps: int) -> str:
    if scheduler == "lcm":
        return f"LCM-{steps}"
    return f"{dict(ddim='DDIM', dpm='DPM-Solver', **{'dpm++': 'DPM-Solver++'})[scheduler]}-{steps} + CFG"


if __name__ == "__main__":
    app.run(main)
