"""Small helpers shared by the built-in rewards."""

from __future__ import annotations

from typing import Any

import torch

from .errors import RewardConfigError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RewardConfigError(f"invalid device {device!r}: {e}") from e


def resolve_dtype(dtype: Any) -> torch.dtype:
    """Accept a ``torch.dtype`` or a name such as ``"float16"``/``"bf16"`` (as written in YAML configs)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise RewardConfigError(f"invalid dtype {dtype!r}; use one of {sorted(set(_DTYPES))}")
    return _DTYPES[key]


def check_batch_size(reward: str, batch_size: Any) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise RewardConfigError(f"reward '{reward}': batch_size must be a positive integer, got {batch_size!r}")
    return batch_size
