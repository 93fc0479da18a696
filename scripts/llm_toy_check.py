"""Run configs/llm_toy_sentiment.yaml and check the toy-world acceptance figures.

    python scripts/llm_toy_check.py [--output-dir runs/llm_toy_check] [key=value ...]

Prints base vs final (the stage kept as final/) held-out reward, reward std, gold sentiment, distinct-1/2,
length and base perplexity, the runtime, and PASS/FAIL for: reward up by >= 1 base std, gold up,
distinct-2 per prompt >= 80% of the base model's. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "llm_toy_sentiment.yaml"))
    ap.add_argument("--output-dir", default=str(ROOT / "runs" / "llm_toy_check"))
    ap.add_argument("--keep", action="store_true", help="resume an existing run directory instead of starting afresh")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from raft_diffusion.core.early_stop import read_stop
    from raft_diffusion.core.rundir import RunDir
    from raft_diffusion.llm.cli import main as llm_main

    out = Path(args.output_dir)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    t0 = time.perf_counter()
    rc = llm_main(["align", "--config", args.config, "--output-dir", str(out), *args.overrides])
    seconds = time.perf_counter() - t0
    if rc:
        return rc
    rows = RunDir(out).metrics()
    stop = read_stop(out)
    final_stage = stop["final_stage"] if stop else rows[-1]["stage"]
    base, final = rows[0], next(r for r in rows if r["stage"] == final_stage)
    keys = [
        "eval_reward_mean",
        "eval_reward_std",
        "eval_gold_mean",
        "eval_distinct_1",
        "eval_distinct_2",
        "eval_distinct_1_per_prompt",
        "eval_distinct_2_per_prompt",
        "eval_length",
        "eval_repeated_2gram_rate",
        "eval_base_perplexity",
        "eval_best_of_k",
    ]
    print(f"\n{'metric':24s} {'base':>10s} {'stage ' + str(final_stage):>10s}")
    for k in keys:
        print(f"{k:24s} {base.get(k, float('nan')):10.4g} {final.get(k, float('nan')):10.4g}")
    print(f"{'eval_base_best_of_k':24s} {base.get('eval_base_best_of_k', float('nan')):10.4g}")
    d2 = "eval_distinct_2_per_prompt"  # what the preset's diversity floor reads (the pooled figure depends on the sample count)
    gain = (final["eval_reward_mean"] - base["eval_reward_mean"]) / base["eval_reward_std"]
    checks = {
        f"reward +{gain:.2f} base std (>= 1)": gain >= 1.0,
        f"gold {base['eval_gold_mean']:.3g} -> {final['eval_gold_mean']:.3g} (rises)": final["eval_gold_mean"] > base["eval_gold_mean"],
        f"distinct-2 per prompt {final[d2] / base[d2]:.0%} of base (>= 80%)": final[d2] >= 0.8 * base[d2],
    }
    print(f"\nwall time {seconds:.0f} s ({len(rows) - 1} stages)")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
