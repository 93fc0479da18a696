"""Batched, seeded sampling from a causal LM: left padding, KV cache, temperature/top-k/top-p, stop strings.

Why not ``model.generate``: it draws every row from one global RNG stream, so a completion would
depend on which other rows share its batch. Here each row owns a ``torch.Generator`` seeded with
that sample's seed and draws exactly one uniform number per generated token; the token is the
inverse CDF of the filtered distribution at that number. A completion is therefore a function of
(model weights, prompt, seed, sampling settings) only -- not of batch size, batch-mates, padding or
generation order -- up to the floating-point noise of batched matmuls, which would have to land
within ~1e-6 of a CDF boundary to change a token (tests check batch-invariance exactly).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from ..core.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Completion:
    ids: list[int]  # generated token ids, including the final eos / the tokens of a stop string
    text: str  # decoded completion, special tokens skipped, cut before a stop string
    finish: str  # "eos", "stop" or "length"
    n_tokens: int  # content tokens (ids without a final eos)
    logprob: float = 0.0  # log p(ids | prompt) under the model's own distribution (temperature 1, no top-k/top-p), summed over ids


# -- prompts -------------------------------------------------------------------------------------
def uses_chat_template(tokenizer, mode: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "always" and not has:
        raise UserError("sampling.chat_template=always but the tokenizer has no chat template; use auto or never")
    return mode == "always" or (mode == "auto" and has)


def encode_prompts(tokenizer, prompts: list[str], *, chat: bool, system_prompt: str | None = None, max_len: int | None = None) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (with the generation prompt) or plain text.

    Prompts longer than ``max_len`` keep their last ``max_len`` tokens (with a warning).
    """
    out = []
    for p in prompts:
        if chat:
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": p}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = tokenizer(p).input_ids
        if not ids:
            raise UserError(f"prompt {p!r} encodes to no tokens; remove empty prompts from the prompt list")
        if max_len is not None and len(ids) > max_len:
            log.warning("prompt %r has %d tokens; keeping its last %d so the completion fits the model", p[:40], len(ids), max_len)
            ids = ids[-max_len:]
        out.append(list(ids))
    return out


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(x) for x in src)
    return ids


# -- model calls ---------------------------------------------------------------------------------
def _base_forward_params(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def forward(model, input_ids, attention_mask, position_ids, cache=None, last_only=False):
    """One forward pass with a KV cache; works with the ``cache`` (transformers >= 5) and ``past_key_values`` names."""
    params = _base_forward_params(model)
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    if last_only and "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    out = model(**kw)
    new_cache = out["cache"] if "cache" in out else out.get("past_key_values")
    return out.logits[:, -1, :], new_cache


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, L - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, L - len(r) :] = 1
    return ids.to(device), mask.to(device)


def filter_logits(logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the transformers order), via its documented logits warpers."""
    from transformers.generation import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k and top_k < scores.shape[-1]:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores


def draw(scores: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the first token whose cumulative probability exceeds u_i.

    A token with probability 0 can never be chosen (its CDF step is flat).
    """
    probs = torch.softmax(scores, dim=-1)
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf.device, cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=scores.shape[-1] - 1)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    seeds: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_strings: list[str] = (),
    eos: set[int] | None = None,
) -> list[Completion]:
    """One completion per (prompt, seed) row, generated as one left-padded batch.

    Steps: 1. left-pad the prompts (position ids count real tokens only); 2. prefill the KV cache;
    3. per step, filter the last logits and draw one token per row from that row's own generator;
    4. a row ends at an eos token, at a stop string, or after ``max_new_tokens``; once a quarter of the
    rows still in the batch have ended, they leave it (the KV cache keeps the others' rows), so a batch
    costs what its live rows cost, not what its longest row costs.

    Each completion also carries ``logprob``: log p(ids | prompt) under the model's own distribution (the raw
    logits at temperature 1), which is what a teacher-forced pass would give (up to float noise) without the
    second pass.
    """
    if len(prompt_ids) != len(seeds):
        raise ValueError("one seed per prompt row is needed")
    if not prompt_ids:
        return []
    eos = eos_ids(model, tokenizer) if eos is None else set(eos)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise UserError("the tokenizer has no pad token; load it with raft_diffusion.llm.model.load_tokenizer (pads with eos)")
    device = next(model.parameters()).device
    gens = [torch.Generator().manual_seed(int(s) & ((1 << 63) - 1)) for s in seeds]
    B = len(prompt_ids)

    # 1-2. Left-padded prefill.
    ids, mask = left_pad(prompt_ids, pad_id, device)
    pos = (mask.cumsum(-1) - 1).clamp_(min=0)
    logits, cache = forward(model, ids, mask, pos, last_only=True)
    out: list[list[int]] = [[] for _ in range(B)]
    finish = ["length"] * B
    logprob = [0.0] * B
    live = list(range(B))  # the original row of each row still in the batch
    done = torch.zeros(B, dtype=torch.bool)  # per batch row
    next_pos = pos[:, -1:] + 1

    for step in range(max_new_tokens):
        # 3. One uniform per live row from its own generator: a row draws exactly one number per token it
        #    generates, whatever its batch-mates do.
        u = torch.stack([torch.rand((), generator=gens[i], dtype=torch.float64) for i in live]).float()
        if temperature == 0:
            tokens = logits.float().argmax(-1)
        else:
            tokens = draw(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), u)
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).cpu()
        tokens = tokens.cpu()
        for b, i in enumerate(live):
            if done[b]:
                continue
            t = int(tokens[b])
            out[i].append(t)
            logprob[i] += float(lp[b])
            if t in eos:
                done[b], finish[i] = True, "eos"
            elif stop_strings and _hits_stop(tokenizer.decode(out[i], skip_special_tokens=True), stop_strings):
                done[b], finish[i] = True, "stop"
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        if int(done.sum()) * 4 >= len(live) and hasattr(cache, "batch_select_indices"):  # drop the ended rows from the batch and the cache
            keep = (~done).nonzero().squeeze(-1)
            live = [live[b] for b in keep.tolist()]
            cache.batch_select_indices(keep.to(device))
            mask, next_pos, tokens = mask[keep.to(mask.device)], next_pos[keep.to(next_pos.device)], tokens[keep]
            done = torch.zeros(len(live), dtype=torch.bool)
        # 4. Feed the drawn tokens (ended rows not yet dropped feed pad, masked out; their later tokens are ignored).
        feed = torch.where(done, torch.full_like(tokens, pad_id), tokens).to(device)
        mask = torch.cat([mask, (~done).long().to(device).unsqueeze(-1)], dim=-1)
        logits, cache = forward(model, feed.unsqueeze(-1), mask, next_pos, cache=cache)
        next_pos = next_pos + 1

    return [_finish(tokenizer, out[i], finish[i], eos, stop_strings, logprob[i]) for i in range(B)]


def _hits_stop(text: str, stops) -> bool:
    return any(s in text for s in stops)


def _finish(tokenizer, ids: list[int], finish: str, eos: set[int], stops, logprob: float = 0.0) -> Completion:
    content = ids[:-1] if (ids and finish == "eos") else ids
    text = tokenizer.decode(content, skip_special_tokens=True)
    if finish == "stop":
        cut = min(text.find(s) for s in stops if s in text)
        text = text[:cut]
    return Completion(ids=list(ids), text=text, finish=finish, n_tokens=len(content), logprob=logprob)
