"""A tiny Stable-Diffusion-shaped pipeline built from configs, for tests and offline smoke runs.

Every component has the real SD 1.x structure (UNet2DConditionModel, AutoencoderKL, CLIPTextModel
and the real CLIP BPE tokenizer) at toy width, with a fixed init seed, so the loading, sampling,
LoRA and saving code paths are the real ones. Its images are noise-like: it is not a generator.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import torch

from ..core.common import build_once

TINY_PIPELINE_NAME = "tiny-sd-v1"  # bump when the architecture below changes
TINY_CLIP_NAME = "tiny-open-clip-v1"  # bump when reward_models.testing.TINY_OPEN_CLIP_CFG changes
CLIP_MAX_LENGTH = 77  # CLIP's context length (what SD's text encoder was trained with)


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's reversible byte -> printable unicode character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _clip_bpe_file() -> Path:
    """The BPE merges list that open_clip_torch ships (the one OpenAI's CLIP was trained with)."""
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def build_clip_tokenizer(save_dir: Path | None = None):
    """Build OpenAI CLIP's BPE tokenizer offline (49408 tokens, model_max_length 77).

    Writes ``vocab.json`` and ``merges.txt`` the way CLIP defines its vocabulary -- the 256 byte
    characters, the same with ``</w>``, one token per merge (the first 48894 merges of the list
    open_clip ships), then ``<|startoftext|>`` and ``<|endoftext|>`` -- and loads them with
    ``CLIPTokenizer.from_pretrained``. With ``save_dir`` the tokenizer is saved there too.
    """
    from transformers import CLIPTokenizer

    lines = gzip.open(_clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_MAX_LENGTH)
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """Stable Diffusion 1.x's DDIM schedule (scaled-linear betas 0.00085-0.012), as the tiny and toy pipelines use it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_components(
    seed: int = 0,
    image_size: int = 32,
    *,
    prediction_type: str = "epsilon",
    cross_attention_dim: int = 32,
) -> dict:
    """The components of a tiny StableDiffusionPipeline, each initialised after ``torch.manual_seed(seed)``.

    The VAE downsamples by 2, so images are ``image_size`` px and latents ``image_size // 2``.
    The global torch RNG state is restored afterwards.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 4:
        raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=32,
            sample_size=image_size,
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=cross_attention_dim,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=CLIP_MAX_LENGTH,
                bos_token_id=49406,
                eos_token_id=49407,
                pad_token_id=49407,
                layer_norm_eps=1e-5,
            )
        )
    scheduler = sd_ddim_scheduler(prediction_type)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(),
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def build_tiny_pipeline(seed: int = 0, image_size: int = 32, **kwargs):
    """A tiny StableDiffusionPipeline on CPU in fp32 (see :func:`build_tiny_components`)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_tiny_components(seed=seed, image_size=image_size, **kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensure_tiny_pipeline(cache_dir: Path | str | None = None) -> Path:
    """Build the tiny pipeline once and save it under ``<cache_dir>/tiny-sd-v1``; return that folder."""
    return build_once(
        TINY_PIPELINE_NAME,
        "model_index.json",
        lambda tmp: build_tiny_pipeline().save_pretrained(str(tmp), safe_serialization=True),
        cache_dir,
    )


def ensure_tiny_clip(cache_dir: Path | str | None = None) -> Path:
    """A tiny random-weight open_clip model (fixed seed) saved once under the cache; for smoke tests only."""
    from reward_models import save_open_clip
    from reward_models.testing import build_tiny_open_clip

    def build(tmp: Path) -> None:
        model, cfg = build_tiny_open_clip(seed=0)
        save_open_clip(model, cfg, tmp)

    return build_once(TINY_CLIP_NAME, "open_clip_model.safetensors", build, cache_dir)
