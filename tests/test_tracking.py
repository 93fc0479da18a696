"""Optional TensorBoard logging: every stage's metrics and an eval image grid."""

import builtins
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raft_diffusion.cli import main
from raft_diffusion.core.errors import UserError
from raft_diffusion.core.rundir import read_jsonl, write_jsonl
from raft_diffusion.diffusion.config import config_from_dict
from raft_diffusion.diffusion.tracking import Trackers, eval_grid

ROOT = Path(__file__).resolve().parents[1]


def test_eval_grid_rows_are_prompts(tmp_path):
    rows = []
    for p in range(2):
        for k in range(3):
            img = np.full((8, 8, 3), 40 * p + 10 * k, dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / f"p{p}_s{k}.png")
            rows.append({"prompt_index": p, "sample_index": k, "image": f"p{p}_s{k}.png"})
    write_jsonl(tmp_path / "eval.jsonl", rows[::-1])  # order on disk must not matter
    grid = eval_grid(tmp_path)
    scale = 256 // 8
    assert grid.shape == (2 * 8 * scale, 3 * 8 * scale, 3)
    assert grid[0, 0, 0] == 0 and grid[0, 2 * 8 * scale, 0] == 20 and grid[8 * scale, 8 * scale, 0] == 50


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match=r"pip install 'raft-diffusion\[tensorboard\]'"):
        Trackers(tmp_path, config_from_dict({}, ["eval.tensorboard=true"]))


def test_align_logs_each_stage_to_tensorboard(tiny_pipeline_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert (
        main(
            [
                "align",
                "--config",
                str(ROOT / "configs" / "tiny.yaml"),
                "--output-dir",
                str(out),
                f"model.pretrained={tiny_pipeline_dir}",
                "num_stages=1",
                "progress=false",
                "eval.tensorboard=true",
                "sampling.num_per_prompt=4",
                "train.steps_per_stage=4",
                "eval.num_per_prompt=2",
            ]
        )
        == 0
    )
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    logged = acc.Scalars("eval_reward_mean")
    assert [e.step for e in logged] == [0, 1]
    assert [e.value for e in logged] == pytest.approx([r["eval_reward_mean"] for r in metrics], rel=1e-6)
    assert [e.value for e in acc.Scalars("kept_reward_mean")] == pytest.approx([metrics[1]["kept_reward_mean"]], rel=1e-6)
    images = acc.Images("eval/images")
    assert [e.step for e in images] == [0, 1] and images[0].width == 2 * 32 * 8 and images[0].height == 3 * 32 * 8
