"""The Stable Diffusion UNet (diffusers' UNet2DConditionModel) as a pure Flax linen module.

Parameter names are those of diffusers' Flax UNet (conv_in, time_embedding, down_blocks_i,
mid_block, up_blocks_i, conv_norm_out, conv_out), so ``lcm_jax.weights`` maps a diffusers
PyTorch checkpoint onto them one to one. The architecture comes from a diffusers
``unet/config.json`` through ``UNetConfig``; features SD1.x/SD2.x/LCM UNets do not use
raise a ValueError instead of being silently dropped. SDXL's added "text_time" conditioning
(``added_cond_kwargs``: text_embeds, time_ids) is the ``add_embedding`` TimestepEmbedding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax import component_config
from lcm_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from lcm_jax.models.unet_blocks import REMAT_BLOCKS, AttnSpec, DownBlock, UNetMidBlock2DCrossAttn, UpBlock

IntOrTuple = Union[int, tuple]

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
ADDITION_EMBED_TYPES = (None, "text_time")  # SD1/SD2; SDXL
# Activation checkpointing (each recomputes the forward pass once, at most): "none"; "block": each
# down/mid/up block is recomputed in the backward pass from its input; "full": each
# ResnetBlock2D / Transformer2DModel instead (finer: less live memory, the same recompute);
# "dots": each block, keeping its matmul and conv outputs (unet_blocks.save_matmuls_and_convs), so
# only norms, activations and attention's softmax are recomputed.
REMAT_MODES = ("none", "block", "full", "dots")

# diffusers config keys we do not implement: the only values accepted for each.
_FIXED_KEYS: dict[str, tuple] = {
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "dual_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "dropout": (0, 0.0),
    "act_fn": ("silu", "swish"),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# diffusers config keys with no effect on the architectures we support.
_IGNORED_KEYS = frozenset({"addition_embed_type_num_heads"})
# The UNetConfig fields, _FIXED_KEYS and _IGNORED_KEYS are exactly UNet2DConditionModel's
# __init__ arguments (tests/test_strict_inputs.py checks it); any other key gets a warning.


def _tuplify(v: Any) -> Any:
    return tuple(_tuplify(x) for x in v) if isinstance(v, (list, tuple)) else v


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def _per_block(name: str, v: Any, n: int) -> tuple:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{name}={list(v)} must have one entry per block ({n} blocks)")
        return tuple(v)
    return (v,) * n


def _per_layer(v: IntOrTuple, num_layers: int) -> tuple[int, ...]:
    return _per_block("transformer_layers_per_block entry", v, num_layers)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers UNet2DConditionModel config fields we implement (diffusers' defaults).

    ``attention_head_dim`` keeps diffusers' historical meaning: unless ``num_attention_heads``
    is given it is the number of heads per block (head width = block channels // heads).
    """

    sample_size: Optional[IntOrTuple] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    reverse_transformer_layers_per_block: Optional[tuple] = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: Optional[int] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # SDXL's added conditioning ("text_time"): pooled text embeddings + embedded size/crop ids.
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    def __post_init__(self):
        for f in dataclasses.fields(self):  # lists (JSON) -> tuples, so the config hashes
            object.__setattr__(self, f.name, _tuplify(getattr(self, f.name)))
        n = len(self.down_block_types)
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; expected one of {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; expected one of {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; "
                             f"expected one of {MID_BLOCK_TYPES}")
        if len(self.up_block_types) != n or len(self.block_out_channels) != n:
            raise ValueError(f"down_block_types {self.down_block_types}, up_block_types "
                             f"{self.up_block_types} and block_out_channels {self.block_out_channels} "
                             "must have the same length")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not implemented; "
                             f"expected one of {ADDITION_EMBED_TYPES}")
        if self.addition_embed_type == "text_time" and None in (self.addition_time_embed_dim,
                                                                self.projection_class_embeddings_input_dim):
            raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim, got "
                             f"{self.addition_time_embed_dim} and {self.projection_class_embeddings_input_dim}")
        for k in (self.conv_in_kernel, self.conv_out_kernel):
            if k % 2 != 1:
                raise ValueError(f"conv_in/out kernel sizes must be odd, got {k}")
        tlpb = self.transformer_layers_per_block
        if (isinstance(tlpb, tuple) and any(isinstance(x, tuple) for x in tlpb)
                and self.reverse_transformer_layers_per_block is None):
            raise ValueError("per-layer transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block (as in diffusers)")
        # Expand every per-block setting once, so bad lengths raise here.
        _ = (self.cross_attention_dims, self.down_transformer_depths, self.up_transformer_depths,
             self.mid_transformer_depths)
        for c, h in zip(self.block_out_channels, self.heads_per_block):
            if c % self.norm_num_groups:
                raise ValueError(f"block channels {c} not divisible by norm_num_groups={self.norm_num_groups}")
            if h < 1 or c // h < 1:
                raise ValueError(f"{h} attention heads do not fit {c} channels")

    # ---- per-block expansions (as diffusers' UNet2DConditionModel.__init__) ----
    @property
    def num_blocks(self) -> int:
        return len(self.down_block_types)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads per down block (diffusers: num_attention_heads or attention_head_dim)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block("num_attention_heads/attention_head_dim", heads, self.num_blocks)

    @property
    def cross_attention_dims(self) -> tuple[int, ...]:
        return _per_block("cross_attention_dim", self.cross_attention_dim, self.num_blocks)

    @property
    def layers_per_block_list(self) -> tuple[int, ...]:
        return _per_block("layers_per_block", self.layers_per_block, self.num_blocks)

    @property
    def down_transformer_depths(self) -> tuple[tuple[int, ...], ...]:
        """Transformer depth of each attention layer of each down block."""
        tl = _per_block("transformer_layers_per_block", self.transformer_layers_per_block, self.num_blocks)
        return tuple(_per_layer(t, n) for t, n in zip(tl, self.layers_per_block_list))

    @property
    def mid_transformer_depths(self) -> tuple[int, ...]:
        tl = _per_block("transformer_layers_per_block", self.transformer_layers_per_block, self.num_blocks)
        return _per_layer(tl[-1], 1)

    @property
    def up_transformer_depths(self) -> tuple[tuple[int, ...], ...]:
        """Transformer depth of each attention layer of each up block (layers_per_block + 1 each)."""
        if self.reverse_transformer_layers_per_block is not None:
            rev = _per_block("reverse_transformer_layers_per_block",
                             self.reverse_transformer_layers_per_block, self.num_blocks)
        else:
            rev = tuple(reversed(_per_block("transformer_layers_per_block",
                                            self.transformer_layers_per_block, self.num_blocks)))
        layers = tuple(reversed(self.layers_per_block_list))
        return tuple(_per_layer(t, n + 1) for t, n in zip(rev, layers))

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    # ---- diffusers config.json <-> UNetConfig ----
    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], source: str = "UNet config") -> "UNetConfig":
        """From a diffusers ``unet/config.json`` dict (``source``: its path, for the messages).
        Keys starting with "_" are ignored, keys diffusers does not know too, with a warning;
        a value of the wrong type or a known feature we do not implement raises."""
        name = config.get("_class_name", "UNet2DConditionModel")
        if name != "UNet2DConditionModel":
            raise ValueError(f"config is for {name!r}, expected 'UNet2DConditionModel'")
        for key, allowed in _FIXED_KEYS.items():
            if key not in config:
                continue
            v = config[key]
            vals = v if key == "only_cross_attention" and isinstance(v, (list, tuple)) else [v]
            if any(x not in allowed for x in vals):
                raise ValueError(f"unsupported UNet config {key}={v!r}; supported: "
                                 f"{' or '.join(repr(a) for a in allowed)}")
        if config.get("norm_num_groups", 32) is None:
            raise ValueError("norm_num_groups=None (no GroupNorm) is not supported")
        return cls(**component_config.config_fields(cls, config, _FIXED_KEYS.keys() | _IGNORED_KEYS, source=source,
                                           what="UNet2DConditionModel"))

    def to_diffusers_config(self) -> dict[str, Any]:
        """A config.json dict that diffusers' UNet2DConditionModel.from_config builds into the
        same architecture (diffusers only accepts the head count under attention_head_dim)."""
        out: dict[str, Any] = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0"}
        for f in dataclasses.fields(self):
            out[f.name] = _listify(getattr(self, f.name))
        heads = self.heads_per_block
        out["attention_head_dim"] = heads[0] if len(set(heads)) == 1 else list(heads)
        out["num_attention_heads"] = None
        out.update({k: v[0] for k, v in _FIXED_KEYS.items()})
        out["act_fn"] = "silu"
        out["addition_embed_type_num_heads"] = 64
        return out


