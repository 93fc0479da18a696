"""Peak resident memory of one stage at K=8 and K=64 with the same number kept (best 1 per prompt).

Each K runs in a fresh child process; a sampler thread records the process's RSS during the stage.
The streaming pool holds only each prompt's current best, so memory should not grow with K. Any family
(``--model``: a pipeline folder, hub id or ``tiny-<family>``).
The last line is ``peak_rss_ratio: <peak RSS at K=64 / peak RSS at K=8>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time

from _bench_common import add_common_args, machine, make_config, setup_threads


def child(args) -> None:
    setup_threads(args)
    import psutil

    from raft_diffusion.core.loop import collect_pool
    from raft_diffusion.diffusion.task import DiffusionTask

    cfg = make_config(args, **{"sampling.height": args.size, "sampling.width": args.size})
    task = DiffusionTask(cfg)
    proc = psutil.Process()
    collect_pool(
        make_config(args, **{"sampling.num_per_prompt": 1, "sampling.height": args.size, "sampling.width": args.size}), task, 1, {"reward_queries": 0}
    )  # warm-up
    baseline = proc.memory_info().rss
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    pool = collect_pool(cfg, task, 1, {"reward_queries": 0})
    kept = pool.kept()
    seconds = time.perf_counter() - start
    done.set()
    t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    print(
        json.dumps(
            {
                "k": args.k,
                "baseline": baseline,
                "peak": peak[0],
                "kept": len(kept),
                "generated": len(pool.records),
                "max_payloads_held": pool.max_payloads_held,
                "seconds": seconds,
            }
        )
    )


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--size", type=int, default=128, help="image size in pixels (larger makes payloads visible)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(steps=2, guidance=1.0)
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = []
    for k in (8, 64):
        argv = (
            [sys.executable, __file__, "--child", "--k", str(k)]
            + [
                a
                for pair in (
                    ("--model", args.model),
                    ("--device", args.device),
                    ("--prompts", str(args.prompts)),
                    ("--steps", str(args.steps)),
                    ("--guidance", str(args.guidance)),
                    ("--batch-size", str(args.batch_size)),
                    ("--reward", args.reward),
                    ("--size", str(args.size)),
                )
                for a in pair
            ]
            + (["--threads", str(args.threads)] if args.threads else [])
        )
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    mb = 1 / 2**20
    print(f"machine: {machine()} (children: {args.threads or 'default'} threads)")
    print(f"pipeline {args.model} at {args.size}px, P={args.prompts}, steps={args.steps}, batch={args.batch_size}, best 1 per prompt kept")
    print(f"{'K':>4}{'generated':>11}{'kept':>6}{'payloads held (max)':>21}{'baseline MB':>13}{'peak MB':>10}{'growth MB':>11}{'s':>7}")
    for r in rows:
        print(
            f"{r['k']:>4}{r['generated']:>11}{r['kept']:>6}{r['max_payloads_held']:>21}{r['baseline'] * mb:>13.0f}"
            f"{r['peak'] * mb:>10.0f}{(r['peak'] - r['baseline']) * mb:>11.1f}{r['seconds']:>7.1f}"
        )
    payload_mb = (3 * args.size**2 + 4 * (args.size // 2) ** 2) * 4 * mb
    print(
        f"one sample's payload (image + latents, fp32): {payload_mb:.2f} MB; all K=64 samples held would be {payload_mb * 64 * args.prompts:.0f} MB"
    )
    print(f"peak_rss_ratio: {rows[1]['peak'] / rows[0]['peak']:.3f}")


if __name__ == "__main__":
    main()
