"""The diffusers pipeline folder: which components it holds, the checks a path gets before
anything loads, and the trainer's record of an exported LCM's guidance range."""
import json
import os
from typing import Any, Optional

from lcm_jax import component_config, weights
from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel
from lcm_jax.models.params import text_shapes

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose loaders read what we write
TRAINING_FILE = "training.json"  # the trainer's record beside an exported LCM: {"guidance_range": [lo, hi]}


def check_pipeline_folder(path: str) -> None:
    """A clear error unless ``path`` is a diffusers-layout pipeline folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"pretrained path {path!r} is not a folder: expected a diffusers-layout "
                                f"pipeline folder with {', '.join(c + '/' for c in COMPONENTS)}")
    missing = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise FileNotFoundError(f"{path!r} is not a complete pipeline folder: missing "
                                f"{', '.join(c + '/' for c in missing)} (expected {', '.join(c + '/' for c in COMPONENTS)})")
    present = [c for c in SDXL_COMPONENTS if os.path.isdir(os.path.join(path, c))]
    if present and len(present) < len(SDXL_COMPONENTS):
        absent = [c for c in SDXL_COMPONENTS if c not in present]
        raise FileNotFoundError(f"{path!r} has {', '.join(c + '/' for c in present)} but is missing "
                                f"{', '.join(c + '/' for c in absent)}: an SDXL pipeline folder needs both "
                                f"{' and '.join(c + '/' for c in SDXL_COMPONENTS)}")


def read_guidance_range(path: str) -> Optional[tuple[float, float]]:
    """The trained w range a pipeline folder records (TRAINING_FILE), or None."""
    if not os.path.isfile(os.path.join(path, TRAINING_FILE)):
        return None
    record = component_config.read_config(path, TRAINING_FILE)
    lo_hi = record.get("guidance_range")
    if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi)):
        raise component_config.ConfigFileError(f"{os.path.join(path, TRAINING_FILE)}: guidance_range {lo_hi!r}, "
                                               "expected [lo, hi]")
    return float(lo_hi[0]), float(lo_hi[1])


def load_text_encoder(folder: str, dtype: Any) -> tuple[CLIPTextModel, Any]:
    source = os.path.join(folder, "config.json")
    te = CLIPTextModel(CLIPTextConfig.from_transformers_config(component_config.read_config(folder), source),
                       dtype=dtype)
    params, _ = weights.load_params(folder, text_shapes(te))
    return te, params


def read_force_zeros(path: str) -> bool:
    """SDXL's force_zeros_for_empty_prompt from model_index.json (diffusers' default: True)."""
    index = os.path.join(path, "model_index.json")
    index = component_config.read_config(path, "model_index.json") if os.path.isfile(index) else {}
    return bool(index.get("force_zeros_for_empty_prompt", True))


def write_folder_index(out_dir: str, scheduler_config: dict, is_lcm: bool, is_sdxl: bool,
                       force_zeros_for_empty_prompt: bool = True,
                       guidance_range: Optional[tuple[float, float]] = None) -> None:
    """scheduler/scheduler_config.json, model_index.json and (an LCM's trained w range) TRAINING_FILE,
    as diffusers' own pipelines read them: LatentConsistencyModelPipeline for an LCM UNet,
    StableDiffusionPipeline otherwise; StableDiffusionXLPipeline for SDXL, with an LCMScheduler for
    an LCM UNet, as diffusers runs LCM-SDXL."""
    sched = dict(scheduler_config)
    sched_class = "LCMScheduler" if is_lcm else sched.get("_class_name", "DDIMScheduler")
    sched.update(_class_name=sched_class, _diffusers_version=DIFFUSERS_VERSION)
    if is_lcm:
        sched.setdefault("original_inference_steps", 50)
        sched.setdefault("timestep_scaling", 10.0)
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2, sort_keys=True)
    index = {
        "_class_name": "LatentConsistencyModelPipeline" if is_lcm else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", sched_class], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    if is_sdxl:
        del index["safety_checker"], index["requires_safety_checker"]
        index.update(_class_name="StableDiffusionXLPipeline", image_encoder=[None, None],
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    if guidance_range is not None:
        with open(os.path.join(out_dir, TRAINING_FILE), "w") as f:
            json.dump({"guidance_range": list(guidance_range)}, f, indent=2)
