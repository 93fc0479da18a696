"""The protocol a kind of model implements to plug into the stage loop (:func:`~.loop.run_raft`).

Every hook the loop calls is listed here; the diffusion task (``raft_diffusion.diffusion.task``) and the
LLM task (``raft_diffusion.llm.task``) implement all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch

from .types import Sample


class RaftTask(Protocol):
    """What a kind of model plugs into the loop."""

    reward_name: str  # for error messages
    train_prompts: list[str]
    console_metrics: Sequence[tuple[str, str]]  # (metrics key, label) shown on each stage's console line
    # True when :meth:`score` does not ask the reward about discarded samples (they get None), so
    # ``reward_queries`` leaves them out; False = every sample of a batch is scored
    skips_discarded: bool

    def plan(self, stage: int) -> list[Sample] | None:
        """The stage's sample requests when the task has its own (an external pool's rows); None = the
        loop's plan: ``sampling.num_per_prompt`` seeded samples of each of the stage's prompts."""

    def sample(self, stage: int, requests: Sequence[Sample]) -> Iterator[list[Sample]]:
        """Generate the requested samples (payloads filled), yielding them in batches, in request order."""

    def discard(self, batch: list[Sample]) -> None:
        """Mark samples that must never be kept: ``extras["discarded"] = reason`` (e.g. the LLM's filters,
        diffusion's ``ranking.prompt_match``). Called on every batch before :meth:`score`."""

    def score(self, batch: list[Sample]) -> torch.Tensor | Sequence[float | None]:
        """Rewards of a batch, one per sample (NaN/None = no score). May add reward components to extras,
        embeddings for the spread-out pick, or the log-ratio of the KL key."""

    def save_kept(self, stage_dir: Path, kept: list[Sample]) -> None:
        """Persist what fine-tuning needs of the kept samples (images, latents, texts)."""

    def load_kept(self, stage_dir: Path, kept: list[Sample]) -> list[Sample]:
        """Fill payloads of kept samples saved by ``save_kept`` (offline mode, resume)."""

    def finetune(self, stage: int, kept: list[Sample]) -> dict:
        """Fine-tune the model on the kept samples; returns training metrics."""

    def save(self, stage_dir: Path) -> None:
        """Save the current weights into the stage folder."""

    def restore(self, stage_dir: Path) -> None:
        """Load the weights a completed stage saved (resume)."""

    def evaluate(self, stage: int, stage_dir: Path) -> dict:
        """Held-out metrics of the current model (stage 0 = the base model), with ``eval_reward_queries``:
        how many held-out samples (over all processes) the reward scored; the loop makes it cumulative."""

    def screen(self, stage: int, stage_dir: Path, per_prompt: int) -> dict:
        """``eval.screen_per_prompt``: the held-out reward of the current model on the first ``per_prompt``
        fixed seeds of each eval prompt (seeds :meth:`evaluate` uses), as ``screen_reward_mean``,
        ``screen_reward_std``, ``screen_n`` and ``eval_reward_queries``; its rows go to ``stage_dir/screen.jsonl``."""

    def weights_dir(self, stage_dir: Path) -> Path:
        """The folder inside ``stage_dir`` that ``final/`` should mirror."""

    def lora_scaled(self, scale: float) -> AbstractContextManager[None]:
        """``early_stop.lora_scales``: within the block the model's LoRA acts at ``scale`` (see
        :func:`~.lora_scale.scaled_lora`), for :meth:`screen` and :meth:`evaluate`; scale 1 changes nothing."""
