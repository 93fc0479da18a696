"""The toy-world presets (the README's demo and its CLIP-score twin) run end to end from the repository root."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl
from raft_diffusion.diffusion.toyworld.oracle import oracle_metrics

ROOT = Path(__file__).resolve().parents[1]


# both slow (25 s each): the default run drives the demo preset end to end through tests/test_bench_time_to_aligned.py
@pytest.mark.parametrize("preset", [pytest.param("toy_aesthetic", marks=pytest.mark.slow), pytest.param("toy_clipscore", marks=pytest.mark.slow)])
def test_toy_preset_one_short_stage(preset, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the presets name the committed assets relative to the repository root
    out = tmp_path / preset
    code = main(
        [
            "align",
            "--config",
            f"configs/{preset}.yaml",
            "--output-dir",
            str(out),
            "num_stages=1",
            "progress=false",
            "sampling.num_per_prompt=4",
            "train.steps_per_stage=4",
            "eval.num_per_prompt=2",
        ]
    )
    assert code == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1]
    assert rows[0]["eval_reward_std"] > 0 and np.isfinite(rows[1]["eval_clip_score"])
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    ranking = yaml.safe_load((out / "config.yaml").read_text())["ranking"]
    top_k = ranking["top_k"]
    assert top_k == {"toy_aesthetic": 3, "toy_clipscore": 1}[preset]
    off = [s for s in samples if s.get("discarded")]  # the demo's prompt gate (ranking.prompt_match)
    assert rows[1]["num_discarded"] == len(off) and (len(off) > 0) == (preset == "toy_aesthetic")
    assert not any(s["kept"] for s in off)
    for p in {s["prompt_index"] for s in samples}:
        live = [s for s in samples if s["prompt_index"] == p and not s.get("discarded")]
        assert [s["kept"] for s in live].count(True) == min(top_k, len(live))
        if live and not ranking.get("novelty_weight"):  # the best of K by the reward, among the on-prompt ones, is kept
            assert max(live, key=lambda s: s["reward"])["kept"]
    # the base model draws what its held-out prompts ask for (oracle), so the demo starts from a sound model
    ev = read_jsonl(out / "stages" / "000" / "eval.jsonl")
    ims = (
        torch.from_numpy(np.stack([np.asarray(Image.open(out / "stages" / "000" / r["image"]).convert("RGB")) for r in ev]))
        .permute(0, 3, 1, 2)
        .float()
        / 255
    )
    assert oracle_metrics(ims, [r["prompt"] for r in ev])["match"].mean() >= 0.75
    assert (out / "final").is_dir() and (out / "gallery" / "index.html").is_file()
    assert json.loads((out / "stages" / "001" / "stage.json").read_text())
