"""Discard rules applied to completions before ranking (a discarded completion gets no reward).

The reference implementation needed one after its model learned to win the reward with runs of
'#' characters; ``discard_regex: ['#{3,}']`` is that rule, ``repeated_ngram_size`` catches loops.
"""

from __future__ import annotations

import re
from collections import Counter


class Filters:
    """``reason(text, n_tokens, finish)`` -> why the completion is discarded, or None to keep it."""

    def __init__(self, cfg):
        self.min_tokens = cfg.min_tokens
        self.max_tokens = cfg.max_tokens
        self.regexes = [re.compile(p) for p in cfg.discard_regex]
        self.n = cfg.repeated_ngram_size
        self.max_repeats = cfg.max_ngram_repeats
        self.require_stop = cfg.require_stop

    def reason(self, text: str, n_tokens: int, finish: str = "eos") -> str | None:
        if n_tokens < self.min_tokens:
            return "empty" if n_tokens == 0 else f"shorter than {self.min_tokens} tokens"
        if self.max_tokens is not None and n_tokens > self.max_tokens:
            return f"longer than {self.max_tokens} tokens"
        if self.require_stop and finish == "length":
            return "cut off at max_new_tokens"
        for rx in self.regexes:
            if rx.search(text):
                return f"matches {rx.pattern!r}"
        if self.n:
            gram, count = most_repeated_ngram(text.split(), self.n)
            if count > self.max_repeats:
                return f"repeats {' '.join(gram)!r} {count} times"
        return None


def most_repeated_ngram(words: list[str], n: int) -> tuple[tuple[str, ...], int]:
    """The most frequent word n-gram and its count ((), 0 when the text has fewer than n words)."""
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return (), 0
    return max(counts.items(), key=lambda kv: kv[1])  # ties: the first to occur
