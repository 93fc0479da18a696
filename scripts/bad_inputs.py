"""Run `raft-diffusion align` on a table of bad inputs and say which fail the way a user should see them fail.

    python scripts/bad_inputs.py                    # every case
    python scripts/bad_inputs.py --cases typo_model,output_is_file
    python scripts/bad_inputs.py --list

Each case is one subprocess `python -m raft_diffusion align --config configs/tiny.yaml --output-dir DIR ...`.
A case is clear when it exits with code 2, prints exactly one line on stderr and that line starts with
`error:`, fails within 5 seconds, and leaves its run directory untouched (absent, or exactly as it was).
One row per case (input, exit code, first line of stderr, seconds, untouched), then `bad_inputs_clear: N/M`.
The tiny model is built once before the table so that no case pays for it. The cases run on the tiny SD 1.x
pipeline (configs/tiny.yaml): they check input handling, which no family changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
LIMIT_S = 5.0

INF_REWARD = """
import torch
def inf_reward(images, prompts, **kwargs):
    return torch.full((len(images),), float("inf"))
"""

# The process is made to see a full disk: creating or writing anything in the scratch folder that holds the run
# directory fails with ENOSPC (a script cannot fill a real disk safely on a shared machine; a full disk refuses a new
# file in any of its folders, so the run directory's parent is full too).
DISK_FULL = """
import errno, os, pathlib, runpy, sys
folder = os.path.dirname(os.path.abspath(sys.argv[sys.argv.index("--output-dir") + 1]))  # the run directory's
def inside(p):
    return os.path.abspath(os.fspath(p)).startswith(folder)
def no_space(p):
    raise OSError(errno.ENOSPC, "No space left on device", os.fspath(p))
