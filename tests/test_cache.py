"""The latent cache (lcm_jax.data.cache): written from the digits by a tiny teacher, it holds the
VAE posterior and prompt embeddings of every example in source order; training from it gives
the loss training from the images gives; another model's cache is refused before compiling;
its pipeline resumes exactly; a killed write never looks like a cache."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lcm_jax import loop, trainer  # noqa: E402
from lcm_jax.data import cache as cache_lib  # noqa: E402
from lcm_jax.data.cache import writer as cache_writer  # noqa: E402
from lcm_jax.data import decode  # noqa: E402
from lcm_jax.data.input_pipeline import make_pipeline  # noqa: E402
from lcm_jax.data.sources import DIGIT_WORDS, load_digits  # noqa: E402
from lcm_jax.pipeline import LCMPipeline  # noqa: E402
from lcm_jax.tiny import make_tiny_pipeline  # noqa: E402
from training import data_config  # noqa: E402
from training import small_config as train_config  # noqa: E402

N = 360  # the digits' heldout split: small, and not a multiple of the encode batch


def small_config(teacher, **overrides):
    """training.small_config, 2 steps, no checkpoints, on the digits' small heldout split."""
    return train_config(teacher, **{"num_steps": 2, "checkpoint_every": 0, "data.split": "heldout", **overrides})


@pytest.fixture(scope="module")
def cache(teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "digits")
    index = cache_writer.write_cache(small_config(teacher), out, batch_size=64, shard_size=100)
    return out, index


