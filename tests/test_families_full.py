"""Full-size family checks on the meta device (no weights, no hub): the published SDXL, SD3.5-medium and
FLUX.1-dev denoiser configs, their default LoRA targets and LoRA sizes, and the memory of a LoRA training step.

Slow (a few minutes of CPU for the shape-only forwards): ``pytest -m slow tests/test_families_full.py -s``
prints the figures.
"""

from __future__ import annotations

import types

import pytest
import torch

from raft_diffusion.diffusion.families import PromptEmbeds, get_family
from raft_diffusion.diffusion.families.lora import matching_modules
from raft_diffusion.diffusion.families.memory import (
    LORA_STATE_BYTES,
    checkpoint_units,
    count_parameters,
    gib,
    lora_parameter_count,
    saved_activation_bytes,
)  # fmt: skip

pytestmark = pytest.mark.slow

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "norm_eps": 1e-5,
}  # fmt: skip
# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in blocks 0-12)
SD35_MEDIUM = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}  # fmt: skip
# black-forest-labs/FLUX.1-dev, transformer/config.json
FLUX_DEV = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}  # fmt: skip


def _denoiser(name: str, dtype=torch.bfloat16):
    from accelerate import init_empty_weights
    from diffusers import (
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    cls, config = {"sdxl": (UNet2DConditionModel, SDXL_UNET), "sd3": (SD3Transformer2DModel, SD35_MEDIUM),
                   "flux": (FluxTransformer2DModel, FLUX_DEV)}[name]  # fmt: skip
    with init_empty_weights(include_buffers=True):  # SD3's position-embedding table is a buffer
        model = cls(**config)
    return model.to(dtype).requires_grad_(False)


# published denoiser sizes: SDXL's UNet 2.6B, SD3.5-medium's MMDiT-X 2.5B (counting its 384 x 384 x 1536
# position-embedding table, a buffer in diffusers), FLUX.1-dev 12B
@pytest.mark.parametrize(
    "name, params, matched",
    [("sdxl", 2_567_463_684, 70 * 2 * 4),  # 70 transformer blocks x (attn1, attn2) x (q, k, v, out)
     ("sd3", None, 24 * 8 - 1),  # 8 joint-attention projections per block, the last one has no to_add_out
     ("flux", 11_901_408_320, 19 * 12 + 38 * 3)],  # 12 per double block, q/k/v per single block
)  # fmt: skip
def test_full_size_denoisers_and_their_lora(name, params, matched):
    family = get_family(name)
    model = _denoiser(name)
    count = count_parameters(model)
    if params is not None:
        assert count == params
    else:
        table = model.pos_embed.pos_embed.numel()
        assert table == 384 * 384 * 1536 and 2.45e9 < count + table < 2.55e9
    targets = family.default_lora_targets(model)
    assert sorted(targets) == sorted(family.lora_targets)  # every default target exists in the real model
    assert len(matching_modules(model, targets)) == matched
    lora = {rank: lora_parameter_count(model, targets, rank) for rank in (4, 16)}
    assert lora[16] == 4 * lora[4]
    assert family.add_lora(model, rank=16) == lora[16]  # peft's trainable count agrees with r * (in + out)
    print(f"\n{name}: {count:,} parameters; {matched} LoRA layers; rank 4: {lora[4]:,}, rank 16: {lora[16]:,}")


def _stub_pipe(name: str):
    """What training_loss reads from a pipeline: the scheduler config and the VAE factor (8)."""
    from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    scheduler = {
        "sdxl": lambda: EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                               steps_offset=1, timestep_spacing="leading"),
        "sd3": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
        "flux": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
    }[name]()  # fmt: skip
    return types.SimpleNamespace(scheduler=scheduler, vae_scale_factor=8)


def _meta_embeds(name: str) -> PromptEmbeds:
    def empty(*shape):
        return torch.empty(*shape, device="meta", dtype=torch.bfloat16)

    if name == "sdxl":
        return PromptEmbeds({"prompt_embeds": empty(1, 77, 2048), "pooled_prompt_embeds": empty(1, 1280)})
    if name == "sd3":  # CLIP 77 + T5 256 tokens
        return PromptEmbeds({"prompt_embeds": empty(1, 77 + 256, 4096), "pooled_prompt_embeds": empty(1, 2048)})
    return PromptEmbeds({"prompt_embeds": empty(1, 512, 4096), "pooled_prompt_embeds": empty(1, 768)},
                        {"text_ids": torch.zeros(512, 3, device="meta")})  # fmt: skip


