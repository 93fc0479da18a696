"""`align` with eval CLIP metrics and early stop on the tiny pipeline, its automatic gallery, and `compare`
reproducing the run's held-out images from the saved LoRA."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl
from raft_diffusion.core.seeds import eval_seed

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from raft_diffusion.diffusion.tiny import ensure_tiny_clip

    return ensure_tiny_clip(tmp_path_factory.mktemp("clip-cache"))


@pytest.fixture(scope="module")
def stopped_run(tiny_pipeline_dir, tiny_clip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "stopped"
    # min_delta is huge, so no stage ever counts as an improvement: patience 1 stops after stage 1
    code = main(
        [
            "align",
            "--config",
            TINY,
            "--output-dir",
            str(out),
            f"model.pretrained={tiny_pipeline_dir}",
            "num_stages=3",
            "progress=false",
            "train.steps_per_stage=8",
            f"eval.clip_model={tiny_clip_dir}",
            "early_stop.patience=1",
            "early_stop.min_delta=1e9",
            "early_stop.min_diversity_ratio=0.01",
        ]
    )
    assert code == 0
    return out


def test_eval_metrics_in_every_row(stopped_run):
    rows = read_jsonl(stopped_run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1]
    for r in rows:
        assert r["eval_clip_score"] >= 0 and 0 < r["eval_diversity"] < 2
        evals = read_jsonl(stopped_run / "stages" / f"{r['stage']:03d}" / "eval.jsonl")
        rewards = np.array([e["reward"] for e in evals])
        assert r["eval_reward_mean"] == pytest.approx(rewards.mean())
        assert r["eval_reward_std"] == pytest.approx(rewards.std())
        best = [max(e["reward"] for e in evals if e["prompt_index"] == p) for p in range(3)]
        assert r["eval_best_of_k"] == pytest.approx(np.mean(best))


def test_diversity_recomputed_from_the_saved_images(stopped_run, tiny_clip_dir):
    from raft_diffusion.diffusion.metrics import diversity, load_eval_clip

    clip = load_eval_clip(str(tiny_clip_dir), None)
    evals = read_jsonl(stopped_run / "stages" / "000" / "eval.jsonl")
    images = torch.stack(
        [torch.from_numpy(np.array(Image.open(stopped_run / "stages" / "000" / e["image"]))).permute(2, 0, 1).float() / 255 for e in evals]
    )
    value = diversity(clip.image_embeddings(images), [e["prompt_index"] for e in evals])
    assert value == pytest.approx(read_jsonl(stopped_run / "metrics.jsonl")[0]["eval_diversity"], rel=0.01)  # PNG rounding


def test_early_stop_keeps_the_best_stage_and_says_why(stopped_run):
    stop = json.loads((stopped_run / "early_stop.json").read_text())
    assert stop["stopped_after_stage"] == 1 and stop["final_stage"] == 1
    assert stop["reason"].startswith("eval_reward_mean has not improved by more than 1e+09 for 1 stages")
    assert not (stopped_run / "stages" / "002").exists()
    assert (stopped_run / "final" / "pytorch_lora_weights.safetensors").read_bytes() == (
        stopped_run / "stages" / "001" / "lora" / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def test_align_writes_the_gallery(stopped_run):
    gallery = stopped_run / "gallery"
    for name in ("index.html", "grid_before_after.png", "reward_curve.png"):
        assert (gallery / name).is_file()
    text = (gallery / "index.html").read_text()
    assert "stage 1 (final)" in text and "Stopped early after stage 1" in text
    assert text.count("../stages/000/eval/") == text.count("../stages/001/eval/") == 2 * 12  # link + img per image


def test_compare_reproduces_the_runs_held_out_images(stopped_run, tiny_pipeline_dir, tmp_path):
    seeds = [eval_seed(0, 0, k) for k in range(2)]  # held-out prompt 0 of the run is "a red square"
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            str(tiny_pipeline_dir),
            str(stopped_run),
            "--output-dir",
            str(out),
            "--prompt",
            "a red square",
            "--seeds",
            *map(str, seeds),
            "--label",
            "raft",
        ]
    )
    assert code == 0
    records = read_jsonl(out / "compare.jsonl")
    assert [(r["label"], r["sample_index"]) for r in records] == [("base", 0), ("base", 1), ("raft", 0), ("raft", 1)]
    for r in records:
        stage = "000" if r["label"] == "base" else "001"
        ref = next(
            e for e in read_jsonl(stopped_run / "stages" / stage / "eval.jsonl") if e["prompt_index"] == 0 and e["sample_index"] == r["sample_index"]
        )
        a = np.asarray(Image.open(out / r["image"])).astype(int)
        b = np.asarray(Image.open(stopped_run / "stages" / stage / ref["image"])).astype(int)
        assert np.abs(a - b).max() <= 1, r  # same model, prompt and noise: the same image
        assert r["reward"] == pytest.approx(ref["reward"], abs=2e-3)  # the run's reward (from its config)
    base0, raft0 = (np.asarray(Image.open(out / r["image"])).astype(int) for r in (records[0], records[2]))
    assert np.abs(base0 - raft0).max() > 2  # the LoRA changes the image
    for name in ("index.html", "grid.png"):
        assert (out / name).is_file()
    assert "raft" in (out / "index.html").read_text()


def test_compare_errors_are_one_line(tmp_path, capsys):
    assert main(["compare", "tiny", str(tmp_path), "-o", str(tmp_path / "o"), "--prompt", "x"]) == 2
    assert "no weights found in" in capsys.readouterr().err
