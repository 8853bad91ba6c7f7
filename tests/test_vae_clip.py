"""VAE and CLIP text encoder: tiny random diffusers/transformers models -> our Flax modules."""
import json
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lcm_jax.models import clip, vae
from lcm_jax.tokenizer import build_word_tokenizer
from lcm_jax.weights import flax_to_torch, torch_to_flax

ATOL = 1e-4


WORDS = ("a", "photo", "of", "cat", "dog")


def _perturb(module, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def _state_dict(module, prefix=""):
    return {prefix + k: v.detach().numpy() for k, v in module.state_dict().items()}


def _assert_round_trip(params, state_dict):
    back = flax_to_torch(params)
    assert set(back) == set(state_dict)
    for k, v in state_dict.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


# ----------------------------------------------------------------------------- VAE

VAE_CFG = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
               latent_channels=4, norm_num_groups=32, sample_size=32,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


@pytest.fixture(scope="module")
def torch_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return _perturb(AutoencoderKL(**VAE_CFG))


def test_vae_matches_diffusers(torch_vae):
    cfg = vae.VAEConfig.from_diffusers_config(dict(torch_vae.config))
    model = vae.AutoencoderKL(cfg)
    sd = _state_dict(torch_vae)
    params, _ = torch_to_flax(sd, jax.eval_shape(partial(vae.init_vae_params, model), jax.random.key(0)))
    _assert_round_trip(params, sd)

    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    z = np.random.default_rng(1).standard_normal((2, 4, 16, 16)).astype(np.float32)
    with torch.no_grad():
        dist = torch_vae.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
        ref_dec = torch_vae.decode(torch.from_numpy(z)).sample.numpy()

    mean, logvar = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))(params, x)
    dec = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))(params, z)
    assert mean.shape == logvar.shape == (2, 4, 16, 16) and dec.shape == (2, 3, 32, 32)
    assert mean.dtype == dec.dtype == jnp.float32
    np.testing.assert_allclose(mean, ref_mean, atol=ATOL, rtol=0)
    np.testing.assert_allclose(logvar, ref_logvar, atol=ATOL, rtol=0)
    np.testing.assert_allclose(dec, ref_dec, atol=ATOL, rtol=0)
    assert np.abs(ref_dec).max() > 0.1 and np.abs(ref_mean).max() > 0.1  # not trivially small


@pytest.mark.parametrize("extra", [dict(mid_block_add_attention=False),
                                   dict(use_quant_conv=False, use_post_quant_conv=False),
                                   dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                                        down_block_types=("DownEncoderBlock2D",) * 3,
                                        up_block_types=("UpDecoderBlock2D",) * 3)])
def test_vae_variants_map_strictly(extra):
    from diffusers import AutoencoderKL

    tv = AutoencoderKL(**{**VAE_CFG, **extra})
    cfg = vae.VAEConfig.from_diffusers_config(dict(tv.config))
    shapes = jax.eval_shape(partial(vae.init_vae_params, vae.AutoencoderKL(cfg)), jax.random.key(0))
    sd = _state_dict(tv)
    params, missing = torch_to_flax(sd, shapes)
    assert not missing
    _assert_round_trip(params, sd)


def test_vae_config_round_trip_and_errors(torch_vae, caplog):
    from diffusers import AutoencoderKL

    cfg = vae.VAEConfig.from_diffusers_config(dict(torch_vae.config))
    assert cfg.block_out_channels == (32, 64) and cfg.scaling_factor == 0.18215 and cfg.shift_factor is None
    again = AutoencoderKL.from_config(cfg.to_diffusers_config())
    assert vae.VAEConfig.from_diffusers_config(dict(again.config)) == cfg
    json.dumps(cfg.to_diffusers_config())
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D"):
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "down_block_types": ["AttnDownEncoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="act_fn"):
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "act_fn": "relu"})
    with caplog.at_level("WARNING"):  # a key diffusers does not know: named, not fatal (diffusers warns too)
        vae.VAEConfig.from_diffusers_config({**VAE_CFG, "bogus": 1})
    assert "unknown AutoencoderKL config keys ['bogus']" in caplog.text


