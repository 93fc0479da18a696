"""Image-text similarity rewards: ``clip_score`` (open_clip or transformers CLIP) and ``pickscore``."""

from __future__ import annotations

from typing import Any

import torch

from ._common import check_batch_size
from .aesthetic import _backbone
from .checks import batch_slices, broadcast_prompts, check_images
from .errors import RewardConfigError

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _cosine_scores(backbone, images: torch.Tensor, prompts, batch_size: int) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for sl in batch_slices(images.shape[0], batch_size):
            img = backbone.encode_images(images[sl]).float()
            txt = backbone.encode_texts(prompts[sl]).float()
            img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.append((img * txt).sum(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0)


def clip_score(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_model: Any = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = "openai",
    backend: str = "open_clip",
    clip_processor: Any | None = None,
    scale: float = 100.0,
    clip_at_zero: bool = True,
    batch_size: int = 32,
):
    """Factory for CLIP score: ``scale * cosine(image embedding, prompt embedding)`` per sample.

    With the defaults this is the torchmetrics convention (100 x cosine, clipped at 0) on OpenAI ViT-L/14.
    clip_model / clip_pretrained / backend / clip_processor: as for ``aesthetic``.
    clip_at_zero: clip negative scores to 0 (set False to keep the full range, useful for ranking).
    """
    check_batch_size("clip_score", batch_size)
    backbone = _backbone(backend, clip_model, clip_pretrained, clip_processor, device, dtype, "clip_score")

    def score(images: torch.Tensor, prompts: Any, **kwargs) -> torch.Tensor:
        check_images("clip_score", images)
        texts = broadcast_prompts("clip_score", prompts, images.shape[0])
        s = float(scale) * _cosine_scores(backbone, images, texts, batch_size)
        return s.clamp_min(0.0) if clip_at_zero else s

    score.backbone = backbone
    return score


def pickscore(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: Any = PICKSCORE_MODEL,
    processor: Any = PICKSCORE_PROCESSOR,
    batch_size: int = 16,
):
    """Factory for PickScore v1: ``logit_scale.exp() * cosine(image, prompt)`` with a transformers CLIPModel.

    model: Hub id or local ``save_pretrained`` directory of the PickScore CLIPModel (or a built CLIPModel).
    processor: Hub id or directory of the CLIP-ViT-H-14 processor used to train it (or a processor object).
    """
    from .backbones import load_hf_clip

    check_batch_size("pickscore", batch_size)
    if model is None:
        raise RewardConfigError("reward 'pickscore': model is required (Hub id or directory)")
    backbone = load_hf_clip(model, processor, device=device, dtype=dtype, reward="pickscore")
    logit_scale = backbone.logit_scale()

    def score(images: torch.Tensor, prompts: Any, **kwargs) -> torch.Tensor:
        check_images("pickscore", images)
        texts = broadcast_prompts("pickscore", prompts, images.shape[0])
        return logit_scale * _cosine_scores(backbone, images, texts, batch_size)

    score.backbone = backbone
    return score
