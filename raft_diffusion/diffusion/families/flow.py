"""Rectified-flow training math shared by SD3 and FLUX (as diffusers' SD3/FLUX LoRA scripts do it).

Timesteps: ``u`` is drawn from ``compute_density_for_timestep_sampling`` (logit-normal by default)
and mapped to an index of the training scheduler's 1000 timesteps (``index = floor(u * 1000)``); the
scheduler's ``sigmas[index]`` (shifted for SD3, plain for FLUX) and ``timesteps[index] = 1000 * sigma``
go with it. Noisy input ``x_t = (1 - sigma) x_0 + sigma * noise``; target ``noise - x_0``; per-sample
loss ``mean(w(sigma) * (pred - target)^2)`` with ``w = compute_loss_weighting_for_sd3``.
"""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.base import Family, mixed_prediction
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.settings import LossSettings


def training_scheduler(pipe):
    """A fresh FlowMatchEulerDiscreteScheduler from the pipeline's config (its training timesteps, not the
    ones the last sampling call set)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)


def allowed_indices(scheduler, timestep_range: tuple[int, int] | None) -> tuple[int, int]:
    """The index interval ``[first, last)`` of the scheduler's training timesteps with ``1000 * sigma`` in
    ``[lo, hi)`` (sigmas decrease with the index, so it is one interval); all of them without a range."""
    n = len(scheduler.sigmas)
    if timestep_range is None:
        return 0, n
    lo, hi = timestep_range
    scaled = scheduler.sigmas.double() * 1000.0
    inside = ((scaled >= lo) & (scaled < hi)).nonzero().flatten()
    if inside.numel() == 0:
        raise UserError(
            f"timestep_range {list(timestep_range)} contains none of the scheduler's sigmas*1000 ({scaled.min():.1f}..{scaled.max():.1f}): widen it"
        )
    return int(inside[0]), int(inside[-1]) + 1


def draw_flow_timesteps(
    scheduler, batch_size: int, settings: LossSettings, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [B], sigmas [B])`` drawn on CPU.

    ``u`` follows ``settings.weighting_scheme``'s density; the index is ``floor(u * n)`` over the
    allowed interval of :func:`allowed_indices` (the whole schedule unless ``timestep_range``: then the
    density is laid over that interval instead of the full one).
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling(
        weighting_scheme=settings.weighting_scheme,
        batch_size=batch_size,
        logit_mean=settings.logit_mean,
        logit_std=settings.logit_std,
        mode_scale=settings.mode_scale,
        device="cpu",
        generator=generator,
    )
    first, last = allowed_indices(scheduler, settings.timestep_range)
    index = first + (u * (last - first)).long().clamp(0, last - first - 1)
    return scheduler.timesteps[index].float(), scheduler.sigmas[index].float()


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) x_0 + sigma * noise`` with one sigma per sample."""
    s = sigmas.view(-1, *([1] * (x0.ndim - 1))).to(x0)
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str) -> torch.Tensor:
    """Per-sample ``mean(w(sigma) * (pred - (noise - x_0))^2)`` in float32 (shape ``[B]``)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weights = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas.float())
    weights = weights.view(-1, *([1] * (x0.ndim - 1))).to(pred.device)
    target = noise.float() - x0.float()
    return (weights * (pred.float() - target) ** 2).flatten(1).mean(1)


class FlowFamily(Family):
    """A rectified-flow family (SD3, FLUX): the loss above; subclasses say how the transformer is called."""

    def draw_timesteps(self, pipe, batch_size, settings, generator=None):
        """``(timesteps [B], sigmas [B])`` from :func:`draw_flow_timesteps` on the training scheduler."""
        return draw_flow_timesteps(training_scheduler(pipe), batch_size, settings, generator)

    def _predict(self, pipe, denoiser, noisy, timesteps, batch: PromptEmbeds, settings: LossSettings):
        """The transformer's velocity prediction ``[B, C, h, w]`` for ``noisy`` at ``timesteps`` (0..1000)."""
        raise NotImplementedError

    def training_loss(self, pipe, denoiser, latents_x0, embeds, prompt_indices, *, generator=None, noise=None,
                      timesteps=None, settings=None, mix=None):  # fmt: skip
        """Per-sample flow-matching loss (module docstring); given ``timesteps``, ``sigma = t / 1000``; ``mix``: the
        velocity mixed with the reference's (:func:`mixed_prediction`, the negative-aware loss)."""
        settings = settings or LossSettings()
        n = latents_x0.shape[0]
        noise = self._draw_noise(latents_x0, noise, generator)
        if timesteps is None:
            timesteps, sigmas = self.draw_timesteps(pipe, n, settings, generator)
        else:
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32)
            sigmas = timesteps / training_scheduler(pipe).config.num_train_timesteps
        device, dtype = denoiser.device, denoiser.dtype
        x0, noise = latents_x0.to(device, torch.float32), noise.to(device, torch.float32)
        noisy = noisy_input(x0, noise, sigmas.to(device))
        batch = embeds[prompt_indices].to(device, dtype)

        def predict() -> torch.Tensor:
            return self._predict(pipe, denoiser, noisy.to(dtype), timesteps.to(device, dtype), batch, settings)

        pred = mixed_prediction(predict(), predict, mix)
        return flow_matching_loss(pred, x0, noise, sigmas.to(device), settings.weighting_scheme)


class PackedFlowFamily(FlowFamily):
    """A flow family whose pipeline packs 2x2 latent patches into tokens (FLUX.1, Qwen-Image): latents are stored
    unpacked, ``[B, in_channels / 4, H / f, W / f]``, and packed for the pipeline's ``latents`` argument."""

    def latent_shape(self, pipe, height, width):
        """``(in_channels / 4, height / f, width / f)`` with sizes multiples of 2f (packing takes 2x2 patches)."""
        f = pipe.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise UserError(f"height and width must be multiples of {2 * f}, got {height}x{width}")
        return self.denoiser(pipe).config.in_channels // 4, height // f, width // f

    def _pack(self, pipe, latents):
        b, c, h, w = latents.shape
        return pipe._pack_latents(latents, b, c, h, w)
