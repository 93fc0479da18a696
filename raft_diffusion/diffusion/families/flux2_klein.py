"""FLUX.2 [klein]: a Qwen3 text encoder (three hidden layers stacked), the FLUX.2 VAE whose latents are 2x2-patchified
and batch-normalised, and an MMDiT on those patches trained with the rectified-flow loss."""

from __future__ import annotations

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.base import seed_generators
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.flow import FlowFamily


def _bn_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's latent batch-norm mean and std ``[1, 4C, 1, 1]`` (what the pipeline normalises patches with)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def tokens_to_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed tokens ``[B, h * w, C]`` in the pipelines' row-major order (``_pack_latents``, ``_prepare_latent_ids``)
    -> ``[B, C, h, w]``."""
    return tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


class Flux2KleinFamily(FlowFamily):
    """Flux2KleinPipeline. Denoiser-space latents are what the transformer sees before packing: the VAE latents
    patchified 2x2 and normalised by the VAE's batch-norm statistics, ``[B, 4C, H / 2f, W / 2f]``. The undistilled
    ("base") checkpoints run classifier-free guidance against a negative prompt (``""`` unless one is given);
    the step-distilled ones (``is_distilled``) ignore ``guidance``."""

    name = "flux2-klein"
    pipeline_class_name = "Flux2KleinPipeline"
    hub_tags = ("flux2", "flux2-klein")
    denoiser_attr = "transformer"
    cuda_dtype = "bf16"  # the pipeline's and the LoRA script's dtype
    cfg_in_one_batch = False  # the pipeline's conditional and unconditional passes are separate calls
    # the pipeline asks Qwen3 for every hidden state (37 of [B, 512, 2560] for the 4B), so 64 prompts at once would hold
    # 11 GiB of activations: 8 at a time hold 1.4
    encode_batch_size = 8
    chat_template = True
    # diffusers' train_dreambooth_lora_flux2_klein.py default: the double blocks' image-stream attention, the
    # single blocks' fused qkv+mlp input and their output (named per block there: FLUX.2 [klein] 9B has 24)
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24)))  # fmt: skip
    max_sequence_length = 512  # Qwen3 tokens (the pipeline's default)
    text_encoder_out_layers = (9, 18, 27)  # Qwen3 hidden states stacked into the conditioning (the pipeline's)

    def _encode(self, pipe, prompts, length) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(
            prompt=list(prompts),
            device=pipe.device,
            num_images_per_prompt=1,
            max_sequence_length=length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return embeds

    @torch.no_grad()
    def encode_prompts(self, pipe, prompts, negative_prompt=None, do_cfg=True, *, batch_size=None,
                       max_sequence_length=None) -> PromptEmbeds:  # fmt: skip
        """``prompt_embeds [P, L, 3 * hidden]`` per prompt (every prompt padded to ``L`` tokens, so a row depends on
        its prompt only); with ``do_cfg`` the negative prompt's (``""`` by default) once. Text ids are rebuilt from
        the embeddings where needed, as the pipeline does."""
        batch_size = batch_size or self.encode_batch_size
        length = max_sequence_length or self.max_sequence_length
        prompts = list(prompts)
        rows = [self._encode(pipe, prompts[i : i + batch_size], length) for i in range(0, len(prompts), batch_size)]
        shared = {"negative_prompt_embeds": self._encode(pipe, [negative_prompt or self.empty_prompt], length)} if do_cfg else {}
        return PromptEmbeds({"prompt_embeds": torch.cat(rows)}, shared)

    def latent_shape(self, pipe, height, width):
        """``(in_channels, height / 2f, width / 2f)``: the patchified latents; sizes must be multiples of 2f."""
        f = 2 * pipe.vae_scale_factor
        if height % f or width % f:
            raise UserError(f"height and width must be multiples of {f}, got {height}x{width}")
        return self.denoiser(pipe).config.in_channels, height // f, width // f

    def to_vae_latents(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser-space latents -> the VAE's latents ``[B, C, H / f, W / f]`` (what ``output_type="latent"`` gives)."""
        mean, std = _bn_stats(pipe.vae, latents)
        return pipe._unpatchify_latents(latents * std + mean)

    def from_vae_latents(self, pipe, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latents -> denoiser space (patchify, then normalise)."""
        patches = pipe._patchify_latents(z)
        mean, std = _bn_stats(pipe.vae, patches)
        return (patches - mean) / std

    def mirror(self, pipe, latents):
        """Mirrored in the VAE's latent space: un-normalised and unpatchified, the width reversed, patchified and normalised
        again (reversing the patch grid alone would leave the two columns inside each 2x2 patch in their order)."""
        return self.from_vae_latents(pipe, self.to_vae_latents(pipe, latents).flip(-1))

    def _unpack(self, pipe, latents, height, width):
        return self.from_vae_latents(pipe, latents.float()).float()

    @torch.no_grad()
    def decode(self, pipe, latents, *, batch_size=None):
        """Denoiser-space latents -> float32 images ``[B, 3, H, W]`` in ``[0, 1]`` (un-normalise, unpatchify, decode)."""
        vae, images = pipe.vae, []
        for chunk in latents.split(batch_size or max(1, latents.shape[0])):
            z = self.to_vae_latents(pipe, chunk.to(pipe.device, vae.dtype))
            images.append(vae.decode(z, return_dict=False)[0].float())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, pipe, images, seeds):
        """Images in ``[0, 1]`` -> denoiser-space latents of a posterior sample drawn with each image's seed."""
        if images.ndim != 4 or images.shape[1] != 3 or len(seeds) != images.shape[0]:
            raise ValueError(f"need images [B, 3, H, W] and one seed each, got {tuple(images.shape)} and {len(seeds)}")
        posterior = pipe.vae.encode(images.to(pipe.device, pipe.vae.dtype) * 2 - 1).latent_dist
        eps = torch.stack([torch.randn(posterior.mean.shape[1:], generator=g) for g in seed_generators(seeds)])
        z = posterior.mean + posterior.std * eps.to(posterior.mean.device, posterior.mean.dtype)
        return self.from_vae_latents(pipe, z).float()

    def _predict(self, pipe, denoiser, noisy, timesteps, batch, settings):
        n = noisy.shape[0]
        prompt_embeds = batch.batch("prompt_embeds", n)
        img_ids = pipe._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = pipe._prepare_text_ids(prompt_embeds).to(noisy.device)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((n,), float(settings.flux_guidance), device=noisy.device, dtype=torch.float32)
        packed = pipe._pack_latents(noisy)
        pred = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                        encoder_hidden_states=prompt_embeds, txt_ids=txt_ids, img_ids=img_ids,
                        return_dict=False)[0][:, : packed.shape[1]]  # fmt: skip
        return tokens_to_grid(pred, noisy.shape[2], noisy.shape[3])
