"""One raw record -> one training example, never raising on bad input: decode (PIL), RGB,
crop + resize, flip, [-1, 1] CHW float32, caption text; what was wrong is reported, not hidden.

``preprocess`` returns the example with a ``status`` ("ok" or the COUNTS key of the reason it
is skipped) and ``notes`` (the COUNTS keys of what was fixed), so the pipeline can count
them in the consuming thread, whichever worker thread or process decoded the example.
"""
from __future__ import annotations

import io
import json
import logging
import math
import threading
from typing import Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps

# Every counter the pipeline exposes (all present, starting at 0).
COUNTS = (
    "examples",            # usable examples read (and batched)
    "skipped_empty",       # zero-byte (or missing) image data
    "skipped_corrupt",     # not decodable: truncated, garbage, unsupported, decompression bomb
    "skipped_no_caption",  # no caption, with data.missing_caption = "skip"
    "converted",           # not 8-bit RGB: CMYK, paletted, grey, 16-bit, alpha (composited on white)
    "upscaled",            # shorter side below the resolution
    "caption_missing",     # no caption (or an empty one): trained with the empty caption
    "caption_not_utf8",    # caption bytes not UTF-8: read as Latin-1
)
SKIPS = tuple(k for k in COUNTS if k.startswith("skipped_"))
MISSING_CAPTION = ("empty", "skip")

_log_lock = threading.Lock()
_logged = {"n": 0}


def check_caption_dropout(p: float) -> float:
    """The probability of the empty prompt, checked (the input pipeline's and the train step's)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"data.caption_dropout must be in [0, 1], got {p}")
    return p


def _warn(key: str, reason: str, err: BaseException) -> None:
    """The first 20 bad records are named in the log; the counts carry the rest."""
    with _log_lock:
        _logged["n"] += 1
        n = _logged["n"]
    if n <= 20:
        logging.warning("data: skipping %s (%s: %s: %s)%s", key, reason, type(err).__name__, err,
                        " [further bad records are only counted]" if n == 20 else "")


class EmptyImage(ValueError):
    """The record has no image bytes."""


def _alpha_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """8-bit RGB, and whether a conversion was needed. 16/32-bit grey is scaled (PIL's own
    conversion clips it to 255); transparency is composited on white (not black)."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img, False
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or a.max(initial=0) > 255:
            a = a / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # [H, W] -> "L"
        return img.convert("RGB"), True
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _alpha_on_white(img), True
    return img.convert("RGB"), True


def decode_image(data: Union[bytes, np.ndarray, None], resolution: int) -> tuple[Image.Image, list[str]]:
    """Raw bytes (any PIL format) or a uint8 array -> RGB PIL image (EXIF orientation applied).

    Raises EmptyImage for no data; any decoding error propagates (the caller counts it as
    skipped_corrupt). JPEGs are decoded at the smallest DCT scale that keeps the
    shorter side >= ``resolution`` (PIL's draft mode: the same crop, several times faster).
    """
    notes: list[str] = []
    if isinstance(data, np.ndarray):
        img = Image.fromarray(np.asarray(data, np.uint8).squeeze())
    else:
        if data is None or len(data) == 0:
            raise EmptyImage("zero-byte image")
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            w, h = img.size
            s = min(w, h)
            if s > resolution:
                img.draft(None, (math.ceil(w * resolution / s), math.ceil(h * resolution / s)))
        img.load()  # truncated data raises here
        if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            img = ImageOps.exif_transpose(img)
    img, converted = to_rgb(img)
    if converted:
        notes.append("converted")
    return img, notes


def crop_resize(img: Image.Image, resolution: int, center: bool, rng: Optional[np.random.Generator]
                ) -> Image.Image:
    """The largest centred (or random) square, resized to ``resolution``: the same pixels as
    resizing the shorter side to ``resolution`` and cropping, in one resampling pass."""
    w, h = img.size
    s = min(w, h)
    if center or rng is None:
        left, top = (w - s) // 2, (h - s) // 2
    else:
        left, top = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    return img.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + s, top + s))


def decode_caption(raw: Union[str, bytes, None], json_key: Optional[str] = None) -> tuple[str, list[str]]:
    """Caption text and notes. Bytes that are not UTF-8 are read as Latin-1 (counted); with
    ``json_key`` the bytes are a JSON object holding the caption under that key."""
    notes: list[str] = []
    if isinstance(raw, (list, tuple, np.ndarray)):  # several captions per image: the first
        raw = raw[0] if len(raw) else None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raw = raw.decode("latin-1")
            notes.append("caption_not_utf8")
        if json_key is not None:
            try:
                obj = json.loads(raw)
                raw = obj.get(json_key) if isinstance(obj, dict) else None
            except json.JSONDecodeError:
                raw = None
    text = "" if raw is None else str(raw).strip()
    if not text:
        notes.append("caption_missing")
    return text, notes


def preprocess(record: dict, rng: np.random.Generator, *, resolution: int, center_crop: bool = True,
               random_flip: bool = False, caption_dropout: float = 0.0,
               missing_caption: str = "empty") -> dict[str, Any]:
    """A source record {"image", "caption", "key", optional "caption_json_key"} -> the example
    {"pixels": float32 [3, R, R] in [-1, 1], "caption": str, "status": str, "notes": tuple}.

    The draws from ``rng`` (flip, caption dropout, crop offsets) depend only on the record's
    position in the stream, so a resumed pipeline repeats them exactly.
    """
    u_flip, u_drop = rng.random(2)
    key = str(record.get("key", "?"))
    empty = {"pixels": np.zeros((3, resolution, resolution), np.float32), "caption": ""}
    caption, notes = decode_caption(record.get("caption"), record.get("caption_json_key"))
    if "caption_missing" in notes and missing_caption == "skip":
        return {**empty, "status": "skipped_no_caption", "notes": ()}
    try:
        img, image_notes = decode_image(record.get("image"), resolution)
    except EmptyImage as e:
        _warn(key, "skipped_empty", e)
        return {**empty, "status": "skipped_empty", "notes": ()}
    except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, struct.error, ... on bad data
        _warn(key, "skipped_corrupt", e)
        return {**empty, "status": "skipped_corrupt", "notes": ()}
    notes += image_notes
    if min(img.size) < resolution:
        notes.append("upscaled")
    img = crop_resize(img, resolution, center_crop, rng)
    if random_flip and u_flip < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1), dtype=np.float32)  # [3, R, R]
    x /= 127.5
    x -= 1.0
    if caption_dropout > 0 and u_drop < caption_dropout:
        caption = ""
    return {"pixels": x, "caption": caption, "status": "ok", "notes": tuple(notes)}
