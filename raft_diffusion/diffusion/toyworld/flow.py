"""The toy world's flow-matching model: a miniature Stable Diffusion 3 trained on the world.

Real SD3 structure at toy width, saved as a ``StableDiffusion3Pipeline`` folder (``assets/sd3``):

- an ``SD3Transformer2DModel`` (MMDiT: joint attention over image patches and text tokens, patch size 2 on the
  16x16x4 latents, RMS-normalised queries and keys as in SD3.5) with a ``FlowMatchEulerDiscreteScheduler``;
- the toy VAE of the UNet miniature (``sd/vae``), shared: same weights, with ``shift_factor`` 0 in its config
  (the SD3 pipeline adds it when decoding);
- both CLIP text encoders (``text_encoder``, ``text_encoder_2``) are the toy CLIP's text tower, frozen, as a
  ``CLIPTextModelWithProjection`` (its pooled, projected output is the CLIP text embedding the rewards use);
  the OpenAI CLIP BPE tokenizer; no T5 (``text_encoder_3=None``: the pipeline appends ``max_sequence_length``
  zero rows in its place). The model is trained and sampled with ``max_sequence_length=1`` (``T5_TOKENS``; the
  preset's ``model.max_sequence_length``): the pipeline's default, 256 identical zero rows, would take three
  quarters of every step's compute and, as one heavy attention sink, most of an untrained model's attention.

1. Encode a pool of training renders with the shared VAE (posterior mean and std, fresh draw each step).
2. Encode every training caption once with the pipeline's own ``encode_prompt`` (penultimate CLIP layer for the
   tokens, projected pooled output; the frozen encoders make this exact).
3. Train the transformer with the rectified-flow loss (``x_t = (1 - sigma) x_0 + sigma * noise``, target
   ``noise - x_0``, sigma logit-normal), dropping 10% of the captions (classifier-free guidance), AdamW at lr 3e-3
   (cosine); keep an exponential moving average and save that.

In the saved folder the parts that are byte-for-byte the UNet miniature's (the VAE weights, the tokenizer) and the
second text encoder (the first one again) are relative symbolic links, so the committed model adds only the
transformer and one text encoder.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .sd import _cosine, encode_pool, evaluate_pipeline, require_clip
from .world import caption, caption_variant

FLOW_LAYERS = 4  # MMDiT blocks
FLOW_HEADS = 3  # attention heads of width FLOW_HEAD_DIM
FLOW_HEAD_DIM = 32
FLOW_SHIFT = 1.0  # scheduler shift: SD3 uses 3.0 on 128x128 latents; these are 16x16
T5_TOKENS = 1  # max_sequence_length the model is trained and sampled with: the pipeline appends this many zero "T5" rows
EVAL_GUIDANCE = 4.0  # guidance the quality figures are measured at


def text_encoder_with_projection(model):
    """The text tower of an open_clip CLIP as ``CLIPTextModelWithProjection``: ``text_embeds`` = open_clip's
    ``encode_text`` (before normalisation), the tokens' hidden states as in :func:`sd.text_encoder_from_open_clip`."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from .sd import text_encoder_from_open_clip

    base = text_encoder_from_open_clip(model)
    proj = model.text_projection.detach().float()  # [width, embed_dim]: x @ proj
    cfg = CLIPTextConfig(**{**base.config.to_dict(), "projection_dim": proj.shape[1]})
    te = CLIPTextModelWithProjection(cfg)
    state = {f"text_model.{k}": v for k, v in base.state_dict().items()}
    state["text_projection.weight"] = proj.t().contiguous()
    missing, unexpected = te.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip text tower does not map onto CLIPTextModelWithProjection: missing {missing}, unexpected {unexpected}")
    return te.eval().requires_grad_(False)


def load_text_encoder_with_projection(clip_dir: Path):
    from reward_models import load_reward

    backbone = load_reward("clip_score", clip_model=str(require_clip(clip_dir)), clip_pretrained=None).backbone
    return text_encoder_with_projection(backbone.model.float())


def build_transformer(
    text_dim: int, pooled_dim: int, seed: int = 0, layers: int = FLOW_LAYERS, heads: int = FLOW_HEADS, head_dim: int = FLOW_HEAD_DIM
):
    """An untrained MMDiT for 16x16x4 latents (fixed init seed); context width = the two CLIPs' hidden sizes; ``layers``
    blocks of ``heads`` heads of width ``head_dim``."""
    from diffusers import SD3Transformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        return SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=layers,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_dim,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=pooled_dim,
            pos_embed_max_size=8,
            qk_norm="rms_norm",  # as SD3.5: RMS-normalised queries and keys (lets it train at a 3x higher learning rate)
        )


