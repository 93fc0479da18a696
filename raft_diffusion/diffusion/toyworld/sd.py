"""The toy world's text-to-image model: a miniature Stable Diffusion trained on the world.

Real SD 1.x structure at toy width: an ``AutoencoderKL`` (32 px images <-> 16x16x4 latents), a
``UNet2DConditionModel`` with cross-attention, a frozen ``CLIPTextModel`` and OpenAI CLIP's BPE tokenizer, saved
as a ``StableDiffusionPipeline`` folder with a DDIM scheduler.

1. Train the autoencoder on renders (reconstruction + a small KL term); set ``scaling_factor`` = 1 / latent std.
2. Encode a pool of training renders once (posterior mean and std, so each step draws a fresh latent).
3. As SD 1.x conditions on OpenAI CLIP's text tower, frozen, the toy model conditions on the text tower of the
   toy world's own CLIP (:func:`text_encoder_from_open_clip`), frozen. (A text encoder trained from scratch
   together with the UNet learned colour but never shape within the build's budget: shape stayed at chance.)
4. Train the UNet with the epsilon-prediction loss under min-SNR weighting (gamma 5), dropping 10% of the
   captions (classifier-free guidance); keep an exponential moving average and save that.

Held-out prompts: a fixed 10% of the world's captions never appear in training (``split_captions``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..finetune import min_snr_weights
from .world import COLOURS, SHAPES, all_captions, caption, caption_variant, render_batch, sample_scenes, to_tensor

EVAL_FRACTION = 0.1  # share of captions held out from text-to-image training


def is_held_out(text: str) -> bool:
    """Whether a caption belongs to the held-out split (a fixed hash rule: the same on every machine)."""
    base = text.replace("noisy ", "")  # a caption and its noisy-background twin share the split
    return int(hashlib.sha256(base.encode()).hexdigest()[:8], 16) % 1000 < EVAL_FRACTION * 1000


def split_captions() -> tuple[list[str], list[str]]:
    caps = all_captions()
    return [c for c in caps if not is_held_out(c)], [c for c in caps if is_held_out(c)]


UNET_CHANNELS = (32, 64)
UNET_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")


def build_vae(seed: int = 0):
    """An untrained toy autoencoder (fixed init seed): 32x32x3 images <-> 16x16x4 latents."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=16,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=32,
            mid_block_add_attention=False,
        )


def build_components(vae, text_encoder, seed: int = 0) -> dict:
    """Pipeline components around a (trained) VAE and a frozen ``CLIPTextModel``, with an untrained UNet.

    The UNet's cross-attention width and the tokenizer's length follow the text encoder's config.
    """
    from diffusers import UNet2DConditionModel

    from raft_diffusion.diffusion.tiny import build_clip_tokenizer, sd_ddim_scheduler

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=UNET_CHANNELS,
            down_block_types=UNET_DOWN,
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(UNET_DOWN)),
            cross_attention_dim=text_encoder.config.hidden_size,
            attention_head_dim=8,
            norm_num_groups=16,
        )
    tokenizer = build_clip_tokenizer()
    tokenizer.model_max_length = text_encoder.config.max_position_embeddings
    scheduler = sd_ddim_scheduler()
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder.requires_grad_(False).eval(), "tokenizer": tokenizer, "scheduler": scheduler}


def require_clip(clip_dir: Path) -> Path:
    from raft_diffusion.core.errors import UserError

    if not (Path(clip_dir) / "open_clip_config.json").is_file():
        raise UserError(
            f"no toy CLIP in {clip_dir}: the text-to-image model conditions on its text tower; "
            "build it first (raft-diffusion toyworld build --parts rewards)"
        )
    return Path(clip_dir)


def load_text_encoder(clip_dir: Path):
    """The frozen ``CLIPTextModel`` of a saved toy CLIP (open_clip folder), as the text-to-image model uses it."""
    from reward_models import load_reward

    backbone = load_reward("clip_score", clip_model=str(require_clip(clip_dir)), clip_pretrained=None).backbone
    return text_encoder_from_open_clip(backbone.model.float())


