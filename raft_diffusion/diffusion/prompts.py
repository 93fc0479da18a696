"""Prompt sets: inline lists, text files (one prompt per line) and built-in sets.

Built-in sets are named ``builtin:NAME``, optionally with a query that filters and subsets them::

    builtin:parti                                    all 1632 PartiPrompts
    builtin:parti?category=animals,food-beverage     two categories (case and punctuation do not matter)
    builtin:parti?challenge=imagination&n=64&seed=0  a seeded subset of 64 (kept in the set's order)
    builtin:geneval?category=counting                GenEval's tag
    builtin:t2i-compbench?category=color             one T2I-CompBench category (validation split)

The evaluation sets (``parti``, ``geneval``, ``t2i-compbench``) ship unchanged with their licences in
``raft_diffusion/prompt_sets/`` (see its README.md); ``cifar10`` and ``simple_animals`` are lists defined here.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from urllib.parse import parse_qsl

from ..core.common import load_prompt_spec
from ..core.errors import UserError

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

PROMPT_SETS_DIR = Path(__file__).resolve().parents[1] / "prompt_sets"
T2I_COMPBENCH_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex", "numeracy", "3d_spatial")


# --- the shipped evaluation sets: (prompt, {field: value}) rows -------------------------------------------------


@cache
def _parti() -> tuple[tuple[str, dict[str, str]], ...]:
    with open(PROMPT_SETS_DIR / "parti" / "PartiPrompts.tsv", encoding="utf-8", newline="") as f:
        rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return tuple((r["Prompt"], {"category": r["Category"], "challenge": r["Challenge"]}) for r in rows)


@cache
def _geneval() -> tuple[tuple[str, dict[str, str]], ...]:
    lines = (PROMPT_SETS_DIR / "geneval" / "evaluation_metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return tuple((row["prompt"], {"category": row["tag"]}) for row in map(json.loads, filter(str.strip, lines)))


@cache
def _t2i_compbench() -> tuple[tuple[str, dict[str, str]], ...]:
    rows = []
    for category in T2I_COMPBENCH_CATEGORIES:
        text = (PROMPT_SETS_DIR / "t2i_compbench" / f"{category}_val.txt").read_text(encoding="utf-8")
        rows += [(line.strip(), {"category": category}) for line in text.splitlines() if line.strip()]
    return tuple(rows)


# name -> (rows, the fields a query may filter on)
EVAL_SETS: dict[str, tuple[Callable[[], tuple], tuple[str, ...]]] = {
    "parti": (_parti, ("category", "challenge")),
    "geneval": (_geneval, ("category",)),
    "t2i-compbench": (_t2i_compbench, ("category",)),
}


def builtin_names() -> list[str]:
    return sorted([*BUILTIN_PROMPTS, *EVAL_SETS])


def _slug(text: str) -> str:
    """``Food & Beverage`` -> ``food-beverage``: how category values are compared."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _int_option(options: dict, name: str, spec: str, key: str) -> int | None:
    if name not in options:
        return None
    try:
        return int(options[name])
    except ValueError:
        raise UserError(f"{key}: {spec!r} has {name}={options[name]!r}: give a whole number") from None


def builtin_set(spec: str, key: str = "prompts") -> list[str]:
    """The prompts of ``builtin:NAME[?field=a,b&...&n=N&seed=S]`` (module docstring). Unknown sets, fields and
    values, and ``n`` larger than what the filters leave, are one-line UserErrors naming the valid choices."""
    name, _, query = spec.removeprefix("builtin:").strip().partition("?")
    name = name.strip()
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise UserError(f"{key}: cannot read the query of {spec!r}: write builtin:NAME?field=value&n=64&seed=0") from None
    options: dict[str, str] = {}
    for k, v in pairs:
        if k in options:
            raise UserError(f"{key}: {spec!r} gives {k} twice: list several values as {k}=a,b")
        options[k] = v
    if name in EVAL_SETS:
        load, fields = EVAL_SETS[name]
        rows = list(load())
    elif name in BUILTIN_PROMPTS:
        fields, rows = (), [(p, {}) for p in BUILTIN_PROMPTS[name]]
    elif name.replace("-", "").lower() in ("hpdv2", "hps", "hpsv2"):
        raise UserError(
            f"{key}: the HPDv2 benchmark prompts are not shipped (they are not in the HPSv2 repository; hpsv2.benchmark_prompts() "
            "downloads them from the Hugging Face dataset zhwang/HPDv2): save them one per line and pass the file's path"
        )
    else:
        raise UserError(f"{key}: unknown built-in prompt set {name!r}: choose one of {', '.join(builtin_names())}")
    unknown = sorted(set(options) - set(fields) - {"n", "seed"})
    if unknown:
        allowed = ", ".join([*fields, "n", "seed"])
        raise UserError(f"{key}: builtin:{name} has no option {unknown[0]!r}: use {allowed}")
    for field in fields:
        if field not in options:
            continue
        values = {_slug(v): v for _, meta in rows for v in [meta[field]]}
        wanted = [_slug(v) for v in options[field].split(",") if v.strip()]
        bad = [w for w in wanted if w not in values]
        if bad or not wanted:
            choices = ", ".join(sorted(values))
            raise UserError(f"{key}: builtin:{name} has no {field} {bad[0] if bad else '(empty)'!r}: choose from {choices}")
        rows = [(p, meta) for p, meta in rows if _slug(meta[field]) in wanted]
    n, seed = _int_option(options, "n", spec, key), _int_option(options, "seed", spec, key)
    if n is not None:
        if not 1 <= n <= len(rows):
            raise UserError(f"{key}: {spec!r} asks for n={n} prompts but the selection has {len(rows)}: give 1 <= n <= {len(rows)}")
        picked = sorted(random.Random(0 if seed is None else seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in picked]
    elif seed is not None:
        raise UserError(f"{key}: {spec!r} gives seed without n: add n=<subset size> (seed picks which n prompts)")
    return [p for p, _ in rows]


def load_prompts(spec: str | Path | Iterable[str], key: str = "prompts") -> list[str]:
    """Resolve a prompt spec to a non-empty list of prompts.

    ``spec`` is an inline list of strings, ``"builtin:NAME"`` with an optional query (``cifar10``,
    ``simple_animals``, ``parti``, ``geneval``, ``t2i-compbench``; see the module docstring), or a path to a text
    file (one prompt per line).
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        prompts = builtin_set(spec, key)
        return load_prompt_spec(prompts, {}, key)
    builtins = {name: (lambda name=name: builtin_set(f"builtin:{name}", key)) for name in builtin_names()}  # names for hints
    return load_prompt_spec(list(spec) if isinstance(spec, (list, tuple)) else spec, builtins, key)
