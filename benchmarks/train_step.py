"""The jitted LCD train step on CPU: compile/step time, XLA FLOPs and memory; PyTorch (diffusers'
train_lcm_distill_sd_wds.py) on the same tiny step; 1 vs 8 devices; per-device state memory
under data vs fsdp sharding; checkpoint save/restore. See benchmarks/README.md, "train_step".

Every step here feeds cached latents (latent_mean / latent_logvar) and prompt embeddings, so
the VAE encoder and the text encoder are not part of the step on either side.

    python benchmarks/train_step.py                       # everything (SD-size: compile only)
    python benchmarks/train_step.py --parts tiny,ckpt     # just the tiny step and checkpoints
    python benchmarks/train_step.py --parts sd --sd-variants float32:none,bfloat16:block
    python benchmarks/train_step.py --parts lora          # LCM-LoRA vs full LCD; LoRA sizes at rank 64
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import copy
import dataclasses
import functools
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from configs import lcd_512 as lcd_512_config  # noqa: E402
from configs import tiny as tiny_config  # noqa: E402
from lcm_jax import checkpoint as ckpt_lib  # noqa: E402
from lcm_jax import distill, lora, sharding, train_state, trainer  # noqa: E402
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig  # noqa: E402
from lcm_jax.models.vae import AutoencoderKL  # noqa: E402
from lcm_jax.models.params import resolve_dtype  # noqa: E402
from lcm_jax.schedules import NoiseSchedule  # noqa: E402
from lcm_jax.tiny import SD_SCHEDULER, random_params, tiny_configs  # noqa: E402

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
    return Setup(config, models, distill.DistillSpec.from_config(config), train_state.make_optimizer(config, config.lcd.ema_decay),
                 s_params, frozen, batch)


def _sds(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)


def compile_step(s: Setup, mesh) -> dict:
    """The trainer's jit (shardings, donated state) lowered and compiled against shapes only."""
    init_fn = functools.partial(train_state.init_state, tx=s.tx, seed=0)
    abstract = jax.eval_shape(init_fn, s.params)
    state_sh = sharding.tree_shardings(abstract, mesh)
    frozen_sh = sharding.tree_shardings(s.frozen, mesh)
    batch_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in s.batch.items()}
    step = jax.jit(functools.partial(distill.train_step, spec=s.spec, models=s.models, tx=s.tx),
                   in_shardings=(state_sh, batch_sh, frozen_sh),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = step.lower(_sds(abstract, state_sh), _sds(s.batch, batch_sh), _sds(s.frozen, frozen_sh)).compile()
    compile_s = time.perf_counter() - t0
    return dict(compiled=compiled, compile_s=compile_s, init_fn=init_fn, state_sh=state_sh,
                frozen_sh=frozen_sh, batch_sh=batch_sh, flops=_cost(compiled.cost_analysis()),
                mem=_memory(compiled.memory_analysis()))


def _cost(ca) -> float:
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def gpu_flops(s: Setup) -> float:
    """FLOPs of the same step lowered for GPU (unsharded, not compiled): XLA:CPU runs SD-length
    attention as a loop (lcm_jax.models.attention) whose body its cost analysis counts once."""
    fn = functools.partial(distill.train_step, spec=s.spec, models=s.models, tx=s.tx)
    abstract = jax.eval_shape(functools.partial(train_state.init_state, tx=s.tx, seed=0), s.params)
    sds = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)  # noqa: E731
    try:
        return _cost(jax.jit(fn).trace(abstract, sds(s.batch), sds(s.frozen))
                     .lower(lowering_platforms=("cuda",)).cost_analysis())
    except Exception as e:  # noqa: BLE001 -- reported in the table as n/a
        print(f"  (GPU lowering for the FLOP count failed: {type(e).__name__}: {e})")
        return float("nan")


def _memory(m) -> dict:
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "temp", "alias")}
    out["total"] = out["argument"] + out["output"] + out["temp"]
    return out


