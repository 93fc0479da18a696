"""Rewards that run through their authors' own packages (optional extras).

- ``hpsv2``: Human Preference Score v2/v2.1 (package ``hpsv2``; extra ``raft-diffusion[hpsv2]``). Uses the
  package's vendored open_clip ViT-H-14 and its own validation transform; score = cosine(image, prompt).
- ``imagereward``: ImageReward v1.0 (package ``image-reward``, import ``ImageReward``; extra
  ``raft-diffusion[imagereward]``). Uses the package's ``score(prompt, images)``.

Both packages take PIL images, so these two rewards quantise images to 8 bits before their transforms.
"""

from __future__ import annotations

from typing import Any

import torch

from ._common import check_batch_size
from .checks import batch_slices, broadcast_prompts, check_images
from .errors import RewardConfigError, RewardWeightsNotFoundError
from .preprocess import to_pil_images
from .weights import require_package, resolve_weights

HPSV2_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPSV2_ENV = "REWARD_MODELS_HPSV2_WEIGHTS"


def hpsv2(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    version: str = "v2.1",
    weights: str | None = None,
    batch_size: int = 16,
):
    """Factory for HPSv2.

    version: "v2.0" or "v2.1" (selects the default checkpoint ``hf://xswu/HPSv2/<file>``).
    weights: the checkpoint (local file, ``hf://...`` or URL); default ``$REWARD_MODELS_HPSV2_WEIGHTS`` or the Hub file.
    """
    check_batch_size("hpsv2", batch_size)
    if version not in HPSV2_FILES:
        raise RewardConfigError(f"reward 'hpsv2': version must be one of {sorted(HPSV2_FILES)}, got {version!r}")
    require_package("hpsv2", extra="hpsv2", reward="hpsv2")
    oc = require_package("hpsv2.src.open_clip", extra="hpsv2", reward="hpsv2")
    path = resolve_weights(weights, what=f"HPSv2 {version} checkpoint", env_var=HPSV2_ENV, default=f"hf://xswu/HPSv2/{HPSV2_FILES[version]}")
    # pretrained=None: no LAION download; every weight comes from the strict checkpoint load below.
    # light_augmentation=True selects HPSv2's inference transform (resize longest side + pad), as hpsv2.score does.
    model, _, preprocess_val = oc.create_model_and_transforms(
        "ViT-H-14", pretrained=None, precision="fp32", device="cpu", output_dict=True, light_augmentation=True
    )
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RewardWeightsNotFoundError(f"reward 'hpsv2': could not read checkpoint {str(path)!r}: {type(e).__name__}: {e}") from e
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise RewardWeightsNotFoundError(f"reward 'hpsv2': checkpoint {str(path)!r} holds no state dict")
    try:
        model.load_state_dict(state, strict=True)  # every parameter must come from the checkpoint
    except RuntimeError as e:
        raise RewardWeightsNotFoundError(
            f"reward 'hpsv2': checkpoint {str(path)!r} does not match the HPSv2 ViT-H-14 model: {str(e).splitlines()[0]}"
        ) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = oc.get_tokenizer("ViT-H-14")

    def score(images: torch.Tensor, prompts: Any, **kwargs) -> torch.Tensor:
        check_images("hpsv2", images)
        texts = broadcast_prompts("hpsv2", prompts, images.shape[0])
        out = []
        with torch.inference_mode():
            for sl in batch_slices(images.shape[0], batch_size):
                pix = torch.stack([preprocess_val(im) for im in to_pil_images(images[sl])])
                img = model.encode_image(pix.to(device=device, dtype=dtype)).float()
                txt = model.encode_text(tokenizer(texts[sl]).to(device)).float()
                img = img / img.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                txt = txt / txt.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                out.append((img * txt).sum(-1).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    score.model = model
    return score


def imagereward(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: str = "ImageReward-v1.0",
    download_root: str | None = None,
    med_config: str | None = None,
):
    """Factory for ImageReward.

    model: "ImageReward-v1.0" (fetched by the package from the Hub repo THUDM/ImageReward into ``download_root``,
        default ``~/.cache/ImageReward``) or a local checkpoint path. The model runs in float32 (``dtype`` is
        ignored: the package mixes float32 heads with its BLIP backbone).
    med_config: local path of the package's ``med_config.json`` (otherwise fetched from the Hub).
    Offline use also needs the ``bert-base-uncased`` tokenizer in the Hugging Face cache (the package loads it).
    """
    rm = require_package("ImageReward", extra="imagereward", reward="imagereward", pip_name="image-reward")
    try:
        extra = {"med_config": med_config} if med_config else {}
        net = rm.load(model, device=str(device), download_root=download_root, **extra)
    except Exception as e:
        raise RewardWeightsNotFoundError(
            f"reward 'imagereward': could not load {model!r} (checkpoint ImageReward.pt + med_config.json from Hub repo "
            f"THUDM/ImageReward, cached in {download_root or '~/.cache/ImageReward'}): {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; download both files on a connected machine "
            f"into download_root, or pass model='/path/to/ImageReward.pt'"
        ) from e
    net.eval()

    def score(images: torch.Tensor, prompts: Any, **kwargs) -> torch.Tensor:
        check_images("imagereward", images)
        texts = broadcast_prompts("imagereward", prompts, images.shape[0])
        pils = to_pil_images(images)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(texts):
            groups.setdefault(p, []).append(i)
        out = torch.full((images.shape[0],), float("nan"))
        with torch.inference_mode():
            for prompt, idx in groups.items():
                r = net.score(prompt, [pils[i] for i in idx])
                vals = torch.as_tensor(r, dtype=torch.float32).reshape(-1)
                if vals.numel() != len(idx):
                    raise RewardConfigError(
                        f"reward 'imagereward': the ImageReward package returned {vals.numel()} scores for "
                        f"{len(idx)} images; unsupported package version"
                    )
                out[idx] = vals
        return out

    score.model = net
    return score
