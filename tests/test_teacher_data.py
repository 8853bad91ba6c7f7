"""Data-free distillation (data.source="teacher", lcm_jax.data.teacher_data): the cache holds
exactly the teacher's own samples of the cycled prompts; training generates it once, reuses it
afterwards and trains from it as from any latent cache; bad settings fail before any model loads."""
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import trainer  # noqa: E402
from lcm_jax.data import cache as cache_lib  # noqa: E402
from lcm_jax.data import teacher_data  # noqa: E402
from lcm_jax.data.input_pipeline import make_pipeline  # noqa: E402
from lcm_jax.pipeline import LCMPipeline  # noqa: E402
from training import data_config, metrics  # noqa: E402
from training import small_config as train_config  # noqa: E402

PROMPTS = ("a handwritten digit seven", "a handwritten digit zero", "a handwritten digit three")
GEN = dict(num_inference_steps=2, guidance_scale=4.0, scheduler="dpm++", height=16, width=16, output_type="latent")


def small_config(teacher, **overrides):
    """training.small_config, 2 steps, no checkpoints, 7 teacher examples in batches of 4 (one padded)."""
    return train_config(teacher, **{
        "num_steps": 2, "checkpoint_every": 0, "data.source": "teacher", "data.prompts": PROMPTS,
        "data.num_examples": 7, "data.teacher_batch": 4, "data.teacher_steps": 2, "data.teacher_scheduler": "dpm++",
        "data.teacher_guidance": 4.0, **overrides})


