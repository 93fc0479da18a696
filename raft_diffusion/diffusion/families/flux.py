"""FLUX.1: CLIP (pooled) + T5 (sequence) text encoders, a guidance-distilled MMDiT on packed 2x2 latent patches,
trained with the rectified-flow loss."""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.flow import PackedFlowFamily


class FluxFamily(PackedFlowFamily):
    """FluxPipeline. Latents are stored unpacked ``[B, C, h, w]``; ``guidance`` is the distilled guidance scale
    (FLUX.1-dev), there is no negative prompt (no classifier-free guidance)."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    hub_tags = ("flux",)
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"  # T5-XXL and the MMDiT overflow in fp16
    # diffusers' train_dreambooth_lora_flux.py default
    lora_targets = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2")  # fmt: skip
    max_sequence_length = 512  # T5 tokens (the pipeline's default; FLUX.1-schnell uses 256)

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """T5 sequence and CLIP pooled embeddings per prompt, ``text_ids`` once. A negative prompt is refused."""
        batch_size = batch_size or self.encode_batch_size
        if negative_prompt:
            raise UserError("FLUX.1 is guidance-distilled and takes no negative prompt: set negative_prompt to null")
        length = max_sequence_length or self.max_sequence_length
        prompts = list(prompts)
        seq, pooled, text_ids = [], [], None
        for i in range(0, len(prompts), batch_size):
            pe, pp, text_ids = pipe.encode_prompt(prompt=prompts[i : i + batch_size], prompt_2=None, device=pipe.device,
                                                  num_images_per_prompt=1, max_sequence_length=length)  # fmt: skip
            seq.append(pe)
            pooled.append(pp)
        return PromptEmbeds({"prompt_embeds": torch.cat(seq), "pooled_prompt_embeds": torch.cat(pooled)},
                            {"text_ids": text_ids})  # fmt: skip

    def _call_kwargs(self, embeds, batch_size, cfg):
        return {n: embeds.batch(n, batch_size) for n in ("prompt_embeds", "pooled_prompt_embeds")}

    def _unpack(self, pipe, latents, height, width):
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)

    def _predict(self, pipe, denoiser, noisy, timesteps, batch, settings):
        from diffusers import FluxPipeline

        n, c, h, w = noisy.shape
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((n,), float(settings.flux_guidance), device=noisy.device, dtype=torch.float32)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
        pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                        pooled_projections=batch.batch("pooled_prompt_embeds", n),
                        encoder_hidden_states=batch.batch("prompt_embeds", n),
                        txt_ids=batch.get("text_ids"), img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        f = pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(pred, h * f, w * f, f)
