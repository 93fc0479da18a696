"""Z-Image: a Qwen3 text encoder (its second-to-last hidden state, each prompt's own tokens only), the FLUX VAE, and
a single-stream DiT trained with the rectified-flow loss; the transformer takes lists (one latent and one caption
of its own length per sample), is fed ``1 - sigma`` as its time and predicts ``x_0 - noise``."""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.embeds import PromptEmbeds, encode_padded
from raft_diffusion.diffusion.families.flow import FlowFamily


def _rows(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Padded rows ``[B, L, D]`` and their masks -> each row's own tokens, as the pipeline and transformer take them
    (on the meta device, where masks have no values, every position: see :meth:`ZImageFamily.encode_on_meta`)."""
    if embeds.is_meta:
        return list(embeds)
    return [row[m.bool()] for row, m in zip(embeds, mask)]


class ZImageFamily(FlowFamily):
    """ZImagePipeline. Denoiser-space latents are the VAE's latents shifted and scaled, ``[B, 16, H / 8, W / 8]``.
    Prompts are embedded to their own lengths; every row is zero-padded to the run's longest and carries a mask.
    Classifier-free guidance is the pipeline's ``pos + g' (pos - neg)``, so ``sampling.guidance_scale`` g (the usual
    ``neg + g (pos - neg)``) is passed as ``g' = g - 1``. The Turbo checkpoint is step-distilled to run without
    guidance (``sampling.guidance_scale: 1``)."""

    name = "z-image"
    pipeline_class_name = "ZImagePipeline"
    hub_tags = ("z-image",)
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"
    # diffusers' train_dreambooth_lora_z_image.py default: every attention's q, k, v and output (the refiners' too)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    max_sequence_length = 512  # Qwen3 tokens (the pipeline's default)
    # the pipeline asks Qwen3 for every hidden state, as FLUX.2 [klein]'s does
    encode_batch_size = 8
    chat_template = True

    def _encode(self, pipe, prompts, length) -> tuple[torch.Tensor, torch.Tensor]:
        rows, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe.device, do_classifier_free_guidance=False,
                                     max_sequence_length=length)  # fmt: skip
        lengths = [r.shape[0] for r in rows]
        embeds = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.zeros(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        for i, n in enumerate(lengths):
            mask[i, :n] = 1
        return embeds, mask

    def encode_on_meta(self, pipe) -> None:
        """The pipeline keeps each prompt's tokens by the values of its mask, which meta tensors do not have: count every
        one of the ``max_sequence_length`` positions as a prompt token (the most a prompt can hold), through the same
        text-encoder call."""

        def encode(prompt, device=None, prompt_embeds=None, max_sequence_length=512):
            if prompt_embeds is not None:
                return prompt_embeds
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            ids = pipe.tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                                 return_tensors="pt").input_ids  # fmt: skip
            return list(pipe.text_encoder(input_ids=ids.to(device or pipe.device), output_hidden_states=True).hidden_states[-2])

        pipe._encode_prompt = encode

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """``prompt_embeds [P, L, D]`` and ``prompt_embeds_mask [P, L]`` per prompt (each prompt's own tokens, at most
        ``max_sequence_length``, zero-padded to the longest); with ``do_cfg`` the negative prompt's (``""`` by default,
        the pipeline's) once."""
        return encode_padded(self, pipe, prompts, negative_prompt, do_cfg, batch_size, max_sequence_length)

    def latent_shape(self, pipe, height, width):
        """``(in_channels, height / f, width / f)``; sizes must be multiples of 2f (the transformer's 2x2 patches)."""
        f = pipe.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise UserError(f"height and width must be multiples of {2 * f}, got {height}x{width}")
        return self.denoiser(pipe).config.in_channels, height // f, width // f

    def _call_kwargs(self, embeds, batch_size, cfg):
        """The pipeline takes each sample's caption as its own tensor (a list), the negative one per sample."""
        out = {"prompt_embeds": _rows(embeds.batch("prompt_embeds", batch_size), embeds.batch("prompt_embeds_mask", batch_size))}
        if cfg:
            neg = _rows(embeds.shared["negative_prompt_embeds"], embeds.shared["negative_prompt_embeds_mask"])[0]
            out["negative_prompt_embeds"] = [neg] * batch_size
        return out

    def guidance_kwargs(self, pipe, guidance, cfg):
        """The pipeline's guidance scale is ``g - 1`` (its CFG is ``pos + g' (pos - neg)``; 0 = none)."""
        return {"guidance_scale": guidance - 1.0 if cfg else 0.0}

    def _predict(self, pipe, denoiser, noisy, timesteps, batch, settings):
        """The velocity ``noise - x_0``: the transformer's output negated, fed ``1 - t / 1000`` and one latent
        ``[C, 1, h, w]`` and caption per sample, as diffusers' Z-Image LoRA script trains it."""
        n = noisy.shape[0]
        captions = _rows(batch.batch("prompt_embeds", n), batch.batch("prompt_embeds_mask", n))
        out = denoiser(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)
