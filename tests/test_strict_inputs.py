"""Nothing lost, nothing silent: truncated prompts, misspelt or mistyped config.json keys, and
weights of the wrong dtype or with NaN/inf are each refused or reported, naming what and where."""
import dataclasses
import functools
import inspect
import json
import logging
import threading
import os
import re
import shutil

import jax
import numpy as np
import pytest
from flax import serialization
from safetensors.numpy import load_file, save_file

from lcm_jax import component_config, lora, lora_files, weights
from lcm_jax.models import clip, clip_vision, unet, vae
from lcm_jax.models.params import unet_shapes
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.tokenizer import build_word_tokenizer
from lcm_jax.component_config import ConfigFileError
from lcm_jax.weights import WeightsError

from sd_models import WORDS, unet_kwargs


def _warnings(caplog):
    """This thread's warnings (an input pipeline another test left running may log from its own)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and r.thread == threading.get_ident()]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(str(folder), WORDS, model_max_length=16)
    return clip.load_tokenizer(folder)


# ----------------------------------------------------------------------------- item 8: truncation

LONG = "a photo of a cat" + " a dog" * 10  # 25 word tokens; 16 - BOS - EOS = 14 fit: 11 dropped


def test_truncated_prompts_warn_once_with_the_lost_text(tokenizer, caplog):
    with caplog.at_level(logging.WARNING):
        ids = clip.tokenize(tokenizer, [LONG, "a cat", LONG + " seven"])
    assert ids.shape == (3, 16)
    (msg,) = _warnings(caplog)  # one warning per call, not per prompt (nor transformers' own)
    assert "2 of 3 prompts were truncated" in msg and "up to 16 tokens" in msg, msg
    assert "up to 12 tokens dropped" in msg, msg  # the longest loss (LONG + " seven")
    assert "prompt 0 was truncated: 'dog a dog a dog a dog a dog a dog'" in msg, msg

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        clip.tokenize(tokenizer, ["a photo of a cat"])
        clip.tokenize(tokenizer, [LONG], warn_truncated=False)  # the trainer's per-batch captions
        clip.tokenize(tokenizer, ["a cat a dog"], max_length=6)  # exactly fits: BOS + 4 + EOS
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING):
        clip.tokenize(tokenizer, ["a cat a dog"], max_length=5)
    assert "up to 5 tokens (up to 1 tokens dropped)" in _warnings(caplog)[0]


def test_pipeline_encode_prompt_warns_on_truncation(teacher, caplog):
    pipe = LCMPipeline.from_pretrained(teacher)
    with caplog.at_level(logging.WARNING):
        pipe.encode_prompt([LONG, "a cat"])
    (msg,) = _warnings(caplog)
    assert "1 of 2 prompts were truncated" in msg and "up to 16 tokens" in msg, msg


# ----------------------------------------------------------------------------- item 9: config.json

def test_read_config_names_the_file_of_bad_json(tmp_path):
    (tmp_path / "config.json").write_text('{"in_channels": 4,\n "out_channels": 4,}')
    with pytest.raises(ConfigFileError, match=r"config\.json' is not valid JSON: .* line 2 column"):
        component_config.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text("[4, 4]")
    with pytest.raises(ConfigFileError, match=r"config\.json' holds a JSON array, expected an object"):
        component_config.read_config(str(tmp_path))
    (tmp_path / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigFileError, match=r"config\.json' is not a UTF-8"):
        component_config.read_config(str(tmp_path))


def _unet_cfg(**kw):
    return {**json.loads(json.dumps(unet_kwargs())), "_class_name": "UNet2DConditionModel", **kw}


def test_unet_config_unknown_keys_warn_and_wrong_types_raise(caplog):
    src = "/x/unet/config.json"
    with caplog.at_level(logging.WARNING):
        cfg = unet.UNetConfig.from_diffusers_config(
            _unet_cfg(block_out_chanels=[8, 8], act_fn="silu", _diffusers_version="0.30.0"), src)
    assert cfg.block_out_channels == (32, 64)
    (msg,) = _warnings(caplog)  # known diffusers keys (act_fn) and "_" metadata are not reported
    assert src in msg and "['block_out_chanels']" in msg and "UNet2DConditionModel" in msg, msg

    for key, value, expected in [("layers_per_block", "one", "int or a list"),
                                 ("in_channels", True, "expected int"),  # bool is no int
                                 ("block_out_channels", [32, "64"], "a list of int"),
                                 ("norm_eps", "1e-5", "expected float"),
                                 ("time_cond_proj_dim", 1.5, "int or null"),
                                 ("use_linear_projection", 0, "expected bool")]:
        with pytest.raises(ConfigFileError, match=rf"{src}: .*{re.escape(f'{key}={value!r}')} .*{expected}"):
            unet.UNetConfig.from_diffusers_config(_unet_cfg(**{key: value}), src)
    assert unet.UNetConfig.from_diffusers_config(_unet_cfg(freq_shift=0, sample_size=[8, 8])).freq_shift == 0


VAE_CFG = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=8, layers_per_block=1)


def test_vae_config_wrong_types_raise_unknown_keys_warn(caplog):
    src = "/x/vae/config.json"
    assert vae.VAEConfig.from_diffusers_config({**VAE_CFG, "latents_mean": [0, 1.5, 0, 0]}).latents_mean
    with pytest.raises(ConfigFileError, match=rf"{src}: .*scaling_factor='0.18' is a JSON string, expected float"):
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "scaling_factor": "0.18"}, src)
    with pytest.raises(ConfigFileError, match=rf"{src}: .*block_out_channels=64 .*a list of int"):
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "block_out_channels": 64}, src)
    with caplog.at_level(logging.WARNING):
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "laten_channels": 4}, src)
    assert f"{src}: ignoring unknown AutoencoderKL config keys ['laten_channels']" in caplog.text


def test_clip_configs_unknown_keys_warn_and_wrong_types_raise(caplog):
    import transformers

    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4).to_dict()
    # a transformers-4 config (openai/clip-vit-*'s text_config) carries generation keys: no warning
    old = {**text, "dropout": 0.0, "torch_dtype": "float32", "bad_words_ids": None, "top_k": 50}
    with caplog.at_level(logging.WARNING):
        assert clip.CLIPTextConfig.from_transformers_config(old).hidden_size == 32
    assert _warnings(caplog) == []
    with caplog.at_level(logging.WARNING):
        clip.CLIPTextConfig.from_transformers_config({**text, "hiden_size": 64}, "/x/text_encoder/config.json")
    (msg,) = _warnings(caplog)
    assert "/x/text_encoder/config.json" in msg and "['hiden_size']" in msg and "CLIPTextConfig" in msg, msg
    with pytest.raises(ConfigFileError, match=r"/x/te/config.json: CLIPTextConfig config hidden_size='32' "
                                              r"is a JSON string, expected int"):
        clip.CLIPTextConfig.from_transformers_config({**text, "hidden_size": "32"}, "/x/te/config.json")

    caplog.clear()
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                           image_size=32, patch_size=8).to_dict()
    with caplog.at_level(logging.WARNING):
        clip_vision.CLIPVisionConfig.from_transformers_config({**vision, "patch_sise": 4}, "clip vision_config")
    (msg,) = _warnings(caplog)
    assert "clip vision_config" in msg and "['patch_sise']" in msg, msg
    with pytest.raises(ConfigFileError, match="image_size=32.0 is a JSON number, expected int"):
        clip_vision.CLIPVisionConfig.from_transformers_config({**vision, "image_size": 32.0})


def test_known_key_lists_match_diffusers_and_transformers():
    """Our fields plus the keys we deliberately ignore are exactly what diffusers/transformers
    write, so the lists cannot drift: a new upstream key would otherwise warn on every load."""
    import diffusers
    import transformers

    def init_args(cls):
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    def fields(cls):
        return {f.name for f in dataclasses.fields(cls)}

    assert fields(unet.UNetConfig) | unet._FIXED_KEYS.keys() | unet._IGNORED_KEYS == \
        init_args(diffusers.UNet2DConditionModel)
    assert fields(vae.VAEConfig) | set(vae.CHECKED_KEYS) == init_args(diffusers.AutoencoderKL)
    assert not clip.CLIP_IGNORED_KEYS & clip.TRANSFORMERS_4_KEYS
    # with_projection is ours: it is read from "architectures", never a key of its own.
    for ours, theirs in [(fields(clip.CLIPTextConfig) - {"with_projection"}, transformers.CLIPTextConfig()),
                         (fields(clip_vision.CLIPVisionConfig), transformers.CLIPVisionConfig())]:
        written = {k for k in theirs.to_dict() if not k.startswith("_")}
        known = ours | clip.CLIP_IGNORED_KEYS
        assert written <= known, sorted(written - known)
        assert known - written == set(), sorted(known - written)
        # what transformers 4 also wrote (TRANSFORMERS_4_KEYS) is no key transformers 5 writes
        # except our own fields (a text config's token ids, null in a 4.x vision config)
        assert clip.TRANSFORMERS_4_KEYS & written <= ours, sorted(clip.TRANSFORMERS_4_KEYS & written)


def _copy(teacher, tmp_path):
    folder = str(tmp_path / "pipe")
    shutil.copytree(teacher, folder)
    return folder


def _edit_config(folder, component, **kw):
    path = os.path.join(folder, component, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    with open(path, "w") as f:
        json.dump({**cfg, **kw}, f)
    return path


@pytest.mark.parametrize("component, key, value", [("unet", "layers_per_block", "one"),
                                                   ("vae", "latent_channels", 4.0),
                                                   ("text_encoder", "num_hidden_layers", None)])
def test_from_pretrained_names_the_config_file(teacher, tmp_path, component, key, value):
    path = _edit_config(_copy(teacher, tmp_path), component, **{key: value})
    with pytest.raises(ConfigFileError, match=re.escape(f"{path}: ") + rf".*{key}={value!r}"):
        LCMPipeline.from_pretrained(os.path.dirname(os.path.dirname(path)))


def test_from_pretrained_warns_on_a_misspelt_key(teacher, tmp_path, caplog):
    folder = _copy(teacher, tmp_path)
    path = _edit_config(folder, "unet", norm_epss=1e-6)
    with caplog.at_level(logging.WARNING):
        LCMPipeline.from_pretrained(folder)
    assert any(path in m and "['norm_epss']" in m for m in _warnings(caplog)), _warnings(caplog)


# ----------------------------------------------------------------------------- item 12: weight dtypes, NaN

TEXT_CFG = clip.CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                               num_attention_heads=2, max_position_embeddings=8)
POS = "text_model.embeddings.position_embedding.weight"


def _state_dict(params):
    return {k: v.copy() for k, v in weights.flax_to_torch(params).items()}


@pytest.fixture(scope="module")
def text_model():
    model = clip.CLIPTextModel(TEXT_CFG)
    params = jax.device_get(clip.init_clip_params(model, jax.random.key(0)))
    return params, jax.eval_shape(functools.partial(clip.init_clip_params, model), jax.random.key(0))


def _save_state(folder, state):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(TEXT_CFG.to_transformers_config(), f)
    path = os.path.join(folder, "model.safetensors")
    save_file(state, path)
    return path


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_non_float_weight_is_refused(text_model, tmp_path, dtype):
    params, shapes = text_model
    state = _state_dict(params)
    state[POS] = np.ones(state[POS].shape, dtype)  # the right shape, the wrong kind
    state["text_model.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]  # a real int buffer
    _save_state(str(tmp_path), state)
    want = np.dtype(dtype).name
    with pytest.raises(WeightsError, match=rf"non-float tensors \(1\): {POS}: file has {want}, expected a float"):
        weights.load_params(str(tmp_path), shapes)
    state[POS] = state[POS].astype(np.float16)  # fp16/bf16 checkpoints still load, as float32
    _save_state(str(tmp_path), state)
    loaded, _ = weights.load_params(str(tmp_path), shapes)
    assert loaded["text_model"]["embeddings"]["position_embedding"]["embedding"].dtype == np.float32


def test_nonfinite_weights_warn_with_the_tensor_names(text_model, tmp_path, caplog):
    params, shapes = text_model
    state = _state_dict(params)
    state[POS][0, 0] = np.nan
    state["text_model.final_layer_norm.bias"][1] = np.inf
    path = _save_state(str(tmp_path), state)
    with caplog.at_level(logging.WARNING):
        weights.load_params(str(tmp_path), shapes)
    (msg,) = _warnings(caplog)
    assert path in msg and "tensors with NaN or inf values (2)" in msg and POS in msg \
        and "text_model.final_layer_norm.bias" in msg, msg


def test_msgpack_non_float_refused_and_nonfinite_warns(text_model, tmp_path, caplog):
    params, shapes = text_model
    bad = jax.tree_util.tree_map(np.array, params)
    bad["text_model"]["final_layer_norm"]["scale"] = np.ones(8, np.int32)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(bad))
    with pytest.raises(WeightsError, match=r"non-float params, expected float \(1\): "
                                           r"text_model/final_layer_norm/scale: int32"):
        weights.load_params(str(tmp_path), shapes)
    bad["text_model"]["final_layer_norm"]["scale"] = np.full(8, np.nan, np.float32)
    (tmp_path / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(bad))
    with caplog.at_level(logging.WARNING):
        weights.load_params(str(tmp_path), shapes)
    (msg,) = _warnings(caplog)
    assert "flax_model.msgpack" in msg and "text_model/final_layer_norm/scale" in msg, msg


@pytest.fixture(scope="module")
def unet_lora():
    shapes = unet_shapes(unet.UNet2DConditionModel(unet.UNetConfig(**unet_kwargs())))
    tree = lora.init_lora(shapes, 2, rng=jax.random.key(1))
    tree = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.1, tree)  # up != 0
    return shapes, tree


def test_lora_non_float_refused_and_nonfinite_warns(unet_lora, tmp_path, caplog):
    shapes, tree = unet_lora
    path = lora_files.save_lora_weights(str(tmp_path), tree)
    state = load_file(path)
    key = sorted(k for k in state if k.endswith("lora_A.weight"))[0]
    ints = {**state, key: np.ones(state[key].shape, np.int64)}
    save_file(ints, path)
    with pytest.raises(lora.LoraError, match=rf"{key}: dtype int64, expected a float tensor"):
        lora_files.load_lora(str(tmp_path), shapes)
    with pytest.raises(lora.LoraError, match=rf"{key}: dtype int64"):
        lora_files.load_lora(ints, shapes)

    nan = {**state, key: np.full(state[key].shape, np.nan, np.float32)}
    save_file(nan, path)
    with caplog.at_level(logging.WARNING):
        lora_files.load_lora(str(tmp_path), shapes)
        lora_files.load_lora(nan, shapes)
    file_msg, dict_msg = _warnings(caplog)
    assert path in file_msg and f"tensors with NaN or inf values (1): {key}" in file_msg, file_msg
    assert "LoRA state dict" in dict_msg and key in dict_msg, dict_msg
