"""What works for SD 1.x works for the other families, on tiny pipelines through `raft-diffusion align`.

- A config that names only the model, prompts, sampling size, reward, ranking and a few train settings (no
  train.target_modules, eval.clip_model: null) runs on a pipeline folder written by diffusers' save_pretrained
  (SD 1.x and FLUX.2 [klein] here; SDXL, SD3 and FLUX.1: tests/test_families_align.py).
- Slow: an external pool (images from another generator, encoded by the family's VAE) ranked with the diversity
  and prompt_match terms (FLUX.1); resume: a run extended stage by stage ends bit-equal to one run straight
  through, and early stop keeps the best stage (SD3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl
from raft_diffusion.diffusion.families import get_family

MINIMAL = {
    "model": {"device": "cpu"},  # + pretrained: the folder
    "prompts": {"train": ["a red circle", "a blue square"], "eval": ["a green star"]},
    "sampling": {"num_per_prompt": 2, "batch_size": 4, "num_inference_steps": 2, "height": 32, "width": 32},
    "reward": {"name": "brightness"},
    "ranking": {"mode": "local", "top_k": 1},
    "train": {"lora_rank": 4, "steps_per_stage": 2, "batch_size": 2},
    "eval": {"num_per_prompt": 1, "clip_model": None},
    "num_stages": 1,
    "progress": False,
}


def _config(tmp_path, folder, data=MINIMAL, **sections):
    cfg = tmp_path / "config.yaml"
    merged = {**data, **sections, "model": {**data["model"], "pretrained": str(folder)}}
    cfg.write_text(yaml.safe_dump(merged))
    return cfg


@pytest.mark.parametrize("name", ["sd", "flux2-klein", "qwen-image"])
def test_minimal_config_runs_on_a_pipeline_saved_by_diffusers(name, tmp_path):
    from raft_diffusion.diffusion.families.tiny import build_tiny_pipeline

    folder = tmp_path / "pipeline"
    build_tiny_pipeline(name).save_pretrained(str(folder))  # the user's folder: diffusers' own layout
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == get_family(name).pipeline_class_name
    out = tmp_path / "run"
    assert main(["align", "--config", str(_config(tmp_path, folder)), "--output-dir", str(out)]) == 0
    family = get_family(name)
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["model"]["family"] is None and snapshot["train"]["target_modules"] == list(family.lora_targets)
    assert [r["stage"] for r in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    keys = list(load_file(str(out / "final" / "pytorch_lora_weights.safetensors")))
    assert keys and all(k.startswith(family.denoiser_attr + ".") for k in keys)
    pipe = family.load(folder, device="cpu")
    pipe.load_lora_weights(str(out / "final"))  # the family pipeline's own loader reads it
    assert any("lora" in n for n, _ in family.denoiser(pipe).named_parameters())


# --- slow: pools, ranking terms, resume, early stop on the flow families ----------------------------------------

RUN = {
    **MINIMAL,
    "seed": 0,
    "prompts": {"train": ["a red circle", "a blue square", "a green triangle"], "eval": ["a red square", "a green star"]},
    "sampling": {"num_per_prompt": 4, "batch_size": 8, "num_inference_steps": 3, "guidance_scale": 2.0, "height": 32, "width": 32},
    "reward": {"name": "brightness", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}},
    "ranking": {"mode": "local", "top_k": 2},
    "train": {"lora_rank": 4, "steps_per_stage": 6, "batch_size": 2, "learning_rate": 0.05},
    "eval": {"num_per_prompt": 2, "clip_model": None},
}


@pytest.mark.slow
def test_sd3_resume_extends_to_the_same_run_and_early_stop_keeps_the_best(tmp_path):
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder = tiny_pipeline("sd3")
    straight, stepwise = tmp_path / "straight", tmp_path / "stepwise"
    assert main(["align", "--config", str(_config(tmp_path, folder, RUN)), "--output-dir", str(straight), "num_stages=2"]) == 0
    assert main(["align", "--config", str(_config(tmp_path, folder, RUN)), "--output-dir", str(stepwise), "num_stages=1"]) == 0
    assert main(["align", "--config", str(_config(tmp_path, folder, RUN)), "--output-dir", str(stepwise), "num_stages=2"]) == 0  # resume
    for stage in ("001", "002"):
        a = load_file(str(straight / "stages" / stage / "lora" / "pytorch_lora_weights.safetensors"))
        b = load_file(str(stepwise / "stages" / stage / "lora" / "pytorch_lora_weights.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), stage
    rows = [{k: r[k] for k in ("stage", "eval_reward_mean", "kept_reward_mean")} for r in read_jsonl(stepwise / "metrics.jsonl") if r["stage"]]
    assert rows == [
        {k: r[k] for k in ("stage", "eval_reward_mean", "kept_reward_mean")} for r in read_jsonl(straight / "metrics.jsonl") if r["stage"]
    ]
    # early stop: no stage improves by 1e9, so patience 1 stops after stage 1 and keeps it as final/
    stopped = tmp_path / "stopped"
    argv = ["align", "--config", str(_config(tmp_path, folder, RUN)), "--output-dir", str(stopped), "num_stages=3"]
    assert main([*argv, "early_stop.patience=1", "early_stop.min_delta=1e9"]) == 0
    stop = json.loads((stopped / "early_stop.json").read_text())
    assert stop["stopped_after_stage"] == 1 and stop["final_stage"] == 1
    assert (stopped / "final" / "pytorch_lora_weights.safetensors").read_bytes() == (
        stopped / "stages" / "001" / "lora" / "pytorch_lora_weights.safetensors"
    ).read_bytes()
    assert (stopped / "gallery" / "index.html").is_file() and (stopped / "gallery" / "grid_before_after.png").is_file()


@pytest.mark.slow
def test_flux_external_pool_with_the_ranking_terms(tmp_path):
    """Images from another generator (a JSONL manifest) encoded by FLUX.1's VAE and trained on, ranked with the
    diversity term (plain top 2 would keep a bright image and its copy) and prompt_match (the eval CLIP)."""
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline
    from raft_diffusion.diffusion.tiny import ensure_tiny_clip

    rows = []
    for p, prompt in enumerate(["a red circle", "a blue square"]):
        for k in range(3):
            img = np.full((32, 32, 3), 30, dtype=np.uint8)
            if k == 0:  # dimmer stripes, a different picture
                img[8:24, 8:24:4] = 120
            else:  # samples 1 and 2: the same bright square
                img[8:24, 8:24] = 200 + 10 * p
            Image.fromarray(img).save(tmp_path / f"{p}_{k}.png")
            rows.append({"prompt": prompt, "image": f"{p}_{k}.png"})
    manifest = tmp_path / "pool.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clip = ensure_tiny_clip()
    out = tmp_path / "run"
    cfg = _config(tmp_path, tiny_pipeline("flux"), RUN)
    overrides = [f"sampling.external_pool={manifest}", "ranking.top_k=2", "ranking.diversity_weight=100", "ranking.prompt_match=2",
                 f"eval.clip_model={clip}", "eval.every=0"]  # fmt: skip
    assert main(["align", "--config", str(cfg), "--output-dir", str(out), *overrides]) == 0
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    r = [s["reward"] for s in samples]
    assert r[1] == r[2] > r[0] and r[4] == r[5] > r[3]  # by reward alone, samples 1 and 2 (a copy) are kept
    # the spread-out pick keeps the distinct image second, never an image and its copy
    assert [(s["prompt_index"], s["sample_index"]) for s in samples if s["kept"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all("prompt_rank" in s for s in samples)
    latents = load_file(str(out / "stages" / "001" / "kept_latents.safetensors"))
    assert len(latents) == 4 and all(tuple(v.shape) == (4, 16, 16) for v in latents.values())  # unpacked VAE latents


def test_caption_dropout_trains_a_family_run_on_its_empty_prompt(tmp_path):
    """train.empty_prompt_ratio on Qwen-Image (prompts of different lengths, padded with a mask): the same pool is
    kept as without it, and the LoRA trained on it differs; SD 1.x/2.x's caption dropout is tested in
    test_align_e2e.py, the loss by hand in test_families.py."""
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder = tiny_pipeline("qwen-image")
    runs = {}
    for ratio in (0.0, 0.5):
        out = tmp_path / f"run{ratio}"
        assert main(["align", "--config", str(_config(tmp_path, folder)), "--output-dir", str(out), f"train.empty_prompt_ratio={ratio}"]) == 0
        runs[ratio] = out
    kept = [load_file(str(runs[r] / "stages" / "001" / "kept_latents.safetensors")) for r in (0.0, 0.5)]
    assert kept[0].keys() == kept[1].keys() and all((kept[0][k] == kept[1][k]).all() for k in kept[0])
    loras = [load_file(str(runs[r] / "final" / "pytorch_lora_weights.safetensors")) for r in (0.0, 0.5)]
    assert loras[0].keys() == loras[1].keys()
    assert max((loras[0][k] - loras[1][k]).abs().max().item() for k in loras[0]) > 1e-6
