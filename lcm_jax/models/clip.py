"""CLIP text encoder in Flax linen, with transformers-Flax parameter names, and its tokenizer.

Params: text_model{embeddings{token_embedding, position_embedding}, encoder{layers{0{self_attn{
q_proj, k_proj, v_proj, out_proj}, layer_norm1, mlp{fc1, fc2}, layer_norm2}, 1{...}}},
final_layer_norm} (+ text_projection for CLIPTextModelWithProjection), so
``lcm_jax.weights`` maps them onto the ``text_model.*`` keys of a transformers checkpoint.
Numerics follow transformers 5.x ``CLIPTextModel`` (causal mask, pooled output at the EOS).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import component_config

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
WITH_PROJECTION = "CLIPTextModelWithProjection"
# transformers config keys that do not change a CLIP tower's outputs, read without a warning:
# the towers' dropout and init scales, and PretrainedConfig's own keys. With our config fields
# they are exactly the keys that transformers' CLIPTextConfig().to_dict() and
# CLIPVisionConfig().to_dict() write (tests/test_strict_inputs.py checks it).
CLIP_IGNORED_KEYS = frozenset({
    "attention_dropout", "initializer_factor", "initializer_range",
    "architectures", "chunk_size_feed_forward", "dtype", "id2label", "is_encoder_decoder", "label2id",
    "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
    "transformers_version",
})
# What configs saved by transformers 4 (most published checkpoints, e.g. openai/clip-vit-*'s
# text_config and vision_config) also hold and transformers 5 no longer writes: CLIP's unused
# ``dropout``, generation settings, and the token ids a vision config carries as null.
TRANSFORMERS_4_KEYS = frozenset({
    "dropout", "torch_dtype", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads",
    "tie_word_embeddings", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
    "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "finetuning_task", "tokenizer_class", "prefix",
    "bos_token_id", "pad_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "gradient_checkpointing", "use_cache", "xla_device",
})


def check_encoder_config(cfg) -> None:
    """The checks every CLIP tower's config (text or vision) makes: a known activation, whole heads."""
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"unsupported CLIP hidden_act {cfg.hidden_act!r}; expected one of {sorted(ACTIVATIONS)}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers ``CLIPTextConfig`` config.json that shape the model.

    Defaults are transformers'. ``with_projection`` is true for CLIPTextModelWithProjection
    (SDXL's second text encoder), read from ``architectures``.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: Optional[int] = 1
    bos_token_id: Optional[int] = 49406
    eos_token_id: Optional[int] = 49407
    with_projection: bool = False

    def __post_init__(self):
        check_encoder_config(self)

    @classmethod
    def from_transformers_config(cls, cfg: Mapping[str, Any], source: str = "CLIP text config") -> "CLIPTextConfig":
        """From a text_encoder/config.json dict (``source``: its path, for the messages). Generic
        PretrainedConfig keys are ignored, unknown keys too with a warning; a value of the wrong
        type raises."""
        model_type = cfg.get("model_type", "clip_text_model")
        if model_type != "clip_text_model":
            raise ValueError(f"expected a CLIPTextConfig (model_type 'clip_text_model'), got {model_type!r}")
        archs = cfg.get("architectures") or ["CLIPTextModel"]
        if any(a not in ("CLIPTextModel", WITH_PROJECTION) for a in archs):
            raise ValueError(f"unsupported text encoder architectures {archs}; expected CLIPTextModel "
                             f"or {WITH_PROJECTION}")
        kwargs = component_config.config_fields(cls, cfg, CLIP_IGNORED_KEYS | TRANSFORMERS_4_KEYS, source=source,
                                       what="CLIPTextConfig", skip=("with_projection",))
        return cls(**kwargs, with_projection=WITH_PROJECTION in archs)

    def to_transformers_config(self) -> dict[str, Any]:
        """A config.json dict that transformers' CLIPTextModel(.WithProjection) loads."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "with_projection"}
        out.update(model_type="clip_text_model",
                   architectures=[WITH_PROJECTION if self.with_projection else "CLIPTextModel"])
        return out


@flax.struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # [B, L, D] after the final layer norm
    pooler_output: jax.Array  # [B, D] at the EOS token
    hidden_states: Optional[tuple[jax.Array, ...]] = None  # embeddings + each layer, [B, L, D]
    text_embeds: Optional[jax.Array] = None  # [B, projection_dim] (with_projection only)


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention; ``causal`` for the text tower, not for the vision tower.

    ``config`` is a CLIPTextConfig or a CLIPVisionConfig (lcm_jax.models.clip_vision): the
    encoder modules read only the fields the two share.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:  # [B, L, D]
        b, l, d = x.shape
        n = self.config.num_attention_heads
        proj = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
        q, k, v = (proj(p)(x).reshape(b, l, n, d // n) for p in ("q_proj", "k_proj", "v_proj"))
        y = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)  # [B, L, N, D/N]
        return proj("out_proj")(y.reshape(b, l, d))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = _layer_norm(eps, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")(h, mask)
        h = _layer_norm(eps, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPLayerCollection(nn.Module):
    """Layers named "0", "1", ... so their paths equal the PyTorch ``layers.<i>`` keys."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> tuple[jax.Array, ...]:
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.causal, name=str(i))(x, mask)
            states.append(x)
        return tuple(states)


