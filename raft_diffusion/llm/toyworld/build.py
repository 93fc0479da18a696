"""Build the toy text world: word-level tokenizer, tiny GPT-2 LM, sentiment reward model, prompt sets.

    raft-diffusion llm toyworld build [--out DIR]      (about 2-4 minutes on 2 CPU cores)

Steps:
    1. tokenizer   a WordLevel ``tokenizers`` model over the generator's vocabulary, saved as a
                   transformers fast tokenizer (no chat template, eos = bos = <|endoftext|>, pad = <pad>)
    2. LM          GPT-2 (3 layers, 128 wide) trained on a synthetic corpus of mixed-sentiment reviews
    3. reward      GPT2ForSequenceClassification with one output, regressing the 1-5 star rating of other
                   reviews and review prefixes (the rating follows from their gold sentiment, as a reviewer's
                   stars follow from what they wrote); the reward is the predicted rating
    4. prompts     prompts_train.txt / prompts_eval.txt (held-out openers), build_info.json with the figures

Everything is seeded; the same command on the same library versions rebuilds the same files.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import corpus as C

EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy"


def build_tokenizer(vocab_words: list[str]):
    """A word-level fast tokenizer: lowercase, split on whitespace and punctuation, unknown words -> <unk>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, PAD: 1, UNK: 2}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=64,
    )


def _batches(rows: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[j] for j in order[i : i + batch_size]]
            L = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), L), pad_id)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for k, r in enumerate(chunk):
                ids[k, : len(r)] = torch.tensor(r)
                mask[k, : len(r)] = 1
            yield ids, mask, [order[i + k] for k in range(len(chunk))]


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _fit(model, opt, batches, loss_fn, *, steps: int, peak_lr: float, warmup: int, name: str, log) -> None:
    """Train ``model`` for ``steps`` batches: warm-up/cosine learning rate, grad-norm clip 1.0, a log line every 200.

    ``loss_fn(model, ids, mask, idx)`` returns the batch loss (``idx``: the rows' indices, for per-row labels).
    """
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = peak_lr * _schedule(step, steps, warmup)
        loss = loss_fn(model, *next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"  {name} step {step:5d} loss {loss.item():.3f}")
    model.eval()


def _lm_loss(model, ids, mask, idx):
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


def train_lm(tokenizer, *, steps: int, seed: int, log=print):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    texts = C.corpus(40000, seed=seed)
    rows = [tokenizer(t).input_ids + [tokenizer.eos_token_id] for t in texts]
    train, val = rows[:-1000], rows[-1000:]
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=128,
        n_layer=3,
        n_head=4,
        n_inner=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.98))
    it = _batches(train, 64, tokenizer.pad_token_id, random.Random(seed))
    _fit(model, opt, it, _lm_loss, steps=steps, peak_lr=3e-3, warmup=100, name="lm", log=log)
    with torch.no_grad():
        tot, n = 0.0, 0
        vit = _batches(val, 100, tokenizer.pad_token_id, random.Random(1))
        for _ in range(len(val) // 100):
            ids, mask, _ = next(vit)
            labels = ids.masked_fill(mask == 0, -100)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            tgt = labels[:, 1:]
            tot += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum").item()
            n += (tgt != -100).sum().item()
    return model, {"lm_val_loss": tot / n, "lm_val_perplexity": math.exp(tot / n), "lm_params": sum(p.numel() for p in model.parameters())}


def stars(gold: float) -> int:
    """The star rating (1-5) a reviewer with this gold sentiment gives: -3 -> 1, 0 -> 3, +3 -> 5."""
    return int(min(5, max(1, round(3 + gold * 2 / 3))))


def _labelled(n: int, seed: int) -> list[tuple[str, int]]:
    """Reviews and review prefixes with their star rating; half the reviews have independent clause
    polarities, so the rating must be read from the whole text (not, e.g., from the closing phrase)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        text = C.review(rng, independent=rng.random() < 0.5)
        ws = text.split()
        if rng.random() < 0.5:
            text = " ".join(ws[: rng.randint(min(len(ws), 8), len(ws))])
        out.append((text, stars(C.gold_score(text))))
    return out


def train_reward(tokenizer, *, steps: int, seed: int, log=print):
    """A star-rating regressor: GPT2ForSequenceClassification with one output (problem_type regression)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed + 1)
    data = _labelled(30000, seed + 1000)
    train, val = data[:-2000], data[-2000:]
    rows = [tokenizer(t).input_ids for t, _ in train]
    labels = torch.tensor([y for _, y in train], dtype=torch.float32)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=1,
        problem_type="regression",
        id2label={0: "STARS"},
        label2id={"STARS": 0},
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2ForSequenceClassification(cfg)
    with torch.no_grad():  # start at the mean rating
        model.score.weight.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    it = _batches(rows, 64, tokenizer.pad_token_id, random.Random(seed + 2))

    def loss_fn(m, ids, mask, idx):
        return F.mse_loss(m(input_ids=ids, attention_mask=mask).logits[:, 0], labels[idx])

    _fit(model, opt, it, loss_fn, steps=steps, peak_lr=2e-3, warmup=50, name="reward", log=log)
    enc = tokenizer([t for t, _ in val], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**enc).logits[:, 0]
    target = torch.tensor([y for _, y in val], dtype=torch.float32)
    gold = torch.tensor([C.gold_score(t) for t, _ in val])
    return model, {
        "reward_val_rmse": float((pred - target).pow(2).mean().sqrt()),
        "reward_val_accuracy": float((pred.round().clamp(1, 5) == target).float().mean()),
        "reward_gold_correlation": float(torch.corrcoef(torch.stack([pred, gold]))[0, 1]),
        "reward_params": sum(p.numel() for p in model.parameters()),
    }


def build(out: str | Path = DEFAULT_DIR, *, seed: int = 0, lm_steps: int = 1200, reward_steps: int = 500, log=print) -> dict:
    """Build every artifact into ``out`` (lm/, reward/, prompt files, build_info.json); returns the figures."""
    out = Path(out)
    t0 = time.perf_counter()
    tok = build_tokenizer(C.vocabulary())
    log(f"1. tokenizer: {len(tok)} tokens")
    log(f"2. LM: {lm_steps} steps")
    lm, lm_info = train_lm(tok, steps=lm_steps, seed=seed, log=log)
    log(f"3. reward model: {reward_steps} steps")
    rm, rm_info = train_reward(tok, steps=reward_steps, seed=seed, log=log)
    out.mkdir(parents=True, exist_ok=True)
    for sub, model in (("lm", lm), ("reward", rm)):
        model.save_pretrained(out / sub)
        tok.save_pretrained(out / sub)
    train, held = C.prompt_sets()
    (out / "prompts_train.txt").write_text("\n".join(train) + "\n")
    (out / "prompts_eval.txt").write_text("\n".join(held) + "\n")
    info = {
        "seed": seed,
        "lm_steps": lm_steps,
        "reward_steps": reward_steps,
        "vocab_size": len(tok),
        **lm_info,
        **rm_info,
        "build_seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"4. wrote {out} ({info['build_seconds']} s): " + ", ".join(f"{k}={v:.4g}" for k, v in info.items() if isinstance(v, float)))
    return info
