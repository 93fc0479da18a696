"""Fine-tune the UNet on kept samples: LoRA via peft (or all weights) with the ordinary denoising loss."""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from raft_diffusion.core.errors import UserError
from raft_diffusion.core.gradsum import chunk_slices, summed_grads
from raft_diffusion.core.seeds import train_chunk_seed
from raft_diffusion.diffusion.families.base import ReferenceMix, blend
from raft_diffusion.diffusion.families.lora import save_lora as save_denoiser_lora
from raft_diffusion.diffusion.families.sd import denoising_target

logger = logging.getLogger(__name__)

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet attention projections
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for saved LoRA weights
_MIXED_PRECISION = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def _rng_devices(module: torch.nn.Module) -> list[int]:
    """CUDA devices whose RNG state ``fork_rng`` must save/restore for this module."""
    return sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def add_lora(
    unet,
    *,
    rank: int = 4,
    alpha: float = 4,
    dropout: float = 0.0,
    target_modules=LORA_TARGETS,
    init_seed: int = 0,
    adapter_name: str = "default",
) -> int:
    """Freeze the UNet and add a peft LoRA adapter (``unet.add_adapter``); return the trainable parameter count.

    ``lora_A`` is drawn from a Gaussian under ``torch.manual_seed(init_seed)`` (global RNG state
    restored afterwards) and ``lora_B`` starts at zero, so the UNet's output is unchanged at first.
    """
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}: set lora rank to a positive integer")
    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=list(target_modules),
    )
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=_rng_devices(unet)):
        torch.manual_seed(init_seed)
        try:
            unet.add_adapter(config, adapter_name=adapter_name)
        except ValueError as err:
            if "target modules" in str(err).lower() or "not found" in str(err).lower():
                raise UserError(
                    f"LoRA target modules {list(target_modules)} match no UNet layer: use names of Linear layers such as {', '.join(LORA_TARGETS)}"
                ) from None
            raise
    return sum(p.numel() for p in trainable_parameters(unet))


@contextmanager
def lora_merged(module: torch.nn.Module, enabled: bool = True):
    """Inside the block the module's active LoRA adapters are added into their base layers' weights, so a
    forward pass runs each adapted layer once instead of three times (base, down, up): the same function, about
    20% less compute for the toy UNet's sampling on CPU (outputs equal up to float rounding). On leaving, every
    base weight gets back its saved bytes (merge then unmerge would not restore them exactly), so training and
    saving see the weights they would have seen. No-op without LoRA layers (``train.method=full``)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in module.modules() if isinstance(m, LoraLayer) and not m.merged] if enabled else []
    saved = [[(t, t.detach().clone()) for t in (m.get_base_layer().weight, m.get_base_layer().bias) if t is not None] for m in layers]
    try:
        with torch.no_grad():
            for m in layers:
                m.merge()
        yield
    finally:
        with torch.no_grad():
            for m, tensors in zip(layers, saved):
                m.merged_adapters.clear()  # unmerged, and the weights back bit for bit
                for t, copy in tensors:
                    t.copy_(copy)


def set_full_finetune(unet) -> int:
    """Make every UNet parameter trainable; return the trainable parameter count."""
    unet.requires_grad_(True)
    return sum(p.numel() for p in unet.parameters())


def save_lora(unet, out_dir: str | Path, *, adapter_name: str = "default") -> Path:
    """Save the UNet's LoRA in diffusers format (``pipe.load_lora_weights(out_dir)`` loads it).

    The LoRA config (rank, alpha, targets) goes into the safetensors metadata, so alpha != rank
    reloads with the right scale; the same weights give the same bytes. The folder is replaced atomically.
    peft key names (lora_A/lora_B) are kept as they are: converting to the legacy "lora.down" names only covers
    attention projections, and a file mixing both styles loses the attention LoRA on reload.
    """
    from diffusers import StableDiffusionPipeline

    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter {adapter_name!r} to save (call add_lora first)")
    return save_denoiser_lora(StableDiffusionPipeline, "unet", unet, out_dir, adapter_name=adapter_name)


def load_lora_into_unet(unet, lora_dir: str | Path, *, adapter_name: str = "default") -> None:
    """Restore a LoRA saved by :func:`save_lora` into a UNet that already has the same adapter (for resume).

    Every LoRA tensor must match the adapter's keys and shapes (and its rank/alpha when the file
    records them); otherwise a UserError says what differs.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    lora_dir = Path(lora_dir)
    if not (lora_dir / LORA_WEIGHT_NAME).is_file():
        weights = str(lora_dir / LORA_WEIGHT_NAME)
        raise UserError(f"no LoRA weights at {weights!r}: point to a folder written by save_lora")
    if adapter_name not in getattr(unet, "peft_config", {}):
        raise ValueError(f"the UNet has no LoRA adapter {adapter_name!r} (call add_lora with the saved settings first)")
    # 1. read, keep the UNet part, convert to peft keys
    result = StableDiffusionPipeline.lora_state_dict(str(lora_dir), return_lora_metadata=True)
    state, metadata = result[0], (result[2] if len(result) > 2 else None)
    state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    state = convert_unet_state_dict_to_peft(state)
    # 2. compare with the adapter: keys, shapes, rank and alpha
    expected = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"LoRA in {str(lora_dir)!r} does not fit the UNet's adapter ({len(missing)} missing keys, e.g. "
            f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): resume with the same lora settings"
        )
    wrong = [k for k in expected if expected[k].shape != state[k].shape]
    if wrong:
        raise UserError(
            f"LoRA in {str(lora_dir)!r} has other shapes than the UNet's adapter (e.g. {wrong[0]}: "
            f"{tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}): resume with the same lora rank"
        )
    config = unet.peft_config[adapter_name]
    unet_meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()}
    for field in ("r", "lora_alpha"):
        if field in unet_meta and float(unet_meta[field]) != float(getattr(config, field)):
            raise UserError(
                f"LoRA in {str(lora_dir)!r} was saved with {field}={unet_meta[field]} but the adapter has "
                f"{field}={getattr(config, field)}: resume with the same lora settings"
            )
    # 3. load
    set_peft_model_state_dict(unet, state, adapter_name=adapter_name)


