"""The opaque sample that flows through the model-agnostic core."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One generated output: where it came from, what it scored, and what it is.

    The core never looks inside ``payload``; adapters put whatever their fine-tuner needs there
    (latents and the decoded image for diffusion, token ids for LLMs).
    """

    prompt_index: int  # index into the stage's prompt list
    sample_index: int  # 0..K-1 within the prompt
    seed: int  # pure function of (run seed, stage, prompt index, sample index)
    reward: float = float("nan")  # NaN means "no score" and is never selected
    log_ratio: float | None = None  # log p_theta/p_base of the sample, when the generator can supply it
    payload: Any = None  # adapter-specific content; dropped once a sample cannot be kept
    embedding: Any = None  # a feature vector for ranking.diversity_weight (the adapter supplies it then)
    extras: dict = field(default_factory=dict)  # small JSON-able per-sample facts (reward components, paths)
    # the key a novelty pick ranked it by (reward + novelty term); None = its ranking key; not written to samples.jsonl
    selection_key: float | None = None

    def record(self) -> dict:
        """The JSON-able part written to ``samples.jsonl``."""
        out = {
            "prompt_index": self.prompt_index,
            "sample_index": self.sample_index,
            "seed": self.seed,
            "reward": None if self.reward != self.reward else float(self.reward),
        }
        if self.log_ratio is not None:
            out["log_ratio"] = float(self.log_ratio)
        out.update(self.extras)
        return out
