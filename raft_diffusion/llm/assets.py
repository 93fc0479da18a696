"""Files shipped in ``raft_diffusion/llm/assets/``: the built-in prompt lists and the committed toy text world.

Kept apart from ``model`` so that reading a prompt list imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOY_DIR = ASSETS_DIR / "toy"


def toy_path(part: str) -> Path:
    """A committed toy-world artifact (``lm``, ``reward``, ``prompts_train.txt`` ...); a clear error when absent."""
    p = TOY_DIR / part
    if not p.exists():
        raise UserError(f"toy text world artifact not found: {p}; build it with 'raft-diffusion llm toyworld build'")
    return p


def asset_path(rel: str) -> Path:
    """A file under raft_diffusion/llm/assets/ (toy-world files through ``toy_path``, so a missing build is explained)."""
    return toy_path(rel.split("/", 1)[1]) if rel.startswith("toy/") else ASSETS_DIR / rel
