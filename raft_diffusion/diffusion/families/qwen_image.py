"""Qwen-Image: a Qwen2.5-VL text encoder (its last hidden state, with a padding mask), a causal video VAE used one
frame at a time whose latents are normalised per channel, and an MMDiT on 2x2 latent patches trained with the
rectified-flow loss. Classifier-free guidance is the pipeline's ``true_cfg_scale`` against a negative prompt."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.base import seed_generators
from raft_diffusion.diffusion.families.embeds import PromptEmbeds, encode_padded
from raft_diffusion.diffusion.families.flow import PackedFlowFamily


def _latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std ``[1, C, 1, 1]`` (what the pipeline un-normalises with)."""
    shape = (1, vae.config.z_dim, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def _distilled(pretrained) -> UserError:
    return UserError(
        f"{str(pretrained)!r} is a guidance-distilled Qwen-Image transformer (guidance_embeds), which this family does "
        "not train yet: use an undistilled Qwen-Image checkpoint"
    )


class QwenImageFamily(PackedFlowFamily):
    """QwenImagePipeline. Denoiser-space latents are the VAE's one-frame latents without the frame axis, normalised
    by the VAE's ``latents_mean`` / ``latents_std``: ``[B, C, H / f, W / f]``. Prompts are embedded with a padding
    mask, so every prompt's row is padded to the run's longest and the mask travels with it."""

    name = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    hub_tags = ("qwen-image",)
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"  # the pipeline's and the LoRA script's dtype
    cfg_in_one_batch = False  # the pipeline's conditional and unconditional passes are separate calls
    empty_prompt = " "  # the pipeline examples' negative prompt: "" would leave a prompt of no tokens
    # diffusers' train_dreambooth_lora_qwen_image.py default: the joint attention's image-stream projections
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    max_sequence_length = 512  # Qwen2.5-VL tokens after the system template (the pipeline's default)

    def load(self, pretrained, **kwargs):
        """The pipeline; a guidance-distilled transformer is refused, from a local folder's config before any weight
        (a hub id's once it has loaded)."""
        config = Path(str(pretrained)).expanduser() / "transformer" / "config.json"
        if config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("guidance_embeds"):
            raise _distilled(pretrained)
        pipe = super().load(pretrained, **kwargs)
        if pipe.transformer is not None and pipe.transformer.config.guidance_embeds:
            raise _distilled(pretrained)
        return pipe

    def _encode(self, pipe, prompts, length) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, mask = pipe.encode_prompt(prompt=list(prompts), device=pipe.device, num_images_per_prompt=1,
                                          max_sequence_length=length)  # fmt: skip
        if mask is None:  # every row is as long as the longest: the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return embeds, mask

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """``prompt_embeds [P, L, D]`` and ``prompt_embeds_mask [P, L]`` per prompt, zero-padded to the longest prompt
        (at most ``max_sequence_length`` tokens); with ``do_cfg`` the negative prompt's (``" "`` by default, as in the
        pipeline's examples) once."""
        return encode_padded(self, pipe, prompts, negative_prompt, do_cfg, batch_size, max_sequence_length)

    def encode_on_meta(self, pipe) -> None:
        """The pipeline's ``encode_prompt`` picks each prompt's tokens by the values of its mask, which meta tensors do
        not have. With the planner's stand-in tokenizer every token is a prompt token, so the pick is a slice: the same
        text-encoder call (every hidden state kept, as the pipeline asks), the template's tokens dropped,
        ``max_sequence_length`` kept."""

        def encode_prompt(prompt, device=None, num_images_per_prompt=1, max_sequence_length=1024, **_):
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            drop = pipe.prompt_template_encode_start_idx
            ids = pipe.tokenizer(prompts, max_length=pipe.tokenizer_max_length + drop).input_ids.to(device or pipe.device)
            hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1]
            embeds = hidden[:, drop:][:, :max_sequence_length]
            return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)

        pipe.encode_prompt = encode_prompt

    def guidance_kwargs(self, pipe, guidance: float, cfg: bool) -> dict:
        """Classifier-free guidance is ``true_cfg_scale`` here (``guidance_scale`` is for guidance-distilled models)."""
        return {"true_cfg_scale": guidance if cfg else 1.0, "guidance_scale": None}

    def _unpack(self, pipe, latents, height, width):
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)[:, :, 0]

    def to_vae_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents -> the VAE's one-frame latents ``[B, C, 1, H / f, W / f]``."""
        mean, std = _latent_stats(pipe.vae, latents)
        return (latents * std + mean).unsqueeze(2)

    def from_vae_latents(self, pipe, z: torch.Tensor) -> torch.Tensor:
        """The VAE's one-frame latents ``[B, C, 1, h, w]`` -> denoiser space."""
        z = z[:, :, 0]
        mean, std = _latent_stats(pipe.vae, z)
        return (z - mean) / std

    @torch.no_grad()
    def decode(self, pipe, latents, *, batch_size=None):
        """Denoiser-space latents -> float32 images ``[B, 3, H, W]`` in ``[0, 1]`` (un-normalise, decode one frame)."""
        vae, images = pipe.vae, []
        for chunk in latents.split(batch_size or max(1, latents.shape[0])):
            z = self.to_vae_latents(pipe, chunk.to(pipe.device, vae.dtype))
            images.append(vae.decode(z, return_dict=False)[0][:, :, 0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pipe, images, seeds):
        """Images in ``[0, 1]`` -> denoiser-space latents of a posterior sample drawn with each image's seed."""
        if images.ndim != 4 or images.shape[1] != 3 or len(seeds) != images.shape[0]:
            raise ValueError(f"need images [B, 3, H, W] and one seed each, got {tuple(images.shape)} and {len(seeds)}")
        frames = images.to(pipe.device, pipe.vae.dtype).unsqueeze(2) * 2 - 1
        posterior = pipe.vae.encode(frames).latent_dist
        eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in seed_generators(seeds)])
        z = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
        return self.from_vae_latents(pipe, z).float()

    def _predict(self, pipe, denoiser, noisy, timesteps, batch, settings):
        n, c, h, w = noisy.shape
        packed = pipe._pack_latents(noisy, n, c, h, w)
        pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                        encoder_hidden_states=batch.batch("prompt_embeds", n),
                        encoder_hidden_states_mask=batch.batch("prompt_embeds_mask", n),
                        img_shapes=[[(1, h // 2, w // 2)]] * n, return_dict=False)[0]  # fmt: skip
        f = pipe.vae_scale_factor
        return pipe._unpack_latents(pred, h * f, w * f, f)[:, :, 0]
