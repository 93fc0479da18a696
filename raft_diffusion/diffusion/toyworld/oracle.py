"""A pixel-level oracle for the toy world: from any image, estimate the gold aesthetic and the subject.

No learning: the background is the median colour of the image border; the subject is the largest connected
region that differs from it; its box gives size and position, its core pixels give colour (nearest palette
colour) and contrast, the background pixels give noise, and the subject's cropped coverage map is matched
against drawn templates of each shape. The four measured quantities go through the same formula as the gold
score (:func:`raft_diffusion.diffusion.toyworld.world.aesthetic_from_features`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image

from .world import COLOURS, IMAGE_SIZE, SHAPES, SIZES, aesthetic_from_features, luminance, parse_caption, shape_mask

TEMPLATE_SIZE = 12
MIN_SUBJECT_DISTANCE = 0.15  # a subject must differ from the background by this much (RGB distance, [0,1] units)
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.asarray([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0


@dataclass
class Analysis:
    found: bool  # a subject was detected
    shape: str | None
    colour: str | None
    extent: float  # subject box side / image side
    offset: float  # px from the subject box centre to the image centre
    contrast: float  # |luma(subject) - luma(background)|
    noise: float  # std of the background luma
    aesthetic: float  # gold formula on the four measurements

    def matches(self, prompt: str) -> bool:
        """The subject has the prompt's shape and (if it names one) colour."""
        want = parse_caption(prompt)
        return bool(self.found and self.shape == want["shape"] and (want.get("colour") is None or self.colour == want["colour"]))


def _as_hwc(image: Any) -> np.ndarray:
    """One image (uint8 HWC, float HWC in [0,1], float CHW tensor in [0,1], or PIL) -> float 32x32x3."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if hasattr(image, "detach"):
        image = image.detach().cpu().float().numpy()
    a = np.asarray(image)
    if a.ndim != 3:
        raise ValueError(f"expected one image with 3 dims, got shape {a.shape}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else np.clip(a.astype(np.float64), 0.0, 1.0)
    if a.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        pil = Image.fromarray(np.round(a * 255).astype(np.uint8))
        a = np.asarray(pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float64) / 255.0
    return a


def _box_blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, 1, mode="edge")
    h, w = x.shape
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def _dilate(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1)
    h, w = m.shape
    out = np.zeros_like(m)
    for i in range(3):
        for j in range(3):
            out |= p[i : i + h, j : j + w]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (label propagation by max-pooling)."""
    if not mask.any():
        return mask
    h, w = mask.shape
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    while True:
        p = np.pad(labels, 1)
        nb = np.max(np.stack([p[i : i + h, j : j + w] for i in range(3) for j in range(3)]), axis=0)
        new = np.where(mask, nb, 0)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return labels == ids[np.argmax(counts)]


def _crop_template(coverage: np.ndarray) -> np.ndarray:
    """Crop a coverage map to its support's box, resize to TEMPLATE_SIZE^2, return it zero-mean unit-norm."""
    ys, xs = np.nonzero(coverage > 0.25)
    if len(ys) == 0:
        return np.zeros(TEMPLATE_SIZE * TEMPLATE_SIZE)
    crop = coverage[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.float32)
    t = np.asarray(Image.fromarray(crop, mode="F").resize((TEMPLATE_SIZE, TEMPLATE_SIZE), Image.Resampling.BILINEAR), dtype=np.float64).ravel()
    t = t - t.mean()
    n = np.linalg.norm(t)
    return t / n if n > 0 else t


@lru_cache(maxsize=1)
def _templates() -> tuple[np.ndarray, np.ndarray]:
    """Templates of every shape at every size and a few sub-pixel offsets: (matrix [T, D], shape index [T])."""
    rows, idx = [], []
    for si, shape in enumerate(SHAPES):
        for half in SIZES.values():
            for dh in (-0.5, 0.0, 0.5):
                for d in (0.0, 0.25, 0.5):
                    rows.append(_crop_template(shape_mask(shape, 16 + d, 16 + d, half + dh)))
                    idx.append(si)
    return np.stack(rows), np.asarray(idx)


def analyse(image: Any) -> Analysis:
    """Measure one image (see the module docstring)."""
    img = _as_hwc(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    sdist = _box_blur(dist)
    peak = float(np.percentile(sdist, 99.5))
    bg_luma = float(luminance(bg))
    if peak < MIN_SUBJECT_DISTANCE:
        noise = float(1.4826 * np.median(np.abs(luminance(img) - bg_luma)))
        return Analysis(False, None, None, 0.0, IMAGE_SIZE / 2.0, 0.0, noise, aesthetic_from_features(0.0, IMAGE_SIZE / 2.0, 0.0, noise))
    comp = _largest_component(sdist > max(MIN_SUBJECT_DISTANCE * 0.75, 0.5 * peak))
    core = comp & (dist >= 0.6 * float(dist[comp].max()))
    fg = np.median(img[core], axis=0)
    fg_dist = max(float(np.linalg.norm(fg - bg)), 1e-6)
    region = _dilate(comp)
    coverage = np.where(region, np.clip(dist / fg_dist, 0.0, 1.0), 0.0)
    cols, rows = coverage.max(axis=0), coverage.max(axis=1)
    extent = max(cols.sum(), rows.sum()) / IMAGE_SIZE
    grid = np.arange(IMAGE_SIZE) + 0.5
    cx, cy = float((cols * grid).sum() / cols.sum()), float((rows * grid).sum() / rows.sum())
    offset = float(np.hypot(cx - IMAGE_SIZE / 2, cy - IMAGE_SIZE / 2))
    outside = ~_dilate(_dilate(comp))
    if outside.sum() < 64:  # the "subject" fills the frame: judge the noise on the border instead
        outside = np.zeros_like(comp)
        outside[[0, -1], :] = outside[:, [0, -1]] = True
    noise = float(1.4826 * np.median(np.abs(luminance(img[outside]) - bg_luma)))
    contrast = abs(float(luminance(fg)) - bg_luma)
    colour = _PALETTE_NAMES[int(np.argmin(np.linalg.norm(_PALETTE - fg, axis=-1)))]
    mat, idx = _templates()
    shape = SHAPES[int(idx[int(np.argmax(mat @ _crop_template(coverage)))])]
    return Analysis(True, shape, colour, float(extent), offset, contrast, noise, aesthetic_from_features(float(extent), offset, contrast, noise))


def analyse_batch(images: Any) -> list[Analysis]:
    """Analyse a batch: float ``[B, 3, H, W]`` in [0, 1] (tensor or array), uint8 ``[B, H, W, 3]``, or a list."""
    return [analyse(im) for im in images]


def oracle_metrics(images: Any, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-image arrays: ``aesthetic`` (oracle gold estimate), ``shape_ok``, ``colour_ok``, ``match``."""
    res = analyse_batch(images)
    if len(res) != len(prompts):
        raise ValueError(f"{len(res)} images but {len(prompts)} prompts")
    wants = [parse_caption(p) for p in prompts]
    shape_ok = np.asarray([r.found and r.shape == w["shape"] for r, w in zip(res, wants)])
    colour_ok = np.asarray([r.found and (w.get("colour") is None or r.colour == w["colour"]) for r, w in zip(res, wants)])
    return {"aesthetic": np.asarray([r.aesthetic for r in res]), "shape_ok": shape_ok, "colour_ok": colour_ok, "match": shape_ok & colour_ok}
