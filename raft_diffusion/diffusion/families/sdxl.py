"""Stable Diffusion XL: two CLIP text encoders (penultimate states concatenated, pooled from the second) and a
UNet conditioned on ``added_cond_kwargs = {text_embeds: pooled, time_ids: original size + crop + target size}``."""

from __future__ import annotations

import torch

from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.sd import StableDiffusionFamily


def sdxl_time_ids(height: int, width: int, crop_top_left: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """SDXL's micro-conditioning ``[6]``: original size (h, w), crop top-left (y, x), target size (h, w).

    RAFT trains on images the model drew itself at ``height x width``, uncropped: original = target size.
    """
    return torch.tensor([height, width, *crop_top_left, height, width], dtype=torch.float32)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """StableDiffusionXLPipeline (same denoising loss and LoRA targets as SD, plus pooled + size conditioning)."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    hub_tags = ("stable-diffusion-xl",)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora_sdxl.py
    stepwise_schedulers = ()  # sampling.prune_step: SD's split loop does not carry SDXL's pooled and size conditioning

    def load(self, pretrained, **kwargs):
        """``from_pretrained`` (SDXL pipelines have no safety checker)."""
        return super(StableDiffusionFamily, self).load(pretrained, **kwargs)

    def _encode(self, pipe, prompts, do_cfg, negative_prompt):
        """One ``encode_prompt`` call: prompt and pooled embeddings (and the negative ones)."""
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
        )  # fmt: skip
        return {"prompt_embeds": pos, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}  # fmt: skip

    @torch.no_grad()
    def decode(self, pipe, latents, *, batch_size=None):
        """As the SDXL pipeline decodes: a fp16 VAE with ``force_upcast`` runs in fp32 for the call, and a VAE with
        ``latents_mean``/``latents_std`` un-normalises with them."""
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if upcast:
            vae.to(torch.float32)
        try:
            images = []
            for chunk in latents.split(batch_size or max(1, latents.shape[0])):
                z = chunk.to(pipe.device, vae.dtype)
                if mean is not None and std is not None:
                    m = torch.tensor(mean).view(1, -1, 1, 1).to(z)
                    s = torch.tensor(std).view(1, -1, 1, 1).to(z)
                    z = z * s / vae.config.scaling_factor + m
                else:
                    z = z / vae.config.scaling_factor
                images.append(vae.decode(z, return_dict=False)[0].float())
        finally:
            if upcast:
                vae.to(torch.float16)
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    def _unet_kwargs(self, pipe, batch: PromptEmbeds, latents, dtype):
        """``added_cond_kwargs``: the pooled text embeddings and :func:`sdxl_time_ids` at the latents' image size."""
        n, f = latents.shape[0], pipe.vae_scale_factor
        ids = sdxl_time_ids(latents.shape[2] * f, latents.shape[3] * f).to(latents.device, dtype)
        return {"added_cond_kwargs": {"text_embeds": batch.batch("pooled_prompt_embeds", n),
                                      "time_ids": ids.expand(n, -1)}}  # fmt: skip
