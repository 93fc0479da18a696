"""Programmatic image rewards: no weights, deterministic, cheap.

Useful for tests, for sanity-checking a pipeline, and as guards in a mix against reward hacking
(e.g. a small ``jpeg_compressibility`` weight penalises noise that fools a learned reward).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from .checks import check_images
from .errors import RewardConfigError
from .preprocess import to_pil_images

# ITU-R BT.601 luma weights (what PIL's "L" conversion uses)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _check_region(region: Any) -> tuple[float, float, float, float] | None:
    if region is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in region)
    except (TypeError, ValueError):
        raise RewardConfigError(f"reward 'brightness': region must be [x0, y0, x1, y1] fractions of the image, got {region!r}") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise RewardConfigError(f"reward 'brightness': region {region!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


def brightness(*, device: str | torch.device | None = None, dtype: Any = None, region: Any = None):
    """Factory: mean BT.601 luma of each image, in ``[0, 1]`` (0.299 R + 0.587 G + 0.114 B).

    ``region=[x0, y0, x1, y1]`` (fractions of width and height) scores only that box, e.g.
    ``[0.25, 0.25, 0.75, 0.75]`` for the centre.
    """
    box = _check_region(region)

    def score(images: torch.Tensor, prompts: Any = None, **kwargs) -> torch.Tensor:
        check_images("brightness", images)
        x = images.detach().float().clamp(0, 1)
        if box is not None:
            h, w = x.shape[-2:]
            x0, x1 = int(round(box[0] * w)), max(int(round(box[2] * w)), int(round(box[0] * w)) + 1)
            y0, y1 = int(round(box[1] * h)), max(int(round(box[3] * h)), int(round(box[1] * h)) + 1)
            x = x[..., y0:y1, x0:x1]
        w = torch.tensor(LUMA_WEIGHTS, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1).mean(dim=(1, 2)).cpu()

    return score


def saturation(*, device: str | torch.device | None = None, dtype: Any = None):
    """Factory: mean HSV saturation ``(max - min) / max`` per pixel (0 for black pixels), in ``[0, 1]``."""

    def score(images: torch.Tensor, prompts: Any = None, **kwargs) -> torch.Tensor:
        check_images("saturation", images)
        x = images.detach().float().clamp(0, 1)
        mx, mn = x.max(dim=1).values, x.min(dim=1).values
        s = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-12), torch.zeros_like(mx))
        return s.mean(dim=(1, 2)).cpu()

    return score


def _jpeg_kb(images: torch.Tensor, quality: int) -> torch.Tensor:
    sizes = []
    for im in to_pil_images(images):
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


def _check_quality(name: str, quality: Any) -> int:
    if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 95:
        raise RewardConfigError(f"reward '{name}': quality must be an integer in [1, 95], got {quality!r}")
    return quality


def jpeg_compressibility(*, device: str | torch.device | None = None, dtype: Any = None, quality: int = 95):
    """Factory: minus the JPEG size in kB (1 kB = 1000 bytes) at ``quality``: simpler images score higher."""
    _check_quality("jpeg_compressibility", quality)

    def score(images: torch.Tensor, prompts: Any = None, **kwargs) -> torch.Tensor:
        check_images("jpeg_compressibility", images)
        return -_jpeg_kb(images, quality)

    return score


def jpeg_incompressibility(*, device: str | torch.device | None = None, dtype: Any = None, quality: int = 95):
    """Factory: the JPEG size in kB at ``quality``: more detailed images score higher."""
    _check_quality("jpeg_incompressibility", quality)

    def score(images: torch.Tensor, prompts: Any = None, **kwargs) -> torch.Tensor:
        check_images("jpeg_incompressibility", images)
        return _jpeg_kb(images, quality)

    return score
