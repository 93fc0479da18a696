"""`raft-diffusion align` on tiny SDXL, SD3 and FLUX pipelines: a config that names only the model, prompts,
sampling size, reward, ranking and a few train settings (no LoRA targets, no eval CLIP) runs two stages,
raises the reward on held-out prompts, and its LoRA reloads in a fresh pipeline of the family with
``load_lora_weights``, reproducing the run's own held-out images."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl

CONFIG = {
    "seed": 0,
    "num_stages": 2,
    "model": {"device": "cpu"},
    "prompts": {
        "train": ["a red circle", "a blue square", "a green triangle", "a yellow star"],
        "eval": ["a red square", "a blue circle", "a green star"],
    },
    "sampling": {"num_per_prompt": 8, "batch_size": 16, "num_inference_steps": 4, "guidance_scale": 2.0, "height": 32, "width": 32},
    "reward": {"name": "brightness", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}},
    "ranking": {"mode": "local", "top_k": 2},
    "train": {"lora_rank": 8, "lora_alpha": 16, "steps_per_stage": 30, "batch_size": 4, "learning_rate": 0.1},
    "eval": {"num_per_prompt": 4, "clip_model": None},
    "progress": False,
}


@pytest.fixture(scope="module", params=["sdxl", "sd3", "flux"])
def family_run(request, tmp_path_factory):
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    name = request.param
    folder = tiny_pipeline(name, tmp_path_factory.mktemp(f"tiny-{name}"))
    cfg = tmp_path_factory.mktemp("cfg") / "config.yaml"
    cfg.write_text(yaml.safe_dump({**CONFIG, "model": {**CONFIG["model"], "pretrained": str(folder)}}))
    out = tmp_path_factory.mktemp("runs") / name
    assert main(["align", "--config", str(cfg), "--output-dir", str(out)]) == 0
    return name, folder, out


def test_two_stages_raise_the_held_out_reward(family_run):
    name, _, out = family_run
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval_reward_mean"] > rows[0]["eval_reward_mean"], (name, rows[0]["eval_reward_mean"], rows[-1]["eval_reward_mean"])
    for r in rows[1:]:
        assert r["kept_reward_mean"] > r["reward_mean"]  # the selection keeps the brighter samples


def test_the_snapshot_names_the_family_default_lora_targets(family_run):
    from raft_diffusion.diffusion.families import get_family

    name, _, out = family_run
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["train"]["target_modules"] == list(get_family(name).lora_targets)
    assert snapshot["model"]["family"] is None  # read from model_index.json


def test_lora_reloads_in_a_fresh_pipeline_and_reproduces_the_held_out_images(family_run):
    from raft_diffusion.diffusion.families import detect_family

    name, folder, out = family_run
    family = detect_family(str(folder))
    pipe = family.load(str(folder), device="cpu")
    pipe.load_lora_weights(str(out / "final"))
    rows = [json.loads(line) for line in (out / "stages" / "002" / "eval.jsonl").read_text().splitlines()]
    prompts = CONFIG["prompts"]["eval"]
    embeds = family.encode_prompts(pipe, prompts, None, do_cfg=True)
    latents = family.sample(
        pipe,
        embeds,
        [r["prompt_index"] for r in rows],
        [r["seed"] for r in rows],
        steps=CONFIG["sampling"]["num_inference_steps"],
        guidance=CONFIG["sampling"]["guidance_scale"],
        height=32,
        width=32,
    )
    images = (family.decode(pipe, latents).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    saved = np.stack([np.asarray(Image.open(out / "stages" / "002" / r["image"]).convert("RGB")) for r in rows])
    # same weights, same seeds: at most one level of uint8 rounding apart (measured: identical)
    assert np.abs(images.astype(int) - saved.astype(int)).max() <= 1
    base = family.load(str(folder), device="cpu")  # and the LoRA is what made them: the base draws others
    base_images = family.decode(
        base,
        family.sample(
            base,
            family.encode_prompts(base, prompts, None, do_cfg=True),
            [r["prompt_index"] for r in rows],
            [r["seed"] for r in rows],
            steps=4,
            guidance=2.0,
            height=32,
            width=32,
        ),
    )
    assert (base_images * 255 - torch.from_numpy(saved).permute(0, 3, 1, 2).float()).abs().max() > 2


@pytest.mark.parametrize("family_run", ["sd3"], indirect=True)  # one flow family (5 CPU s each; SDXL, FLUX: the same)
def test_compare_reproduces_the_runs_held_out_images(family_run, tmp_path):
    """``raft-diffusion compare BASE RUN_DIR`` samples as align did: the base column is stage 0's held-out images,
    the run's column (its final/ LoRA, loaded with the family pipeline's load_lora_weights) stage 2's."""
    from raft_diffusion.core.seeds import eval_seed

    name, folder, out = family_run
    prompt = 1  # "a blue circle"; compare numbers its prompts from 0, with the seeds the run gave this prompt
    seeds = [eval_seed(CONFIG["seed"], prompt, k) for k in range(2)]
    cmp = tmp_path / "cmp"
    argv = ["compare", str(folder), str(out), "-o", str(cmp), "--prompt", CONFIG["prompts"]["eval"][prompt], "--seeds", *map(str, seeds)]
    assert main([*argv, "--label", "raft"]) == 0  # steps, guidance, size and reward from the run's config.yaml
    records = read_jsonl(cmp / "compare.jsonl")
    assert [(r["label"], r["seed"]) for r in records] == [("base", seeds[0]), ("base", seeds[1]), ("raft", seeds[0]), ("raft", seeds[1])]
    for r in records:
        stage = "000" if r["label"] == "base" else "002"
        ref = next(e for e in read_jsonl(out / "stages" / stage / "eval.jsonl") if (e["prompt_index"], e["seed"]) == (prompt, r["seed"]))
        a = np.asarray(Image.open(cmp / r["image"])).astype(int)
        b = np.asarray(Image.open(out / "stages" / stage / ref["image"])).astype(int)
        assert np.abs(a - b).max() <= 1, (name, r)  # same weights, prompt and noise: the same image (measured: identical)
        assert r["reward"] == pytest.approx(ref["reward"], abs=1e-3)
    base0, raft0 = (np.asarray(Image.open(cmp / r["image"])).astype(int) for r in (records[0], records[2]))
    assert np.abs(base0 - raft0).max() > 2  # the LoRA changes the image
    from raft_diffusion.diffusion.families import get_family

    assert get_family(name).pipeline_class_name in (cmp / "index.html").read_text()


