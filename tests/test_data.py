"""The grain input pipeline (lcm_jax.data.input_pipeline): every source yields [-1, 1] batches of the
Batcher's format, the order is a function of the seed, resume is exact, processes split the
data, and bad files are skipped or repaired and counted. Data is written by each test."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

grain = pytest.importorskip("grain")

from lcm_jax.data import decode  # noqa: E402
from lcm_jax.data.input_pipeline import jax_allgather, make_pipeline  # noqa: E402
from lcm_jax.data.tar import expand_braces, expand_shards  # noqa: E402
from image_files import color, encode, has_webp, solid  # noqa: E402
from training import data_config  # noqa: E402

R = 16
L = 24


def tokenize(captions):
    """Test tokenizer: the caption's UTF-8 bytes, zero-padded to L (and invertible)."""
    out = np.zeros((len(captions), L), np.int32)
    for i, c in enumerate(captions):
        b = c.encode()[:L]
        out[i, :len(b)] = list(b)
    return out


def captions_of(batch):
    return [bytes(int(x) for x in row if x).decode() for row in batch["input_ids"]]


def check_batch(batch, b):
    assert set(batch) == {"pixels", "input_ids"}
    assert batch["pixels"].shape == (b, 3, R, R) and batch["pixels"].dtype == np.float32
    assert batch["input_ids"].shape == (b, L) and batch["input_ids"].dtype == np.int32
    assert batch["pixels"].min() >= -1.0 and batch["pixels"].max() <= 1.0


def check_colors(batch, tol):
    """Solid test images: the pixels are color(i) / 127.5 - 1 for the caption 'img i'."""
    for px, cap in zip(batch["pixels"], captions_of(batch)):
        want = np.asarray(color(int(cap.split()[1])), np.float32) / 127.5 - 1.0
        np.testing.assert_allclose(px.mean(axis=(1, 2)), want, atol=tol)


