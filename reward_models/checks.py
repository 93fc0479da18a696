"""Validation of reward inputs and outputs.

``check_reward_output`` is applied by every callable that ``load_reward`` returns, so a bad plug-in fails
with a message that names it instead of corrupting a ranking later.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch

from .errors import RewardInputError, RewardOutputError


def check_reward_output(name: str, out: Any, batch_size: int, *, allow_all_nan: bool = False) -> torch.Tensor:
    """Validate an image reward's output and return it as a float32 CPU tensor of shape ``[batch_size]``.

    Accepted: a tensor of shape ``[B]`` or ``[B, 1]``, or a list/tuple/numpy array of ``B`` numbers
    (``None`` entries become NaN). Raised (``RewardOutputError``, naming the reward): anything else, a
    wrong length, an infinite value (a division by zero or log(0) upstream, which would win or lose every
    ranking and make the held-out mean NaN), or a batch where every value is NaN (unless ``allow_all_nan``).
    NaN means "no score".
    """
    if isinstance(out, torch.Tensor):
        tensor = out.detach()
    elif isinstance(out, (list, tuple)):
        values = []
        for i, v in enumerate(out):
            if v is None:
                values.append(math.nan)
            elif isinstance(v, torch.Tensor) and v.numel() == 1:
                values.append(float(v.item()))
            elif isinstance(v, Real):
                values.append(float(v))
            else:
                raise RewardOutputError(
                    f"reward '{name}' returned a list whose item {i} is {type(v).__name__}, not a number; "
                    f"a reward must return a tensor of shape [{batch_size}] (or a list of {batch_size} floats)"
                )
        tensor = torch.tensor(values, dtype=torch.float32)
    elif type(out).__module__ == "numpy" and hasattr(out, "shape"):
        tensor = torch.as_tensor(out)
    else:
        raise RewardOutputError(
            f"reward '{name}' returned {type(out).__name__}, not a tensor; "
            f"a reward must return a tensor of shape [{batch_size}] (or a list of {batch_size} floats)"
        )
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tuple(tensor.shape) != (batch_size,):
        raise RewardOutputError(
            f"reward '{name}' returned shape {list(tensor.shape)} for a batch of {batch_size}; expected [{batch_size}] (one score per image)"
        )
    if not (tensor.is_floating_point() or tensor.dtype in (torch.int32, torch.int64, torch.bool, torch.int16, torch.uint8)):
        raise RewardOutputError(f"reward '{name}' returned a tensor of dtype {tensor.dtype}; expected real numbers")
    tensor = tensor.to(device="cpu", dtype=torch.float32)
    infinite = torch.isinf(tensor)
    if bool(infinite.any()):
        raise _infinite(name, float(tensor[infinite][0]), int(infinite.sum()), batch_size, "images")
    if batch_size > 0 and not allow_all_nan and bool(torch.isnan(tensor).all()):
        raise RewardOutputError(
            f"reward '{name}' returned NaN for all {batch_size} samples; NaN means 'no score', so nothing "
            f"could be ranked (check the reward's inputs, weights and dtype)"
        )
    return tensor


def check_text_reward_output(name: str, out: Any, batch_size: int, *, allow_all_nan: bool = False) -> list[float | None]:
    """Validate a text reward's output (trl convention) and return ``list[float | None]`` of length B.

    Accepted: a list/tuple of numbers or ``None``, or a 1-D tensor/array; NaN becomes ``None``.
    Raised (``RewardOutputError``): another type, a wrong length, an infinite score, or every entry ``None``
    (unless ``allow_all_nan``).
    """
    if isinstance(out, torch.Tensor) or (type(out).__module__ == "numpy" and hasattr(out, "shape")):
        tensor = torch.as_tensor(out).detach().to("cpu")
        if tensor.ndim == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.ndim != 1:
            raise RewardOutputError(
                f"text reward '{name}' returned shape {list(tensor.shape)} for a batch of {batch_size}; expected {batch_size} scores"
            )
        out = tensor.tolist()
    if not isinstance(out, (list, tuple)):
        raise RewardOutputError(f"text reward '{name}' returned {type(out).__name__}; expected a list of {batch_size} floats or None")
    if len(out) != batch_size:
        raise RewardOutputError(f"text reward '{name}' returned {len(out)} scores for {batch_size} completions; expected one each")
    result: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            result.append(None)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, Real):
            raise RewardOutputError(f"text reward '{name}' returned {type(v).__name__} at position {i}; expected a float or None")
        f = float(v)
        result.append(None if math.isnan(f) else f)
    infinite = [v for v in result if v is not None and math.isinf(v)]
    if infinite:
        raise _infinite(name, infinite[0], len(infinite), batch_size, "completions")
    if batch_size > 0 and not allow_all_nan and all(v is None for v in result):
        raise RewardOutputError(f"text reward '{name}' returned no score (None/NaN) for all {batch_size} completions; nothing could be ranked")
    return result


def _infinite(name: str, value: float, count: int, batch_size: int, what: str) -> RewardOutputError:
    return RewardOutputError(
        f"reward '{name}' returned {value} for {count} of {batch_size} {what}; scores must be finite (return NaN or None for 'no score')"
    )


def check_images(name: str, images: Any) -> torch.Tensor:
    """Check that ``images`` is a float tensor ``[B, 3, H, W]`` (values expected in ``[0, 1]``)."""
    if not isinstance(images, torch.Tensor):
        raise RewardInputError(f"reward '{name}' expects images as a float tensor [B, 3, H, W] in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise RewardInputError(f"reward '{name}' expects images of shape [B, 3, H, W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise RewardInputError(f"reward '{name}' expects float images in [0, 1], got dtype {images.dtype} (divide uint8 images by 255)")
    return images


def broadcast_prompts(name: str, prompts: Any, batch_size: int) -> list[str]:
    """Return one prompt per image: a single string is repeated; a sequence must have length B."""
    if prompts is None:
        raise RewardInputError(f"reward '{name}' needs one prompt per image, got None")
    if isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise RewardInputError(f"reward '{name}' got {len(prompts)} prompts for {batch_size} images; expected one each")
    return [str(p) for p in prompts]


def batch_slices(total: int, batch_size: int) -> Sequence[slice]:
    """Slices that cover ``range(total)`` in chunks of ``batch_size``."""
    if batch_size < 1:
        raise RewardInputError(f"batch_size must be >= 1, got {batch_size}")
    return [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]
