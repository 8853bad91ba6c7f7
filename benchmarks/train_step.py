"""The jitted LCD train step on CPU: compile/step time, XLA FLOPs and memory; PyTorch (diffusers'
train_lcm_distill_sd_wds.py, benchmarks/torch_lcd.py) on the same tiny step; 1 vs 8 devices;
per-device state memory under data vs fsdp sharding; checkpoint save/restore. See
benchmarks/README.md, "train_step".

Every step here feeds cached latents (latent_mean / latent_logvar) and prompt embeddings, so
the VAE encoder and the text encoder are not part of the step on either side. The step is built
and compiled by the library's own train_state.init_sharded and loop.compile_step.

    python -m benchmarks.train_step                       # everything (SD-size: compile only)
    python -m benchmarks.train_step --parts=tiny,ckpt     # just the tiny step and checkpoints
    python -m benchmarks.train_step --parts=sd --sd_variants=float32:none,bfloat16:block
    python -m benchmarks.train_step --parts=lora          # LCM-LoRA vs full LCD; LoRA sizes at rank 64
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import copy
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from benchmarks.step_setup import (LCM_LORA_REPORT_PARAMS, SD_UNET, SDXL_UNET, Setup, abstract_state, compile_timed,
                                   gpu_flops, make_setup, make_tx, memory, start)
from benchmarks.torch_lcd import TorchLCD
from lcm_jax import checkpoint as ckpt_lib
from lcm_jax import distill, lora, sharding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig

flags.DEFINE_string("parts", "tiny,sd,memory,ckpt", "comma list of tiny, sd, memory, ckpt, lora")
flags.DEFINE_integer("repeats", 15, "timed tiny steps per side (interleaved)")
flags.DEFINE_string("sd_variants", "float32:none,bfloat16:none,bfloat16:block",
                    "dtype:remat pairs for the SD-size compile")
FLAGS = flags.FLAGS

# --------------------------------------------------------------------------- parts

def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _gb(n: float) -> str:
    return f"{n / 2**30:.3f}"


def _interleave(runs: dict, repeats: int, also=None) -> None:
    """One warm-up step of each compiled run, then ``repeats`` rounds of one timed step each (and
    ``also()``), appending to each run's ``times``: side by side, so machine noise hits all alike."""
    def step(r):
        r["state"], m = r["c"]["compiled"](r["state"], r["batch"], r["frozen"])
        jax.block_until_ready((r["state"], m))
    for r in runs.values():
        step(r)
    for _ in range(repeats):
        for r in runs.values():
            r["times"].append(_t(lambda r=r: step(r)))
        if also is not None:
            also()


def part_tiny(repeats: int) -> dict:
    """JAX on 1 device, JAX on 8 devices (same global batch 8) and torch, interleaved."""
    import torch
    s = make_setup("tiny")
    runs = {}
    for name, n in (("jax-1dev", 1), ("jax-8dev", 8)):
        runs[name] = start(s, sharding.make_mesh(dict(data=n, fsdp=1, tensor=1), jax.devices()[:n]))
    tl = TorchLCD(s.config, s.batch, s.frozen["uncond"])
    t_first = _t(tl.step)
    torch_times = []
    _interleave(runs, repeats, also=lambda: torch_times.append(_t(tl.step)))
    out = {name: dict(compile_s=r["c"]["compile_s"], step_s=statistics.median(r["times"]),
                      flops=r["c"]["flops"], mem=r["c"]["mem"]) for name, r in runs.items()}
    out["torch"] = dict(compile_s=float("nan"), first_s=t_first, step_s=statistics.median(torch_times),
                        flops=float("nan"), mem={})
    out["_threads"] = torch.get_num_threads()
    out["_batch"] = s.config.batch_size
    out["_state"] = runs["jax-1dev"]["state"]
    out["_state_sh"] = runs["jax-1dev"]["state_sh"]
    out["_config"] = s.config
    return out


