"""Small image files for the data tests: solid colours, encoded bytes, and a folder of bad files."""
import io
import os

import numpy as np
from PIL import Image


def color(i):
    return (17 * i % 256, 255 - 23 * i % 256, 40 + 9 * i % 200)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


def solid(i, size=(30, 20)):
    return Image.new("RGB", size, color(i))


def has_webp():
    from PIL import features
    return features.check("webp")


def make_bad_folder(root) -> str:
    """3 clean images and one of each kind of bad file, each captioned 'img i' by a sidecar."""
    jpeg = encode(solid(0, (40, 40)), "JPEG")
    files = {
        "clean0.png": encode(solid(0), "PNG"),
        "clean1.jpg": encode(solid(1), "JPEG"),
        "clean2.webp" if has_webp() else "clean2.png": encode(solid(2), "WEBP" if has_webp() else "PNG"),
        "truncated.jpg": jpeg[:len(jpeg) // 2],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
        "zero.jpg": b"",
        "cmyk.jpg": encode(Image.new("CMYK", (30, 20), (0, 255, 255, 0)), "JPEG"),        # red
        "paletted.png": encode(solid(5).convert("P"), "PNG"),
        "gray16.png": encode(Image.fromarray(np.full((20, 30), 65535, np.uint16)), "PNG"),  # white
        "alpha.png": encode(Image.new("RGBA", (30, 20), (0, 0, 0, 0)), "PNG"),             # transparent
        "small.png": encode(solid(8, (5, 7)), "PNG"),
        "nocaption.png": encode(solid(9), "PNG"),
        "latin1.png": encode(solid(10), "PNG"),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
        stem = os.path.splitext(name)[0]
        if stem == "latin1":
            (root / f"{stem}.txt").write_bytes("café".encode("latin-1"))
        elif stem != "nocaption":
            (root / f"{stem}.txt").write_text(stem)
    return str(root)
