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
from .registry import LoadedReward, is_known_reward_name, load_named_reward, unknown_reward


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


def _specs(cfg: dict) -> list[tuple[Any, dict, dict | None]]:
    """A config dict's rewards as ``(name, kwargs, mix item)`` (the item None for a single reward), after checking its
    keys; nothing is imported or loaded."""
    if not isinstance(cfg, dict):
        raise RewardConfigError(f"reward config must be a name or a dict, got {type(cfg).__name__}")
    if "mix" in cfg:
        unknown = set(cfg) - _MIX_KEYS
        if unknown:
            raise RewardConfigError(f"reward mix config: unknown keys {sorted(unknown)}; allowed: {sorted(_MIX_KEYS)}")
        items = cfg["mix"]
        if not isinstance(items, (list, tuple)) or not items:
            raise RewardConfigError("reward config 'mix' must be a non-empty list of {name, weight, kwargs} dicts")
        specs = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item:
                raise RewardConfigError(f"reward mix item {i} must be a dict with a 'name', got {item!r}")
            unknown = set(item) - _COMPONENT_KEYS
            if unknown:
                raise RewardConfigError(f"reward mix item {i}: unknown keys {sorted(unknown)}; allowed: {sorted(_COMPONENT_KEYS)}")
            specs.append((item["name"], _kwargs(item, i), item))
        return specs
    unknown = set(cfg) - _SINGLE_KEYS
    if unknown:
        hint = " (weights and normalisation belong to a 'mix')" if unknown & {"weight", "normalize"} else ""
        raise RewardConfigError(f"reward config: unknown keys {sorted(unknown)}; allowed: name, kwargs{hint}")
    if "name" not in cfg:
        raise RewardConfigError("reward config needs 'name' (or 'mix')")
    return [(cfg["name"], _kwargs(cfg, None), None)]


def check_reward_config(cfg: str | dict, kind: str | None = None, extra=()) -> None:
    """What can be known of a reward config before any model loads: its keys, and that each name is a built-in, an
    installed entry point, a ``module:function`` / ``file.py:function`` form or a callable (the form's module is only
    imported when the reward loads). Raises the error ``load_reward_from_config`` would; for an unknown name it lists
    the built-ins of ``kind`` (``"image"``, ``"text"``; None: all) and the caller's ``extra`` names, which also pass."""
    for name, _, _ in [(cfg, {}, None)] if isinstance(cfg, str) else _specs(cfg):
        if isinstance(name, str):
            if ":" not in name and name.strip() not in extra and not is_known_reward_name(name.strip()):
                raise unknown_reward(name.strip(), kind, extra)
        elif not callable(name):
            raise RewardConfigError(f"reward name must be a string or a callable, got {type(name).__name__} {name!r}")


def load_reward_from_config(cfg: str | dict, device: str | torch.device | None = None, dtype: Any = torch.float32):
    """Build a reward from a name or config dict (see the module docstring); returns a ``LoadedReward``."""
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if isinstance(cfg, str):
        return load_named_reward(cfg, device=device, dtype=dtype)
    specs = _specs(cfg)
    if "mix" not in cfg:
        name, kwargs, _ = specs[0]
        return load_named_reward(name, device=device, dtype=dtype, **kwargs)
    components, seen = [], {}
    for name, kwargs, item in specs:
        reward = load_named_reward(name, device=device, dtype=dtype, **kwargs)
        base = str(item.get("label") or (name if isinstance(name, str) else reward.name))
        seen[base] = seen.get(base, 0) + 1
        label = base if seen[base] == 1 else f"{base}#{seen[base]}"
        components.append((label, reward, item.get("weight", 1.0), component_normalization(cfg, item)))
    composite = CompositeReward(components, eps=float(cfg.get("eps", DEFAULT_EPS)))
    return LoadedReward(composite.__name__, composite, composite.kind)


def _kwargs(item: dict, index: int | None) -> dict:
    kw = item.get("kwargs") or {}
    if not isinstance(kw, dict):
        where = f"reward mix item {index}" if index is not None else "reward config"
        raise RewardConfigError(f"{where}: 'kwargs' must be a dict, got {type(kw).__name__}")
    return kw