def build_flow_pipeline(vae, text_encoder, tokenizer, seed: int = 0, **arch):
    """A ``StableDiffusion3Pipeline`` around the shared VAE and a frozen toy CLIP text tower (used twice), with
    an untrained transformer (``arch``: ``layers``, ``heads``, ``head_dim`` of :func:`build_transformer`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    vae = copy.deepcopy(vae).eval()
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes latents / scaling + shift
    h = text_encoder.config.hidden_size
    transformer = build_transformer(2 * h, 2 * text_encoder.config.projection_dim, seed, **arch)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_texts(pipe, texts: list[str], batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip token embeddings [N, L, 2h], pooled [N, 2p])`` through the pipeline's ``encode_prompt`` (without
    the zero T5 tokens: :func:`with_t5_zeros` appends them)."""
    toks, pooled = [], []
    for i in range(0, len(texts), batch):
        pe, _, pp, _ = pipe.encode_prompt(
            prompt=texts[i : i + batch], prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=1
        )
        toks.append(pe[:, :-1].float())
        pooled.append(pp.float())
    return torch.cat(toks), torch.cat(pooled)


def with_t5_zeros(tokens: torch.Tensor, n: int = T5_TOKENS) -> torch.Tensor:
    return torch.cat([tokens, tokens.new_zeros(tokens.shape[0], n, tokens.shape[2])], dim=1)


