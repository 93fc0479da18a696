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
    emb = family.encode_prompts(pipe, config["prompts"]["eval"], None, do_cfg=True, max_sequence_length=config["model"].get("max_sequence_length"))
    latents = family.sample(pipe, emb, [r["prompt_index"] for r in evals], [r["seed"] for r in evals],
                            steps=s["num_inference_steps"], guidance=s["guidance_scale"], height=s["height"],
                            width=s["width"])  # fmt: skip
    images = (family.decode(pipe, latents) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    saved = np.stack([np.asarray(Image.open(folder_of_stage / r["image"]).convert("RGB")) for r in evals])
    assert np.abs(images.astype(int) - saved.astype(int)).max() <= 1
    return images, evals


def preset_peaks_on_published_configs(kind, preset, tmp_path, transformer_params, text_encoder_params, trainable,
                                      offloads=("none", "phases")):  # fmt: skip
    """``configs/<preset>.yaml`` planned for CUDA on ``kind``'s published configs (scripts/bench_memory_plan.py writes
    them as a config-only folder), for each of ``offloads`` (everything resident, ``phases``): the weights are the
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
    for offload in offloads:
        cfg = load_config(root / "configs" / f"{preset}.yaml", [f"model.pretrained={folder}", "model.device=cuda", f"model.offload={offload}"])
        planner = MemoryPlanner(cfg, device="cuda")
        assert planner.components["transformer"] == 2 * transformer_params
        assert 0 <= planner.components["text_encoder"] - 2 * text_encoder_params < 4096
        assert planner.trainable == trainable
        peaks[offload] = planner.peak(planner.base_settings()) / 2**30
    return peaks


def tiny_family_fixtures(name):
    """The module-scoped fixtures ``folder`` (the family's tiny pipeline folder, built once into the test cache) and
    ``pipe`` (it loaded, shared: tests must not modify it), to be assigned to those names in a test module."""
    import pytest

    from raft_diffusion.diffusion.families import get_family

    @pytest.fixture(scope="module")
    def folder():
        from raft_diffusion.diffusion.families.tiny import tiny_pipeline

        return tiny_pipeline(name)

    @pytest.fixture(scope="module")
    def pipe(folder):
        return get_family(name).load(folder, device="cpu")

    return folder, pipe


def fresh_pipeline(name, folder, pipe):
    """A pipeline whose denoiser (and VAE, scheduler) are read from disk again; text encoder and tokenizer shared."""
    from raft_diffusion.diffusion.families import get_family

    return get_family(name).load(folder, device="cpu", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)


def align_keeps_the_top_k_and_the_lora_reloads(name, folder, config, tmp_path):
    """A 2-stage ``align`` of ``config`` (4 training prompts, 8 samples each, top 2): each stage keeps exactly its
    pool's top 2 per prompt by reward, and the final LoRA in a fresh pipeline reproduces the run's held-out images,
    which are not the base model's."""
    import yaml

    from raft_diffusion.cli import main
    from raft_diffusion.core.rundir import read_jsonl
    from raft_diffusion.diffusion.families import get_family

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["align", "--config", str(cfg), "--output-dir", str(out)]) == 0
    assert [r["stage"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1, 2]
    for stage in (1, 2):
        samples = read_jsonl(out / "stages" / f"{stage:03d}" / "samples.jsonl")
        for p in range(4):
            mine = sorted((s for s in samples if s["prompt_index"] == p), key=lambda s: -s["reward"])
            assert [s["kept"] for s in mine] == [True] * 2 + [False] * 6
    family = get_family(name)
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["train"]["target_modules"] == list(family.lora_targets)
    card = (out / "final" / "README.md").read_text()  # the model card names the transformer and the family's tags
    assert "A LoRA on the transformer of" in card and "- stable-diffusion\n" not in card
    assert all(f"- {tag}\n" in card for tag in family.hub_tags)
    images, evals = final_lora_reproduces_held_out_images(family, folder, out, config, stage=2)
    base = family.load(folder, device="cpu")
    s = config["sampling"]
    emb = family.encode_prompts(base, config["prompts"]["eval"], None, do_cfg=True, max_sequence_length=config["model"].get("max_sequence_length"))
    first = family.sample(base, emb, [evals[0]["prompt_index"]], [evals[0]["seed"]], steps=s["num_inference_steps"],
                          guidance=s["guidance_scale"], height=s["height"], width=s["width"])  # fmt: skip
    base_image = (family.decode(base, first)[0] * 255).round().permute(1, 2, 0).numpy()
    assert abs(base_image - images[0]).max() > 2  # the LoRA changed the held-out images


def merged_export_gives_the_loras_prediction(name, transformer_cls, folder, pipe, embeds, shape, tmp_path):
    """``export --merge`` of a rank-4 LoRA (alpha 8, random B) into a pipeline folder of the family: the merged
    transformer's prediction is the LoRA's to 1e-4, and the LoRA moved it from the base's. Returns the LoRA folder."""
    from test_export_families import randomise_lora_b

    from raft_diffusion.cli import main
    from raft_diffusion.diffusion.families import LossSettings, get_family

    family = get_family(name)
    trained = fresh_pipeline(name, folder, pipe)
    family.add_lora(trained.transformer, rank=4, alpha=8, init_seed=1)
    randomise_lora_b(trained.transformer)
    lora = family.save_lora(trained, trained.transformer, tmp_path / "lora")
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))

    def predict(transformer):
        return family._predict(trained, transformer, x, torch.tensor([500.0]), embeds[[0]], LossSettings())

    with torch.no_grad():
        want = predict(trained.transformer)
        base = predict(transformer_cls.from_pretrained(str(folder), subfolder="transformer"))
    assert main(["export", str(lora), "--merge", "-o", str(tmp_path / "merged"), "--base", str(folder)]) == 0
    index = json.loads((tmp_path / "merged" / "model_index.json").read_text())
    assert index["_class_name"] == family.pipeline_class_name
    with torch.no_grad():
        merged = predict(transformer_cls.from_pretrained(str(tmp_path / "merged"), subfolder="transformer"))
    assert (want - base).abs().max() > 1e-2 and (merged - want).abs().max() <= 1e-4
    return lora


