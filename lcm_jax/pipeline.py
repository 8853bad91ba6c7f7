"""LCMPipeline: a diffusers-layout folder in, images out, with one jitted function per sampler.

Components (diffusers layout): unet/ vae/ text_encoder/ tokenizer/ scheduler/ (+ model_index.json);
an SDXL folder adds text_encoder_2/ tokenizer_2/ (its UNet has "text_time" added conditioning).
A UNet with ``time_cond_proj_dim`` (an LCM) takes guidance through the embedding of
omega = guidance_scale - 1 and runs no CFG batch; a plain UNet runs classifier-free guidance.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lcm_jax import component_config, pipeline_folder, sharding, weights
from lcm_jax.lora_adapters import LoraAdapters
from lcm_jax.models.clip import CLIPTextModel, load_tokenizer, tokenize
from lcm_jax.models.embeddings import sdxl_time_ids
from lcm_jax.models.params import init_cond_proj, place, resolve_dtype, unet_shapes, vae_shapes
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.vae import AutoencoderKL, VAEConfig
from lcm_jax.sampling import CONSISTENCY_SCHEDULERS, SCHEDULERS, make_sample_fn
from lcm_jax.schedules import NoiseSchedule, lcm_timesteps, mlcd_timesteps

OUTPUT_TYPES = ("uint8", "np", "latent")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pad(x: jax.Array, extra: int, axis: int) -> jax.Array:
    """``extra`` zero rows after ``x``'s along ``axis`` (jitted: the zeros are made on the device)."""
    return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


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


