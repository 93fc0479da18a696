"""Configuration of an LLM RAFT run: dataclasses with one help line per field, validated in one place.

Loaded with the core's loader (YAML preset + ``key=value`` overrides):
``load_config(path, overrides, cls=LLMConfig)``; :class:`LLMConfig` extends the core's base config. The stage loop reads the same paths as for
diffusion: seed, num_stages, mode, progress, prompts.per_stage, sampling.num_per_prompt,
sampling.external_pool, ranking.*, eval.every.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..core import config as core
from ..core.config import need
from ..core.config import option as _f
from ..core.errors import ConfigError
from ..core.lora_scale import LORA_SCALES_HELP, check_lora_scales

# transformers.SchedulerType's names (tests/test_llm_units.py checks the list against transformers)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)


@dataclass
class LLMModelConfig:
    pretrained: str = _f("toy", "hub id or local folder of a transformers causal LM; 'toy' = the committed toy sentiment LM")
    revision: str | None = _f(None, "hub revision (branch, tag or commit)")
    tokenizer: str | None = _f(None, "tokenizer hub id or folder; null = the model's")
    device: str = _f("auto", "'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: str = _f("auto", "weights dtype: auto (bf16 on CUDA when supported, else fp32), float32, float16, bfloat16")
    pad_token: str | None = _f(None, "token used for padding when the tokenizer has none; null = its eos token")
    num_threads: int | None = _f(None, "torch CPU threads (null = torch's default; 1 is fastest on a busy shared machine)")


@dataclass
class LLMPromptsConfig(core.PromptsConfig):
    train: object = _f("builtin:toy_train", "training prompts: a list, a text file (one per line) or builtin:toy_train / builtin:toy_eval")
    eval: object = _f("builtin:toy_eval", "held-out prompts (same forms); null = the training prompts")
    per_stage: int | None = _f(None, "prompts drawn per stage (RAFT's b); null = all training prompts every stage")


@dataclass
class LLMSamplingConfig:
    num_per_prompt: int = _f(8, "K: completions generated per prompt per stage")
    batch_size: int = _f(64, "sequences per generation batch (batches mix prompts; left padding) and per no-grad log-prob pass (KL key, eval)")
    max_new_tokens: int = _f(32, "completion length limit in tokens")
    temperature: float = _f(1.0, "sampling temperature (0 = greedy); the paper found > 1.0 produced garbage")
    top_p: float = _f(1.0, "nucleus sampling: keep the smallest token set with this probability mass (1 = off)")
    top_k: int = _f(0, "keep only the k most likely tokens (0 = off)")
    stop_strings: list = _f([], "end a completion at the first of these strings (the string itself is cut from the text)")
    chat_template: str = _f("auto", "auto: wrap prompts in the tokenizer's chat template when it has one; always; never")
    system_prompt: str | None = _f(None, "system message put before each prompt when the chat template is used")
    external_pool: str | None = _f(None, "JSONL of {prompt, completion[, seed]} from any generator; replaces sampling (implies offline)")


@dataclass
class FilterConfig:
    min_tokens: int = _f(1, "discard completions with fewer tokens (eos excluded); 1 drops empty completions")
    max_tokens: int | None = _f(None, "discard completions with more tokens (e.g. ones cut off by max_new_tokens)")
    discard_regex: list = _f([], "discard completions matching any of these Python regexes (e.g. '#{3,}')")
    repeated_ngram_size: int = _f(0, "n of the repeated n-gram rule over words (0 = off)")
    max_ngram_repeats: int = _f(2, "discard when one n-gram occurs more often than this")
    require_stop: bool = _f(False, "discard completions that ended at max_new_tokens instead of eos or a stop string")
    dedupe: bool = _f(False, "discard a completion whose text (whitespace-normalised) already occurred earlier in the stage")


@dataclass
class LLMRankingConfig(core.RankingConfig):
    threshold_quantile: float | None = _f(
        None,
        "threshold mode, a threshold rising with the pool: a stage keeps keys >= this quantile of its own keys (0.75: about "
        "the best quarter), never below ranking.threshold nor above ranking.threshold_max; null = the fixed ranking.threshold",
    )
    threshold_max: float | None = _f(None, "the most a rising threshold (ranking.threshold_quantile) asks for; null = no cap")
    # Diffusion-only keys, accepted so that LLM configs and run snapshots written before they left the shared
    # ranking section still load; each must stay off.
    diversity_weight: float = _f(
        0.0,
        "local mode: pick each prompt's top_k greedily by key + w * mean cosine distance (hashed word uni+bigram counts) "
        "to the completions picked for it so far (w in reward units); 0 = plain top_k",
    )
    novelty_weight: float = _f(
        0.0, "local mode: raise each completion's key by v * its mean n-gram cosine distance to its prompt's other completions; 0 = off"
    )
    prompt_match: int | None = _f(None, "diffusion only (a CLIP matches images to prompts); must be null for LLM runs")


@dataclass
class LLMTrainConfig:
    method: str = _f("lora", "lora (peft adapter) or full (every weight; keeps a frozen base copy when the KL key or perplexity needs it)")
    lora_rank: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA branch")
    target_modules: object = _f("all-linear", "modules that receive LoRA: 'all-linear' or a list of names (e.g. [q_proj, v_proj])")
    modules_to_save: list | None = _f(
        None,
        "lora: modules trained in full beside the adapter and saved with it (peft's modules_to_save, e.g. [lm_head]; a tied output layer gets its own copy)",
    )
    epochs: float = _f(2.0, "passes over the kept samples per stage (the paper used 2)")
    max_steps: int | None = _f(None, "cap on optimizer steps per stage (null = from epochs)")
    batch_size: int = _f(16, "kept samples per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step (loss is averaged over all their response tokens)")
    learning_rate: float = _f(1e-4, "AdamW learning rate")
    lr_scheduler: str = _f("constant", "transformers schedule name: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = _f(0, "warmup steps of the schedule")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)")
    max_length: int | None = _f(None, "truncate prompt+completion to this many tokens (prompt cut from the left); null = the model's limit")
    mixed_precision: str = _f("no", "no, fp16 or bf16 (autocast; CUDA only)")
    clip_epsilon: float | None = _f(
        None,
        "RAFT++: token loss -min(r, clip(r, 1-eps, 1+eps)), r = p/p_old against the model as the stage's training began, "
        "so several epochs reuse one pool (a token made (1+eps)x likelier stops pulling); null = plain NLL",
    )
    base_importance: float = _f(
        0.0,
        "weight each kept completion's loss by (p_base/p_theta)^a, normalised to mean 1, so the kept set trains towards the base "
        "model conditioned on the ranking (as varied as the base) instead of what the current model over-produces; 0 = off, 1 = full",
    )
    crowding_power: float = _f(
        0.0,
        "weight each kept completion's loss by crowding^-g, crowding = mean share of the stage's kept completions (all prompts) "
        "holding each of its word bigrams, so a stock phrase kept for every prompt weighs less than a new one; 0 = off",
    )
    weight_max: float | None = _f(
        10.0, "cap on one kept completion's loss weight (train.base_importance, train.crowding_power), in units of the mean"
    )
    gradient_checkpointing: bool = _f(False, "trade compute for memory")


@dataclass
class LLMEvalConfig:
    num_per_prompt: int = _f(4, "held-out completions per eval prompt (fixed seeds, the same every stage)")
    every: int = _f(1, "evaluate every N stages (the last stage always); 0 disables evaluation")
    fallback: bool = _f(
        True,
        "with every > 1: when an early-stop floor fires, evaluate the stages trained since the evaluation before (newest first, until one passes the floors) so final/ can fall back to them, not only to evaluated stages",
    )
    screen_per_prompt: int = _f(
        0,
        "with every > 1: screen each stage that is not evaluated on the first N held-out seeds of each eval prompt (seeds a full evaluation uses; screen_reward_mean and screen_reward_std in metrics.jsonl, screen.jsonl in the stage folder), with an estimate of the full evaluation's mean paired with the base's evaluation at those seeds (screen_reward_estimate, screen_reward_se); with early_stop.target_rise_sd a stage whose estimate comes within early_stop.screen_band_se standard errors of the target is evaluated in full at once; 0 = off",
    )
    best_of_k: int | None = _f(
        None, "stage 0 also reports the base model's best-of-K reward on the eval prompts; null = sampling.num_per_prompt, 0 = off"
    )
    gold_reward: dict | None = _f(None, "optional second reward reported as eval_gold_* (e.g. {name: toy_gold}); never used for ranking")
    report: bool = _f(True, "write report.html (before/after completions per held-out prompt) when the run ends")


DIVERSITY_METRICS = ("eval_distinct_2_per_prompt", "eval_distinct_1_per_prompt", "eval_distinct_2", "eval_distinct_1")


@dataclass
class LLMEarlyStopConfig(core.EarlyStopConfig):
    lora_scales: list | None = _f(None, LORA_SCALES_HELP)
    min_diversity_ratio: float | None = _f(
        None, "stop when early_stop.diversity_metric falls below this fraction of the base model's (final/ = the best stage above it); null = off"
    )
    diversity_metric: str = _f(
        "eval_distinct_2_per_prompt",
        "what min_diversity_ratio reads: eval_distinct_2_per_prompt (per prompt over its completions, does not depend on "
        "eval.num_per_prompt), eval_distinct_1_per_prompt, or the pooled eval_distinct_2 / eval_distinct_1 (fall as more completions are drawn)",
    )


@dataclass
class LLMConfig(core.BaseConfig):
    num_stages: int = _f(5, "RAFT stages (sample, rank, fine-tune)")
    model: LLMModelConfig = _f(None, "base causal LM")
    prompts: LLMPromptsConfig = _f(None, "prompt sets")
    sampling: LLMSamplingConfig = _f(None, "completion generation")
    filters: FilterConfig = _f(None, "discard rules applied before ranking (a discarded completion gets no reward)")
    reward: dict = _f(
        {"name": "toy_sentiment"},
        "text reward: {name: NAME, kwargs: {...}}; NAME = toy_sentiment, toy_gold, sequence_classifier (a Hub or local reward model) or package.module:function",
    )
    ranking: LLMRankingConfig = _f(None, "what is kept (kl_beta > 0 ranks by r - beta*log(p/p_base), base = adapter disabled)")
    train: LLMTrainConfig = _f(None, "fine-tuning on the kept completions (loss on response tokens only)")
    eval: LLMEvalConfig = _f(None, "held-out evaluation")
    early_stop: LLMEarlyStopConfig = _f(None, "opt-in guard against over-optimisation: stop early, keep the best stage as final/")
    progress: bool = _f(True, "show progress bars")

    sample_noun = "completions"
    example_reward = "toy_sentiment"

    def load_prompt_sets(self):
        from .prompts import load_prompts

        train = None if self.sampling.external_pool else load_prompts(self.prompts.train, "prompts.train")
        if self.prompts.eval is None:
            return train, train if train is not None else []
        return train, load_prompts(self.prompts.eval, "prompts.eval")

    def floor_settings(self):
        return [("min_diversity_ratio", self.early_stop.diversity_metric, "diversity", self.early_stop.min_diversity_ratio)]

    def check(self) -> None:
        """The LLM rules (the shared ones are in :meth:`BaseConfig.validate`)."""
        check_lora_scales(self, need)
        s, r, t, fl, e = self.sampling, self.ranking, self.train, self.filters, self.eval
        need(isinstance(self.model.pretrained, str) and self.model.pretrained, "model.pretrained must name a hub id or a folder (or 'toy')")
        need(self.model.num_threads is None or self.model.num_threads >= 1, "model.num_threads must be >= 1 or null")
        need(s.max_new_tokens >= 1, f"sampling.max_new_tokens must be >= 1 (got {s.max_new_tokens})")
        need(s.temperature >= 0, f"sampling.temperature must be >= 0 (0 = greedy; got {s.temperature})")
        need(0 < s.top_p <= 1, f"sampling.top_p must be in (0, 1] (got {s.top_p})")
        need(s.top_k >= 0, f"sampling.top_k must be >= 0 (0 = off; got {s.top_k})")
        need(
            isinstance(s.stop_strings, list) and all(isinstance(x, str) and x for x in s.stop_strings),
            "sampling.stop_strings must be a list of non-empty strings",
        )
        need(s.chat_template in ("auto", "always", "never"), f"sampling.chat_template must be auto, always or never (got {s.chat_template!r})")
        need(fl.min_tokens >= 0, "filters.min_tokens must be >= 0")
        need(fl.max_tokens is None or fl.max_tokens >= max(1, fl.min_tokens), "filters.max_tokens must be >= filters.min_tokens (or null)")
        need(isinstance(fl.discard_regex, list), "filters.discard_regex must be a list of regexes")
        for pat in fl.discard_regex:
            try:
                re.compile(pat)
            except (re.error, TypeError) as err:
                raise ConfigError(f"filters.discard_regex entry {pat!r} is not a valid regex ({err})") from None
        need(fl.repeated_ngram_size >= 0 and fl.max_ngram_repeats >= 1, "filters.repeated_ngram_size must be >= 0 and filters.max_ngram_repeats >= 1")
        need(r.diversity_weight >= 0 and r.novelty_weight >= 0, "ranking.diversity_weight and ranking.novelty_weight must be >= 0")
        need(
            r.mode == "local" or (r.diversity_weight == 0 and r.novelty_weight == 0),
            f"ranking.diversity_weight and ranking.novelty_weight pick within each prompt, so each needs ranking.mode=local (got {r.mode!r})",
        )
        need(
            r.prompt_match is None,
            "ranking.prompt_match is for diffusion runs (a CLIP matches images to prompts); "
            "for LLM completions use the filters.* discard rules and set ranking.prompt_match=null",
        )
        if r.threshold_quantile is not None:
            need(0 < r.threshold_quantile < 1, f"ranking.threshold_quantile must be in (0, 1) or null (got {r.threshold_quantile})")
            need(r.mode == "threshold", f"ranking.threshold_quantile raises the threshold of ranking.mode=threshold; set that mode (got {r.mode!r})")
        need(
            r.threshold_max is None or r.threshold_max >= r.threshold,
            f"ranking.threshold_max={r.threshold_max} is below ranking.threshold={r.threshold}; raise it or set it to null",
        )
        need(t.method in ("lora", "full"), f"train.method must be 'lora' or 'full' (got {t.method!r})")
        need(t.lora_rank >= 1, "train.lora_rank must be >= 1")
        need(0 <= t.lora_dropout < 1, f"train.lora_dropout must be in [0, 1) (got {t.lora_dropout})")
        need(t.lr_scheduler in LR_SCHEDULERS, f"train.lr_scheduler must be one of {', '.join(LR_SCHEDULERS)} (got {t.lr_scheduler!r})")
        need(t.lr_warmup_steps >= 0, f"train.lr_warmup_steps must be >= 0 (got {t.lr_warmup_steps})")
        need(
            t.target_modules == "all-linear" or (isinstance(t.target_modules, list) and t.target_modules),
            "train.target_modules must be 'all-linear' or a non-empty list of module names",
        )
        need(
            t.modules_to_save is None
            or (isinstance(t.modules_to_save, list) and t.modules_to_save and all(isinstance(m, str) and m for m in t.modules_to_save)),
            "train.modules_to_save must be null or a non-empty list of module names (e.g. [lm_head])",
        )
        need(
            t.modules_to_save is None or t.method == "lora",
            "train.modules_to_save goes with train.method=lora (full fine-tuning trains every module already)",
        )
        need(t.epochs > 0 or (t.max_steps or 0) > 0, "train.epochs must be > 0 (or set train.max_steps)")
        need(t.max_steps is None or t.max_steps >= 0, "train.max_steps must be >= 0 or null")
        need(t.batch_size >= 1 and t.gradient_accumulation_steps >= 1, "train.batch_size and train.gradient_accumulation_steps must be >= 1")
        need(t.learning_rate > 0, "train.learning_rate must be > 0")
        need(t.max_length is None or t.max_length >= 2, "train.max_length must be >= 2 or null")
        need(t.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
        need(
            t.clip_epsilon is None or 0 < t.clip_epsilon < 1,
            f"train.clip_epsilon must be in (0, 1) (0.2 is PPO's usual value) or null for the plain NLL (got {t.clip_epsilon})",
        )
        need(t.base_importance >= 0, f"train.base_importance must be >= 0 (0 = off, 1 = full importance weights; got {t.base_importance})")
        need(t.crowding_power >= 0, f"train.crowding_power must be >= 0 (0 = off; got {t.crowding_power})")
        need(t.weight_max is None or t.weight_max >= 1, f"train.weight_max must be >= 1 (the mean weight) or null (got {t.weight_max})")
        need(e.best_of_k is None or e.best_of_k >= 0, "eval.best_of_k must be >= 0 or null")
        need(
            self.early_stop.diversity_metric in DIVERSITY_METRICS,
            f"early_stop.diversity_metric must be one of {', '.join(DIVERSITY_METRICS)} (got {self.early_stop.diversity_metric!r})",
        )
        need(
            e.gold_reward is None or (isinstance(e.gold_reward, dict) and "name" in e.gold_reward),
            "eval.gold_reward must be null or a mapping with 'name' (e.g. {name: toy_gold})",
        )

    @property
    def best_of_k(self) -> int:
        return self.sampling.num_per_prompt if self.eval.best_of_k is None else self.eval.best_of_k


core.register_kind(LLMConfig, "an LLM", "raft-diffusion llm align", "raft-diffusion llm report --run-dir {run}")
