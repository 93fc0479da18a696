"""Checks shared by the per-family test files (test_families_fifth.py, test_families_qwen_image.py): each family's
own file supplies its pipeline, embeddings and sampler; the assertions are the same."""

from __future__ import annotations

import json

import numpy as np
import torch


def lora_trains_saves_and_reloads(family, trained, fresh, embeds, sample, shape, tmp_path, atol, drop=0.8):
    """Ten Adam steps of the family's loss on fixed draws lower it (below ``drop`` of the first step's), the LoRA
    changes the samples, and a fresh pipeline
    (``fresh()``) that loads the saved LoRA with ``load_lora_weights`` samples the same latents (``atol``).
    ``trained``: a pipeline whose denoiser has the LoRA; ``sample(pipe, embeds, prompt_indices, seeds)``; ``shape``:
    one sample's latents ``(C, h, w)``."""
    denoiser = family.denoiser(trained)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, *shape, generator=g)
    before = sample(trained, embeds, [0, 1], [1, 2])
    optimizer = torch.optim.Adam([p for p in denoiser.parameters() if p.requires_grad], lr=1e-1)
    fixed = {"noise": torch.randn(2, *shape, generator=g), "timesteps": torch.tensor([500.0, 800.0])}
    losses = []
    for _ in range(10):
        loss = family.training_loss(trained, denoiser, x0, embeds, [0, 1], **fixed).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < drop * losses[0], losses
    denoiser.eval()
    after = sample(trained, embeds, [0, 1], [1, 2])
    assert (after - before).abs().max() > 1e-2  # the LoRA changed the samples
    out = family.save_lora(trained, denoiser, tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    reloaded = fresh()
    reloaded.load_lora_weights(str(out))
    torch.testing.assert_close(sample(reloaded, embeds, [0, 1], [1, 2]), after, atol=atol, rtol=0)


def final_lora_reproduces_held_out_images(family, folder, run, config, stage):
    """The run's ``final/`` LoRA loaded into a fresh pipeline of ``folder`` redraws stage ``stage``'s held-out images
    (each pixel within 1 of the saved PNG); returns those images ``[N, H, W, 3]`` uint8 and the eval rows."""
    from PIL import Image

    pipe = family.load(folder, device="cpu")
    pipe.load_lora_weights(str(run / "final"))
    folder_of_stage = run / "stages" / f"{stage:03d}"
    evals = [json.loads(line) for line in (folder_of_stage / "eval.jsonl").read_text().splitlines()]
    s = config["sampling"]
    emb = family.encode_prompts(pipe, config["prompts"]["eval"], None, do_cfg=True)
    latents = family.sample(pipe, emb, [r["prompt_index"] for r in evals], [r["seed"] for r in evals],
                            steps=s["num_inference_steps"], guidance=s["guidance_scale"], height=s["height"],
                            width=s["width"])  # fmt: skip
    images = (family.decode(pipe, latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    saved = np.stack([np.asarray(Image.open(folder_of_stage / r["image"]).convert("RGB")) for r in evals])
    assert np.abs(images.astype(int) - saved.astype(int)).max() <= 1
    return images, evals


def preset_peaks_on_published_configs(kind, preset, tmp_path, transformer_params, text_encoder_params, trainable):
    """``configs/<preset>.yaml`` planned for CUDA on ``kind``'s published configs (scripts/bench_memory_plan.py writes
    them as a config-only folder), with everything resident and with ``model.offload=phases``: the weights are the
    parameter counts at 2 bytes (the text encoder's with its rotary buffers, under 4 KiB), the LoRA trains
    ``trainable`` weights; returns the peaks in GiB by offload."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "scripts"))
    from bench_memory_plan import write_config_folder

    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.plan import MemoryPlanner

    folder = write_config_folder(kind, tmp_path)
    peaks = {}
    for offload in ("none", "phases"):
        cfg = load_config(root / "configs" / f"{preset}.yaml", [f"model.pretrained={folder}", "model.device=cuda", f"model.offload={offload}"])
        planner = MemoryPlanner(cfg, device="cuda")
        assert planner.components["transformer"] == 2 * transformer_params
        assert 0 <= planner.components["text_encoder"] - 2 * text_encoder_params < 4096
        assert planner.trainable == trainable
        peaks[offload] = planner.peak(planner.base_settings()) / 2**30
    return peaks
