"""Input pipeline throughput: decoded + preprocessed images/s at 512x512, per CPU core, from a
folder and from tar shards (lcm_jax.data.input_pipeline, the path training takes).

    python -m benchmarks.data                                  # 96 JPEGs of 1024x768 -> 512x512
    python -m benchmarks.data --size=640x480 --threads=1,2,4 --epochs=3

The images are written first (smooth random colour fields with grain, JPEG quality 90: sizes
and decode cost like web photos; sidecar captions), to a folder and to 4 tar shards. Each
(source, threads) row runs the full pipeline (read, decode, RGB, crop+resize, flip, [-1, 1]
CHW float32, batch, tokenize with a trivial tokenizer) for ``--epochs`` epochs after one
warm-up batch, and reports images/s of wall time and images per CPU-second of this process
(all threads; with --workers > 0 the worker processes' CPU is not seen, so read the wall
rate): the second is the per-core rate, and the one to trust on a shared machine.
A last row times ``decode.preprocess`` alone in a loop on one thread (no grain), with and
without PIL's JPEG draft mode, to show what the pipeline adds.
The ``cache`` rows read a latent cache (lcm_jax.data.cache) of ``--cache_n`` examples with SD's
shapes at the resolution (latent mean + logvar 4 x R/8 x R/8, prompt embeddings 77 x 768,
float32: what training from a cache reads instead of decoding images), written with random
values first; it is read from the page cache (a warm disk), so this is the pipeline's ceiling.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from absl import app, flags
from PIL import Image

from configs.common import base_config
from lcm_jax.data import cache, decode
from lcm_jax.data.cache import writer as cache_writer
from lcm_jax.data.input_pipeline import make_pipeline

flags.DEFINE_integer("n", 96, "images written")
flags.DEFINE_string("size", "1024x768", "source image WxH")
flags.DEFINE_integer("resolution", 512, "training resolution (square crop)")
flags.DEFINE_integer("batch", 8, "images per batch")
flags.DEFINE_integer("epochs", 2, "timed epochs per row, after one warm-up batch")
flags.DEFINE_integer("shards", 4, "tar shards written")
flags.DEFINE_string("threads", f"1,{os.cpu_count()}", "decode threads per row")
flags.DEFINE_string("workers", "0", "decode processes per row (data.worker_count)")
flags.DEFINE_integer("cache_n", 512, "examples in the latent cache (0: no cache rows)")
FLAGS = flags.FLAGS

DATA = base_config().data.to_dict()  # every data key at its default


def photo(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A JPEG that compresses like a photo: a smooth colour field plus pixel noise."""
    small = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    img = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_data(root: str, n: int, w: int, h: int, shards: int) -> tuple[str, str]:
    rng = np.random.default_rng(0)
    folder = os.path.join(root, "folder")
    os.makedirs(folder)
    tars = [tarfile.open(os.path.join(root, f"data-{s:03d}.tar"), "w") for s in range(shards)]
    total = 0
    for i in range(n):
        data, caption = photo(rng, w, h), f"a photo number {i}".encode()
        total += len(data)
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
        with open(os.path.join(folder, f"{i:06d}.txt"), "wb") as f:
            f.write(caption)
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tars[i % shards].addfile(info, io.BytesIO(payload))
    for t in tars:
        t.close()
    print(f"wrote {n} JPEGs of {w}x{h} (mean {total / n / 1024:.0f} KiB) to a folder and {shards} tar shards")
    return folder, os.path.join(root, "data-{000..%03d}.tar" % (shards - 1))