def start_state(s: Setup, c: dict, mesh):
    params = sharding.put(s.params, sharding.tree_shardings(s.params, mesh))
    state = jax.jit(c["init_fn"], out_shardings=c["state_sh"])(params)
    frozen = sharding.put(s.frozen, c["frozen_sh"])
    batch = sharding.global_batch(s.batch, mesh)
    return state, frozen, batch


# --------------------------------------------------------------------------- PyTorch: the diffusers script

class TorchLCD:
    """diffusers' train_lcm_distill_sd_wds.py loop body (steps 2-12) on tiny diffusers UNets
    matching lcm_jax.tiny.tiny_configs, fed cached latents and prompt embeddings."""

    def __init__(self, config, batch: dict, uncond: np.ndarray):
        import torch
        from diffusers import DDPMScheduler, UNet2DConditionModel as TorchUNet
        self.torch, self.config = torch, config
        kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8)
        torch.manual_seed(0)
        self.teacher = TorchUNet(**kw).eval().requires_grad_(False)
        self.unet = TorchUNet(**kw, time_cond_proj_dim=config.time_cond_proj_dim).train()
        self.unet.load_state_dict(self.teacher.state_dict(), strict=False)
        self.target = copy.deepcopy(self.unet).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=config.learning_rate,
                                     betas=(config.adam_b1, config.adam_b2), eps=config.adam_eps,
                                     weight_decay=config.weight_decay)
        sched = DDPMScheduler.from_config(SD_SCHEDULER)
        self.sched = sched
        ac = sched.alphas_cumprod
        self.alpha, self.sigma = ac.sqrt(), (1 - ac).sqrt()
        n = config.lcd.num_ddim_timesteps
        self.topk = 1000 // n
        ddim_t = (np.arange(1, n + 1) * self.topk).round().astype(np.int64) - 1
        self.ddim_t = torch.from_numpy(ddim_t)
        self.ddim_prev = torch.from_numpy(np.asarray([ac[0].item()] + ac.numpy()[ddim_t[:-1]].tolist()))
        self.mean, self.logvar = torch.from_numpy(batch["latent_mean"]), torch.from_numpy(batch["latent_logvar"])
        self.cond = torch.from_numpy(batch["prompt_embeds"])
        self.uncond = torch.from_numpy(uncond).expand_as(self.cond)

    def _scalings(self, t, sigma_data=0.5, scaling=10.0):
        s = scaling * t
        return (sigma_data ** 2 / (s ** 2 + sigma_data ** 2)).view(-1, 1, 1, 1), \
            (s / (s ** 2 + sigma_data ** 2) ** 0.5).view(-1, 1, 1, 1)

    def _x0(self, out, t, z):
        return (z - self.sigma[t].view(-1, 1, 1, 1) * out) / self.alpha[t].view(-1, 1, 1, 1)

    def _w_emb(self, w, dim):
        torch = self.torch
        w = w * 1000.0
        half = dim // 2
        e = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        e = w[:, None] * e[None, :]
        return torch.cat([torch.sin(e), torch.cos(e)], dim=1)

    def step(self) -> float:
        torch, c = self.torch, self.config
        latents = (self.mean + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mean)) * 0.18215
        bsz = latents.shape[0]
        noise = torch.randn_like(latents)
        index = torch.randint(0, c.lcd.num_ddim_timesteps, (bsz,)).long()
        start_t = self.ddim_t[index]
        t = torch.clamp(start_t - self.topk, min=0)
        cs_start, co_start = self._scalings(start_t)
        cs, co = self._scalings(t)
        z = self.sched.add_noise(latents, noise, start_t)
        w = (c.lcd.omega_max - c.lcd.omega_min) * torch.rand((bsz,)) + c.lcd.omega_min
        w_emb = self._w_emb(w, c.time_cond_proj_dim)
        w = w.view(-1, 1, 1, 1)
        pred = self.unet(z, start_t, timestep_cond=w_emb, encoder_hidden_states=self.cond).sample
        model_pred = cs_start * z + co_start * self._x0(pred, start_t, z)
        with torch.no_grad():
            cond_out = self.teacher(z, start_t, encoder_hidden_states=self.cond).sample
            uncond_out = self.teacher(z, start_t, encoder_hidden_states=self.uncond).sample
            x0 = self._x0(cond_out, start_t, z) + w * (self._x0(cond_out, start_t, z) - self._x0(uncond_out, start_t, z))
            eps = cond_out + w * (cond_out - uncond_out)
            prev = self.ddim_prev[index].view(-1, 1, 1, 1).float()
            x_prev = prev.sqrt() * x0 + (1 - prev).sqrt() * eps
            tgt = self.target(x_prev, t, timestep_cond=w_emb, encoder_hidden_states=self.cond).sample
            target = cs * x_prev + co * self._x0(tgt, t, x_prev)
        loss = torch.nn.functional.mse_loss(model_pred.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # the script's update_ema(target_unet.parameters(), unet.parameters(), decay)
            for tp, p in zip(self.target.parameters(), self.unet.parameters()):
                tp.detach().mul_(c.lcd.ema_decay).add_(p, alpha=1 - c.lcd.ema_decay)
        return loss.item()


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
        mesh = sharding.make_mesh(dict(data=n, fsdp=1, tensor=1), jax.devices()[:n])
        c = compile_step(s, mesh)
        state, frozen, batch = start_state(s, c, mesh)
        runs[name] = dict(c=c, state=state, frozen=frozen, batch=batch, times=[])
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
    out["_state_sh"] = runs["jax-1dev"]["c"]["state_sh"]
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
        c = compile_step(s, mesh)
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


def part_memory() -> dict:
    """Bytes per device of params / Adam moments / EMA for the SD student, data=8 vs fsdp=8."""
    s = make_setup("sd", abstract=True)
    abstract = jax.eval_shape(functools.partial(train_state.init_state, tx=s.tx, seed=0), s.params)
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
        out[name] = dict(totals, teacher=teacher, full=full, xla=_memory(xla.memory_analysis()).get("argument", 0))
    out["_n_params"] = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.params))
    return out


