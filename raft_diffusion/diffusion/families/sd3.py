"""Stable Diffusion 3 / 3.5: two CLIP encoders (pooled) and T5 (optional: zeros when absent), an MMDiT trained
with the rectified-flow loss."""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.flow import FlowFamily


class StableDiffusion3Family(FlowFamily):
    """StableDiffusion3Pipeline: ``prompt_embeds [P, 77 + T5 length, 4096]`` and ``pooled_prompt_embeds [P, 2048]``."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"  # T5-XXL and the MMDiT overflow in fp16
    # diffusers' train_dreambooth_lora_sd3.py default (joint attention only: not attn2 of SD3.5's dual blocks)
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")  # fmt: skip
    max_sequence_length = 256  # T5 tokens (the pipeline's default)

    def load(self, pretrained, *, drop_t5: bool = False, **kwargs):
        """``from_pretrained``; ``drop_t5`` leaves out T5 (the pipeline then uses zeros for its part)."""
        if drop_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        return super().load(pretrained, **kwargs)

    def _encode(self, pipe, prompts, do_cfg, negative_prompt, max_sequence_length):
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), prompt_2=None, prompt_3=None, device=pipe.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, max_sequence_length=max_sequence_length,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
        )  # fmt: skip
        return {"prompt_embeds": pos, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg, "negative_pooled_prompt_embeds": neg_pooled}  # fmt: skip

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=64,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """Positive conditioning per prompt; with ``do_cfg`` the negative prompt's (``""`` by default) once."""
        length = max_sequence_length or self.max_sequence_length
        prompts = list(prompts)
        chunks = [self._encode(pipe, prompts[i : i + batch_size], False, None, length)
                  for i in range(0, len(prompts), batch_size)]  # fmt: skip
        per_prompt = {k: torch.cat([c[k] for c in chunks]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
        shared = {}
        if do_cfg:
            both = self._encode(pipe, [prompts[0] if prompts else ""], True, negative_prompt, length)
            shared = {k: v for k, v in both.items() if k.startswith("negative_")}
        return PromptEmbeds(per_prompt, shared)

    def latent_shape(self, pipe, height, width):
        """``(in_channels, height / f, width / f)``; sizes must be multiples of f * patch size."""
        transformer = self.denoiser(pipe)
        f = pipe.vae_scale_factor * transformer.config.patch_size
        if height % f or width % f:
            raise UserError(f"height and width must be multiples of {f}, got {height}x{width}")
        return transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor

    def _predict(self, pipe, denoiser, noisy, timesteps, batch, settings):
        n = noisy.shape[0]
        return denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=batch.batch("prompt_embeds", n),
                        pooled_projections=batch.batch("pooled_prompt_embeds", n), return_dict=False)[0]  # fmt: skip
