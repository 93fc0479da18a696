"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet trained with the DDPM denoising loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.base import Family, mixed_prediction
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.settings import LossSettings
from raft_diffusion.diffusion.generate import STEPWISE_SCHEDULERS


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (epsilon), the velocity (v_prediction) or x_0 (sample)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    if kind == "sample":
        return x0
    raise UserError(f"unsupported prediction_type {kind!r} in the scheduler config: expected epsilon or v_prediction")


class StableDiffusionFamily(Family):
    """StableDiffusionPipeline: text embeddings ``[P, 77, D]``; epsilon or v-prediction UNet."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    hub_tags = ("stable-diffusion",)
    denoiser_attr = "unet"
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora / dreambooth_lora
    stepwise_schedulers = STEPWISE_SCHEDULERS  # generate.denoise's (DDIM, DDPM)

    def load(self, pretrained, **kwargs):
        """``from_pretrained`` without the safety checker unless one is passed in ``kwargs``."""
        kwargs.setdefault("safety_checker", None)
        kwargs.setdefault("requires_safety_checker", False)
        return super().load(pretrained, **kwargs)

    # --- prompts -------------------------------------------------------------------------------------

    def _encode(self, pipe, prompts, do_cfg, negative_prompt):
        """One ``encode_prompt`` call: ``{name: tensor}`` of the positive (and negative) conditioning."""
        pos, neg = pipe.encode_prompt(
            list(prompts), pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(prompts),
        )  # fmt: skip
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """Positive conditioning per prompt; with ``do_cfg`` the negative prompt's (``""`` by default) once,
        as ``shared`` tensors named ``negative_*``. CLIP encoders only: ``max_sequence_length`` must be None."""
        batch_size = batch_size or self.encode_batch_size
        if max_sequence_length is not None:
            raise UserError(f"model.max_sequence_length sets T5/Qwen tokens; {self.name} has no such encoder: set it to null")
        prompts = list(prompts)
        chunks = [self._encode(pipe, prompts[i : i + batch_size], False, None)
                  for i in range(0, len(prompts), batch_size)]  # fmt: skip
        per_prompt = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0] if not k.startswith("negative_")}
        shared = {}
        if do_cfg:
            both = self._encode(pipe, [prompts[0] if prompts else ""], True, negative_prompt)
            shared = {k: v for k, v in both.items() if k.startswith("negative_")}
        return PromptEmbeds(per_prompt, shared)

    # --- sampling --------------------------------------------------------------------------------------

    def latent_shape(self, pipe, height, width):
        """``(unet in_channels, height / f, width / f)`` with f the VAE's downsampling factor."""
        f = pipe.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"height and width must be multiples of {f}, got {height}x{width}")
        return self.denoiser(pipe).config.in_channels, height // f, width // f

    # --- training ----------------------------------------------------------------------------------------

    def training_scheduler(self, pipe):
        """A DDPMScheduler with the pipeline's training noise schedule and prediction type."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(pipe.scheduler.config)

    def draw_timesteps(self, pipe, batch_size, settings, generator=None):
        """``(t [B] long, None)``: ``t ~ U[lo, hi)`` (the whole schedule unless ``settings.timestep_range``)."""
        total = pipe.scheduler.config.num_train_timesteps  # the training scheduler's own (it is built from this config)
        lo, hi = settings.timestep_range or (0, total)
        if hi > total:
            raise UserError(f"timestep_range must end at most at {total} (got {[lo, hi]})")
        return torch.randint(int(lo), int(hi), (batch_size,), generator=generator), None

    def _unet_kwargs(self, pipe, batch: PromptEmbeds, latents: torch.Tensor, dtype) -> dict:
        """Extra UNet conditioning (SDXL: ``added_cond_kwargs``)."""
        return {}

    def training_loss(self, pipe, denoiser, latents_x0, embeds, prompt_indices, *, generator=None, noise=None,
                      timesteps=None, settings=None, mix=None):  # fmt: skip
        """Per-sample MSE between the UNet's prediction on ``add_noise(x_0, noise, t)`` (``mix``: mixed with the
        reference's, :func:`mixed_prediction`) and its target (noise or velocity, from the scheduler's
        ``prediction_type``)."""
        settings = settings or LossSettings()
        scheduler = self.training_scheduler(pipe)
        n = latents_x0.shape[0]
        noise = self._draw_noise(latents_x0, noise, generator)
        if timesteps is None:
            timesteps, _ = self.draw_timesteps(pipe, n, settings, generator)
        device, dtype = denoiser.device, denoiser.dtype
        x0, noise, t = latents_x0.to(device, torch.float32), noise.to(device, torch.float32), timesteps.to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = denoising_target(scheduler, x0, noise, t)
        batch = embeds[prompt_indices].to(device, dtype)

        def predict() -> torch.Tensor:
            return denoiser(noisy.to(dtype), t, encoder_hidden_states=batch.batch("prompt_embeds", n),
                            **self._unet_kwargs(pipe, batch, x0, dtype), return_dict=False)[0]  # fmt: skip

        pred = mixed_prediction(predict(), predict, mix)
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