def test_vae_bf16_and_latent_helpers():
    cfg = vae.VAEConfig(block_out_channels=(32,), latent_channels=4)
    m32, m16 = vae.AutoencoderKL(cfg), vae.AutoencoderKL(cfg, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(partial(vae.init_vae_params, m32), jax.random.key(0))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    rng = np.random.default_rng(0)  # (jitting the real init costs ~10 s of CPU compile)
    params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32) + 1.0 * (
        len(s.shape) == 1), shapes)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32)
    encode = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x, method=m.encode))
    mean32, logvar32 = encode(m32)(params, x)
    mean16, _ = encode(m16)(params, x)
    assert mean16.dtype == jnp.float32 and mean16.shape == (2, 4, 8, 8)
    assert np.abs(mean16 - mean32).max() < 0.05 * np.abs(mean32).max()

    assert vae.latent_mode(mean32, logvar32) is mean32
    s1 = vae.sample_latent(mean32, logvar32, jax.random.key(1))
    s2 = vae.sample_latent(mean32, logvar32, jax.random.key(1))
    np.testing.assert_array_equal(s1, s2)
    std = np.exp(0.5 * np.asarray(logvar32))
    eps = (np.asarray(s1) - np.asarray(mean32)) / std
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1
    big = vae.sample_latent(jnp.zeros((1, 4, 2, 2)), jnp.full((1, 4, 2, 2), -30.0), jax.random.key(0))
    assert np.abs(big).max() < 1e-5


# ----------------------------------------------------------------------------- CLIP

CLIP_CFG = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1000, max_position_embeddings=77)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(str(folder), WORDS, model_max_length=77)
    return clip.load_tokenizer(folder)


def _torch_clip(tokenizer, cls_name="CLIPTextModel", **kw):
    import transformers

    cfg = transformers.CLIPTextConfig(**{**CLIP_CFG, "bos_token_id": tokenizer.bos_token_id,
                                         "eos_token_id": tokenizer.eos_token_id,
                                         "pad_token_id": tokenizer.pad_token_id, **kw})
    torch.manual_seed(0)
    return _perturb(getattr(transformers, cls_name)(cfg))


def _ids(tokenizer):
    ids = clip.tokenize(tokenizer, ["a photo of a cat", "a dog", "", "a photo of a dog " * 30], 77)
    rand = np.random.default_rng(0).integers(0, 1000, (1, 77), dtype=np.int32)  # no EOS at all
    return np.concatenate([ids, rand])


@pytest.mark.parametrize("act,eos", [("quick_gelu", None), ("gelu", 2)])
def test_clip_matches_transformers(tokenizer, tmp_path, act, eos):
    tm = _torch_clip(tokenizer, hidden_act=act)
    if eos is not None:
        tm.config.eos_token_id = tm.eos_token_id = eos  # legacy configs: pooled at argmax(ids)
    cfg = clip.CLIPTextConfig.from_transformers_config(tm.config.to_dict())
    assert cfg.hidden_act == act and cfg.eos_token_id == tm.eos_token_id
    model = clip.CLIPTextModel(cfg)
    # transformers 5 keeps CLIPTextModel's weights without the "text_model." prefix in memory
    # (hub checkpoints and our export have it; transformers loads both).
    sd = _state_dict(tm, "text_model.")
    params, _ = torch_to_flax(sd, jax.eval_shape(partial(clip.init_clip_params, model), jax.random.key(0)))
    _assert_round_trip(params, sd)

    ids = _ids(tokenizer)
    mask = (np.arange(77)[None] <= np.argmax(ids == tokenizer.eos_token_id, -1)[:, None]).astype(np.int32)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids).long(), output_hidden_states=True)
        ref_m = tm(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m, output_hidden_states=True))
    out = fn(params, ids, None)
    out_m = fn(params, ids, mask)
    assert out.last_hidden_state.shape == (5, 77, 32) and out.pooler_output.shape == (5, 32)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), atol=ATOL, rtol=0)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(out.hidden_states, ref.hidden_states):
        np.testing.assert_allclose(a, b.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out_m.last_hidden_state, ref_m.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out_m.pooler_output, ref_m.pooler_output.numpy(), atol=ATOL, rtol=0)

    back = _export_and_reload(params, cfg, type(tm), tmp_path)
    with torch.no_grad():
        again = back(input_ids=torch.from_numpy(ids).long())
    np.testing.assert_allclose(again.pooler_output.numpy(), ref.pooler_output.numpy(), atol=1e-6, rtol=0)


