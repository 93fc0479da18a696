"""Opt-in early stop: a guard against over-optimisation (reward hacking). Model-agnostic.

The rules read the ``metrics.jsonl`` rows (stage 0 = the base model) after every stage:

- patience: the monitored metric (``eval_reward_mean`` by default) has not improved by more than
  ``min_delta`` for ``patience`` stages (latest evaluated stage - stage of the best value >= patience);
- floors: the latest value of a metric is below ``ratio`` x the base model's (the kinds name theirs:
  prompt fidelity ``eval_clip_score`` and diversity ``eval_diversity`` for diffusion, distinct-2 for LLMs).

When a rule fires the loop stops and keeps the best stage as ``final/``: the trained stage with the
highest monitored metric among those that stay above the floors. Why it stopped is written to
``<run>/early_stop.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

STOP_FILE = "early_stop.json"


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


class EarlyStopper:
    """``stopper(rows) -> reason | None`` (the loop's ``should_stop``) and ``stopper.best_stage(rows)``."""

    def __init__(
        self,
        patience: int | None = None,
        metric: str = "eval_reward_mean",
        min_delta: float = 0.0,
        floors: Sequence[tuple[str, str, float]] = (),
    ):
        """``floors``: (metrics.jsonl key, label for messages, ratio) for each metric that must stay
        at or above ``ratio`` x the base model's value."""
        self.patience = patience
        self.metric = metric
        self.min_delta = float(min_delta)
        self.floors = [(key, label, float(ratio)) for key, label, ratio in floors]

    @property
    def active(self) -> bool:
        return self.patience is not None or bool(self.floors)

    def __call__(self, rows: list[dict]) -> str | None:
        """Why to stop now, or None to go on."""
        for key, label, ratio in self.floors:
            base = self._base(rows, key)
            latest = next((r for r in reversed(rows) if _value(r, key) is not None), None)
            if base is None or latest is None or latest["stage"] == 0:
                continue
            v = _value(latest, key)
            if v < ratio * base:
                return f"{label} {key} {v:.4g} at stage {latest['stage']} fell below {ratio:g} x the base model's {base:.4g} (= {ratio * base:.4g})"
        if self.patience is not None:
            scored = [(r["stage"], _value(r, self.metric)) for r in rows if _value(r, self.metric) is not None]
            if len(scored) >= 2:
                best_stage, best = scored[0]
                for stage, v in scored[1:]:
                    if v > best + self.min_delta:
                        best_stage, best = stage, v
                latest_stage, latest = scored[-1]
                if latest_stage - best_stage >= self.patience:
                    by = f" by more than {self.min_delta:g}" if self.min_delta else ""
                    return (
                        f"{self.metric} has not improved{by} for {latest_stage - best_stage} stages "
                        f"(patience {self.patience}; best {best:.4g} at stage {best_stage}, "
                        f"{latest:.4g} at stage {latest_stage})"
                    )
        return None

    def passes_floors(self, rows: list[dict], row: dict) -> bool:
        """Whether a stage stays at or above every configured fidelity/diversity floor (unknown = passes)."""
        for key, _, ratio in self.floors:
            base, v = self._base(rows, key), _value(row, key)
            if base is not None and v is not None and v < ratio * base:
                return False
        return True

    def best_stage(self, rows: list[dict]) -> int | None:
        """The trained stage (>= 1) to keep as final/: highest metric among those above the floors
        (among all trained stages if none is); ties go to the earlier stage. None when no stage is scored."""
        scored = [r for r in rows if r["stage"] >= 1 and _value(r, self.metric) is not None]
        pool = [r for r in scored if self.passes_floors(rows, r)] or scored
        if not pool:
            return None
        return max(pool, key=lambda r: (_value(r, self.metric), -r["stage"]))["stage"]

    @staticmethod
    def _base(rows: list[dict], key: str) -> float | None:
        base = next((r for r in rows if r["stage"] == 0), None)
        v = None if base is None else _value(base, key)
        return v if v is not None and v > 0 else None  # a ratio of a non-positive base means nothing


def read_stop(run_root: str | Path) -> dict | None:
    """The early-stop record of a run (``reason``, ``stopped_after_stage``, ``final_stage``), or None."""
    path = Path(run_root) / STOP_FILE
    return json.loads(path.read_text()) if path.is_file() else None