@pytest.fixture(scope="module")
def generated(teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher_data") / "cache")
    index = teacher_data.write_teacher_cache(small_config(teacher), out, LCMPipeline.from_pretrained(teacher),
                                             shard_size=5)
    return out, index


def test_cache_holds_the_teachers_samples(teacher, generated):
    """Row i: prompt i % 3, the latent of pipe(batch, seed=seed + batch index, output_type="latent")
    (unscaled, logvar at the floor), the prompt's embedding; the index says how it was made."""
    path, index = generated
    pipe = LCMPipeline.from_pretrained(teacher)  # a fresh pipeline: nothing shared with the writer
    assert index == cache_lib.read_index(path) and index["source"] == "teacher"
    assert index["num_examples"] == 7 and [s["num_examples"] for s in index["shards"]] == [5, 2]
    assert index["identity"] == cache_lib.model_identity(pipe) and index["latent_shape"] == [4, 8, 8]
    assert index["generation"] == {"prompts": list(PROMPTS), "num_examples": 7, "scheduler": "dpm++", "steps": 2,
                                   "guidance": 4.0, "seed": 0, "batch": 4}
    cache_lib.check_compatible(path, pipe, 16)
    src = cache_lib.CacheSource(path, resolution=16)
    captions = [PROMPTS[i % 3] for i in range(7)]
    assert len(src) == 7 and src.captions() == captions
    rows = [src[i] for i in range(7)]
    sf = pipe.vae.config.scaling_factor
    got = np.stack([r["latent_mean"] for r in rows]) * sf  # [7, 4, 8, 8]
    want = np.concatenate([pipe([PROMPTS[i % 3] for i in range(4 * b, 4 * b + 4)], seed=b, **GEN)
                           for b in range(2)])[:7]
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.isfinite(got).all() and np.abs(got[0] - got[3]).max() > 1e-2  # one prompt, two noise draws
    assert all((r["latent_logvar"] == -30.0).all() for r in rows)
    np.testing.assert_allclose(np.stack([r["prompt_embeds"] for r in rows]), np.asarray(pipe.encode_prompt(captions)),
                               atol=1e-6, rtol=0)


def test_existing_cache_is_reused_or_refused(teacher, generated, tmp_path, monkeypatch, caplog):
    """A complete cache at data.path is reused as is (a pre-empted or earlier run's); one made with
    other prompts or settings, or of a data set, is refused; other noise draws are only a warning."""
    path, _ = generated
    monkeypatch.setattr(teacher_data, "write_teacher_cache", lambda *a, **k: pytest.fail("generated again"))
    mtime = os.path.getmtime(os.path.join(path, "index.json"))
    data = teacher_data.teacher_data_config(small_config(teacher, **{"data.path": path}), None, str(tmp_path))
    assert data["source"] == "cache" and data["path"] == path and data["prompts"] == PROMPTS
    assert os.path.getmtime(os.path.join(path, "index.json")) == mtime
    with caplog.at_level(logging.WARNING):
        teacher_data.teacher_data_config(small_config(teacher, **{"data.path": path, "seed": 3}), None, str(tmp_path))
    assert "other noise (seed: cache 0, config 3)" in caplog.text
    for key, value, msg in (("data.num_examples", 8, "num_examples: cache 7, config 8"),
                            ("data.prompts", PROMPTS[:2], "prompts: cache"),
                            ("data.teacher_steps", 4, "steps: cache 2, config 4")):
        with pytest.raises(ValueError, match=msg):
            teacher_data.teacher_data_config(small_config(teacher, **{"data.path": path, key: value}), None, "")
    images = str(tmp_path / "images_cache")
    shutil.copytree(path, images)
    with open(os.path.join(images, "index.json")) as f:
        index = json.load(f)
    del index["source"]
    with open(os.path.join(images, "index.json"), "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match="not teacher-generated data: train from it with data.source='cache'"):
        teacher_data.teacher_data_config(small_config(teacher, **{"data.path": images}), None, "")
    # a folder that is not a cache is not overwritten
    os.makedirs(tmp_path / "junk")
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match="not a latent cache"):
        teacher_data.teacher_data_config(small_config(teacher, **{"data.path": str(tmp_path / "junk")}), None, "")


@pytest.mark.slow
def test_train_from_teacher_data_end_to_end(teacher, tmp_path, frozen_keys, monkeypatch):
    """trainer.train generates WORKDIR/teacher_data (over a killed write's .partial), trains from it without the VAE or the text
    encoder on the devices and exports final/; a second run on that cache does not regenerate
    it and sees the same data (same losses)."""
    first = str(tmp_path / "first")
    os.makedirs(os.path.join(first, "teacher_data.partial"))  # a pre-empted generation: started again
    assert trainer.train(small_config(teacher), first) == os.path.join(first, "final")
    cache = os.path.join(first, "teacher_data")
    assert cache_lib.read_index(cache)["num_examples"] == 7 and not os.path.exists(cache + ".partial")
    assert os.path.isfile(os.path.join(first, "final", "unet", "config.json"))
    rows = metrics(first)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert frozen_keys == [(["latent_logvar", "latent_mean", "prompt_embeds"], ["teacher", "uncond"])]

    mtime = os.path.getmtime(os.path.join(cache, "index.json"))
    monkeypatch.setattr(teacher_data, "write_teacher_cache", lambda *a, **k: pytest.fail("generated again"))
    second = str(tmp_path / "second")
    trainer.train(small_config(teacher, **{"data.path": cache}), second)
    assert os.path.getmtime(os.path.join(cache, "index.json")) == mtime
    assert not os.path.exists(os.path.join(second, "teacher_data"))
    np.testing.assert_allclose([r["loss"] for r in metrics(second)], [r["loss"] for r in rows], rtol=1e-6)


def test_prompts_from_a_file(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("a cat\n\n  \nun chat été\n", encoding="utf-8")
    assert teacher_data.load_prompts(str(file)) == ["a cat", "un chat été"]
    with pytest.raises(ValueError, match="data.source='teacher' is not read directly"):
        make_pipeline(data_config(source="teacher", resolution=16), lambda c: c, 8)


BLANK = "<a file of blank lines>"


@pytest.mark.parametrize("key,value,message", [
    ("data.prompts", (), "data.prompts is empty"),
    ("data.prompts", "/no/such/prompts.txt", "'/no/such/prompts.txt' is not a file"),
    ("data.prompts", BLANK, "has no prompts"),
    ("data.prompts", ("a cat", 3), r"must all be strings, got \['int'\]"),
    ("data.num_examples", 0, "data.num_examples must be an integer >= 1, got 0"),
    ("data.teacher_scheduler", "euler", "data.teacher_scheduler 'euler': expected one of ddim | dpm | dpm\\+\\+"),
    ("data.teacher_steps", 0, "data.teacher_steps must be an integer >= 1"),
    ("data.teacher_batch", 0, "data.teacher_batch must be an integer >= 1"),
    ("data.teacher_guidance", 0.5, "data.teacher_guidance must be a number >= 1"),
    ("mode", "lcf", "data.source='teacher' with mode='lcf'"),
])
def test_bad_teacher_data_config_fails_before_any_work(teacher, tmp_path, monkeypatch, key, value, message):
    if value == BLANK:
        value = str(tmp_path / "blank.txt")
        with open(value, "w") as f:
            f.write("\n  \n")
    monkeypatch.setattr(LCMPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model first"))
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=message):
        trainer.train(small_config(teacher, **{key: value}), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "teacher_data.partial")