def epoch(data, batch_size=2, seed=0, **kw):
    """Every batch of one epoch (the last partial batch dropped)."""
    return list(make_pipeline(data, tokenize, batch_size, seed, num_epochs=1, **kw))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """10 images in nested folders: captions from metadata.jsonl (top and sub) and .txt sidecars."""
    root = tmp_path_factory.mktemp("folder")
    os.makedirs(root / "a" / "b")
    rows = []
    for i in range(10):
        sub = ["", "a", os.path.join("a", "b")][i % 3]
        name = f"im{i}.png" if i % 2 else f"im{i}.jpg"
        img = solid(i, (30 + i, 20 + 2 * i))
        img.save(root / sub / name, **({"quality": 100, "subsampling": 0} if name.endswith("jpg") else {}))
        if i < 4:
            rows.append({"file_name": os.path.join(sub, name), "text": f"img {i}"})
        else:
            (root / sub / f"im{i}.txt").write_text(f"img {i}\n")
    with open(root / "metadata.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(root)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two WebDataset shards of 5 samples each: .jpg/.png/.webp + .txt or .json captions."""
    root = tmp_path_factory.mktemp("tar")
    for s in range(2):
        with tarfile.open(root / f"data-{s:03d}.tar", "w") as tf:
            for j in range(5):
                i = 5 * s + j
                key = f"{i:06d}"
                fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
                if fmt == "WEBP" and not has_webp():
                    fmt, ext = "PNG", "png"
                members = [(f"{key}.{ext}", encode(solid(i, (24, 40)), fmt))]
                if i % 2:
                    members.append((f"{key}.txt", f"img {i}".encode()))
                else:
                    members.append((f"{key}.json", json.dumps({"caption": f"img {i}", "width": 24}).encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(root)


def cfg(source, path="", **kw):
    return data_config(**{"source": source, "path": path, "resolution": R, "num_threads": 2, **kw})


# ---------------------------------------------------------------------- sources
def test_folder_source_batches(folder):
    batches = epoch(cfg("folder", folder), batch_size=2)
    assert len(batches) == 5
    for b in batches:
        check_batch(b, 2)
        check_colors(b, tol=2 / 127.5)  # JPEG q100 of a flat colour: within 2 levels
    assert sorted(c for b in batches for c in captions_of(b)) == sorted(f"img {i}" for i in range(10))


def test_tar_source_two_shards(shards):
    pattern = os.path.join(shards, "data-{000..001}.tar")
    assert expand_shards(pattern) == [os.path.join(shards, f"data-{s:03d}.tar") for s in range(2)]
    assert expand_shards(os.path.join(shards, "*.tar")) == expand_shards(pattern) == expand_shards(shards)
    batches = epoch(cfg("tar", pattern), batch_size=5)
    assert len(batches) == 2
    for b in batches:
        check_batch(b, 5)
        check_colors(b, tol=2 / 127.5)
    assert sorted(c for b in batches for c in captions_of(b)) == sorted(f"img {i}" for i in range(10))


def test_brace_expansion():
    assert expand_braces("d-{08..11}.tar") == ["d-08.tar", "d-09.tar", "d-10.tar", "d-11.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]


def test_digits_source():
    p = make_pipeline(cfg("digits"), tokenize, 8, 0)
    b = next(p)
    check_batch(b, 8)
    assert all(c.startswith("a handwritten digit ") for c in captions_of(b))
    p.close()


_TFDS_BUILDER = {}


def _tfds_dataset(data_dir):
    """A 6-example TFDS dataset in array_record, prepared here (encoded images need no TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tfds source needs the 'data' extra")
    if "cls" not in _TFDS_BUILDER:
        class LcmJaxTestCaptions(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)), "text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                for i in range(6):
                    yield i, {"image": encode(solid(i, (20, 36)), "PNG"), "text": f"img {i}"}
        _TFDS_BUILDER["cls"] = LcmJaxTestCaptions
    _TFDS_BUILDER["cls"](data_dir=data_dir, file_format="array_record").download_and_prepare()
    return "lcm_jax_test_captions"


def test_tfds_source(tmp_path):
    name = _tfds_dataset(str(tmp_path))
    batches = epoch(cfg("tfds", str(tmp_path), tfds_name=name, caption_key="text"), batch_size=3)
    assert len(batches) == 2
    for b in batches:
        check_batch(b, 3)
        check_colors(b, tol=1e-6)
    assert sorted(c for b in batches for c in captions_of(b)) == sorted(f"img {i}" for i in range(6))
    with pytest.raises(ValueError, match="no feature 'img'"):
        make_pipeline(cfg("tfds", str(tmp_path), tfds_name=name, image_key="img"), tokenize, 2)
    with pytest.raises(ValueError, match="cannot open TFDS dataset"):
        make_pipeline(cfg("tfds", str(tmp_path), tfds_name="no_such_dataset_xyz"), tokenize, 2)


# ---------------------------------------------------------------------- determinism
AUG = dict(center_crop=False, random_flip=True, caption_dropout=0.3)


def take(p, n):
    return [next(p) for _ in range(n)]


def same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("pixels", "input_ids"))


def test_same_seed_same_order(folder):
    runs = [take(make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, seed), 6) for seed in (3, 3, 4)]
    assert same(runs[0], runs[1])
    assert not same(runs[0], runs[2])
    # more threads decode in parallel, the stream is the same
    assert same(runs[0], take(make_pipeline(cfg("folder", folder, **AUG, num_threads=5), tokenize, 4, 3), 6))


def test_resume_is_exact(folder):
    """Batches m+1.. after restoring a (JSON round-tripped) state equal the uninterrupted run's,
    across epoch boundaries, random crops, flips and caption dropout; counts carry over."""
    m, n = 4, 9
    full = take(make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 7), n)
    first = make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 7)
    take(first, m)
    state = json.loads(json.dumps(first.state()))
    assert state["counts"]["examples"] == 4 * m
    resumed = make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 7)
    peeked = resumed.peek()  # peek does not move the position
    resumed.restore(state)
    assert same(take(resumed, n - m), full[m:])
    assert resumed.counts["examples"] == 4 * n
    assert not same([peeked], [full[m]])
    with pytest.raises(ValueError, match="process_count=2"):
        make_pipeline(cfg("folder", folder), tokenize, 4, 7, 0, 1).restore({**state, "process_count": 2})


@pytest.mark.parametrize("source", ["folder", "tar"])
def test_processes_disjoint_and_covering(folder, shards, source):
    path = folder if source == "folder" else os.path.join(shards, "data-*.tar")
    seen = []
    for p in range(2):  # global batch 2 -> 1 example per process per step
        seen.append([c for b in epoch(cfg(source, path), batch_size=2, process_index=p, process_count=2)
                     for c in captions_of(b)])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"img {i}" for i in range(10))
    assert len(seen[0]) == len(set(seen[0])) == 5


def test_processes_split_the_one_process_batches(folder):
    """Index-addressable sources: the processes' batches, stacked in process order, are the
    one-process batches, augmentation draws included, so a run's data does not depend on the
    number of hosts (the two-process training test in test_faults relies on it)."""
    one = take(make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 7), 6)
    parts = [take(make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 7, p, 2), 6) for p in range(2)]
    stacked = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(*parts)]
    assert same(stacked, one)


def test_multiprocess_state_holds_every_position(folder):
    """With several processes, state() gathers every process's position (the checkpoint is
    written by one host) and each process restores its own."""
    pipes = []

    def gather(_):  # stands in for jax_allgather: both simulated processes' local states
        return [p.local_state() for p in pipes]

    def make(p):
        return make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 2, p, 2, allgather=gather)

    pipes += [make(0), make(1)]
    full = [take(make(p), 5) for p in range(2)]
    for p in pipes:
        take(p, 2)
    state = json.loads(json.dumps(pipes[0].state()))
    assert state == pipes[1].state() and len(state["processes"]) == 2
    for p in range(2):
        resumed = make(p)
        resumed.restore(state)
        assert same(take(resumed, 3), full[p][2:])
    with pytest.raises(ValueError, match="2 processes' positions but this run has 4"):
        make_pipeline(cfg("folder", folder), tokenize, 4, 2, 0, 4).restore(state)
    assert jax_allgather(state["processes"][1]) == [state["processes"][1]]  # the real one, 1 JAX process


def test_worker_processes_match_threads(folder):
    """worker_count > 0 (grain's mp_prefetch) gives the same stream, and restores exactly."""
    threads = take(make_pipeline(cfg("folder", folder, **AUG), tokenize, 4, 1), 5)
    with make_pipeline(cfg("folder", folder, **AUG, worker_count=2), tokenize, 4, 1) as p:
        assert same(take(p, 3), threads[:3])
        state = json.loads(json.dumps(p.state()))
        assert same(take(p, 2), threads[3:])
        p.restore(state)
        assert same(take(p, 2), threads[3:])


# ---------------------------------------------------------------------- bad input
def test_bad_files_are_skipped_or_repaired_and_counted(bad_folder):
    p = make_pipeline(cfg("folder", bad_folder), tokenize, 1, 0, num_epochs=1)
    got = {}
    for b in p:
        check_batch(b, 1)
        got[captions_of(b)[0]] = b["pixels"][0]
    assert p.counts == {"examples": 10, "skipped_empty": 1, "skipped_corrupt": 2, "skipped_no_caption": 0,
                        "converted": 4, "upscaled": 1, "caption_missing": 1, "caption_not_utf8": 1}
    assert set(got) == {"clean0", "clean1", "clean2", "cmyk", "paletted", "gray16", "alpha", "small", "", "café"}
    np.testing.assert_allclose(got["gray16"], 1.0)   # 16-bit white scaled, not clipped
    np.testing.assert_allclose(got["alpha"], 1.0)    # transparent -> white background
    np.testing.assert_allclose(got["cmyk"].mean(axis=(1, 2)), [1, -1, -1], atol=0.02)
    np.testing.assert_allclose(got["small"].mean(axis=(1, 2)), np.asarray(color(8)) / 127.5 - 1, atol=1e-5)
    # the same files with missing captions skipped instead of trained as the empty prompt
    p = make_pipeline(cfg("folder", bad_folder, missing_caption="skip"), tokenize, 1, 0, num_epochs=1)
    assert len(list(p)) == 9 and p.counts["skipped_no_caption"] == 1


def test_16bit_grey_is_scaled_not_clipped():
    img = Image.fromarray(np.array([[0, 257 * 100, 65535]], np.uint16))
    rgb, converted = decode.to_rgb(img)
    assert converted and rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == [0, 100, 255]


def test_clear_errors_before_reading(tmp_path, folder):
    with pytest.raises(ValueError, match="data.source 'laion' is not supported"):
        make_pipeline(cfg("laion", folder), tokenize, 2)
    with pytest.raises(ValueError, match="is not a folder"):
        make_pipeline(cfg("folder", str(tmp_path / "nope")), tokenize, 2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        make_pipeline(cfg("folder", str(tmp_path / "empty")), tokenize, 2)
    with pytest.raises(ValueError, match="matches no file"):
        make_pipeline(cfg("tar", str(tmp_path / "data-*.tar")), tokenize, 2)
    with pytest.raises(ValueError, match="does not exist"):
        make_pipeline(cfg("tar", str(tmp_path / "data-{000..003}.tar")), tokenize, 2)
    (tmp_path / "x.tar.gz").write_bytes(b"\x1f\x8b" + bytes(100))
    with pytest.raises(ValueError, match="gzip-compressed"):
        make_pipeline(cfg("tar", str(tmp_path / "x.tar.gz")), tokenize, 2)
    with pytest.raises(ValueError, match="not a positive multiple"):
        make_pipeline(cfg("folder", folder), tokenize, 3, process_count=2)


def test_all_bad_files_is_an_error_not_a_hang(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"not a jpeg")
    p = make_pipeline(cfg("folder", str(tmp_path)), tokenize, 2)
    with pytest.raises(ValueError, match="all unusable"):
        p.peek()
