"""FLUX.2 [dev]: FLUX.2 [klein]'s VAE, latents and MMDiT layout at 32B, with a Mistral-3 text encoder (hidden states 10,
20 and 30 stacked) and a guidance embedding instead of classifier-free guidance."""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.flux2_klein import Flux2KleinFamily, tokens_to_grid


class Flux2Family(Flux2KleinFamily):
    """Flux2Pipeline. Everything FLUX.2 [klein] does with its latents; the text is Mistral-3's, every prompt padded to
    ``max_sequence_length`` tokens; ``sampling.guidance_scale`` is the distilled guidance the transformer embeds (no
    negative prompt, no second pass), and training feeds it ``train.flux_guidance`` as FLUX.1's does."""

    name = "flux2"
    pipeline_class_name = "Flux2Pipeline"
    hub_tags = ("flux2",)
    # diffusers' train_dreambooth_lora_flux2.py default: the double blocks' image-stream attention
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_out_layers = (10, 20, 30)  # Mistral-3 hidden states stacked into the conditioning (the pipeline's)
    cfg_in_one_batch = True  # no classifier-free guidance to split
    # the pipeline asks Mistral-3 for every hidden state (41 of [B, 512, 5120] for FLUX.2 [dev]'s)
    encode_batch_size = 8

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """``prompt_embeds [P, L, 3 * hidden]`` per prompt (every prompt padded to ``L`` tokens); a negative prompt is
        refused: FLUX.2 [dev] is guidance-distilled."""
        if negative_prompt:
            raise UserError("FLUX.2 [dev] is guidance-distilled and takes no negative prompt: set prompts.negative to null")
        return super().encode_prompts(pipe, prompts, do_cfg=False, batch_size=batch_size, max_sequence_length=max_sequence_length)

    def _unpack(self, pipe, latents, height, width):
        """The pipeline's latent output is its packed, normalised tokens ``[B, h * w, C]``."""
        _, h, w = self.latent_shape(pipe, height, width)
        return tokens_to_grid(latents, h, w).float()
