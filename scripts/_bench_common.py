"""Shared set-up of the benchmark scripts: a pipeline folder, a config, a task, timing helpers."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def add_common_args(parser):
    parser.add_argument(
        "--model",
        default="tiny",
        help="pipeline folder or hub id of any supported family; 'tiny' = the tiny SD test pipeline, 'tiny-sdxl', "
        "'tiny-sd3', 'tiny-flux', 'tiny-flux2-klein', 'tiny-qwen-image' the other families' tiny pipelines",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--prompts", type=int, default=8, help="number of prompts P")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt K")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=32, help="our generation batch (mixed prompts)")
    parser.add_argument("--reward", default="brightness")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; medians are reported")
    return parser


def setup_threads(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def make_config(args, **over):
    from raft_diffusion.diffusion.config import config_from_dict
    from raft_diffusion.diffusion.task import resolve_pretrained

    prompts = [f"a {c} {s}" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square", "star", "triangle")]
    prompts = (prompts * (args.prompts // len(prompts) + 1))[: args.prompts]
    data = {
        "seed": 0,
        "num_stages": 1,
        "progress": False,
        "model": {"pretrained": resolve_pretrained(args.model), "device": args.device},
        "prompts": {"train": prompts, "eval": prompts[:2]},
        "sampling": {"num_per_prompt": args.k, "batch_size": args.batch_size, "num_inference_steps": args.steps, "guidance_scale": args.guidance},
        "reward": {"name": args.reward},
        "ranking": {"mode": "local", "top_k": 1},
        "train": {"steps_per_stage": 20, "batch_size": 4},
        "eval": {"num_per_prompt": 2, "save_images": False},
        "save_kept_images": False,
    }
    for key, value in over.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return config_from_dict(data)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def median(xs):
    return statistics.median(xs)


def machine() -> str:
    import platform

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
