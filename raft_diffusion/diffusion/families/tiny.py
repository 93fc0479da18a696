"""Tiny SDXL / SD3.5 / FLUX.1 / FLUX.2 [dev] / FLUX.2 [klein] / Qwen-Image / Z-Image (and SD) pipelines built from configs (fixed init
seeds), saved as pipeline folders.

The real structures at toy width, so loading, encoding, sampling, the losses and LoRA save/load run the
real diffusers code paths: CLIP's real BPE tokenizer (built offline, see ``diffusion.tiny``), a small
Unigram T5 tokenizer trained on the fly, T5EncoderModel / CLIP / AutoencoderKL / the denoiser from configs.
Their images are noise-like: they are not generators. Images are 32 px, latents 16 x 16 (VAE factor 2).
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import torch

from raft_diffusion.diffusion.tiny import (
    CLIP_MAX_LENGTH,
    build_clip_tokenizer,
    build_once,
)

TINY_VERSION = 1  # bump when a builder below changes
TINY_IMAGE_SIZE = 32
_CLIP_HIDDEN = 32
_T5_DIM = 64

_COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey"]
_THINGS = ["cat", "dog", "car", "house", "tree", "flower", "bird", "boat", "apple", "squirrel", "burger", "horse"]
_PLACES = ["on a table", "in the snow", "at night", "by the sea", "in a forest", "on the moon", "in a city street"]
_STYLES = ["a photo of", "a painting of", "a drawing of", "a close-up of", "an oil painting of", "a picture of"]


def _corpus() -> list[str]:
    """Captions made from small word lists: enough text for a few hundred Unigram pieces."""
    return [f"{s} a {c} {t} {p}" for s, c, t, p in itertools.product(_STYLES, _COLOURS, _THINGS, _PLACES)]


def build_t5_tokenizer(vocab_size: int = 400, model_max_length: int = 512):
    """A T5-style tokenizer (Unigram, ``<pad>``=0, ``</s>``=1 appended, ``<unk>``=2) trained on the fly with the
    ``tokenizers`` library and wrapped as ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    specials = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(_corpus(), trainer)
    vocab = [tuple(v) for v in json.loads(tok.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


@functools.lru_cache(maxsize=1)
def _clip_tokenizer():
    """CLIP's BPE tokenizer, built once per process (it is only read)."""
    return build_clip_tokenizer()


def _clip_config(with_projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=_CLIP_HIDDEN, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
        layer_norm_eps=1e-5, hidden_act="gelu", **({"projection_dim": _CLIP_HIDDEN} if with_projection else {}),
    )  # fmt: skip


def _clip(seed: int, with_projection: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(_clip_config(with_projection)).eval()


def _t5(seed: int, vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=_T5_DIM, d_ff=64, d_kv=16, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    return T5EncoderModel(config).eval()


def _vae(seed: int, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE, **extra,
    ).eval()  # fmt: skip


def tiny_sdxl_components(seed: int = 0) -> dict:
    """StableDiffusionXLPipeline parts: UNet with text_time conditioning, two CLIP encoders, Euler scheduler."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), norm_num_groups=8,
            use_linear_projection=True, transformer_layers_per_block=(1, 2), cross_attention_dim=2 * _CLIP_HIDDEN,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + _CLIP_HIDDEN,
        ).eval()  # fmt: skip
        components = {"unet": unet, "vae": _vae(seed), "text_encoder": _clip(seed, False),
                      "text_encoder_2": _clip(seed + 1, True)}  # fmt: skip
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    clip_tokenizer = _clip_tokenizer()
    return {**components, "tokenizer": clip_tokenizer, "tokenizer_2": clip_tokenizer, "scheduler": scheduler,
            "image_encoder": None, "feature_extractor": None}  # fmt: skip


def tiny_sd3_components(seed: int = 0) -> dict:
    """StableDiffusion3Pipeline parts shaped like SD3.5-medium (MMDiT-X: a dual-attention block, RMS qk-norm)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=TINY_IMAGE_SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=_T5_DIM, caption_projection_dim=32,
            pooled_projection_dim=2 * _CLIP_HIDDEN, pos_embed_max_size=16, dual_attention_layers=(0,),
            qk_norm="rms_norm",
        ).eval()  # fmt: skip
        components = {"transformer": transformer, "vae": _vae(seed, use_quant_conv=False, use_post_quant_conv=False,
                                                              shift_factor=0.0609, scaling_factor=1.5035),
                      "text_encoder": _clip(seed, True), "text_encoder_2": _clip(seed + 1, True),
                      "text_encoder_3": _t5(seed, len(t5_tokenizer))}  # fmt: skip
    clip_tokenizer = _clip_tokenizer()
    return {**components, "tokenizer": clip_tokenizer, "tokenizer_2": clip_tokenizer, "tokenizer_3": t5_tokenizer,
            "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "image_encoder": None, "feature_extractor": None}  # fmt: skip


def tiny_flux_components(seed: int = 0) -> dict:
    """FluxPipeline parts shaped like FLUX.1-dev (guidance embedding, double + single stream blocks)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=_T5_DIM, pooled_projection_dim=_CLIP_HIDDEN,
            guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        ).eval()  # fmt: skip
        components = {"transformer": transformer, "vae": _vae(seed, use_quant_conv=False, use_post_quant_conv=False,
                                                              shift_factor=0.1159, scaling_factor=0.3611),
                      "text_encoder": _clip(seed, False), "text_encoder_2": _t5(seed, len(t5_tokenizer))}  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # FLUX.1-dev's scheduler config
    return {**components, "tokenizer": _clip_tokenizer(), "tokenizer_2": t5_tokenizer, "scheduler": scheduler,
            "image_encoder": None, "feature_extractor": None}  # fmt: skip


_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat template cut down to what Flux2KleinPipeline asks of it (one user turn, the generation prompt and,
# with enable_thinking=False, the empty thinking block)
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_qwen_tokenizer(vocab_size: int = 600, model_max_length: int = 512):
    """A Qwen2-style byte-level BPE tokenizer trained on the fly with ``tokenizers`` (Qwen2's split regex, the
    ``<|endoftext|>`` pad and the chat markers as special tokens) wrapped as ``Qwen2Tokenizer`` with a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_corpus() + ["user assistant system"], trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    return Qwen2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=model_max_length,
                          additional_special_tokens=_QWEN_SPECIALS[1:], chat_template=_QWEN_CHAT_TEMPLATE)  # fmt: skip


def _tiny_flux2_image_parts(guidance_embeds: bool) -> dict:
    """The VAE, transformer and scheduler of the tiny FLUX.2 pipelines ([klein] and [dev]), drawn from the current RNG
    state after the text encoder: the FLUX.2 VAE with batch-norm latent statistics as a trained VAE has them (not 0
    and 1: the patches are un-normalised with std 2..3), double and single stream blocks, FLUX.2's scheduler config."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    vae.bn.running_mean.copy_(0.2 * torch.randn_like(vae.bn.running_mean))
    vae.bn.running_var.copy_((2 + torch.rand_like(vae.bn.running_var)) ** 2)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * 16, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    return {"vae": vae, "transformer": transformer, "scheduler": scheduler}


def tiny_flux2_klein_components(seed: int = 0) -> dict:
    """Flux2KleinPipeline parts shaped like FLUX.2 [klein] base (undistilled, so with CFG): a 36-layer Qwen3 as in klein (the
    pipeline reads its hidden states 9, 18 and 27), the FLUX.2 VAE with batch-norm latent statistics, double and
    single stream blocks without a guidance embedding."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=36,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        )).eval()  # fmt: skip
        parts = _tiny_flux2_image_parts(guidance_embeds=False)
    return {**parts, "text_encoder": text_encoder, "tokenizer": tokenizer, "is_distilled": False}


# a chat template for the tiny Mistral-3 stand-in: FLUX.2 [dev]'s pipeline gives each message's content as a list of
# typed parts, where Qwen's template takes a string
_PARTS_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
)


def tiny_flux2_components(seed: int = 0) -> dict:
    """Flux2Pipeline parts shaped like FLUX.2 [dev]: a 30-layer Mistral-3 of width 16 (the pipeline reads its hidden
    states 10, 20 and 30) with a one-layer Pixtral vision tower it does not use and the Qwen2-style BPE tokenizer with a
    chat template for typed message parts, the FLUX.2 VAE with batch-norm latent statistics, and double and single
    stream blocks with the guidance embedding."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer = build_qwen_tokenizer()
    tokenizer.chat_template = _PARTS_CHAT_TEMPLATE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config={"model_type": "mistral", "vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                         "num_hidden_layers": 30, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
                         "max_position_embeddings": 1024, "pad_token_id": tokenizer.pad_token_id},
            vision_config={"model_type": "pixtral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 16, "head_dim": 8},
            image_token_index=1, spatial_merge_size=1,
        )).eval()  # fmt: skip
        parts = _tiny_flux2_image_parts(guidance_embeds=True)
    return {**parts, "text_encoder": text_encoder, "tokenizer": tokenizer}


def tiny_qwen_image_components(seed: int = 0) -> dict:
    """QwenImagePipeline parts shaped like Qwen-Image: a two-layer Qwen2.5-VL (its text model is what the pipeline
    reads; the vision tower is built but unused) with the Qwen2-style BPE tokenizer, the causal video VAE at two
    spatial downsamplings with per-channel latent statistics that are not 0 and 1, and an MMDiT on 2x2 patches
    without a guidance embedding. The scheduler config is Qwen-Image's."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer()
    ends = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = {
            "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": len(tokenizer), "max_position_embeddings": 2048,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "bos_token_id": ends[0], "eos_token_id": ends[1], "pad_token_id": tokenizer.pad_token_id,
        }  # fmt: skip
        vision_config = {"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16}
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=text_config, vision_config=vision_config, vocab_size=len(tokenizer), hidden_size=16,
            bos_token_id=ends[0], eos_token_id=ends[1], pad_token_id=tokenizer.pad_token_id,
        )).eval()  # fmt: skip
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.3, -0.5, 0.1, 0.8], latents_std=[1.7, 2.4, 0.9, 1.3],
        ).eval()  # fmt: skip
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}  # fmt: skip