class CLIPEncoder(nn.Module):
    """The layer stack; returns the input and each layer's output, [B, L, D] each."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: Optional[jax.Array]) -> tuple[jax.Array, ...]:
        return CLIPLayerCollection(self.config, self.dtype, self.causal, name="layers")(x, mask)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:  # [B, L] -> [B, L, D]
        cfg = self.config
        init = nn.initializers.normal(0.02)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                       name="token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, embedding_init=init,
                       name="position_embedding")
        return tok(input_ids) + pos(jnp.arange(input_ids.shape[-1]))[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None):
        cfg = self.config
        x = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids)
        # padding mask [B, 1, 1, L] (keys), combined with the causal mask in attention
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        states = CLIPEncoder(cfg, self.dtype, name="encoder")(x, mask)
        last = _layer_norm(cfg.layer_norm_eps, self.dtype, "final_layer_norm")(states[-1])
        if cfg.eos_token_id == 2:  # legacy configs: EOS is the largest id in each row
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:  # first EOS (pad may equal EOS)
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return last, pooled, states


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (or ...WithProjection): ``apply(params, input_ids) -> CLIPTextOutput``.

    ``dtype`` is the compute dtype (params stay float32); outputs are float32.
    ``hidden_states`` (embeddings, then each layer's output before the final layer norm, as
    transformers) is filled when ``output_hidden_states=True``; SDXL takes ``hidden_states[-2]``.
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        # input_ids: [B, L] int, attention_mask: [B, L] (1 = keep) or None
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(f"input_ids must be [B, L] with L <= {cfg.max_position_embeddings}, "
                             f"got {input_ids.shape}")
        text_model = CLIPTextTransformer(cfg, self.dtype, name="text_model")
        last, pooled, states = text_model(input_ids, attention_mask)
        f32 = lambda a: a.astype(jnp.float32)
        text_embeds = None
        if cfg.with_projection:
            text_embeds = f32(nn.Dense(cfg.projection_dim, use_bias=False, dtype=self.dtype,
                                       name="text_projection")(pooled))
        return CLIPTextOutput(
            last_hidden_state=f32(last), pooler_output=f32(pooled),
            hidden_states=tuple(f32(s) for s in states) if output_hidden_states else None,
            text_embeds=text_embeds)


def init_clip_params(model: CLIPTextModel, rng: jax.Array) -> Any:
    """Random float32 params for ``model``.

    ``jax.eval_shape(functools.partial(init_clip_params, model), rng)`` gives the shapes only.
    """
    return model.init(rng, jnp.zeros((1, model.config.max_position_embeddings), jnp.int32))["params"]


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(folder: Union[str, os.PathLike]):
    """transformers' CLIPTokenizer from a diffusers ``tokenizer/`` folder."""
    from transformers import CLIPTokenizer

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    files = set(os.listdir(folder))
    # transformers silently builds an empty 3-token tokenizer from a folder without these.
    if "tokenizer.json" not in files and not {"vocab.json", "merges.txt"} <= files:
        raise FileNotFoundError(f"tokenizer folder {folder!r} has neither tokenizer.json nor "
                                f"vocab.json + merges.txt (found {sorted(files)})")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # re-raised with the folder named; transformers' messages often omit it
        raise OSError(f"could not load a CLIPTokenizer from {folder!r}: {e}") from e


def tokenize(tokenizer, prompts: Union[str, Sequence[str]], max_length: Optional[int] = None,
             warn_truncated: bool = True) -> np.ndarray:
    """Token ids padded ('max_length') and truncated to ``max_length`` -> int32 [B, L], as diffusers.

    ``warn_truncated``: one warning per call when prompts lose tokens, with the lost text (as
    diffusers' encode_prompt logs it); off for training captions, where it would repeat each batch.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if max_length is None:
        max_length = tokenizer.model_max_length
        if not 0 < max_length <= 100_000:
            raise ValueError(f"tokenizer.model_max_length is {max_length}; pass max_length explicitly")
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np").input_ids
    if warn_truncated:
        _warn_truncated(tokenizer, prompts, max_length)
    return np.asarray(ids, dtype=np.int32)


def _warn_truncated(tokenizer, prompts: list[str], max_length: int, show: int = 200) -> None:
    """One warning for the prompts whose tokens do not fit in ``max_length`` (special tokens included)."""
    keep = max_length - tokenizer.num_special_tokens_to_add()
    content = tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
    dropped = [(i, ids[keep:]) for i, ids in enumerate(content) if len(ids) > keep]
    if not dropped:
        return
    i, lost = dropped[0]
    text = tokenizer.decode(lost)
    text = text if len(text) <= show else text[:show] + "..."
    logging.warning("%d of %d prompts were truncated because CLIP can only handle sequences up to %d tokens "
                    "(up to %d tokens dropped); the following part of prompt %d was truncated: %r",
                    len(dropped), len(prompts), max_length, max(len(d) for _, d in dropped), i, text)
