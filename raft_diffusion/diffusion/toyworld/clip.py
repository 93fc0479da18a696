"""The toy world's reward models: a small open_clip CLIP and a LAION-layout aesthetic head on its embeddings.

1. ``train_clip``: a ViT/transformer CLIP (open_clip format) trained contrastively on freshly drawn scenes and
   their captions (identical captions in a batch count as positives of each other).
2. ``train_aesthetic_head``: the LAION head layout (affine MLP ``D -> ... -> 1``, keys ``layers.{0,2,4,6,7}``)
   fitted on the CLIP's L2-normalised image embeddings to predict the gold aesthetic of renders.

Both are saved in the formats the real rewards read: ``save_open_clip`` folders load with
``load_reward("clip_score", clip_model=dir, clip_pretrained=None)`` and the head with
``load_reward("aesthetic", clip_model=dir, clip_pretrained=None, weights=".../aesthetic_head.safetensors")``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .world import COLOURS, SHAPES, Scene, caption, gold_aesthetic, make_scene, render_batch, sample_scenes, to_tensor

TOY_CLIP_NAME = "raft-toyworld-clip"
TOY_CLIP_CFG = {
    "embed_dim": 64,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 4},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2, "mlp_ratio": 2.0},
}
HEAD_HIDDEN = (64, 32, 16, 8)  # the LAION head has (1024, 128, 64, 16) for 768-d ViT-L/14 embeddings


def build_clip(seed: int = 0, cfg: dict | None = None):
    """A freshly initialised toy CLIP: ``(model, model_cfg, tokenizer)``."""
    import open_clip

    from reward_models.testing import build_tiny_open_clip

    model, cfg = build_tiny_open_clip(seed=seed, model_cfg=cfg or TOY_CLIP_CFG, name=TOY_CLIP_NAME)
    tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    return model, cfg, tokenizer


def _transform(model):
    from reward_models.preprocess import transform_from_open_clip

    return transform_from_open_clip(model)


def degrade(images: torch.Tensor, gen: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """Randomly soften a fraction ``p`` of images (a blur mixed in, as a VAE decoder would): robustness aid."""
    b = images.shape[0]
    pick = torch.rand(b, generator=gen) < p
    if not pick.any():
        return images
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(b, 1, 1, 1, generator=gen) * pick.view(b, 1, 1, 1)
    return images * (1 - amount) + blurred * amount


def _caption_parts(rng: np.random.Generator, p_full: float = 0.5) -> dict:
    """Which optional caption parts to name (as ``caption_variant`` draws them)."""
    if rng.random() < p_full:
        return {"size": True, "position": True, "background": True}
    keep = rng.random(3) < 0.5
    return {"size": bool(keep[0]), "position": bool(keep[1]), "background": bool(keep[2])}


def train_clip(
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    poll: Callable[[int], None] | None = None,
):
    """Train the toy CLIP contrastively on fresh scenes (full and shortened captions); returns ``(model, model_cfg, tokenizer)`` in eval mode.

    ``poll(step)`` is called before every step (a parallel build uses it to take a second thread).
    """
    model, cfg, tokenizer = build_clip(seed)
    transform = _transform(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng([seed, 0xC119])
    t0 = time.time()
    for step in range(steps):
        if poll is not None:
            poll(step)
        scenes = sample_scenes(batch_size, seed=seed * 1_000_003 + step + 1)
        images = degrade(to_tensor(render_batch(scenes)), gen)
        parts = [_caption_parts(rng) for _ in scenes]
        caps = [caption(s, **p) for s, p in zip(scenes, parts)]
        tokens = tokenizer(caps)
        img = F.normalize(model.encode_image(transform(images)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.t()
        # positives: every (image, text) pair where the text describes the image (short texts fit many images)
        fits = torch.tensor([[caption(s, **p) == c for c, p in zip(caps, parts)] for s in scenes], dtype=torch.float32)
        loss = 0.5 * (
            torch.sum(-(fits / fits.sum(1, keepdim=True)) * logits.log_softmax(1), 1).mean()
            + torch.sum(-(fits.t() / fits.t().sum(1, keepdim=True)) * logits.t().log_softmax(1), 1).mean()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"clip step {step:5d}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():.1f} ({time.time() - t0:.0f}s)")
    return model.eval(), cfg, tokenizer


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings of float ``[B, 3, 32, 32]`` images in [0, 1]."""
    transform = _transform(model)
    out = [F.normalize(model.encode_image(transform(images[i : i + batch_size])).float(), dim=-1) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    texts = list(texts)
    out = [F.normalize(model.encode_text(tokenizer(texts[i : i + batch_size])).float(), dim=-1) for i in range(0, len(texts), batch_size)]
    return torch.cat(out)


def _swap(scene: Scene, **attr) -> str:
    d = {k: getattr(scene, k) for k in ("shape", "colour", "size", "position", "background", "noisy")}
    d.update(attr)
    return caption(make_scene(**d))


@torch.no_grad()
def zero_shot_accuracy(
    model, tokenizer, scenes: Sequence[Scene], images: torch.Tensor | None = None, image_embeddings: torch.Tensor | None = None
) -> dict:
    """Shape and colour accuracy: each image against its caption with the shape (colour) word swapped."""
    if image_embeddings is None:
        image_embeddings = embed_images(model, images)
    out = {}
    for attr, names in (("shape", SHAPES), ("colour", list(COLOURS))):
        texts = [_swap(s, **{attr: n}) for s in scenes for n in names]
        t = embed_texts(model, tokenizer, texts).view(len(scenes), len(names), -1)
        pred = (t @ image_embeddings.unsqueeze(-1)).squeeze(-1).argmax(1)
        truth = torch.tensor([list(names).index(getattr(s, attr)) for s in scenes])
        out[attr] = float((pred == truth).float().mean())
    return out


@torch.no_grad()
def zero_shot_by_reward(clip_score, scenes: Sequence[Scene], images: torch.Tensor) -> dict:
    """As :func:`zero_shot_accuracy`, through a loaded ``clip_score`` reward (the path users take)."""
    out = {}
    for attr, names in (("shape", list(SHAPES)), ("colour", list(COLOURS))):
        texts = [_swap(s, **{attr: n}) for s in scenes for n in names]
        reps = images.repeat_interleave(len(names), dim=0)
        scores = clip_score(reps, texts).view(len(scenes), len(names))
        truth = torch.tensor([names.index(getattr(s, attr)) for s in scenes])
        out[attr] = float((scores.argmax(1) == truth).float().mean())
    return out


# ----------------------------------------------------------------------------------------------- aesthetic head


def train_aesthetic_head(model, n_train: int = 20000, steps: int = 3000, seed: int = 0, log: Callable[[str], None] = print):
    """Fit an ``AestheticMLP`` (LAION layout) on normalised embeddings of fresh renders to their gold scores."""
    from reward_models.aesthetic import AestheticMLP

    scenes = sample_scenes(n_train, seed=seed * 1_000_003 + 999_999_937)
    x = embed_images(model, to_tensor(render_batch(scenes)))
    y = torch.tensor([gold_aesthetic(s) for s in scenes], dtype=torch.float32)
    torch.manual_seed(seed)
    head = AestheticMLP(input_dim=x.shape[1], hidden=HEAD_HIDDEN)
    # the head is affine: start from the least-squares solution's scale, then refine with Adam (dropout on)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    head.train()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (512,), generator=gen)
        loss = F.mse_loss(head(x[idx]).squeeze(-1), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 1000 == 0 or step == steps - 1):
            log(f"head step {step:5d}/{steps} mse {loss.item():.3f}")
    return head.eval()


def save_head(head, path: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in head.state_dict().items()}, str(path))
    return path


def save_clip(model, cfg: dict, directory: Path, half: bool = True) -> Path:
    """Save with ``reward_models.save_open_clip``; ``half`` stores fp16 weights (loaded back as fp32)."""
    import copy

    from reward_models import save_open_clip

    m = copy.deepcopy(model).half() if half else model
    return save_open_clip(m, cfg, directory, preprocess_cfg=dict(getattr(model, "preprocess_cfg", {}) or {}) or None)


def spearman(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])