def amp_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.mixed_precision`` on ``device``: bf16 on CUDA and CPU (torch autocasts on both),
    fp16 on CUDA only (CPU fp16 is slow and lacks kernels); None = fp32 training."""
    dtype = _MIXED_PRECISION[mixed_precision]
    if dtype == torch.float16 and device.type != "cuda":
        return None
    return dtype


def make_optimizer(name: str, params, **kwargs) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``adamw8bit`` (bitsandbytes, imported only when asked for)."""
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "train.optimizer=adamw8bit needs bitsandbytes: pip install 'raft-diffusion[bnb]' (CUDA), or set train.optimizer=adamw"
            ) from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise UserError(f"unknown optimizer {name!r}: use adamw or adamw8bit")


def optimizer_step(optimizer, params, scaler=None, max_grad_norm: float | None = None) -> bool:
    """One optimizer step on the accumulated gradients: unscale (fp16 loss scaling), clip, step. Returns whether the
    weights were updated: with a ``GradScaler``, gradients holding inf/NaN skip the step and lower the scale (the
    scaler's ``update``); finite ones step (and the scale grows after ``growth_interval`` such steps)."""
    if scaler is None:
        if max_grad_norm is not None and max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        return True
    scaler.unscale_(optimizer)
    if max_grad_norm is not None and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    scale = scaler.get_scale()
    scaler.step(optimizer)  # skipped when unscale_ found inf/NaN
    scaler.update()
    return scaler.get_scale() >= scale


DDPM_FAMILIES = ("sd", "sdxl")  # trained with the denoising loss (the others with the rectified-flow loss)


