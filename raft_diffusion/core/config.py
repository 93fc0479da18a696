"""Run configuration: nested dataclasses, YAML presets, ``key=value`` overrides, one validation.

Every field carries a one-line ``help``. ``load_config(path, overrides)`` is the only entry point
the CLI needs; unknown keys fail with the nearest valid key suggested.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .ranking import MODES, check_diverse


def _f(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with a help line (mutable defaults go through a factory)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    pretrained: str = _f("runwayml/stable-diffusion-v1-5", "hub id or local folder of a StableDiffusionPipeline; 'tiny' builds a tiny test model")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    variant: str | None = _f(None, "weights variant to load, e.g. 'fp16'")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f("auto", "weights dtype for sampling: auto (fp16 on CUDA, fp32 on CPU), float32, float16, bfloat16")
    attention: str = _f("auto", "attention kernels: auto (xformers on CUDA when installed, else SDPA), sdpa, xformers")
    safety_checker: bool = _f(False, "run the pipeline's safety checker on samples")


@dataclass
class PromptsConfig:
    train: Any = _f("builtin:cifar10", "training prompts: a list, a text file (one per line) or builtin:cifar10 / builtin:simple_animals")
    eval: Any = _f(None, "held-out prompts (same forms); null = the training prompts")
    negative: str | None = _f(None, "negative prompt used for classifier-free guidance")
    per_stage: int | None = _f(None, "prompts drawn per stage (RAFT's b); null = all training prompts every stage")


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
    external_pool: str | None = _f(None, "JSONL manifest of {prompt, image[, seed]} from any generator; replaces sampling (implies offline)")


@dataclass
class RankingConfig:
    mode: str = _f("local", "local: best top_k per prompt; global: best top_ratio of the stage; threshold: reward >= threshold")
    top_k: int = _f(1, "samples kept per prompt in local mode")
    top_ratio: float = _f(0.125, "fraction of all samples kept in global mode")
    threshold: float = _f(0.0, "minimum ranking key kept in threshold mode")
    max_kept: int | None = _f(None, "after the mode's selection keep at most this many, best first")
    kl_beta: float = _f(0.0, "rank by r - beta*log(p/p_base) when the generator supplies the log-ratio (LLMs)")
    diversity_weight: float = _f(0.0, "local mode: pick each prompt's top_k greedily by reward + w * mean cosine distance (eval.clip_model image embeddings) to the picks so far, so the kept set is not near-copies of one mode; the pool then holds every sample of the stage until the pick; 0 = plain top_k (diffusion only)")
    novelty_weight: float = _f(0.0, "local mode: before the pick, add w * each sample's mean cosine distance (eval.clip_model image embeddings) to the other eligible samples of its prompt, so samples where the pool crowds gain less than equally good ones in sparse parts; counters the model collapsing onto one mode stage after stage; 0 = off (diffusion only)")
    prompt_match: int | None = _f(None, "keep a sample only if eval.clip_model, zero-shot, ranks its own prompt among the top N of the training prompts for the image (1 = its prompt must be the best match); an off-prompt image is then never kept however well it scores. Discarded samples are still scored and logged (extras 'prompt_rank', 'discarded'); null = off (diffusion only)")


@dataclass
class TrainConfig:
    method: str = _f("lora", "lora (peft adapter on the UNet attention) or full (every UNet weight)")
    lora_rank: int = _f(4, "LoRA rank r")
    lora_alpha: float = _f(4.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    target_modules: list = _f(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that receive LoRA")
    steps_per_stage: int = _f(80, "optimizer steps per stage")
    batch_size: int = _f(8, "kept samples per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    chunk_size: int | None = _f(None, "rows per forward/backward pass: a step's chunks are dealt over the processes and their gradients added in chunk order, so the weights are bitwise the same for any number of processes; null = train.batch_size (one chunk per micro-batch). Several processes need a chunk each: 1 spreads a step over up to batch_size x accumulation processes")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: str = _f("constant", "diffusers schedule name: constant, constant_with_warmup, cosine, linear, ...")
    lr_warmup_steps: int = _f(0, "warmup steps of the schedule")
    weight_decay: float = _f(1e-2, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (CUDA only)")
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    empty_prompt_ratio: float = _f(0.0, "share of kept samples trained on the empty prompt instead of theirs (caption dropout, as SD was trained): the change then reaches prompts not trained on")
    timestep_range: list | None = _f(None, "[lo, hi]: train on timesteps t ~ U[lo, hi) only (of the scheduler's 1000): high t (much noise) decides layout and colours, low t fine detail; null = every timestep")
    snr_gamma: float | None = _f(None, "Min-SNR-gamma loss weighting (5 is usual): weight each sample's loss by min(SNR, gamma)/SNR so the high-noise steps that set layout count more; null = plain MSE")


@dataclass
class EvalConfig:
    num_per_prompt: int = _f(4, "held-out samples per eval prompt (fixed seeds, the same every stage)")
    every: int = _f(1, "evaluate every N stages (the last stage always); 0 disables evaluation")
    guidance_scale: float | None = _f(None, "guidance scale of the held-out samples (the setting the model is used at); null = sampling.guidance_scale. A pool sampled at lower guidance than this keeps self-training from sharpening the model stage after stage")
    save_images: bool = _f(True, "write eval images into stages/<NNN>/eval/")
    clip_model: str | None = _f(None, "open_clip model for eval_clip_score and eval_diversity: a name (e.g. ViT-L-14-quickgelu), a folder written by reward_models.save_open_clip, hf-hub:org/repo, or tiny (random weights, smoke tests only); null skips both")
    clip_pretrained: str | None = _f("openai", "pretrained tag or checkpoint file of a named eval.clip_model (ignored for folders, hf-hub and tiny)")
    tensorboard: bool = _f(False, "also log every stage's metrics and an eval image grid to <run>/tensorboard (needs the tensorboard package)")
    wandb: bool = _f(False, "also log to Weights & Biases (needs wandb installed and logged in)")
    wandb_project: str = _f("raft-diffusion", "wandb project name")


@dataclass
class EarlyStopConfig:
    patience: int | None = _f(None, "stop when early_stop.metric has not improved for this many stages; null = no patience rule")
    metric: str = _f("eval_reward_mean", "metrics.jsonl key watched by patience and used to pick the best stage for final/")
    min_delta: float = _f(0.0, "an improvement must exceed this to reset patience")
    min_fidelity_ratio: float | None = _f(None, "stop when eval_clip_score falls below this fraction of the base model's (needs eval.clip_model); null = off")
    min_diversity_ratio: float | None = _f(None, "stop when eval_diversity falls below this fraction of the base model's (needs eval.clip_model); null = off")


@dataclass
class RaftConfig:
    seed: int = _f(0, "run seed: every sample's seed derives from it")
    num_stages: int = _f(10, "RAFT stages (sample, rank, fine-tune)")
    mode: str = _f("online", "online: sample from the current model each stage; offline: one pool from the base model")
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

    def __post_init__(self):
        fill_sections(self)

    @property
    def eval_guidance_scale(self) -> float:
        """The held-out samples' guidance: ``eval.guidance_scale``, else the pool's ``sampling.guidance_scale``."""
        return self.sampling.guidance_scale if self.eval.guidance_scale is None else self.eval.guidance_scale

    def validate(self) -> "RaftConfig":
        """Every cross-field rule in one place; raises ConfigError naming the key and the fix."""
        s, r, t = self.sampling, self.ranking, self.train

        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.num_stages >= 1, f"num_stages must be >= 1 (got {self.num_stages})")
        need(self.mode in ("online", "offline"), f"mode must be 'online' or 'offline' (got {self.mode!r})")
        need(s.num_per_prompt >= 1, f"sampling.num_per_prompt must be >= 1 (got {s.num_per_prompt})")
        need(s.batch_size >= 1, f"sampling.batch_size must be >= 1 (got {s.batch_size})")
        need(s.num_inference_steps >= 1, "sampling.num_inference_steps must be >= 1")
        need(r.mode in MODES, f"ranking.mode must be one of {', '.join(MODES)} (got {r.mode!r})")
        need(r.top_k >= 1, f"ranking.top_k must be >= 1 (got {r.top_k})")
        if r.mode == "local" and s.external_pool is None:
            need(
                r.top_k <= s.num_per_prompt,
                f"ranking.top_k={r.top_k} keeps more than the sampling.num_per_prompt={s.num_per_prompt} samples "
                "generated per prompt; lower ranking.top_k or raise sampling.num_per_prompt",
            )
        need(0 < r.top_ratio <= 1, f"ranking.top_ratio must be in (0, 1] (got {r.top_ratio})")
        need(r.max_kept is None or r.max_kept >= 1, "ranking.max_kept must be >= 1 or null")
        need(r.kl_beta >= 0, "ranking.kl_beta must be >= 0")
        need(r.diversity_weight >= 0, f"ranking.diversity_weight must be >= 0 (got {r.diversity_weight})")
        need(r.novelty_weight >= 0, f"ranking.novelty_weight must be >= 0 (got {r.novelty_weight})")
        for name in ("diversity_weight", "novelty_weight"):
            if getattr(r, name):
                check_diverse(r.mode, True)
                need(self.eval.clip_model is not None,
                     f"ranking.{name} needs eval.clip_model (the CLIP whose image embeddings it spreads the kept set in)")
        need(r.prompt_match is None or r.prompt_match >= 1,
             f"ranking.prompt_match must be an integer >= 1 or null (got {r.prompt_match!r})")
        need(r.prompt_match is None or self.eval.clip_model is not None,
             "ranking.prompt_match needs eval.clip_model (the CLIP that matches images to prompts)")
        need(t.method in ("lora", "full"), f"train.method must be 'lora' or 'full' (got {t.method!r})")
        need(t.lora_rank >= 1, "train.lora_rank must be >= 1")
        need(t.steps_per_stage >= 0, "train.steps_per_stage must be >= 0")
        need(t.batch_size >= 1 and t.gradient_accumulation_steps >= 1, "train.batch_size and train.gradient_accumulation_steps must be >= 1")
        need(t.chunk_size is None or (isinstance(t.chunk_size, int) and t.chunk_size >= 1),
             f"train.chunk_size must be an integer >= 1 or null (got {t.chunk_size!r})")
        need(t.learning_rate > 0, "train.learning_rate must be > 0")
        need(0 <= t.empty_prompt_ratio < 1, f"train.empty_prompt_ratio must be in [0, 1) (got {t.empty_prompt_ratio})")
        need(t.snr_gamma is None or t.snr_gamma > 0, f"train.snr_gamma must be > 0 or null (got {t.snr_gamma}); 5 is the usual choice")
        need(t.timestep_range is None or (isinstance(t.timestep_range, list) and len(t.timestep_range) == 2
                                          and all(isinstance(v, int) for v in t.timestep_range)
                                          and 0 <= t.timestep_range[0] < t.timestep_range[1]),
             f"train.timestep_range must be [lo, hi] with integers 0 <= lo < hi, or null (got {t.timestep_range})")
        need(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
        need(self.eval.num_per_prompt >= 1 and self.eval.every >= 0, "eval.num_per_prompt must be >= 1 and eval.every >= 0")
        need(self.prompts.per_stage is None or self.prompts.per_stage >= 1, "prompts.per_stage must be >= 1 or null")
        es = self.early_stop
        need(es.patience is None or es.patience >= 1, f"early_stop.patience must be >= 1 or null (got {es.patience})")
        need(es.min_delta >= 0, f"early_stop.min_delta must be >= 0 (got {es.min_delta})")
        need(es.metric.startswith("eval_"), f"early_stop.metric must be a held-out metric such as eval_reward_mean (got {es.metric!r})")
        for key in ("min_fidelity_ratio", "min_diversity_ratio"):
            ratio = getattr(es, key)
            need(ratio is None or 0 < ratio <= 1, f"early_stop.{key} must be in (0, 1] or null (got {ratio})")
            need(ratio is None or self.eval.clip_model is not None,
                 f"early_stop.{key} needs eval.clip_model (the CLIP that measures fidelity and diversity), e.g. eval.clip_model=ViT-L-14-quickgelu")
        need(self.eval.every >= 1 or (es.patience is None and es.min_fidelity_ratio is None and es.min_diversity_ratio is None),
             "early_stop needs held-out evaluation: set eval.every >= 1 or turn early_stop off")
        need(isinstance(self.reward, dict) and ("name" in self.reward or "mix" in self.reward),
             "reward must be a mapping with 'name' (e.g. reward.name=brightness) or 'mix'")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fill_sections(config) -> None:
    """Give every nested-section field left as None its section's defaults (for root config dataclasses)."""
    for f in dataclasses.fields(config):
        sub = _section_type(type(config), f.name)
        if sub is not None and getattr(config, f.name) is None:
            setattr(config, f.name, sub())


