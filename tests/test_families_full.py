"""Full-size family checks (no weights from the hub): the published SDXL, SD3.5-medium and FLUX.1-dev denoiser
configs (families.fullsize) on the meta device, their default LoRA targets and LoRA sizes against what diffusers'
LoRA training scripts train, the memory of a LoRA training step; and, with random weights on CPU, one sampling +
LoRA training step of the whole SDXL and SD3.5-medium pipelines at 64 px (scripts/fullsize_step.py).

Slow (a few minutes of CPU for the shape-only forwards; the CPU steps need ~15 GB of free memory and ~2-3 minutes of
CPU each): ``pytest -m slow tests/test_families_full.py -s`` prints the figures.
"""

from __future__ import annotations

import types

import pytest
import torch

from raft_diffusion.diffusion.families import PromptEmbeds, get_family
from raft_diffusion.diffusion.families.fullsize import CLIP_G, CLIP_L, T5_XXL, VAE_BLOCKS, build_denoiser
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


def _denoiser(name: str, dtype=torch.bfloat16):
    """The published denoiser config (families.fullsize) on the meta device."""
    return build_denoiser(name, dtype=dtype, meta=True)


# published denoiser sizes: SDXL's UNet 2.6B, SD3.5-medium's MMDiT-X 2.5B (counting its 384 x 384 x 1536
# position-embedding table, a buffer in diffusers), FLUX.1-dev 12B, Qwen-Image 20B
@pytest.mark.parametrize(
    "name, params, matched",
    [("sdxl", 2_567_463_684, 70 * 2 * 4),  # 70 transformer blocks x (attn1, attn2) x (q, k, v, out)
     ("sd3", None, 24 * 8 - 1),  # 8 joint-attention projections per block, the last one has no to_add_out
     ("flux", 11_901_408_320, 19 * 12 + 38 * 3),  # 12 per double block, q/k/v per single block
     ("qwen-image", 20_430_401_088, 60 * 4),  # the image stream's q, k, v and out in each of 60 blocks
     ("flux2-klein", 3_875_544_576, 5 * 4 + 20 * 2),  # q, k, v, out per double block; qkv+mlp and out per single
     ("z-image", 6_154_908_736, (30 + 2 + 2) * 4),  # q, k, v, out in 30 layers and the two refiners' 2 each
     ("flux2", 32_223_281_152, 8 * 4)],  # the image stream's q, k, v and out in each of 8 double blocks
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
    # every default target exists in the real model, but the single blocks that FLUX.2 [klein] 4B does not have (the
    # LoRA script names the 9B's 24)
    absent = {f"single_transformer_blocks.{i}.attn.to_out" for i in range(20, 24)} if name == "flux2-klein" else set()
    assert sorted(targets) == sorted(set(family.lora_targets) - absent)
    if name == "flux2-klein":  # the published bf16 file flux-2-klein-base-4b.safetensors is 7,751,105,712 bytes:
        assert 0 < 7_751_105_712 - 2 * count < 65_536  # 2 bytes a parameter and a header of 16,560 bytes
    if name == "z-image":  # the published transformer's safetensors index: "total_size": 12309817472, 2 bytes each
        assert 2 * count == 12_309_817_472
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

    clip_l = CLIPTextConfig(**CLIP_L)  # openai/clip-vit-large-patch14
    clip_g = CLIPTextConfig(**CLIP_G)  # OpenCLIP ViT-bigG/14 (SDXL text_encoder_2)
    t5_xxl = T5Config(**T5_XXL)  # google/t5-v1_1-xxl
    vae = VAE_BLOCKS
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


# The transformer/UNet LoRA of diffusers' DreamBooth LoRA scripts (examples/dreambooth/, read at diffusers commit
# 58eb52c0): LoraConfig(r=rank, lora_alpha=rank (FLUX: --lora_alpha), init_lora_weights="gaussian",
# target_modules=...) added with add_adapter; every parameter it makes trainable is trained.
DIFFUSERS_SCRIPT_TARGETS = {
    "sdxl": ["to_k", "to_q", "to_v", "to_out.0"],  # train_dreambooth_lora_sdxl.py, unet_target_modules
    "sd3": ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"],  # train_dreambooth_lora_sd3.py, no --lora_layers
    "flux": ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"],  # train_dreambooth_lora_flux.py, no --lora_layers
    "qwen-image": ["to_k", "to_q", "to_v", "to_out.0"],  # train_dreambooth_lora_qwen_image.py, no --lora_layers
    "flux2-klein": ["to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)]],  # train_dreambooth_lora_flux2_klein.py
    "z-image": ["to_k", "to_q", "to_v", "to_out.0"],  # train_dreambooth_lora_z_image.py, no --lora_layers
    "flux2": ["to_k", "to_q", "to_v", "to_out.0"],  # train_dreambooth_lora_flux2.py, no --lora_layers
}  # fmt: skip
# measured with the test below (the same for both ways of adding the LoRA)
TRAINABLE_R16 = {"sdxl": 23_224_320, "sd3": 9_388_032, "flux": 44_826_624, "qwen-image": 23_592_960, "flux2-klein": 16_711_680,
                 "z-image": 16_711_680, "flux2": 6_291_456}  # fmt: skip


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux", "qwen-image", "flux2-klein", "z-image", "flux2"])
def test_trainable_counts_equal_what_the_diffusers_lora_scripts_train(name):
    from peft import LoraConfig

    ours = _denoiser(name)
    count = get_family(name).add_lora(ours, rank=16)
    theirs = _denoiser(name)
    theirs.requires_grad_(False)
    theirs.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=DIFFUSERS_SCRIPT_TARGETS[name]))
    script = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trained == {n for n, p in theirs.named_parameters() if p.requires_grad}  # the same layers, not just the same sum
    print(f"\n{name}: LoRA r16 trains {count:,} parameters (diffusers' script: {script:,})")
    assert count == script == TRAINABLE_R16[name]


@pytest.mark.parametrize("name, trainable", [("sdxl", TRAINABLE_R16["sdxl"]), ("sd3", TRAINABLE_R16["sd3"])])
def test_one_sampling_and_training_step_at_64_px_on_cpu(name, trainable):
    """scripts/fullsize_step.py in a fresh process: the whole pipeline with published architectures and random weights
    (SD3.5 without T5-XXL), two 64 px samples with CFG, the family's default LoRA, one training step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(root / "scripts" / "fullsize_step.py"), "--family", name], capture_output=True, text=True, env=env,
                          timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    print("\n" + proc.stdout)
    assert f": {trainable:,} trainable parameters" in proc.stdout
    assert "LoRA B tensors got a gradient and were updated" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("peak_rss_gib: ")
