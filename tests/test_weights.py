"""The weight loader's file forms (sharded, variants, Flax) and strictness, on tiny diffusers UNets."""
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import sd_models
from lcm_jax import component_config, weights
from lcm_jax.models.embeddings import guidance_embedding
from lcm_jax.models.unet import UNet2DConditionModel, UNetConfig
from lcm_jax.models.params import unet_shapes
from lcm_jax.pipeline import LCMPipeline
from lcm_jax.weights import WeightsError, load_params

COND_PROJ = ("time_embedding", "cond_proj", "kernel")


@pytest.fixture(scope="module")
def torch_unet():
    return sd_models.make_unet()


@pytest.fixture(scope="module")
def target(torch_unet):
    """Param shapes of our UNet for the tiny diffusers config."""
    return unet_shapes(UNet2DConditionModel(UNetConfig.from_diffusers_config(dict(torch_unet.config))))


def _state(module, dtype=torch.float32):
    return {k: v.detach().to(dtype).float().numpy() for k, v in module.state_dict().items()}


def _assert_loaded(params, want):
    got = weights.flax_to_torch(params)
    assert set(got) == set(want)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_sharded_checkpoint(torch_unet, target, tmp_path):
    torch_unet.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 5
    params, missing = load_params(str(tmp_path), target)
    assert missing == []
    _assert_loaded(params, _state(torch_unet))


def test_sharded_text_encoder(tmp_path):
    """transformers' shard names (model.safetensors.index.json) and its text_model. prefix."""
    from lcm_jax.models.clip import CLIPTextConfig, CLIPTextModel
    from lcm_jax.models.params import text_shapes
    te = sd_models.make_text_encoder()
    te.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = CLIPTextModel(CLIPTextConfig.from_transformers_config(component_config.read_config(str(tmp_path))))
    params, _ = load_params(str(tmp_path), text_shapes(model))
    got = weights.flax_to_torch(params)
    for k, v in te.state_dict().items():
        if not k.endswith("position_ids"):
            np.testing.assert_array_equal(got[k if k.startswith("text_model.") else "text_model." + k],
                                          v.numpy(), err_msg=k)


def test_variants(torch_unet, target, tmp_path, caplog):
    fp32, fp16, bf16 = _state(torch_unet), _state(torch_unet, torch.float16), _state(torch_unet, torch.bfloat16)
    assert any(not np.array_equal(fp32[k], fp16[k]) for k in fp32)  # the variants differ
    half = sd_models.make_unet().half()
    both = tmp_path / "both"  # what save_pretrained and save_pretrained(variant="fp16") leave
    torch_unet.save_pretrained(both)
    half.save_pretrained(both, variant="fp16")
    assert (both / "diffusion_pytorch_model.fp16.safetensors").is_file()
    _assert_loaded(load_params(str(both), target, variant="fp16")[0], fp16)
    _assert_loaded(load_params(str(both), target)[0], fp32)  # no variant: the default weights

    only16 = tmp_path / "only16"  # a folder downloaded with variant="fp16" alone still loads
    half.save_pretrained(only16, variant="fp16", max_shard_size="20KB")  # sharded, too
    assert (only16 / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    _assert_loaded(load_params(str(only16), target)[0], fp16)
    _assert_loaded(load_params(str(only16), target, variant="fp16")[0], fp16)

    two = tmp_path / "two"  # several variants and no default: the caller must choose
    half.save_pretrained(two, variant="fp16")
    sd_models.make_unet().to(torch.bfloat16).save_pretrained(two, variant="bf16")
    with pytest.raises(FileNotFoundError, match=r"no default weights but the variants \['bf16', 'fp16'\]"):
        load_params(str(two), target)
    _assert_loaded(load_params(str(two), target, variant="bf16")[0], bf16)  # bf16 files read too

    plain = tmp_path / "plain"  # an absent variant falls back to the default, as diffusers' pipelines
    torch_unet.save_pretrained(plain)
    with caplog.at_level(logging.WARNING):
        _assert_loaded(load_params(str(plain), target, variant="fp16")[0], fp32)
    assert "no 'fp16' variant" in caplog.text


def test_missing_weights_file(target, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        load_params(str(tmp_path), target)
    assert str(tmp_path) in str(e.value)
    assert "diffusion_pytorch_model.safetensors" in str(e.value) and "model.safetensors" in str(e.value)
    assert "diffusion_pytorch_model.safetensors.index.json" in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.fp16\.safetensors"):
        load_params(str(tmp_path), target, variant="fp16")
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.bin.*convert them to safetensors"):
        load_params(str(tmp_path), target)
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        load_params(str(tmp_path / "nope"), target)


def test_corrupt_files_are_named(torch_unet, target, tmp_path):
    single = tmp_path / "single"
    torch_unet.save_pretrained(single)
    path = single / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted download
    with pytest.raises(WeightsError, match=rf"cannot read safetensors file '{path}'.*truncated"):
        load_params(str(single), target)
    path.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(WeightsError, match=rf"'{path}'"):
        load_params(str(single), target)

    sharded = tmp_path / "sharded"
    torch_unet.save_pretrained(sharded, max_shard_size="20KB")
    gone = sorted(sharded.glob("*-of-*.safetensors"))[3]
    gone.unlink()
    with pytest.raises(WeightsError, match=rf"'{gone}'"):
        load_params(str(sharded), target)
    index = sharded / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("{not json")
    with pytest.raises(WeightsError, match=rf"cannot read shard index '{index}'"):
        load_params(str(sharded), target)


def test_one_error_lists_every_mismatch(torch_unet, target, tmp_path):
    state = _state(torch_unet)
    del state["conv_in.bias"]
    state["bogus.weight"] = np.zeros(3, np.float32)
    state["conv_out.weight"] = state["conv_out.weight"][:, :-1]
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightsError) as e:
        load_params(str(tmp_path), target)
    msg = str(e.value)
    assert "missing keys (1): conv_in.bias" in msg
    assert "unexpected keys (1): bogus.weight" in msg
    assert "shape mismatches (1): conv_out.weight: file has (4, 31, 3, 3), model expects (4, 32, 3, 3)" in msg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("teacher"))
    sd_models.make_sd_pipeline(d)
    return d