def _section_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    tp = hints[name]
    return tp if dataclasses.is_dataclass(tp) else None


def valid_keys(cls=None, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts."""
    cls = cls or RaftConfig
    out = []
    for f in dataclasses.fields(cls):
        sub = _section_type(cls, f.name)
        out.append(prefix + f.name)
        if sub is not None:
            out.extend(valid_keys(sub, prefix + f.name + "."))
    return out


def _unknown(key: str, root) -> ConfigError:
    keys = valid_keys(root)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # try matching the last component only
        leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
        near = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)]
    hint = f"; did you mean '{near[0]}'?" if near else "; run 'raft-diffusion config-help' to list valid keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _build(cls, data: dict, prefix: str = "", root=None):
    root = root or cls
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown(prefix + str(key), root)
        sub = _section_type(cls, key)
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, prefix + key + ".", root)
        else:
            kwargs[key] = _coerce(value, typing.get_type_hints(cls)[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - defensive
        raise ConfigError(f"bad config section '{prefix}': {e}") from None


def _coerce(value: Any, tp, key: str) -> Any:
    """Turn a YAML value into the field's scalar type (e.g. '1e-4' -> 1e-4); error on nonsense."""
    args = typing.get_args(tp)
    if value is None:
        if tp is Any or type(None) in args:
            return None
        raise ConfigError(f"{key} must not be null")
    scalar = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
    if scalar not in (int, float, bool, str):
        return value
    if scalar is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if scalar is str:
        return value if isinstance(value, str) else str(value)
    try:
        out = scalar(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be {'an integer' if scalar is int else 'a number'}, got {value!r}") from None
    if scalar is int and isinstance(value, float) and value != out:
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    return out


def _set_dotted(data: dict, dotted: str, value: Any, root) -> None:
    parts = dotted.split(".")
    node = data
    cls = root
    for i, part in enumerate(parts[:-1]):
        sub = _section_type(cls, part) if cls is not None and part in {f.name for f in dataclasses.fields(cls)} else None
        if cls is not None and sub is None and part not in {f.name for f in dataclasses.fields(cls)}:
            raise _unknown(".".join(parts[: i + 1]), root)
        if part not in node and cls is not None and sub is None:  # free-form mapping: start from its default
            default = next(f for f in dataclasses.fields(cls) if f.name == part)
            node[part] = default.default_factory() if default.default_factory is not dataclasses.MISSING else {}
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{'.'.join(parts[: i + 1])}' is not a mapping")
        cls = sub  # None below a free-form dict (e.g. reward.kwargs.x)
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=c`` strings to (key, YAML-parsed value) pairs."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. sampling.num_per_prompt=16)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    return out


def config_from_dict(data: dict | None, overrides: list[str] = (), cls=None):
    """Build and validate a config of class ``cls`` (default :class:`RaftConfig`) from a mapping + overrides."""
    cls = cls or RaftConfig
    data = dict(data or {})
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(data, key, value, cls)
    return _build(cls, data).validate()


def load_config(path: str | Path | None, overrides: list[str] = (), cls=None):
    """YAML preset (optional) + ``key=value`` overrides -> validated config."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (give a YAML preset, e.g. configs/tiny.yaml)")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(data, overrides, cls)


def dump_config(cfg: RaftConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def config_help(cls=None, prefix: str = "") -> list[str]:
    """``key (default): help`` lines for every field."""
    cls = cls or RaftConfig
    lines = []
    for f in dataclasses.fields(cls):
        sub = _section_type(cls, f.name)
        if sub is not None:
            lines.append(f"{prefix}{f.name}: {f.metadata.get('help', '')}")
            lines.extend(config_help(sub, prefix + f.name + "."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return lines


def add_align_arguments(parser, example: str) -> None:
    """The ``align`` command's arguments, shared by the diffusion and LLM CLIs (``example``: a preset path)."""
    from pathlib import Path

    parser.add_argument("--config", "-c", type=Path, help=f"YAML preset, e.g. {example}")
    parser.add_argument("--output-dir", "-o", type=Path, required=True, help="run directory (resumed if it exists)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides with dotted keys, e.g. sampling.num_per_prompt=16")
