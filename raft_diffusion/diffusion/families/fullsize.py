"""The published architectures of SDXL base 1.0, SD3.5-medium, FLUX.1-dev, FLUX.2 [dev], FLUX.2 [klein] base 4B,
Qwen-Image and Z-Image, built with random weights.

Each config is the one in the model's published folder (``<component>/config.json`` on the hub), so a model
built from it has the real layer names and sizes: the default LoRA targets, the trainable-parameter counts and
the memory arithmetic are checked against them (``tests/test_families_full.py``) and a full-size sampling and
training step runs on CPU (``scripts/fullsize_step.py``). Random weights: shapes and code paths only, never
images worth looking at. The CLIP tokenizer is the real one built offline (:func:`diffusion.tiny.build_clip_tokenizer`).
"""

from __future__ import annotations

import torch

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
# Qwen/Qwen-Image, transformer/config.json (20B MMDiT; its text encoder is Qwen2.5-VL-7B)
QWEN_IMAGE = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}  # fmt: skip
# black-forest-labs/FLUX.2-klein-base-4B, transformer/config.json (the undistilled 4B; its text encoder is Qwen3-4B, whose
# hidden states 9, 18 and 27 are stacked: joint_attention_dim = 3 x 2560)
FLUX2_KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 5, "num_single_layers": 20,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False,
}  # fmt: skip
# black-forest-labs/FLUX.2-dev, transformer/config.json (the 32B MMDiT; guidance_embeds is the class default, true; its
# text encoder is Mistral-3-Small, whose hidden states 10, 20 and 30 are stacked: joint_attention_dim = 3 x 5120)
FLUX2_DEV = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 8, "num_single_layers": 48,
    "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360, "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0, "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}  # fmt: skip
# Tongyi-MAI/Z-Image, transformer/config.json (the 6B single-stream DiT; Turbo's is the same; its text encoder is
# Qwen3-4B, whose second-to-last hidden state is the caption)
Z_IMAGE = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": 2560,
    "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48), "axes_lens": (1536, 512, 512),
}  # fmt: skip
# Qwen/Qwen3-4B (FLUX.2 [klein] 4B's and Z-Image's text_encoder, a Qwen3ForCausalLM with tied embeddings)
QWEN3_4B = {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 40960,
            "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}  # fmt: skip
# openai/clip-vit-large-patch14 (SD's, SDXL's and SD3's text_encoder, FLUX's CLIP)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768, "hidden_act": "quick_gelu"}  # fmt: skip
# OpenCLIP ViT-bigG/14 text tower (SDXL's and SD3's text_encoder_2)
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}  # fmt: skip
# google/t5-v1_1-xxl encoder (SD3's text_encoder_3, FLUX's text_encoder_2)
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}  # fmt: skip
# the SD/SDXL VAE's blocks; SD3 and FLUX have 16 latent channels and no quant convs
VAE_BLOCKS = {"block_out_channels": (128, 256, 512, 512), "down_block_types": ("DownEncoderBlock2D",) * 4,
              "up_block_types": ("UpDecoderBlock2D",) * 4, "layers_per_block": 2, "norm_num_groups": 32}  # fmt: skip
SDXL_VAE = {**VAE_BLOCKS, "latent_channels": 4, "scaling_factor": 0.13025, "force_upcast": True}
SD3_VAE = {**VAE_BLOCKS, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
           "shift_factor": 0.0609, "scaling_factor": 1.5035}  # fmt: skip

DENOISERS = {"sdxl": ("UNet2DConditionModel", SDXL_UNET), "sd3": ("SD3Transformer2DModel", SD35_MEDIUM),
             "flux": ("FluxTransformer2DModel", FLUX_DEV), "qwen-image": ("QwenImageTransformer2DModel", QWEN_IMAGE),
             "flux2-klein": ("Flux2Transformer2DModel", FLUX2_KLEIN_4B), "z-image": ("ZImageTransformer2DModel", Z_IMAGE),
             "flux2": ("Flux2Transformer2DModel", FLUX2_DEV)}  # fmt: skip
# the families whose whole pipeline this module builds on CPU (FLUX.1-dev's 12B transformer needs 48 GB in fp32,
# Qwen-Image's 20B 82 GB)
PIPELINES = ("sdxl", "sd3")


def build_denoiser(name: str, *, dtype=torch.float32, meta: bool = False, seed: int = 0) -> torch.nn.Module:
    """The published denoiser of ``name`` (``sdxl``, ``sd3`` = SD3.5-medium, ``flux`` = FLUX.1-dev, ``qwen-image``,
    ``flux2`` = FLUX.2 [dev], ``flux2-klein`` = FLUX.2 [klein] base 4B, ``z-image``), frozen.

    ``meta=True`` builds it without memory on the meta device (shapes only); otherwise with diffusers' random
    initialisation under ``seed``.
    """
    import diffusers

    if name not in DENOISERS:
        raise ValueError(f"no published denoiser config for {name!r}: choose one of {', '.join(DENOISERS)}")
    cls_name, config = DENOISERS[name]
    cls = getattr(diffusers, cls_name)
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=True):  # SD3's position-embedding table is a buffer
            model = cls(**config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(**config)
    return (model if dtype == torch.float32 else model.to(dtype)).requires_grad_(False).eval()


def _clip(config: dict, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                          pad_token_id=49407, **config)  # fmt: skip
    return cls(text).eval()


def build_pipeline(name: str, *, dtype=torch.float32, seed: int = 0):
    """A whole pipeline of ``name`` (``sdxl`` or ``sd3``) with published architectures and random weights, on CPU.

    SD3.5-medium is built without T5-XXL (``text_encoder_3=None``, 4.8B parameters): the pipeline then fills
    T5's part of the prompt embeddings with zeros, as diffusers allows.
    """
    import diffusers

    from raft_diffusion.diffusion.tiny import build_clip_tokenizer

    if name not in PIPELINES:
        raise ValueError(f"no full-size pipeline builder for {name!r}: choose one of {', '.join(PIPELINES)}")
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        denoiser = build_denoiser(name, dtype=dtype, seed=seed)
        if name == "sdxl":
            torch.manual_seed(seed + 1)
            vae = diffusers.AutoencoderKL(**SDXL_VAE)
            parts = {
                "unet": denoiser, "vae": vae, "text_encoder": _clip(CLIP_L, False, seed + 2),
                "text_encoder_2": _clip(CLIP_G, True, seed + 3), "tokenizer": tokenizer, "tokenizer_2": tokenizer,
                "scheduler": diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                              steps_offset=1, timestep_spacing="leading"),
            }  # fmt: skip
            pipe = diffusers.StableDiffusionXLPipeline(**parts)
        else:
            torch.manual_seed(seed + 1)
            vae = diffusers.AutoencoderKL(**SD3_VAE)
            parts = {
                "transformer": denoiser, "vae": vae, "text_encoder": _clip(CLIP_L, True, seed + 2),
                "text_encoder_2": _clip(CLIP_G, True, seed + 3), "text_encoder_3": None, "tokenizer": tokenizer,
                "tokenizer_2": tokenizer, "tokenizer_3": None,
                "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            }  # fmt: skip
            pipe = diffusers.StableDiffusion3Pipeline(**parts)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
