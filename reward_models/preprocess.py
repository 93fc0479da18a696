"""Image preprocessing on float tensors that matches CLIP-style PIL pipelines.

Rewards receive images as float ``[B, 3, H, W]`` tensors in ``[0, 1]``. Backbones were trained with a PIL
pipeline (resize the shorter side with bicubic filtering, centre-crop, ``ToTensor``, normalise). Doing the
same on tensors (antialiased bicubic resize, clamp to ``[0, 1]`` as 8-bit PIL would, crop, normalise) keeps
gradients possible and avoids an 8-bit round trip; tests check the result against open_clip's and
transformers' own transforms on the same image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


@dataclass
class ImageTransform:
    """Resize + centre-crop + normalise for ``[B, 3, H, W]`` float tensors in ``[0, 1]``.

    size: output (height, width) after cropping (an int means square).
    resize_size: target of the shorter side before cropping ("shortest" mode); defaults to ``min(size)``.
    resize_mode: "shortest" (resize shorter side, centre-crop: CLIP), "squash" (resize to size, no crop) or
        "longest" (resize longer side, pad with ``fill`` to size).
    interpolation: "bicubic" or "bilinear" (antialiased, like PIL).
    crop_rounding: how the crop offset is rounded: "round" (torchvision ``CenterCrop``, open_clip) or
        "floor" (transformers image processors).
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resize_size: int | None = None
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    crop_rounding: str = "round"
    fill: float = 0.0

    def __post_init__(self):
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"resize_mode must be shortest, squash or longest, got {self.resize_mode!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be bicubic or bilinear, got {self.interpolation!r}")
        if self.crop_rounding not in ("round", "floor"):
            raise ValueError(f"crop_rounding must be round or floor, got {self.crop_rounding!r}")

    def _resize(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # Like PIL: a horizontal pass then a vertical pass, each clipped to [0, 1] (PIL stores the 8-bit
        # intermediate image, so bicubic overshoot is clipped between the passes). PIL also rounds to 8 bits;
        # we keep full precision, which differs from PIL by about 1/255 per pass.
        if x.shape[-1] != hw[1]:
            x = F.interpolate(x, size=(x.shape[-2], hw[1]), mode=self.interpolation, align_corners=False, antialias=True).clamp_(0.0, 1.0)
        if x.shape[-2] != hw[0]:
            x = F.interpolate(x, size=(hw[0], x.shape[-1]), mode=self.interpolation, align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return x

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.clamp(0.0, 1.0)
        th, tw = _pair(self.size)
        h, w = x.shape[-2:]
        if self.resize_mode == "squash":
            x = self._resize(x, (th, tw))
        elif self.resize_mode == "longest":
            scale = max(h / th, w / tw)
            nh, nw = round(h / scale), round(w / scale)
            x = self._resize(x, (nh, nw))
            pad_h, pad_w = th - nh, tw - nw
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=self.fill)
        elif self.resize_size is None and th != tw:
            scale = min(h / th, w / tw)  # non-square target: keep the aspect ratio, cover the crop
            x = self._resize(x, (round(h / scale), round(w / scale)))
            x = self._center_crop(x, th, tw)
        else:
            short_target = self.resize_size or th
            if h <= w:
                nh, nw = short_target, int(short_target * w / h)
            else:
                nh, nw = int(short_target * h / w), short_target
            x = self._resize(x, (nh, nw))
            x = self._center_crop(x, th, tw)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def _center_crop(self, x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h < th or w < tw:  # pad like torchvision before cropping (only when resize_size < size)
            ph, pw = max(th - h, 0), max(tw - w, 0)
            x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2), value=0.0)
            h, w = x.shape[-2:]
        if self.crop_rounding == "round":
            top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        else:
            top, left = (h - th) // 2, (w - tw) // 2
        return x[..., top : top + th, left : left + tw]


def open_clip_preprocess_cfg(model) -> dict:
    """The preprocessing config open_clip attached to a model (``model.visual.preprocess_cfg``), or one
    rebuilt from the legacy ``image_size``/``image_mean``/``image_std`` attributes."""
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or getattr(model, "preprocess_cfg", None) or {})
    if not cfg:
        for key, attr in (("size", "image_size"), ("mean", "image_mean"), ("std", "image_std")):
            value = getattr(visual, attr, None)
            if value is not None:
                cfg[key] = value
    return cfg


def transform_from_open_clip(model, **overrides) -> ImageTransform:
    """The tensor transform matching an open_clip model's inference preprocessing (see
    ``open_clip_preprocess_cfg``); ``overrides`` replace ``ImageTransform`` fields."""
    cfg = open_clip_preprocess_cfg(model)
    kwargs = dict(
        size=_pair(cfg.get("size", 224)),
        mean=tuple(cfg.get("mean", OPENAI_CLIP_MEAN)),
        std=tuple(cfg.get("std", OPENAI_CLIP_STD)),
        resize_mode=cfg.get("resize_mode", "shortest"),
        interpolation="bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic",
        fill=float(cfg.get("fill_color", 0)) / 255.0,
        crop_rounding="round",
    )
    kwargs.update(overrides)
    return ImageTransform(**kwargs)


def transform_from_hf_processor(image_processor, **overrides) -> ImageTransform:
    """The tensor transform matching a transformers ``CLIPImageProcessor`` configuration."""
    size = getattr(image_processor, "size", None) or {"shortest_edge": 224}
    crop = getattr(image_processor, "crop_size", None)
    do_crop = bool(getattr(image_processor, "do_center_crop", True)) and crop is not None
    size = dict(size)
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if do_crop:
            out = (int(crop["height"]), int(crop["width"]))
            kwargs = dict(size=out, resize_size=short, resize_mode="shortest")
        else:
            kwargs = dict(size=(short, short), resize_size=short, resize_mode="shortest")
    else:
        out = (int(size["height"]), int(size["width"]))
        kwargs = dict(size=out, resize_mode="squash")
    resample = getattr(image_processor, "resample", 3)
    resample = int(getattr(resample, "value", resample)) if resample is not None else 3
    kwargs.update(
        mean=tuple(float(m) for m in (getattr(image_processor, "image_mean", None) or OPENAI_CLIP_MEAN)),
        std=tuple(float(s) for s in (getattr(image_processor, "image_std", None) or OPENAI_CLIP_STD)),
        interpolation="bilinear" if resample == 2 else "bicubic",
        crop_rounding="floor",
    )
    kwargs.update(overrides)
    return ImageTransform(**kwargs)


def to_pil_images(images: torch.Tensor):
    """Convert float ``[B, 3, H, W]`` in ``[0, 1]`` to a list of 8-bit RGB PIL images."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
