"""Forward-pass speed on CPU: jitted JAX UNet / VAE decoder vs diffusers PyTorch, same weights.

For each (model, dtype): median wall time of JAX and of torch (interleaved, after a warm-up
call), torch/jax ratio, JAX trace+compile time, FLOPs from XLA's cost analysis, achieved
FLOP/s and that as a share of a plain JAX matmul's FLOP/s measured in the same run, and
max |jax - torch| of the outputs. See benchmarks/README.md.

    python -m benchmarks.unet_forward                 # small + SD-size UNet and VAE decode
    python -m benchmarks.unet_forward --quick         # no SD-size VAE, fewer repeats
    python -m benchmarks.unet_forward --sizes=small --models=unet --dtypes=float32
    python -m benchmarks.unet_forward --convs --dtypes=float32   # per-op 3x3 conv rates instead
"""
from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from absl import app, flags

from lcm_jax.models import unet as unet_lib
from lcm_jax.models import vae as vae_lib
from lcm_jax.weights import torch_to_flax

flags.DEFINE_string("models", "unet,vae", "comma list of unet, vae")
flags.DEFINE_string("sizes", "small,sd", "comma list of small, sd")
flags.DEFINE_string("dtypes", "float32,bfloat16", "comma list of float32, bfloat16")
flags.DEFINE_integer("repeats", None, "timed calls per (model, dtype) after one warm-up (default: small 5, "
                     "SD UNet 3, SD VAE 1; --quick: 3, 2, skipped)")
flags.DEFINE_bool("quick", False, "skip the SD-size VAE decode; fewer repeats")
flags.DEFINE_float("torch_budget", 600.0, "skip a torch run whose estimated time (XLA FLOPs / torch's measured "
                   "3x3-conv FLOP/s in that dtype) exceeds this many seconds, and print the estimate (~)")
flags.DEFINE_bool("convs", False,
                  "print GFLOP/s of SD's 3x3 convs (XLA conv, im2col + dot, torch) instead of the models")
FLAGS = flags.FLAGS

DTYPES = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}

