"""Opt-in early stop: a guard against over-optimisation (reward hacking). Model-agnostic.

The rules read the ``metrics.jsonl`` rows (stage 0 = the base model) after every stage:

- patience: the monitored metric (``eval_reward_mean`` by default) has not improved by more than
  ``min_delta`` for ``patience`` stages (latest evaluated stage - stage of the best value >= patience);
- floors: the latest value of a metric is below ``ratio`` x the base model's (the kinds name theirs:
  prompt fidelity ``eval_clip_score`` and diversity ``eval_diversity`` for diffusion, distinct-2 for LLMs); with
  ``floor_patience`` n > 1, only once the last n evaluated stages are each under a floor (a stage under one calls a
  full evaluation of the next: :meth:`EarlyStopper.floor_recheck`), so one evaluation's dip does not end a run;
- target: the latest evaluated stage, above the floors, has raised the monitored metric by ``target_rise_sd``
  of the base model's per-sample standard deviations (``eval_reward_std`` for ``eval_reward_mean``): the run has
  reached what it was asked for and stops there.

Between full evaluations a run may screen a stage on a few of the held-out seeds (``eval.screen_per_prompt``):
:meth:`EarlyStopper.screen_calls_for_eval` says when the screen is close enough to the target for the stage
to be evaluated in full at once.

With ``early_stop.lora_scales`` a stage may be evaluated with its LoRA at a scale above 1 (the row's
``eval_lora_scale``): such a row describes a candidate for delivery, not the model that trains on, so the floors
and patience read only the other rows, while the target and the choice of ``final/`` read all of them (a scaled row
counts for the target only above the floors).

When a rule fires the loop stops and keeps the best stage as ``final/``: the trained stage with the
highest monitored metric among those that stay above the floors. Why it stopped is written to
``<run>/early_stop.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from .common import finite

STOP_FILE = "early_stop.json"


def _value(row: dict, key: str) -> float | None:
    v = row.get(key)
    if finite(v):
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
        target_rise_sd: float | None = None,
        screen_band_se: float = 2.0,
        floor_patience: int = 1,
    ):
        """``floors``: (metrics.jsonl key, label for messages, ratio) for each metric that must stay
        at or above ``ratio`` x the base model's value. ``target_rise_sd``: stop once ``metric`` (a ``..._mean``)
        has risen by this many of the base model's ``..._std`` at a stage above the floors. ``screen_band_se``: how many
        standard errors of a screen's estimate short of the target still call for a full evaluation. ``floor_patience``:
        how many evaluated stages in a row must be under a floor to stop."""
        self.patience = patience
        self.metric = metric
        self.min_delta = float(min_delta)
        self.floors = [(key, label, float(ratio)) for key, label, ratio in floors]
        self.target_rise_sd = None if target_rise_sd is None else float(target_rise_sd)
        self.screen_band_se = float(screen_band_se)
        self.floor_patience = int(floor_patience)

    @property
    def active(self) -> bool:
        return self.patience is not None or bool(self.floors) or self.target_rise_sd is not None

    def target(self, rows: list[dict]) -> tuple[float, float, float] | None:
        """(target value of the metric, the base model's mean and std of it), or None without a target or a base."""
        if self.target_rise_sd is None:
            return None
        base = next((r for r in rows if r["stage"] == 0), None)
        mean = None if base is None else _value(base, self.metric)
        std = None if base is None else _value(base, std_key(self.metric))
        if mean is None or std is None:
            return None
        return mean + self.target_rise_sd * std, mean, std

    def screen_estimate(self, screen: dict) -> tuple[float, float] | None:
        """A screen's estimate of the full evaluation's metric and its standard error: the estimate paired with the
        base's evaluation (``screen_reward_estimate`` and ``screen_reward_se``, :func:`~.common.paired_screen`) when
        the screen has one, else its mean and std / sqrt(n). None when the screen does not measure the metric."""
        key = screen_key(self.metric)
        est, se = _value(screen, key.removesuffix("_mean") + "_estimate"), _value(screen, key.removesuffix("_mean") + "_se")
        if est is not None and se is not None:
            return est, se
        mean, std, n = _value(screen, key), _value(screen, screen_key(std_key(self.metric))), screen.get("screen_n") or 0
        if mean is None or std is None or n < 1:
            return None
        return mean, std / math.sqrt(n)

    def screen_calls_for_eval(self, rows: list[dict], screen: dict) -> bool:
        """Whether a screened stage should be evaluated in full now: the screen's estimate of the metric
        (:meth:`screen_estimate`) is within ``screen_band_se`` standard errors of the target, or above it. Without a
        target: never."""
        goal, estimate = self.target(rows), self.screen_estimate(screen)
        if goal is None or estimate is None:
            return False
        return estimate[0] + self.screen_band_se * estimate[1] >= goal[0]

    def __call__(self, rows: list[dict]) -> str | None:
        """Why to stop now, or None to go on."""
        trained = [r for r in rows if not extrapolated(r)]
        streak = self._floored(rows)[-self.floor_patience :]
        if len(streak) == self.floor_patience and all(breach for _, breach in streak):
            breach = streak[-1][1]
            if self.floor_patience > 1:
                stages = ", ".join(str(r["stage"]) for r, _ in streak)
                breach += f"; under a floor at stages {stages} in a row (early_stop.floor_patience {self.floor_patience})"
            return breach
        if self.patience is not None:
            scored = [(r["stage"], _value(r, self.metric)) for r in trained if _value(r, self.metric) is not None]
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
        goal = self.target(rows)
        if goal is not None:
            latest = _latest(rows, self.metric)
            v = None if latest is None else _value(latest, self.metric)
            if latest is not None and latest["stage"] >= 1 and v >= goal[0] and self.passes_floors(rows, latest):
                _, base, std = goal
                rise = (v - base) / std if std > 0 else math.inf
                at = f" with its LoRA at scale {latest['eval_lora_scale']:g}" if extrapolated(latest) else ""
                return (
                    f"target reached: {self.metric} {v:.4g} at stage {latest['stage']}{at} rose "
                    f"{rise:.3g} base sd (early_stop.target_rise_sd {self.target_rise_sd:g})"
                )
        return None

    def floor_recheck(self, rows: list[dict]) -> bool:
        """Whether the next stage must be evaluated in full: ``floor_patience`` > 1 and the latest evaluated stage is
        under a floor (the run went on, so the floors can only be read again by a full evaluation)."""
        return self._pending_breach(rows) is not None

    def ended_under_floor(self, rows: list[dict]) -> str | None:
        """Why a run that has run all its stages must still fall back (``floor_patience`` > 1 and its last evaluated stage
        is under a floor, too few stages in a row to have stopped it), or None."""
        breach = self._pending_breach(rows)
        if breach is None:
            return None
        return (
            f"{breach}; the run ended before {self.floor_patience} evaluated stages in a row were (early_stop.floor_patience {self.floor_patience})"
        )

    def _pending_breach(self, rows: list[dict]) -> str | None:
        """With ``floor_patience`` > 1, why the latest evaluated stage is under a floor; None when it is not (or patience
        is 1, where such a stage has already stopped the run)."""
        floored = self._floored(rows) if self.floor_patience > 1 else []
        return floored[-1][1] if floored else None

    def _floored(self, rows: list[dict]) -> list[tuple[dict, str | None]]:
        """Each trained stage (>= 1) that a floor's metric was evaluated at, as it was trained (not at a LoRA scale), in
        order, with why it is under a floor (the first floor it misses) or None."""
        out = []
        for row in rows:
            if row["stage"] < 1 or extrapolated(row) or all(_value(row, key) is None for key, _, _ in self.floors):
                continue
            out.append((row, self._breach(rows, row)))
        return out

    def _breach(self, rows: list[dict], row: dict) -> str | None:
        """The first floor ``row`` is under, as a sentence, or None (unknown values and bases pass)."""
        for key, label, ratio in self.floors:
            base, v = self._base(rows, key), _value(row, key)
            if base is not None and v is not None and v < ratio * base:
                return f"{label} {key} {v:.4g} at stage {row['stage']} fell below {ratio:g} x the base model's {base:.4g} (= {ratio * base:.4g})"
        return None

    def passes_floors(self, rows: list[dict], row: dict) -> bool:
        """Whether a stage stays at or above every configured fidelity/diversity floor (unknown = passes)."""
        return self._breach(rows, row) is None

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


def _latest(rows: list[dict], key: str) -> dict | None:
    """The last row with a finite value of ``key``, or None."""
    return next((r for r in reversed(rows) if _value(r, key) is not None), None)


def extrapolated(row: dict) -> bool:
    """Whether a metrics row's held-out figures are of its stage's LoRA at a scale other than 1 (``eval_lora_scale``)."""
    return row.get("eval_lora_scale", 1.0) != 1.0


def std_key(metric: str) -> str:
    """The per-sample std that goes with a mean metric: ``eval_reward_mean`` -> ``eval_reward_std``."""
    return metric[: -len("_mean")] + "_std" if metric.endswith("_mean") else metric + "_std"


def screen_key(metric: str) -> str:
    """A held-out metric's name in a screen's row: ``eval_reward_mean`` -> ``screen_reward_mean``."""
    return "screen_" + metric.removeprefix("eval_")


def read_stop(run_root: str | Path) -> dict | None:
    """The early-stop record of a run (``reason``, ``stopped_after_stage``, ``final_stage``), or None."""
    path = Path(run_root) / STOP_FILE
    return json.loads(path.read_text()) if path.is_file() else None
