"""The run directory: the unit of work, written atomically file by file, resumable.

    <run>/config.yaml            effective config
    <run>/metrics.jsonl          one JSON object per stage (stage 0 = the base model's evaluation)
    <run>/stages/<NNN>/          samples.jsonl, kept images, weights, stage.json (written last = done)
    <run>/final/                 weights of the last (or best) stage
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

# Keys that may differ when a run is resumed: they change how far or how loudly it runs, not what it computes.
RESUMABLE_CHANGES = ("num_stages", "progress", "eval.every", "early_stop")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _jsonable(x.item())
    return x


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst``, replacing what was there."""
    dst = Path(dst)
    old = dst.with_name(f".{dst.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    if old.exists():
        shutil.rmtree(old)


def copy_dir_atomic(src: Path, dst: Path) -> None:
    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix + k != "reward":
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


class RunDir:
    """Paths and atomic I/O of one run."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- layout ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def final_dir(self) -> Path:
        return self.root / "final"

    def stage_dir(self, stage: int) -> Path:
        return self.root / "stages" / f"{stage:03d}"

    # -- config --------------------------------------------------------------------------------
    def start(self, config: dict) -> None:
        """Create the run or check that a resumed run has the same config (except resumable keys)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.config_path.exists():
            old = _flatten(yaml.safe_load(self.config_path.read_text()) or {})
            new = _flatten(config)
            diffs = [
                k for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)
            ]
            if diffs:
                k = diffs[0]
                raise UserError(
                    f"run directory {self.root} was started with a different config ({k}: {old.get(k)!r} there, "
                    f"{new.get(k)!r} now); resume with the original settings or choose a new --output-dir"
                )
        atomic_write_text(self.config_path, yaml.safe_dump(_jsonable(config), sort_keys=False))

    # -- stages --------------------------------------------------------------------------------
    def stage_done(self, stage: int) -> bool:
        return (self.stage_dir(stage) / "stage.json").exists()

    def mark_done(self, stage: int, info: dict) -> None:
        write_json(self.stage_dir(stage) / "stage.json", info)

    def last_completed(self) -> int:
        """The highest stage s such that stages 1..s are all complete (0 when none is)."""
        s = 0
        while self.stage_done(s + 1):
            s += 1
        return s

    # -- metrics -------------------------------------------------------------------------------
    def metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_path)

    def put_metrics(self, row: dict) -> None:
        """Add (or replace) the row of ``row['stage']``; rows stay ordered by stage."""
        rows = [r for r in self.metrics() if r.get("stage") != row["stage"]]
        rows.append(row)
        write_jsonl(self.metrics_path, sorted(rows, key=lambda r: r["stage"]))

    def truncate_metrics(self, last_stage: int) -> None:
        """Drop rows of stages that did not complete (a killed run)."""
        rows = self.metrics()
        keep = [r for r in rows if r["stage"] <= last_stage]
        if len(keep) != len(rows):
            write_jsonl(self.metrics_path, keep)
