#!/usr/bin/env python
"""Time to aligned: the CPU seconds a demo run takes to deliver a final/ that meets the toy world's four bars.

    python scripts/bench_time_to_aligned.py [--config configs/toy_aesthetic_fast.yaml] [--run-dir DIR] [key=value ...]
    python scripts/bench_time_to_aligned.py --baseline configs/toy_aesthetic_v1.yaml [seed=1]   # side by side
    python scripts/bench_time_to_aligned.py --baseline configs/toy_aesthetic_v1.yaml --together seed=2

The default preset is the demo's (``make demo``): ``configs/toy_aesthetic_fast.yaml``. ``configs/toy_aesthetic.yaml``
is the six-stage demo before it, ``configs/toy_aesthetic_v1.yaml`` the eight-stage one before that.

Runs ``raft-diffusion align`` in a child process with one thread (OMP/MKL_NUM_THREADS=1) and prints per stage,
from ``metrics.jsonl``: process CPU seconds since the run's process started (start-up included), images sampled
(pool and held-out, cumulative), reward queries (pool; held-out under "eval q"), and for the evaluated stages the figures of
``scripts/bench_toyworld.py`` (held-out proxy rise in base sd, gold rise, fidelity, diversity) and how many of its
four bars they meet. The last line is ``cpu_seconds_to_bars: N``: the CPU seconds of the whole run (measured on
the child, from its start to its exit) when the ``final/`` it delivers meets the four bars, else ``inf``. With
``--run-dir`` naming a finished run it measures that run instead, taking N from its last metrics row. With
``--baseline CONFIG`` it first runs (or measures, ``--baseline-run-dir``) that preset with the same overrides, prints
its table too, and before the last line the ratio of the two Ns (this preset / baseline), both taken in the same
load window; ``--together`` starts the two at once instead (one thread each, each child's CPU seconds measured on
its own), so that both share the machine alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_toyworld import bars, delivered, measure  # noqa: E402


def start_align(config: str, run: Path, overrides: list[str]) -> subprocess.Popen | None:
    """``raft-diffusion align`` started in a child process with one thread; None when ``run`` is already finished."""
    if (run / "final").is_dir():
        return None
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "raft_diffusion", "align", "--config", config, "--output-dir", str(run), "progress=false", *overrides]
    return subprocess.Popen(cmd, env=env, cwd=ROOT)


def wait_align(proc: subprocess.Popen | None) -> tuple[int, float, int] | None:
    """Wait for a started align: (exit code, its CPU seconds, its minor page faults), each child measured on its own
    (``os.wait4``), so two runs side by side are told apart; None for a run that was not started."""
    if proc is None:
        return None
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_minflt


def report(run: Path, measured: tuple[int, float, int] | None) -> float | None:
    """Print one run's table and figures; its N (``inf`` if its final/ misses a bar), or None when align failed.
    ``measured``: the run's (exit code, CPU s, faults) from :func:`wait_align`, None for a finished run measured as it is."""
    measured_cpu = faults = None
    if measured is not None:
        rc, measured_cpu, faults = measured
        if rc:
            print(f"error: align exited with {rc}", file=sys.stderr)
            return None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    table = {o["row"]: o for o in measure(run)}
    base = table["base"]
    print(f"time to aligned: {run} (one thread; figures of the evaluated stages as in scripts/bench_toyworld.py)")
    head = f"{'stage':>5s} {'cpu s':>7s} {'images':>7s} {'queries':>7s} {'eval q':>6s} "
    print(head + f"{'d/sd':>6s} {'d gold':>7s} {'fidelity':>8s} {'divers.':>7s} {'bars':>4s}")
    pool_images = 0
    for r in rows:
        pool_images += r.get("num_generated", 0)
        eval_q = r.get("eval_reward_queries", 0)  # every held-out image is scored once
        o = table.get("base" if r["stage"] == 0 else f"stage {r['stage']}")  # None: a stage not evaluated
        if o is None:  # a screened stage (eval.screen_per_prompt) shows its screen's estimated rise as ~z
            screen = r.get("screen_reward_estimate", r.get("screen_reward_mean"))  # paired with the base when it can be
            z = (screen - rows[0]["eval_reward_mean"]) / rows[0]["eval_reward_std"] if screen is not None else None
            figures = f"{'-' if z is None else f'~{z:.2f}':>6s} {'-':>7s} {'-':>8s} {'-':>7s} {'-':>4s}"
        else:
            met = f"{sum(bars(o, base).values())}/4" if r["stage"] else "-"
            figures = f"{o['proxy_rise_sd']:6.2f} {o['gold_rise']:+7.2f} {o['fidelity']:8.3f} {o['diversity_ratio']:7.2f} {met:>4s}"
            if "eval_lora_scale" in r:  # early_stop.lora_scales: evaluated with the LoRA at a scale
                figures += f"  LoRA x{r['eval_lora_scale']:g}"
        counts = f"{r['stage']:>5d} {r.get('cpu_seconds', math.nan):7.1f} {pool_images + eval_q:>7d} {r.get('reward_queries', 0):>7d} {eval_q:>6d}"
        print(f"{counts} {figures}")
    final = delivered(run, list(table.values()))
    met = final is not None and all(bars(final, base).values())
    cpu = measured_cpu if measured_cpu is not None else rows[-1].get("cpu_seconds", float("nan"))
    if final is not None:
        print(f"final/ = {final['row']}: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in bars(final, base).items()))
    how = "measured on the align process, start to exit" if measured_cpu is not None else "from the last metrics row"
    extra = f", {faults / 1e6:.2f} M minor page faults" if faults is not None else ""
    print(f"run: {cpu:.1f} CPU s ({how}){extra}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return cpu if met and math.isfinite(cpu) else math.inf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy_aesthetic_fast.yaml"), help="default: the demo's preset")
    ap.add_argument("--run-dir", default=None, help="default: a fresh runs/time_to_aligned (a finished run there is measured as it is)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="a second preset to run first, side by side (same overrides), e.g. configs/toy_aesthetic_v1.yaml; prints the ratio of the two Ns",
    )
    ap.add_argument("--baseline-run-dir", default=None, help="the baseline's run directory (default: <run dir>_baseline)")
    ap.add_argument(
        "--together",
        action="store_true",
        help="with --baseline: start both runs at once, one thread each (the two cores shared alike), instead of one after the other",
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides passed to align")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    run = Path(args.run_dir or ROOT / "runs" / "time_to_aligned")
    old = None
    # with --together both runs start now; otherwise each starts when its table is due
    ahead = start_align(args.config, run, args.overrides) if args.baseline and args.together else None
    if args.baseline:
        old_run = Path(args.baseline_run_dir or f"{run}_baseline")
        old = report(old_run, wait_align(start_align(args.baseline, old_run, args.overrides)))
        if old is None:
            wait_align(ahead)
            return 1
        print()
    n = report(run, wait_align(ahead if ahead is not None else start_align(args.config, run, args.overrides)))
    if n is None:
        return 1
    if old is not None:
        ratio = n / old if math.isfinite(old) and math.isfinite(n) else math.nan
        print(f"baseline {Path(args.baseline).name}: cpu_seconds_to_bars {old:.1f}; this preset / baseline = {ratio:.3f}")
    print(f"cpu_seconds_to_bars: {f'{n:.1f}' if math.isfinite(n) else 'inf'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
