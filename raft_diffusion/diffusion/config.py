"""Configuration of a diffusion RAFT run: the base config's sections extended with the model, the sampler,
LoRA/full fine-tuning of the UNet, held-out evaluation with CLIP fidelity and diversity.

``load_config(path, overrides)`` loads a YAML preset plus ``key=value`` overrides into a validated
:class:`RaftConfig`; ``raft-diffusion config-help`` lists every key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import config as core
from ..core.config import config_from_dict as _config_from_dict
from ..core.config import load_config as _load_config
from ..core.config import need
from ..core.config import option as _f
from ..core.errors import ConfigError
from ..core.lora_scale import LORA_SCALES_HELP, check_lora_scales
from ..core.ranking import check_diverse

# diffusers.optimization.SchedulerType's names (tests/test_core_config.py checks the list against diffusers)
# the model families (diffusion.families.registry; tests check these lists against it) and the flow-matching
# loss weightings of diffusers' SD3/FLUX scripts (diffusion.families.settings)
FAMILIES = {
    "sd": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
    "flux2": "Flux2Pipeline",
    "flux2-klein": "Flux2KleinPipeline",
    "qwen-image": "QwenImagePipeline",
    "z-image": "ZImagePipeline",
}
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
OPTIMIZERS = ("adamw", "adamw8bit")
OFFLOAD_MODES = ("auto", "none", "phases", "sequential")
# the names diffusion.pipeline takes (resolve_dtype, enable_attention; tests check them against it), checked at load
# because the pipeline reads them only after the reward and CLIPs (dtype) or the whole pipeline (attention) have loaded
DTYPES = ("auto", "fp32", "float32", "fp16", "float16", "half", "bf16", "bfloat16")
ATTENTION_MODES = ("auto", "xformers", "sdpa")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial", "piecewise_constant")


@dataclass
class ModelConfig:
    pretrained: str = _f(
        "runwayml/stable-diffusion-v1-5",
        "hub id or local folder of a StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline, Flux2Pipeline, Flux2KleinPipeline, QwenImagePipeline or ZImagePipeline; 'tiny' builds a tiny test model",
    )
    family: str | None = _f(
        None,
        "sd (SD 1.x/2.x), sdxl, sd3 (SD3/SD3.5), flux (FLUX.1), flux2 (FLUX.2 [dev]), flux2-klein (FLUX.2 [klein]), qwen-image (Qwen-Image) or z-image (Z-Image); null = read from the folder's model_index.json",
    )
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    variant: str | None = _f(None, "weights variant to load, e.g. 'fp16'")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f("auto", "weights dtype for sampling: auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    attention: str = _f("auto", "attention kernels: auto (xformers on CUDA when installed, else SDPA), sdpa, xformers")
    safety_checker: bool = _f(False, "run the pipeline's safety checker on samples")
    offload: str = _f(
        "auto",
        "what stays on the GPU between phases: none (everything), phases (the text encoders leave once the prompts are encoded, the reward and eval CLIP come only to score), sequential (as phases, and the denoiser leaves while the reward scores); auto = none on CPU, on CUDA the first that the memory planner says fits. Results are bitwise those of none",
    )
    vae_slicing: bool = _f(
        False,
        "decode one image at a time (less decode memory; the images can differ from batched decoding in the last float bits)",
    )
    max_memory: str | None = _f(
        None,
        "memory budget of the device, e.g. 24GB (10^9 bytes) or 22GiB: align refuses, before loading weights, a config the planner (raft-diffusion plan) says does not fit; null = the CUDA device's total memory (no check on CPU)",
    )
    allow_tf32: bool = _f(True, "TF32 matmuls and convolutions on CUDA GPUs that have them (Ampere and later); no effect on CPU")
    max_sequence_length: int | None = _f(
        None,
        "text tokens of the long text encoder (T5 for sd3 and flux, Mistral-3 for flux2, Qwen3 for flux2-klein and z-image, Qwen2.5-VL for qwen-image), passed to the pipeline's encode_prompt as max_sequence_length; SD3 without T5 appends this many zero tokens. null = the family's default (256 sd3, 512 flux, flux2, flux2-klein, qwen-image and z-image); not for sd and sdxl",
    )


@dataclass
class PromptsConfig(core.PromptsConfig):
    train: Any = _f(
        "builtin:cifar10",
        "training prompts: a list, a text file (one per line) or builtin:NAME (cifar10, simple_animals, parti, geneval, t2i-compbench; filters and a seeded subset as builtin:parti?category=animals&n=64&seed=0, see docs/prompt-sets.md)",
    )
    eval: Any = _f(
        None,
        "held-out prompts (same forms; the standard sets builtin:parti, builtin:geneval, builtin:t2i-compbench with ?category=...&n=...&seed=...); null = the training prompts",
    )
    negative: str | None = _f(None, "negative prompt used for classifier-free guidance")


@dataclass
class SamplingConfig:
    num_per_prompt: int = _f(8, "K: samples generated per prompt per stage")
    batch_size: int = _f(8, "images per generation batch (batches mix prompts)")
    num_inference_steps: int = _f(50, "denoising steps per sample")
    guidance_scale: float = _f(7.5, "classifier-free guidance scale (<= 1 disables guidance)")
    scheduler: str | None = _f(None, "scheduler class name, e.g. DPMSolverMultistepScheduler; null keeps the model's")
    height: int | None = _f(None, "image height in pixels; null = the model's default")
    width: int | None = _f(None, "image width in pixels; null = the model's default")
    eta: float = _f(0.0, "DDIM eta (0 = deterministic given the initial noise)")
    merge_lora: bool = _f(
        False,
        "add the LoRA into the denoiser's weights while sampling (pool and held-out images) and restore them bit for bit before training: the same model, each adapted layer run once instead of three times (the toy UNet samples ~20% faster on CPU); images equal the unmerged ones up to float rounding",
    )
    external_pool: str | None = _f(None, "JSONL manifest of {prompt, image[, seed]} from any generator; replaces sampling (implies offline)")
    prune_step: int | None = _f(
        None,
        "SD 1.x/2.x (DDIMScheduler, DDPMScheduler) and SD3 (FlowMatchEulerDiscreteScheduler): after this many of the pool's denoising steps, judge each prompt's samples by the image the scheduler predicts at that step, with the ranking's own rule (ranking.prompt_match, the reward, novelty_weight and diversity_weight), and finish only the best sampling.prune_keep; the others are discarded (samples.jsonl: pruned_at_step, provisional_reward; they are not scored again). null = every sample is finished",
    )
    prune_keep: int | None = _f(
        None, "with sampling.prune_step: samples per prompt finished (at least ranking.top_k + ranking.skip_top, fewer than num_per_prompt)"
    )


@dataclass
class RankingConfig(core.RankingConfig):
    kl_beta: float = _f(
        0.0,
        "rank by r - beta*log(p_theta/p_base), base = the LoRA at scale 0, the log-ratio estimated from the two models' denoising errors (ranking.kl_draws; docs/ranking-and-training.md); online LoRA runs; 0 = rank by reward",
    )
    diversity_weight: float = _f(
        0.0,
        "local mode: pick each prompt's top_k greedily by reward + w * mean cosine distance (eval.clip_model image embeddings) to the picks so far, so the kept set is not near-copies of one mode; the pool then holds every sample of the stage until the pick; 0 = plain top_k (diffusion only)",
    )
    novelty_weight: float = _f(
        0.0,
        "local mode: before the pick, add w * each sample's mean cosine distance (eval.clip_model image embeddings) to the other eligible samples of its prompt, so samples where the pool crowds gain less than equally good ones in sparse parts; counters the model collapsing onto one mode stage after stage; 0 = off (diffusion only)",
    )
    negative_k: int = _f(
        0,
        "local mode, online runs: also hand the m worst samples of each prompt's pool (by reward, never a kept, discarded or unscored one) to fine-tuning as negatives, which train.negative_weight's negative-aware loss pushes the model away from; 0 = off",
    )
    kl_draws: int = _f(
        4,
        "with ranking.kl_beta > 0: noise draws per sample for its log p_theta/p_base, estimated as -(T/2) * the sum over latent elements of the difference between the LoRA's and the base's denoising errors at the same draws (T the scheduler's training timesteps; the base is the LoRA at scale 0); more draws, less noise in the estimate, two denoiser passes each",
    )
    prompt_match: int | None = _f(
        None,
        "keep a sample only if eval.clip_model, zero-shot, ranks its own prompt among the top N of the training prompts for the image (1 = its prompt must be the best match); an off-prompt image is then never kept however well it scores. Discarded samples are still scored and logged (extras 'prompt_rank', 'discarded'); null = off (diffusion only)",
    )


@dataclass
class TrainConfig:
    method: str = _f(
        "lora",
        "lora (a peft adapter on the denoiser's train.target_modules: the UNet's or the transformer's attention by default) or full (every denoiser weight)",
    )
    lora_rank: int = _f(4, "LoRA rank r")
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    target_modules: list | None = _f(
        None,
        "denoiser modules that receive LoRA; null = the family's default, as diffusers' LoRA scripts train it (SD/SDXL: to_q, to_k, to_v, to_out.0; SD3: the joint attention's projections; FLUX: those and the feed-forward layers), written into the run's config.yaml",
    )
    steps_per_stage: int = _f(80, "optimizer steps per stage")
    batch_size: int = _f(8, "kept samples per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    chunk_size: int | None = _f(
        None,
        "rows per forward/backward pass: a step's chunks are dealt over the processes and their gradients added in chunk order, so the weights are bitwise the same for any number of processes; null = train.batch_size (one chunk per micro-batch). Several processes need a chunk each: 1 spreads a step over up to batch_size x accumulation processes",
    )
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    stage_lr_decay: float | None = _f(
        None,
        "multiply the learning rate by this factor from one stage to the next (stage s trains at learning_rate x decay^(s-1), within the stage on train.lr_scheduler): fast early stages, gentler late ones that refine rather than drift; null = the same learning rate every stage",
    )
    lr_scheduler: str = _f("constant", "diffusers schedule name: constant, constant_with_warmup, cosine, linear, ...")
    lr_warmup_steps: int = _f(0, "warmup steps of the schedule")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str = _f(
        "no",
        "no, fp16 or bf16: autocast for the training forward with fp32 LoRA (master) weights; fp16 adds loss scaling (GradScaler) and is CUDA only, bf16 also runs on CPU",
    )
    optimizer: str = _f(
        "adamw",
        "adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: 2 instead of 8 bytes of state per trained weight, for train.method=full; pip install 'raft-diffusion[bnb]', CUDA)",
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    empty_prompt_ratio: float = _f(
        0.0,
        'share of kept samples trained on the empty prompt instead of theirs (caption dropout, as SD was trained; every family, with its unconditional prompt: "", Qwen-Image\'s " "): the change then reaches prompts not trained on',
    )
    random_flip: bool = _f(
        False,
        "mirror each training row's latents left to right with probability 1/2 (kept samples and negatives), as diffusers' training scripts' --random_flip does to images: the model is not taught a one-sided feature its kept set happens to have; leave off for prompts that say left or right",
    )
    timestep_range: list | None = _f(
        None,
        "[lo, hi]: train on timesteps t ~ U[lo, hi) only (of the scheduler's 1000): high t (much noise) decides layout and colours, low t fine detail; null = every timestep",
    )
    timestep_ranges: list | None = _f(
        None,
        "instead of timestep_range: a list of [lo, hi] cycled over the optimizer steps (step s draws from entry s mod n; the flow families lay their timestep density over each), e.g. [[800, 1000], [800, 1000], [0, 800]]: a third of the steps on the low-noise timesteps that decide fine detail; null = off",
    )
    timestep_ranges_from_stage: int | None = _f(
        None,
        "with train.timestep_ranges: use them only from this stage on, the stages before it training on train.timestep_range (which may then be set too), e.g. a low-noise share only in late stages; null = timestep_ranges in every stage",
    )
    weighting_scheme: str = _f(
        "logit_normal",
        "SD3/FLUX: timestep density and loss weighting of the rectified-flow loss (diffusers' names: logit_normal, mode, cosmap, sigma_sqrt, none)",
    )
    logit_mean: float = _f(0.0, "SD3/FLUX, logit_normal: mean of logit(u) of the drawn timesteps")
    logit_std: float = _f(1.0, "SD3/FLUX, logit_normal: std of logit(u) of the drawn timesteps")
    mode_scale: float = _f(1.29, "SD3/FLUX, mode: how strongly the density favours the middle timesteps")
    flux_guidance: float = _f(3.5, "FLUX.1-dev and FLUX.2 [dev]: the distilled guidance value fed to the guidance embedding while training")
    snr_gamma: float | None = _f(
        None,
        "Min-SNR-gamma loss weighting (5 is usual): weight each sample's loss by min(SNR, gamma)/SNR so the high-noise steps that set layout count more; null = plain MSE",
    )
    reward_weight_temperature: float | None = _f(
        None,
        "reward-weighted loss over the training set: each sample's loss weighted by exp((r - best r of its prompt in the set) / T), the weights scaled to average 1, so keeping more per prompt (ranking.top_k) lets the better ones count more; null = equal weights (plain RAFT)",
    )
    reward_weight_key: str = _f(
        "reward",
        "what train.reward_weight_temperature's weights, and train.advantage_weights' standard scores of the kept samples, follow: reward (the raw reward) or selection (the key the pick ranked by: the reward raised by ranking.novelty_weight's term, so the weights do not undo it, its standard score taken among its pool's keys; samples without one, e.g. replayed, use their reward; negatives always their reward)",
    )
    negative_weight: float = _f(
        1.0,
        "with ranking.negative_k > 0: lambda of the negative-aware loss, mean ||v_plus - target||^2 over the kept samples + lambda * mean ||v_minus - target||^2 over the negatives, v_minus = (1 + nft_beta) v_ref - nft_beta v_theta with v_ref the prediction of the model as it was when the stage's training began",
    )
    negative_advantage_scale: float | None = _f(
        None,
        "with ranking.negative_k > 0: weight each negative's loss by max(0, m - r) / scale, r its reward and m the mean reward of its prompt's pool (scored, not discarded samples), so the push fades as the pool's worst come close to its mean (a negative scale reward units below it weighs 1); null = every negative weighs 1",
    )
    advantage_weights: bool = _f(
        False,
        "with ranking.negative_k > 0: weight each kept sample's loss by max(0, z) and each negative's by max(0, -z), z = (r - m) / s its reward's standard score within its prompt's pool (mean m, standard deviation s of the scored, not discarded samples), as DDPO and GRPO normalise advantages: the targets are centred on the pool's mean and keep their scale as the pool narrows; instead of train.reward_weight_temperature and train.negative_advantage_scale",
    )
    nft_beta: float = _f(
        1.0,
        "negative-aware loss (every family; the prediction is epsilon, v or, for SD3/FLUX, the flow velocity): the kept samples train v_plus = (1 - beta) v_ref + beta v_theta, the negatives v_minus = (1 + beta) v_ref - beta v_theta, v_ref the stage-start model's prediction (no gradient); 1 with ranking.negative_k 0 = the plain loss",
    )


@dataclass
class EvalConfig:
    num_per_prompt: int = _f(4, "held-out samples per eval prompt (fixed seeds, the same every stage)")
    every: int = _f(1, "evaluate every N stages (the last stage always); 0 disables evaluation")
    fallback: bool = _f(
        True,
        "with every > 1: when an early-stop floor fires, evaluate the stages trained since the evaluation before (newest first, until one passes the floors) so final/ can fall back to them, not only to evaluated stages",
    )
    screen_per_prompt: int = _f(
        0,
        "with every > 1: screen each stage that is not evaluated on the first N held-out seeds of each eval prompt (seeds a full evaluation uses; screen_reward_mean and screen_reward_std in metrics.jsonl, screen.jsonl in the stage folder), with an estimate of the full evaluation's mean paired with the base's evaluation at those seeds (screen_reward_estimate, screen_reward_se); with early_stop.target_rise_sd a stage whose estimate comes within early_stop.screen_band_se standard errors of the target is evaluated in full at once; 0 = off",
    )
    guidance_scale: float | None = _f(
        None,
        "guidance scale of the held-out samples (the setting the model is used at); null = sampling.guidance_scale. A pool sampled at lower guidance than this keeps self-training from sharpening the model stage after stage",
    )
    num_inference_steps: int | None = _f(
        None, "denoising steps of the held-out samples; null = sampling.num_inference_steps (a pool may use fewer steps than the model is judged at)"
    )
    save_images: bool = _f(True, "write eval images into stages/<NNN>/eval/")
    clip_model: str | None = _f(
        None,
        "open_clip model for eval_clip_score and eval_diversity: a name (e.g. ViT-L-14-quickgelu), a folder written by reward_models.save_open_clip, hf-hub:org/repo, or tiny (random weights, smoke tests only); null skips both",
    )
    clip_pretrained: str | None = _f("openai", "pretrained tag or checkpoint file of a named eval.clip_model (ignored for folders, hf-hub and tiny)")
    tensorboard: bool = _f(False, "also log every stage's metrics and an eval image grid to <run>/tensorboard (needs the tensorboard package)")
    wandb: bool = _f(False, "also log to Weights & Biases (needs wandb installed and logged in)")
    wandb_project: str = _f("raft-diffusion", "wandb project name")


@dataclass
class EarlyStopConfig(core.EarlyStopConfig):
    lora_scales: list | None = _f(None, LORA_SCALES_HELP)
    min_fidelity_ratio: float | None = _f(
        None, "stop when eval_clip_score falls below this fraction of the base model's (needs eval.clip_model); null = off"
    )
    min_diversity_ratio: float | None = _f(
        None, "stop when eval_diversity falls below this fraction of the base model's (needs eval.clip_model); null = off"
    )


@dataclass
class RaftConfig(core.BaseConfig):
    model: ModelConfig = _f(None, "base model")
    prompts: PromptsConfig = _f(None, "prompt sets")
    sampling: SamplingConfig = _f(None, "pool generation")
    reward: dict = _f({"name": "brightness"}, "reward: {name: NAME, kwargs: {...}} or {mix: [...], normalize: ...}")
    ranking: RankingConfig = _f(None, "what is kept")
    train: TrainConfig = _f(None, "fine-tuning on the kept samples")
    eval: EvalConfig = _f(None, "held-out evaluation")
    early_stop: EarlyStopConfig = _f(None, "opt-in guard against over-optimisation: stop early, keep the best stage as final/")
    save_kept_images: bool = _f(True, "write kept images as PNG next to samples.jsonl")
    progress: bool = _f(True, "show progress bars")

    @property
    def eval_guidance_scale(self) -> float:
        """The held-out samples' guidance: ``eval.guidance_scale``, else the pool's ``sampling.guidance_scale``."""
        return self.sampling.guidance_scale if self.eval.guidance_scale is None else self.eval.guidance_scale

    @property
    def eval_num_inference_steps(self) -> int:
        """The held-out samples' denoising steps: ``eval.num_inference_steps``, else the pool's."""
        e = self.eval.num_inference_steps
        return self.sampling.num_inference_steps if e is None else e

    def preflight(self):
        """The shared checks, and a model folder that does not exist (before the reward and CLIPs load)."""
        name = str(self.model.pretrained)
        if name.startswith((".", "~", "/")) or name.count("/") > 1:  # a path, not 'tiny' or a hub id
            folder = Path(name).expanduser()
            need(
                folder.is_dir(),
                f"model folder {name!r} does not exist: pass a diffusers pipeline folder "
                "(one saved with save_pretrained, containing model_index.json) or a hub id like owner/name",
            )
        return super().preflight()

    def load_prompt_sets(self):
        from .prompts import load_prompts

        train = None if self.sampling.external_pool else load_prompts(self.prompts.train, "prompts.train")
        held_out = self.prompts.eval if self.prompts.eval is not None else self.prompts.train
        if held_out == self.prompts.train and train is not None:
            return train, train
        return train, load_prompts(held_out, "prompts.eval")

    def floor_settings(self):
        es = self.early_stop
        return [
            ("min_fidelity_ratio", "eval_clip_score", "prompt fidelity", es.min_fidelity_ratio),
            ("min_diversity_ratio", "eval_diversity", "diversity", es.min_diversity_ratio),
        ]

    def check(self) -> None:
        """The diffusion rules (the shared ones are in :meth:`BaseConfig.validate`)."""
        check_lora_scales(self, need)
        s, r, t = self.sampling, self.ranking, self.train
        n = self.model.max_sequence_length
        need(n is None or (isinstance(n, int) and 1 <= n <= 512), f"model.max_sequence_length must be an integer in 1..512 or null (got {n!r})")
        need(
            n is None or self.model.family not in ("sd", "sdxl"),
            f"model.max_sequence_length applies to sd3, flux, flux2, flux2-klein, qwen-image and z-image (their T5/Qwen tokens); {self.model.family} has none: set it to null",
        )
        need(s.num_inference_steps >= 1, "sampling.num_inference_steps must be >= 1")
        need(0 <= s.eta <= 1, f"sampling.eta must be in [0, 1] (got {s.eta}): 0 is deterministic DDIM, 1 as DDPM")
        need(self.eval_num_inference_steps >= 1, "eval.num_inference_steps must be >= 1 (or null: the pool's)")
        for side in ("height", "width"):
            v = getattr(s, side)
            need(
                v is None or v <= 8192,
                f"sampling.{side}={v} is beyond any supported model (SD 1.x draws at 512, SDXL/SD3/FLUX at 1024; a "
                f"latent batch that large cannot be allocated): use at most 8192, usually the model's own size",
            )
            need(
                v is None or (v >= 8 and v % 8 == 0),
                f"sampling.{side} must be a multiple of 8 (the VAE works on 8x8 pixel blocks) or null for the model's "
                f"default (got {v}); e.g. sampling.{side}={max(8, round((v or 0) / 8) * 8)}",
            )
        if s.prune_step is not None or s.prune_keep is not None:
            need(
                s.prune_step is not None and s.prune_keep is not None,
                "sampling.prune_step and sampling.prune_keep go together: set both (e.g. prune_step=10 prune_keep=8) or neither",
            )
            need(
                isinstance(s.prune_step, int) and 1 <= s.prune_step < s.num_inference_steps,
                f"sampling.prune_step must be an integer in 1..{s.num_inference_steps - 1} (sampling.num_inference_steps - 1), got {s.prune_step!r}",
            )
            low = r.top_k + r.skip_top if r.mode == "local" else 1
            need(
                isinstance(s.prune_keep, int) and low <= s.prune_keep < s.num_per_prompt,
                f"sampling.prune_keep must be an integer from {low} ({('ranking.top_k + ranking.skip_top' if r.skip_top else 'ranking.top_k') if r.mode == 'local' else 'one'}) to "
                f"{s.num_per_prompt - 1} (fewer than sampling.num_per_prompt, or nothing is pruned), got {s.prune_keep!r}",
            )
            need(
                s.external_pool is None,
                "sampling.prune_step prunes samples while they are drawn; an external pool is drawn already: set sampling.prune_step=null",
            )
        need(isinstance(r.kl_draws, int) and r.kl_draws >= 1, f"ranking.kl_draws must be an integer >= 1 (got {r.kl_draws!r})")
        need(
            not r.kl_beta or t.method == "lora",
            "ranking.kl_beta measures each sample against the base model, which is the LoRA switched off: it needs train.method=lora; set ranking.kl_beta=0",
        )
        need(r.diversity_weight >= 0, f"ranking.diversity_weight must be >= 0 (got {r.diversity_weight})")
        need(r.novelty_weight >= 0, f"ranking.novelty_weight must be >= 0 (got {r.novelty_weight})")
        for name in ("diversity_weight", "novelty_weight"):
            if getattr(r, name):
                check_diverse(r.mode, True)
                need(
                    self.eval.clip_model is not None,
                    f"ranking.{name} needs eval.clip_model (the CLIP whose image embeddings it spreads the kept set in)",
                )
        need(
            isinstance(r.negative_k, int) and r.negative_k >= 0,
            f"ranking.negative_k must be an integer >= 0 (got {r.negative_k!r})",
        )
        need(
            not r.negative_k or (r.mode == "local" and self.mode == "online" and s.external_pool is None),
            "ranking.negative_k picks the worst samples of each prompt's own pool: it needs ranking.mode=local and an online run (mode=online, no sampling.external_pool); set ranking.negative_k=0",
        )
        need(
            t.negative_weight >= 0,
            f"train.negative_weight must be >= 0 (got {t.negative_weight}); 1 weighs the negatives' mean loss as the kept ones'",
        )
        need(
            t.reward_weight_key in ("reward", "selection"),
            f"train.reward_weight_key must be reward or selection (got {t.reward_weight_key!r})",
        )
        need(
            t.negative_advantage_scale is None or (t.negative_advantage_scale > 0 and r.negative_k > 0),
            f"train.negative_advantage_scale must be > 0 and needs ranking.negative_k > 0, or null (got {t.negative_advantage_scale}, negative_k {r.negative_k})",
        )
        need(
            not t.advantage_weights or (r.negative_k > 0 and not r.replay_top_k),
            f"train.advantage_weights needs ranking.negative_k > 0 and ranking.replay_top_k 0 (got negative_k {r.negative_k}, replay_top_k {r.replay_top_k}): the weights are standard scores within this stage's pools",
        )
        need(
            not t.advantage_weights or (t.reward_weight_temperature is None and t.negative_advantage_scale is None),
            "train.advantage_weights replaces train.reward_weight_temperature and train.negative_advantage_scale: set those to null",
        )
        need(t.nft_beta > 0, f"train.nft_beta must be > 0 (got {t.nft_beta}); 1 trains the kept samples with the plain loss")
        need(r.prompt_match is None or r.prompt_match >= 1, f"ranking.prompt_match must be an integer >= 1 or null (got {r.prompt_match!r})")
        need(
            r.prompt_match is None or self.eval.clip_model is not None,
            "ranking.prompt_match needs eval.clip_model (the CLIP that matches images to prompts)",
        )
        need(t.method in ("lora", "full"), f"train.method must be 'lora' or 'full' (got {t.method!r})")
        need(t.lora_rank >= 1, "train.lora_rank must be >= 1")
        need(t.lora_alpha > 0, f"train.lora_alpha must be > 0 (got {t.lora_alpha}): the LoRA's scale is alpha / rank")
        need(t.weight_decay >= 0, f"train.weight_decay must be >= 0 (got {t.weight_decay}); 0 turns it off")
        need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0 (got {t.max_grad_norm}); 0 turns clipping off")
        need(0 <= t.lora_dropout < 1, f"train.lora_dropout must be in [0, 1) (got {t.lora_dropout})")
        need(t.lr_scheduler in LR_SCHEDULERS, f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)} (got {t.lr_scheduler!r})")
        need(t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0 (got {t.lr_warmup_steps})")
        need(
            t.target_modules is None
            or (isinstance(t.target_modules, list) and t.target_modules and all(isinstance(m, str) and m for m in t.target_modules)),
            f"train.target_modules must be a module name, a list of them (e.g. [to_q, to_k, to_v, to_out.0]) or null "
            f"for the family's default (got {t.target_modules!r})",
        )
        m = self.model
        need(
            m.family is None or m.family in FAMILIES or m.family in FAMILIES.values(),
            f"model.family must be one of {', '.join(FAMILIES)} or null to read it from the model (got {m.family!r})",
        )
        need(
            t.weighting_scheme in WEIGHTING_SCHEMES,
            f"train.weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)} (got {t.weighting_scheme!r})",
        )
        need(t.logit_std > 0, f"train.logit_std must be > 0 (got {t.logit_std}); 1.0 is the usual choice")
        need(t.steps_per_stage >= 0, "train.steps_per_stage must be >= 0")
        need(t.batch_size >= 1 and t.gradient_accumulation_steps >= 1, "train.batch_size and train.gradient_accumulation_steps must be >= 1")
        need(
            t.chunk_size is None or (isinstance(t.chunk_size, int) and t.chunk_size >= 1),
            f"train.chunk_size must be an integer >= 1 or null (got {t.chunk_size!r})",
        )
        need(t.learning_rate > 0, "train.learning_rate must be > 0")
        need(
            t.stage_lr_decay is None or 0 < t.stage_lr_decay <= 1,
            f"train.stage_lr_decay must be in (0, 1] or null (got {t.stage_lr_decay}); 0.8 trains stage 3 at 0.64 x train.learning_rate",
        )
        need(0 <= t.empty_prompt_ratio < 1, f"train.empty_prompt_ratio must be in [0, 1) (got {t.empty_prompt_ratio})")
        need(
            t.reward_weight_temperature is None or t.reward_weight_temperature > 0,
            f"train.reward_weight_temperature must be > 0 or null (got {t.reward_weight_temperature}); 0.5 weighs a sample half a reward unit below its prompt's best at 1/e",
        )
        need(t.snr_gamma is None or t.snr_gamma > 0, f"train.snr_gamma must be > 0 or null (got {t.snr_gamma}); 5 is the usual choice")
        need(
            t.timestep_range is None
            or (
                isinstance(t.timestep_range, list)
                and len(t.timestep_range) == 2
                and all(isinstance(v, int) for v in t.timestep_range)
                and 0 <= t.timestep_range[0] < t.timestep_range[1]
            ),
            f"train.timestep_range must be [lo, hi] with integers 0 <= lo < hi, or null (got {t.timestep_range})",
        )
        need(
            t.timestep_ranges is None
            or (
                (t.timestep_range is None or t.timestep_ranges_from_stage is not None)
                and isinstance(t.timestep_ranges, list)
                and len(t.timestep_ranges) > 0
                and all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) for v in r) and 0 <= r[0] < r[1] for r in t.timestep_ranges)
            ),
            f"train.timestep_ranges must be a non-empty list of [lo, hi] with integers 0 <= lo < hi, with train.timestep_range null "
            f"(got {t.timestep_ranges}) unless train.timestep_ranges_from_stage is set",
        )
        need(
            t.timestep_ranges_from_stage is None
            or (isinstance(t.timestep_ranges_from_stage, int) and t.timestep_ranges_from_stage >= 1 and t.timestep_ranges is not None),
            f"train.timestep_ranges_from_stage must be an integer >= 1 with train.timestep_ranges set, or null (got {t.timestep_ranges_from_stage!r})",
        )
        need(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
        need(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {t.optimizer!r})")
        if t.optimizer == "adamw8bit":
            import importlib.util

            need(
                importlib.util.find_spec("bitsandbytes") is not None,
                "train.optimizer=adamw8bit needs bitsandbytes: pip install 'raft-diffusion[bnb]' (CUDA), or set train.optimizer=adamw",
            )
        need(m.offload in OFFLOAD_MODES, f"model.offload must be one of {', '.join(OFFLOAD_MODES)} (got {m.offload!r})")
        need(m.dtype in DTYPES, f"model.dtype must be one of auto, fp32, fp16 or bf16 (got {m.dtype!r})")
        need(
            m.device != "cpu" or m.dtype not in ("fp16", "float16", "half"),
            "model.dtype fp16 is not supported on CPU: use model.dtype=fp32 (or auto) on CPU, or run on a GPU",
        )
        need(m.attention in ATTENTION_MODES, f"model.attention must be one of {', '.join(ATTENTION_MODES)} (got {m.attention!r})")
        if m.max_memory is not None:
            parse_size(m.max_memory)
        for key, _, _, ratio in self.floor_settings():
            need(
                ratio is None or self.eval.clip_model is not None,
                f"early_stop.{key} needs eval.clip_model (the CLIP that measures fidelity and diversity), e.g. eval.clip_model=ViT-L-14-quickgelu",
            )


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text) -> int:
    """``"24GB"`` (10^9 bytes, as accelerate's ``max_memory``), ``"24GiB"`` (2^30), ``"512MB"``, or bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 2**20:
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise ConfigError(f"memory size {text!r} (model.max_memory, --gpu-memory) not understood: write it like 24GB, 22.5GiB or 512MB")
    if not m.group(2) and float(m.group(1)) < 2**20:  # "24": surely not 24 bytes
        raise ConfigError(f"memory size {text!r} (model.max_memory, --gpu-memory) has no unit: write {m.group(1)}GB or {m.group(1)}GiB")
    unit = (m.group(2) or "").upper()
    unit = unit if unit.endswith("B") or not unit else unit + "B"
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory size {text!r} (model.max_memory, --gpu-memory) must be more than 0: write it like 24GB")
    return size


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RaftConfig:
    """A YAML preset (optional) + ``key=value`` overrides -> a validated :class:`RaftConfig`."""
    return _load_config(path, overrides, cls=RaftConfig)


def config_from_dict(data: dict | None, overrides: list[str] = ()) -> RaftConfig:
    """A mapping + ``key=value`` overrides -> a validated :class:`RaftConfig`."""
    return _config_from_dict(data, overrides, cls=RaftConfig)


core.register_kind(RaftConfig, "an image (diffusion)", "raft-diffusion align", "raft-diffusion gallery {run}")
