"""Grad-CAM overlays and thumbnails as PNG files (written atomically)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

THUMB_PX = 160
ALPHA = 0.4


def _jet(x: np.ndarray) -> np.ndarray:
    """Map [0, 1] to RGB with a jet-like ramp (blue, cyan, yellow, red); returns uint8 (H, W, 3)."""
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(grey: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Blend a [0, 1] heatmap over a [0, 1] grey image of the same shape; returns uint8 RGB."""
    g = (np.clip(grey, 0, 1) * 255).astype(np.float32)[..., None].repeat(3, -1)
    h = _jet(np.clip(heat, 0, 1)).astype(np.float32)
    w = alpha * np.clip(heat, 0, 1)[..., None]  # cold regions stay readable
    return (g * (1 - w) + h * w).clip(0, 255).astype(np.uint8)


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_overlay(grey: np.ndarray, heat: np.ndarray, path: Path) -> tuple[Path, Path]:
    """Write the overlay PNG at ``path`` and a thumbnail beside it; return both paths."""
    im = Image.fromarray(overlay(grey, heat))
    _save_png(im, path)
    thumb = im.copy()
    thumb.thumbnail((THUMB_PX, THUMB_PX))
    tpath = path.with_name(path.stem + "_thumb.png")
    _save_png(thumb, tpath)
    return path, tpath