real_mkdir, real_open = os.mkdir, os.open
os.mkdir = lambda p, *a, **k: no_space(p) if inside(p) else real_mkdir(p, *a, **k)
os.open = lambda p, flags, *a, **k: no_space(p) if inside(p) and flags & (os.O_WRONLY | os.O_RDWR) else real_open(p, flags, *a, **k)
sys.argv[0] = "raft-diffusion"
runpy.run_module("raft_diffusion", run_name="__main__", alter_sys=True)
"""


@dataclass
class Case:
    name: str
    label: str  # the input, as a user would type it
    args: list[str] = field(default_factory=list)  # after `align --config configs/tiny.yaml --output-dir DIR`
    setup: Callable[[Path], None] | None = None  # prepares the scratch folder (files the args name, the run dir)
    config: str | None = None  # a --config other than configs/tiny.yaml (relative to the scratch folder)
    python_code: str | None = None  # run `python -c CODE` instead of `python -m raft_diffusion`


def _file_at_run(d: Path) -> None:
    (d / "run").write_text("not a folder\n")


def _read_only_run(d: Path) -> None:
    (d / "run").mkdir()
    (d / "run").chmod(0o555)


# root writes through a chmod 555 folder: there the case uses a read-only mount instead
READ_ONLY_MOUNT = Path("/proc/sys/raft-bad-inputs-run")
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _bad_prompts(d: Path) -> None:
    (d / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe a blue \xe9square\n")


def _inf_reward(d: Path) -> None:
    (d / "inf_reward.py").write_text(INF_REWARD)


def _bad_yaml(d: Path) -> None:
    text = TINY.read_text().replace("  num_per_prompt: 8", "  num_per_prompt: [8", 1)
    (d / "bad.yaml").write_text(text)


CASES = [
    Case("unknown_key", "topk=3", ["topk=3"]),
    Case("typo_model", "model.pretrained=/typo", ["model.pretrained=/typo"]),
    Case("output_is_file", "--output-dir FILE", setup=_file_at_run),
    Case("output_under_file", "--output-dir FILE/run", setup=_file_at_run),
    Case("read_only_output", "--output-dir READ_ONLY_DIR", setup=_read_only_run)
    if not AS_ROOT
    else Case("read_only_output", f"--output-dir {READ_ONLY_MOUNT} (read-only mount)", ["--output-dir", str(READ_ONLY_MOUNT)]),
    Case("disk_full", "full disk (simulated: every write in the run directory's folder fails with ENOSPC)", python_code=DISK_FULL),
    Case("huge_allocation", "sampling.height=1048576 sampling.width=1048576", ["sampling.height=1048576", "sampling.width=1048576"]),
    Case("unknown_reward", "reward.name=aestetic", ["reward.name=aestetic"]),
    Case("inf_reward", "reward.name=inf_reward.py:inf_reward (returns +inf)", ["reward.name=DIR/inf_reward.py:inf_reward"], _inf_reward),
    Case("bad_yaml", "--config with a YAML syntax error", config="bad.yaml", setup=_bad_yaml),
    Case("lr_scheduler", "train.lr_scheduler=bogus", ["train.lr_scheduler=bogus"]),
    Case("height_30", "sampling.height=30", ["sampling.height=30"]),
    Case("lora_dropout", "train.lora_dropout=2", ["train.lora_dropout=2"]),
    Case("non_utf8_prompts", "prompts.train=<non-UTF-8 file>", ["prompts.train=DIR/prompts.txt"], _bad_prompts),
    # a single name (train.target_modules=to_q) is accepted as a list of one since #17; a list of numbers is not
    Case("target_modules_numbers", "train.target_modules=[1, 2]", ["train.target_modules=[1, 2]"]),
    Case("huge_k", "sampling.num_per_prompt=1000000", ["sampling.num_per_prompt=1000000"]),
]


def snapshot(path: Path) -> dict | None:
    """Names, kinds, modes and contents of everything under ``path`` (None when absent)."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        return {".": ("file", path.stat().st_mode, hashlib.sha256(path.read_bytes()).hexdigest())}
    out = {".": ("dir", path.stat().st_mode)}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        out[rel] = ("dir", p.stat().st_mode) if p.is_dir() else ("file", p.stat().st_mode, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@dataclass
class Result:
    case: Case
    code: int | None
    first: str
    lines: int
    seconds: float
    untouched: bool

    @property
    def clear(self) -> bool:
        return self.code == 2 and self.lines == 1 and self.first.startswith("error:") and self.seconds < LIMIT_S and self.untouched


def run_case(case: Case, python: str, timeout: float) -> Result:
    with tempfile.TemporaryDirectory(prefix=f"bad_inputs_{case.name}_") as tmp:
        d = Path(tmp)
        if case.setup:
            case.setup(d)
        run = d / "run"
        if "--output-dir" in case.args:  # the case names its own run directory
            run = Path(case.args[case.args.index("--output-dir") + 1])
        before = snapshot(run)
        config = str(d / case.config) if case.config else str(TINY)
        cli = [
            "align",
            "--config",
            config,
            "--output-dir",
            str(run),
            "progress=false",
            *[a.replace("DIR", str(d)) for a in case.args if a != "--output-dir" and Path(a) != run],
        ]
        cmd = [python, "-c", case.python_code, *cli] if case.python_code else [python, "-m", "raft_diffusion", *cli]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, errors="replace")
            code, err = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            partial = e.stderr.decode("utf-8", "replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            code, err = None, f"(timed out after {timeout:.0f}s)\n{partial}"
        seconds = time.perf_counter() - t
        untouched = snapshot(run) == before
        if run.is_dir() and run.is_relative_to(d):
            os.chmod(run, 0o755)  # let the temporary folder go
        lines = [line for line in err.splitlines() if line.strip()]
        first = lines[0] if lines else ""
        return Result(case, code, first, len(lines), seconds, untouched)


def warm_cache(python: str) -> None:
    """Build the tiny model (and its cache folder) once, outside the timed cases."""
    code = "from raft_diffusion.diffusion.tiny import ensure_tiny_pipeline; ensure_tiny_pipeline()"
    subprocess.run(
        [python, "-c", code],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", help="comma-separated case names (default: all; see --list)")
    ap.add_argument("--list", action="store_true", help="print the case names and inputs, then exit")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs raft-diffusion")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds before a case is stopped (a case that runs on is not clear anyway)")
    ap.add_argument("--no-warm", action="store_true", help="do not build the tiny model before the table")
    args = ap.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.name:20} {c.label}")
        return 0
    cases = CASES
    if args.cases:
        by_name = {c.name: c for c in CASES}
        unknown = [n for n in args.cases.split(",") if n not in by_name]
        if unknown:
            print(f"error: unknown case {unknown[0]!r}; see --list", file=sys.stderr)
            return 2
        cases = [by_name[n] for n in args.cases.split(",")]
    if not args.no_warm:
        warm_cache(args.python)
    width = max(len(c.label) for c in cases)
    print(f"{'input':{width}} | exit | {'seconds':>7} | untouched | clear | first line of stderr")
    results = []
    for case in cases:
        r = run_case(case, args.python, args.timeout)
        results.append(r)
        first = r.first if len(r.first) <= 160 else r.first[:157] + "..."
        lines = "" if r.lines <= 1 else f" [+{r.lines - 1} more lines]"
        print(
            f"{case.label:{width}} | {str(r.code):>4} | {r.seconds:7.1f} | {'yes' if r.untouched else 'no':9} | "
            f"{'yes' if r.clear else 'no':5} | {first}{lines}",
            flush=True,
        )
    print(f"bad_inputs_clear: {sum(r.clear for r in results)}/{len(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
