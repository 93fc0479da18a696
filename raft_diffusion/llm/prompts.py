"""Prompt lists: an inline list, a text file (one prompt per line), or a built-in set
(``builtin:toy_train``, ``builtin:toy_eval``: the toy world's openers; ``builtin:movie_openers``: 24
hand-written movie-review openers for hub models such as gpt2)."""

from __future__ import annotations

from ..core.common import load_prompt_spec
from .assets import asset_path

# name -> file under raft_diffusion/llm/assets/
BUILTINS = {"toy_train": "toy/prompts_train.txt", "toy_eval": "toy/prompts_eval.txt", "movie_openers": "movie_openers.txt"}


def load_prompts(spec, key: str = "prompts.train") -> list[str]:
    """An inline list, a text file (one prompt per line) or ``builtin:NAME`` -> a non-empty list of prompts."""
    builtins = {name: (lambda rel=rel: asset_path(rel).read_text(encoding="utf-8").splitlines()) for name, rel in BUILTINS.items()}
    return load_prompt_spec(spec, builtins, key)
