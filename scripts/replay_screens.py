#!/usr/bin/env python
"""Replay the stop at a target with screens (``eval.screen_per_prompt``, ``early_stop.screen_band_se``) on runs that
evaluated every stage in full, to choose the band from evidence instead of by guess.

    python scripts/replay_screens.py RUN [RUN ...] --config configs/toy_aesthetic_fast.yaml [--bands 0,0.5,1,2] [--set KEY=VALUE]

A screen draws the first n of each held-out prompt's fixed seeds, the seeds a full evaluation draws too, so a run
evaluated at every stage (``eval.every=1``; best with the stop and the floors off, so that it runs on) holds every
screen the preset would have drawn: the stop can be replayed at any band on the same trajectories. ``--config`` is the
preset whose stop is replayed (its target, floors, metric, ``eval.screen_per_prompt`` and band; default: the first
run's own config.yaml). For each run it prints every stage's full rise and the screen's paired estimate (in the base's
sd); for each band, per run, where the stop ends (the delivered stage, "floor@S" where a full evaluation fails a floor
and the guard would stop, "none"), the first stage that truly reaches the target above the floors, the full
evaluations that fall short, and the CPU seconds the run would have spent after its base evaluation (each stage's
own sampling and training, a screen as n/N of its full evaluation, the rest of the evaluation when called). The last
line is ``cpu_ratio_vs_default_band: R``: the replayed CPU seconds at the preset's band over those at the default
band (2), summed over the runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raft_diffusion.core.common import paired_screen, screen_metrics  # noqa: E402
from raft_diffusion.core.errors import UserError  # noqa: E402
from raft_diffusion.core.rundir import read_jsonl  # noqa: E402

DEFAULT_BAND = 2.0


def load_stages(run: Path, per_prompt: int) -> tuple[list[dict], list[dict]]:
    """(the run's metrics rows, one record per stage >= 1 evaluated in full: its row, its full evaluation's rows, the
    screen's (the first ``per_prompt`` seeds of each prompt) and the screen's figures as the loop would have had them
    (its mean, and its estimate paired with the base's evaluation), its own CPU seconds and its evaluation's)."""
    if not (run / "metrics.jsonl").is_file():
        raise UserError(f"{run}: no metrics.jsonl; name run directories (the --output-dir of raft-diffusion align)")
    rows = read_jsonl(run / "metrics.jsonl")
    by_stage = {r["stage"]: r for r in rows}
    if 0 not in by_stage or not (run / "stages" / "000" / "eval.jsonl").is_file():
        raise UserError(f"{run}: no base evaluation (stage 0's eval.jsonl); replay needs a run evaluated at every stage")
    base_eval = read_jsonl(run / "stages" / "000" / "eval.jsonl")
    stages, prev = [], by_stage[0]
    for stage in sorted(s for s in by_stage if s >= 1):
        row, shot = by_stage[stage], run / "stages" / f"{stage:03d}" / "eval.jsonl"
        if "eval_reward_mean" not in row or not shot.is_file():
            raise UserError(f"{run}: stage {stage} was not evaluated in full; replay needs eval.every=1 (every stage evaluated)")
        full = read_jsonl(shot)
        screen = [r for r in full if r["sample_index"] < per_prompt]
        eval_s = row["eval_seconds"] - prev["eval_seconds"]
        stages.append(
            {
                "row": row,
                "full": full,
                "screen": screen,
                "figures": {**screen_metrics([r["reward"] for r in screen]), **paired_screen(screen, base_eval)},
                "train_s": row["cpu_seconds"] - prev["cpu_seconds"] - eval_s,
                "eval_s": eval_s,
            }
        )
        prev = row
    return rows, stages


def replay(rows: list[dict], stages: list[dict], stopper, band: float) -> dict:
    """The stop of ``stopper`` (an :class:`~raft_diffusion.core.early_stop.EarlyStopper` with a target) at ``band``:
    {"end": delivered stage, "floor@S" or "none", "short": full evaluations that fell short, "cpu": CPU seconds}."""
    goal = stopper.target(rows)[0]
    cpu, short = 0.0, 0
    for st in stages:
        share = len(st["screen"]) / len(st["full"])
        cpu += st["train_s"] + share * st["eval_s"]
        est = stopper.screen_estimate(st["figures"])
        if est is None or est[0] + band * est[1] < goal:
            continue
        cpu += (1 - share) * st["eval_s"]
        if not stopper.passes_floors(rows, st["row"]):  # the floors are ratios to the base's row
            return {"end": f"floor@{st['row']['stage']}", "short": short, "cpu": cpu}
        if st["row"][stopper.metric] >= goal:
            return {"end": str(st["row"]["stage"]), "short": short, "cpu": cpu}
        short += 1
    return {"end": "none", "short": short, "cpu": cpu}


def first_at_target(rows: list[dict], stages: list[dict], stopper) -> int | None:
    """The first stage whose full evaluation reaches the target above the floors (what a perfect screen would stop at)."""
    goal = stopper.target(rows)[0]
    for st in stages:
        if st["row"][stopper.metric] >= goal and stopper.passes_floors(rows, st["row"]):
            return st["row"]["stage"]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories evaluated at every stage (eval.every=1)")
    ap.add_argument("--config", default=None, help="the preset whose stop is replayed (default: the first run's config.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a config override of the preset (repeatable)")
    ap.add_argument("--kind", choices=["diffusion", "llm"], default="diffusion")
    ap.add_argument("--bands", default="0,0.25,0.5,0.75,1,1.5,2", help="early_stop.screen_band_se values to replay")
    args = ap.parse_args(argv)
    if args.kind == "llm":
        from raft_diffusion.llm.config import load_config
    else:
        from raft_diffusion.diffusion.config import load_config

    try:
        runs = [Path(r) for r in args.runs]
        cfg = load_config(args.config or runs[0] / "config.yaml", args.overrides)
        try:
            bands = [float(b) for b in args.bands.split(",")]
        except ValueError:
            raise UserError(f"--bands must be numbers separated by commas, e.g. 0,0.5,1 (got {args.bands!r})") from None
        per_prompt = cfg.eval.screen_per_prompt
        stopper = cfg.stopper()
        if stopper is None or stopper.target_rise_sd is None or not per_prompt:
            raise UserError("the replayed preset needs early_stop.target_rise_sd and eval.screen_per_prompt: pass --config PRESET")
        if stopper.metric != "eval_reward_mean":
            raise UserError(f"screens estimate eval_reward_mean; the preset's early_stop.metric is {stopper.metric}")
        data = {run: load_stages(run, per_prompt) for run in runs}
    except (UserError, OSError, ValueError) as e:
        print(f"replay_screens: {e}", file=sys.stderr)
        return 2

    print(
        f"replaying the stop of {args.config or runs[0] / 'config.yaml'}: target +{stopper.target_rise_sd:g} base sd, "
        f"screens of {per_prompt} seeds per prompt, its band {stopper.screen_band_se:g}"
    )
    for run, (rows, stages) in data.items():
        _, mean, std = stopper.target(rows)
        cells = []
        for st in stages:
            est, se = stopper.screen_estimate(st["figures"])
            floor = "" if stopper.passes_floors(rows, st["row"]) else " (floor)"
            cells.append(f"{st['row']['stage']}: {(st['row'][stopper.metric] - mean) / std:+.2f} ~{(est - mean) / std:+.2f}+-{se / std:.2f}{floor}")
        print(f"{run.name}: " + "; ".join(cells))
    print("(stage: full rise ~ screen estimate +- its standard error, in base sd)")
    print("band    " + "  ".join(f"{run.name[:18]:>18}" for run in data) + "  short   CPU s")
    totals = {}
    for band in sorted(set([*bands, DEFAULT_BAND, stopper.screen_band_se])):
        cells, short, cpu, missed = [], 0, 0.0, 0
        for rows, stages in data.values():
            out = replay(rows, stages, stopper, band)
            first = first_at_target(rows, stages, stopper)
            missed += out["end"] != str(first) and first is not None
            short += out["short"]
            cpu += out["cpu"]
            cells.append(f"{out['end']:>6} ({first or '-'}) {out['cpu']:6.0f}")
        totals[band] = cpu
        mark = " (the preset's)" if band == stopper.screen_band_se else ""
        print(
            f"{band:<6g}  "
            + "  ".join(f"{c:>18}" for c in cells)
            + f"  {short:5d}  {cpu:6.0f}  runs past their first stage at the target: {missed}{mark}"
        )
    print("(per run: where the stop ends (the first stage at the target above the floors) and its CPU s after the base)")
    ratio = totals[stopper.screen_band_se] / totals[DEFAULT_BAND] if totals[DEFAULT_BAND] else float("nan")
    print(f"cpu_ratio_vs_default_band: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
