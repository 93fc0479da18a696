"""Per-sample seeds: a pure function of where the sample sits in the run.

``sample_seed(run_seed, stage, prompt_index, sample_index)`` is independent of batch size,
process count and generation order, so any stage can be regenerated exactly.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

_MASK = (1 << 63) - 1


def _hash(*parts: object) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _MASK


def sample_seed(run_seed: int, stage: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one training-pool sample."""
    return _hash("sample", run_seed, stage, prompt_index, sample_index)


def eval_seed(run_seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one held-out evaluation sample: the same at every stage, so stages compare on equal noise."""
    return _hash("eval", run_seed, prompt_index, sample_index)


def stage_seed(run_seed: int, stage: int, purpose: str) -> int:
    """Seed for stage-level randomness (prompt draw, training order, LoRA init)."""
    return _hash("stage", run_seed, stage, purpose)


def train_chunk_seed(train_seed: int, step: int, chunk: int) -> int:
    """Seed of one chunk of rows of one optimizer step (dropout masks): the same on whichever process computes it."""
    return _hash("chunk", train_seed, step, chunk)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (belt and braces; the code uses explicit generators)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