def test_negative_aware_training_on_a_flow_family(tmp_path):
    """ranking.negative_k with train.nft_beta on tiny SD3 (the flow velocity mixed with the stage start's): each
    prompt's 2 lowest-reward samples that were not kept go to training as negatives, every optimizer step trains
    batch-size negatives besides the kept rows, and the LoRA trained differs from the plain loss's (same kept
    samples: stage 1's pool is the base model's)."""
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder = tiny_pipeline("sd3", tmp_path / "tiny-sd3")
    base = {**CONFIG, "num_stages": 1, "model": {**CONFIG["model"], "pretrained": str(folder)}, "eval": {**CONFIG["eval"], "every": 100}}
    base["train"] = {**CONFIG["train"], "steps_per_stage": 6}
    runs = {}
    for label, extra in (("nft", {"negative_k": 2}), ("plain", {})):
        cfg = {**base, "ranking": {**base["ranking"], **extra}}
        if extra:
            cfg["train"] = {**cfg["train"], "negative_weight": 1.0, "nft_beta": 0.5}
        path = tmp_path / f"{label}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        assert main(["align", "--config", str(path), "--output-dir", str(tmp_path / label)]) == 0
        runs[label] = tmp_path / label
    row = read_jsonl(runs["nft"] / "metrics.jsonl")[1]
    assert (row["num_negatives"], row["num_negative_rows"]) == (8, 4)
    records = read_jsonl(runs["nft"] / "stages" / "001" / "samples.jsonl")
    for p in range(4):
        mine = [r for r in records if r["prompt_index"] == p]
        rest = sorted(r["reward"] for r in mine if not r.get("kept") and not r.get("discarded"))
        assert sorted(r["reward"] for r in mine if r.get("negative")) == rest[:2]
    plain = read_jsonl(runs["plain"] / "stages" / "001" / "samples.jsonl")
    assert [r["kept"] for r in plain] == [r["kept"] for r in records]  # the same kept set...
    from safetensors.torch import load_file

    a, b = (load_file(runs[k] / "final" / "pytorch_lora_weights.safetensors") for k in ("nft", "plain"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4  # ...trained otherwise
