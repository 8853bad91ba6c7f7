"""One prepared accelerator run: ceilings, attention, the UNet, LCM-4 against diffusers, the LCD step.

    bash benchmarks/device.sh OUT          # on the GPU machine (installs carried wheels, then this)
    python -m benchmarks.device --out=OUT --budget_s=480 [--tiny]   # --tiny: a CPU check of the script

Each part runs only if the time left covers its estimate (``--budget_s`` in all) and records what it
measured, or why it was skipped, in OUT/results.json and OUT/results.md as it goes, so a run cut short
still leaves its numbers. Every timing is the median of repeated calls after a warm-up, synchronised
with ``block_until_ready``; FLOPs are XLA's cost analysis of the compiled program.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "folder for results.json / results.md")
_BUDGET = flags.DEFINE_float("budget_s", 480.0, "seconds for everything; a part that would not fit is skipped")
_TINY = flags.DEFINE_bool("tiny", False, "tiny shapes (checks the script on a CPU)")
_REMAT = flags.DEFINE_string("remat", "block", "the LCD step's remat mode (lcm_jax/models/unet.py REMAT_MODES)")

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 datasheet FLOP/s
RESULTS: dict = {}


def _median_s(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def _save() -> None:
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=2, default=str)
    lines = [f"# benchmarks/device.py on {RESULTS.get('device')}", ""]
    for name, r in RESULTS.items():
        if isinstance(r, dict):
            lines += [f"## {name}", "", "```", json.dumps(r, indent=1, default=str), "```", ""]
    with open(os.path.join(_OUT.value, "results.md"), "w") as f:
        f.write("\n".join(lines))


def part(name: str, estimate_s: float, deadline: float, fn) -> None:
    left = deadline - time.time()
    if left < estimate_s:
        RESULTS[name] = {"skipped": f"{left:.0f} s left, the part needs ~{estimate_s:.0f} s"}
    else:
        t0 = time.time()
        try:
            RESULTS[name] = {**fn(), "part_s": round(time.time() - t0, 1)}
        except Exception as e:  # noqa: BLE001 -- recorded, and the next part still runs
            RESULTS[name] = {"failed": f"{type(e).__name__}: {e}"[:2000]}
    print(name, json.dumps(RESULTS[name], default=str)[:400], flush=True)
    _save()


# --------------------------------------------------------------------------- parts

def ceilings(tiny: bool) -> dict:
    n = 512 if tiny else 8192
    a, b = (jax.random.normal(jax.random.PRNGKey(i), (n, n), jnp.bfloat16) for i in range(2))
    mm = jax.jit(lambda a, b: a @ b)
    t = _median_s(lambda: mm(a, b), 10)
    x = jnp.ones((1 << (20 if tiny else 30),), jnp.bfloat16)  # 2 GiB
    copy = jax.jit(lambda x: x + jnp.bfloat16(1))
    tc = _median_s(lambda: copy(x), 10)
    return {"matmul_bf16": f"{n}^3", "matmul_tflops": 2 * n ** 3 / t / 1e12,
            "copy_bytes": 2 * x.nbytes, "copy_tb_per_s": 2 * x.nbytes / tc / 1e12}


def attention(tiny: bool) -> dict:
    from lcm_jax.models.attention import attention_implementation
    backend = jax.default_backend()
    cap = getattr(jax.devices()[0], "compute_capability", None)
    cases = [(2, 256, 77, 8, 40)] if tiny else [(16, 4096, 4096, 8, 40), (16, 1024, 1024, 8, 80),
                                                 (16, 256, 256, 8, 160), (16, 4096, 77, 8, 40)]
    out = {}
    for b, t, s, n, h in cases:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        q, k, v = (jax.random.normal(key, (b, length, n, h), jnp.bfloat16) for key, length in zip(keys, (t, s, s)))
        ref = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
        row = {"chosen": attention_implementation(backend, jnp.bfloat16, q.shape, k.shape,
                                                  float(cap) if cap else None)}
        for impl in ("xla", "cudnn") if backend == "gpu" else ("xla",):
            fwd = jax.jit(functools.partial(jax.nn.dot_product_attention, implementation=impl))
            grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
                q, k, v, implementation=impl).astype(jnp.float32)), (0, 1, 2)))
            try:
                err = float(jnp.max(jnp.abs(fwd(q, k, v).astype(jnp.float32) - ref)))
                row[impl] = {"fwd_ms": 1e3 * _median_s(lambda: fwd(q, k, v), 10),
                             "fwd_bwd_ms": 1e3 * _median_s(lambda: grad(q, k, v), 10), "max_err_vs_fp32": err}
            except Exception as e:  # noqa: BLE001 -- e.g. cuDNN refusing a shape
                row[impl] = f"{type(e).__name__}: {e}"[:300]
        out[f"B{b} T{t} S{s} N{n} H{h}"] = row
    return out


def make_folder(folder: str, tiny: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.device_torch", f"--folder={folder}", "--make"] + (["--tiny"] if tiny else [])
    subprocess.run(cmd, check=True)
    return {"folder": folder}


def unet_forward(folder: str, tiny: bool) -> dict:
    from lcm_jax.pipeline import LCMPipeline
    pipe = LCMPipeline.from_pretrained(folder, dtype="bfloat16", mesh=None)
    cfg, h = pipe.unet.config, pipe.unet.config.sample_size
    out = {}
    for b in (1, 8):
        z = jnp.zeros((b, 4, h, h), jnp.float32)
        t = jnp.full((b,), 999, jnp.int32)
        ctx = jnp.zeros((b, pipe.tokenizer.model_max_length, cfg.cross_attention_dims[0]), jnp.float32)
        w = jnp.zeros((b, cfg.time_cond_proj_dim), jnp.float32)
        f = jax.jit(lambda p, z, t, c, w: pipe.unet.apply({"params": p}, z, t, c, w))
        t0 = time.perf_counter()
        compiled = f.lower(pipe.unet_params, z, t, ctx, w).compile()
        compile_s = time.perf_counter() - t0
        s = _median_s(lambda: compiled(pipe.unet_params, z, t, ctx, w), 10)
        flops = _flops(compiled)
        out[f"batch {b}"] = {"compile_s": compile_s, "ms": 1e3 * s, "gflop": flops / 1e9, "tflops": flops / s / 1e12}
    return out


def lcm4(folder: str, tiny: bool) -> dict:
    from lcm_jax.pipeline import LCMPipeline
    pipe = LCMPipeline.from_pretrained(folder, dtype="bfloat16")  # mesh "auto": every local accelerator
    size = 64 if tiny else 512
    out = {"mesh": None if pipe.mesh is None else dict(pipe.mesh.shape)}
    for b in (1, 8):
        call = lambda: pipe(["a photo of a cat"] * b, 4, 8.0, height=size, width=size)  # noqa: E731
        t0 = time.perf_counter()
        call()
        first_s = time.perf_counter() - t0
        s = _median_s(call, 5)
        out[f"jax batch {b}"] = {"first_call_s": first_s, "ms_per_call": 1e3 * s, "ms_per_image": 1e3 * s / b}
    cmd = [sys.executable, "-m", "benchmarks.device_torch", f"--folder={folder}", "--time", "--batch=1,8",
           "--repeats=5"] + (["--tiny"] if tiny else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60.0, _left() - 30))
    for line in r.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            out[f"diffusers batch {row['batch']}"] = row
            jax_ms = out[f"jax batch {row['batch']}"]["ms_per_call"]
            out[f"diffusers / jax, batch {row['batch']}"] = row["ms_per_call"] / jax_ms
    if r.returncode:
        out["diffusers_error"] = r.stderr[-1500:]
    return out


def lcd_step(folder: str, tiny: bool, remat: str) -> dict:
    from configs import lcd_512
    from lcm_jax import distill, loop, sharding, train_state, trainer
    from lcm_jax.models.params import place
    from lcm_jax.models.unet import UNet2DConditionModel
    from lcm_jax.pipeline import LCMPipeline
    config = lcd_512.get_config()
    config.dtype, config.remat, config.batch_size = "bfloat16", remat, 8
    pipe = LCMPipeline.from_pretrained(folder, dtype="bfloat16", param_dtype="float32", on_device=False, mesh=None)
    # the folder holds an LCM UNet: the teacher is the same UNet without its omega embedding
    teacher = UNet2DConditionModel(dataclasses.replace(pipe.unet.config, time_cond_proj_dim=None), dtype=jnp.bfloat16)
    teacher_params = dict(pipe.unet_params, time_embedding={k: v for k, v in pipe.unet_params["time_embedding"].items()
                                                             if k != "cond_proj"})
    student, params = trainer.build_student(teacher, teacher_params, config)
    models = distill.Models(student, teacher, pipe.vae, pipe.text_encoder, pipe.schedule)
    spec = distill.DistillSpec.from_config(config)
    tx = train_state.make_optimizer(config, config.lcd.ema_decay)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    state, state_sh = train_state.init_sharded(params, tx, 0, mesh)
    h, length = pipe.unet.config.sample_size, pipe.tokenizer.model_max_length
    width = pipe.unet.config.cross_attention_dims[0]
    rng = np.random.default_rng(0)
    batch = {"latent_mean": rng.standard_normal((8, 4, h, h)).astype(np.float32),
             "latent_logvar": np.full((8, 4, h, h), -4.0, np.float32),
             "prompt_embeds": rng.standard_normal((8, length, width)).astype(np.float32)}
    frozen = {"teacher": place(teacher_params, jnp.bfloat16, device=False),
              "uncond": np.zeros((1, length, width), np.float32)}
    frozen_sh = sharding.tree_shardings(frozen, mesh)
    frozen = sharding.put(frozen, frozen_sh)
    step = functools.partial(distill.train_step, spec=spec, models=models, tx=tx)
    t0 = time.perf_counter()
    compiled = loop.compile_step(step, state, state_sh, batch, 8, frozen, frozen_sh, mesh)
    compile_s = time.perf_counter() - t0
    gbatch = sharding.global_batch(batch, mesh)
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], gbatch, frozen)
        return m
    s = _median_s(run, 10)
    flops = _flops(compiled)
    mem = compiled.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}
    name = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    matmul = RESULTS.get("ceilings", {}).get("matmul_tflops", float("nan")) * 1e12
    return {"remat": remat, "batch": 8, "compile_s": compile_s, "step_ms": 1e3 * s, "gflop": flops / 1e9,
            "mfu_datasheet": flops / s / peak, "mfu_measured_matmul": flops / s / matmul,
            "xla_temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 30,
            "peak_bytes_in_use_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


_DEADLINE = {"t": 0.0}


def _left() -> float:
    return _DEADLINE["t"] - time.time()


def main(argv) -> None:
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    _DEADLINE["t"] = deadline = time.time() + _BUDGET.value
    tiny = _TINY.value
    d = jax.devices()[0]
    RESULTS["device"] = f"{jax.device_count()} x {d.device_kind} ({jax.default_backend()}), jax {jax.__version__}"
    folder = tempfile.mkdtemp(prefix="lcm_device_")
    scale = 0.05 if tiny else 1.0  # (a CPU check runs every part)
    part("ceilings", 20 * scale, deadline, lambda: ceilings(tiny))
    part("attention", 40 * scale, deadline, lambda: attention(tiny))
    part("pipeline folder", 60 * scale, deadline, lambda: make_folder(folder, tiny))
    if "failed" in RESULTS["pipeline folder"] or "skipped" in RESULTS["pipeline folder"]:
        return
    part("unet forward", 60 * scale, deadline, lambda: unet_forward(folder, tiny))
    part("lcm-4", 150 * scale, deadline, lambda: lcm4(folder, tiny))
    part("lcd step", 180 * scale, deadline, lambda: lcd_step(folder, tiny, _REMAT.value))


if __name__ == "__main__":
    flags.mark_flag_as_required("out")
    app.run(main)