def pretrain_flow(
    pipe,
    pool: dict,
    steps: int,
    batch: int,
    seed: int,
    log: Callable[[str], None],
    lr: float = 3e-3,
    ema_decay: float = 0.995,
    drop: float = 0.1,
    hook: Callable[[int, dict], None] | None = None,
    hook_every: int = 0,
    resume: dict | None = None,
    sigma_mean: float = 0.0,
    sigma_std: float = 1.0,
) -> dict:
    """Train ``pipe.transformer`` on an encoded pool with the rectified-flow loss; replace it by its EMA.

    ``hook(steps_done, state)`` is called every ``hook_every`` steps and after the last with the training state (``model``, ``ema``,
    ``opt``, ``sched``, ``gen``: live objects) for diagnostics (``scripts/flow_diagnostics.py``: evaluate the EMA,
    checkpoint); ``resume``, a saved :func:`training_state` (same settings), continues that run on the same
    trajectory as if it had not stopped. The noise levels are logit-normal(``sigma_mean``, ``sigma_std``) (sigma = 1
    is pure noise: a positive mean trains more on noisy latents)."""
    t0 = time.time()
    model = pipe.transformer
    scenes, means, stds = pool["scenes"], pool["means"], pool["stds"]
    rng = np.random.default_rng([seed, 0xF1])
    full = [caption(s) for s in scenes]
    short = [caption_variant(s, rng, p_full=0.0) for s in scenes]
    texts = sorted(set(full) | set(short) | {""})
    pos = {t: i for i, t in enumerate(texts)}
    tok_emb, pooled_emb = encode_texts(pipe, texts)
    idx_full = torch.tensor([pos[t] for t in full])
    idx_short = torch.tensor([pos[t] for t in short])
    empty = pos[""]
    log(f"flow: {len(texts)} distinct captions encoded ({time.time() - t0:.0f}s)")
    sf = float(pipe.vae.config.scaling_factor)
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = _cosine(opt, steps)
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # diffusers' processors: deepcopied before the swap
    gen = torch.Generator().manual_seed(seed)
    zeros = torch.zeros(batch, T5_TOKENS, tok_emb.shape[2])  # the zero "T5" rows the pipeline appends
    live = {"model": model, "ema": ema, "opt": opt, "sched": sched, "gen": gen}
    start = 0
    if resume is not None:
        for k in ("model", "ema", "opt", "sched"):
            live[k].load_state_dict(resume[k])
        gen.set_state(resume["gen"])
        start = int(resume["step"])
        log(f"flow: resumed at step {start}")
    loss = torch.tensor(float("nan"))
    for step in range(start, steps):
        i = torch.randint(0, len(scenes), (batch,), generator=gen)
        x0 = (means[i] + stds[i] * torch.randn(means[i].shape, generator=gen)) * sf
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(sigma_mean + sigma_std * torch.randn(batch, generator=gen))  # logit-normal
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        t = torch.where(torch.rand(batch, generator=gen) < 0.5, idx_full[i], idx_short[i])
        t[torch.rand(batch, generator=gen) < drop] = empty
        enc = torch.cat([tok_emb[t], zeros], dim=1)
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=enc, pooled_projections=pooled_emb[t], return_dict=False)[0]
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pl, 1 - d)
        if step % 100 == 0 or step == steps - 1:
            log(f"flow step {step:5d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if hook is not None and hook_every > 0 and ((step + 1) % hook_every == 0 or step == steps - 1):
            hook(step + 1, live)
    pipe.transformer = ema
    pipe.register_modules(transformer=ema)
    return {"final_loss": float(loss.item()), "seconds": time.time() - t0, "parameters": sum(p.numel() for p in ema.parameters())}


def training_state(live: dict, steps_done: int) -> dict:
    """A copy of :func:`pretrain_flow`'s live state (as its ``hook`` gets it) that ``resume=`` continues from."""
    state = {k: copy.deepcopy(live[k].state_dict()) for k in ("model", "ema", "opt", "sched")}
    return {**state, "gen": live["gen"].get_state(), "step": int(steps_done)}


def swapped_caption(scene, kind: str) -> str:
    """The scene's full caption with its shape (``kind="shape"``) or colour word swapped for the next one in the
    world's list (the last for the first); the background's colour word stays."""
    from .world import COLOURS, SHAPES

    names, word = (list(SHAPES), scene.shape) if kind == "shape" else (list(COLOURS), scene.colour)
    return caption(scene).replace(f" {word} ", f" {names[(names.index(word) + 1) % len(names)]} ", 1)  # the subject's word comes first


@torch.no_grad()
def caption_gaps(model, pipe, pool: dict, n: int = 128, seed: int = 1234) -> dict:
    """Whether a transformer uses the caption's shape and colour words: its velocity loss on ``n`` fixed pool latents
    (fixed noise, sigmas spread evenly over [0.05, 0.95]) with each latent's full caption (``val``), and how much that
    loss rises when the caption's shape word (``shape_gap``) or colour word (``colour_gap``) is swapped for the next
    one in the world's list. A model that ignores a word has a gap of 0 for it."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.arange(n) * 7 % len(pool["scenes"])
    sf = float(pipe.vae.config.scaling_factor)
    x0 = (pool["means"][idx] + pool["stds"][idx] * torch.randn(pool["means"][idx].shape, generator=gen)) * sf
    noise = torch.randn(x0.shape, generator=gen)
    sigma = torch.linspace(0.05, 0.95, n)[torch.randperm(n, generator=gen)]
    xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
    scenes = [pool["scenes"][j] for j in idx.tolist()]
    texts = {"val": [caption(sc) for sc in scenes], "shape": [swapped_caption(sc, "shape") for sc in scenes]}
    texts["colour"] = [swapped_caption(sc, "colour") for sc in scenes]
    loss = {}
    for k, tx in texts.items():
        tok, pooled = encode_texts(pipe, tx)
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=with_t5_zeros(tok), pooled_projections=pooled, return_dict=False)[
            0
        ]
        loss[k] = float((pred - (noise - x0)).pow(2).mean())
    return {"val": loss["val"], "shape_gap": loss["shape"] - loss["val"], "colour_gap": loss["colour"] - loss["val"]}


def _link(target: Path, link: Path) -> None:
    """Replace ``link`` (file or folder) by a relative symbolic link to ``target``."""
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    elif link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(os.path.relpath(target, link.parent), link)


def _same_safetensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Whether tokenizer folders ``a`` and ``b`` hold the same files, up to the padding and truncation state that
    ``tokenizer.json`` keeps from the last call (every call of a transformers tokenizer sets it anew)."""

    def content(path: Path):
        if path.name != "tokenizer.json":
            return path.read_bytes()
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in ("padding", "truncation")}

    if not (a.is_dir() and b.is_dir()):
        return False
    names = sorted(f.name for f in a.iterdir())
    return names == sorted(f.name for f in b.iterdir()) and all(content(a / n) == content(b / n) for n in names)


