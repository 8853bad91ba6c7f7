"""Image-caption sources: scikit-learn's digits and a folder of images, held in memory
(``load_source``, for the in-memory Batcher), and the random-access sources the grain
pipeline reads lazily (``make_source``: folder, tar shards, tfds, digits, and the latent
cache of lcm_jax.data.cache).

In-memory loaders return (images uint8 [N, R, R, 3], captions list[str]). Random-access
sources implement grain's RandomAccessDataSource protocol (``__len__``, ``__getitem__``) and
return raw records {"image": bytes | uint8 array | None, "caption": str | bytes | None,
"key": str}; decoding and every bad-input decision happen in ``decode.preprocess``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_WORDS = ("a", "handwritten", "digit") + DIGIT_NAMES
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_NAMES[int(label)]}"


def load_digits(resolution: int, split: str = "train") -> tuple[np.ndarray, list[str], np.ndarray]:
    """scikit-learn's bundled 8x8 digits as light-on-dark RGB at ``resolution``.

    Splits are fixed and disjoint: "heldout" is every 5th example (for evaluation
    classifiers), "train" the rest, "all" everything. Returns (images, captions, labels).
    """
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    idx = np.arange(len(d.target))
    if split == "train":
        idx = idx[idx % 5 != 0]
    elif split == "heldout":
        idx = idx[idx % 5 == 0]
    elif split != "all":
        raise ValueError(f"digits split must be train | heldout | all, got {split!r}")
    imgs = []
    for x in d.images[idx]:  # [8, 8] in 0..16, ink high
        img = Image.fromarray(np.uint8(np.clip(x / 16.0, 0, 1) * 255))
        imgs.append(np.asarray(img.resize((resolution, resolution), Image.BICUBIC)))
    images = np.repeat(np.stack(imgs)[..., None], 3, axis=-1)  # [N, R, R, 3]
    labels = d.target[idx].astype(np.int32)
    return images, [digit_caption(y) for y in labels], labels


def resize_crop(img: Image.Image, resolution: int, center: bool = True, rng=None) -> np.ndarray:
    """Shorter side to ``resolution`` then a centre (or random) square crop; uint8 [R, R, 3]."""
    img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = img.size
    if center or rng is None:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = int(rng.integers(0, w - resolution + 1)), int(rng.integers(0, h - resolution + 1))
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


METADATA = "metadata.jsonl"
_ROW = "a JSON object with 'file_name' and 'text' (a string caption, or a list of them: the first)"


def _read_metadata(path: str) -> dict[str, tuple[str, str]]:
    """One metadata.jsonl (the Hugging Face imagefolder convention) -> {normpath(file_name):
    (caption, "path:line")}, file names relative to the file's folder.

    A line that is not such an object, a caption that is not a string, or bytes that are not
    UTF-8 raise ValueError naming path:line; a repeated file_name is warned about (the last wins).
    """
    out: dict[str, tuple[str, str]] = {}
    repeated: list[tuple[str, str]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}): "
                                 f"{METADATA} must be UTF-8 (re-save it, e.g. iconv -f latin1 -t utf-8)") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e}): expected {_ROW}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{where}: got {line.strip()[:80]!r}, expected {_ROW}")
            for key in ("file_name", "text"):
                if key not in row:
                    raise ValueError(f"{where}: no {key!r} key (it has {sorted(row)}): expected {_ROW}")
            name, text = row["file_name"], row["text"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: 'file_name' is {name!r}: expected the image's path relative to "
                                 f"{os.path.dirname(path) or '.'!r}")
            if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
                text = text[0]
            if not isinstance(text, str):
                raise ValueError(f"{where}: 'text' of {name!r} is {text!r}: expected a string caption "
                                 '("" for none)')
            key = os.path.normpath(name)
            if key in out:
                repeated.append((where, out[key][1]))
            out[key] = (text, where)
    if repeated:
        logging.warning("data: %d rows of %s repeat an earlier file_name; the last one's caption is used "
                        "(e.g. %s repeats %s)", len(repeated), path, *repeated[0])
    return out


def _examples(names: Sequence[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def scan_folder(folder: str) -> tuple[list[str], list[Optional[str]], list[bool]]:
    """The images under ``folder`` (recursive, sorted) -> (paths relative to folder, caption
    from a metadata.jsonl row or None, whether a ``{stem}.txt`` sidecar exists).

    metadata.jsonl files in any subfolder count (file names relative to their folder). Rows
    naming no image, and images with neither a row nor a sidecar, are counted in a warning.
    """
    paths: list[str] = []
    sidecar: list[bool] = []
    meta: dict[str, tuple[str, str]] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel_root = os.path.relpath(root, folder)
        if METADATA in files:
            for name, row in _read_metadata(os.path.join(root, METADATA)).items():
                meta[os.path.normpath(os.path.join(rel_root, name))] = row
        names = set(files)
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.normpath(os.path.join(rel_root, name)))
                sidecar.append(os.path.splitext(name)[0] + ".txt" in names)
    captions = [meta[p][0] if p in meta else None for p in paths]
    unmatched = sorted(set(meta) - set(paths))
    if unmatched:
        logging.warning("data: %d of %d %s rows under %r name no image (%s), so their captions are unused: %s",
                        len(unmatched), len(meta), METADATA, folder, ", ".join(IMAGE_EXTENSIONS),
                        _examples([f"{meta[u][1]} {u!r}" for u in unmatched]))
    bare = [p for p, c, s in zip(paths, captions, sidecar) if c is None and not s]
    if bare:
        logging.warning("data: %d of %d images under %r have no %s row and no .txt sidecar, so no caption "
                        "(trained on the empty one, or skipped with data.missing_caption='skip'): %s",
                        len(bare), len(paths), folder, METADATA, _examples(bare))
    return paths, captions, sidecar


def load_folder(folder: str, resolution: int, center_crop: bool = True) -> tuple[np.ndarray, list[str]]:
    """Images found recursively under ``folder``, captions from metadata.jsonl or ``.txt`` sidecars.

    An unreadable image is skipped with a warning naming it; no usable image is an error.
    """
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data.path {folder!r} is not a folder: expected a directory of images "
                                "with captions in metadata.jsonl (file_name, text) or .txt sidecars")
    from lcm_jax.data.decode import decode_caption
    images, captions = [], []
    for rel, caption, has_txt in zip(*scan_folder(folder)):
        path = os.path.join(folder, rel)
        if caption is None:
            caption = ""
            if has_txt:
                with open(os.path.splitext(path)[0] + ".txt", "rb") as f:
                    caption = decode_caption(f.read())[0]  # not UTF-8: read as Latin-1
        try:
            with Image.open(path) as img:
                images.append(resize_crop(img, resolution, center_crop))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            logging.warning("skipping unreadable image %s: %s", path, e)
            continue
        captions.append(caption)
    if not images:
        raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return np.stack(images), captions


def load_source(source: str, path: str, resolution: int, center_crop: bool = True
                ) -> tuple[np.ndarray, list[str]]:
    if source == "digits":
        images, captions, _ = load_digits(resolution, "train")
        return images, captions
    if source == "folder":
        return load_folder(path, resolution, center_crop)
    raise ValueError(f"data.source {source!r} is not supported: expected digits | folder")


def vocabulary(captions: Sequence[str]) -> list[str]:
    """The distinct words of some captions, in first-seen order (for word tokenizers)."""
    return list(dict.fromkeys(w for c in captions for w in c.lower().split()))


# ---------------------------------------------------------------------- random-access sources
SOURCES = ("digits", "folder", "tar", "tfds", "cache")


class ArraySource:
    """Images already in memory (uint8 [N, H, W, 3]) with their captions."""

    def __init__(self, images: np.ndarray, captions: Sequence[str], name: str = "array"):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions, self.name = images, list(captions), name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        return {"image": self.images[i], "caption": self.captions[i], "key": f"{self.name}[{i}]"}


class FolderSource:
    """Image files under a folder (recursive, sorted), read lazily.

    Captions: ``metadata.jsonl`` rows (``file_name`` relative to the jsonl's folder, ``text``;
    the Hugging Face imagefolder convention, in any subfolder) win over ``{stem}.txt`` sidecars;
    an image with neither has no caption (warned about here, counted by the pipeline). A bad
    metadata.jsonl line is a ValueError naming path:line, raised here, before anything compiles.
    """

    def __init__(self, folder: str):
        if not folder or not os.path.isdir(folder):
            raise ValueError(f"data.path {folder!r} is not a folder: expected a directory of images "
                             "with captions in metadata.jsonl (file_name, text) or .txt sidecars")
        self.folder = folder
        # paths relative to folder; captions from metadata.jsonl (None: read the sidecar, if any)
        self.paths, self.captions, self.sidecar = scan_folder(folder)
        if not self.paths:
            raise ValueError(f"data.path {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                             "searched recursively")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        path = os.path.join(self.folder, self.paths[i])
        try:
            with open(path, "rb") as f:
                image = f.read()
        except OSError as e:
            logging.warning("data: cannot read %s (%s)", path, e)
            image = None
        caption: Any = self.captions[i]
        if caption is None and self.sidecar[i]:
            try:
                with open(os.path.splitext(path)[0] + ".txt", "rb") as f:
                    caption = f.read()
            except OSError:
                caption = None
        return {"image": image, "caption": caption, "key": path}


def _nested(path: str, value: Any) -> dict:
    head, _, rest = path.partition("/")
    return {head: _nested(rest, value) if rest else value}


def _get(record: Any, path: str) -> Any:
    for part in path.split("/"):
        if not isinstance(record, dict) or part not in record:
            return None
        record = record[part]
    return record


class TfdsSource:
    """A prepared TensorFlow Datasets split read through ``tfds.data_source`` (array_record; no
    TensorFlow needed). Images stay encoded (SkipDecoding) so the pipeline decodes and counts
    bad ones like any other source. Keys may be nested, "captions/text"; a list of captions
    gives its first."""

    def __init__(self, name: str, split: str = "train", data_dir: str = "", image_key: str = "image",
                 caption_key: str = "caption"):
        if not name:
            raise ValueError("data.tfds_name is empty: name the prepared TFDS dataset (e.g. 'my_images:1.0.0')")
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ValueError("data.source='tfds' needs tensorflow-datasets: pip install 'lcm_jax[data]'") from e
        if data_dir and not os.path.isdir(data_dir):
            raise ValueError(f"data.path {data_dir!r} (the TFDS data_dir) is not a folder")
        try:
            self.src = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                        decoders=_nested(image_key, tfds.decode.SkipDecoding()))
        except Exception as e:  # tfds raises several types (DatasetNotFoundError, AssertionError, ...)
            raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} in data_dir "
                             f"{data_dir or '(default)'!r} as array_record (prepare it with "
                             f"file_format='array_record'): {type(e).__name__}: {e}") from e
        self.name, self.split, self.image_key, self.caption_key = name, split, image_key, caption_key
        features = self.src.dataset_info.features
        for key, what in ((image_key, "data.image_key"), (caption_key, "data.caption_key")):
            node = features
            for part in key.split("/"):
                node = node[part] if hasattr(node, "keys") and part in node.keys() else None
            if node is None:
                raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} ({what}); it has "
                                 f"{sorted(features.keys())}")

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        rec = self.src[i]
        return {"image": _get(rec, self.image_key), "caption": _get(rec, self.caption_key),
                "key": f"{self.name}/{self.split}[{i}]"}


def as_dict(data_config) -> dict:
    """A ConfigDict (or any mapping) as a plain dict."""
    return data_config.to_dict() if hasattr(data_config, "to_dict") else dict(data_config)


# What the data layer reads from a data config; configs/common.py declares each with its default.
DATA_KEYS = ("source", "path", "resolution", "center_crop", "random_flip", "caption_dropout", "missing_caption",
             "split", "tfds_name", "image_key", "caption_key", "num_threads", "worker_count", "prefetch")


def data_fields(data_config) -> dict:
    """``data_config`` as a plain dict, refused (naming what is missing) unless it has every DATA_KEYS key."""
    cfg = as_dict(data_config)
    missing = [k for k in DATA_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"the data config lacks {', '.join(missing)}: build it from configs/common.py's "
                         "base_config().data, which declares every data key with its default")
    return cfg


def make_source(data_config, process_index: int = 0, process_count: int = 1) -> tuple[Any, bool]:
    """The random-access source named by ``data_config.source`` -> (source, already_sharded).

    Tar shards are split between processes whole (each process indexes only its own) when
    there are at least as many shards as processes; other sources are split by the pipeline.
    Raises ValueError for an unknown source, a wrong path or an empty source.
    """
    cfg = data_fields(data_config)
    name = cfg["source"]
    if name == "teacher":  # trainer.train generates it into a cache and reads that (source "cache")
        raise ValueError("data.source='teacher' is not read directly: trainer.train generates it into a latent "
                         "cache (lcm_jax.data.teacher_data) and reads that with data.source='cache'")
    if name not in SOURCES:
        raise ValueError(f"data.source {name!r} is not supported: expected one of {' | '.join(SOURCES)}")
    sharded = False
    if name == "digits":
        images, captions, _ = load_digits(int(cfg["resolution"]), cfg["split"])
        src: Any = ArraySource(images, captions, "digits")
    elif name == "folder":
        src = FolderSource(cfg["path"])
    elif name == "tar":
        from lcm_jax.data.tar import TarSource, expand_shards
        shards = expand_shards(cfg["path"])
        if len(shards) >= process_count > 1:
            shards, sharded = shards[process_index::process_count], True
        src = TarSource(shards, caption_key=cfg["caption_key"], num_threads=int(cfg["num_threads"]))
    elif name == "cache":  # latents + prompt embeddings written by lcm_jax.data.cache
        from lcm_jax.data.cache import CacheSource
        src = CacheSource(cfg["path"], resolution=int(cfg["resolution"]))
    else:
        src = TfdsSource(cfg["tfds_name"], cfg["split"], cfg["path"], cfg["image_key"], cfg["caption_key"])
    if len(src) == 0:
        raise ValueError(f"data.source {name!r} at {cfg['path']!r} has no examples"
                         + (f" for process {process_index} of {process_count}" if sharded else ""))
    return src, sharded