# diffusers' default UNet2DConditionModel is SD1.5's, except cross_attention_dim (768 in SD1.5).
UNET_SPECS = {
    "sd": dict(torch_kwargs=dict(cross_attention_dim=768, sample_size=64), latent=64, text=(77, 768)),
    "small": dict(torch_kwargs=dict(block_out_channels=(128, 256), layers_per_block=1,
                                    cross_attention_dim=256, sample_size=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
                  latent=32, text=(77, 256)),
}
_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAE_SPECS = {
    "sd": dict(torch_kwargs=_SD_VAE, latent=64),  # 64x64 latents -> 512x512 image
    "small": dict(torch_kwargs=dict(block_out_channels=(64, 128), layers_per_block=1, latent_channels=4,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2),
                  latent=32),  # -> 64x64 image
}


@dataclasses.dataclass
class Case:
    """One model at one size: the torch module, its JAX twin's apply and float32 params, inputs."""

    name: str
    torch_model: torch.nn.Module
    torch_fn: Callable[..., torch.Tensor]  # (model, *inputs) -> output
    jax_fn: Callable[[jnp.dtype], Callable]  # compute dtype -> (params, *inputs) -> output
    params: Any  # float32 numpy tree
    inputs: tuple  # numpy arrays (float32 or int)


def _torch_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def unet_case(size: str) -> Case:
    from diffusers import UNet2DConditionModel as TorchUNet
    spec = UNET_SPECS[size]
    torch.manual_seed(0)
    tm = TorchUNet(**spec["torch_kwargs"]).eval()
    cfg = unet_lib.UNetConfig.from_diffusers_config(dict(tm.config))
    rng = np.random.default_rng(0)
    n = spec["latent"]
    inputs = (rng.standard_normal((1, 4, n, n), dtype=np.float32), np.array([500], np.int64),
              rng.standard_normal((1,) + spec["text"], dtype=np.float32))

    def jax_fn(dtype):
        model = unet_lib.UNet2DConditionModel(cfg, dtype=dtype)
        return lambda p, x, t, c: model.apply({"params": p}, x, t, c)

    shapes = jax.eval_shape(unet_lib.UNet2DConditionModel(cfg).init, jax.random.PRNGKey(0), *inputs)
    params, _ = torch_to_flax(_torch_state(tm), shapes["params"])
    return Case(f"unet-{size}", tm, lambda m, x, t, c: m(x, t, c).sample, jax_fn, params, inputs)


def vae_case(size: str) -> Case:
    from diffusers import AutoencoderKL
    spec = VAE_SPECS[size]
    torch.manual_seed(0)
    tm = AutoencoderKL(**spec["torch_kwargs"]).eval()
    cfg = vae_lib.VAEConfig.from_diffusers_config(dict(tm.config))
    n = spec["latent"]
    inputs = (np.random.default_rng(0).standard_normal((1, cfg.latent_channels, n, n), dtype=np.float32),)

    def jax_fn(dtype):
        model = vae_lib.AutoencoderKL(cfg, dtype=dtype)
        return lambda p, z: model.apply({"params": p}, z, method=model.decode)

    shapes = jax.eval_shape(functools.partial(vae_lib.init_vae_params, vae_lib.AutoencoderKL(cfg)),
                            jax.random.PRNGKey(0))
    params, _ = torch_to_flax(_torch_state(tm), shapes)
    return Case(f"vae-decode-{size}", tm, lambda m, z: m.decode(z).sample, jax_fn, params, inputs)


# ---------------------------------------------------------------------------------- timing

def _flops(fn: Callable, *args) -> float:
    """XLA's FLOP count of ``fn(*args)``, from the program lowered for GPU (not compiled).

    On CPU, long attention runs as a loop over heads and query blocks (lcm_jax.models.attention)
    and XLA's cost analysis counts a loop body once; the GPU lowering of the same function has
    no loop, so its count covers the whole forward pass (same math, same FLOPs).
    """
    ca = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per computation
        ca = ca[0] if ca else {}
    return float((ca or {}).get("flops", float("nan")))


def _time_once(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_flops_per_s(jdtype, tdtype, n: int = 2048, repeats: int = 5) -> tuple[float, float, int]:
    """FLOP/s of an n x n @ n x n matmul in JAX and in torch (interleaved), in this dtype.

    Torch's size shrinks (down from n, by halves) while one call takes over 2 s: torch's bf16
    matmul without AVX512-BF16/AMX runs at well under 1 GFLOP/s. Returns (jax, torch, torch's n).
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)).astype(jdtype)
    f = jax.jit(jnp.matmul).lower(a, a).compile()
    f(a, a).block_until_ready()
    tn = 256
    with torch.inference_mode():
        while tn < n:
            tb = torch.randn(tn, tn).to(tdtype)
            if _time_once(lambda: tb @ tb) * 8 > 2.0:
                break
            tn *= 2
        ta = torch.from_numpy(np.array(a.astype(jnp.float32))[:tn, :tn]).to(tdtype)
        ta @ ta
        jt, tt = [], []
        for _ in range(repeats):
            jt.append(_time_once(lambda: f(a, a).block_until_ready()))
            tt.append(_time_once(lambda: ta @ ta))
    return 2.0 * n ** 3 / statistics.median(jt), 2.0 * tn ** 3 / statistics.median(tt), tn


def torch_conv_flops_per_s(tdtype, repeats: int = 3) -> float:
    """FLOP/s of a 3x3 128->128 conv on 32x32 in torch: the estimate behind --torch_budget."""
    x = torch.randn(1, 128, 32, 32).to(tdtype)
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(tdtype)
    with torch.inference_mode():
        conv(x)
        t = statistics.median(_time_once(lambda: conv(x)) for _ in range(repeats))
    return 2.0 * 128 * 128 * 9 * 32 * 32 / t


# SD's 3x3 convs (map side, in, out): the UNet's four levels (and their up-block concat widths),
# then the VAE decoder's. The rates behind resnet.py's CPU im2col rule.
CONV_SHAPES = ((8, 1280, 1280), (8, 2560, 1280), (16, 1280, 1280), (16, 2560, 1280), (32, 640, 640),
               (32, 1280, 640), (64, 320, 320), (64, 640, 320), (64, 512, 512), (128, 512, 512),
               (256, 256, 256), (512, 128, 128))


def conv_rates(jdtype, tdtype, hw: int, cin: int, cout: int, repeats: int = 3) -> tuple[float, float, float]:
    """FLOP/s of one 3x3 stride-1 conv on a [1, hw, hw, cin] map: XLA's conv, the im2col + dot of
    ``resnet._im2col_conv3x3`` (called directly, whatever the platform rule), torch's conv2d."""
    from jax import lax
    from lcm_jax.models.resnet import _im2col_conv3x3
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, hw, hw, cin), dtype=np.float32)
    w = rng.standard_normal((3, 3, cin, cout), dtype=np.float32)
    xj, wj = jnp.asarray(x).astype(jdtype), jnp.asarray(w).astype(jdtype)
    conv = jax.jit(functools.partial(lax.conv_general_dilated, window_strides=(1, 1), padding=((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")))
    im2col = jax.jit(_im2col_conv3x3)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdtype)
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).to(tdtype)
    fns = (lambda: conv(xj, wj).block_until_ready(), lambda: im2col(xj, wj).block_until_ready(),
           lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
    flops = 2.0 * hw * hw * cin * cout * 9
    with torch.inference_mode():
        for fn in fns:
            fn()
        times = [[], [], []]
        for _ in range(repeats):  # interleaved
            for t, fn in zip(times, fns):
                t.append(_time_once(fn))
    return tuple(flops / statistics.median(t) for t in times)


def run_case(case: Case, dtype_name: str, repeats: int, matmul_rate: float, torch_budget_s: float,
             torch_conv_rate: float) -> dict:
    jdtype, tdtype = DTYPES[dtype_name]
    # Same values on both sides: inputs rounded to the compute dtype; params cast before the call.
    inputs = tuple(np.asarray(jnp.asarray(x).astype(jdtype).astype(jnp.float32)) if x.dtype == np.float32
                   else x for x in case.inputs)
    params = jax.tree.map(lambda p: jnp.asarray(p, jdtype), case.params)
    jinputs = tuple(jnp.asarray(x, jdtype) if x.dtype == np.float32 else jnp.asarray(x) for x in inputs)
    fn = case.jax_fn(jdtype)
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, *jinputs).compile()
    compile_s = time.perf_counter() - t0
    flops = _flops(fn, params, *jinputs)
    run_jax = lambda: compiled(params, *jinputs).block_until_ready()  # noqa: E731

    tmodel = case.torch_model.to(tdtype)
    tinputs = tuple(torch.from_numpy(np.array(x)).to(tdtype) if x.dtype == np.float32 else torch.from_numpy(x)
                    for x in inputs)
    est_torch_s = flops / torch_conv_rate
    skip_torch = est_torch_s > torch_budget_s

    def run_torch():
        with torch.inference_mode():
            return case.torch_fn(tmodel, *tinputs)

    out = np.asarray(compiled(params, *jinputs), np.float32)  # warm-up
    ref = None if skip_torch else run_torch().float().numpy()  # warm-up
    jt, tt = [], []
    for _ in range(repeats):  # interleaved, so background load hits both alike
        jt.append(_time_once(run_jax))
        if not skip_torch:
            tt.append(_time_once(run_torch))
    jax_s = statistics.median(jt)
    torch_s = statistics.median(tt) if tt else float("nan")
    return dict(model=case.name, dtype=dtype_name, jax_s=jax_s, torch_s=torch_s,
                torch_est_s=est_torch_s if skip_torch else None, compile_s=compile_s, flops=flops,
                flops_per_s=flops / jax_s, matmul_share=flops / jax_s / matmul_rate,
                max_abs_diff=float(np.max(np.abs(out - ref))) if ref is not None else float("nan"),
                max_abs_ref=float(np.max(np.abs(ref))) if ref is not None else float("nan"), repeats=repeats)


def _fmt_row(r: dict) -> str:
    torch_s = f"{r['torch_s']:8.3f}" if r["torch_est_s"] is None else f"~{r['torch_est_s']:7.0f}"
    ratio = r["torch_s"] / r["jax_s"] if r["torch_est_s"] is None else r["torch_est_s"] / r["jax_s"]
    ratio_s = f"{ratio:6.2f}" if r["torch_est_s"] is None else f"~{ratio:5.0f}"
    return (f"{r['model']:<16} {r['dtype']:<8} {r['repeats']:>2} {r['jax_s']:8.3f} {torch_s} {ratio_s} "
            f"{r['compile_s']:7.1f} {r['flops'] / 1e9:8.1f} {r['flops_per_s'] / 1e9:7.1f} "
            f"{100 * r['matmul_share']:5.0f}% {r['max_abs_diff']:9.2e} {r['max_abs_ref']:8.2f}")


HEADER = (f"{'model':<16} {'dtype':<8} {'n':>2} {'jax_s':>8} {'torch_s':>8} {'t/jax':>6} {'comp_s':>7} "
          f"{'GFLOP':>8} {'GFLOP/s':>7} {'%mm':>6} {'max|diff|':>9} {'max|ref|':>8}")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32: []" on .to()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)

    import platform
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"# {cpu}, {threads} threads; jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__}"
          f"; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)

    # float32 first: torch models are cast in place, and bf16 -> fp32 would not restore the weights
    dtypes = sorted(FLAGS.dtypes.split(","), key=lambda d: d != "float32")
    rates = {}
    for d in dtypes:
        jm, tmm, tn = matmul_flops_per_s(*DTYPES[d])
        tc = torch_conv_flops_per_s(DTYPES[d][1])
        rates[d] = (jm, tc)
        print(f"# {d}: matmul jax (2048^3) {jm / 1e9:.1f} GFLOP/s, torch ({tn}^3) {tmm / 1e9:.1f} GFLOP/s; "
              f"torch 3x3 conv (128ch, 32x32) {tc / 1e9:.1f} GFLOP/s", flush=True)

    if FLAGS.convs:
        print(f"# 3x3 conv GFLOP/s (median of 3): {'map, in -> out':>22} {'xla conv':>9} {'im2col':>7} {'torch':>6}")
        for d in dtypes:
            for hw, cin, cout in CONV_SHAPES:
                rates_ = conv_rates(*DTYPES[d], hw, cin, cout)
                print(f"# {d:>8} {f'{hw}x{hw}, {cin} -> {cout}':>22} " +
                      " ".join(f"{r / 1e9:{n}.0f}" for r, n in zip(rates_, (9, 7, 6))), flush=True)
        return

    plan = []
    for m in FLAGS.models.split(","):
        for s in FLAGS.sizes.split(","):
            if m == "vae" and s == "sd" and FLAGS.quick:
                continue
            default = {"small": 3 if FLAGS.quick else 5, "sd": (2 if FLAGS.quick else 3) if m == "unet" else 1}[s]
            plan.append((m, s, FLAGS.repeats or default))
    print(HEADER, flush=True)
    for m, s, repeats in plan:
        case = {"unet": unet_case, "vae": vae_case}[m](s)
        for d in dtypes:
            r = run_case(case, d, repeats, rates[d][0], FLAGS.torch_budget, rates[d][1])
            print(_fmt_row(r), flush=True)
        del case
    print("# jax_s/torch_s: median seconds per call; t/jax: torch_s / jax_s (>1: JAX faster); comp_s: JAX "
          "trace+compile; GFLOP: XLA cost analysis (GPU lowering); %mm: GFLOP/s as a share of the JAX "
          "matmul's above; "
          "~: torch not run, estimated (see --torch_budget)")


if __name__ == "__main__":
    app.run(main)
