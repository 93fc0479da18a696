"""Weighted mixes of rewards (:class:`CompositeReward`) and the config-dict form they are written in.

``reward_models.load_reward_from_config`` (in ``loading``) accepts::

    "aesthetic"                                             # a bare name
    {"name": "aesthetic", "kwargs": {"batch_size": 8}}      # one reward with factory kwargs
    {"mix": [{"name": "aesthetic", "weight": 1.0, "kwargs": {...}},
             {"name": "clip_score", "weight": 0.05, "normalize": "none"}],
     "normalize": "zscore"}                                 # none | zscore | running (default none)

A mix returns ``sum_i weight_i * normalize_i(raw_i)``, per sample. Normalisations (NaN entries are ignored in
the statistics and stay NaN):

- ``none``: the raw value.
- ``zscore``: ``(x - mean) / std`` over the current batch, with the population std (divide by n);
  if ``std <= eps`` the result is ``x - mean`` (all zeros for a constant batch).
- ``running``: the same with the mean and population std of every value seen so far, this batch included
  (exact cumulative statistics, merged per batch with Chan et al.'s formula). ``state_dict()`` /
  ``load_state_dict()`` save and restore them for resumed runs.

A sample whose score is NaN in any component is NaN ("no score") in the mix. After each call the composite
exposes ``last_components`` (``dict[label, Tensor[B]]`` of raw component values, float32 CPU) and
``last_normalized`` (the normalised values); labels are the component names, or ``label`` when given, made
unique with ``#2``, ``#3``...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .checks import check_images, check_reward_output, check_text_reward_output
from .errors import RewardConfigError, RewardError

NORMALIZATIONS = ("none", "zscore", "running")
DEFAULT_EPS = 1e-8


class RunningStats:
    """Exact cumulative mean and population variance of all finite values seen."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        x = x[torch.isfinite(x)].double()
        n = int(x.numel())
        if n == 0:
            return
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def _standardize(x: torch.Tensor, mean: float, std: float, eps: float) -> torch.Tensor:
    centred = x - mean
    return centred / std if std > eps else centred


def zscore(x: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Batch z-score ignoring NaN: ``(x - mean) / std`` (population std), or ``x - mean`` if ``std <= eps``."""
    x = x.double()
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return x.float()
    mean = float(finite.mean())
    std = float(((finite - mean) ** 2).mean().sqrt())
    return _standardize(x, mean, std, eps).float()


class CompositeReward:
    """Weighted sum of normalised component rewards; see the module docstring for the exact math."""

    def __init__(self, components: Sequence[tuple[str, Any, float, str]], eps: float = DEFAULT_EPS):
        """components: ``(label, reward_callable, weight, normalize)`` tuples; labels must be unique."""
        if not components:
            raise RewardConfigError("a reward mix needs at least one component")
        labels = [c[0] for c in components]
        if len(set(labels)) != len(labels):
            raise RewardConfigError(f"reward mix labels must be unique, got {labels}")
        for label, _, weight, norm in components:
            if norm not in NORMALIZATIONS:
                raise RewardConfigError(f"reward mix component '{label}': normalize must be one of {', '.join(NORMALIZATIONS)}, got {norm!r}")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                raise RewardConfigError(f"reward mix component '{label}': weight must be a finite number, got {weight!r}")
        self.components = list(components)
        self.eps = float(eps)
        self.stats: dict[str, RunningStats] = {c[0]: RunningStats() for c in components if c[3] == "running"}
        self.last_components: dict[str, torch.Tensor] = {}
        self.last_normalized: dict[str, torch.Tensor] = {}
        kinds = {getattr(c[1], "kind", None) for c in components} - {None}
        if len(kinds) > 1:
            raise RewardConfigError(f"a reward mix cannot combine image and text rewards ({', '.join(labels)})")
        self.kind = kinds.pop() if kinds else None
        self.__name__ = "mix(" + "+".join(labels) + ")"

    def _normalize(self, label: str, norm: str, raw: torch.Tensor) -> torch.Tensor:
        if norm == "none":
            return raw
        if norm == "zscore":
            return zscore(raw, self.eps)
        stats = self.stats[label]
        stats.update(raw)
        return _standardize(raw.double(), stats.mean, stats.std, self.eps).float()

    def __call__(self, *args, **kwargs):
        first = args[0] if args else kwargs.get("images", kwargs.get("prompts"))
        is_image = isinstance(first, torch.Tensor) or "images" in kwargs
        if is_image:
            images = args[0] if args else kwargs["images"]
            check_images(self.__name__, images)
            n = int(images.shape[0])
        else:
            completions = args[1] if len(args) > 1 else kwargs.get("completions")
            if completions is None:
                raise RewardError(f"text reward '{self.__name__}' must be called as reward(prompts, completions)")
            n = len(completions)
        raws, normed = {}, {}
        total = torch.zeros(n, dtype=torch.float32)
        for label, fn, weight, norm in self.components:
            out = fn(*args, **kwargs)
            if is_image:
                raw = check_reward_output(label, out, n)
            else:
                vals = check_text_reward_output(label, out, n)
                raw = torch.tensor([math.nan if v is None else v for v in vals], dtype=torch.float32)
            raws[label] = raw
            normed[label] = self._normalize(label, norm, raw)
            total = total + float(weight) * normed[label]
        self.last_components, self.last_normalized = raws, normed
        if is_image:
            return total
        return [None if math.isnan(v) else float(v) for v in total.tolist()]

    def state_dict(self) -> dict:
        """Running statistics of ``running`` components (empty for other normalisations)."""
        return {label: s.state_dict() for label, s in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        for label, s in state.items():
            if label not in self.stats:
                raise RewardConfigError(f"reward mix state has unknown running component '{label}'")
            self.stats[label].load_state_dict(s)
