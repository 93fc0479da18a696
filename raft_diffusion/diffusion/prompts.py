"""Prompt sets: inline lists, text files (one prompt per line) and built-in sets."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..core.common import load_prompt_spec

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


def load_prompts(spec: str | Path | Iterable[str], key: str = "prompts") -> list[str]:
    """Resolve a prompt spec to a non-empty list of prompts.

    ``spec`` is an inline list of strings, ``"builtin:NAME"`` (``cifar10``, ``simple_animals``) or a path
    to a text file (one prompt per line).
    """
    builtins = {name: (lambda name=name: list(BUILTIN_PROMPTS[name])) for name in BUILTIN_PROMPTS}
    return load_prompt_spec(list(spec) if not isinstance(spec, (str, Path)) else spec, builtins, key)