def print_tiny(res: dict) -> None:
    b = res["_batch"]
    f1 = res["jax-1dev"]["flops"]
    print(f"\n== tiny LCD train step (configs/tiny.py: 16x16 -> 8x8x4 latents, batch {b}, float32, "
          f"cached latents + prompt embeds; median of interleaved repeats; torch threads {res['_threads']}) ==")
    print("| run | compile s | step s (median) | examples/s | GFLOP/step (XLA) | GFLOP/s | "
          "XLA memory GiB (arg+out+temp) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("jax-1dev", "jax-8dev", "torch"):
        r = res[name]
        flops = r["flops"]
        note = " (per device)" if name == "jax-8dev" else ""
        mem = r["mem"]
        memcol = (f"{_gb(mem['total'])} ({_gb(mem['argument'])}+{_gb(mem['output'])}+{_gb(mem['temp'])})"
                  f"{note}" if mem else "-")
        rate = (f1 / r["step_s"] / 1e9) if np.isfinite(f1) else float("nan")
        print(f"| {name} | {r['compile_s']:.1f} | {r['step_s']:.4f} | {b / r['step_s']:.1f} | "
              f"{flops / 1e9:.3f}{note if np.isfinite(flops) else ''} | {rate:.2f} | {memcol} |"
              .replace("nan", "-"))
    print(f"torch first step (eager, no compile): {res['torch']['first_s']:.3f} s")
    print(f"torch / JAX step time (1 device): {res['torch']['step_s'] / res['jax-1dev']['step_s']:.2f}x")
    print(f"JAX 8 devices / 1 device step time (same global batch {b}): "
          f"{res['jax-8dev']['step_s'] / res['jax-1dev']['step_s']:.2f}x")
    print("(GFLOP/s uses the 1-device program's FLOPs for every row.)")


def part_sd(variants: list[str], run_steps: bool) -> list[dict]:
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    rows = []
    for v in variants:
        dtype, remat = v.split(":")
        s = make_setup("sd", dtype, remat, batch_size=1, abstract=True)
        state = abstract_state(s)
        c = compile_timed(s, state, sharding.tree_shardings(state, mesh), mesh)
        row = dict(variant=f"{dtype}, remat={remat}", compile_s=c["compile_s"], cpu_flops=c["flops"],
                   gpu_flops=gpu_flops(s), mem=c["mem"], step_s=float("nan"))
        print(f"  sd {row['variant']}: compiled in {c['compile_s']:.1f}s, XLA:CPU GFLOP {c['flops'] / 1e9:.1f}, "
              f"GPU-lowered GFLOP {row['gpu_flops'] / 1e9:.1f}, memory {c['mem']}", flush=True)
        rows.append(row)
    return rows


def print_sd(rows: list[dict]) -> None:
    print("\n== SD1.5-shaped LCD train step (UNet 320/640/1280/1280, cross-attn 768, 64x64x4 latents "
          "= 512^2, batch 1, cached latents + prompt embeds, 77 tokens): lowered + compiled only ==")
    print("| variant | compile s | GFLOP/step (GPU lowering) | GFLOP/step (XLA:CPU, loop bodies once) | "
          "XLA memory GiB (arg+out+temp) |")
    print("|---|---|---|---|---|")
    for r in rows:
        m = r["mem"]
        print(f"| {r['variant']} | {r['compile_s']:.1f} | {r['gpu_flops'] / 1e9:.1f} | {r['cpu_flops'] / 1e9:.1f} | "
              f"{_gb(m['total'])} ({_gb(m['argument'])}+{_gb(m['output'])}+{_gb(m['temp'])}) |")


def partmemory() -> dict:
    """Bytes per device of params / Adam moments / EMA for the SD student, data=8 vs fsdp=8."""
    s = make_setup("sd", abstract=True)
    abstract = abstract_state(s)
    out = {}
    for name, mesh_cfg in (("data=8", dict(data=8, fsdp=1, tensor=1)), ("fsdp=8", dict(data=1, fsdp=8, tensor=1))):
        mesh = sharding.make_mesh(mesh_cfg)
        shs = sharding.tree_shardings(abstract, mesh)
        totals = {"params": 0, "adam": 0, "ema": 0, "other": 0}
        full = dict(totals)

        def add(path, leaf, sh):
            p = jax.tree_util.keystr(path)
            key = ("ema" if "ema_params" in p else "adam" if (".mu" in p or ".nu" in p) else
                   "params" if p.startswith(".params") else "other")
            totals[key] += int(np.prod(sh.shard_shape(leaf.shape))) * leaf.dtype.itemsize
            full[key] += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        jax.tree_util.tree_map_with_path(add, abstract, shs)
        t_sh = sharding.tree_shardings(s.frozen["teacher"], mesh)
        teacher = sum(int(np.prod(sh.shard_shape(x.shape))) * x.dtype.itemsize
                      for x, sh in zip(jax.tree.leaves(s.frozen["teacher"]), jax.tree.leaves(t_sh)))
        # XLA's own account: a donated identity over the sharded state, compiled for this mesh
        # (memory_analysis of an SPMD program is per device)
        sds = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), abstract, shs)
        xla = jax.jit(lambda st: st, in_shardings=(shs,), out_shardings=shs, donate_argnums=0).lower(sds).compile()
        out[name] = dict(totals, teacher=teacher, full=full, xla=memory(xla.memory_analysis()).get("argument", 0))
    out["_n_params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.params))
    return out


def printmemory(res: dict) -> None:
    print(f"\n== SD1.5-shaped student ({res['_n_params'] / 1e6:.1f}M params, float32 master): "
          "train-state bytes per device from the shardings (8 CPU devices) ==")
    print("| mesh | params GiB | Adam mu+nu GiB | EMA theta^- GiB | total state GiB | XLA memory_analysis "
          "argument GiB | (+ frozen teacher GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name in ("data=8", "fsdp=8"):
        r = res[name]
        total = r["params"] + r["adam"] + r["ema"] + r["other"]
        print(f"| {name} | {_gb(r['params'])} | {_gb(r['adam'])} | {_gb(r['ema'])} | {_gb(total)} | {_gb(r['xla'])} | "
              f"{_gb(r['teacher'])} |")
    full = res["data=8"]["full"]
    print(f"unsharded state: {_gb(sum(full.values()))} GiB")


def part_ckpt(state, state_sh, config, repeats: int = 3) -> dict:
    workdir = tempfile.mkdtemp(prefix="lcm_bench_ckpt_")
    config_dict = ckpt_lib.config_record(config)
    saves, restores = [], []
    try:
        ck = ckpt_lib.Checkpointer(workdir, keep=2, every=1)
        for i in range(repeats):
            saves.append(_t(lambda i=i: (ck.save(i + 1, state, {"position": i}, config_dict), ck.wait())))
            abstract = ckpt_lib.abstract_like(state, state_sh)
            restores.append(_t(lambda: jax.block_until_ready(ck.restore(abstract, config_dict)[0])))
        ck.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return dict(save_s=statistics.median(saves), restore_s=statistics.median(restores), bytes=nbytes)


def print_ckpt(res: dict) -> None:
    print(f"\n== checkpoint (lcm_jax.checkpoint.Checkpointer, orbax) of the tiny train state "
          f"({res['bytes'] / 2**20:.1f} MiB), median of 3 ==")
    print("| state | save s (to completion) | restore s |")
    print("|---|---|---|")
    print(f"| tiny | {res['save_s']:.3f} | {res['restore_s']:.3f} |")
    print("| SD1.5-shaped | skipped: ~13 GiB float32 state (params + Adam + EMA) does not fit beside the "
          "rest in this machine's free RAM | |")


def lora_size(unet_config: dict, rank: int = 64) -> tuple[int, int]:
    """(LoRA params at ``rank`` on diffusers' LCM-LoRA module set, UNet params), from shapes only."""
    cfg = UNetConfig.from_diffusers_config(unet_config)
    unet = UNet2DConditionModel(cfg)
    h = 8  # the params do not depend on the latent size
    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, h, h)), jnp.zeros((1,), jnp.int32),
                                              jnp.zeros((1, 4, cfg.cross_attention_dim))))["params"]
    flat = traverse_util.flatten_dict(params)
    n_lora = 0
    for path in lora.target_modules(params).values():
        *lead, n_out = flat[path + ("kernel",)].shape  # down [..., in, r], up [r, out]
        n_lora += int(np.prod(lead)) * rank + rank * n_out
    return n_lora, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def lora_setup(s: Setup, rank: int) -> Setup:
    """The same tiny size as LCM-LoRA: the teacher's UNet + a rank-``rank`` LoRA (only it trained,
    no EMA, no omega embedding), as trainer.train builds it for ``config.lora.rank > 0``."""
    config = copy.deepcopy(s.config)
    config.lora.rank, config.lora.alpha = rank, float(rank)
    teacher = s.models.teacher
    params = jax.tree.map(np.asarray, lora.init_lora(s.frozen["teacher"], rank, tuple(config.lora.targets),
                                                     rng=jax.random.PRNGKey(0)))
    spec = distill.DistillSpec.from_config(config)
    return Setup(config, s.models._replace(student=teacher), spec, make_tx(config, spec), params, s.frozen, s.batch)


