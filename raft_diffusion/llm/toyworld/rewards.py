"""Rewards of the toy text world, in the ``reward_models`` text-reward convention.

- ``toy_sentiment``: the committed sentiment reward model (a GPT-2 sequence classifier with one
  output: the predicted 1-5 star rating of the review) through ``reward_models``'
  ``sequence_classifier``, scoring ``"{prompt} {completion}"``. This is what RAFT optimises in the demo.
- ``toy_gold``: the gold sentiment from the generating lexicon (see ``corpus.gold_score``): the
  held-out measure of what the reward model was meant to capture.
"""

from __future__ import annotations

import torch

from reward_models import reward_factory

from .corpus import gold_sentiment


@reward_factory(kind="text")
def toy_sentiment(device="cpu", dtype=torch.float32, batch_size: int = 64):
    from reward_models.text import sequence_classifier

    from ..assets import toy_path

    return sequence_classifier(
        device=device,
        dtype=dtype,
        model=str(toy_path("reward")),
        label=0,
        input_format="concat",
        template="{prompt} {completion}",
        max_length=64,
        batch_size=batch_size,
    )


def toy_gold(prompts, completions, **kwargs):
    """Gold sentiment of each completion in [-3, 3] (mean polarity of its lexicon words; 0 = none)."""
    return gold_sentiment(prompts, completions)
