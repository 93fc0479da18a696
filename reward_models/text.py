"""Text rewards (trl convention): ``reward(prompts, completions, **kwargs) -> list[float | None]``.

``sequence_classifier`` wraps a transformers sequence-classification reward model. Prompts and completions
may be strings or, in trl's conversational format, lists of ``{"role", "content"}`` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._common import check_batch_size
from .checks import batch_slices
from .errors import RewardConfigError, RewardInputError, RewardWeightsNotFoundError

_EXAMPLES = "e.g. 'OpenAssistant/reward-model-deberta-v3-large-v2' or a local save_pretrained directory"


def _messages(x: Any, role: str) -> list[dict]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, dict):
        return [x]
    return list(x)


def _flatten(x: Any) -> str:
    if isinstance(x, str):
        return x
    return "".join(str(m.get("content", "")) for m in _messages(x, "user"))


def sequence_classifier(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model: str | None = None,
    tokenizer: str | None = None,
    label: int = 0,
    input_format: str = "auto",
    template: str = "{prompt}{completion}",
    max_length: int = 1024,
    batch_size: int = 8,
):
    """Factory for a sequence-classification reward model; score = ``logits[:, label]``.

    model: Hub id or local directory of an ``AutoModelForSequenceClassification`` checkpoint (required).
    tokenizer: defaults to ``model``.
    input_format: "chat" (the tokenizer's chat template over user prompt + assistant completion),
        "pair" (tokenizer(prompt, completion), e.g. OpenAssistant DeBERTa RMs), "concat" (``template``
        formatted with prompt and completion), or "auto" (chat if the tokenizer has a chat template, else concat).
    max_length: truncation length in tokens.
    """
    from .backbones import _hf_from_pretrained, _hf_hint, _hub_offline
    from .weights import from_cache_or_hub

    check_batch_size("sequence_classifier", batch_size)
    if not model:
        raise RewardConfigError(f"reward 'sequence_classifier': pass model=<Hub id or directory> ({_EXAMPLES})")
    if input_format not in ("auto", "chat", "pair", "concat"):
        raise RewardConfigError(f"reward 'sequence_classifier': input_format must be auto, chat, pair or concat, got {input_format!r}")
    from transformers import AutoTokenizer

    net = _hf_from_pretrained("AutoModelForSequenceClassification", str(model), reward="sequence_classifier", what="sequence-classification model")
    tok_src = str(tokenizer or model)
    try:
        tok = from_cache_or_hub(AutoTokenizer.from_pretrained, tok_src, _hub_offline("sequence_classifier", "the tokenizer", tok_src))
    except RewardWeightsNotFoundError:
        raise
    except Exception as e:
        raise RewardWeightsNotFoundError(
            f"reward 'sequence_classifier': could not load the tokenizer from {tok_src!r}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; {_hf_hint(tok_src)}"
        ) from e
    num_labels = int(net.config.num_labels)
    if not 0 <= label < num_labels and not -num_labels <= label < 0:
        raise RewardConfigError(f"reward 'sequence_classifier': label {label} out of range for {num_labels} logits")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if getattr(net.config, "pad_token_id", None) is None:
        net.config.pad_token_id = tok.pad_token_id
    fmt = input_format
    if fmt == "auto":
        fmt = "chat" if getattr(tok, "chat_template", None) else "concat"
    if fmt == "chat" and not getattr(tok, "chat_template", None):
        raise RewardConfigError(f"reward 'sequence_classifier': tokenizer {tok_src!r} has no chat template; use input_format='pair' or 'concat'")
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def encode(prompts: Sequence[Any], completions: Sequence[Any]):
        common = dict(padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        if fmt == "pair":
            return tok([_flatten(p) for p in prompts], [_flatten(c) for c in completions], **common)
        if fmt == "concat":
            texts = [template.format(prompt=_flatten(p), completion=_flatten(c)) for p, c in zip(prompts, completions)]
            return tok(texts, **common)
        texts = [tok.apply_chat_template(_messages(p, "user") + _messages(c, "assistant"), tokenize=False) for p, c in zip(prompts, completions)]
        return tok(texts, add_special_tokens=False, **common)

    def score(prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[float | None]:
        if isinstance(prompts, str) or isinstance(completions, str):
            raise RewardInputError("text reward 'sequence_classifier' expects lists of prompts and completions")
        prompts, completions = list(prompts), list(completions)
        if len(prompts) != len(completions):
            raise RewardInputError(
                f"text reward 'sequence_classifier' got {len(prompts)} prompts for {len(completions)} completions; expected one each"
            )
        out: list[float | None] = []
        with torch.inference_mode():
            for sl in batch_slices(len(completions), batch_size):
                enc = encode(prompts[sl], completions[sl])
                logits = net(**{k: v.to(device) for k, v in enc.items()}).logits
                out.extend(float(v) for v in logits[:, label].float().cpu())
        return out

    score.model = net
    score.tokenizer = tok
    return score
