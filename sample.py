"""Sample a diffusers-layout pipeline folder (an LCM or its teacher) into a PNG grid.

    python sample.py --pretrained=DIR --prompt "a photo of a cat" [--prompt ...] \
        [--prompts_file prompts.txt] --steps 4 --guidance 8 --scheduler lcm --seed 0 \
        --num_images 4 --batch_size 8 --out grid.png --save_npz samples.npz

The grid has one row per prompt and --num_images columns. Images are made --batch_size at a
time (prompt-major order; the last batch is padded so one compiled function serves all) and
batch i uses seed --seed + i, so a run is reproducible for a fixed --batch_size.
--save_npz writes `images` (uint8 [N, H, W, 3]) and `prompts` (the prompt of each image).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
from absl import app, flags

_PRETRAINED = flags.DEFINE_string("pretrained", None, "diffusers-layout pipeline folder (e.g. WORKDIR/final)")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "a prompt; repeat for several")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "text file, one prompt per line (blank lines skipped)")
_STEPS = flags.DEFINE_integer("steps", 4, "number of sampling steps")
_GUIDANCE = flags.DEFINE_float("guidance", 8.0, "guidance scale (LCM: embedded as w - 1; teachers: CFG)")
_SCHEDULER = flags.DEFINE_string("scheduler", "lcm", "lcm, mlcd (multistep consistency: --steps = the student's "
                                 "lcd.num_segments), ddim, dpm or dpm++")
_SEED = flags.DEFINE_integer("seed", 0, "batch i uses seed + i")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "images per prompt (grid columns)")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "images per pipeline call")
_HEIGHT = flags.DEFINE_integer("height", None, "image height (default: the UNet's sample_size x VAE factor)")
_WIDTH = flags.DEFINE_integer("width", None, "image width (default: as height)")
_DTYPE = flags.DEFINE_string("dtype", "float32", "float32 or bfloat16 compute")
_OUT = flags.DEFINE_string("out", "grid.png", "PNG grid to write")
_SAVE_NPZ = flags.DEFINE_string("save_npz", None, "optional .npz with `images` and `prompts`")
_VERBOSE = flags.DEFINE_bool("verbose", False, "full tracebacks for user errors (a bad path, file or value)")
_MESH = flags.DEFINE_string("mesh", "auto", "devices to sample over: auto (every local GPU/TPU on the data axis; "
                            "CPU: one), none (one device) or sizes, e.g. data=8 or data=2,fsdp=4")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", None, "JAX's persistent compilation cache folder, or 'off' "
                                     "(default: $LCM_JAX_COMPILE_CACHE, $JAX_COMPILATION_CACHE_DIR, else "
                                     "~/.cache/lcm_jax/jax)")

from lcm_jax.errors import UserError, run_cli  # noqa: E402  (light: no jax)


class SampleError(UserError, ValueError):
    """A bad command line: reported as one line before any model is loaded."""


@dataclasses.dataclass(frozen=True)
class SampleArgs:
    pretrained: Optional[str]
    prompts: Sequence[str] = ()
    prompts_file: Optional[str] = None
    steps: int = 4
    guidance: float = 8.0
    scheduler: str = "lcm"
    seed: int = 0
    num_images: int = 1
    batch_size: int = 8
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: str = "float32"
    out: str = "grid.png"
    save_npz: Optional[str] = None
    mesh: str = "auto"


def parse_mesh(value: str):
    """--mesh: "auto" (every local accelerator on the data axis; CPU: one device), "none" (one device)
    or sizes "data=8" / "data=2,fsdp=4" (axes left out are 1; one may be -1, the rest)."""
    import jax
    from lcm_jax import sharding
    if value in ("auto", "none"):
        return None if value == "none" else "auto"
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    try:
        for part in value.split(","):
            axis, size = part.split("=")
            if axis.strip() not in sizes:
                raise ValueError(axis)
            sizes[axis.strip()] = int(size)
        return sharding.make_mesh(sizes)
    except ValueError as e:
        raise SampleError(f"--mesh={value!r}: expected auto, none or sizes like data=8 or data=2,fsdp=4 "
                          f"over the {len(jax.devices())} devices ({e})") from e


def read_prompts(prompts: Sequence[str], prompts_file: Optional[str]) -> list[str]:
    """The --prompt values, then the non-blank lines of --prompts_file."""
    from lcm_jax.data.teacher_data import read_prompt_file
    out = list(prompts)
    if prompts_file is not None:
        try:
            out += read_prompt_file(prompts_file)
        except (OSError, UnicodeDecodeError) as e:
            raise SampleError(f"cannot read --prompts_file {prompts_file!r}: {e}") from e
    if not out:
        raise SampleError("no prompts: give --prompt \"...\" (repeatable) and/or --prompts_file "
                          "(one prompt per line)")
    return out


def _check_output(path: str, flag: str, suffix: str) -> None:
    """The exact file must be writable now, so no sampling is lost at the end: opened for append
    (an existing file is not changed), and removed again if it did not exist."""
    if not path.lower().endswith(suffix):
        raise SampleError(f"--{flag}={path!r} must end in {suffix}")
    if os.path.isdir(path):
        raise SampleError(f"--{flag}={path!r} is a folder, expected a {suffix} file path")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise SampleError(f"--{flag}={path!r}: cannot create its folder {parent!r}: {e}") from e
    existed = os.path.exists(path)
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise SampleError(f"--{flag}={path!r} cannot be written ({e.strerror or e}): expected a writable {suffix} "
                          "path") from e
    if not existed:
        os.remove(path)


def check_args(args: SampleArgs) -> list[str]:
    """Validate everything that can be checked without loading a model; returns the prompts."""
    from lcm_jax import component_config, pipeline, pipeline_folder, sampling
    from lcm_jax.models.params import DTYPES
    from lcm_jax.models.vae import VAEConfig
    from lcm_jax.schedules import NoiseSchedule

    if not args.pretrained:
        raise SampleError("--pretrained is required: a diffusers-layout pipeline folder")
    try:
        pipeline_folder.check_pipeline_folder(args.pretrained)
    except FileNotFoundError as e:
        raise SampleError(f"--pretrained: {e}") from e
    if args.scheduler not in sampling.SCHEDULERS:
        raise SampleError(f"--scheduler={args.scheduler!r} is not supported: expected one of "
                          f"{', '.join(sampling.SCHEDULERS)}")
    if args.dtype not in DTYPES:
        raise SampleError(f"--dtype={args.dtype!r} is not supported: expected one of {', '.join(DTYPES)}")
    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise SampleError(f"--{name}={getattr(args, name)} must be >= 1")
    try:
        sched = NoiseSchedule.from_scheduler_config(
            component_config.read_config(os.path.join(args.pretrained, "scheduler"), "scheduler_config.json"))
        factor = VAEConfig.from_diffusers_config(
            component_config.read_config(os.path.join(args.pretrained, "vae"))).downsample_factor
        unet = component_config.read_config(os.path.join(args.pretrained, "unet"))
        is_lcm = unet.get("time_cond_proj_dim") is not None
        guidance_range = pipeline_folder.read_guidance_range(args.pretrained)
    except (ValueError, FileNotFoundError) as e:  # (json errors are ValueErrors)
        raise SampleError(f"--pretrained={args.pretrained!r}: {e}") from e
    try:
        pipeline.check_guidance(args.guidance, is_lcm, guidance_range)
    except ValueError as e:
        raise SampleError(f"--guidance: {e}") from e
    if args.scheduler in sampling.CONSISTENCY_SCHEDULERS and args.steps > sched.original_inference_steps:
        raise SampleError(f"--steps={args.steps} is more than the LCM schedule's original_inference_steps="
                          f"{sched.original_inference_steps}")
    if args.steps > sched.num_train_timesteps:
        raise SampleError(f"--steps={args.steps} is more than num_train_timesteps={sched.num_train_timesteps}")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 1 or v % factor):
            raise SampleError(f"--{name}={v} must be a positive multiple of {factor} (the VAE's scale factor)")
    prompts = read_prompts(args.prompts, args.prompts_file)
    _check_output(args.out, "out", ".png")
    if args.save_npz:
        _check_output(args.save_npz, "save_npz", ".npz")
    return prompts


def batches(n: int, batch_size: int) -> list[range]:
    """Index ranges of the n images, batch_size at a time."""
    return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def generate(pipe, prompts: Sequence[str], args: SampleArgs) -> tuple[np.ndarray, list[str]]:
    """uint8 images [P * num_images, H, W, 3], prompt-major, and the prompt of each image."""
    from tqdm import tqdm

    image_prompts = [p for p in prompts for _ in range(args.num_images)]
    chunks = batches(len(image_prompts), args.batch_size)
    out = []
    for i, idx in enumerate(tqdm(chunks, desc="sampling", unit="batch", disable=len(chunks) < 2)):
        batch = [image_prompts[j] for j in idx]
        batch += [batch[-1]] * (args.batch_size - len(batch))  # same shape: no recompile
        images = pipe(batch, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      scheduler=args.scheduler, height=args.height, width=args.width, seed=args.seed + i)
        out.append(images[:len(idx)])
    return np.concatenate(out), image_prompts


def save(images: np.ndarray, image_prompts: Sequence[str], num_prompts: int, out: str,
         save_npz: Optional[str]) -> None:
    from lcm_jax.images import save_grid
    save_grid(images, num_prompts, out)  # one row per prompt
    if save_npz:
        np.savez(save_npz, images=images, prompts=np.array(image_prompts, dtype=str))


def run(args: SampleArgs) -> np.ndarray:
    """Validate, load, sample, write; returns the images."""
    from absl import logging

    prompts = check_args(args)
    from lcm_jax.pipeline import LCMPipeline
    pipe = LCMPipeline.from_pretrained(args.pretrained, dtype=args.dtype, mesh=parse_mesh(args.mesh))
    images, image_prompts = generate(pipe, prompts, args)
    save(images, image_prompts, len(prompts), args.out, args.save_npz)
    logging.info("wrote %d images (%dx%d) to %s%s", len(images), images.shape[2], images.shape[1], args.out,
                 f" and {args.save_npz}" if args.save_npz else "")
    return images


def args_from_flags() -> SampleArgs:
    return SampleArgs(
        pretrained=_PRETRAINED.value, prompts=list(_PROMPT.value), prompts_file=_PROMPTS_FILE.value,
        steps=_STEPS.value, guidance=_GUIDANCE.value, scheduler=_SCHEDULER.value, seed=_SEED.value,
        num_images=_NUM_IMAGES.value, batch_size=_BATCH_SIZE.value, height=_HEIGHT.value,
        width=_WIDTH.value, dtype=_DTYPE.value, out=_OUT.value, save_npz=_SAVE_NPZ.value, mesh=_MESH.value)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"sample.py: error: unexpected arguments {list(argv[1:])} (quote prompts: --prompt \"...\")")
    from lcm_jax import compile_cache

    def cli():
        compile_cache.enable(_COMPILE_CACHE.value)  # before anything compiles
        return run(args_from_flags())
    run_cli("sample.py", cli, _VERBOSE.value)


if __name__ == "__main__":
    app.run(main)
