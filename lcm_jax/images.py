"""Image grids and files (the edges: PIL and disk)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image


def grid(images: np.ndarray, rows: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> one uint8 [rows*H, cols*W, 3] image, row-major (N = rows * cols)."""
    n, h, w, c = images.shape
    if n % rows:
        raise ValueError(f"{n} images do not fill {rows} rows")
    cols = n // rows
    return images.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def save_grid(images: np.ndarray, rows: int, path: str) -> str:
    """Write the grid of ``images`` as a PNG at ``path`` (parent folders created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid(np.asarray(images, np.uint8), rows)).save(path)
    return path
