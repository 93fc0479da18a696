"""Response-only supervised fine-tuning and teacher-forced log-probabilities.

One collate function serves both: a row is ``prompt_ids + completion_ids``; ``labels`` hold the
completion tokens and -100 everywhere else (prompt and padding), so the loss -- and every
log-probability this module sums -- covers response tokens only.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from ..core.errors import UserError

IGNORE = -100


def collate(prompts: list[list[int]], completions: list[list[int]], pad_id: int, *, max_length: int | None = None, device=None) -> dict:
    """Right-padded batch of prompt+completion with response-only labels.

    Too long rows lose prompt tokens from the left (then completion tokens from the right if the
    completion alone is too long). Returns input_ids, attention_mask, position_ids, labels.
    """
    rows, labs = [], []
    for p, c in zip(prompts, completions):
        p, c = list(p), list(c)
        if max_length is not None and len(p) + len(c) > max_length:
            c = c[: max_length - 1]  # keep at least one prompt token to predict the first response token from
            p = p[len(p) - (max_length - len(c)) :]
        rows.append(p + c)
        labs.append([IGNORE] * len(p) + c)
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labs)):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def token_logprobs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(label | prefix) and the response mask, both [B, L-1] (0 where not a response token)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    logits = logits[:, :-1].float()
    target = batch["labels"][:, 1:]
    mask = target != IGNORE
    safe = target.clamp(min=0)
    lp = torch.gather(logits, -1, safe.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return lp * mask, mask


@torch.no_grad()
def sequence_logprobs(model, prompts, completions, pad_id: int, *, batch_size: int = 16, max_length: int | None = None) -> list[tuple[float, int]]:
    """(sum of response-token log-probs, number of response tokens) per row, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = collate(prompts[i : i + batch_size], completions[i : i + batch_size], pad_id, max_length=max_length, device=device)
        lp, mask = token_logprobs(model, batch)
        out += [(float(s), int(n)) for s, n in zip(lp.sum(-1).tolist(), mask.sum(-1).tolist())]
    model.train(was_training)
    return out


def train_response_only(
    model,
    examples: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    epochs: float,
    max_steps: int | None,
    batch_size: int,
    gradient_accumulation_steps: int,
    learning_rate: float,
    lr_scheduler: str,
    lr_warmup_steps: int,
    weight_decay: float,
    max_grad_norm: float,
    max_length: int | None,
    seed: int,
    mixed_precision: str = "no",
    clip_epsilon: float | None = None,
    weights: list[float] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> dict:
    """Fine-tune on (prompt_ids, completion_ids) pairs with the next-token loss on completion tokens only.

    1. Order: a seeded shuffle per epoch; micro-batches of ``batch_size``; ``gradient_accumulation_steps``
       micro-batches per optimizer step. The step's loss is the summed token loss divided by the number of
       response tokens in all its micro-batches (each token weighs the same, whatever its row's length).
    2. Steps: ``max_steps`` or ceil(epochs * n / (batch_size * accumulation)).
    3. A fresh AdamW + transformers schedule per call, dropout seeded, so a resumed stage repeats exactly.

    Token loss: the NLL ``-log p(y_t)``; with ``clip_epsilon`` (RAFT++) the clipped importance-weighted
    objective ``-min(r_t, clip(r_t, 1 - eps, 1 + eps))`` with ``r_t = p(y_t) / p_old(y_t)``, ``p_old`` being
    the model when this call starts (eval mode) and the advantage of a kept completion 1. Its gradient at
    r_t = 1 is the NLL's; once a token's probability has risen past (1 + eps) p_old it stops pulling, so
    several epochs over one pool do not keep sharpening what the model already learned.

    ``weights`` (one per example, e.g. :func:`base_importance_weights`) scale each example's token losses;
    the step's divisor stays the plain number of response tokens, so weights of mean 1 keep the step size.
    """
    from transformers import get_scheduler

    if weights is not None and len(weights) != len(examples):
        raise ValueError(f"train_response_only: {len(weights)} weights for {len(examples)} examples")
    if weights is not None:
        weights = [w for (_, c), w in zip(examples, weights) if len(c) > 0]
    examples = [(p, c) for p, c in examples if len(c) > 0]
    if not examples:
        raise UserError("none of the kept completions has a response token to train on (all empty); check the reward and filters.min_tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters (train.method lora with an adapter, or full)")
    per_step = batch_size * gradient_accumulation_steps
    steps = max_steps if max_steps is not None else max(1, math.ceil(epochs * len(examples) / per_step))
    if steps == 0:
        return {"loss_mean": None, "train_steps": 0, "train_tokens": 0}
    device = params[0].device
    old = None if clip_epsilon is None else old_token_logprobs(model, examples, pad_id, batch_size=batch_size, max_length=max_length)
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    sched = get_scheduler(lr_scheduler, opt, num_warmup_steps=lr_warmup_steps, num_training_steps=steps)
    rng = random.Random(seed)
    order: list[int] = []

    def next_micro() -> list[int]:
        nonlocal order
        while len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        chunk, order = order[:batch_size], order[batch_size:]
        return chunk

    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    autocast = (lambda: torch.autocast(device_type="cuda", dtype=amp)) if (amp and device.type == "cuda") else nullcontext
    scaler = torch.amp.GradScaler("cuda") if (mixed_precision == "fp16" and device.type == "cuda") else None
    losses, tokens = [], 0
    devices = [device.index or 0] if device.type == "cuda" else []
    model.train()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            chunks = [next_micro() for _ in range(gradient_accumulation_steps)]
            micro = [
                collate([examples[j][0] for j in idx], [examples[j][1] for j in idx], pad_id, max_length=max_length, device=device) for idx in chunks
            ]
            n_tok = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            step_loss = 0.0
            for idx, b in zip(chunks, micro):
                with autocast():
                    lp, mask = token_logprobs(model, b)
                    if old is None:
                        per_token = lp
                    else:
                        ref = torch.zeros_like(lp)
                        ref[mask] = torch.cat([old[j] for j in idx]).to(lp.device, lp.dtype)
                        per_token = clipped_objective(lp, ref, clip_epsilon) * mask
                    if weights is not None:
                        per_token = per_token * torch.tensor([weights[j] for j in idx], dtype=per_token.dtype, device=per_token.device)[:, None]
                    loss = -per_token.sum() / max(n_tok, 1)
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += float(loss.detach())
            if scaler:
                scaler.unscale_(opt)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            tokens += n_tok
    model.eval()
    return {"loss_mean": sum(losses) / len(losses), "loss_last": losses[-1], "train_steps": steps, "train_tokens": tokens}


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-token PPO-clip objective with advantage 1: ``min(r, clip(r, 1 - eps, 1 + eps))``, r = exp(logp - old_logp)."""
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio, ratio.clamp(1.0 - eps, 1.0 + eps))


@torch.no_grad()
def old_token_logprobs(model, examples, pad_id: int, *, batch_size: int, max_length: int | None) -> list[torch.Tensor]:
    """Per example, the log-probs of its response tokens (after ``collate``'s truncation) under ``model`` now, in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    for i in range(0, len(examples), batch_size):
        part = examples[i : i + batch_size]
        b = collate([p for p, _ in part], [c for _, c in part], pad_id, max_length=max_length, device=device)
        lp, mask = token_logprobs(model, b)
        out += [row[m].float().cpu() for row, m in zip(lp, mask)]
    model.train(was_training)
    return out
