"""The pixel oracle as rewards (the toy world's *gold* measurements), in the image-reward contract.

``load_reward("raft_diffusion.diffusion.toyworld.rewards:gold_aesthetic")`` scores images with the oracle's estimate of
the gold aesthetic; ``...:fidelity`` gives 1.0 when the subject has the prompt's shape and colour, else 0.0.
They are for evaluation (what a person would judge); the trained proxies are ``aesthetic`` and ``clip_score``
with the toy CLIP (see ``toyworld.assets``).
"""

from __future__ import annotations

import torch

from reward_models import reward_factory

from .oracle import oracle_metrics


@reward_factory(kind="image")
def gold_aesthetic(**_):
    """Factory: oracle estimate of the gold aesthetic (1-10) of each image; prompts are ignored."""

    def score(images: torch.Tensor, prompts=None, **kwargs) -> torch.Tensor:
        n = images.shape[0]
        m = oracle_metrics(images, list(prompts) if prompts is not None and not isinstance(prompts, str) else ["a circle"] * n)
        return torch.as_tensor(m["aesthetic"], dtype=torch.float32)

    return score


@reward_factory(kind="image")
def fidelity(**_):
    """Factory: 1.0 where the oracle finds the prompt's shape and colour, else 0.0."""

    def score(images: torch.Tensor, prompts, **kwargs) -> torch.Tensor:
        prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else list(prompts)
        return torch.as_tensor(oracle_metrics(images, prompts)["match"], dtype=torch.float32)

    return score
