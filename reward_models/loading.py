"""Loading a reward from what a user writes: a name, a callable, or a config dict (one reward or a weighted mix;
the forms and the normalisations are described in ``composite``).

Config dicts::

    {"name": "aesthetic", "kwargs": {...}}                                  one reward
    {"mix": [{"name": ..., "weight": 1.0, "kwargs": {...}, "normalize": ..., "label": ...}, ...],
     "normalize": "none" | "zscore" | "running", "eps": 1e-6}               a weighted mix (CompositeReward)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ._common import resolve_device, resolve_dtype
from .composite import DEFAULT_EPS, CompositeReward
from .errors import RewardConfigError
from .registry import LoadedReward, load_named_reward


def load_reward(
    name: str | Callable | dict,
    device: str | torch.device | None = None,
    dtype: Any = torch.float32,
    **kwargs,
) -> LoadedReward:
    """Load a reward by name (built-in, entry point, ``module:function``, ``file.py:function``), from a
    callable, or from a config dict (see ``load_reward_from_config``).

    device: where model-backed rewards run (default: CUDA if available, else CPU). dtype: their weights' dtype
    (a ``torch.dtype`` or a name such as ``"bf16"``). ``kwargs`` go to the reward's factory.
    """
    if isinstance(name, dict):
        if kwargs:
            raise RewardConfigError("load_reward: put kwargs inside the config dict, not next to it")
        return load_reward_from_config(name, device=device, dtype=dtype)
    return load_named_reward(name, device=device, dtype=dtype, **kwargs)


_SINGLE_KEYS = {"name", "kwargs"}


def component_normalization(mix_cfg: dict, item) -> str:
    """The normalisation a mix item gets: its own ``normalize``, else the mix's, else ``none`` (a bare name has none
    of its own)."""
    own = item.get("normalize") if isinstance(item, dict) else None
    return own or mix_cfg.get("normalize") or "none"


_COMPONENT_KEYS = {"name", "kwargs", "weight", "normalize", "label"}
_MIX_KEYS = {"mix", "normalize", "eps"}


def load_reward_from_config(cfg: str | dict, device: str | torch.device | None = None, dtype: Any = torch.float32):
    """Build a reward from a name or config dict (see the module docstring); returns a ``LoadedReward``."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if isinstance(cfg, str):
        return load_named_reward(cfg, device=device, dtype=dtype)
    if not isinstance(cfg, dict):
        raise RewardConfigError(f"reward config must be a name or a dict, got {type(cfg).__name__}")
    if "mix" in cfg:
        unknown = set(cfg) - _MIX_KEYS
        if unknown:
            raise RewardConfigError(f"reward mix config: unknown keys {sorted(unknown)}; allowed: {sorted(_MIX_KEYS)}")
        items = cfg["mix"]
        if not isinstance(items, (list, tuple)) or not items:
            raise RewardConfigError("reward config 'mix' must be a non-empty list of {name, weight, kwargs} dicts")
        components, seen = [], {}
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item:
                raise RewardConfigError(f"reward mix item {i} must be a dict with a 'name', got {item!r}")
            unknown = set(item) - _COMPONENT_KEYS
            if unknown:
                raise RewardConfigError(f"reward mix item {i}: unknown keys {sorted(unknown)}; allowed: {sorted(_COMPONENT_KEYS)}")
            reward = load_named_reward(item["name"], device=device, dtype=dtype, **_kwargs(item, i))
            base = str(item.get("label") or (item["name"] if isinstance(item["name"], str) else reward.name))
            seen[base] = seen.get(base, 0) + 1
            label = base if seen[base] == 1 else f"{base}#{seen[base]}"
            weight = item.get("weight", 1.0)
            components.append((label, reward, weight, component_normalization(cfg, item)))
        composite = CompositeReward(components, eps=float(cfg.get("eps", DEFAULT_EPS)))
        return LoadedReward(composite.__name__, composite, composite.kind)
    unknown = set(cfg) - _SINGLE_KEYS
    if unknown:
        hint = " (weights and normalisation belong to a 'mix')" if unknown & {"weight", "normalize"} else ""
        raise RewardConfigError(f"reward config: unknown keys {sorted(unknown)}; allowed: name, kwargs{hint}")
    if "name" not in cfg:
        raise RewardConfigError("reward config needs 'name' (or 'mix')")
    return load_named_reward(cfg["name"], device=device, dtype=dtype, **_kwargs(cfg, None))


def _kwargs(item: dict, index: int | None) -> dict:
    kw = item.get("kwargs") or {}
    if not isinstance(kw, dict):
        where = f"reward mix item {index}" if index is not None else "reward config"
        raise RewardConfigError(f"{where}: 'kwargs' must be a dict, got {type(kw).__name__}")
    return kw
