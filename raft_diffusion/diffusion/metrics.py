"""Held-out metrics of one stage.

- ``eval_reward_mean`` / ``eval_reward_std``: mean and population std of the finite rewards, and the same
  for each reward component (``eval_reward_mean/<name>``, ``eval_reward_std/<name>``);
- ``eval_best_of_k``: for each prompt the best reward among its K samples, averaged over prompts
  (stage 0's value is the base model's best-of-K, the reference a single round of selection reaches);
- ``eval_clip_score``: prompt fidelity, 100 x cosine(image, prompt) of CLIP embeddings clipped at 0
  (the torchmetrics convention, as the ``clip_score`` reward), averaged over samples;
- ``eval_diversity``: for each prompt the mean pairwise cosine distance ``1 - cos(a, b)`` of the
  L2-normalised CLIP image embeddings of its samples (0 = identical, 1 = orthogonal, at most 2),
  averaged over the prompts with at least two samples.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from ..core.common import best_of_k, mean_std

log = logging.getLogger("raft")


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """Per sample ``scale * cos(image, text)`` clipped at 0; embeddings need not be normalised."""
    cos = (l2_normalize(image_emb.double()) * l2_normalize(text_emb.double())).sum(-1)
    return (scale * cos).clamp_min(0.0)


def prompt_ranks(image_emb: torch.Tensor, prompt_emb: torch.Tensor, own: Sequence[int]) -> list[int]:
    """For each image, the rank (1 = best) of its own prompt ``own[i]`` among all ``prompt_emb`` by cosine.

    Ties count in the image's favour: a prompt ranks below only the prompts strictly closer to the image.
    """
    sim = l2_normalize(image_emb.double()) @ l2_normalize(prompt_emb.double()).T
    mine = sim[torch.arange(len(own)), torch.as_tensor(list(own))]
    return [1 + int(n) for n in (sim > mine[:, None]).sum(1)]


def diversity(image_emb: torch.Tensor, groups: Sequence[int]) -> float:
    """Mean over groups with >= 2 members of the mean pairwise ``1 - cos`` of their embeddings; NaN if none."""
    e = l2_normalize(image_emb.double())
    g = torch.as_tensor(list(groups))
    per_group = []
    for value in torch.unique(g).tolist():
        idx = (g == value).nonzero().flatten()
        n = idx.numel()
        if n < 2:
            continue
        sim = e[idx] @ e[idx].T
        i, j = torch.triu_indices(n, n, offset=1)
        per_group.append(float((1.0 - sim[i, j]).mean()))
    return sum(per_group) / len(per_group) if per_group else math.nan


def eval_metrics(
    rewards: Sequence[float],
    groups: Sequence[int],
    components: dict[str, Sequence[float]] | None = None,
    image_emb: torch.Tensor | None = None,
    text_emb: torch.Tensor | None = None,
) -> dict:
    """Every metric of the module docstring for one stage's held-out samples (``groups`` = prompt indices)."""
    mean, std = mean_std(rewards)
    out = {"eval_reward_mean": mean, "eval_reward_std": std, "eval_best_of_k": best_of_k(rewards, groups)}
    for name, values in (components or {}).items():
        out[f"eval_reward_mean/{name}"], out[f"eval_reward_std/{name}"] = mean_std(values)
    if image_emb is not None:
        if text_emb is not None:
            out["eval_clip_score"] = float(clip_scores(image_emb, text_emb).mean())
        out["eval_diversity"] = diversity(image_emb, groups)
    return out


class EvalClip:
    """A frozen open_clip model that embeds eval images and prompts (float32, CPU, not normalised)."""

    def __init__(self, backbone):
        self.backbone = backbone
        self._texts: dict[str, torch.Tensor] = {}

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.encode_images(images).float().cpu()

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if new:
            for p, e in zip(new, self.backbone.encode_texts(new).float().cpu()):
                self._texts[p] = e
        return torch.stack([self._texts[p] for p in prompts])


def load_eval_clip(clip_model: str | None, clip_pretrained: str | None, device="cpu") -> EvalClip | None:
    """The CLIP of ``eval.clip_model`` (None when it is null: fidelity and diversity are then skipped)."""
    if clip_model is None:
        log.warning(
            "eval.clip_model is null: eval_clip_score and eval_diversity are not computed "
            "(set eval.clip_model, e.g. ViT-L-14-quickgelu with eval.clip_pretrained=openai)"
        )
        return None
    from reward_models import load_open_clip

    if clip_model == "tiny":
        from .tiny import ensure_tiny_clip

        clip_model, clip_pretrained = str(ensure_tiny_clip()), None
    backbone = load_open_clip(clip_model, clip_pretrained, device=device, dtype=torch.float32, reward="eval.clip_model")
    return EvalClip(backbone)
