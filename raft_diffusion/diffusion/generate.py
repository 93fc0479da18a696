"""Pool generation: per-prompt text embeddings, per-seed noise, sampling, VAE decode/encode.

Every sample's randomness comes from its own ``torch.Generator`` seeded by its seed (on CPU, then
moved), so a sample depends only on (model, prompt, seed, sampler settings), never on which other
samples share its batch or on the device's RNG.
"""

from __future__ import annotations

import inspect

import torch


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


def _latent_shape(pipe, height: int, width: int) -> tuple[int, int, int]:
    factor = pipe.vae_scale_factor
    if height % factor or width % factor:
        raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
    return pipe.unet.config.in_channels, height // factor, width // factor


def _noise(pipe, generators: list[torch.Generator], height: int, width: int) -> torch.Tensor:
    shape = _latent_shape(pipe, height, width)
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device=pipe.device, dtype=pipe.unet.dtype)


def initial_latents(pipe, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """Standard-normal starting latents ``[B, C, h, w]``, sample i drawn from a generator seeded by ``seeds[i]``.

    Unscaled: the pipeline multiplies by ``scheduler.init_noise_sigma`` itself.
    """
    return _noise(pipe, _generators(seeds), height, width)


@torch.no_grad()
def encode_prompts(
    pipe, prompts: list[str], negative_prompt: str | None = None, do_cfg: bool = True, *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings ``[P, L, D]`` for each prompt once (and for the negative prompt when ``do_cfg``).

    Index them per sample (``embeds[prompt_index]``) to build mixed-prompt batches.
    """
    positive, negative = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        pos, neg = pipe.encode_prompt(
            chunk, pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
            negative_prompt=None if negative_prompt is None else [negative_prompt] * len(chunk),
        )  # fmt: skip
        positive.append(pos)
        negative.append(neg)
    return torch.cat(positive), (torch.cat(negative) if do_cfg else None)


@torch.no_grad()
def generate_batch(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    seeds: list[int],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    eta: float = 0.0,
    decode: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sample one batch: ``(latents [B,4,h,w], images [B,3,H,W] in [0,1] or None)``, both on the pipeline's device.

    ``latents`` are the final denoised UNet-space latents (what the VAE decodes after dividing by
    its scaling factor): the fine-tuning targets of kept samples. Works with any pipeline whose
    ``__call__`` takes ``prompt_embeds``/``negative_prompt_embeds``/``latents``/``generator``.
    """
    if len(seeds) != prompt_embeds.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {prompt_embeds.shape[0]} prompt embeddings")
    dtype = pipe.unet.dtype
    generators = _generators(seeds)  # first the initial noise, then any sampler noise (eta > 0, ancestral)
    latents = _noise(pipe, generators, height, width)
    if guidance_scale <= 1.0 or negative_embeds is None:  # no guidance, or let the pipeline embed ""
        negative_embeds = None
    out = pipe(
        prompt_embeds=prompt_embeds.to(pipe.device, dtype),
        negative_prompt_embeds=None if negative_embeds is None else negative_embeds.to(pipe.device, dtype),
        latents=latents,
        generator=generators,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        eta=eta,
        output_type="latent",
        return_dict=False,
    )
    latents = out[0]
    return latents, (decode_latents(pipe, latents) if decode else None)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
    """UNet-space latents -> float32 images ``[B, 3, H, W]`` in ``[0, 1]`` (on the pipeline's device).

    With the pipeline's safety checker loaded, flagged images come back black, as the pipeline does it.
    """
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    chunks = latents.split(batch_size or latents.shape[0])
    images = []
    for chunk in chunks:
        z = chunk.to(pipe.device, vae.dtype) / vae.config.scaling_factor + shift
        images.append(vae.decode(z, return_dict=False)[0])
    image = torch.cat(images)
    if getattr(pipe, "safety_checker", None) is not None:
        _, flagged = pipe.run_safety_checker(image, pipe.device, image.dtype)
        flagged = torch.tensor([bool(f) for f in flagged], device=image.device)
        image = torch.where(flagged[:, None, None, None], torch.full_like(image, -1.0), image)
    return (image.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> UNet-space latents (VAE posterior sample, one generator per seed)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    if len(seeds) != images.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {images.shape[0]} images")
    vae = pipe.vae
    x = images.to(pipe.device, vae.dtype) * 2 - 1
    posterior = vae.encode(x).latent_dist
    eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in _generators(seeds)])
    z = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


# Schedulers whose step is a function of (model output, timestep, sample) alone, with the scheduler's
# prediction of the final sample in its output: a batch may be split between steps (sampling.prune_step).
STEPWISE_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")


def start_latents(pipe, seeds: list[int], height: int, width: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The scaled starting latents of a batch and its per-sample generators (advanced past the initial
    noise, as :func:`generate_batch`'s are) for :func:`denoise`."""
    generators = _generators(seeds)
    return _noise(pipe, generators, height, width) * pipe.scheduler.init_noise_sigma, generators


@torch.no_grad()
def denoise(
    pipe,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    generators: list[torch.Generator],
    timesteps: torch.Tensor,
    *,
    guidance_scale: float,
    eta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the SD 1.x/2.x scheduler over ``timesteps`` (a slice of ``pipe.scheduler.timesteps``, set by
    the caller) from ``latents``: ``(latents after the last step, the scheduler's prediction of the final
    latents made at it)``. Over all of the timesteps from :func:`start_latents` this is what
    :func:`generate_batch` samples; split at any step (each part with its samples' own generators) it
    gives the same samples, so a caller may drop samples between the parts. Only for
    :data:`STEPWISE_SCHEDULERS` (their steps keep no state between calls)."""
    scheduler = pipe.scheduler
    if type(scheduler).__name__ not in STEPWISE_SCHEDULERS:
        raise ValueError(f"{type(scheduler).__name__} keeps state between steps; denoise needs one of {', '.join(STEPWISE_SCHEDULERS)}")
    cfg = guidance_scale > 1.0
    if cfg and negative_embeds is None:
        raise ValueError("guidance_scale > 1 needs negative_embeds (encode_prompts with do_cfg=True)")
    dtype = pipe.unet.dtype
    cond = prompt_embeds.to(pipe.device, dtype)
    if cfg:
        cond = torch.cat([negative_embeds.to(pipe.device, dtype), cond])
    accepts = set(inspect.signature(scheduler.step).parameters)
    kwargs = {k: v for k, v in (("eta", eta), ("generator", generators)) if k in accepts}
    x0 = latents
    for t in timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2) if cfg else latents, t)
        pred = pipe.unet(model_in, t, encoder_hidden_states=cond, return_dict=False)[0]
        if cfg:
            uncond, text = pred.chunk(2)
            pred = uncond + guidance_scale * (text - uncond)
        out = scheduler.step(pred, t, latents, **kwargs, return_dict=True)
        latents, x0 = out.prev_sample, out.pred_original_sample
    return latents, x0
