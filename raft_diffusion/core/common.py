"""Helpers both kinds share: statistics of rewards, prompt lists, devices, the build-once cache, reward labels.

Kept here so that the diffusion and LLM packages never carry a copy each.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    import torch

# -- statistics ------------------------------------------------------------------------------------


def screen_metrics(rewards: list[float]) -> dict:
    """A screen's metrics row (``eval.screen_per_prompt``): the mean and std of its held-out rewards, how many, and
    as many reward queries."""
    mean, std = mean_std(rewards)
    return {"screen_reward_mean": mean, "screen_reward_std": std, "screen_n": len(rewards), "eval_reward_queries": len(rewards)}


def paired_screen(screen: Sequence[Mapping], base: Sequence[Mapping]) -> dict:
    """A screen's estimate of the full held-out mean reward, paired with the base model's evaluation (stage 0) at the
    same held-out slots (prompt_index, sample_index: the same prompt and fixed seed). A screen's few seeds may be
    luckier or unluckier than the full set; the base's rewards there say by how much, and the stage's rewards
    follow the base's in part. So the screen's rewards ``y`` are regressed on the base's ``x`` at the same slots and
    the line is read at the base's full mean (a control variate): ``mean(y) + b (mean of all base rewards - mean(x))``,
    ``b`` the least-squares slope. ``screen_reward_se`` is the standard error of that estimate as a prediction of
    the full evaluation's mean (at the base's N slots, which include the screen's n), ``s sqrt((1 - n/N)/n +
    (full base mean - mean(x))^2 / sum (x - mean(x))^2)`` with ``s`` the residuals' std (n - 2 degrees of freedom):
    the screened rewards are part of the full mean, so only the other N - n are predicted (a finite-population
    correction, 1 - n/N). {} when fewer than 3 slots pair up or the base's rewards there do not vary."""
    by_slot = {(r["prompt_index"], r["sample_index"]): r["reward"] for r in base if finite(r.get("reward"))}
    pairs = [(by_slot[key], r["reward"]) for r in screen if finite(r.get("reward")) and (key := (r["prompt_index"], r["sample_index"])) in by_slot]
    n = len(pairs)
    if n < 3 or not by_slot:
        return {}
    full = sum(by_slot.values()) / len(by_slot)
    mx = sum(x for x, _ in pairs) / n
    my = sum(y for _, y in pairs) / n
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    if sxx <= 0:
        return {}
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    resid = sum(((y - my) - slope * (x - mx)) ** 2 for x, y in pairs) / (n - 2)
    se = math.sqrt(resid * (max(0.0, 1 - n / len(by_slot)) / n + (full - mx) ** 2 / sxx))
    return {"screen_reward_estimate": my + slope * (full - mx), "screen_reward_se": se, "screen_base_slope": slope}


def finite(v) -> bool:
    """Whether ``v`` is a finite int or float (not a bool, None, NaN or infinite)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mean_std(values: Iterable[float | None]) -> tuple[float, float]:
    """Mean and population std of the finite values; (nan, nan) when there are none."""
    import torch  # here, not at the top: prompt files are read before torch is imported

    v = torch.as_tensor([math.nan if x is None else x for x in values], dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    if v.numel() == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(unbiased=False))


def best_of_k(rewards: Sequence[float | None], groups: Sequence[int]) -> float:
    """Mean over groups (prompts) of the best finite reward in the group; NaN when no group has one."""
    best: dict[int, float] = {}
    for r, g in zip(rewards, groups):
        if r is not None and math.isfinite(r):
            best[g] = max(best.get(g, -math.inf), float(r))
    return sum(best.values()) / len(best) if best else math.nan


def summary(values: Iterable[float]) -> dict:
    """mean, std, max, min of the non-NaN values ({} when there are none)."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return {}
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / len(v)) ** 0.5
    return {"mean": mean, "std": std, "max": max(v), "min": min(v)}


# -- prompts ---------------------------------------------------------------------------------------


