"""Pool generation speed: our sample -> score -> select against the plain loop a user would write.

(a) plain: for each prompt, ``pipe(prompt, num_images_per_prompt=K)`` then score the batch and take the best;
(b) ours: the production path (``core.loop.collect_pool`` on a ``DiffusionTask``): batches mixed across prompts,
    prompt embeddings once, per-sample seeds, scoring per batch, streaming selection.
Same pipeline, prompts, K, steps, guidance and reward; repetitions interleaved (a, b, a, b, ...). Any family
(``--model``: a pipeline folder, hub id or ``tiny-<family>``).
The last line is ``generation_speedup: <(b)/(a) images per second>``.
"""

from __future__ import annotations

import argparse

from _bench_common import add_common_args, machine, make_config, median, setup_threads, timed


def main():
    args = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0])).parse_args()
    setup_threads(args)
    import torch

    from raft_diffusion.core.loop import collect_pool
    from raft_diffusion.diffusion.task import DiffusionTask

    cfg = make_config(args)
    task = DiffusionTask(cfg)  # the plain loop uses the very same pipeline object and reward
    pipe, reward, prompts = task.pipe, task.reward, task.train_prompts
    size = task.height
    n = len(prompts) * args.k

    def plain():
        best = []
        for i, prompt in enumerate(prompts):
            images = pipe(
                prompt,
                num_images_per_prompt=args.k,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                height=size,
                width=size,
                output_type="pt",
                generator=torch.Generator().manual_seed(i),
            ).images
            best.append(int(reward(images, [prompt] * args.k).argmax()))
        return best

    def ours():
        stats = {"reward_queries": 0}
        return collect_pool(cfg, task, 1, stats).kept()

    plain(), ours()  # warm-up (allocator, kernels)
    t_plain, t_ours = [], []
    for _ in range(args.repeats):
        t_plain.append(timed(plain)[0])
        t_ours.append(timed(ours)[0])
    a, b = n / median(t_plain), n / median(t_ours)
    print(f"machine: {machine()}")
    print(
        f"pipeline: {cfg.model.pretrained} ({size}px), P={len(prompts)} K={args.k} steps={args.steps} "
        f"guidance={args.guidance} reward={args.reward} our batch={args.batch_size}"
    )
    print(f"{'':24}{'images/s':>10}{'median s':>10}")
    print(f"{'(a) plain pipe() loop':24}{a:>10.2f}{median(t_plain):>10.2f}")
    print(f"{'(b) raft-diffusion pool':24}{b:>10.2f}{median(t_ours):>10.2f}")
    print(f"generation_speedup: {b / a:.2f}")


if __name__ == "__main__":
    main()
