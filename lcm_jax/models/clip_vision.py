"""CLIP vision tower in Flax linen, and a transformers ``CLIPModel`` folder loaded as two towers.

Params: vision_model{embeddings{class_embedding, patch_embedding{kernel}, position_embedding},
pre_layrnorm, encoder{layers{0{...}, 1{...}}}, post_layernorm}, visual_projection{kernel}: the
transformers-Flax names, so ``lcm_jax.weights`` maps them onto a checkpoint's ``vision_model.*``
and ``visual_projection.weight``. The encoder layers are the text tower's (lcm_jax.models.clip),
run without the causal mask. Numerics follow transformers 5.x ``CLIPVisionModelWithProjection``.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import component_config, weights
from lcm_jax.models.clip import (CLIP_IGNORED_KEYS, TRANSFORMERS_4_KEYS, CLIPEncoder, CLIPTextConfig, CLIPTextModel,
                                 _layer_norm, check_encoder_config, init_clip_params)

Params = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers ``CLIPVisionConfig`` that shape the model (transformers' defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        check_encoder_config(self)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + the class token

    @classmethod
    def from_transformers_config(cls, cfg: Mapping[str, Any], source: str = "CLIP vision config") -> "CLIPVisionConfig":
        """From a vision_config dict (``source`` names it in the messages). Generic PretrainedConfig
        keys are ignored, unknown keys too with a warning; a value of the wrong type raises."""
        model_type = cfg.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"expected a CLIPVisionConfig (model_type 'clip_vision_model'), got {model_type!r}")
        return cls(**component_config.config_fields(cls, cfg, CLIP_IGNORED_KEYS | TRANSFORMERS_4_KEYS, source=source,
                                           what="CLIPVisionConfig"))


@flax.struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # [B, 1 + P, D], the last layer's output (no final norm, as transformers)
    pooler_output: jax.Array  # [B, D]: post_layernorm of the class token
    image_embeds: jax.Array  # [B, projection_dim]


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:  # [B, C, H, W] -> [B, 1 + P, D]
        cfg = self.config
        p, d = cfg.patch_size, cfg.hidden_size
        init = nn.initializers.normal(0.02)
        patches = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                          name="patch_embedding")(pixel_values.transpose(0, 2, 3, 1))  # [B, H/p, W/p, D]
        patches = patches.reshape(patches.shape[0], -1, d)  # row-major, as torch's flatten(2)
        cls = self.param("class_embedding", init, (d,)).astype(patches.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (patches.shape[0], 1, d)), patches], axis=1)
        pos = nn.Embed(cfg.num_positions, d, dtype=self.dtype, embedding_init=init, name="position_embedding")
        return x + pos(jnp.arange(cfg.num_positions))[None]


class CLIPVisionTransformer(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg.layer_norm_eps, self.dtype, "pre_layrnorm")(x)  # sic: transformers' name
        last = CLIPEncoder(cfg, self.dtype, causal=False, name="encoder")(x, None)[-1]
        pooled = _layer_norm(cfg.layer_norm_eps, self.dtype, "post_layernorm")(last[:, 0])
        return last, pooled


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' CLIPVisionModelWithProjection: ``apply(params, pixel_values) -> CLIPVisionOutput``.

    ``pixel_values`` [B, C, image_size, image_size] as CLIPImageProcessor makes them (NCHW,
    normalised). ``dtype`` is the compute dtype (params stay float32); outputs are float32.
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be [B, {', '.join(map(str, want))}], got {pixel_values.shape}")
        last, pooled = CLIPVisionTransformer(cfg, self.dtype, name="vision_model")(pixel_values)
        embeds = nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype, name="visual_projection")(pooled)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        return CLIPVisionOutput(last_hidden_state=f32(last), pooler_output=f32(pooled), image_embeds=f32(embeds))


def init_vision_params(model: CLIPVisionModelWithProjection, rng: jax.Array) -> Params:
    """Random float32 params (``jax.eval_shape`` of this gives the shapes only)."""
    cfg = model.config
    return model.init(rng, jnp.zeros((1, cfg.num_channels, cfg.image_size, cfg.image_size)))["params"]


# ----------------------------------------------------------------------------- CLIPModel folders


def clip_model_configs(cfg: Mapping[str, Any], source: str = "CLIP config") -> tuple[CLIPTextConfig,
                                                                                   CLIPVisionConfig]:
    """The two towers of a transformers ``CLIPConfig`` dict (model_type "clip"; ``source`` names it).

    The projections' width is the top-level ``projection_dim`` (CLIPModel ignores the
    sub-configs' own, which default to 512).
    """
    if cfg.get("model_type") != "clip" or not all(isinstance(cfg.get(k), Mapping)
                                                     for k in ("text_config", "vision_config")):
        raise ValueError(f"expected a transformers CLIPConfig (model_type 'clip' with text_config and "
                         f"vision_config), got model_type {cfg.get('model_type')!r} and keys {sorted(cfg)}")
    proj = int(cfg.get("projection_dim", 512))
    text = CLIPTextConfig.from_transformers_config({**cfg["text_config"], "architectures": None},
                                                   source=f"{source} text_config")
    vision = CLIPVisionConfig.from_transformers_config(cfg["vision_config"], source=f"{source} vision_config")
    return (dataclasses.replace(text, with_projection=True, projection_dim=proj),
            dataclasses.replace(vision, projection_dim=proj))


def load_clip_model(folder: str, dtype: Any = jnp.float32) -> tuple[CLIPTextModel, CLIPVisionModelWithProjection,
                                                                   Params]:
    """(text tower with projection, vision tower, params) from a ``CLIPModel.save_pretrained`` folder.

    params = {"text": {text_model, text_projection}, "vision": {vision_model, visual_projection}};
    loading is strict except for ``logit_scale``, which CLIP score does not use.
    """
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} is not a CLIP model folder: expected what transformers' "
                                f"CLIPModel.save_pretrained writes (config.json with text_config and "
                                f"vision_config, model.safetensors)")
    try:
        text_cfg, vision_cfg = clip_model_configs(component_config.read_config(folder),
                                                  os.path.join(folder, "config.json"))
    except component_config.ConfigFileError:
        raise  # names the file already
    except ValueError as e:
        raise ValueError(f"{os.path.join(folder, 'config.json')!r}: {e}") from e
    text, vision = CLIPTextModel(text_cfg, dtype), CLIPVisionModelWithProjection(vision_cfg, dtype)
    key = jax.random.key(0)
    target = {"text": jax.eval_shape(functools.partial(init_clip_params, text), key),
              "vision": jax.eval_shape(functools.partial(init_vision_params, vision), key)}
    flat_target = {**target["text"], **target["vision"]}  # the checkpoint's top-level names
    try:
        params, _ = weights.load_params(folder, flat_target, ignore=("logit_scale",))
    except weights.WeightsError as e:
        raise weights.WeightsError(f"{folder!r} does not hold the CLIPModel its config.json describes: {e}") from e
    return text, vision, {name: {k: params[k] for k in tree} for name, tree in target.items()}