def read_prompt_file(path: Path, hint: str = "") -> list[str]:
    """One prompt per line (UTF-8); blank lines and lines starting with '#' are skipped."""
    if not path.is_file():
        raise UserError(
            f"prompt file {str(path)!r} not found: give an existing text file (one prompt per line), an inline list, or builtin:NAME{hint}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {str(path)!r} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_prompt_spec(spec, builtins: Mapping[str, Callable[[], list[str]]], key: str = "prompts") -> list[str]:
    """A prompt spec -> a non-empty list of prompts.

    ``spec`` is an inline list of strings, ``"builtin:NAME"`` (``builtins[NAME]()`` gives the list) or a
    path to a text file; ``key`` names the config key in errors.
    """
    names = ", ".join(sorted(builtins))
    hint = f" ({names})" if names else ""
    if isinstance(spec, Path):
        prompts, where = read_prompt_file(spec, hint), f"prompt file {str(spec)!r}"
    elif isinstance(spec, str):
        if spec.startswith("builtin:"):
            name = spec.removeprefix("builtin:").strip()
            if name not in builtins:
                raise UserError(f"{key}: unknown built-in prompt set {name!r}: choose one of {names}")
            prompts, where = [p.strip() for p in builtins[name]() if p.strip()], f"built-in prompt set {name!r}"
        else:
            prompts, where = read_prompt_file(Path(spec).expanduser(), hint), f"prompt file {spec!r}"
    elif isinstance(spec, (list, tuple)):
        bad = [p for p in spec if not isinstance(p, str)]
        if bad:
            raise UserError(f"{key}: prompts must be strings, got {bad[0]!r}: quote each prompt in the list")
        prompts, where = [p.strip() for p in spec if p.strip()], "the inline prompt list"
    else:
        raise UserError(f"{key} must be a list of prompts, a text file or builtin:NAME (got {type(spec).__name__})")
    if not prompts:
        raise UserError(f"{key}: {where} has no prompts: give at least one non-empty prompt")
    return prompts


# -- devices ---------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else CPU; an explicit device must exist."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} requested but CUDA is not available: use device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise UserError(f"device {device!r} does not exist ({count} CUDA devices): pick one of cuda:0..{count - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} requested but MPS is not available: use device=cpu or device=auto")
    return dev


# -- build-once cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$RAFT_DIFFUSION_CACHE``, else ``~/.cache/raft-diffusion``."""
    env = os.environ.get("RAFT_DIFFUSION_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "raft-diffusion"


def build_once(name: str, marker: str, build: Callable[[Path], None], cache_dir: Path | str | None = None) -> Path:
    """``<cache_dir>/<name>``, made by ``build(tmp_folder)`` the first time (``marker`` = a file it writes).

    The folder is written atomically (built in a temporary sibling, then renamed), so a killed or
    concurrent build never leaves a half-written model behind.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = root / name
    if (target / marker).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(tmp)
        if target.exists() and not (target / marker).is_file():
            shutil.rmtree(target)  # a stale, incomplete folder from an older layout
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- rewards ---------------------------------------------------------------------------------------


def load_with_kwargs_hint(cfg_reward, load: Callable[[], object]):
    """``load()`` (a reward loaded from the config mapping ``cfg_reward``); a bad-arguments error
    (``reward_models.errors.RewardArgumentsError``) also names the config's ``reward.kwargs``, which a preset may
    have left behind for another ``reward.name``."""
    from reward_models.errors import RewardArgumentsError

    try:
        return load()
    except RewardArgumentsError as err:
        kwargs = cfg_reward.get("kwargs") if isinstance(cfg_reward, Mapping) else None
        if not kwargs:
            raise
        raise RewardArgumentsError(
            f"{err}; the config's reward.kwargs are {kwargs}: with another reward.name, set reward.kwargs={{}} or its own"
        ) from None


def reward_label(spec: dict) -> str:
    """A short name for a reward config (``a+b`` for a mix; a ``module:function`` path by its function)."""
    if "mix" in spec:
        return "+".join(reward_label(c) if isinstance(c, dict) else str(c) for c in spec["mix"])
    name = str(spec.get("name"))
    return name.rsplit(":", 1)[-1] if ":" in name else name
