"""A causal LM as a RAFT task: the generator, fine-tuner and evaluator the core loop drives.

sample     K completions per prompt, one seeded generator per completion (see generate.py);
           discard rules mark completions that must not be ranked; with ranking.kl_beta > 0 each
           completion gets log_ratio = log p_theta(y|x) - log p_base(y|x), the base being the same
           model with its LoRA adapter disabled (no second copy is loaded); log p_theta is the one the
           sampler recorded (``sample_logprob`` in samples.jsonl), so only the base needs a forward pass
score      the text reward on (prompt, completion) pairs; discarded completions get None
finetune   next-token loss on the kept completions' tokens only (prompt tokens get no loss)
save       stages/NNN/lora/ (a peft adapter: PeftModel.from_pretrained(base, that folder)), or
           stages/NNN/model/ for full fine-tuning
evaluate   held-out prompts x fixed seeds: reward, gold reward, distinct-1/2 (pooled and per prompt), repeated
           bigram rate, length, base perplexity
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.common import best_of_k, mean_std, resolve_device, reward_label, screen_metrics
from ..core.errors import UserError
from ..core.loop import external_requests
from ..core.loop import read_manifest as core_read_manifest
from ..core.lora_scale import scaled_lora
from ..core.ranking import uses_embeddings
from ..core.rundir import read_jsonl, replace_dir, write_jsonl
from ..core.seeds import eval_seed, stage_seed
from ..core.types import Sample
from .filters import Filters
from .generate import encode_prompts, eos_ids, sample_completions, uses_chat_template
from .metrics import distinct_n, distinct_n_per_prompt, ngram_embedding, perplexity, repeated_ngram_rate
from .model import (
    add_lora,
    load_adapter_weights,
    load_causal_lm,
    load_tokenizer,
    max_positions,
    portable_model_name,
    resolve_dtype,
    resolve_model_path,
    save_adapter,
)
from .prompts import load_prompts
from .rewards import load_text_reward, wrap_callable
from .sft import sequence_logprobs, train_response_only
from .weighting import effective_size, kept_weights

log = logging.getLogger(__name__)


class LLMTask:
    """Generator, fine-tuner and evaluator for any transformers causal LM and any text reward.

    ``reward`` / ``gold_reward``: optional callables ``(prompts, completions, **kw) -> list[float | None]``
    that replace ``cfg.reward`` / ``cfg.eval.gold_reward`` (tests, notebooks).
    """

    console_metrics = ()  # the console line of a stage shows the shared columns only
    skips_discarded = True  # a completion the filters discard is never shown to the reward

    def __init__(self, cfg, reward=None, gold_reward=None):
        self.cfg = cfg
        m, s, t = cfg.model, cfg.sampling, cfg.train
        if m.num_threads:
            torch.set_num_threads(m.num_threads)
        # 1. Tokenizer and model (frozen but for what fine-tuning trains).
        self.device = resolve_device(m.device)
        self.dtype = resolve_dtype(m.dtype, self.device)
        path = resolve_model_path(m.pretrained)
        self.base_name = portable_model_name(m.pretrained)  # written into adapter_config.json (not an install path)
        self.tokenizer = load_tokenizer(m.tokenizer or path, revision=m.revision if not m.tokenizer else None, pad_token=m.pad_token)
        model = load_causal_lm(path, revision=m.revision, device=self.device, dtype=self.dtype)
        self.pad_id = self.tokenizer.pad_token_id
        self.eos = eos_ids(model, self.tokenizer)
        eos_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else min(self.eos, default=None)
        self._stop_ids = [] if eos_id is None else [int(eos_id)]
        self.chat = uses_chat_template(self.tokenizer, s.chat_template)
        limit = max_positions(model)
        if limit is not None and s.max_new_tokens >= limit:
            raise UserError(f"sampling.max_new_tokens={s.max_new_tokens} does not fit the model's {limit} positions; lower it")
        self.prompt_limit = None if limit is None else limit - s.max_new_tokens
        self.max_length = min(x for x in (t.max_length, limit) if x is not None) if (t.max_length or limit) else None
        # 2. Prompts: training (or an external pool's) and held-out.
        self.external = read_manifest(s.external_pool) if s.external_pool else None
        if self.external is not None:
            self.train_prompts = list(dict.fromkeys(row["prompt"] for row in self.external))
        else:
            self.train_prompts = load_prompts(cfg.prompts.train, "prompts.train")
        self.eval_prompts = load_prompts(cfg.prompts.eval, "prompts.eval") if cfg.prompts.eval is not None else list(self.train_prompts)
        enc = dict(chat=self.chat, system_prompt=s.system_prompt, max_len=self.prompt_limit)
        self.train_ids = encode_prompts(self.tokenizer, self.train_prompts, **enc)
        self.eval_ids = encode_prompts(self.tokenizer, self.eval_prompts, **enc)
        # 3. Rewards: the one RAFT ranks by, and an optional gold one that is only reported.
        if reward is not None:
            self.reward, self.reward_name = wrap_callable(reward), getattr(reward, "__name__", "custom")
        else:
            self.reward, self.reward_name = load_text_reward(cfg.reward, self.device), reward_label(cfg.reward)
        gold_spec = cfg.eval.gold_reward
        self.gold = wrap_callable(gold_reward) if gold_reward is not None else (load_text_reward(gold_spec, self.device) if gold_spec else None)
        self._probe_rewards()
        # 4. What fine-tuning trains; where base log-probs come from.
        if t.method == "lora":
            self.model = add_lora(
                model,
                rank=t.lora_rank,
                alpha=t.lora_alpha,
                dropout=t.lora_dropout,
                target_modules=t.target_modules,
                init_seed=stage_seed(cfg.seed, 0, "lora-init"),
                modules_to_save=t.modules_to_save,
            )
            self.base = None
        else:
            model.requires_grad_(True)
            self.model = model
            needs_base = cfg.ranking.kl_beta > 0 or cfg.eval.every > 0
            self.base = copy.deepcopy(model).requires_grad_(False).eval() if needs_base else None  # full FT: a frozen copy
        if t.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if hasattr(self.model, "enable_input_require_grads"):
                self.model.enable_input_require_grads()
        if t.mixed_precision != "no" and self.device.type != "cuda":
            log.warning("train.mixed_precision=%s needs CUDA; training in %s on %s", t.mixed_precision, self.dtype, self.device)
        self.model.eval()
        self.filters = Filters(cfg.filters)

    # -- helpers -------------------------------------------------------------------------------
    def _probe_rewards(self) -> None:
        """Score two short completions with the reward (and ``eval.gold_reward``) before anything is generated, so that a
        reward that fails (an infinite score, the wrong number of scores, a wrong signature) says so in seconds, not after
        the base's evaluation. No score (None) is a valid answer here; the probe's scores are not used."""
        prompts, completions = [self.train_prompts[0], self.eval_prompts[0]], ["", "Yes."]
        for reward in (self.reward, self.gold):
            if reward is not None:
                reward.probe(prompts, completions)

    @contextmanager
    def base_model(self):
        """The base model: the LoRA model with its adapter disabled, or the frozen copy (full fine-tuning)."""
        if self.base is not None:
            yield self.base
        else:
            with self.model.disable_adapter():
                yield self.model

    def _generate(self, prompt_ids, seeds):
        s = self.cfg.sampling
        return sample_completions(
            self.model,
            self.tokenizer,
            prompt_ids,
            seeds,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_strings=list(s.stop_strings),
            eos=self.eos,
        )

    def _logprobs(self, model, prompt_ids, completion_ids):
        """No-grad teacher-forced log-probs, in batches as large as sampling's or training's (fewer, fuller passes)."""
        bs = max(self.cfg.train.batch_size, self.cfg.sampling.batch_size)
        return sequence_logprobs(model, prompt_ids, completion_ids, self.pad_id, batch_size=bs, max_length=self.max_length)

    def log_ratios(self, prompt_ids, completion_ids) -> list[tuple[float, float]]:
        """(log p_theta(y|x), log p_base(y|x)) summed over completion tokens, per row."""
        cur = self._logprobs(self.model, prompt_ids, completion_ids)
        with self.base_model() as base:
            ref = self._logprobs(base, prompt_ids, completion_ids)
        return [(c[0], r[0]) for c, r in zip(cur, ref)]

    # -- generation ----------------------------------------------------------------------------
    def plan(self, stage: int) -> list[Sample] | None:
        """Requests of an external pool (one per manifest row); None = the core's K-per-prompt plan."""
        if self.external is None:
            return None
        return external_requests(self.external, self.train_prompts, self.cfg.seed, stage, lambda row: {"completion": row["completion"]})

    def sample(self, stage: int, requests):
        bs = self.cfg.sampling.batch_size
        self._seen: set[str] = set()  # filters.dedupe: texts already generated this stage (requests come in plan order)
        spread = uses_embeddings(self.cfg.ranking)
        for i in range(0, len(requests), bs):
            batch = list(requests[i : i + bs])
            prompt_ids = [self.train_ids[r.prompt_index] for r in batch]
            if self.external is not None:
                for r, p in zip(batch, prompt_ids):
                    ids = self.tokenizer(r.extras["completion"], add_special_tokens=False).input_ids
                    n = len(ids)
                    ids = ids + self._stop_ids  # an external completion is finished: learn to stop after it
                    r.payload = {"prompt_ids": p, "completion_ids": ids}
                    r.extras.update(n_tokens=n, finish="eos")
            else:
                for r, p, c in zip(batch, prompt_ids, self._generate(prompt_ids, [r.seed for r in batch])):
                    r.payload = {"prompt_ids": p, "completion_ids": c.ids}
                    r.extras.update(completion=c.text, n_tokens=c.n_tokens, finish=c.finish, sample_logprob=c.logprob)
            if spread:  # ranking.diversity_weight / novelty_weight: word n-gram vectors to spread the picks in
                for r in batch:
                    r.embedding = ngram_embedding(r.extras["completion"])
            yield batch

    def discard(self, batch: list[Sample]) -> None:
        """The ``filters.*`` rules: a discarded completion gets no reward and is never kept."""
        for r in batch:
            why = self.filters.reason(r.extras["completion"], r.extras["n_tokens"], r.extras["finish"])
            if self.cfg.filters.dedupe and not why:
                norm = " ".join(r.extras["completion"].split())
                why = "duplicate" if norm in self._seen else None
                self._seen.add(norm)
            if why:
                r.extras["discarded"] = why

    def score(self, batch: list[Sample]):
        """The reward of each completion the filters kept (None for the discarded), and its log-ratio
        to the base when the ranking key needs it (``ranking.kl_beta``)."""
        live = [j for j, s in enumerate(batch) if "discarded" not in s.extras]
        if (self.cfg.ranking.kl_beta > 0 or self.cfg.train.base_importance > 0) and live:
            prompt_ids, completion_ids = [batch[j].payload["prompt_ids"] for j in live], [batch[j].payload["completion_ids"] for j in live]
            sampled = [batch[j].extras.get("sample_logprob") for j in live]
            if None in sampled:  # an external pool's completions: both log-probs teacher-forced
                pairs = self.log_ratios(prompt_ids, completion_ids)
            else:  # log p_theta came with the sampling (the model that sampled is the current one): one pass, the base's
                with self.base_model() as base:
                    pairs = [(cur, ref) for cur, (ref, _) in zip(sampled, self._logprobs(base, prompt_ids, completion_ids))]
            for j, (cur, ref) in zip(live, pairs):
                batch[j].log_ratio = cur - ref
        out: list[float | None] = [None] * len(batch)
        if live:
            scores = self.reward([self.train_prompts[batch[j].prompt_index] for j in live], [batch[j].extras["completion"] for j in live])
            for j, v in zip(live, scores):
                out[j] = v
        return out

    # -- kept samples --------------------------------------------------------------------------
    def save_kept(self, stage_dir: Path, kept: list[Sample]) -> None:
        write_jsonl(Path(stage_dir) / "kept.jsonl", [{"prompt_index": s.prompt_index, "sample_index": s.sample_index, **s.payload} for s in kept])

    def load_kept(self, stage_dir: Path, kept: list[Sample]) -> list[Sample]:
        rows = {(r["prompt_index"], r["sample_index"]): r for r in read_jsonl(Path(stage_dir) / "kept.jsonl")}
        for s in kept:
            r = rows[(s.prompt_index, s.sample_index)]
            s.payload = {"prompt_ids": r["prompt_ids"], "completion_ids": r["completion_ids"]}
        return kept

    # -- fine-tuning and weights ---------------------------------------------------------------
    def finetune(self, stage: int, kept: list[Sample]) -> dict:
        t = self.cfg.train
        if t.base_importance > 0 and any(s.log_ratio is None for s in kept):
            raise UserError("train.base_importance needs each kept completion's log p/p_base, and some have none; set it to 0")
        weights = kept_weights(
            [s.extras.get("completion", "") for s in kept],
            [s.log_ratio for s in kept],
            base_importance=t.base_importance,
            crowding_power=t.crowding_power,
            weight_max=t.weight_max,
        )
        out = train_response_only(
            self.model,
            [(s.payload["prompt_ids"], s.payload["completion_ids"]) for s in kept],
            pad_id=self.pad_id,
            epochs=t.epochs,
            max_steps=t.max_steps,
            batch_size=t.batch_size,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=t.learning_rate,
            lr_scheduler=t.lr_scheduler,
            lr_warmup_steps=t.lr_warmup_steps,
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            max_length=self.max_length,
            seed=stage_seed(self.cfg.seed, stage, "train"),
            mixed_precision=t.mixed_precision,
            clip_epsilon=t.clip_epsilon,
            weights=weights,
            progress=self.cfg.progress,
            desc=f"stage {stage} train",
        )
        if weights is not None:  # how concentrated the weights are (len(kept) when all are equal)
            out["train_weight_ess"] = effective_size(weights)
        return out

    def weights_dir(self, stage_dir: Path) -> Path:
        return Path(stage_dir) / ("lora" if self.cfg.train.method == "lora" else "model")

    def lora_scaled(self, scale: float):
        """``early_stop.lora_scales``: the adapter at ``scale`` within the block (screens and evaluations)."""
        return scaled_lora(self.model, scale)

    def save(self, stage_dir: Path) -> None:
        """The adapter (or full model + tokenizer) into stage_dir, written to a temp folder then moved."""
        dst = self.weights_dir(stage_dir)
        tmp = dst.with_name(f".{dst.name}.tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        if self.cfg.train.method == "lora":
            save_adapter(self.model, tmp, base_name=self.base_name)
        else:
            self.model.save_pretrained(tmp)
        if self.cfg.train.method == "full":
            self.tokenizer.save_pretrained(tmp)
        replace_dir(tmp, dst)

    def restore(self, stage_dir: Path) -> None:
        src = self.weights_dir(stage_dir)
        if self.cfg.train.method == "lora":
            load_adapter_weights(self.model, src)
        else:
            from transformers import AutoModelForCausalLM

            state = AutoModelForCausalLM.from_pretrained(src, dtype=self.dtype).state_dict()
            self.model.load_state_dict(state)
        self.model.eval()

    # -- evaluation ----------------------------------------------------------------------------
    def _call(self, reward, prompts, completions) -> list[float]:
        out = []
        bs = max(1, self.cfg.sampling.batch_size)
        for i in range(0, len(prompts), bs):
            out += [float("nan") if v is None else float(v) for v in reward(prompts[i : i + bs], completions[i : i + bs])]
        return out

    def eval_completions(self, n: int):
        """``n`` completions per held-out prompt with the fixed eval seeds: rows of (p, k, seed, Completion)."""
        todo = [(p, k, eval_seed(self.cfg.seed, p, k)) for p in range(len(self.eval_prompts)) for k in range(n)]
        bs = self.cfg.sampling.batch_size
        rows = []
        for i in tqdm(range(0, len(todo), bs), desc="eval", disable=not self.cfg.progress, leave=False):
            chunk = todo[i : i + bs]
            comps = self._generate([self.eval_ids[p] for p, _, _ in chunk], [sd for _, _, sd in chunk])
            rows += [(p, k, sd, c) for (p, k, sd), c in zip(chunk, comps)]
        return rows

    def screen(self, stage: int, stage_dir: Path, per_prompt: int) -> dict:
        """``eval.screen_per_prompt``: the held-out reward on the first ``per_prompt`` fixed seeds of each eval
        prompt; rows into ``screen.jsonl``."""
        rows = self.eval_completions(per_prompt)
        prompts = [self.eval_prompts[p] for p, _, _, _ in rows]
        rewards = self._call(self.reward, prompts, [c.text for *_, c in rows])
        out = [
            {"prompt_index": p, "sample_index": k, "seed": sd, "prompt": prompt, "completion": c.text, "reward": r}
            for (p, k, sd, c), prompt, r in zip(rows, prompts, rewards)
        ]
        write_jsonl(Path(stage_dir) / "screen.jsonl", out)
        return screen_metrics(list(rewards))

    def evaluate(self, stage: int, stage_dir: Path) -> dict:
        """Held-out metrics of the current model (stage 0 = the base, plus its best-of-K reference)."""
        n = self.cfg.eval.num_per_prompt
        k_ref = self.cfg.best_of_k if stage == 0 else 0
        rows = self.eval_completions(max(n, k_ref))
        prompts = [self.eval_prompts[p] for p, _, _, _ in rows]
        texts = [c.text for *_, c in rows]
        rewards = self._call(self.reward, prompts, texts)
        golds = self._call(self.gold, prompts, texts) if self.gold is not None else None
        main = [i for i, (_, k, _, _) in enumerate(rows) if k < n]
        with self.base_model() as base:
            base_lp = self._logprobs(base, [self.eval_ids[rows[i][0]] for i in main], [rows[i][3].ids for i in main])
        out_rows = []
        for j, i in enumerate(main):
            p, k, sd, c = rows[i]
            row = {
                "prompt_index": p,
                "sample_index": k,
                "seed": sd,
                "prompt": self.eval_prompts[p],
                "completion": c.text,
                "reward": rewards[i],
                "n_tokens": c.n_tokens,
                "finish": c.finish,
                "base_logprob": base_lp[j][0],
            }
            if golds is not None:
                row["gold"] = golds[i]
            out_rows.append(row)
        write_jsonl(Path(stage_dir) / "eval.jsonl", out_rows)
        r_mean, r_std = mean_std([rewards[i] for i in main])
        held_out = [texts[i] for i in main]
        groups: dict[int, list[str]] = {}
        for i in main:
            groups.setdefault(rows[i][0], []).append(texts[i])
        metrics = {
            "eval_reward_mean": r_mean,
            "eval_reward_std": r_std,
            # pooled over all held-out completions (falls as eval.num_per_prompt grows) ...
            "eval_distinct_1": distinct_n(held_out, 1),
            "eval_distinct_2": distinct_n(held_out, 2),
            # ... and per prompt over its eval.num_per_prompt completions, averaged over prompts
            "eval_distinct_1_per_prompt": distinct_n_per_prompt(list(groups.values()), 1),
            "eval_distinct_2_per_prompt": distinct_n_per_prompt(list(groups.values()), 2),
            "eval_repeated_2gram_rate": repeated_ngram_rate(held_out, 2),
            "eval_length": sum(rows[i][3].n_tokens for i in main) / len(main),
            "eval_base_perplexity": perplexity([lp for lp, _ in base_lp], [nt for _, nt in base_lp]),
        }
        # K = eval.num_per_prompt, as the diffusion module
        metrics["eval_best_of_k"] = best_of_k([rewards[i] for i in main], [rows[i][0] for i in main])
        if golds is not None:
            metrics["eval_gold_mean"], metrics["eval_gold_std"] = mean_std([golds[i] for i in main])
        if k_ref:
            by_prompt: dict[int, list[int]] = {}
            for i, (p, k, _, _) in enumerate(rows):
                if k < k_ref:
                    by_prompt.setdefault(p, []).append(i)
            ref = [i for idx in by_prompt.values() for i in idx]
            metrics["eval_base_best_of_k"] = best_of_k([rewards[i] for i in ref], [rows[i][0] for i in ref])
            if golds is not None:  # gold of the completion the reward picked, per prompt
                picked = [max(idx, key=lambda i: (rewards[i] == rewards[i], rewards[i])) for idx in by_prompt.values()]
                metrics["eval_base_best_of_k_gold"] = sum(golds[i] for i in picked) / len(picked)
        metrics["eval_reward_queries"] = len(rows)  # the best-of-K reference's completions too
        return metrics


def read_manifest(path: str) -> list[dict]:
    """An external pool of {"prompt": ..., "completion": ...[, "seed": int]} written by any generator."""

    def empty(row):
        if not row["completion"].strip():
            return "has an empty completion; there is nothing to fine-tune on, remove the line"

    return core_read_manifest(path, "completion", empty)