def test_index_and_contents(teacher, cache):
    """Rows are the source's examples in order: the VAE posterior of the image and the text
    encoder's embedding of its caption, as the train step would compute them."""
    path, index = cache
    pipe = LCMPipeline.from_pretrained(teacher)
    assert index == cache_lib.read_index(path)
    assert index["num_examples"] == N and [s["num_examples"] for s in index["shards"]] == [100, 100, 100, 60]
    assert index["resolution"] == 16 and index["latent_shape"] == [4, 8, 8]
    assert index["prompt_embeds_shape"] == [16, 32] and index["dtype"] == "float32"
    assert index["identity"] == cache_lib.model_identity(pipe)
    assert index["counts"]["examples"] == N and index["pretrained"] == teacher
    assert sorted(os.listdir(path)) == ["index.json"] + [f"shard-{i:05d}.safetensors" for i in range(4)]

    images, captions, _ = load_digits(16, "heldout")
    src = cache_lib.CacheSource(path)
    assert len(src) == N and src.captions() == captions
    rows = [0, 99, 100, 359]
    pixels = np.stack([decode.preprocess({"image": images[i]}, np.random.default_rng(0), resolution=16)["pixels"]
                       for i in rows])
    mean, logvar = pipe.vae.apply({"params": pipe.vae_params}, pixels, method=pipe.vae.encode)
    embeds = pipe.encode_prompt([captions[i] for i in rows])
    got = [src[i] for i in rows]
    for k, want in (("latent_mean", mean), ("latent_logvar", logvar), ("prompt_embeds", embeds)):
        assert all(g[k].dtype == np.float32 for g in got)
        np.testing.assert_allclose(np.stack([g[k] for g in got]), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_training_from_cache_matches_images(teacher, cache, tmp_path, frozen_keys):
    """Same seed: the cache pipeline shuffles its rows as the image pipeline shuffles the images,
    and the step draws the same latent noise, so the losses agree (up to float error); the
    cached run puts no VAE or text encoder on the devices."""
    losses = {}
    for name, over in (("images", {}), ("cache", {"data.source": "cache", "data.path": cache[0]})):
        workdir = str(tmp_path / name)
        trainer.train(small_config(teacher, **over), workdir)
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            losses[name] = [json.loads(line) for line in f]
    assert frozen_keys == [(["input_ids", "pixels"], ["teacher", "text", "uncond", "vae"]),
                           (["latent_logvar", "latent_mean", "prompt_embeds"], ["teacher", "uncond"])]
    for key in ("loss", "grad_norm"):
        a, b = ([r[key] for r in losses[n]] for n in ("images", "cache"))
        assert len(a) == 2 and a[0] != a[1]
        np.testing.assert_allclose(b, a, rtol=1e-5)


def test_cache_from_another_model_is_refused(teacher, cache, tmp_path, monkeypatch):
    other = str(tmp_path / "other")
    make_tiny_pipeline(other, DIGIT_WORDS, resolution=16, seed=1)
    monkeypatch.setattr(loop, "compile_step", lambda *a, **k: pytest.fail("compiled before checking the cache"))
    config = small_config(other, **{"data.source": "cache", "data.path": cache[0]})
    with pytest.raises(cache_lib.CacheMismatchError) as e:
        trainer.train(config, str(tmp_path / "run"))
    msg = str(e.value)
    mine = cache_lib.model_identity(LCMPipeline.from_pretrained(other))
    assert cache[0] in msg and other in msg and teacher in msg
    for k in ("vae", "text_encoder"):
        assert cache[1]["identity"][k] in msg and mine[k] in msg
    # the right model at another resolution
    with pytest.raises(cache_lib.CacheMismatchError, match="resolution: cache 16, data.resolution 32"):
        cache_lib.check_compatible(cache[0], LCMPipeline.from_pretrained(teacher), 32)
    with pytest.raises(ValueError, match="holds 16px images but data.resolution is 32"):
        make_pipeline(data_config(source="cache", path=cache[0], resolution=32), None, 8)


def take(p, n):
    return [next(p) for _ in range(n)]


def same(a, b):
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_cache_pipeline_order_resume_and_processes(cache):
    """The cache source through the one pipeline: seeded shuffle, exact resume across an epoch
    boundary (45 batches of 8 per epoch), processes' slices stacking to the one-process batches."""
    data = data_config(source="cache", path=cache[0], resolution=16, num_threads=2)
    pipe = make_pipeline(data, None, 8, seed=7)
    first = next(pipe)
    assert sorted(first) == ["latent_logvar", "latent_mean", "prompt_embeds"]
    assert first["latent_mean"].shape == (8, 4, 8, 8) and first["prompt_embeds"].shape == (8, 16, 32)
    assert all(v.dtype == np.float32 for v in first.values())
    m, n = 43, 48
    full = [first] + take(pipe, n - 1)
    assert not same([full[0]], [take(make_pipeline(data, None, 8, seed=8), 1)[0]])
    part = make_pipeline(data, None, 8, seed=7)
    take(part, m)
    state = json.loads(json.dumps(part.state()))
    resumed = make_pipeline(data, None, 8, seed=7)
    peeked = resumed.peek()
    resumed.restore(state)
    assert same(take(resumed, n - m), full[m:]) and same([peeked], full[:1])
    assert resumed.counts["examples"] == 8 * n
    parts = [take(make_pipeline(data, None, 8, 7, p, 2), 4) for p in range(2)]
    assert same([{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)], full[:4])
    with pytest.raises(ValueError, match="train step drops captions"):
        make_pipeline(data, None, 8, caption_dropout=0.1)


def test_killed_write_leaves_no_cache(teacher, cache, tmp_path, monkeypatch):
    out = str(tmp_path / "c")
    flush = cache_writer.ShardWriter._flush

    def die_after_one(self, n):
        if self.shards:
            raise KeyboardInterrupt("killed")
        flush(self, n)

    monkeypatch.setattr(cache_writer.ShardWriter, "_flush", die_after_one)
    with pytest.raises(KeyboardInterrupt):
        cache_writer.write_cache(small_config(teacher), out, batch_size=64, shard_size=100)
    assert not os.path.exists(out) and os.listdir(out + ".partial") == ["shard-00000.safetensors"]
    with pytest.raises(ValueError, match=r"is not a folder.*c\.partial exists: that write did not finish"):
        make_pipeline(data_config(source="cache", path=out, resolution=16), None, 8)
    with pytest.raises(FileExistsError, match="--overwrite"):
        cache_writer.write_cache(small_config(teacher), cache[0])
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        cache_writer.write_cache(small_config("/no/such/teacher"), out)
    # a damaged shard is named before any reading
    damaged = str(tmp_path / "damaged")
    os.makedirs(damaged)
    for name in os.listdir(cache[0]):
        with open(os.path.join(cache[0], name), "rb") as f, open(os.path.join(damaged, name), "wb") as g:
            g.write(f.read()[:-4] if name == "shard-00002.safetensors" else f.read())
    with pytest.raises(ValueError, match="shard-00002.safetensors' is .* bytes, the index says"):
        cache_lib.CacheSource(damaged)


@pytest.mark.slow
def test_cli_writes_a_cache_from_a_folder(teacher, tmp_path):
    """python -m lcm_jax.data.cache, as a user runs it (images + sidecar captions, float16)."""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(10):
        Image.new("RGB", (20, 24), (20 * i, 100, 255 - 20 * i)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a handwritten digit {DIGIT_WORDS[3 + i]}")
    out = str(tmp_path / "cache")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    cmd = [sys.executable, "-m", "lcm_jax.data.cache", "--config=configs/tiny.py", f"--out={out}",
           f"--config.pretrained={teacher}", "--config.data.source=folder", f"--config.data.path={images}",
           "--batch_size=4", "--shard_size=6", "--dtype=float16"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cached 10 examples in 2 shards at {out}" in proc.stdout
    src = cache_lib.CacheSource(out)
    assert src.index["dtype"] == "float16" and len(src) == 10
    assert sorted(src.captions()) == sorted(f"a handwritten digit {DIGIT_WORDS[3 + i]}" for i in range(10))
    pipe = LCMPipeline.from_pretrained(teacher)
    i = src.captions().index("a handwritten digit zero")
    want = pipe.encode_prompt(["a handwritten digit zero"])[0]
    np.testing.assert_allclose(src[i]["prompt_embeds"], np.asarray(want), atol=2e-2, rtol=1e-2)