def check_loss_options(family: str, *, snr_gamma: float | None) -> None:
    """Options of the SD loss that only some families have, refused in one line (by the task before the model
    loads, and by :func:`train_unet` for direct callers)."""
    if snr_gamma is not None and family not in DDPM_FAMILIES:
        raise UserError(
            f"train.snr_gamma weights the DDPM denoising loss; {family} trains with the rectified-flow "
            "loss, whose weighting is train.weighting_scheme: set train.snr_gamma to null"
        )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample loss weights of Min-SNR-gamma (Hang et al. 2023): ``min(SNR, gamma) / SNR`` for epsilon
    targets, ``min(SNR, gamma) / (SNR + 1)`` for velocity targets, ``min(SNR, gamma)`` for sample targets.

    They cap the weight of the nearly-clean timesteps, so the loss is no longer dominated by fine detail and the
    high-noise steps that decide a picture's layout (size, position, background) get a larger share.
    """
    alphas = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1.0 - alphas)
    capped = snr.clamp(max=float(gamma))
    kind = noise_scheduler.config.prediction_type
    w = capped / snr if kind == "epsilon" else capped / (snr + 1.0) if kind == "v_prediction" else capped
    return w.float()


def train_unet(
    pipe,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    lr_scheduler: str = "constant",
    lr_warmup_steps: int = 0,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = 1.0,
    weight_decay: float = 1e-2,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    seed: int = 0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    snr_gamma: float | None = None,
    empty_prompt_ratio: float = 0.0,
    empty_embeds=None,
    timestep_range: tuple[int, int] | None = None,
    timestep_ranges: list | None = None,
    chunk_rows: int | None = None,
    optimizer_name: str = "adamw",
    progress: bool = True,
    desc: str = "train",
    dist=None,
    family=None,
    loss_settings=None,
    sample_weights: torch.Tensor | None = None,
    negative_latents: torch.Tensor | None = None,
    negative_embeds: torch.Tensor | None = None,
    negative_weight: float = 1.0,
    nft_beta: float = 1.0,
    negative_sample_weights: torch.Tensor | None = None,
    random_flip: bool = False,
) -> dict:
    """Fine-tune ``pipe.unet``'s trainable parameters on (latents, text embeddings) pairs; return loss figures.

    Ordinary SD loss: ``t ~ U[0, T)``, ``noise ~ N(0, I)``, MSE between the UNet's prediction on
    ``add_noise(latents, noise, t)`` and noise (epsilon) or velocity (v_prediction), as the
    scheduler config says; ``snr_gamma`` weights each sample's MSE by :func:`min_snr_weights` (None: equal
    weights). With ``empty_prompt_ratio`` > 0 each sample is trained, with that probability, on ``empty_embeds``
    (the empty prompt's conditioning: SD's embedding ``[1, L, D]``, a family's one-row ``PromptEmbeds``) instead of
    its prompt's, as SD's own training drops captions: what is learnt then also moves the unconditional prediction,
    i.e. applies to every prompt.
    ``timestep_range`` ``(lo, hi)`` draws ``t ~ U[lo, hi)`` instead: high timesteps (much noise) set the layout
    and colours, low ones the fine detail. ``timestep_ranges`` (not with ``timestep_range``; for a family, in place of
    ``loss_settings.timestep_range``) is a list of such ranges cycled over the optimizer steps: step ``s`` draws its
    timesteps from ``timestep_ranges[s % len]``, e.g. ``[(800, 1000), (800, 1000), (0, 800)]`` gives every third step
    to the low-noise timesteps where fine detail is decided. ``steps`` counts optimizer steps, each over ``gradient_accumulation_steps``
    micro-batches of ``min(batch_size, N)`` samples. A CPU generator seeded by ``seed`` draws
    batch order, timesteps and noise (LoRA dropout is seeded per chunk), so a call is
    exactly reproducible. A fresh AdamW is built per call (RAFT restarts it every stage).
    Mixed precision autocasts the forward with fp32 master weights: bf16 on CUDA and CPU, fp16 (with a
    ``GradScaler``: overflowing steps are skipped, see :func:`optimizer_step`) on CUDA only, ignored on CPU;
    ``optimizer_name`` is ``adamw`` or ``adamw8bit`` (bitsandbytes);
    gradient checkpointing applies whenever asked for (it only saves memory) and is switched off again.
    Trainable fp16/bf16 weights are upcast to fp32 first. The UNet is left in eval mode.

    A step's rows (its micro-batches one after another) are computed in chunks of ``chunk_rows`` rows (None:
    one chunk per micro-batch), one forward/backward pass each, and the chunks' gradients are added in chunk order
    (:func:`raft_diffusion.core.gradsum.summed_grads`). With ``dist`` over several processes every process draws
    the same rows, chunk ``i`` is computed by process ``i % world_size``, and every process adds all chunks in
    the same order, so on the same hardware and thread count the weights after every step are bitwise those of
    one process -- for LoRA and for full fine-tuning alike. ``chunk_rows`` itself changes the bits (other
    shapes, other kernels), so keep it when the process count changes; smaller chunks spread a step over more
    processes but cost one pass each (one CPU process: 1-row chunks made the tiny preset's training (batch 4) 1.9x
    slower and the toy world's (batch 8) 4.6x slower than one chunk per micro-batch; 2-row chunks 1.45x and 2.8x).

    With ``family`` (a :class:`raft_diffusion.diffusion.families.Family` other than SD 1.x/2.x) the denoiser is
    the family's (a UNet or a transformer), ``prompt_embeds`` is a ``PromptEmbeds`` with one row per latent,
    timesteps come from ``family.draw_timesteps`` and the per-sample loss from ``family.training_loss`` with
    ``loss_settings`` (the rectified-flow loss for SD3/FLUX; SDXL's denoising loss with its time ids); Min-SNR
    weights apply to the DDPM families (SDXL), and a dropped caption's row is ``empty_embeds``' one row. Without it:
    the SD 1.x/2.x loss above.

    ``sample_weights`` (``[N]``, one per latent; None = all 1) multiplies each row's loss by its sample's weight
    (on top of Min-SNR): a reward-weighted loss over the training set (``train.reward_weight_temperature``).

    Negative-aware loss (every family; ``ranking.negative_k``, ``train.negative_weight``, ``train.nft_beta``): with
    ``negative_latents`` ``[M, ...]`` and their ``negative_embeds``, or ``nft_beta`` != 1, let ``v_ref`` be the
    prediction of the trainable weights as they were when this call began (computed without gradient, LoRA dropout
    off) and ``v`` the trained one. A kept row's prediction becomes ``v_plus = (1 - beta) v_ref + beta v`` and a
    negative row's ``v_minus = (1 + beta) v_ref - beta v``; the step's loss is the mean over its kept rows of
    ``||v_plus - target||^2`` plus ``negative_weight`` x the mean over its negative rows of ``||v_minus -
    target||^2`` (per-row MSE and Min-SNR weights as above; ``sample_weights`` only on kept rows,
    ``negative_sample_weights`` (``[M]``, None = all 1; ``train.negative_advantage_scale``) only on negative rows). Minimising the
    second term moves ``v`` from ``v_ref`` by ``-(target - v_ref) / beta``: away from the negatives' targets, and
    bounded (a quadratic), unlike gradient ascent on their loss. Each step also draws ``min(batch_size, M)``
    negatives per micro-batch (their order, noise and timesteps from a second generator seeded by ``seed``, so the
    kept rows' draws are those of the plain loss). With ``family`` the prediction mixed is the family's (epsilon or v
    for SDXL, the flow velocity for SD3/FLUX, as DiffusionNFT mixes velocities), ``negative_embeds`` a ``PromptEmbeds``
    with one row per negative, the negatives' timesteps from ``family.draw_timesteps``, and the kept rows and the
    negatives have passes of their own. SD 1.x/2.x without ``chunk_rows``: a micro-batch's kept rows and its negatives
    share one pass (and one reference pass): the same loss as separate passes up to float rounding, about 15% less
    CPU on the toy world (60 steps of 8 + 8 rows: 14.5-15.9 CPU s against 17.0-18.7); with ``chunk_rows`` the
    negatives are computed in chunks after the kept rows'. At beta 1 ``v_plus`` is ``v`` and no reference pass is
    made for kept rows; with ``negative_weight`` 0 the weights then train as the plain loss (bit for bit with
    ``chunk_rows``). Cost per step: the negatives' forward and backward plus one forward of the reference on them
    (and on the kept rows when beta != 1).

    ``random_flip`` (``train.random_flip``) mirrors each row's latents left to right with probability 1/2, as
    diffusers' training scripts mirror their images (a latent mirrored decodes to the image mirrored, up to the
    VAE's own error; with ``family``, ``family.mirror``), kept rows and negatives alike: the model is not taught a
    one-sided feature its kept set happens to have. The coin is drawn per row from the row's generator after its
    other draws, and only when on.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    unet = family.denoiser(pipe) if family is not None else pipe.unet
    device = unet.device
    # 1. check inputs and what trains
    n = latents.shape[0]
    if n == 0 or len(prompt_embeds) != n:
        raise ValueError(f"need matching non-empty latents and prompt_embeds, got {n} and {len(prompt_embeds)}")
    check_loss_options("sd" if family is None else family.name, snr_gamma=snr_gamma)
    ddpm = family is None or family.name in DDPM_FAMILIES
    if steps < 0 or batch_size < 1 or gradient_accumulation_steps < 1:
        raise UserError(
            f"steps must be >= 0 and batch_size, gradient_accumulation_steps >= 1 (got {steps}, {batch_size}, {gradient_accumulation_steps})"
        )
    if sample_weights is not None:
        sample_weights = torch.as_tensor(sample_weights, dtype=torch.float32).flatten()
        if sample_weights.numel() != n or not bool(torch.isfinite(sample_weights).all() and (sample_weights >= 0).all()):
            raise ValueError(f"sample_weights must be {n} finite weights >= 0, one per latent (got {sample_weights.numel()})")
    nft = negative_latents is not None or nft_beta != 1.0
    if nft:
        if not nft_beta > 0 or not negative_weight >= 0:
            raise UserError(f"nft_beta must be > 0 and negative_weight >= 0 (got {nft_beta}, {negative_weight})")
        if negative_latents is not None and (
            negative_latents.shape[0] == 0 or negative_embeds is None or len(negative_embeds) != negative_latents.shape[0]
        ):
            raise ValueError("need matching non-empty negative_latents and negative_embeds")
    if negative_sample_weights is not None:
        negative_sample_weights = torch.as_tensor(negative_sample_weights, dtype=torch.float32).flatten()
        n_neg_rows = 0 if negative_latents is None else negative_latents.shape[0]
        if negative_sample_weights.numel() != n_neg_rows or not bool(
            torch.isfinite(negative_sample_weights).all() and (negative_sample_weights >= 0).all()
        ):
            raise ValueError(
                f"negative_sample_weights must be {n_neg_rows} finite weights >= 0, one per negative (got {negative_sample_weights.numel()})"
            )
    if chunk_rows is not None and chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1 or None (got {chunk_rows})")
    if not 0.0 <= empty_prompt_ratio < 1.0:
        raise UserError(f"empty_prompt_ratio must be in [0, 1) (got {empty_prompt_ratio}); 0.1 is a usual choice")
    if empty_prompt_ratio > 0 and empty_embeds is None:
        raise ValueError("empty_prompt_ratio > 0 needs empty_embeds (the empty prompt's text embedding)")
    if snr_gamma is not None and not snr_gamma > 0:
        raise UserError(f"snr_gamma must be > 0 or null (got {snr_gamma}); 5 is the usual choice")
    if timestep_range is not None:
        lo, hi = (int(v) for v in timestep_range)
        if not 0 <= lo < hi <= pipe.scheduler.config.num_train_timesteps:
            raise UserError(
                f"timestep_range must be [lo, hi] with 0 <= lo < hi <= {pipe.scheduler.config.num_train_timesteps} (got {list(timestep_range)})"
            )
    if timestep_ranges is not None:
        if timestep_range is not None:
            raise UserError("timestep_ranges replaces timestep_range: set one of them, the other to null")
        total = pipe.scheduler.config.num_train_timesteps
        if not timestep_ranges or not all(len(r) == 2 and 0 <= int(r[0]) < int(r[1]) <= total for r in timestep_ranges):
            raise UserError(f"timestep_ranges must be a non-empty list of [lo, hi] with 0 <= lo < hi <= {total} (got {timestep_ranges})")
    if mixed_precision not in _MIXED_PRECISION:
        raise UserError(f"unknown mixed_precision {mixed_precision!r}: choose one of {', '.join(_MIXED_PRECISION)}")
    params = trainable_parameters(unet)
    if not params:
        raise ValueError("the UNet has no trainable parameters: call add_lora or set_full_finetune first")
    if steps == 0:
        return {"loss_mean": float("nan"), "loss_last": float("nan"), "steps": 0, "lr_last": 0.0, "seconds": 0.0}
    for p in params:  # AdamW and grad scaling want fp32 master weights
        if p.dtype != torch.float32:
            p.data = p.data.float()
    amp_dtype = amp_dtype_for(mixed_precision, device)
    if mixed_precision != "no" and amp_dtype is None:
        logger.info("mixed_precision=%s ignored on %s: training in fp32", mixed_precision, device.type)
    if amp_dtype is None and unet.dtype in (torch.float16, torch.bfloat16):
        logger.warning("UNet weights are %s but mixed_precision=no: set mixed_precision to match", unet.dtype)

    # 2. noise schedule, optimizer, learning-rate schedule, loss scaler
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config) if ddpm else None
    t_lo, t_hi = timestep_range if timestep_range is not None else (0, pipe.scheduler.config.num_train_timesteps)
    optimizer = make_optimizer(optimizer_name, params, lr=learning_rate, betas=tuple(adam_betas), eps=adam_eps, weight_decay=weight_decay)
    schedule = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=lr_warmup_steps, num_training_steps=steps)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    model_dtype = torch.float32 if amp_dtype is not None else unet.dtype

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    micro = min(batch_size, n)
    step_rows = micro * gradient_accumulation_steps
    chunks = chunk_slices(step_rows, chunk_rows or micro)
    # the negative-aware loss: the negatives' own draws, and the trainable weights as they are now (the reference)
    n_neg = 0 if negative_latents is None else negative_latents.shape[0]
    neg_micro = min(batch_size, n_neg)
    neg_rows = neg_micro * gradient_accumulation_steps
    neg_chunks = chunk_slices(neg_rows, chunk_rows or neg_micro) if n_neg else []
    neg_gen = torch.Generator(device="cpu").manual_seed((int(seed) * 1_000_003 + 7_919) % 2**63)
    # the passes of a step, (kept chunk, negatives' chunk): without chunk_rows a micro-batch's kept rows and its
    # negatives share one pass (one forward and one reference pass instead of two each); with it, the negatives'
    # chunks come after the kept rows'
    if n_neg and chunk_rows is None and family is None:
        jobs = list(zip(range(len(chunks)), range(len(neg_chunks)), strict=True))
    else:
        jobs = [(i, None) for i in range(len(chunks))] + [(None, i) for i in range(len(neg_chunks))]
    reference = [p.detach().clone() for p in params] if nft else None
    # a family's kept rows, and after them the empty prompt's (row n) for caption dropout
    kept_embeds = prompt_embeds.concat(empty_embeds) if family is not None and empty_prompt_ratio > 0 else prompt_embeds

    def batches(count: int, take: int, generator: torch.Generator):
        """Row indices into ``count`` rows, ``take`` at a time, from a fresh permutation per epoch."""
        order = torch.empty(0, dtype=torch.long)

        def take_next() -> torch.Tensor:
            nonlocal order
            if order.numel() < take:
                order = torch.cat([order, torch.randperm(count, generator=generator)])
            idx, order = order[:take], order[take:]
            return idx

        return take_next

    next_batch = batches(n, micro, gen)
    next_negatives = batches(n_neg, neg_micro, neg_gen) if n_neg else None

    # a family's loss settings per step: timestep_ranges cycled over the steps in place of the settings' own range
    step_settings = (
        [replace(loss_settings, timestep_range=tuple(r)) for r in timestep_ranges] if family is not None and timestep_ranges else [loss_settings]
    )

    def sd_timesteps(step: int, count: int, generator: torch.Generator) -> torch.Tensor:
        """SD 1.x/2.x: uniform over the step's range (``timestep_ranges`` cycled, else ``timestep_range``)."""
        lo, hi = timestep_ranges[step % len(timestep_ranges)] if timestep_ranges else (t_lo, t_hi)
        return torch.randint(int(lo), int(hi), (count,), generator=generator)

    def draw_negatives(step: int) -> dict:
        """The step's negative rows (``neg_micro`` per micro-batch), from the negatives' generator."""
        draws = []
        for _ in range(gradient_accumulation_steps):
            idx = next_negatives()
            noise = torch.randn((neg_micro, *negative_latents.shape[1:]), generator=neg_gen)
            t = (
                sd_timesteps(step, neg_micro, neg_gen)
                if family is None
                else family.draw_timesteps(pipe, neg_micro, step_settings[step % len(step_settings)], neg_gen)[0]
            )
            draw = {"idx": idx, "noise": noise, "t": t}
            if random_flip:
                draw["flip"] = torch.rand(neg_micro, generator=neg_gen) < 0.5
            draws.append(draw)
        return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def mirrored(x0: torch.Tensor, part: dict) -> torch.Tensor:
        """``random_flip``: the rows whose coin came up mirrored left to right (the last axis)."""
        flip = part.get("flip")
        if flip is None or not flip.any():
            return x0
        flipped = x0.flip(-1) if family is None else family.mirror(pipe, x0).to(x0.dtype)
        return torch.where(flip.to(x0.device).view(-1, *[1] * (x0.dim() - 1)), flipped, x0)

    def in_reference(predict) -> torch.Tensor:
        """``predict()`` with the weights as they were when training began: swapped in, no gradient, dropout off."""
        current = [p.data for p in params]
        with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(unet)):
            unet.eval()
            try:
                for p, r in zip(params, reference):
                    p.data = r
                with autocast():
                    return predict().float()
            finally:
                for p, c in zip(params, current):
                    p.data = c
                unet.train()

    def reference_prediction(noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return in_reference(lambda: unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0])

    def draw_step(step: int) -> dict:
        """The step's rows (its micro-batches one after another): sample index, noise, timestep, caption drop."""
        draws = []
        for _ in range(gradient_accumulation_steps):
            idx = next_batch()
            noise = torch.randn((micro, *latents.shape[1:]), generator=gen)
            if family is None:
                t = sd_timesteps(step, micro, gen)
            else:  # SDXL: the same uniform draw; SD3/FLUX: the logit-normal (or other) density of the flow loss
                t, _ = family.draw_timesteps(pipe, micro, step_settings[step % len(step_settings)], gen)
            # drawn only when used, so runs without caption dropout keep their exact draws
            drop = torch.rand(micro, generator=gen) < empty_prompt_ratio if empty_prompt_ratio > 0 else None
            flip = torch.rand(micro, generator=gen) < 0.5 if random_flip else None
            draws.append({"idx": idx, "noise": noise, "t": t, "drop": drop, "flip": flip})
        return {k: None if draws[0][k] is None else torch.cat([d[k] for d in draws]) for k in draws[0]}

    def chunk_loss(rows: dict | None, neg: dict | None = None) -> torch.Tensor:
        """A chunk's share of the step's loss: its kept ``rows`` and its negatives' rows ``neg`` (either may be
        None) in one forward pass (and one reference pass), each row's (Min-SNR weighted) denoising loss summed,
        the kept rows' divided by the step's row count and the negatives' times ``negative_weight`` over theirs."""

        def share(per_sample: torch.Tensor, part: dict, negative: bool) -> torch.Tensor:
            """Some rows' summed loss as their share of the step's: kept rows (times their ``sample_weights``) over the
            step's row count, negatives (times their ``negative_sample_weights``) times ``negative_weight`` over theirs."""
            weights = negative_sample_weights if negative else sample_weights
            if weights is not None:
                per_sample = per_sample * weights[part["idx"]].to(per_sample.device)
            return per_sample.sum() * (negative_weight / neg_rows) if negative else per_sample.sum() / step_rows

        if family is not None:  # the family's loss, kept rows and negatives in passes of their own
            loss = 0.0
            for part, negative in ((rows, False), (neg, True)):
                if part is None:
                    continue
                data, embeds = (negative_latents, negative_embeds) if negative else (latents, kept_embeds)
                x0 = mirrored(data[part["idx"].to(data.device)], part)
                rows_of = part["idx"]
                if part.get("drop") is not None:  # caption dropout: the dropped rows take the empty prompt's row (n)
                    rows_of = torch.where(part["drop"], n, rows_of)
                mix = None
                if negative or nft_beta != 1.0:  # v_minus / v_plus with the reference's prediction
                    mix = ReferenceMix(torch.full((len(part["idx"]),), -nft_beta if negative else nft_beta), in_reference)
                with autocast():
                    per_sample = family.training_loss(
                        pipe, unet, x0, embeds, rows_of, noise=part["noise"], timesteps=part["t"], settings=loss_settings, mix=mix
                    )
                if snr_gamma is not None:
                    per_sample = per_sample * min_snr_weights(noise_scheduler, part["t"].to(device), snr_gamma)
                loss = loss + share(per_sample, part, negative)
            return loss

        def inputs(part: dict, negative: bool) -> tuple:
            noise, t, drop = part["noise"].to(device), part["t"].to(device), part.get("drop")
            data, embeds = (negative_latents, negative_embeds) if negative else (latents, prompt_embeds)
            x0 = mirrored(data[part["idx"].to(data.device)].to(device, torch.float32), part)
            cond = embeds[part["idx"].to(embeds.device)].to(device, model_dtype)
            if drop is not None and drop.any():
                cond = torch.where(drop.to(device).view(-1, 1, 1), empty_embeds.to(device, model_dtype), cond)
            return noise_scheduler.add_noise(x0, noise, t), t, cond, denoising_target(noise_scheduler, x0, noise, t)

        parts = [inputs(rows, False)] if rows is not None else []
        parts += [inputs(neg, True)] if neg is not None else []
        noisy, t, cond, target = (torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts))
        n_kept = 0 if rows is None else len(rows["idx"])
        # v_ref where it is used: the negatives' rows always, the kept rows' when beta != 1
        ref_from = 0 if nft_beta != 1.0 else n_kept
        ref = reference_prediction(noisy[ref_from:].to(model_dtype), t[ref_from:], cond[ref_from:]) if ref_from < len(t) else None
        with autocast():
            pred = unet(noisy.to(model_dtype), t, encoder_hidden_states=cond, return_dict=False)[0]
        pred = pred.float()
        if ref is not None:  # kept rows (1 - beta) v_ref + beta v, negatives' (1 + beta) v_ref - beta v: w = beta, -beta
            w = torch.full((len(ref),), -nft_beta)
            w[: n_kept - ref_from] = nft_beta
            mixed = blend(ref, pred[ref_from:], w)
            pred = torch.cat([pred[:ref_from], mixed]) if ref_from else mixed
        per_sample = F.mse_loss(pred, target.float(), reduction="none").flatten(1).mean(1)
        if snr_gamma is not None:
            per_sample = per_sample * min_snr_weights(noise_scheduler, t, snr_gamma)
        loss = per_sample.new_zeros(())
        if rows is not None:
            loss = loss + share(per_sample[:n_kept], rows, False)
        if neg is not None:
            loss = loss + share(per_sample[n_kept:], neg, True)
        return loss

    # 3. the loop
    checkpointing_was_on = bool(getattr(unet, "is_gradient_checkpointing", False))
    if gradient_checkpointing and not checkpointing_was_on:
        unet.enable_gradient_checkpointing()
    losses: list[float] = []
    skipped = 0
    start = time.perf_counter()
    unet.train()
    try:
        bar = tqdm(total=steps, desc=desc, disable=not progress)
        with torch.random.fork_rng(devices=_rng_devices(unet)), bar:
            for step in range(steps):
                draws = draw_step(step)
                neg_draws = draw_negatives(step) if n_neg else None

                def backward(i: int, step=step, draws=draws, neg_draws=neg_draws) -> float:  # chunk i: forward, backward, its share of the loss
                    torch.manual_seed(train_chunk_seed(seed, step, i))  # LoRA dropout masks: a function of the chunk
                    kept_i, neg_i = jobs[i]
                    rows = None if kept_i is None else {k: None if v is None else v[chunks[kept_i]] for k, v in draws.items()}
                    neg = None if neg_i is None else {k: v[neg_chunks[neg_i]] for k, v in neg_draws.items()}
                    loss = chunk_loss(rows, neg)
                    (scaler.scale(loss) if scaler else loss).backward()
                    return loss.item()

                step_loss = summed_grads(params, len(jobs), backward, dist)
                if not optimizer_step(optimizer, params, scaler, max_grad_norm):
                    skipped += 1  # fp16: inf/NaN gradients, the scaler lowered its scale and skipped the step
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if not math.isfinite(step_loss):
                    raise UserError(f"training loss became {step_loss} at step {len(losses) + 1}: lower the learning rate")
                losses.append(step_loss)
                bar.update()
                bar.set_postfix(loss=f"{step_loss:.4f}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        unet.eval()
        if gradient_checkpointing and not checkpointing_was_on:
            unet.disable_gradient_checkpointing()
    return {
        "loss_mean": sum(losses) / len(losses),
        "loss_last": losses[-1],
        "steps": len(losses),
        "lr_last": schedule.get_last_lr()[0],
        "seconds": time.perf_counter() - start,
        **({"steps_skipped": skipped} if scaler is not None else {}),
        **({"num_negative_rows": neg_rows} if n_neg else {}),
    }