def write_cache(root: str, n: int, resolution: int, shard_size: int = 256) -> str:
    """A cache of ``n`` random examples with SD 1.5's latent and text-embedding shapes."""
    folder = os.path.join(root, "cache")
    os.makedirs(folder)
    rng, h = np.random.default_rng(0), resolution // 8
    writer = cache_writer.ShardWriter(folder, shard_size)
    for i in range(0, n, 64):
        k = min(64, n - i)
        writer.add({"latent_mean": rng.standard_normal((k, 4, h, h), np.float32),
                    "latent_logvar": rng.standard_normal((k, 4, h, h), np.float32),
                    "prompt_embeds": rng.standard_normal((k, 77, 768), np.float32)},
                   [f"a photo number {j}" for j in range(i, i + k)])
    shards = writer.close()
    index = cache.make_index(shards, identity={"vae": "benchmark", "text_encoder": "benchmark"},
                             resolution=resolution, latent_shape=(4, h, h), embeds_shape=(77, 768), dtype="float32")
    with open(os.path.join(folder, cache.INDEX), "w") as f:
        json.dump(index, f)
    size = sum(s["bytes"] for s in shards)
    print(f"wrote a cache of {n} examples ({size / n / 1024:.0f} KiB each) in {len(shards)} shards")
    return folder


def tokenize(captions):
    return np.zeros((len(captions), 77), np.int32)


def run(data: dict, batch: int, epochs: int, n: int) -> tuple[float, float]:
    """(images/s wall, images per CPU-second) over ``epochs`` epochs after one warm-up batch."""
    p = make_pipeline(data, tokenize, batch, seed=0, num_epochs=epochs + 1)
    next(p)
    images = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for b in p:
        images += len(next(iter(b.values())))
        if images >= epochs * n:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    p.close()
    return images / wall, images / cpu


def bare(folder: str, resolution: int, n: int, draft: bool) -> tuple[float, float]:
    """decode.preprocess in a loop on this thread: (images/s, images per CPU-second)."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".jpg"))[:n]
    blobs = [open(os.path.join(folder, f), "rb").read() for f in files]
    rng = np.random.default_rng(0)
    from PIL import JpegImagePlugin
    original = JpegImagePlugin.JpegImageFile.draft
    if not draft:
        JpegImagePlugin.JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        for blob in blobs:
            decode.preprocess({"image": blob, "caption": "x"}, rng, resolution=resolution, center_crop=False,
                              random_flip=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        JpegImagePlugin.JpegImageFile.draft = original
    return len(blobs) / wall, len(blobs) / cpu


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    w, h = (int(x) for x in FLAGS.size.lower().split("x"))
    cores = os.cpu_count()
    print(f"{cores} CPU cores (os.cpu_count), load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as root:
        folder, pattern = write_data(root, FLAGS.n, w, h, FLAGS.shards)
        cache_dir = write_cache(root, FLAGS.cache_n, FLAGS.resolution) if FLAGS.cache_n else ""
        rows = []
        for workers in (int(x) for x in FLAGS.workers.split(",")):
            for threads in (int(t) for t in FLAGS.threads.split(",")):
                for name, path in (("folder", folder), ("tar", pattern)):
                    data = {**DATA, "source": name, "path": path, "resolution": FLAGS.resolution, "random_flip": True,
                            "center_crop": False, "num_threads": threads, "worker_count": workers}
                    rows.append((name, threads, workers, *run(data, FLAGS.batch, FLAGS.epochs, FLAGS.n)))
                if FLAGS.cache_n:
                    data = {**DATA, "source": "cache", "path": cache_dir, "resolution": FLAGS.resolution,
                            "num_threads": threads, "worker_count": workers}
                    rows.append(("cache", threads, workers, *run(data, FLAGS.batch, FLAGS.epochs, FLAGS.cache_n)))
        for draft in (True, False):
            rows.append((f"preprocess only{'' if draft else ', no JPEG draft'}", 1, 0,
                         *bare(folder, FLAGS.resolution, FLAGS.n, draft)))
    print(f"\n{FLAGS.size} JPEG -> {FLAGS.resolution}x{FLAGS.resolution}, batch {FLAGS.batch}\n")
    print("| source | decode threads | worker processes | images/s (wall) | batches/s (wall) | images per CPU-second |")
    print("|---|---|---|---|---|---|")
    for name, threads, workers, wall, per_cpu in rows:
        print(f"| {name} | {threads} | {workers} | {wall:.1f} | {wall / FLAGS.batch:.2f} | {per_cpu:.1f} |")


if __name__ == "__main__":
    app.run(main)