def test_student_from_teacher(teacher_dir, tmp_path):
    assert json.loads(open(os.path.join(teacher_dir, "unet", "config.json")).read()).get("time_cond_proj_dim") is None
    teacher = LCMPipeline.from_pretrained(teacher_dir)
    student = LCMPipeline.from_pretrained(teacher_dir, unet_overrides={"time_cond_proj_dim": 256})
    noisy = LCMPipeline.from_pretrained(teacher_dir, unet_overrides={"time_cond_proj_dim": 256},
                                        zero_init_cond_proj=False)
    assert student.is_lcm and not teacher.is_lcm
    kernel = student.unet_params["time_embedding"]["cond_proj"]["kernel"]
    assert kernel.shape == (256, 32) and not np.any(kernel)
    assert np.any(noisy.unet_params["time_embedding"]["cond_proj"]["kernel"])
    same = {k: v for k, v in weights.flax_to_torch(student.unet_params).items() if "cond_proj" not in k}
    _assert_loaded(teacher.unet_params, same)  # every other param is the teacher's

    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700], np.int32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    w_emb = guidance_embedding(jnp.array([3.0, 7.0]), 256)
    ref = jax.jit(lambda p: teacher.unet.apply({"params": p}, z, t, ctx))(teacher.unet_params)
    run_student = jax.jit(lambda p: student.unet.apply({"params": p}, z, t, ctx, w_emb))
    np.testing.assert_array_equal(run_student(student.unet_params), ref)
    assert np.abs(np.asarray(run_student(noisy.unet_params)) - np.asarray(ref)).max() > 1e-3

    # only cond_proj may be missing: any other gap in the teacher's file is still an error
    broken = tmp_path / "unet"
    shutil.copytree(os.path.join(teacher_dir, "unet"), broken)
    state = weights.read_safetensors(str(broken / "diffusion_pytorch_model.safetensors"))
    del state["conv_in.bias"]
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    student_shapes = unet_shapes(student.unet)
    with pytest.raises(WeightsError) as e:
        load_params(str(broken), student_shapes, allow_missing=[COND_PROJ])
    assert "missing keys (1): conv_in.bias" in str(e.value)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): time_embedding\.cond_proj\.weight"):
        load_params(os.path.join(teacher_dir, "unet"), student_shapes)  # not allowed unless asked
    params, missing = load_params(os.path.join(teacher_dir, "unet"), student_shapes, allow_missing=[COND_PROJ])
    assert missing == [COND_PROJ] and "cond_proj" not in params["time_embedding"]