def part_lora(repeats: int, rank: int = 8) -> dict:
    """Tiny LCD vs tiny LCM-LoRA (rank ``rank``) steps, interleaved on 1 device; LoRA sizes at rank 64."""
    full = make_setup("tiny")
    runs = {"full LCD": full, f"LCM-LoRA r={rank}": lora_setup(full, rank)}
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    out = {}
    for name, s in runs.items():
        r = out[name] = start(s, mesh)
        r["n_state"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(r["state"]))
        r["n_trained"] = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(s.params))
    _interleave(out, repeats)
    res = {name: dict(step_s=statistics.median(r["times"]), compile_s=r["c"]["compile_s"], mem=r["c"]["mem"],
                      n_state=r["n_state"], n_trained=r["n_trained"]) for name, r in out.items()}
    res["_sizes"] = {name: lora_size(cfg) for name, cfg in (("SD1.5", SD_UNET), ("SDXL", SDXL_UNET))}
    res["_batch"] = full.config.batch_size
    return res


def print_lora(res: dict) -> None:
    print(f"\n== LCM-LoRA vs full LCD, tiny (configs/tiny.py, batch {res['_batch']}, float32, 1 device; "
          "median of interleaved repeats) ==")
    print("| run | trained params | state elements (params + Adam + EMA) | compile s | step s (median) | "
          "XLA memory GiB (arg+out+temp) |")
    print("|---|---|---|---|---|---|")
    for name, r in res.items():
        if name.startswith("_"):
            continue
        m = r["mem"]
        print(f"| {name} | {r['n_trained']:,} | {r['n_state']:,} | {r['compile_s']:.1f} | {r['step_s']:.4f} | "
              f"{_gb(m['total'])} ({_gb(m['argument'])}+{_gb(m['output'])}+{_gb(m['temp'])}) |")
    print("\n== LoRA params at rank 64, diffusers' LCM-LoRA module set (lora.LCM_LORA_TARGETS) ==")
    print("| UNet | UNet params | LoRA params (ours) | LCM-LoRA report |")
    print("|---|---|---|---|")
    for name, (n_lora, n_unet) in res["_sizes"].items():
        print(f"| {name} | {n_unet / 1e6:.1f}M | {n_lora / 1e6:.1f}M | {LCM_LORA_REPORT_PARAMS[name] / 1e6:.1f}M |")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every checkpoint file at INFO (--verbosity=0 shows it)
        logging.set_verbosity(logging.WARNING)
    parts = FLAGS.parts.split(",")
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices, {os.cpu_count()} cores", flush=True)
    if "tiny" in parts or "ckpt" in parts:
        tiny = part_tiny(FLAGS.repeats)
        if "tiny" in parts:
            print_tiny(tiny)
        if "ckpt" in parts:
            print_ckpt(part_ckpt(tiny["_state"], tiny["_state_sh"], tiny["_config"]))
    if "memory" in parts:
        printmemory(partmemory())
    if "sd" in parts:
        print_sd(part_sd(FLAGS.sd_variants.split(","), run_steps=False))
    if "lora" in parts:
        print_lora(part_lora(FLAGS.repeats))
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
