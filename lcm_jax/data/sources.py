"""Image-caption sources held in memory: scikit-learn's digits and a folder of images.

Each source returns (images uint8 [N, R, R, 3], captions list[str]); the batcher turns
them into [-1, 1] float batches. Streaming sources (tar shards, tfds) belong beside these.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Sequence

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


def _captions_from_metadata(folder: str) -> dict[str, str]:
    path = os.path.join(folder, "metadata.jsonl")
    out = {}
    if os.path.isfile(path):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[os.path.normpath(row["file_name"])] = str(row["text"])
                except (json.JSONDecodeError, KeyError) as e:
                    raise ValueError(f"{path}:{n}: expected a JSON object with 'file_name' and 'text' "
                                     f"({e})") from e
    return out


def load_folder(folder: str, resolution: int, center_crop: bool = True) -> tuple[np.ndarray, list[str]]:
    """Images found recursively under ``folder``, captions from metadata.jsonl or ``.txt`` sidecars.

    An unreadable image is skipped with a warning naming it; no usable image is an error.
    """
    if not folder or not os.path.isdir(folder):
        raise FileNotFoundError(f"data.path {folder!r} is not a folder: expected a directory of images "
                                "with captions in metadata.jsonl (file_name, text) or .txt sidecars")
    meta = _captions_from_metadata(folder)
    images, captions = [], []
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(root, name)
            rel = os.path.normpath(os.path.relpath(path, folder))
            sidecar = os.path.splitext(path)[0] + ".txt"
            if rel in meta:
                caption = meta[rel]
            elif os.path.isfile(sidecar):
                with open(sidecar) as f:
                    caption = f.read().strip()
            else:
                caption = ""
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
