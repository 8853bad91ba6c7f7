"""LCMPipeline: a diffusers-layout folder in, images out, with one jitted function per sampler.

Components (diffusers layout): unet/ vae/ text_encoder/ tokenizer/ scheduler/ (+ model_index.json);
an SDXL folder adds text_encoder_2/ tokenizer_2/ (its UNet has "text_time" added conditioning).
A UNet with ``time_cond_proj_dim`` (an LCM) takes guidance through the embedding of
omega = guidance_scale - 1 and runs no CFG batch; a plain UNet runs classifier-free guidance.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import component_config, lora, sampling, weights
from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel, load_tokenizer, tokenize
from lcm_jax.models.embeddings import TimestepEmbedding, guidance_embedding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.schedules import NoiseSchedule, lcm_timesteps, mlcd_timesteps

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
SCHEDULERS = ("lcm", "mlcd", "ddim", "dpm", "dpm++")
CONSISTENCY_SCHEDULERS = ("lcm", "mlcd")  # the student samplers (the others: the teacher's, with CFG)
OUTPUT_TYPES = ("uint8", "np", "latent")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers whose loaders read what we write
TRAINING_FILE = "training.json"  # the trainer's record beside an exported LCM: {"guidance_range": [lo, hi]}


def resolve_dtype(dtype: Union[str, Any]) -> Any:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported: expected one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


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


def check_guidance(guidance_scale: float, embeds_guidance: bool,
                   guidance_range: Optional[tuple[float, float]] = None) -> None:
    """A clear error for a guidance scale no sampler means, a warning outside the trained range.

    ``embeds_guidance``: an LCM UNet, which takes omega = w - 1 through its embedding; its
    ``guidance_range`` (w) is what it was trained on, when its folder records it. Otherwise w is
    CFG's scale: 1 (or 0, as diffusers' guidance-free pipelines pass it) means no guidance.
    """
    w = float(guidance_scale)
    if not np.isfinite(w):
        raise ValueError(f"guidance_scale={w}: expected a finite number")
    if not embeds_guidance:
        if w != 0.0 and w < 1.0:
            raise ValueError(f"guidance_scale={w}: classifier-free guidance needs w >= 1 (1, or 0, means none)")
        return
    trained = ("" if guidance_range is None
               else f" (this LCM was trained on w in [{guidance_range[0]:g}, {guidance_range[1]:g}])")
    if w < min(1.0, guidance_range[0] if guidance_range else 1.0):
        raise ValueError(f"guidance_scale={w}: an LCM embeds omega = w - 1, expected w >= 1{trained}")
    if guidance_range is not None and not guidance_range[0] <= w <= guidance_range[1]:
        logging.warning("guidance_scale=%g is outside the range this LCM was trained on, w in [%g, %g]",
                        w, *guidance_range)


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


def _init_shapes(module, *args, method=None):
    """Param shapes of ``module`` without allocating (for strict weight loading)."""
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args, method=method))["params"]


def unet_shapes(unet: UNet2DConditionModel) -> Any:
    cfg = unet.config
    f = 2 ** (len(cfg.block_out_channels) - 1)
    cross = cfg.cross_attention_dims[0]
    cond = None if cfg.time_cond_proj_dim is None else jnp.zeros((1, cfg.time_cond_proj_dim))
    return _init_shapes(unet, jnp.zeros((1, cfg.in_channels, f, f)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1, 1, cross)), cond)


def vae_shapes(vae: AutoencoderKL) -> Any:
    size = 2 * vae.config.downsample_factor
    return _init_shapes(vae, jnp.zeros((1, vae.config.in_channels, size, size)))


def text_shapes(te: CLIPTextModel) -> Any:
    return _init_shapes(te, jnp.zeros((1, 1), jnp.int32))


def _load_text_encoder(folder: str, dtype: Any) -> tuple[CLIPTextModel, Any]:
    source = os.path.join(folder, "config.json")
    te = CLIPTextModel(CLIPTextConfig.from_transformers_config(component_config.read_config(folder), source),
                       dtype=dtype)
    params, _ = weights.load_params(folder, text_shapes(te))
    return te, params


def sdxl_time_ids(height: int, width: int, n: int, original_size: Optional[tuple[int, int]] = None,
                  crops_coords_top_left: tuple[int, int] = (0, 0),
                  target_size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """SDXL's size/crop micro-conditioning, float32 [n, 6] = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w); by default the output size and no crop (diffusers' _get_add_time_ids)."""
    ids = (tuple(original_size or (height, width)) + tuple(crops_coords_top_left)
           + tuple(target_size or (height, width)))
    return np.tile(np.asarray(ids, np.float32), (n, 1))


@dataclasses.dataclass
class LCMPipeline:
    """Params are plain pytrees; the modules are stateless Flax definitions."""

    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: CLIPTextModel
    text_params: Any
    tokenizer: Any
    scheduler_config: dict
    dtype: Any = jnp.float32
    # SDXL: the second text encoder (CLIPTextModelWithProjection) and its tokenizer; CFG's
    # unconditional embeddings are zeros when force_zeros_for_empty_prompt (diffusers' default).
    text_encoder_2: Optional[CLIPTextModel] = None
    text_params_2: Any = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = True
    guidance_range: Optional[tuple[float, float]] = None  # an LCM's trained w range (TRAINING_FILE), if known
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    # LoRA adapters (lcm_jax.lora trees, alpha folded in): name -> tree; the active ones and
    # their strengths (merged inside the jitted sampler unless fused); name -> scale fused
    # into unet_params. Methods replace these dicts, never mutate them (dataclasses.replace shares them).
    _lora: dict = dataclasses.field(default_factory=dict, repr=False)
    _lora_weights: dict = dataclasses.field(default_factory=dict, repr=False)
    _lora_fused: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        """An SDXL UNet needs the second text encoder, and the added conditioning's width must
        add up (the check diffusers' _get_add_time_ids makes at every call)."""
        cfg = self.unet.config
        if (cfg.addition_embed_type == "text_time") != self.is_sdxl:
            raise ValueError(f"the UNet has addition_embed_type={cfg.addition_embed_type!r} but text_encoder_2 is "
                             f"{'given' if self.is_sdxl else 'missing'}: SDXL needs both, SD1/SD2 neither")
        if not self.is_sdxl:
            return
        te2 = self.text_encoder_2.config
        if not te2.with_projection or self.tokenizer_2 is None:
            raise ValueError("SDXL needs text_encoder_2 to be a CLIPTextModelWithProjection and a tokenizer_2")
        width = 6 * cfg.addition_time_embed_dim + te2.projection_dim
        if width != cfg.projection_class_embeddings_input_dim:
            raise ValueError(f"6 time ids x addition_time_embed_dim {cfg.addition_time_embed_dim} + text_encoder_2 "
                             f"projection_dim {te2.projection_dim} = {width}, but the UNet's "
                             f"projection_class_embeddings_input_dim is {cfg.projection_class_embeddings_input_dim}")

    # ------------------------------------------------------------------ loading / saving

    @classmethod
    def from_pretrained(cls, path: str, dtype: Union[str, Any] = "float32", *,
                        unet_overrides: Optional[dict] = None,
                        zero_init_cond_proj: bool = True) -> "LCMPipeline":
        """Load a diffusers-layout folder. ``unet_overrides`` (e.g. ``{"time_cond_proj_dim": 256}``)
        builds a student from a teacher: params the file lacks because of the override (only
        ``time_embedding/cond_proj``) are initialised, zero by default; anything else is strict."""
        dtype = resolve_dtype(dtype)
        check_pipeline_folder(path)
        unet_cfg = component_config.read_config(os.path.join(path, "unet"))
        unet_cfg = UNetConfig.from_diffusers_config({**unet_cfg, **(unet_overrides or {})},
                                                    os.path.join(path, "unet", "config.json"))
        unet = UNet2DConditionModel(unet_cfg, dtype=dtype, zero_init_cond_proj=zero_init_cond_proj)
        new_cond_proj = [("time_embedding", "cond_proj", "kernel")] if unet_overrides else []
        unet_params, missing = weights.load_params(os.path.join(path, "unet"), unet_shapes(unet),
                                                   allow_missing=new_cond_proj)
        if missing:
            unet_params["time_embedding"]["cond_proj"] = init_cond_proj(unet_cfg, zero_init_cond_proj)

        vae = AutoencoderKL(VAEConfig.from_diffusers_config(component_config.read_config(os.path.join(path, "vae")),
                                                            os.path.join(path, "vae", "config.json")), dtype=dtype)
        vae_params, _ = weights.load_params(os.path.join(path, "vae"), vae_shapes(vae))
        text_encoder, text_params = _load_text_encoder(os.path.join(path, "text_encoder"), dtype)
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
        sdxl = {}
        if os.path.isdir(os.path.join(path, "text_encoder_2")):
            te2, params2 = _load_text_encoder(os.path.join(path, "text_encoder_2"), dtype)
            index = os.path.join(path, "model_index.json")
            index = component_config.read_config(path, "model_index.json") if os.path.isfile(index) else {}
            sdxl = dict(text_encoder_2=te2, text_params_2=params2,
                        tokenizer_2=load_tokenizer(os.path.join(path, "tokenizer_2")),
                        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
        sched = component_config.read_config(os.path.join(path, "scheduler"), "scheduler_config.json")
        NoiseSchedule.from_scheduler_config(sched)  # validate now, not at the first call
        return cls(unet, unet_params, vae, vae_params, text_encoder, text_params, tokenizer, sched, dtype, **sdxl,
                   guidance_range=read_guidance_range(path))

    def with_unet(self, unet: UNet2DConditionModel, unet_params: Any,
                  guidance_range: Optional[tuple[float, float]] = None) -> "LCMPipeline":
        """This pipeline (VAE, text encoders, tokenizers, scheduler) with another UNet and its params,
        e.g. a student in training, and that UNet's trained guidance range. The compiled programs are
        shared: a sampler compiled for one UNet definition serves every pipeline derived from the same
        one (params are its arguments), so a student sampled every N steps compiles each sampler once.
        LoRA adapters belong to the old UNet and are not carried over."""
        return dataclasses.replace(self, unet=unet.clone(remat="none"), unet_params=unet_params,
                                   guidance_range=guidance_range, _lora={}, _lora_weights={}, _lora_fused={})

    @property
    def is_lcm(self) -> bool:
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def save_pretrained(self, out_dir: str, unet_params: Any = None) -> None:
        """Write a folder diffusers' own pipelines load (LatentConsistencyModelPipeline for an
        LCM UNet, StableDiffusionPipeline otherwise; StableDiffusionXLPipeline for SDXL, with an
        LCMScheduler for an LCM UNet, as diffusers runs LCM-SDXL)."""
        os.makedirs(out_dir, exist_ok=True)
        weights.save_params(os.path.join(out_dir, "unet"), self.unet_params if unet_params is None else unet_params,
                            self.unet.config.to_diffusers_config(), "diffusion_pytorch_model")
        weights.save_params(os.path.join(out_dir, "vae"), self.vae_params, self.vae.config.to_diffusers_config(),
                            "diffusion_pytorch_model")
        weights.save_params(os.path.join(out_dir, "text_encoder"), self.text_params,
                            self.text_encoder.config.to_transformers_config(), "model")
        self.tokenizer.save_pretrained(os.path.join(out_dir, "tokenizer"))
        if self.is_sdxl:
            weights.save_params(os.path.join(out_dir, "text_encoder_2"), self.text_params_2,
                                self.text_encoder_2.config.to_transformers_config(), "model")
            self.tokenizer_2.save_pretrained(os.path.join(out_dir, "tokenizer_2"))
        sched = dict(self.scheduler_config)
        sched_class = "LCMScheduler" if self.is_lcm else sched.get("_class_name", "DDIMScheduler")
        sched.update(_class_name=sched_class, _diffusers_version=DIFFUSERS_VERSION)
        if self.is_lcm:
            sched.setdefault("original_inference_steps", 50)
            sched.setdefault("timestep_scaling", 10.0)
        os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
        with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(sched, f, indent=2, sort_keys=True)
        index = {
            "_class_name": "LatentConsistencyModelPipeline" if self.is_lcm else "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", sched_class], "safety_checker": [None, None],
            "feature_extractor": [None, None], "requires_safety_checker": False,
        }
        if self.is_sdxl:
            del index["safety_checker"], index["requires_safety_checker"]
            index.update(_class_name="StableDiffusionXLPipeline", image_encoder=[None, None],
                         text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"],
                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        with open(os.path.join(out_dir, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
        if self.guidance_range is not None:
            with open(os.path.join(out_dir, TRAINING_FILE), "w") as f:
                json.dump({"guidance_range": list(self.guidance_range)}, f, indent=2)

    # ------------------------------------------------------------------ LoRA (diffusers' names)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict: Union[str, dict],
                          adapter_name: Optional[str] = None, *, weight_name: Optional[str] = None) -> None:
        """Add a UNet LoRA: a diffusers/PEFT or kohya .safetensors file, a folder holding one
        (``weight_name``, default pytorch_lora_weights.safetensors), or a state dict. It is
        active at strength 1 and unfused (merged inside each sampling call) until ``fuse_lora``."""
        name = adapter_name or f"default_{len(self._lora)}"
        if name in self._lora:
            raise ValueError(f"adapter name {name!r} is already in use (loaded: {sorted(self._lora)})")
        tree = lora.load_lora(pretrained_model_name_or_path_or_dict, self.unet_params, weight_name)
        self._lora = {**self._lora, name: tree}
        self._lora_weights = {**self._lora_weights, name: 1.0}

    def set_adapters(self, adapter_names: Union[str, Sequence[str]],
                     adapter_weights: Union[None, float, Sequence[float]] = None) -> None:
        """Make exactly ``adapter_names`` active, with strengths ``adapter_weights`` (default 1)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None or isinstance(adapter_weights, (int, float)):
            adapter_weights = [1.0 if adapter_weights is None else adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(adapter_weights)} weights")
        unknown = [n for n in names if n not in self._lora]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(self._lora)}")
        if self._lora_fused:
            raise ValueError(f"adapters {sorted(self._lora_fused)} are fused: call unfuse_lora() first")
        self._lora_weights = {n: float(w) for n, w in zip(names, adapter_weights)}

    def fuse_lora(self, lora_scale: float = 1.0, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Merge the active adapters (or ``adapter_names``) into ``unet_params``, each at
        ``lora_scale`` x its strength; sampling then runs the plain UNet. Fused ones are skipped."""
        names = list(self._lora_weights) if adapter_names is None else list(adapter_names)
        unknown = [n for n in names if n not in self._lora]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; loaded: {sorted(self._lora)}")
        fused = dict(self._lora_fused)
        for n in names:
            if n not in fused:
                fused[n] = float(lora_scale) * self._lora_weights.get(n, 1.0)
                self.unet_params = lora.merge(self.unet_params, self._lora[n], fused[n])
        self._lora_fused = fused

    def unfuse_lora(self) -> None:
        """Subtract what ``fuse_lora`` added; the adapters stay loaded (active, unfused)."""
        for n, scale in self._lora_fused.items():
            self.unet_params = lora.unmerge(self.unet_params, self._lora[n], scale)
        self._lora_fused = {}

    def unload_lora_weights(self) -> None:
        """Drop every adapter. Fused weights stay fused, as in diffusers (fuse_lora then
        unload_lora_weights leaves a plain UNet with the LoRA baked in)."""
        self._lora, self._lora_weights, self._lora_fused = {}, {}, {}

    def save_lora_weights(self, save_directory: str, unet_lora_layers: Any = None, *,
                          alpha: Optional[float] = None, adapter_name: Optional[str] = None,
                          weight_name: str = lora.LORA_WEIGHT_NAME) -> str:
        """Write ``unet_lora_layers`` (a LoRA tree with its ``alpha``; default: the loaded
        adapter ``adapter_name``) as a diffusers ``pytorch_lora_weights.safetensors``."""
        if unet_lora_layers is None:
            if adapter_name is None and len(self._lora) != 1:
                raise ValueError(f"{len(self._lora)} adapters loaded ({sorted(self._lora)}): pass adapter_name")
            name = adapter_name or next(iter(self._lora))
            if name not in self._lora:
                raise ValueError(f"unknown adapter {name!r}; loaded: {sorted(self._lora)}")
            unet_lora_layers = self._lora[name]
        return lora.save_lora_weights(save_directory, unet_lora_layers, alpha, weight_name)

    def _unfused_lora(self) -> tuple:
        """((tree, strength), ...) the sampler merges: active adapters that are not fused."""
        return tuple((self._lora[n], jnp.float32(w)) for n, w in self._lora_weights.items()
                     if n not in self._lora_fused)

    # ------------------------------------------------------------------ conditioning

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_scheduler_config(self.scheduler_config)

    def encode_prompt(self, prompts: Sequence[str], return_pooled: bool = False
                      ) -> Union[jax.Array, tuple[jax.Array, Optional[jax.Array]]]:
        """The UNet's text conditioning [B, L, D] for the prompts (float32): the text encoder's last
        hidden states; SDXL: both encoders' penultimate hidden states concatenated (D = D1 + D2),
        as diffusers' StableDiffusionXLPipeline.encode_prompt. With ``return_pooled``:
        (embeddings, pooled [B, P]) with text_encoder_2's projected pooled output (None for SD1/SD2)."""
        encoders = [(self.text_encoder, self.text_params, self.tokenizer)]
        if self.is_sdxl:
            encoders.append((self.text_encoder_2, self.text_params_2, self.tokenizer_2))
        ids = tuple(jnp.asarray(tokenize(tok, prompts)) for _, _, tok in encoders)
        if "text" not in self._compiled:
            modules, sdxl = tuple(te for te, _, _ in encoders), self.is_sdxl

            def encode(params, ids):
                if not sdxl:
                    return modules[0].apply({"params": params[0]}, ids[0]).last_hidden_state, None
                outs = [m.apply({"params": p}, i, output_hidden_states=True) for m, p, i in zip(modules, params, ids)]
                return jnp.concatenate([o.hidden_states[-2] for o in outs], axis=-1), outs[-1].text_embeds
            self._compiled["text"] = jax.jit(encode)
        embeds, pooled = self._compiled["text"](tuple(p for _, p, _ in encoders), ids)
        return (embeds, pooled) if return_pooled else embeds

    def negative_prompt_embeds(self) -> tuple[jax.Array, Optional[jax.Array]]:
        """The conditioning of CFG's negative branch and of dropped captions, for one example:
        (embeddings [1, L, D], pooled [1, P] or None for SD1/SD2). The empty prompt's, or zeros for
        SDXL with force_zeros_for_empty_prompt (diffusers' SDXL pipeline and its LCM scripts), in
        which case no text encoder runs."""
        if self.is_sdxl and self.force_zeros_for_empty_prompt:
            length = self.tokenizer.model_max_length
            width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
            return (jnp.zeros((1, length, width), jnp.float32),
                    jnp.zeros((1, self.text_encoder_2.config.projection_dim), jnp.float32))
        return self.encode_prompt([""], return_pooled=True)

    def _unconditional(self, cond: jax.Array, pooled: Optional[jax.Array]):
        """``negative_prompt_embeds`` broadcast to ``cond``'s (and ``pooled``'s) batch."""
        uncond, uncond_pooled = self.negative_prompt_embeds()
        return (jnp.broadcast_to(uncond, cond.shape),
                None if pooled is None else jnp.broadcast_to(uncond_pooled, pooled.shape))

    # ------------------------------------------------------------------ sampling

    def __call__(self, prompt: Union[str, Sequence[str]], num_inference_steps: int = 4,
                 guidance_scale: float = 8.0, scheduler: str = "lcm", height: Optional[int] = None,
                 width: Optional[int] = None, seed: int = 0, latents: Optional[np.ndarray] = None,
                 num_images_per_prompt: int = 1, output_type: str = "uint8",
                 _noises: Optional[np.ndarray] = None) -> np.ndarray:
        """Images for the prompts: uint8 [N, H, W, 3] (``output_type="np"``: float32 in [0, 1];
        ``"latent"``: the final latents [N, C, h, w], scaled as the UNet sees them, not decoded).

        N = len(prompts) * num_images_per_prompt, each prompt repeated in place as diffusers
        does. ``latents`` [N, C, H/f, W/f] (NCHW) replaces the seeded initial noise;
        ``_noises`` [steps-1, N, C, h, w] replays LCM's per-step noise (for parity tests).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list: give a string or a non-empty list of strings")
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r} is not supported: expected one of {SCHEDULERS}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type {output_type!r}: expected one of {OUTPUT_TYPES}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if int(num_images_per_prompt) < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        check_guidance(guidance_scale, self.is_lcm, self.guidance_range)
        f = self.vae_scale_factor
        sample_size = self.unet.config.sample_size
        sample_size = sample_size[0] if isinstance(sample_size, tuple) else (sample_size or 64)
        height = height or sample_size * f
        width = width or sample_size * f
        if height % f or width % f:
            raise ValueError(f"height and width must be divisible by {f} (the VAE's scale factor), "
                             f"got {height}x{width}")
        n = len(prompts) * num_images_per_prompt
        shape = (n, self.unet.config.in_channels, height // f, width // f)
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}, expected {shape} "
                                 f"(N, C, H/{f}, W/{f}) for {len(prompts)} prompt(s) x "
                                 f"{num_images_per_prompt} image(s) at {height}x{width}")
        if scheduler in CONSISTENCY_SCHEDULERS:
            timesteps = (lcm_timesteps if scheduler == "lcm" else mlcd_timesteps)(
                int(num_inference_steps), self.schedule.num_train_timesteps, self.schedule.original_inference_steps)
        rng = jax.random.PRNGKey(seed)
        rng_latents, rng_steps = jax.random.split(rng)
        z = jnp.asarray(latents) if latents is not None else jax.random.normal(rng_latents, shape)

        cond, pooled = self.encode_prompt(prompts, return_pooled=True)
        cond = jnp.repeat(cond, num_images_per_prompt, axis=0)  # [N, L, D]
        pooled = None if pooled is None else jnp.repeat(pooled, num_images_per_prompt, axis=0)  # [N, P]
        use_cfg = not self.is_lcm and guidance_scale > 1.0
        uncond, uncond_pooled = self._unconditional(cond, pooled) if use_cfg else (None, None)
        added = None  # SDXL: (added_cond_kwargs of cond, of uncond)
        if self.is_sdxl:
            time_ids = jnp.asarray(sdxl_time_ids(height, width, n))  # [N, 6]
            added = ({"text_embeds": pooled, "time_ids": time_ids},
                     {"text_embeds": uncond_pooled, "time_ids": time_ids} if use_cfg else None)
        fn = self._sampler(scheduler, int(num_inference_steps), use_cfg, output_type == "latent")
        args = dict(unet=self.unet_params, vae=self.vae_params, lora=self._unfused_lora())
        if scheduler in CONSISTENCY_SCHEDULERS:
            noises = None if _noises is None else jnp.asarray(_noises, jnp.float32)
            images = fn(args, z, cond, uncond, jnp.float32(guidance_scale), rng_steps, noises,
                        jnp.asarray(timesteps, jnp.int32), added)
        else:
            images = fn(args, z, cond, uncond, jnp.float32(guidance_scale), added)
        images = np.asarray(jax.device_get(images))
        if output_type != "uint8":
            return images
        return (images * 255).round().astype(np.uint8)

    def _sampler(self, scheduler: str, steps: int, use_cfg: bool, latent: bool = False):
        """One jitted function: UNet (+CFG) over all steps, then VAE decode and postprocess; kept
        per UNet definition in the cache the pipelines made by ``with_unet`` share."""
        key = (self.unet, scheduler, steps, use_cfg, latent)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(make_sample_fn(
                self.unet, self.vae, self.schedule, scheduler, steps, use_cfg, decode=not latent))
        return self._compiled[key]


def init_cond_proj(cfg: UNetConfig, zero_init: bool = True, seed: int = 0) -> Any:
    """Fresh params of a student's new ``time_embedding.cond_proj`` (zeros: student == teacher).

    Only the TimestepEmbedding is initialised; an eager init of the whole UNet costs a minute.
    """
    emb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_cond_proj_dim, zero_init)
    params = emb.init(jax.random.PRNGKey(seed), jnp.zeros((1, cfg.block_out_channels[0])),
                      jnp.zeros((1, cfg.time_cond_proj_dim)))["params"]
    return jax.device_get(params["cond_proj"])


def make_model_fn(unet: UNet2DConditionModel, params: Any, cond: jax.Array,
                  uncond: Optional[jax.Array], guidance_scale: jax.Array,
                  added_cond: Optional[dict] = None, added_uncond: Optional[dict] = None):
    """model_fn(z, t) -> model output for the samplers: LCM omega-embedding or CFG.

    ``added_cond`` / ``added_uncond``: the UNet's added_cond_kwargs (SDXL: text_embeds [B, P],
    time_ids [B, 6]) for cond / uncond; None for SD1/SD2."""
    if uncond is not None and (added_cond is None) != (added_uncond is None):
        raise ValueError("CFG needs added conditioning for both cond and uncond, or for neither")

    def model_fn(z, t):  # z: [B, C, h, w], t: [B]
        if unet.config.time_cond_proj_dim is not None:
            w = jnp.full((z.shape[0],), guidance_scale - 1.0, jnp.float32)
            w_emb = guidance_embedding(w, unet.config.time_cond_proj_dim)
            return unet.apply({"params": params}, z, t, cond, w_emb, added_cond)
        if uncond is None:
            return unet.apply({"params": params}, z, t, cond, None, added_cond)
        both = lambda u, c: jnp.concatenate([u, c])  # noqa: E731  [2B, ...], uncond first
        out = unet.apply({"params": params}, both(z, z), both(t, t), both(uncond, cond), None,
                         jax.tree.map(both, added_uncond, added_cond))
        out_uncond, out_cond = jnp.split(out, 2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)
    return model_fn


def make_sample_fn(unet: UNet2DConditionModel, vae: AutoencoderKL, schedule: NoiseSchedule,
                   scheduler: str, steps: int, use_cfg: bool, decode: bool = True):
    """The pure function the pipeline jits: initial latents -> images [N, H, W, 3] in [0, 1]
    (``decode=False``: the final latents [N, C, h, w]). ``params["lora"]`` (optional):
    ((lora tree, strength), ...) merged into ``params["unet"]`` first (unfused LoRA).
    ``added`` (SDXL): (added_cond_kwargs for cond, for uncond or None), see make_model_fn."""
    vcfg = vae.config
    # diffusers' SDXL pipeline (not SD1's) de-normalises with the VAE's latents_mean/std when given
    stats = (unet.config.addition_embed_type == "text_time" and vcfg.latents_mean is not None
             and vcfg.latents_std is not None)

    def unet_params(params):
        out = params["unet"]
        for tree, strength in params.get("lora", ()):
            out = lora.merge(out, tree, strength)
        return out

    def model(params, cond, uncond, guidance_scale, added):
        added_cond, added_uncond = (None, None) if added is None else added
        return make_model_fn(unet, unet_params(params), cond, uncond if use_cfg else None, guidance_scale,
                             added_cond, added_uncond if use_cfg else None)

    def finish(params, z0):
        if not decode:
            return z0
        if stats:
            mean, std = (jnp.asarray(v, jnp.float32).reshape(1, -1, 1, 1) for v in (vcfg.latents_mean, vcfg.latents_std))
            z0 = z0 * std / vcfg.scaling_factor + mean
        else:
            z0 = z0 / vcfg.scaling_factor
        x = vae.apply({"params": params["vae"]}, z0, method=vae.decode)  # [N, 3, H, W]
        return jnp.clip(x / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    if scheduler in CONSISTENCY_SCHEDULERS:
        def sample(params, z, cond, uncond, guidance_scale, rng, noises, timesteps, added=None):
            model_fn = model(params, cond, uncond, guidance_scale, added)
            if scheduler == "lcm":
                z0 = sampling.lcm_sample(model_fn, z, timesteps, schedule, rng=rng, noises=noises)
            else:  # deterministic: no per-step noise
                z0 = sampling.mlcd_sample(model_fn, z, timesteps, schedule)
            return finish(params, z0)
    else:
        def sample(params, z, cond, uncond, guidance_scale, added=None):
            z0 = sampling.teacher_sample(scheduler, model(params, cond, uncond, guidance_scale, added), z,
                                         schedule, steps)
            return finish(params, z0)
    return sample