def save_flow_pipeline(pipe, directory: Path, sd_dir: Path | None = None) -> Path:
    """``save_pretrained`` in fp16 safetensors, then link what is duplicated: ``text_encoder_2`` -> ``text_encoder``,
    ``tokenizer_2`` -> ``tokenizer``, and, given the UNet miniature's folder ``sd_dir``, the tokenizer and the VAE
    weights to it when they are identical there. No part's config keeps the path it was loaded from."""
    directory = Path(directory)
    if directory.exists():
        shutil.rmtree(directory)
    p = copy.deepcopy(pipe)
    p.to(torch.float16)
    p.save_pretrained(str(directory), safe_serialization=True)
    for cfg in directory.glob("*/config.json"):  # a part loaded from a folder records that folder: the build machine's path
        part = json.loads(cfg.read_text())
        if part.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(part, indent=2, sort_keys=True) + "\n")
    index = json.loads((directory / "model_index.json").read_text())
    for name in ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor"):  # absent parts, said so
        index.setdefault(name, [None, None])  # (raft-diffusion's loaders then pass them as None)
    (directory / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    _link(directory / "text_encoder", directory / "text_encoder_2")
    if sd_dir is not None and _same_tokenizer(directory / "tokenizer", Path(sd_dir) / "tokenizer"):
        _link(Path(sd_dir) / "tokenizer", directory / "tokenizer")
    _link(directory / "tokenizer", directory / "tokenizer_2")
    weights = "diffusion_pytorch_model.safetensors"
    if sd_dir is not None and _same_safetensors(directory / "vae" / weights, Path(sd_dir) / "vae" / weights):
        _link(Path(sd_dir) / "vae" / weights, directory / "vae" / weights)
    return directory


def load_flow_pipeline(directory: Path):
    """``StableDiffusion3Pipeline.from_pretrained`` in fp32 on CPU (no T5), progress bars off."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(str(directory), text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def folder_bytes(directory: Path) -> int:
    """Bytes of the regular files under ``directory``; symbolic links (to files or folders) add no data."""
    total = 0
    for root, _, files in os.walk(directory):  # os.walk does not descend into linked folders
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if not os.path.islink(os.path.join(root, f)))
    return total


def build_flow(out: Path, s, log: Callable[[str], None] = print) -> dict:
    """Train the flow-matching miniature (settings ``s``: a ``BuildSettings``) on the built ``out/sd`` VAE and
    ``out/clip`` text tower, save it to ``out/sd3`` and measure it on held-out prompts."""
    from diffusers import AutoencoderKL

    from raft_diffusion.core.errors import UserError

    out = Path(out)
    sd_dir = out / "sd"
    if not (sd_dir / "vae" / "config.json").is_file():
        raise UserError(f"no toy VAE in {sd_dir}/vae: the flow model shares it; build it first (raft-diffusion toyworld build --parts sd)")
    require_clip(out / "clip")
    t0 = time.time()
    torch.manual_seed(s.seed)
    vae = AutoencoderKL.from_pretrained(str(sd_dir / "vae"), torch_dtype=torch.float32).eval()
    from raft_diffusion.diffusion.tiny import build_clip_tokenizer

    te = load_text_encoder_with_projection(out / "clip")
    tok = build_clip_tokenizer()
    tok.model_max_length = te.config.max_position_embeddings
    pipe = build_flow_pipeline(vae, te, tok, s.seed)
    pool = encode_pool(vae, s.flow_pool, s.seed + 17)
    log(f"flow: pool of {len(pool['scenes'])} latents encoded ({time.time() - t0:.0f}s)")
    info = {"train": pretrain_flow(pipe, pool, s.flow_steps, s.flow_batch, s.seed, log, lr=s.flow_lr, sigma_mean=s.flow_sigma_mean)}
    save_flow_pipeline(pipe, out / "sd3", sd_dir)
    pipe = load_flow_pipeline(out / "sd3")  # measure what was saved (fp16 weights, upcast)
    ev = evaluate_pipeline(pipe, n_prompts=s.sd_eval_prompts, seed=s.seed, guidance=EVAL_GUIDANCE, max_sequence_length=T5_TOKENS)
    info["eval"] = {k: v for k, v in ev.items() if k not in ("images", "prompt_list")}
    info["eval"]["guidance"] = EVAL_GUIDANCE
    info["eval"]["max_sequence_length"] = T5_TOKENS
    info["bytes"] = folder_bytes(out / "sd3")
    info["seconds"] = time.time() - t0
    log(f"sd3: {info['eval']} ({info['seconds']:.0f}s)")
    return info


__all__ = ["build_flow", "build_flow_pipeline", "caption_gaps", "load_flow_pipeline", "pretrain_flow", "save_flow_pipeline", "training_state"]
