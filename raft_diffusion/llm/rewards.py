"""Text rewards for the LLM task, loaded through ``reward_models`` (trl convention:
``(prompts, completions, **kwargs) -> list[float | None]``).

Every name ``reward_models`` knows works (built-ins such as ``sequence_classifier``, entry points,
``package.module:function``, ``{mix: [...]}``); this module adds the toy world's short names.
"""

from __future__ import annotations

import torch

from ..core.common import load_with_kwargs_hint

TOY_REWARDS = {
    "toy_sentiment": "raft_diffusion.llm.toyworld.rewards:toy_sentiment",
    "toy_gold": "raft_diffusion.llm.toyworld.rewards:toy_gold",
}


def _expand(spec: dict) -> dict:
    spec = dict(spec)
    if "name" in spec and spec["name"] in TOY_REWARDS:
        spec["name"] = TOY_REWARDS[spec["name"]]
    if "mix" in spec:
        spec["mix"] = [_expand(item) if isinstance(item, dict) else TOY_REWARDS.get(item, item) for item in spec["mix"]]
    return spec


def load_text_reward(spec: dict, device):
    """A validated text reward (``reward_models.LoadedReward``) from a config mapping."""
    from reward_models import load_reward_from_config

    return load_with_kwargs_hint(spec, lambda: load_reward_from_config(_expand(spec), device=device, dtype=torch.float32))


def wrap_callable(fn, name: str = "custom"):
    """Give a plain ``(prompts, completions, **kw)`` callable the same output validation as loaded rewards."""
    from reward_models import LoadedReward

    return fn if isinstance(fn, LoadedReward) else LoadedReward(getattr(fn, "__name__", name), fn, "text")