def tiny_align_config(pretrained, *, guidance=2.0, learning_rate=0.1, **model):
    """The 2-stage ``align`` config the per-family tests run on a tiny pipeline: 4 training prompts x 8 samples at 32 px
    and 4 steps, the top 2 kept, the brightness of the central region as the reward, a rank-8 LoRA trained 30 steps.
    ``model`` adds model settings (``max_sequence_length``)."""
    return {
        "seed": 0, "num_stages": 2, "model": {"device": "cpu", "pretrained": pretrained, **model},
        "prompts": {"train": ["a red circle", "a blue square", "a green triangle", "a yellow star"],
                    "eval": ["a red square", "a blue circle", "a green star"]},
        "sampling": {"num_per_prompt": 8, "batch_size": 16, "num_inference_steps": 4, "guidance_scale": guidance,
                     "height": 32, "width": 32},
        "reward": {"name": "brightness", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}},
        "ranking": {"mode": "local", "top_k": 2},
        "train": {"lora_rank": 8, "lora_alpha": 16, "steps_per_stage": 30, "batch_size": 4, "learning_rate": learning_rate},
        "eval": {"num_per_prompt": 4, "clip_model": None},
        "progress": False,
    }  # fmt: skip


def family_is_detected_everywhere(name, folder, pipe, tmp_path, other="flux"):
    """The family is read from a folder's model_index.json (as a Path and a str), from its pipeline class name and its
    short name, from the tiny folder and the loaded pipeline; ``model.family`` agreeing with the folder is accepted and
    another family (``other``) refused in one line naming both; ``tiny-<name>`` resolves to the tiny folder."""
    import re

    import pytest

    from raft_diffusion.core.errors import UserError
    from raft_diffusion.diffusion.config import FAMILIES
    from raft_diffusion.diffusion.families import detect_family
    from raft_diffusion.diffusion.task import resolve_pretrained

    cls = FAMILIES[name]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    for source in (tmp_path, str(tmp_path), cls, name, folder, pipe):
        assert detect_family(source).name == name, source
    assert detect_family(tmp_path, override=name).name == name
    with pytest.raises(UserError, match=rf"model.family is {re.escape(other)}, but .* holds a {cls} \({re.escape(name)}\)"):
        detect_family(tmp_path, override=other)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == cls
    assert resolve_pretrained(f"tiny-{name}") == str(folder)
