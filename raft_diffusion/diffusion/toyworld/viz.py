"""Grids of small images, enlarged with nearest-neighbour so a person can see every pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def grid(images, ncol: int = 8, scale: int = 4, pad: int = 1) -> Image.Image:
    """float ``[B, 3, H, W]`` in [0, 1] (tensor or array) or uint8 ``[B, H, W, 3]`` -> one enlarged PIL image."""
    a = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.transpose(0, 2, 3, 1) * 255), 0, 255).astype(np.uint8)
    b, h, w, _ = a.shape
    nrow = max(1, -(-b // ncol))
    canvas = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        r, c = divmod(i, ncol)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = a[i]
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def save_grid(images, path, ncol: int = 8, scale: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(images, ncol=ncol, scale=scale).save(path)
    return path
