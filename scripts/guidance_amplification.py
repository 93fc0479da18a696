#!/usr/bin/env python
"""How much classifier-free guidance amplifies what a stage's LoRA learnt (SD 1.x/2.x runs, e.g. the toy world's).

python scripts/guidance_amplification.py RUN_DIR [--stage 3] [--guidance 2] [--seed 0]

RAFT's pool may be drawn without guidance while the model is used with it (the toy world's presets: pool at 1,
held-out images at 2). The LoRA is trained on the conditional prediction; the unconditional one moves only as far
as the shared weights carry it. On one kept latent per prompt of the stage (``kept_latents.safetensors``), noised at
a few timesteps with a fixed draw, this prints the LoRA's change to the unconditional prediction against its change
to the conditional one (norm ratio, cosine), and the change of the guided prediction ``u + g (c - u)`` against the
conditional change: 1 where guidance passes the LoRA's change on as it is, up to ``g`` where the unconditional
branch does not follow. The LoRA is switched on and off on the same inputs (peft's adapters).
Last line: ``guided_change_ratio_max: <the largest ratio over the timesteps>``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TIMESTEPS = (950, 850, 700, 500, 300, 100)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--stage", type=int, default=3, help="the stage whose LoRA and kept latents are read")
    ap.add_argument("--guidance", type=float, default=2.0, help="the guidance the model is used at")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise draws")
    args = ap.parse_args(argv)

    import yaml
    from safetensors.torch import load_file

    from raft_diffusion.core.errors import UserError
    from raft_diffusion.diffusion.families import get_family
    from raft_diffusion.diffusion.prompts import load_prompts
    from raft_diffusion.diffusion.task import resolve_pretrained

    stage = args.run_dir / "stages" / f"{args.stage:03d}"
    if not (stage / "lora").is_dir() or not (stage / "kept_latents.safetensors").is_file():
        raise UserError(f"{stage} has no lora/ and kept_latents.safetensors: give a run directory and a completed stage")
    cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text(encoding="utf-8"))
    family = get_family("sd")
    pipe = family.load(resolve_pretrained(cfg["model"]["pretrained"]), device="cpu", dtype="fp32")
    pipe.load_lora_weights(str(stage / "lora"))
    prompts = load_prompts(cfg["prompts"]["train"])
    kept = load_file(str(stage / "kept_latents.safetensors"))  # keys p<prompt>_s<seed>
    first = {}
    for key in sorted(kept):
        first.setdefault(int(key[1:5]), key)
    indices = sorted(first)
    x0 = torch.stack([kept[first[i]] for i in indices]).float()
    embeds = family.encode_prompts(pipe, [prompts[i] for i in indices] + [""], do_cfg=False)
    cond, uncond = embeds.per_prompt["prompt_embeds"][:-1], embeds.per_prompt["prompt_embeds"][-1:].expand(len(indices), -1, -1)
    alphas = pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(args.seed)
    worst = 0.0
    print(f"{args.run_dir} stage {args.stage}: {len(indices)} kept latents, guidance {args.guidance}")
    print("    t  |du|/|dc|  cos(du, dc)  |guided change|/|dc|")
    for t in TIMESTEPS:
        noise = torch.randn(x0.shape, generator=g)
        xt = alphas[t].sqrt() * x0 + (1 - alphas[t]).sqrt() * noise
        tt = torch.full((len(indices),), t)

        def eps(text, xt=xt, tt=tt):
            return pipe.unet(xt, tt, encoder_hidden_states=text).sample.flatten(1)

        pipe.enable_lora()
        c1, u1 = eps(cond), eps(uncond)
        pipe.disable_lora()
        c0, u0 = eps(cond), eps(uncond)
        dc, du = c1 - c0, u1 - u0
        guided = du + args.guidance * (dc - du)
        ratio = (du.norm(dim=1) / dc.norm(dim=1)).mean().item()
        cos = torch.nn.functional.cosine_similarity(du, dc).mean().item()
        amp = (guided.norm(dim=1) / dc.norm(dim=1)).mean().item()
        worst = max(worst, amp)
        print(f"{t:5d}  {ratio:9.2f}  {cos:+11.2f}  {amp:20.2f}")
    print(f"guided_change_ratio_max: {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
