"""CLIP vision tower and CLIP score: a tiny random transformers CLIPModel folder -> our scorer."""
import re
import os
import shutil

import jax
import numpy as np
import pytest
import torch

from lcm_jax.eval.clip_score import CLIPScorer
from lcm_jax.models import clip_vision
from lcm_jax.tokenizer import build_word_tokenizer
from lcm_jax.weights import WeightsError
from sd_models import perturb_

ATOL = 1e-4
WORDS = ("a", "photo", "of", "cat", "dog", "handwritten", "digit", "seven")
PROMPTS = ["a photo of a cat", "a dog", "", "a photo of a dog " * 30, "a handwritten digit seven"]


def _image_processor(**kw):
    """transformers' PIL CLIPImageProcessor (the default one without torchvision)."""
    import transformers
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(**kw)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """CLIPModel + CLIPImageProcessor + CLIPTokenizer saved as a hub CLIP folder; (folder, torch model, processor)."""
    from transformers import CLIPConfig, CLIPModel
    folder = str(tmp_path_factory.mktemp("clip"))
    tok = build_word_tokenizer(folder, WORDS, model_max_length=77)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    cfg = CLIPConfig(text_config=dict(layers, vocab_size=len(tok), max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(layers, image_size=32, patch_size=8, hidden_act="gelu"),
                     projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    perturb_(model, scale=0.1)  # norms and projections away from their init
    model.save_pretrained(folder)
    processor = _image_processor(size=32, crop_size=32)
    processor.save_pretrained(folder)
    return folder, model, processor, tok


@pytest.fixture(scope="module")
def scorer(clip_folder):
    return CLIPScorer.from_pretrained(clip_folder[0])


def _images(seed=0):
    """uint8 [N, H, W, 3]: non-square (resize + crop) and 16x16 (upsampled, as the tiny teacher's)."""
    rng = np.random.default_rng(seed)
    smooth = lambda a: np.clip(a.cumsum(1).cumsum(2) / 8 % 256, 0, 255)  # noqa: E731  structure, not only noise
    return [smooth(rng.uniform(0, 64, (n, h, w, 3))).astype(np.uint8)
            for n, h, w in ((3, 40, 48), (2, 16, 16), (2, 50, 33))]


def _features(out):
    """transformers 5 returns the projected features as ``pooler_output``; 4 returns the tensor."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()


def test_preprocessing_matches_clip_image_processor(clip_folder, scorer):
    _, _, processor, _ = clip_folder
    for images in _images():
        ref = processor(images=list(images), return_tensors="np").pixel_values
        ours = scorer.processing(images)
        assert ours.shape == ref.shape == (len(images), 3, 32, 32) and ours.dtype == np.float32
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_embeddings_match_transformers(clip_folder, scorer):
    _, model, processor, tok = clip_folder
    images = _images()[0]
    pixels = processor(images=list(images), return_tensors="np").pixel_values  # [3, 3, 32, 32]
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_img = _features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
        ref_vis = model.vision_model(pixel_values=torch.from_numpy(pixels))
        ref_txt = _features(model.get_text_features(input_ids=ids))
    vision = scorer.vision_model
    out = jax.jit(lambda p, x: vision.apply({"params": p}, x))(scorer.params["vision"], pixels)
    assert out.image_embeds.shape == (3, 16) and out.last_hidden_state.shape == (3, 17, 32)
    np.testing.assert_allclose(out.last_hidden_state, ref_vis.last_hidden_state.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.pooler_output, ref_vis.pooler_output.numpy(), atol=ATOL, rtol=0)
    np.testing.assert_allclose(out.image_embeds, ref_img, atol=ATOL, rtol=0)
    np.testing.assert_allclose(scorer.image_embeds(images), ref_img, atol=ATOL, rtol=0)  # our preprocessing
    np.testing.assert_allclose(scorer.text_embeds(PROMPTS), ref_txt, atol=ATOL, rtol=0)
    assert np.abs(ref_img).max() > 0.1 and np.abs(ref_txt).max() > 0.1  # not trivially small


def _torch_similarities(clip_folder, images, prompts):
    """100 * cos of transformers' projected features (torchmetrics' _clip_score_update)."""
    _, model, processor, tok = clip_folder
    pixels = torch.from_numpy(processor(images=list(images), return_tensors="np").pixel_values)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img = torch.from_numpy(_features(model.get_image_features(pixel_values=pixels)))
        txt = torch.from_numpy(_features(model.get_text_features(input_ids=ids)))
    img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
    return (100 * (img * txt).sum(-1)).numpy()


def test_score_matches_the_torch_formula(clip_folder, scorer, monkeypatch):
    images = np.concatenate([im for im in _images() if im.shape[1:] == (16, 16, 3)] + [_images(1)[1]])  # [4, ...]
    prompts = PROMPTS[:4]
    ref = _torch_similarities(clip_folder, images, prompts)
    sims = scorer.similarities(images, prompts)
    np.testing.assert_allclose(sims, ref, atol=1e-3, rtol=0)
    assert ref.mean() > 1.0, ref  # the clamp at 0 is not all this sees
    np.testing.assert_allclose(scorer.score(images, prompts), max(ref.mean(), 0.0), atol=1e-3, rtol=0)
    # torchmetrics clamps the mean at 0, not each pair (measured cosines here are all > 0)
    for fake, want in (([-10.0, 30.0], 10.0), ([-10.0, 4.0], 0.0)):
        monkeypatch.setattr(scorer, "similarities", lambda *_: np.array(fake))
        assert scorer.score(images[:2], prompts[:2]) == want
    monkeypatch.undo()
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, prompts[:3])
    with pytest.raises(ValueError, match="uint8 images"):
        scorer.score(images.astype(np.float32), prompts)


def test_score_matches_torchmetrics_if_installed(clip_folder, scorer):
    multimodal = pytest.importorskip("torchmetrics.multimodal")
    images = _images()[1]
    metric = multimodal.CLIPScore(model_name_or_path=clip_folder[0])
    metric.update(list(torch.from_numpy(images).permute(0, 3, 1, 2)), PROMPTS[:2])
    np.testing.assert_allclose(scorer.score(images, PROMPTS[:2]), float(metric.compute()), atol=1e-3)


def test_batches_are_one_shape(clip_folder):
    small = CLIPScorer.from_pretrained(clip_folder[0], batch_size=3)
    images = _images()[2]
    images = np.concatenate([images, images, images[:1]])  # 5 -> chunks of 3, the last padded
    np.testing.assert_allclose(small.similarities(images, PROMPTS),
                               _torch_similarities(clip_folder, images, PROMPTS), atol=1e-3, rtol=0)


def test_loading_is_strict_and_names_the_folder(clip_folder, tmp_path):
    from safetensors.numpy import load_file, save_file
    src = clip_folder[0]
    bad = tmp_path / "bad_weights"
    shutil.copytree(src, bad)
    sd = load_file(str(bad / "model.safetensors"))
    sd.pop("visual_projection.weight")
    sd["vision_model.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"bad_weights(.|\n)*missing keys \(1\): visual_projection.weight"
                                           r"(.|\n)*unexpected keys \(1\): vision_model.extra.weight"):
        CLIPScorer.from_pretrained(str(bad))

    no_proc = tmp_path / "no_processor"
    shutil.copytree(src, no_proc)
    os.remove(no_proc / "preprocessor_config.json")
    with pytest.raises(FileNotFoundError, match="no_processor.*has no preprocessor_config.json"):
        CLIPScorer.from_pretrained(str(no_proc))

    text_only = tmp_path / "text_only"  # a CLIPTextModel folder is not a CLIPModel
    shutil.copytree(src, text_only)
    (text_only / "config.json").write_text('{"model_type": "clip_text_model"}')
    with pytest.raises(ValueError, match="text_only.*config.json.*model_type 'clip'"):
        CLIPScorer.from_pretrained(str(text_only))

    wrong_size = tmp_path / "wrong_size"
    shutil.copytree(src, wrong_size)
    _image_processor(size=48, crop_size=48).save_pretrained(str(wrong_size))
    with pytest.raises(ValueError, match="vision tower takes 32x32"):
        CLIPScorer.from_pretrained(str(wrong_size))


def test_weights_round_trip_to_the_file(clip_folder, scorer):
    """Our renaming both ways: the params give back every tensor of model.safetensors but logit_scale."""
    from safetensors.numpy import load_file
    from lcm_jax.weights import flax_to_torch
    sd = load_file(os.path.join(clip_folder[0], "model.safetensors"))
    back = flax_to_torch({**scorer.params["text"], **scorer.params["vision"]})
    assert set(back) == set(sd) - {"logit_scale"}
    assert back["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)  # OIHW
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_vision_config_errors():
    with pytest.raises(ValueError, match="patch_size"):
        clip_vision.CLIPVisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="clip_vision_model"):
        clip_vision.CLIPVisionConfig.from_transformers_config({"model_type": "clip_text_model"})


# ----------------------------------------------------------------------------- in-loop evaluation


def _eval_config(teacher, clip_model):
    from training import small_config
    return small_config(teacher, eval_every=1, **{"data.source": "folder", "eval.clip_model": clip_model,
                                                 "eval.steps": (1,), "eval.images_per_prompt": 1})


@pytest.mark.slow
def test_evaluator_reports_clip_score_and_latent_mse(teacher, clip_folder, tmp_path):
    from lcm_jax import trainer
    from lcm_jax.eval.inloop import make_evaluator
    from lcm_jax.pipeline import LCMPipeline
    config = _eval_config(teacher, clip_folder[0])
    pipe = LCMPipeline.from_pretrained(teacher)
    evaluate = make_evaluator(config, pipe, str(tmp_path))
    student, params = trainer.build_student(pipe.unet, pipe.unet_params, config)
    out = evaluate(student, params)
    assert set(out) == {"clip_score_1", "latent_mse_1"} and all(np.isfinite(v) for v in out.values()), out
    assert out["clip_score_1"] >= 0.0 and out["latent_mse_1"] > 0.0


@pytest.mark.parametrize("name", ["no_such_clip", "empty"])
def test_evaluator_rejects_a_bad_clip_folder_at_construction(teacher, tmp_path, name):
    from lcm_jax.eval.inloop import make_evaluator
    from lcm_jax.pipeline import LCMPipeline
    path = tmp_path / name
    if name == "empty":
        path.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{name}.*expected a transformers CLIP folder"):
        make_evaluator(_eval_config(teacher, str(path)), LCMPipeline.from_pretrained(teacher), str(tmp_path))


def test_evaluator_is_chosen_by_config(teacher, tmp_path, monkeypatch):
    """config.eval.evaluator names the evaluator: a known name or any module path with make_evaluator;
    an unknown name fails in validate_config, before any model is loaded."""
    from lcm_jax import trainer
    from lcm_jax.eval.inloop import make_evaluator
    from lcm_jax.pipeline import LCMPipeline
    from training import small_config
    package = tmp_path / "my_evals"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "count.py").write_text(
        "def make_evaluator(config, pipe, workdir):\n"
        "    return lambda unet, params: {'made_in': workdir, 'steps': len(config.eval.steps)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = small_config(teacher, eval_every=1, **{"eval.evaluator": "my_evals.count"})
    evaluate = make_evaluator(config, LCMPipeline.from_pretrained(teacher), "WD")
    assert evaluate(None, None) == {"made_in": "WD", "steps": len(config.eval.steps)}
    with pytest.raises(ValueError, match=re.escape("config.eval.evaluator 'clip': expected one of reference | digits")):
        trainer.validate_config(small_config(teacher, eval_every=1, **{"eval.evaluator": "clip"}))
