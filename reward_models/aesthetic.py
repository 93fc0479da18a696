"""``aesthetic``: the LAION improved aesthetic predictor on CLIP image embeddings.

The head is an affine MLP (no activations) ``D -> 1024 -> 128 -> 64 -> 16 -> 1`` with dropouts 0.2/0.2/0.1
(inactive at inference) and state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``, applied to the
L2-normalised image embedding of OpenAI CLIP ViT-L/14 (D = 768). The output is on the AVA 1-10 scale.

All layer sizes are read from the checkpoint, so a toy head with the same key layout on a small CLIP
(any D) loads the same way; the head's input size must equal the backbone's embedding size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._common import check_batch_size
from .checks import batch_slices, check_images
from .errors import RewardConfigError, RewardWeightsNotFoundError
from .weights import resolve_weights

AESTHETIC_WEIGHTS_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_WEIGHTS_ENV = "REWARD_MODELS_AESTHETIC_WEIGHTS"
_LINEAR_KEYS = (0, 2, 4, 6, 7)


class AestheticMLP(nn.Module):
    """The LAION aesthetic head. ``hidden`` are the four hidden sizes (1024, 128, 64, 16 in the original)."""

    def __init__(self, input_dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        if len(hidden) != 4:
            raise ValueError(f"AestheticMLP needs 4 hidden sizes, got {list(hidden)}")
        h1, h2, h3, h4 = (int(h) for h in hidden)
        self.input_dim = int(input_dim)
        self.layers = nn.Sequential(
            nn.Linear(self.input_dim, h1),
            nn.Dropout(0.2),
            nn.Linear(h1, h2),
            nn.Dropout(0.2),
            nn.Linear(h2, h3),
            nn.Dropout(0.1),
            nn.Linear(h3, h4),
            nn.Linear(h4, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], source: str = "<state dict>") -> AestheticMLP:
        """Build a head whose sizes match ``state_dict`` and load it strictly."""
        expected = {f"layers.{i}.{p}" for i in _LINEAR_KEYS for p in ("weight", "bias")}
        keys = set(state_dict)
        if keys != expected:
            raise RewardWeightsNotFoundError(
                f"aesthetic head {source}: unexpected state-dict keys (missing {sorted(expected - keys)[:4]}, "
                f"extra {sorted(keys - expected)[:4]}); expected the LAION layout layers.{{0,2,4,6,7}}.weight/bias"
            )
        w = [state_dict[f"layers.{i}.weight"] for i in _LINEAR_KEYS]
        if w[-1].shape[0] != 1 or any(w[k + 1].shape[1] != w[k].shape[0] for k in range(4)):
            raise RewardWeightsNotFoundError(f"aesthetic head {source}: layer shapes {[list(t.shape) for t in w]} do not chain into a D->...->1 MLP")
        head = cls(input_dim=w[0].shape[1], hidden=[t.shape[0] for t in w[:4]])
        head.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
        return head


def load_aesthetic_head(path: str | os.PathLike) -> AestheticMLP:
    """Load a head from ``.safetensors`` or a torch ``.pth``/``.pt``/``.bin`` state dict (on CPU first)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise RewardWeightsNotFoundError(f"aesthetic head {str(path)!r} could not be read as a torch state dict: {type(e).__name__}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardWeightsNotFoundError(f"aesthetic head {str(path)!r} holds {type(sd).__name__}, not a state dict")
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    return AestheticMLP.from_state_dict(sd, source=repr(str(path)))


def aesthetic(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    weights: str | None = None,
    head: AestheticMLP | None = None,
    clip_model: Any = "ViT-L-14-quickgelu",
    clip_pretrained: str | None = "openai",
    backend: str = "open_clip",
    clip_processor: Any | None = None,
    batch_size: int = 32,
):
    """Factory for the LAION aesthetic reward.

    weights: head weights: a local ``.pth``/``.safetensors`` file, ``hf://org/repo/file`` or a URL; default
        ``$REWARD_MODELS_AESTHETIC_WEIGHTS`` or the original file from the improved-aesthetic-predictor repo.
    head: an already-built ``AestheticMLP`` (explicit hook for tests; ``weights`` is then ignored).
    clip_model / clip_pretrained: the backbone (see ``reward_models.backbones.load_open_clip``), or with
        ``backend="transformers"`` a ``CLIPModel`` Hub id / directory (default ``openai/clip-vit-large-patch14``)
        and ``clip_processor`` for its processor.
    batch_size: images per forward pass.
    """
    check_batch_size("aesthetic", batch_size)
    if head is None:
        path = resolve_weights(
            weights, what="LAION aesthetic MLP weights", env_var=AESTHETIC_WEIGHTS_ENV, default=AESTHETIC_WEIGHTS_URL, kwarg="weights"
        )
        head = load_aesthetic_head(path)
    elif not isinstance(head, AestheticMLP):
        raise RewardConfigError(f"reward 'aesthetic': head must be an AestheticMLP, got {type(head).__name__}")
    backbone = _backbone(backend, clip_model, clip_pretrained, clip_processor, device, dtype, "aesthetic")
    if backbone.embed_dim != head.input_dim:
        raise RewardConfigError(
            f"reward 'aesthetic': head expects {head.input_dim}-d embeddings but backbone {backbone.source!r} gives "
            f"{backbone.embed_dim}-d; use the CLIP the head was trained on (ViT-L/14 for the LAION head)"
        )
    head = head.to(device=device, dtype=torch.float32).eval().requires_grad_(False)

    def score(images: torch.Tensor, prompts: Any = None, **kwargs) -> torch.Tensor:
        check_images("aesthetic", images)
        out = []
        with torch.inference_mode():
            for sl in batch_slices(images.shape[0], batch_size):
                emb = backbone.encode_images(images[sl]).float()
                emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                out.append(head(emb).squeeze(-1).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    score.backbone = backbone
    score.head = head
    return score


def _backbone(backend, clip_model, clip_pretrained, clip_processor, device, dtype, reward):
    from .backbones import load_hf_clip, load_open_clip

    if backend == "open_clip":
        return load_open_clip(clip_model, clip_pretrained, device=device, dtype=dtype, reward=reward)
    if backend == "transformers":
        if clip_model == "ViT-L-14-quickgelu":
            clip_model = "openai/clip-vit-large-patch14"
        return load_hf_clip(clip_model, clip_processor, device=device, dtype=dtype, reward=reward)
    raise RewardConfigError(f"reward '{reward}': backend must be 'open_clip' or 'transformers', got {backend!r}")
