"""Stage overhead, and fine-tuning on kept latents against re-encoding kept images through the VAE.

1. One full stage (``run_raft`` with one stage: sample+score+select, fine-tune, save, evaluate, checkpoint)
   against the sum of its parts each timed alone on the same task: generation+scoring (``collect_pool``),
   fine-tuning (``task.finetune``), evaluation (``task.evaluate``).
2. Fine-tuning from the kept latents (what we do) against what a trainer that stores only images must do:
   encode every training batch through the VAE, then the same denoising step.
Any family (``--model``: a pipeline folder, hub id or ``tiny-<family>``). The last line is
``stage_overhead_ratio: <full stage / sum of parts>``; the line before it is
``finetune_latents_speedup: <re-encode time / latents time>``.
"""

from __future__ import annotations

import argparse
import tempfile

from _bench_common import add_common_args, machine, make_config, median, setup_threads, timed


def main():
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--train-steps", type=int, default=20)
    args = parser.parse_args()
    setup_threads(args)
    import torch

    from raft_diffusion.core.loop import collect_pool, run_raft
    from raft_diffusion.core.rundir import RunDir
    from raft_diffusion.diffusion.generate import encode_images as sd_encode_images
    from raft_diffusion.diffusion.task import DiffusionTask

    cfg = make_config(args, **{"train.steps_per_stage": args.train_steps})
    task = DiffusionTask(cfg)
    collect_pool(cfg, task, 1, {"reward_queries": 0})  # warm-up

    # -- 1. parts alone, then the whole stage -------------------------------------------------------
    parts = {"sample+score": [], "finetune": [], "evaluate": []}
    whole = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            sdir = RunDir(tmp).stage_dir(1)
            t, pool = timed(lambda: collect_pool(cfg, task, 1, {"reward_queries": 0}))
            parts["sample+score"].append(t)
            kept = pool.kept()
            parts["finetune"].append(timed(lambda kept=kept: task.finetune(1, kept))[0])
            parts["evaluate"].append(timed(lambda sdir=sdir: task.evaluate(1, sdir))[0])
        with tempfile.TemporaryDirectory() as tmp:
            run = RunDir(tmp)
            run.start(cfg.to_dict())
            run.put_metrics({"stage": 0, "seconds": 0.0})  # skip the base evaluation: time one stage only
            whole.append(timed(lambda run=run: run_raft(cfg, task, run))[0])
    sum_parts = sum(median(v) for v in parts.values())

    # -- 2. latents vs re-encoding images ------------------------------------------------------------
    kept = collect_pool(cfg, task, 1, {"reward_queries": 0}).kept()
    images = torch.stack([s.payload["image"] for s in kept])
    t_latents = median([timed(lambda: task.finetune(1, kept))[0] for _ in range(args.repeats)])
    bs = min(cfg.train.batch_size, len(kept))
    encode_images = sd_encode_images if task.legacy else task.family.encode_images  # the family's VAE encoding
    encode_one_batch = median(
        [timed(lambda: encode_images(task.pipe, images[:bs], [s.seed for s in kept[:bs]]))[0] for _ in range(max(3, args.repeats))]
    )
    t_reencode = t_latents + args.train_steps * encode_one_batch

    print(f"machine: {machine()}")
    print(f"pipeline: {cfg.model.pretrained}, P={args.prompts} K={args.k} steps={args.steps} train steps={args.train_steps}")
    print(f"{'part':28}{'median s':>10}")
    for name, v in parts.items():
        print(f"{name:28}{median(v):>10.2f}")
    print(f"{'sum of parts':28}{sum_parts:>10.2f}")
    print(f"{'whole stage (run_raft)':28}{median(whole):>10.2f}")
    print(f"{'finetune from latents':28}{t_latents:>10.2f}")
    print(f"{'finetune re-encoding images':28}{t_reencode:>10.2f}   ({args.train_steps} x {encode_one_batch * 1000:.0f} ms VAE encode of {bs})")
    print(f"finetune_latents_speedup: {t_reencode / t_latents:.2f}")
    print(f"stage_overhead_ratio: {median(whole) / sum_parts:.3f}")


if __name__ == "__main__":
    main()