# (family, image size, latent channels); the other modules' published sizes: CLIP-L text 123M,
# OpenCLIP bigG text 695M, T5-XXL encoder 4.76B, VAE 84M
PRESETS = [("sdxl", 1024, 4), ("sd3", 512, 16), ("flux", 512, 16)]
TEXT_AND_VAE = {"sdxl": 123_060_480 + 694_659_840 + 83_653_863,
                "sd3": 123_650_304 + 694_659_840 + 4_762_310_656 + 83_819_683,
                "flux": 123_060_480 + 4_762_310_656 + 83_819_683}  # fmt: skip


@pytest.mark.parametrize("name, size, channels", PRESETS)
def test_training_step_memory_estimate(name, size, channels):
    family = get_family(name)
    model = _denoiser(name)
    params = count_parameters(model) + sum(b.numel() for b in model.buffers())  # SD3's position table is a buffer
    lora = family.add_lora(model, rank=16)
    x0 = torch.empty(1, channels, size // 8, size // 8, device="meta", dtype=torch.bfloat16)
    report = saved_activation_bytes(
        model,
        lambda: family.training_loss(_stub_pipe(name), model, x0, _meta_embeds(name), [0],
                                     noise=torch.zeros(x0.shape), generator=torch.Generator().manual_seed(0)),
        checkpoint_units(model),
    )  # fmt: skip
    assert 0 < report.with_checkpointing < report.total and report.outside_blocks >= 0
    weights, state = 2 * params, LORA_STATE_BYTES * lora
    print(
        f"\n{name} {size}px bf16, batch 1, LoRA r16: denoiser {gib(weights):.2f} GiB, text encoders + VAE "
        f"{gib(2 * TEXT_AND_VAE[name]):.2f} GiB, LoRA state {gib(state):.3f} GiB ({lora:,} params), activations "
        f"{gib(report.total):.2f} GiB without / {gib(report.with_checkpointing):.2f} GiB with checkpointing "
        f"(outside blocks {gib(report.outside_blocks):.2f}, block inputs {gib(report.block_inputs):.2f}, largest block "
        f"{gib(max(report.per_block.values())):.2f}); training step total {gib(weights + state + report.total):.1f} / "
        f"{gib(weights + state + report.with_checkpointing):.1f} GiB, +{gib(2 * TEXT_AND_VAE[name]):.1f} with the "
        f"text encoders and VAE resident"
    )


def _tied(model):
    """T5's input embedding is the encoder's, as in a T5EncoderModel built on CPU (under init_empty_weights
    transformers 5 leaves the two apart)."""
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


def test_text_encoder_and_vae_sizes_used_above():
    """The published configs of the other modules give the parameter counts TEXT_AND_VAE adds up."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clip_l = CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"
    )  # openai/clip-vit-large-patch14
    clip_g = CLIPTextConfig(
        hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu"
    )  # OpenCLIP ViT-bigG/14 (SDXL text_encoder_2)
    t5_xxl = T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False
    )  # google/t5-v1_1-xxl
    vae = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
               "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "norm_num_groups": 32}  # fmt: skip
    with init_empty_weights():
        sizes = {
            "clip_l": count_parameters(CLIPTextModel(clip_l)),
            "clip_l_proj": count_parameters(CLIPTextModelWithProjection(clip_l)),
            "clip_g_proj": count_parameters(CLIPTextModelWithProjection(clip_g)),
            "vae_sdxl": count_parameters(AutoencoderKL(latent_channels=4, **vae)),
            "vae_16ch": count_parameters(AutoencoderKL(latent_channels=16, use_quant_conv=False,
                                                       use_post_quant_conv=False, **vae)),
        }  # fmt: skip
        t5 = T5EncoderModel(t5_xxl)
    sizes["t5_xxl"] = count_parameters(_tied(t5))  # tied outside the context, which re-creates assigned parameters
    print("\n" + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    assert TEXT_AND_VAE["sdxl"] == sizes["clip_l"] + sizes["clip_g_proj"] + sizes["vae_sdxl"]
    assert TEXT_AND_VAE["sd3"] == sizes["clip_l_proj"] + sizes["clip_g_proj"] + sizes["t5_xxl"] + sizes["vae_16ch"]
    assert TEXT_AND_VAE["flux"] == sizes["clip_l"] + sizes["t5_xxl"] + sizes["vae_16ch"]
