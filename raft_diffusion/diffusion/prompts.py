"""Prompt sets: inline lists, text files (one prompt per line) and built-in sets."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from raft_diffusion.core.errors import UserError

# The ten CIFAR-10 class names: the prompts of the RAFT paper's Stable Diffusion notebook.
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Common animals, one or two words each (the kind of list DDPO trained its aesthetic runs on).
SIMPLE_ANIMALS = [
    "cat", "dog", "horse", "cow", "pig", "sheep", "goat", "rabbit", "mouse", "squirrel",
    "fox", "wolf", "bear", "deer", "raccoon", "lion", "tiger", "leopard", "elephant", "giraffe",
    "zebra", "kangaroo", "koala", "panda", "monkey", "gorilla", "camel", "llama", "owl", "eagle",
    "parrot", "penguin", "duck", "swan", "flamingo", "chicken", "frog", "turtle", "snake", "dolphin",
    "whale", "shark", "crab", "butterfly", "bee",
]  # fmt: skip

BUILTIN_PROMPTS: dict[str, list[str]] = {"cifar10": CIFAR10, "simple_animals": SIMPLE_ANIMALS}


def builtin_names() -> list[str]:
    return sorted(BUILTIN_PROMPTS)


def _read_prompt_file(path: Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    if not path.is_file():
        raise UserError(
            f"prompt file {str(path)!r} not found: give an existing text file (one prompt per line), "
            f"an inline list, or builtin:NAME ({', '.join(builtin_names())})"
        )
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_prompts(spec: str | Path | Iterable[str]) -> list[str]:
    """Resolve a prompt spec to a non-empty list of prompts.

    ``spec`` is an inline list of strings, ``"builtin:NAME"`` or a path to a text file.
    """
    if isinstance(spec, Path):
        prompts, where = _read_prompt_file(spec), f"prompt file {str(spec)!r}"
    elif isinstance(spec, str):
        if spec.startswith("builtin:"):
            name = spec.removeprefix("builtin:").strip()
            if name not in BUILTIN_PROMPTS:
                raise UserError(f"unknown built-in prompt set {name!r}: choose one of {', '.join(builtin_names())}")
            prompts, where = list(BUILTIN_PROMPTS[name]), f"built-in prompt set {name!r}"
        else:
            path = Path(spec).expanduser()
            prompts, where = _read_prompt_file(path), f"prompt file {spec!r}"
    else:
        items = list(spec)
        bad = [p for p in items if not isinstance(p, str)]
        if bad:
            raise UserError(f"prompts must be strings, got {bad[0]!r}: quote each prompt in the list")
        prompts, where = [p.strip() for p in items if p.strip()], "the inline prompt list"
    if not prompts:
        raise UserError(f"{where} has no prompts: give at least one non-empty prompt")
    return prompts
