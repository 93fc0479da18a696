"""reward_models: image and text rewards for RAFT, usable on their own.

    from reward_models import load_reward, list_rewards
    aesthetic = load_reward("aesthetic", device="cuda")
    scores = aesthetic(images, prompts)   # images: float [B, 3, H, W] in [0, 1] -> float32 CPU Tensor[B]

Image rewards: ``(images, prompts, **kwargs) -> Tensor[B]`` (NaN = no score). Text rewards (trl convention):
``(prompts, completions, **kwargs) -> list[float | None]``. Names: built-ins (``list_rewards()``), entry points in
the group ``reward_models``, ``"package.module:function"`` or ``"path/to/file.py:function"``; see
``reward_models.registry`` for the factory rule and ``reward_models.loading`` for config dicts and weighted mixes.

Importing this package imports torch only; open_clip and transformers are imported when a reward needs them.
"""

from .aesthetic import AestheticMLP, load_aesthetic_head
from .backbones import clear_backbone_cache, load_hf_clip, load_open_clip, save_open_clip
from .checks import check_reward_output, check_text_reward_output
from .composite import CompositeReward, zscore
from .errors import (
    MissingDependencyError,
    RewardArgumentsError,
    RewardConfigError,
    RewardError,
    RewardInputError,
    RewardOutputError,
    RewardWeightsNotFoundError,
    UnknownRewardError,
)
from .loading import load_reward, load_reward_from_config
from .preprocess import ImageTransform
from .registry import ENTRY_POINT_GROUP, REGISTRY, LoadedReward, RewardInfo, list_rewards, reward_factory

__all__ = [
    "AestheticMLP",
    "CompositeReward",
    "ENTRY_POINT_GROUP",
    "ImageTransform",
    "LoadedReward",
    "MissingDependencyError",
    "REGISTRY",
    "RewardArgumentsError",
    "RewardConfigError",
    "RewardError",
    "RewardInfo",
    "RewardInputError",
    "RewardOutputError",
    "RewardWeightsNotFoundError",
    "UnknownRewardError",
    "check_reward_output",
    "check_text_reward_output",
    "clear_backbone_cache",
    "list_rewards",
    "load_aesthetic_head",
    "load_hf_clip",
    "load_open_clip",
    "load_reward",
    "load_reward_from_config",
    "reward_factory",
    "save_open_clip",
    "zscore",
]