def tiny_z_image_components(seed: int = 0) -> dict:
    """ZImagePipeline parts shaped like Z-Image: a two-layer Qwen3 (the pipeline reads its second-to-last hidden state)
    with the Qwen2-style BPE tokenizer, a two-level FLUX-style VAE with a shift and a scale, and a single-stream DiT
    with its noise and context refiners on 2x2 patches. The scheduler config is Z-Image's (shift 3, no dynamic
    shifting)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = build_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, max_position_embeddings=1024, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
        )).eval()  # fmt: skip
        vae = AutoencoderKL(
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            sample_size=TINY_IMAGE_SIZE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159,
            scaling_factor=0.3611,
        ).eval()  # fmt: skip
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
        ).eval()  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": scheduler}  # fmt: skip


def tiny_sd_components(seed: int = 0) -> dict:
    """StableDiffusionPipeline parts: those of ``diffusion.tiny`` (the SD path's tiny model)."""
    from raft_diffusion.diffusion.tiny import build_tiny_components

    return build_tiny_components(seed=seed, image_size=TINY_IMAGE_SIZE)


_BUILDERS = {
    "sd": tiny_sd_components, "sdxl": tiny_sdxl_components, "sd3": tiny_sd3_components, "flux": tiny_flux_components,
    "flux2": tiny_flux2_components, "flux2-klein": tiny_flux2_klein_components, "qwen-image": tiny_qwen_image_components,
    "z-image": tiny_z_image_components,
}  # fmt: skip


def build_tiny_pipeline(family: str, seed: int = 0):
    """A tiny pipeline of ``family`` (``sd``, ``sdxl``, ``sd3``, ``flux``) on CPU in fp32."""
    from raft_diffusion.diffusion.families.registry import get_family

    if family not in _BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}: choose one of {', '.join(_BUILDERS)}")
    pipe = get_family(family).pipeline_class()(**_BUILDERS[family](seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(family: str, folder: str | Path | None = None, *, seed: int = 0) -> Path:
    """Build the tiny ``family`` pipeline and save it as a pipeline folder; return the folder.

    With ``folder`` it is written there; without, it is cached once under ``<cache>/tiny-<family>-v<N>``
    (``$RAFT_DIFFUSION_CACHE``; see ``diffusion.tiny.build_once``).
    """

    def build(target: Path) -> None:
        build_tiny_pipeline(family, seed).save_pretrained(str(target), safe_serialization=True)

    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        build(folder)
        return folder
    return build_once(f"tiny-{family}-v{TINY_VERSION}-s{seed}", "model_index.json", build)
