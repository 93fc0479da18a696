"""Prompt lists: an inline list, a text file (one prompt per line), or a built-in set
(``builtin:toy_train``, ``builtin:toy_eval``: the toy world's openers; ``builtin:movie_openers``: 24
hand-written movie-review openers for hub models such as gpt2)."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError

# name -> file under raft_diffusion/llm/assets/
BUILTINS = {"toy_train": "toy/prompts_train.txt", "toy_eval": "toy/prompts_eval.txt", "movie_openers": "movie_openers.txt"}


def load_prompts(spec, key: str = "prompts.train") -> list[str]:
    if isinstance(spec, (list, tuple)):
        prompts = [str(p) for p in spec]
    elif isinstance(spec, str) and spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise UserError(f"{key}: unknown built-in prompt set {name!r}; choose one of {', '.join('builtin:' + b for b in BUILTINS)}")
        from .model import asset_path

        prompts = asset_path(BUILTINS[name]).read_text().splitlines()
    elif isinstance(spec, str):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise UserError(f"{key}: prompt file not found: {p} (give a text file with one prompt per line, a list, or builtin:toy_train)")
        prompts = p.read_text().splitlines()
    else:
        raise UserError(f"{key} must be a list of prompts, a text file or builtin:NAME (got {type(spec).__name__})")
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise UserError(f"{key} holds no prompts")
    return prompts