# ----------------------------------------------------------------------------------------
# The UNet
# ----------------------------------------------------------------------------------------

class UNet2DConditionModel(nn.Module):
    """eps/v-prediction UNet: (sample [B,C,H,W], timesteps, text [B,S,D]) -> [B,C_out,H,W] float32.

    ``dtype`` is the compute dtype (params stay float32). ``timestep_cond`` [B, time_cond_proj_dim]
    (LCM's guidance embedding) goes through ``time_embedding.cond_proj``; ``added_cond_kwargs``
    {"text_embeds": [B, P], "time_ids": [B, K]} feeds SDXL's ``add_embedding``; with
    ``zero_init_cond_proj`` a fresh cond_proj starts at zero (student == teacher at init).
    ``remat`` (one of REMAT_MODES) trades backward-pass compute for activation memory; it
    changes neither the params nor the outputs.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    zero_init_cond_proj: bool = False
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT_MODES:
            raise ValueError(f"unknown remat={self.remat!r}; expected one of {REMAT_MODES}")
        super().__post_init__()

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 timestep_cond: Optional[jax.Array] = None,
                 added_cond_kwargs: Optional[Mapping[str, jax.Array]] = None) -> jax.Array:
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be [B, {cfg.in_channels}, H, W] (NCHW), got {sample.shape}")
        b = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be [{b}, S, D], got {encoder_hidden_states.shape}")
        for i, dim in enumerate(cfg.cross_attention_dims):
            if cfg.down_block_types[i].startswith("CrossAttn") and encoder_hidden_states.shape[-1] != dim:
                raise ValueError(f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                                 f"cross_attention_dim {dim} of down block {i}")
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, b)):
            raise ValueError(f"timesteps must be a scalar, [1] or [{b}], got shape {timesteps.shape}")
        timesteps = jnp.broadcast_to(timesteps.reshape(-1), (b,))

        # time embedding (+ added conditioning)
        t_emb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.time_cond_proj_dim, self.zero_init_cond_proj,
                                dtype=self.dtype, name="time_embedding")(t_emb, timestep_cond)
        aug = self._added_embedding(emb, encoder_hidden_states, added_cond_kwargs)
        if aug is not None:
            emb = emb + aug  # [B, T]

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)  # [B, H, W, C]
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        context = encoder_hidden_states.astype(self.dtype)
        attn = AttnSpec(cfg.use_linear_projection, cfg.upcast_attention, cfg.norm_num_groups, cfg.norm_eps)
        heads, channels, layers = cfg.heads_per_block, cfg.block_out_channels, cfg.layers_per_block_list
        n = cfg.num_blocks
        remat_layers = self.remat == "full"  # (not nested in a block remat: one recompute, not two)
        down_cls, mid_cls, up_cls = REMAT_BLOCKS.get(self.remat, (DownBlock, UNetMidBlock2DCrossAttn, UpBlock))
        pad = (cfg.conv_in_kernel - 1) // 2
        x = nn.Conv(channels[0], (cfg.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                    dtype=self.dtype, name="conv_in")(x)

        # down
        skips = [x]
        for i, btype in enumerate(cfg.down_block_types):
            cross = btype == "CrossAttnDownBlock2D"
            x, res = down_cls(channels[i], layers[i], i < n - 1, attn, heads[i],
                              cfg.down_transformer_depths[i] if cross else None, dtype=self.dtype,
                              remat_layers=remat_layers, name=f"down_blocks_{i}")(x, emb, context)
            skips.extend(res)

        # mid
        if cfg.mid_block_type is not None:
            x = mid_cls(attn, heads[-1], cfg.mid_transformer_depths, dtype=self.dtype,
                        remat_layers=remat_layers, name="mid_block")(x, emb, context)

        # up
        rev_channels, rev_heads, rev_layers = channels[::-1], heads[::-1], layers[::-1]
        for i, btype in enumerate(cfg.up_block_types):
            cross = btype == "CrossAttnUpBlock2D"
            k = rev_layers[i] + 1
            res, skips = skips[-k:], skips[:-k]
            last = i == n - 1
            # the next level's size (diffusers passes it when H, W are not multiples of 2**(n-1))
            size = None if last else skips[-1].shape[1:3]
            x = up_cls(rev_channels[i], k, not last, attn, rev_heads[i],
                       cfg.up_transformer_depths[i] if cross else None, dtype=self.dtype,
                       remat_layers=remat_layers, name=f"up_blocks_{i}")(x, tuple(res), emb, context, size)

        # out
        x = nn.GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, use_fast_variance=False,
                         dtype=self.dtype, name="conv_norm_out")(x)
        x = nn.silu(x)
        pad = (cfg.conv_out_kernel - 1) // 2
        x = nn.Conv(cfg.out_channels, (cfg.conv_out_kernel,) * 2, padding=((pad, pad), (pad, pad)),
                    dtype=self.dtype, name="conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)  # [B, C_out, H, W]

    def _added_embedding(self, emb: jax.Array, encoder_hidden_states: jax.Array,
                         added_cond_kwargs: Optional[Mapping[str, jax.Array]]) -> Optional[jax.Array]:
        """Extra embedding summed into ``emb`` [B, T]: None for SD1/SD2; SDXL's "text_time" is
        add_embedding(concat(text_embeds [B, P], add_time_proj(time_ids [B, K]) [B, K * d]))
        (diffusers' get_aug_embed). At init without inputs, add_embedding's params are made from zeros."""
        cfg = self.config
        if cfg.addition_embed_type is None:
            if added_cond_kwargs:
                raise ValueError("added_cond_kwargs given but the UNet has addition_embed_type=None")
            return None
        add_embedding = TimestepEmbedding(cfg.time_embed_dim, dtype=self.dtype, name="add_embedding")
        width = cfg.projection_class_embeddings_input_dim
        if not added_cond_kwargs and self.is_initializing():
            return add_embedding(jnp.zeros((emb.shape[0], width), jnp.float32))
        missing = [k for k in ("text_embeds", "time_ids") if k not in (added_cond_kwargs or {})]
        if missing:
            raise ValueError(f"addition_embed_type='text_time' needs added_cond_kwargs {missing} "
                             "(pooled text embeddings [B, P] and time ids [B, 6])")
        text_embeds = jnp.asarray(added_cond_kwargs["text_embeds"], jnp.float32)
        time_ids = jnp.asarray(added_cond_kwargs["time_ids"])
        b = emb.shape[0]
        if text_embeds.ndim != 2 or text_embeds.shape[0] != b or time_ids.ndim != 2 or time_ids.shape[0] != b:
            raise ValueError(f"added_cond_kwargs must be text_embeds [{b}, P] and time_ids [{b}, K], got "
                             f"{text_embeds.shape} and {time_ids.shape}")
        got = text_embeds.shape[1] + time_ids.shape[1] * cfg.addition_time_embed_dim
        if got != width:
            raise ValueError(f"text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x "
                             f"addition_time_embed_dim {cfg.addition_time_embed_dim} = {got}, but "
                             f"projection_class_embeddings_input_dim is {width}")
        time_embeds = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim,
                                         cfg.flip_sin_to_cos, cfg.freq_shift).reshape(b, -1)  # [B, K * d]
        return add_embedding(jnp.concatenate([text_embeds, time_embeds], axis=-1))  # [B, T]
