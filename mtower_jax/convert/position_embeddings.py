"""Resizing ViT position embeddings to another image size (224 -> 288 / 384 / 576).

The class-token row is kept; the grid rows are reshaped to [g, g, D] and resized bicubically
to the new grid, as the reference code does with torch's `F.interpolate(mode='bicubic',
align_corners=False)`. `bicubic_resize` reproduces that kernel (Keys cubic, a = -0.75, border
replication) in NumPy, so no torch is needed at conversion time.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Weights of the 4 taps at offsets -1, 0, 1, 2 for fractional positions t: [n] -> [n, 4]."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    scale = n / size
    src = (np.arange(size) + 0.5) * scale - 0.5  # align_corners=False
    base = np.floor(src).astype(np.int64)
    weights = _cubic_weights(src - base)  # [size, 4]
    taps = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)  # [size, 4]
    moved = np.moveaxis(x, axis, 0)  # [n, ...]
    out = np.einsum("st,st...->s...", weights, moved[taps])
    return np.moveaxis(out, 0, axis)


def bicubic_resize(grid: np.ndarray, size: int) -> np.ndarray:
    """[g, g, D] -> [size, size, D], torch bicubic with align_corners=False."""
    out = _resize_axis(grid.astype(np.float64), size, 0)
    return _resize_axis(out, size, 1)


def resize(table: np.ndarray, grid_size: int) -> np.ndarray:
    """Position table [1 + g*g, D] -> [1 + grid_size^2, D], class row kept."""
    table = np.asarray(table)
    g = int(round((table.shape[0] - 1) ** 0.5))
    if g * g + 1 != table.shape[0]:
        raise ValueError(f"position table of {table.shape[0]} rows is not 1 + a square grid")
    if g == grid_size:
        return table
    grid = bicubic_resize(table[1:].reshape(g, g, -1), grid_size)
    return np.concatenate([table[:1], grid.reshape(grid_size * grid_size, -1)]).astype(table.dtype)


def resize_position_embedding(state_dict: Mapping, key: str, patch_size: int,
                              image_size: int) -> dict:
    """A copy of `state_dict` whose `key` table fits `image_size` (a multiple of patch_size)."""
    if image_size % patch_size:
        raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
    out = dict(state_dict)
    if key in out:
        out[key] = resize(out[key], image_size // patch_size)
    return out
