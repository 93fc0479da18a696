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
    hub_tags = ("sd3",)
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"  # T5-XXL and the MMDiT overflow in fp16
    # diffusers' train_dreambooth_lora_sd3.py default (joint attention only: not attn2 of SD3.5's dual blocks)
    lora_targets = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")  # fmt: skip
    max_sequence_length = 256  # T5 tokens (the pipeline's default)
    # sampling.prune_step: sampling_schedule and denoise split its sampler between steps (deterministic Euler only)
    stepwise_schedulers = ("FlowMatchEulerDiscreteScheduler",)

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
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """Positive conditioning per prompt; with ``do_cfg`` the negative prompt's (``""`` by default) once."""
        batch_size = batch_size or self.encode_batch_size
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

    # -- the sampler, step by step (sampling.prune_step) -----------------------------------------------------------
    def sampling_schedule(self, pipe, steps: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(timesteps [n], sigmas [n + 1])`` the pipeline samples with at this size: the scheduler's shift, or
        its dynamic shift from the image's token count when the scheduler is configured for one."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler, kwargs = pipe.scheduler, {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = self.denoiser(pipe).config.patch_size
            _, h, w = self.latent_shape(pipe, height, width)
            c = scheduler.config
            kwargs["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, device=pipe.device, **kwargs)
        return scheduler.timesteps, scheduler.sigmas

    @torch.no_grad()
    def denoise(self, pipe, latents, embeds: PromptEmbeds, timesteps, sigmas, *, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Euler steps of the flow from ``latents`` over ``timesteps`` (a slice of :meth:`sampling_schedule`'s, with
        ``sigmas`` the matching slice one longer): ``(latents after the last step, the final latents predicted at
        it, x - sigma v)``. Over the whole schedule from :meth:`initial_noise` this is what the pipeline samples
        (:meth:`sample`); split anywhere it gives the same samples (the Euler step keeps no state)."""
        n = latents.shape[0]
        cfg = guidance > 1.0 and any(k.startswith("negative_") for k in embeds.shared)
        cond, pooled = embeds.batch("prompt_embeds", n), embeds.batch("pooled_prompt_embeds", n)
        if cfg:
            cond = torch.cat([embeds.batch("negative_prompt_embeds", n), cond])
            pooled = torch.cat([embeds.batch("negative_pooled_prompt_embeds", n), pooled])
        transformer, x0 = self.denoiser(pipe), latents
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            v = transformer(hidden_states=model_in, timestep=t.expand(model_in.shape[0]), encoder_hidden_states=cond,
                            pooled_projections=pooled, return_dict=False)[0]  # fmt: skip
            if cfg:
                uncond, text = v.chunk(2)
                v = uncond + guidance * (text - uncond)
            sample = latents.to(torch.float32)  # the scheduler's step works in float32
            x0 = sample - sigmas[i] * v
            latents = (sample + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        return latents, x0