def _export_and_reload(params, cfg, cls, folder):
    """What we would export (text_model.* keys + config.json), transformers loads strictly."""
    from safetensors.numpy import save_file

    save_file(flax_to_torch(params), str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_transformers_config()))
    back, info = cls.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return back.eval()


def test_clip_with_projection_and_export(tokenizer, tmp_path):
    import transformers

    tm = _torch_clip(tokenizer, "CLIPTextModelWithProjection", projection_dim=16)
    # architectures is only filled in on save; a config.json on disk has it.
    cfg = clip.CLIPTextConfig.from_transformers_config(
        {**tm.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    assert cfg.with_projection
    model = clip.CLIPTextModel(cfg)
    sd = _state_dict(tm)
    params, _ = torch_to_flax(sd, jax.eval_shape(partial(clip.init_clip_params, model), jax.random.key(0)))
    _assert_round_trip(params, sd)
    ids = _ids(tokenizer)
    with torch.no_grad():
        ref = tm(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy()
    out = model.apply({"params": params}, ids)
    np.testing.assert_allclose(out.text_embeds, ref, atol=ATOL, rtol=0)

    back = _export_and_reload(params, cfg, transformers.CLIPTextModelWithProjection, tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(back(input_ids=torch.from_numpy(ids).long()).text_embeds.numpy(), ref,
                                   atol=1e-6, rtol=0)


def test_clip_config_round_trip_and_errors():
    import transformers

    cfg = clip.CLIPTextConfig(num_hidden_layers=23, hidden_act="gelu", hidden_size=1024,
                              num_attention_heads=16)  # SD 2.x
    tc = transformers.CLIPTextConfig.from_dict(cfg.to_transformers_config())
    assert clip.CLIPTextConfig.from_transformers_config(tc.to_dict()) == cfg
    with pytest.raises(ValueError, match="relu"):
        clip.CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="clip_vision_model"):
        clip.CLIPTextConfig.from_transformers_config({"model_type": "clip_vision_model"})
    model = clip.CLIPTextModel(clip.CLIPTextConfig(**CLIP_CFG))
    params = jax.eval_shape(partial(clip.init_clip_params, model), jax.random.key(0))
    with pytest.raises(ValueError, match="78"):
        jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((1, 78), jnp.int32)), params)


def test_tokenizer(tokenizer, tmp_path):
    ids = clip.tokenize(tokenizer, ["a photo of a cat", "a dog " * 100], 77)
    assert ids.dtype == np.int32 and ids.shape == (2, 77)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert ids[0, 0] == bos and ids[0, 6] == eos and (ids[0, 6:] == eos).all()  # padded with pad == eos
    assert ids[1, 0] == bos and ids[1, -1] == eos and (ids[1, 1:-1] != eos).all()  # truncated
    assert clip.tokenize(tokenizer, "a cat").shape == (1, 77)  # model_max_length by default
    assert clip.tokenize(tokenizer, ["a cat"], 8).shape == (1, 8)

    raw = tmp_path / "raw"  # diffusers-style folder: vocab.json + merges.txt only
    build_word_tokenizer(str(tmp_path / "fast"), WORDS, model_max_length=77)
    bpe = json.loads((tmp_path / "fast" / "tokenizer.json").read_text())["model"]
    raw.mkdir()
    (raw / "vocab.json").write_text(json.dumps(bpe["vocab"]))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in bpe["merges"]))
    np.testing.assert_array_equal(clip.tokenize(clip.load_tokenizer(raw), ["a photo of a cat"], 77), ids[:1])

    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        clip.load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        clip.load_tokenizer(tmp_path / "empty")
