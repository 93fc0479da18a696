"""The model-family interface: what RAFT needs from a text-to-image pipeline family.

One subclass per diffusers pipeline class. Everything a stage does with the model goes through it:
encode the prompts once, sample with per-sample seeds keeping the final latents, decode them,
the family's training loss on kept latents, LoRA targets, and saving the LoRA so that the family's
own ``pipe.load_lora_weights`` reads it back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.settings import LossSettings


def seed_generators(seeds) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by its seed."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


@dataclass(frozen=True)
class ReferenceMix:
    """The negative-aware loss's prediction for a batch: ``(1 - w) v_ref + w v`` per row.

    ``weights`` ``[B]``: ``beta`` for a kept row (``v_plus``), ``-beta`` for a negative (``v_minus = (1 + beta) v_ref -
    beta v``); ``in_reference(predict)`` calls ``predict()`` with the reference weights (the stage's start), without
    gradient, and returns its output.
    """

    weights: torch.Tensor
    in_reference: Callable[[Callable[[], torch.Tensor]], torch.Tensor]


def blend(ref: torch.Tensor, pred: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(1 - w) ref + w pred`` in float32, one weight per row (the negative-aware loss's ``v_plus`` / ``v_minus``)."""
    w = weights.to(pred.device, torch.float32).view(-1, *([1] * (pred.dim() - 1)))
    return (1.0 - w) * ref.float() + w * pred.float()


def mixed_prediction(pred: torch.Tensor, predict: Callable[[], torch.Tensor], mix: ReferenceMix | None) -> torch.Tensor:
    """``pred`` (the trained weights' output of ``predict()``), or with ``mix`` ``(1 - w) v_ref + w pred`` in float32."""
    return pred if mix is None else blend(mix.in_reference(predict), pred, mix.weights)


class Family(ABC):
    """A diffusers pipeline family (subclasses set the class attributes and the abstract methods)."""

    name: str = ""  # short name used in configs (model.family)
    pipeline_class_name: str = ""  # diffusers class named in model_index.json's _class_name
    denoiser_attr: str = ""  # "unet" or "transformer": the module that trains
    lora_targets: tuple[str, ...] = ()  # default peft target_modules (diffusers' LoRA training scripts)
    cuda_dtype: str = "fp16"  # what dtype "auto" means on CUDA (fp32 elsewhere)
    # sampling.prune_step: the scheduler classes whose sampler the task can split between steps; () = none
    stepwise_schedulers: tuple[str, ...] = ()
    # whether the pipeline runs classifier-free guidance's two halves as one doubled batch (else one after the other,
    # so sampling holds the activations of one batch: what the memory planner counts)
    cfg_in_one_batch: bool = True
    # prompts per text-encoder call when the run's prompts are encoded (encode_prompts' default batch_size); the
    # encoding's activations grow with it, and the run's results do not depend on it
    encode_batch_size: int = 64
    # the prompt of the unconditional branch: the negative prompt's default, and what caption dropout
    # (train.empty_prompt_ratio) trains a dropped row on
    empty_prompt: str = ""
    # the pipeline applies its tokenizer's chat template to the prompts (the memory planner then reads the real tokenizer)
    chat_template: bool = False
    # the Hugging Face Hub tags of a model card for a LoRA of this family (besides text-to-image, lora, diffusers)
    hub_tags: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<family {self.name}: {self.pipeline_class_name}>"

    # --- loading ---------------------------------------------------------------------------------------

    def pipeline_class(self):
        """The diffusers pipeline class of this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load(self, pretrained, *, dtype="auto", device="auto", revision=None, variant=None, **components):
        """Load the pipeline with its class's ``from_pretrained`` (a hub id or a saved folder; no random weights).

        ``components`` replace or drop pipeline parts (``text_encoder_3=None``). ``dtype="auto"`` is the family's
        ``cuda_dtype`` on CUDA (bf16 for T5-based families, whose activations overflow fp16) and fp32 elsewhere.
        The pipeline is moved to the device, every module frozen and in eval mode, progress bars off.
        """
        from raft_diffusion.diffusion import pipeline as sd_pipeline

        dev = sd_pipeline.resolve_device(device)
        if dtype == "auto" and dev.type == "cuda":
            dtype = self.cuda_dtype
        name = str(pretrained)
        local = sd_pipeline._looks_like_path(name)
        if local and not (Path(name).expanduser() / "model_index.json").is_file():
            raise UserError(
                f"model folder {name!r} has no model_index.json: pass a diffusers {self.pipeline_class_name} "
                "folder (saved with save_pretrained) or a hub id like owner/name"
            )
        kwargs = {**(sd_pipeline.absent_components(name) if local else {}), "revision": revision, "variant": variant,
                  sd_pipeline._dtype_kwarg(): sd_pipeline.resolve_dtype(dtype, dev), **components}  # fmt: skip
        try:
            with sd_pipeline._quiet_loading():
                pipe = self.pipeline_class().from_pretrained(str(Path(name).expanduser()) if local else name, **kwargs)
        except sd_pipeline._hub_errors() as err:
            where = "" if local else f" from the Hugging Face Hub ({sd_pipeline._hub_reason(err)})"
            raise UserError(f"could not load {self.pipeline_class_name} {name!r}{where}: "
                            f"{sd_pipeline._first_line(err, 160)}; pass a local pipeline folder or a hub id "
                            "that is in the HF_HOME cache") from None  # fmt: skip
        pipe.to(dev)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def denoiser(self, pipe) -> torch.nn.Module:
        """The module that fine-tuning trains (``pipe.unet`` or ``pipe.transformer``)."""
        return getattr(pipe, self.denoiser_attr)

    # --- prompts, sampling, decoding -----------------------------------------------------------------------

    @abstractmethod
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """Every prompt's conditioning once, through the pipeline's own ``encode_prompt``. ``max_sequence_length``:
        the T5 / Qwen3 token count of families that have one (None: the family's default)."""

    def encode_on_meta(self, pipe) -> None:
        """Make :meth:`encode_prompts` run with the pipeline's models on the meta device (the memory planner's full-size
        estimates), where tensors have shapes but no values: nothing to do unless the pipeline's encoding reads them."""
        return None

    def image_size(self, pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` in pixels: the given ones, or the denoiser's native size (its ``sample_size``, else the
        pipeline's ``default_sample_size``, else 128 latent pixels) times the VAE's scale factor."""
        size = getattr(self.denoiser(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", 128)
        default = size * pipe.vae_scale_factor
        return height or default, width or default

    @abstractmethod
    def latent_shape(self, pipe, height: int, width: int) -> tuple[int, int, int]:
        """``(C, h, w)`` of one sample's (unpacked) latents at this image size."""

    def initial_noise(self, pipe, seeds, height: int, width: int, *, generators=None) -> torch.Tensor:
        """Float32 standard-normal starting latents ``[B, C, h, w]`` on CPU, sample i from a generator seeded by
        ``seeds[i]``: the same draw diffusers makes for a list of per-sample CPU generators in fp32. Pass
        ``generators`` (one per seed) to draw from them, leaving them advanced as the pipeline would."""
        shape = self.latent_shape(pipe, height, width)
        generators = seed_generators(seeds) if generators is None else generators
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])

    def _call_kwargs(self, embeds: PromptEmbeds, batch_size: int, cfg: bool) -> dict:
        """The pipeline ``__call__`` arguments that carry a batch's conditioning (``cfg``: with the negative ones)."""
        names = [n for n in embeds.per_prompt] + [n for n in embeds.shared if cfg or not n.startswith("negative_")]
        return {n: embeds.batch(n, batch_size) for n in names}

    def guidance_kwargs(self, pipe, guidance: float, cfg: bool) -> dict:
        """The pipeline ``__call__`` arguments that set the guidance (``cfg``: the negative conditioning is passed)."""
        return {"guidance_scale": guidance}

    def _pack(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Starting latents ``[B, C, h, w]`` in the layout the pipeline takes (FLUX packs them)."""
        return latents

    def _unpack(self, pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The pipeline's latent output as ``[B, C, h, w]`` (FLUX unpacks it)."""
        return latents

    @torch.no_grad()
    def sample(self, pipe, embeds: PromptEmbeds, prompt_indices, seeds, *, steps: int, guidance: float,
               height: int, width: int, **kwargs) -> torch.Tensor:  # fmt: skip
        """Sample one batch (sample i: prompt ``prompt_indices[i]``, seed ``seeds[i]``); return the final
        denoiser-space latents ``[B, C, h, w]`` (what :meth:`decode` and :meth:`training_loss` take).

        Each sample's starting noise is :meth:`initial_noise` of its own seed and its generator also
        drives any sampler noise, so a sample does not depend on the rest of its batch. Classifier-free
        guidance runs when ``guidance > 1`` and the embeddings hold negative ones (FLUX: ``guidance`` is the
        distilled guidance embedding). ``kwargs`` go to the pipeline call (``eta``, ``max_sequence_length``...).
        """
        seeds = [int(s) for s in seeds]
        if len(seeds) != len(prompt_indices):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_indices)} prompt indices")
        dtype = self.denoiser(pipe).dtype
        batch = embeds[prompt_indices].to(pipe.device, dtype)
        cfg = guidance > 1.0 and any(n.startswith("negative_") for n in embeds.shared)
        generators = seed_generators(seeds)  # first the starting noise, then (same generators) any sampler noise
        noise = self.initial_noise(pipe, seeds, height, width, generators=generators).to(pipe.device, dtype)
        out = pipe(
            **self._call_kwargs(batch, len(seeds), cfg), latents=self._pack(pipe, noise),
            generator=generators, num_inference_steps=steps, **self.guidance_kwargs(pipe, guidance, cfg),
            height=height, width=width, output_type="latent", return_dict=False, **kwargs,
        )[0]  # fmt: skip
        return self._unpack(pipe, out, height, width)

    @torch.no_grad()
    def decode(self, pipe, latents: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Denoiser-space latents -> float32 images ``[B, 3, H, W]`` in ``[0, 1]``:
        ``vae.decode(latents / scaling_factor + shift_factor)`` (no shift for SD/SDXL VAEs)."""
        vae = pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        images = []
        for chunk in latents.split(batch_size or max(1, latents.shape[0])):
            z = chunk.to(pipe.device, vae.dtype) / vae.config.scaling_factor + shift
            images.append(vae.decode(z, return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pipe, images: torch.Tensor, seeds) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]`` -> denoiser-space latents ``(z - shift_factor) * scaling_factor``,
        z a VAE posterior sample drawn with a generator seeded by each image's seed (offline mode: samples from
        another generator)."""
        if images.ndim != 4 or images.shape[1] != 3 or len(seeds) != images.shape[0]:
            raise ValueError(f"need images [B, 3, H, W] and one seed each, got {tuple(images.shape)} and {len(seeds)}")
        vae = pipe.vae
        posterior = vae.encode(images.to(pipe.device, vae.dtype) * 2 - 1).latent_dist
        eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in seed_generators(seeds)])
        z = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
        return ((z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor).float()

    # --- training --------------------------------------------------------------------------------------

    def mirror(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents ``[B, C, h, w]`` of the same images mirrored left to right (``train.random_flip``):
        the width axis reversed, which a VAE's latents follow up to its own error."""
        return latents.flip(-1)

    @abstractmethod
    def draw_timesteps(self, pipe, batch_size: int, settings: LossSettings, generator=None):
        """The training timesteps of a batch (and, for flow families, their sigmas), drawn on CPU."""

    @abstractmethod
    def training_loss(
        self, pipe, denoiser, latents_x0: torch.Tensor, embeds: PromptEmbeds, prompt_indices, *,
        generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None, settings: LossSettings | None = None,
        mix: ReferenceMix | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Per-sample float32 training losses ``[B]`` (differentiable w.r.t. the denoiser's trainable weights).

        ``noise`` and ``timesteps`` are drawn from ``generator`` (CPU) unless given. With ``mix`` the prediction
        in the loss is :func:`mixed_prediction`'s (the negative-aware loss).
        """

    def _draw_noise(self, latents_x0: torch.Tensor, noise, generator) -> torch.Tensor:
        if noise is None:
            noise = torch.randn(latents_x0.shape, generator=generator, dtype=torch.float32)
        if noise.shape != latents_x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match latents {tuple(latents_x0.shape)}")
        return noise

    # --- LoRA ----------------------------------------------------------------------------------------------

    def default_lora_targets(self, denoiser) -> list[str]:
        """The peft ``target_modules`` diffusers' LoRA training script of this family uses (those present in
        ``denoiser``)."""
        from raft_diffusion.diffusion.families.lora import present_targets

        return present_targets(denoiser, self.lora_targets)

    def add_lora(self, denoiser, *, rank=4, alpha=None, dropout=0.0, targets=None, init_seed=0) -> int:
        """Freeze the denoiser, add a peft LoRA adapter on ``targets`` (default: :meth:`default_lora_targets`);
        return the trainable parameter count."""
        from raft_diffusion.diffusion.families.lora import add_lora

        targets = self.default_lora_targets(denoiser) if targets is None else list(targets)
        return add_lora(denoiser, rank=rank, alpha=rank if alpha is None else alpha, dropout=dropout,
                        targets=targets, init_seed=init_seed)  # fmt: skip

    def load_lora(self, denoiser, lora_dir, *, adapter_name="default") -> None:
        """Restore a LoRA written by :meth:`save_lora` into a denoiser that has the same adapter (resume)."""
        from raft_diffusion.diffusion.families.lora import load_lora

        load_lora(self.denoiser_attr, denoiser, lora_dir, adapter_name=adapter_name)

    def save_lora(self, pipe, denoiser, out_dir, *, adapter_name="default") -> Path:
        """Save the denoiser's LoRA with the pipeline class's ``save_lora_weights`` (``pipe.load_lora_weights``
        of a fresh pipeline of this family reads it back)."""
        from raft_diffusion.diffusion.families.lora import save_lora

        return save_lora(type(pipe), self.denoiser_attr, denoiser, out_dir, adapter_name=adapter_name)