@dataclasses.dataclass
class LCMPipeline(LoraAdapters):
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
    mesh: Optional[Mesh] = None  # sampling: the batch split over data x fsdp, params by the partition rules
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)
    # LoRA adapters: see LoraAdapters
    _lora: dict = dataclasses.field(default_factory=dict, repr=False)
    _lora_weights: dict = dataclasses.field(default_factory=dict, repr=False)
    _lora_fused: dict = dataclasses.field(default_factory=dict, repr=False)
    _schedule: Any = dataclasses.field(init=False, repr=False)  # on the device once, as the params

    def __post_init__(self):
        """An SDXL UNet needs the second text encoder, and the added conditioning's width must
        add up (the check diffusers' _get_add_time_ids makes at every call)."""
        self._schedule = NoiseSchedule.from_scheduler_config(self.scheduler_config)
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
    def from_pretrained(cls, path: str, dtype: Union[str, Any] = "float32", *, mesh: Any = "auto",
                        param_dtype: Union[str, Any, None] = None, on_device: bool = True,
                        unet_overrides: Optional[dict] = None, zero_init_cond_proj: bool = True) -> "LCMPipeline":
        """Load a diffusers-layout folder. The params go to the device(s) once, here, as ``param_dtype``
        (default: the compute ``dtype``; the trainer keeps float32 masters), so no call re-sends them.
        A bfloat16 pipeline so holds bfloat16 weights: ``save_pretrained`` writes them as they are,
        ``fuse_lora`` rounds in bfloat16, and a latent cache's identity (float32 weights) differs;
        pass ``param_dtype="float32"`` to keep float32 weights with bfloat16 compute.
        ``mesh``: a jax.sharding.Mesh over ('data', 'fsdp', 'tensor') to sample over (the batch split
        over data x fsdp, padded to it; params replicated, or sharded by the partition rules when
        fsdp / tensor > 1, for a model one chip cannot hold), ``"auto"`` (every local accelerator on
        the data axis; on CPU one device) or None (one device). ``on_device=False`` keeps the params
        host numpy arrays, for a caller that places them itself (the trainer, over its training mesh).
        ``unet_overrides`` (e.g. ``{"time_cond_proj_dim": 256}``) builds a student from a teacher:
        params the file lacks because of the override (only ``time_embedding/cond_proj``) are
        initialised, zero by default; anything else is strict."""
        dtype = resolve_dtype(dtype)
        param_dtype = dtype if param_dtype is None else resolve_dtype(param_dtype)
        mesh = sharding.sampling_mesh(mesh)
        pipeline_folder.check_pipeline_folder(path)
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
        text_encoder, text_params = pipeline_folder.load_text_encoder(os.path.join(path, "text_encoder"), dtype)
        tokenizer = load_tokenizer(os.path.join(path, "tokenizer"))
        sdxl = {}
        if os.path.isdir(os.path.join(path, "text_encoder_2")):
            te2, params2 = pipeline_folder.load_text_encoder(os.path.join(path, "text_encoder_2"), dtype)
            sdxl = dict(text_encoder_2=te2, text_params_2=params2,
                        tokenizer_2=load_tokenizer(os.path.join(path, "tokenizer_2")),
                        force_zeros_for_empty_prompt=pipeline_folder.read_force_zeros(path))
        sched = component_config.read_config(os.path.join(path, "scheduler"), "scheduler_config.json")
        NoiseSchedule.from_scheduler_config(sched)  # validate now, not at the first call
        put = functools.partial(place, dtype=param_dtype, mesh=mesh, device=on_device)
        if sdxl:
            sdxl["text_params_2"] = put(sdxl["text_params_2"])
        return cls(unet, put(unet_params), vae, put(vae_params), text_encoder, put(text_params), tokenizer, sched,
                   dtype, **sdxl, guidance_range=pipeline_folder.read_guidance_range(path), mesh=mesh)

    def with_unet(self, unet: UNet2DConditionModel, unet_params: Any,
                  guidance_range: Optional[tuple[float, float]] = None) -> "LCMPipeline":
        """This pipeline (VAE, text encoders, tokenizers, scheduler) with another UNet and its params,
        e.g. a student in training, and that UNet's trained guidance range. The compiled programs are
        shared: a sampler compiled for one UNet definition serves every pipeline derived from the same
        one (params are its arguments), so a student sampled every N steps compiles each sampler once.
        LoRA adapters belong to the old UNet and are not carried over."""
        return dataclasses.replace(self, unet=unet.clone(remat="none"), unet_params=place(unet_params, mesh=self.mesh),
                                   guidance_range=guidance_range, _lora={}, _lora_weights={}, _lora_fused={})

    def on_devices(self, mesh: Any = "auto") -> "LCMPipeline":
        """This pipeline with every param tree placed once on the device(s) (``mesh`` as in
        ``from_pretrained``), for a caller that loaded it with ``on_device=False`` and now samples
        many times (the data-free teacher data). The compiled programs are shared."""
        mesh = sharding.sampling_mesh(mesh)
        put = functools.partial(place, mesh=mesh)
        return dataclasses.replace(
            self, unet_params=put(self.unet_params), vae_params=put(self.vae_params), text_params=put(self.text_params),
            text_params_2=None if self.text_params_2 is None else put(self.text_params_2), mesh=mesh,
            _lora={k: put(v) for k, v in self._lora.items()})

    @property
    def is_lcm(self) -> bool:
        return self.unet.config.time_cond_proj_dim is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    def save_pretrained(self, out_dir: str, unet_params: Any = None) -> None:
        """Write a folder diffusers' own pipelines load (see pipeline_folder.write_folder_index)."""
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
        pipeline_folder.write_folder_index(out_dir, self.scheduler_config, self.is_lcm, self.is_sdxl,
                                           self.force_zeros_for_empty_prompt, self.guidance_range)

    # ------------------------------------------------------------------ conditioning

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def schedule(self) -> NoiseSchedule:
        return self._schedule

    def encode_prompt(self, prompts: Sequence[str], return_pooled: bool = False
                      ) -> Union[jax.Array, tuple[jax.Array, Optional[jax.Array]]]:
        """The UNet's text conditioning [B, L, D] for the prompts (float32): the text encoder's last
        hidden states; SDXL: both encoders' penultimate hidden states concatenated (D = D1 + D2),
        as diffusers' StableDiffusionXLPipeline.encode_prompt. With ``return_pooled``:
        (embeddings, pooled [B, P]) with text_encoder_2's projected pooled output (None for SD1/SD2)."""
        encoders = [(self.text_encoder, self.text_params, self.tokenizer)]
        if self.is_sdxl:
            encoders.append((self.text_encoder_2, self.text_params_2, self.tokenizer_2))
        ids = tuple(self._replicate(tokenize(tok, prompts)) for _, _, tok in encoders)
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
        step = sharding.batch_multiple(self.mesh)
        n_pad = -(-n // step) * step  # a mesh's batch: zero rows after the real ones, cropped at the end
        if latents is not None:
            latents = np.asarray(latents, np.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}, expected {shape} "
                                 f"(N, C, H/{f}, W/{f}) for {len(prompts)} prompt(s) x "
                                 f"{num_images_per_prompt} image(s) at {height}x{width}")
        if scheduler in CONSISTENCY_SCHEDULERS:
            timesteps = (lcm_timesteps if scheduler == "lcm" else mlcd_timesteps)(
                int(num_inference_steps), self.schedule.num_train_timesteps, self.schedule.original_inference_steps)
        # every host value goes to the device explicitly (the params are there already)
        rng = jax.random.PRNGKey(jax.device_put(np.uint32(int(seed) % 2 ** 32)))  # (the int32 seed's key)
        rng_latents, rng_steps = jax.random.split(rng)
        z = jax.device_put(latents) if latents is not None else jax.random.normal(rng_latents, shape)
        def pad(x, axis=0):  # [..., n, ...] -> [..., n_pad, ...] split over the mesh; as is without padding
            if x is None or n_pad == n and self.mesh is None:
                return x
            return self._split(_pad(x, n_pad - n, axis) if n_pad > n else x, axis)

        cond, pooled = self.encode_prompt(prompts, return_pooled=True)
        cond = jnp.repeat(cond, num_images_per_prompt, axis=0)  # [N, L, D]
        pooled = None if pooled is None else jnp.repeat(pooled, num_images_per_prompt, axis=0)  # [N, P]
        use_cfg = not self.is_lcm and guidance_scale > 1.0
        uncond, uncond_pooled = self._unconditional(cond, pooled) if use_cfg else (None, None)
        added = None  # SDXL: (added_cond_kwargs of cond, of uncond)
        if self.is_sdxl:
            time_ids = jax.device_put(sdxl_time_ids(height, width, n))  # [N, 6]
            pooled, uncond_pooled, time_ids = pad(pooled), pad(uncond_pooled), pad(time_ids)
            added = ({"text_embeds": pooled, "time_ids": time_ids},
                     {"text_embeds": uncond_pooled, "time_ids": time_ids} if use_cfg else None)
        fn = self._sampler(scheduler, int(num_inference_steps), use_cfg, output_type == "latent",
                           n if n_pad > n else None)
        args = dict(unet=self.unet_params, vae=self.vae_params, lora=self._unfused_lora())
        w = self._replicate(np.float32(guidance_scale))
        z, cond, uncond = pad(z), pad(cond), pad(uncond)
        if scheduler in CONSISTENCY_SCHEDULERS:
            noises = None if _noises is None else pad(jax.device_put(np.asarray(_noises, np.float32)), 1)
            images = fn(args, z, cond, uncond, w, self._replicate(rng_steps), noises,
                        self._replicate(np.asarray(timesteps, np.int32)), added)
        else:
            images = fn(args, z, cond, uncond, w, added)
        images = np.asarray(jax.device_get(images))[:n]
        if output_type != "uint8":
            return images
        return (images * 255).round().astype(np.uint8)

    def _sampler(self, scheduler: str, steps: int, use_cfg: bool, latent: bool = False,
                 num_real: Optional[int] = None):
        """One jitted function: UNet (+CFG) over all steps, then VAE decode and postprocess; kept
        per UNet definition in the cache the pipelines made by ``with_unet`` share. Its shardings
        follow its inputs' (the batch split over the mesh, params as placed)."""
        key = (self.unet, scheduler, steps, use_cfg, latent, num_real, self.mesh)
        if key not in self._compiled:
            self._compiled[key] = jax.jit(make_sample_fn(
                self.unet, self.vae, self.schedule, scheduler, steps, use_cfg, decode=not latent, num_real=num_real))
        return self._compiled[key]

    def _replicate(self, x: Any) -> jax.Array:
        """A host value on the device (every device of the mesh)."""
        return jax.device_put(x) if self.mesh is None else jax.device_put(x, sharding.replicated(self.mesh))

    def _split(self, x: jax.Array, axis: int = 0) -> jax.Array:
        """A batch array split over the mesh's data x fsdp axes along ``axis`` (as is without a mesh)."""
        if self.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[axis] = sharding.BATCH_AXES
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