def print_memory(res: dict) -> None:
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
            saves.append(_t(lambda i=i: (ck.save(i + 1, state, {"position": i}, config_dict, force=True), ck.wait())))
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
    return Setup(config, s.models._replace(student=teacher), distill.DistillSpec.from_config(config),
                 train_state.make_optimizer(config, None), params, s.frozen, s.batch)


def part_lora(repeats: int, rank: int = 8) -> dict:
    """Tiny LCD vs tiny LCM-LoRA (rank ``rank``) steps, interleaved on 1 device; LoRA sizes at rank 64."""
    full = make_setup("tiny")
    runs = {"full LCD": full, f"LCM-LoRA r={rank}": lora_setup(full, rank)}
    mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    out = {}
    for name, s in runs.items():
        c = compile_step(s, mesh)
        state, frozen, batch = start_state(s, c, mesh)
        n_state = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
        n_trained = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(s.params))
        out[name] = dict(c=c, state=state, frozen=frozen, batch=batch, times=[], n_state=n_state, n_trained=n_trained)
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="tiny,sd,memory,ckpt", help="comma list of tiny, sd, memory, ckpt, lora")
    ap.add_argument("--repeats", type=int, default=15, help="timed tiny steps per side (interleaved)")
    ap.add_argument("--sd-variants", default="float32:none,bfloat16:none,bfloat16:block",
                    help="dtype:remat pairs for the SD-size compile")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    print(f"jax {jax.__version__}, {jax.device_count()} CPU devices, {os.cpu_count()} cores", flush=True)
    if "tiny" in parts or "ckpt" in parts:
        tiny = part_tiny(args.repeats)
        if "tiny" in parts:
            print_tiny(tiny)
        if "ckpt" in parts:
            print_ckpt(part_ckpt(tiny["_state"], tiny["_state_sh"], tiny["_config"]))
    if "memory" in parts:
        print_memory(part_memory())
    if "sd" in parts:
        print_sd(part_sd(args.sd_variants.split(","), run_steps=False))
    if "lora" in parts:
        print_lora(part_lora(args.repeats))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
