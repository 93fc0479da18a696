"""One sampling + LoRA training step of a full-size SDXL or SD3.5-medium pipeline on CPU (random weights).

    python scripts/fullsize_step.py --family sdxl      # SDXL base 1.0's architecture: UNet 2.6B, CLIP-L, bigG, VAE
    python scripts/fullsize_step.py --family sd3       # SD3.5-medium's: MMDiT-X 2.5B, CLIP-L, bigG, VAE (no T5-XXL)

Families: ``sdxl`` and ``sd3`` only (FLUX.1-dev's 12B transformer needs ~48 GB in fp32; its published config is
checked shape-only on the meta device by tests/test_families_full.py). The pipeline is built in memory from the
published configs (raft_diffusion.diffusion.families.fullsize) with diffusers' random initialisation; SD3.5 is
built without T5-XXL (4.8B parameters; the pipeline fills its part with zeros). Then, through the family interface
(what ``align`` runs): encode two prompts, sample one image each at --size px with --steps steps and CFG, decode,
add the family's default LoRA (rank --rank), one training step (the family's loss on the sampled latents,
backward, AdamW). Needs about 15 GB of free memory in fp32 (~7 GB with --dtype bf16).

Prints the figures (build time, CPU seconds, trainable parameter count, loss, change of the LoRA weights); the
last line is ``peak_rss_gib: <peak resident memory of the process, GiB>``.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["sdxl", "sd3"], required=True)
    parser.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--seq", type=int, default=32, help="SD3: T5 tokens (zeros without T5; the pipeline's default is 256)")
    args = parser.parse_args(argv)

    import torch

    from raft_diffusion.diffusion.families import get_family
    from raft_diffusion.diffusion.families.fullsize import build_pipeline
    from raft_diffusion.diffusion.families.lora import matching_modules
    from raft_diffusion.diffusion.families.memory import count_parameters, lora_parameter_count

    torch.set_grad_enabled(True)
    dtype = getattr(torch, DTYPES[args.dtype])
    family = get_family(args.family)
    print(f"{args.family}: {torch.get_num_threads()} threads, {args.size} px, {args.steps} steps, LoRA r{args.rank}, {args.dtype}", flush=True)

    # 1. The pipeline from the published configs.
    t0, c0 = time.perf_counter(), cpu_seconds()
    pipe = build_pipeline(args.family, dtype=dtype)
    denoiser = family.denoiser(pipe)
    sizes = {k: count_parameters(v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    print(f"built in {time.perf_counter() - t0:.0f} s ({cpu_seconds() - c0:.0f} CPU s): "
          + ", ".join(f"{k} {v:,}" for k, v in sizes.items()) + f"; peak RSS {peak_rss_gib():.2f} GiB", flush=True)  # fmt: skip

    # 2. Encode, sample with CFG, decode.
    t0, c0 = time.perf_counter(), cpu_seconds()
    extra = {"max_sequence_length": args.seq} if args.family == "sd3" else {}
    embeds = family.encode_prompts(pipe, ["a photo of a red cat", "a watercolour of a boat at sea"], do_cfg=True, **extra)
    latents = family.sample(pipe, embeds, [0, 1], [0, 1], steps=args.steps, guidance=5.0, height=args.size, width=args.size)
    images = family.decode(pipe, latents)
    assert images.shape == (2, 3, args.size, args.size) and torch.isfinite(latents).all(), "sampling produced non-finite latents"
    print(f"sampled {tuple(latents.shape)} latents and {tuple(images.shape)} images in {time.perf_counter() - t0:.0f} s "
          f"({cpu_seconds() - c0:.0f} CPU s); peak RSS {peak_rss_gib():.2f} GiB", flush=True)  # fmt: skip

    # 3. The family's default LoRA and one training step on the sampled latents.
    t0, c0 = time.perf_counter(), cpu_seconds()
    targets = family.default_lora_targets(denoiser)
    trainable = family.add_lora(denoiser, rank=args.rank, init_seed=0)
    expected = lora_parameter_count(denoiser, targets, args.rank)
    assert trainable == expected, (trainable, expected)
    named = [(n, p) for n, p in denoiser.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    denoiser.train()
    loss = family.training_loss(pipe, denoiser, latents, embeds, [0, 1], generator=torch.Generator().manual_seed(0)).mean()
    loss.backward()
    grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
    # B starts at zero, so only the B matrices get a gradient on the first step; a B whose layer's output the loss
    # does not use gets none (SD3.5: the last block's context query, whose context output is dropped)
    unused = [n for n, p in named if "lora_B" in n and (p.grad is None or not p.grad.any())]
    optimizer.step()
    stuck = [n for (n, p), a in zip(named, before) if "lora_B" in n and n not in unused and torch.equal(a, p.detach())]
    assert math.isfinite(loss.item()) and math.isfinite(grad_norm) and grad_norm > 0, (loss.item(), grad_norm)
    assert not stuck, f"{len(stuck)} LoRA B tensors with a gradient did not change, e.g. {stuck[0]}"
    n_b = sum("lora_B" in n for n, _ in named)
    print(f"LoRA on {len(matching_modules(denoiser, targets))} layers ({', '.join(targets)}): {trainable:,} trainable "
          f"parameters; loss {loss.item():.4f}, grad norm {grad_norm:.3g}; {n_b - len(unused)}/{n_b} LoRA B tensors got a "
          f"gradient and were updated (without one: {', '.join(unused) or 'none'}) "
          f"in {time.perf_counter() - t0:.0f} s ({cpu_seconds() - c0:.0f} CPU s)", flush=True)  # fmt: skip
    print(f"total {cpu_seconds():.0f} CPU s")
    print(f"peak_rss_gib: {peak_rss_gib():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
