"""The run directory: the unit of work, written atomically file by file, resumable.

    <run>/config.yaml            effective config
    <run>/metrics.jsonl          one JSON object per stage (stage 0 = the base model's evaluation)
    <run>/stages/<NNN>/          samples.jsonl, kept images, weights, stage.json (written last = done)
    <run>/final/                 weights of the last (or best) stage

``stage.json`` lists the size and SHA-256 of every file of its stage, so a resumed run notices a damaged
file (a truncated LoRA, a half-copied folder) and redoes that stage instead of crashing on it. Files and
folders get the permissions a plain write would give (the umask's), temporary files included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import faults
from .errors import UserError, os_advice

log = logging.getLogger("raft")

# Keys that may differ when a run is resumed: they change how far or how loudly it runs, not what it computes.
# eval.fallback only decides which stages get evaluated when a floor fires, as eval.every does.
RESUMABLE_CHANGES = ("num_stages", "progress", "eval.every", "eval.fallback", "eval.screen_per_prompt", "early_stop")


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


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def plain_mode(is_dir: bool) -> int:
    """The permissions ``open(path, "w")`` / ``mkdir`` would give a new file / folder under the current umask."""
    return (0o777 if is_dir else 0o666) & ~_umask()


def public_modes(root: Path) -> None:
    """Give ``root`` and everything in it plain-write permissions (``mkdtemp``/``mkstemp`` make them private)."""
    root = Path(root)
    if not root.exists():
        return
    dmode, fmode = plain_mode(True), plain_mode(False)
    paths = [root] + sorted(root.rglob("*"))
    for p in paths:
        if p.is_symlink():
            continue
        want = dmode if p.is_dir() else fmode
        if stat.S_IMODE(p.stat().st_mode) != want:
            os.chmod(p, want)


def atomic_write_text(path: Path, text: str, before_replace: Callable[[], None] | None = None) -> None:
    """Write ``text`` to ``path`` so a reader sees the old file or the new one, never half of it.

    The file ends with the permissions a plain write would give (an existing file's, else the umask's).
    ``before_replace`` runs with the temporary file complete but not yet in place (fault injection).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else plain_mode(False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace()
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


def read_jsonl_prefix(path: Path) -> tuple[list[dict], int | None]:
    """The rows of a JSONL file up to its first damaged line, and that line's number (None when intact)."""
    path = Path(path)
    if not path.exists():
        return [], None
    rows = []
    for n, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return rows, n
        if not isinstance(row, dict) or not isinstance(row.get("stage"), int):
            return rows, n
        rows.append(row)
    return rows, None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    public_modes(tmp)  # copytree copies the source's modes, and a temp-made source folder is private
    replace_dir(tmp, dst)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and prefix + k != "reward":
            out.update(_flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def check_run_kind(root: Path, cls, command: str) -> None:
    """Refuse, in one line, a run directory whose ``config.yaml`` is a config of another registered kind than
    ``cls`` (an LLM run given to an image command, or the reverse), naming the command that reads it. A folder
    without a readable config is left to the command's own checks."""
    from .config import kind_of

    try:
        data = yaml.safe_load((Path(root) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return
    found = kind_of(_flatten(data)) if isinstance(data, dict) else None
    if found is not None and found[0] is not cls:
        label, _, report = found[1]
        raise UserError(f"{root} holds {label} run, which `{command}` does not read; `{report.format(run=root)}` reports it")


def check_output_dir(root: Path, option: str = "--output-dir") -> None:
    """Fail early, before any model loads, when ``root`` cannot become a run directory (or the output folder of a
    command whose flag for it is ``option``, e.g. ``toyworld build --out``)."""
    if root.exists() and not root.is_dir():
        raise UserError(f"{option} {root} is a file, not a folder; choose another {option}")
    existing = root
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"{option} {root} cannot be made: {existing} is a file, not a folder; choose another {option}")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{option} {root} cannot be written: {existing} is read-only for this user; choose another {option} or fix its permissions")
    if existing.is_dir():
        _probe_write(existing, root, option)


def _probe_write(folder: Path, root: Path, option: str = "--output-dir") -> None:
    """Write and remove a 4 KiB file in ``folder`` (the run directory, or the nearest folder above it that exists), so
    that a full disk or a read-only file system is reported before any model loads. Nothing is left behind."""
    try:
        fd, name = tempfile.mkstemp(prefix=".raft-write-probe-", dir=folder)
        try:
            os.write(fd, bytes(4096))
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as e:
        advice = os_advice(e.errno, resume=False, option=option) or f"choose another {option} or fix its permissions"  # nothing to resume yet
        raise UserError(f"{option} {root} cannot be written: {e.strerror} in {folder}; {advice}") from None


class RunDir:
    """Paths and atomic I/O of one run.

    ``start(config)`` checks that the folder can hold this run (before any model loads) and writes nothing;
    ``begin()``, called by the stage loop once the task has loaded, writes ``config.yaml``. A folder whose
    run completed no stage takes a new config (a failed first attempt does not block its folder).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._pending: dict | None = None
        self._restart: str | None = None  # why an earlier attempt's files are dropped at begin()

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

    def _stage_dirs(self) -> dict[int, Path]:
        folder = self.root / "stages"
        if not folder.is_dir():
            return {}
        return {int(p.name): p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}

    # -- config --------------------------------------------------------------------------------
    def start(self, config: dict, defaults: dict | None = None) -> None:
        """Check the folder, and that a resumed run has the same config (except resumable keys).

        ``defaults`` (the config class's defaults) stand in for keys a snapshot written by an older version
        lacks, so that a key added later, left at its default, does not block the resume.
        Writes nothing: :meth:`begin` does, once the run has really started.
        """
        check_output_dir(self.root)
        self._pending, self._restart = config, None
        if not self.config_path.exists():
            return
        try:
            old = _flatten(yaml.safe_load(self.config_path.read_text()) or {})
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            old = None
        if old is None:
            diff = "its config.yaml is damaged"
        else:
            from .config import kind_of, packaged_relative

            # a packaged asset's path reads the same from any folder (relative from the repository, absolute elsewhere)
            old, new = packaged_relative(old), packaged_relative(_flatten(_jsonable(config)))
            given = old
            absent = _flatten(_jsonable(defaults or {}))
            old = {**{k: v for k, v in absent.items() if k not in old and k in new}, **old}
            diffs = [
                k
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)
            ]
            if not diffs:
                return
            there, here = kind_of(given), kind_of(new)  # an LLM run and an image config, or the reverse
            if there is not None and here is not None and there[0] is not here[0] and self.last_completed() > 0:
                raise UserError(f"run directory {self.root} holds {there[1][0]} run (`{there[1][1]}` resumes it); choose a new --output-dir")
            k = diffs[0]
            diff = f"{k}: {old.get(k)!r} there, {new.get(k)!r} now"
        if self.last_completed() == 0:
            self._restart = diff
            return
        if old is None:
            raise UserError(f"run directory {self.root} has a damaged config.yaml; restore it from a copy, or choose a new --output-dir")
        raise UserError(
            f"run directory {self.root} was started with a different config ({diff}); resume with the original settings or choose a new --output-dir"
        )

    def begin(self) -> None:
        """Write the config given to :meth:`start` (an earlier attempt that completed no stage is cleared first)."""
        if self._pending is None:
            return
        if self._restart is not None:
            print(
                f"run directory {self.root} completed no stage with its earlier config ({self._restart}); starting it afresh with the new one",
                flush=True,
            )
            for p in (self.root / "stages", self.final_dir, self.root / "gallery"):
                shutil.rmtree(p, ignore_errors=True)
            for p in (self.metrics_path, self.root / "early_stop.json"):
                p.unlink(missing_ok=True)
            self._restart = None
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, yaml.safe_dump(_jsonable(self._pending), sort_keys=False))
        self._pending = None

    # -- stages --------------------------------------------------------------------------------
    def stage_done(self, stage: int) -> bool:
        return (self.stage_dir(stage) / "stage.json").exists()

    def mark_done(self, stage: int, info: dict) -> None:
        """Seal a stage: plain permissions, then ``stage.json`` with every file's size and SHA-256 (written last)."""
        sdir = self.stage_dir(stage)
        sdir.mkdir(parents=True, exist_ok=True)
        public_modes(sdir)
        files = {}
        for p in sorted(sdir.rglob("*")):
            rel = p.relative_to(sdir)
            if p.is_file() and rel.as_posix() != "stage.json" and not any(part.startswith(".") for part in rel.parts):
                files[rel.as_posix()] = {"bytes": p.stat().st_size, "sha256": file_digest(p)}
        text = json.dumps(_jsonable({**info, "files": files}), indent=2) + "\n"
        atomic_write_text(sdir / "stage.json", text, before_replace=lambda: faults.fault_point("stage_json", stage))

    def check_stage(self, stage: int) -> str | None:
        """What is wrong with a completed stage's files (None when they match its ``stage.json``)."""
        sdir = self.stage_dir(stage)
        try:
            info = json.loads((sdir / "stage.json").read_text())
        except (OSError, ValueError):
            return f"{sdir / 'stage.json'} is not valid JSON"
        files = info.get("files") if isinstance(info, dict) else None
        if not isinstance(files, dict):
            return None if isinstance(info, dict) else f"{sdir / 'stage.json'} is not a JSON object"
        for rel, meta in files.items():  # sizes first: cheap, and they catch truncation
            p = sdir / rel
            if not p.is_file():
                return f"{p} is missing"
            if p.stat().st_size != meta.get("bytes"):
                return f"{p} has {p.stat().st_size} bytes, {meta.get('bytes')} were written"
        for rel, meta in files.items():
            if file_digest(sdir / rel) != meta.get("sha256"):
                return f"{sdir / rel} does not match the checksum in stage.json"
        return None

    def last_completed(self) -> int:
        """The highest stage s such that stages 1..s are all complete (0 when none is)."""
        s = 0
        while self.stage_done(s + 1):
            s += 1
        return s

    def recover(self) -> int:
        """Resume point: the last stage s such that stages 1..s are complete, intact and in metrics.jsonl.

        A damaged file (checksum, size, unreadable JSON) is reported in one warning naming it; that stage and
        the ones after it are redone. Folders of unfinished stages and metrics rows past s are removed.
        """
        rows, bad_line = read_jsonl_prefix(self.metrics_path)
        n_read = len(rows)
        in_metrics = {r["stage"] for r in rows}
        no_row = f"{self.metrics_path} line {bad_line} is damaged" if bad_line is not None else f"its row is missing from {self.metrics_path}"
        damage = None
        if self.stage_done(0) and (why := self.check_stage(0)):
            damage = (0, why)
            rows = []
        done = 0
        while damage is None and self.stage_done(done + 1):
            why = self.check_stage(done + 1) or (None if done + 1 in in_metrics else no_row)
            if why:
                damage = (done + 1, why)
                break
            done += 1
        if damage is not None:
            log.warning(
                "stage %d of %s is damaged (%s); redoing it%s",
                damage[0],
                self.root,
                damage[1],
                " and the stages after it" if self.stage_done(damage[0] + 1) else "",
            )
            shutil.rmtree(self.final_dir, ignore_errors=True)
        elif bad_line is not None:
            log.warning("%s line %d is damaged; dropped it (no completed stage needed it)", self.metrics_path, bad_line)
        keep = [r for r in rows if r["stage"] <= done]
        if bad_line is not None or len(keep) != n_read:
            write_jsonl(self.metrics_path, keep)
        has_base = any(r["stage"] == 0 for r in keep)
        for stage, folder in self._stage_dirs().items():
            if stage > done or (stage == 0 and not has_base and done == 0):
                shutil.rmtree(folder)  # an unfinished (or damaged) attempt: redone from scratch
        return done

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