def text_encoder_from_open_clip(model):
    """The text tower of an open_clip CLIP as a ``transformers`` ``CLIPTextModel`` (the same function, new keys).

    Stable Diffusion 1.x conditions its UNet on a frozen CLIP text encoder; the toy world does the same with its
    own small CLIP. Tokens are read by the real CLIP BPE tokenizer (OpenAI's vocabulary in both libraries).
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    sd = {k: v.detach().float() for k, v in model.state_dict().items() if not k.startswith("visual.")}
    width = sd["token_embedding.weight"].shape[1]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    heads = int(model.transformer.resblocks[0].attn.num_heads)
    mlp = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    act = "quick_gelu" if "QuickGELU" in type(model.transformer.resblocks[0].mlp.gelu).__name__ else "gelu"
    cfg = CLIPTextConfig(
        vocab_size=sd["token_embedding.weight"].shape[0],
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=sd["positional_embedding"].shape[0],
        hidden_act=act,
        layer_norm_eps=1e-5,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    out = {
        "embeddings.token_embedding.weight": sd["token_embedding.weight"],
        "embeddings.position_embedding.weight": sd["positional_embedding"],
        "final_layer_norm.weight": sd["ln_final.weight"],
        "final_layer_norm.bias": sd["ln_final.bias"],
    }
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, part in zip(("q", "k", "v"), sd[src + "attn.in_proj_weight"].chunk(3)):
            out[dst + f"self_attn.{name}_proj.weight"] = part
        for name, part in zip(("q", "k", "v"), sd[src + "attn.in_proj_bias"].chunk(3)):
            out[dst + f"self_attn.{name}_proj.bias"] = part
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
        for a, b in pairs.items():
            out[dst + b + ".weight"] = sd[src + a + ".weight"]
            out[dst + b + ".bias"] = sd[src + a + ".bias"]
    te = CLIPTextModel(cfg)
    missing, unexpected = te.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip text tower does not map onto CLIPTextModel: missing {missing}, unexpected {unexpected}")
    return te.eval()


def _cosine(opt, steps: int):
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )


def train_vae(vae, steps: int, batch: int, seed: int, log: Callable[[str], None]) -> dict:
    """Reconstruction (L1 + MSE) plus KL * 1e-6; returns figures and sets ``scaling_factor``."""
    with torch.no_grad():  # start with a narrow posterior (std ~0.02): early training is not drowned in noise
        vae.quant_conv.bias[vae.config.latent_channels :] = -8.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = _cosine(opt, steps)
    t0 = time.time()
    for step in range(steps):
        x = to_tensor(render_batch(sample_scenes(batch, seed=seed * 1_000_003 + 500_000 + step))) * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step:5d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        x = to_tensor(render_batch(sample_scenes(256, seed=seed * 1_000_003 + 499_999))) * 2 - 1
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean).sample.clamp(-1, 1)
    std = float(mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return {"recon_mae": float((rec - x).abs().mean() / 2), "latent_std": std, "seconds": time.time() - t0}


def _tokenize(tokenizer, texts) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def encode_pool(vae, pool_size: int, seed: int) -> dict:
    """Render ``pool_size`` training-split scenes once and keep their latent posteriors (mean, std) and captions."""
    scenes = [s for s in sample_scenes(int(pool_size / (1 - EVAL_FRACTION)) + 64, seed=seed * 1_000_003 + 700_000) if not is_held_out(caption(s))][
        :pool_size
    ]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(scenes), 256):
            d = vae.encode(to_tensor(render_batch(scenes[i : i + 256])) * 2 - 1).latent_dist
            means.append(d.mean)
            stds.append(d.std)
    return {"scenes": scenes, "means": torch.cat(means), "stds": torch.cat(stds)}


def pretrain_unet(
    c: dict,
    pool: dict,
    steps: int,
    batch: int,
    seed: int,
    log: Callable[[str], None],
    lr: float = 2e-3,
    ema_decay: float = 0.995,
    min_snr_gamma: float = 5.0,
    poll: Callable[[int], None] | None = None,
) -> dict:
    """Train the UNet (text encoder frozen) on an encoded pool (:func:`encode_pool`); replace it by its EMA.

    Half of the captions are full, half shortened (``caption_variant``), so short prompts work too. The loss
    is weighted per timestep by ``min(SNR, gamma) / SNR`` (min-SNR weighting, Hang et al. 2023), which spends
    less of the budget on nearly clean latents. ``poll(step)`` is called every 50 steps (the parallel build
    uses it to take a second thread once the other part is done).
    """
    unet, te, tok, sch = c["unet"], c["text_encoder"], c["tokenizer"], c["scheduler"]
    t0 = time.time()
    scenes, means, stds = pool["scenes"], pool["means"], pool["stds"]
    rng = np.random.default_rng([seed, 0x5D])
    ids_full = _tokenize(tok, [caption(s) for s in scenes])
    ids_short = _tokenize(tok, [caption_variant(s, rng, p_full=0.0) for s in scenes])
    empty = _tokenize(tok, [""])[0]
    sf = float(c["vae"].config.scaling_factor)
    n_train = sch.config.num_train_timesteps
    weight = min_snr_weights(sch, torch.arange(n_train), min_snr_gamma) if min_snr_gamma > 0 else torch.ones(n_train)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = _cosine(opt, steps)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if poll is not None and step % 50 == 0:
            poll(step)
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        lat = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * sf
        noise = torch.randn(lat.shape, generator=gen)
        t = torch.randint(0, n_train, (batch,), generator=gen)
        noisy = sch.add_noise(lat, noise, t)
        tokens = torch.where((torch.rand(batch, generator=gen) < 0.5)[:, None], ids_full[idx], ids_short[idx])
        tokens[torch.rand(batch, generator=gen) < 0.1] = empty
        with torch.no_grad():
            enc = te(tokens)[0]
        err = (unet(noisy, t, enc).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (err * weight[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pl, 1 - d)
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step:5d}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    c["unet"] = ema
    return {"final_loss": float(loss.item()), "seconds": time.time() - t0}


def make_pipeline(c: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=c["vae"].eval(),
        text_encoder=c["text_encoder"].eval(),
        tokenizer=c["tokenizer"],
        unet=c["unet"].eval(),
        scheduler=c["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, directory: Path, half: bool = True) -> Path:
    """``save_pretrained`` with safetensors; ``half`` stores fp16 weights (loaders upcast with dtype=float32)."""
    p = copy.deepcopy(pipe)
    if half:
        p.to(torch.float16)
    p.save_pretrained(str(directory), safe_serialization=True)
    return Path(directory)


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], steps: int = 20, guidance: float = 4.0, **call_kwargs) -> torch.Tensor:
    """float ``[B, 3, 32, 32]`` in [0, 1], one fixed-seed sample per prompt (``call_kwargs`` go to the pipeline call:
    the flow miniature's ``max_sequence_length``)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens, output_type="pt", height=32, width=32, **call_kwargs)
    return out.images.float().clamp(0, 1)


def evaluate_pipeline(pipe, n_prompts: int = 100, seed: int = 0, steps: int = 20, guidance: float = 4.0, **call_kwargs) -> dict:
    """Oracle fidelity (shape+colour match) and gold aesthetic of samples for held-out prompts (``call_kwargs``: as
    :func:`sample`)."""
    from .oracle import oracle_metrics

    _, held = split_captions()
    rng = np.random.default_rng(seed)
    prompts = [held[i] for i in rng.choice(len(held), size=min(n_prompts, len(held)), replace=False)]
    images = torch.cat(
        [
            sample(pipe, prompts[i : i + 50], list(range(i, min(i + 50, len(prompts)))), steps, guidance, **call_kwargs)
            for i in range(0, len(prompts), 50)
        ]
    )
    m = oracle_metrics(images, prompts)
    return {
        "prompts": len(prompts),
        "match": float(m["match"].mean()),
        "shape_ok": float(m["shape_ok"].mean()),
        "colour_ok": float(m["colour_ok"].mean()),
        "gold_mean": float(m["aesthetic"].mean()),
        "gold_std": float(m["aesthetic"].std()),
        "images": images,
        "prompt_list": prompts,
    }


def build_sd(out: Path, s, log: Callable[[str], None] = print, text_encoder=None, poll: Callable[[int], None] | None = None) -> dict:
    """Train the autoencoder and the UNet (settings ``s``: a ``BuildSettings``) and save the pipeline to ``out/sd``.

    ``text_encoder``: a ``CLIPTextModel``, or a callable returning one (called once the autoencoder is trained,
    so a parallel build can train the CLIP meanwhile); default: the text tower of the toy CLIP in ``out/clip``.
    """
    if text_encoder is None:
        require_clip(Path(out) / "clip")  # before any training: fail in a second, not after the autoencoder
    t0 = time.time()
    vae = build_vae(s.seed)
    info = {"vae": train_vae(vae, s.sd_vae_steps, s.sd_vae_batch, s.seed, log)}
    log(f"vae: {info['vae']}")
    pool = encode_pool(vae, s.sd_pool, s.seed)
    log(f"unet: pool of {len(pool['scenes'])} latents encoded ({time.time() - t0:.0f}s)")
    te = text_encoder() if callable(text_encoder) else text_encoder
    c = build_components(vae, te if te is not None else load_text_encoder(Path(out) / "clip"), s.seed)
    info["unet"] = pretrain_unet(c, pool, s.sd_unet_steps, s.sd_batch, s.seed, log, poll=poll)
    pipe = make_pipeline(c)
    save_pipeline(pipe, out / "sd")
    train_p, eval_p = demo_prompts(seed=s.seed)
    (out / "prompts_train.txt").write_text("\n".join(train_p) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(eval_p) + "\n")
    ev = evaluate_pipeline(pipe, n_prompts=s.sd_eval_prompts, seed=s.seed)
    info["eval"] = {k: v for k, v in ev.items() if k not in ("images", "prompt_list")}
    info["seconds"] = time.time() - t0
    log(f"sd: {info['eval']} ({info['seconds']:.0f}s)")
    return info


def demo_prompts(n_train: int = 12, seed: int = 0) -> tuple[list[str], list[str]]:
    """Short prompts ("a red circle") for the RAFT demos: ``n_train`` colour-shape pairs to align on, the rest
    held out for evaluation. Size, position and background are left to the model: room for an aesthetic."""
    pairs = [f"a {c} {s}" for s in SHAPES for c in COLOURS]
    order = np.random.default_rng([seed, 0xD3]).permutation(len(pairs))
    return [pairs[i] for i in order[:n_train]], [pairs[i] for i in order[n_train:]]
