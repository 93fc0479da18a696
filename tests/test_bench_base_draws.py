"""scripts/bench_base_draws.py: a draw is the base model's held-out images at that run seed's eval seeds (what a run
with that seed evaluates at stage 0), and the pooled figures by hand."""

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

REDUCED = ["eval.num_per_prompt=2", "eval.num_inference_steps=2", "progress=false"]


def test_pooled_figures_by_hand():
    from bench_base_draws import pooled

    draws = [
        {"proxy": 5.0, "proxy_std": 1.0, "gold": 6.0, "fidelity": 0.9, "diversity": 0.30},
        {"proxy": 6.0, "proxy_std": 2.0, "gold": 5.0, "fidelity": 1.0, "diversity": 0.40},
    ]
    got = pooled(draws)
    # all images together: mean within-draw variance (1 + 4) / 2 plus the variance of the means ((0.5^2) * 2 / 2)
    assert got["proxy"] == pytest.approx(5.5)
    assert got["proxy_std"] == pytest.approx((2.5 + 0.25) ** 0.5)
    assert got["proxy_sd"] == pytest.approx(statistics.stdev([5.0, 6.0]))
    assert (got["gold_mean"], got["diversity_mean"]) == (pytest.approx(5.5), pytest.approx(0.35))


def test_a_draw_is_what_a_run_with_that_seed_evaluates_at_stage_0(tmp_path, capsys):
    from bench_base_draws import main

    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.task import DiffusionTask

    config = str(ROOT / "configs" / "toy_aesthetic_max.yaml")
    out_json = tmp_path / "draws.json"
    assert main(["--config", config, "--draws", "2", "--seed", "1", "--json", str(out_json), *REDUCED]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    got = json.loads(out_json.read_text())
    assert [d["seed"] for d in got["draws"]] == [0, 1]
    assert got["draws"][0]["proxy"] != got["draws"][1]["proxy"]  # other seeds, other images

    task = DiffusionTask(load_config(config, [*REDUCED, "seed=1"]))
    task.evaluate(0, tmp_path / "stage0")
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "stage0" / "eval.jsonl").read_text().splitlines()]
    assert got["draws"][1]["proxy"] == pytest.approx(statistics.fmean(rewards), rel=1e-6)
    assert got["draws"][1]["proxy_std"] == pytest.approx(statistics.pstdev(rewards), rel=1e-6)

    me, pool = got["draws"][1], got["pooled"]
    want = (me["proxy"] + 1.45 * me["proxy_std"] - pool["proxy"]) / pool["proxy_std"]
    assert last == f"goal_rise_in_pooled_sd: {want:.3f}"
    with pytest.raises(SystemExit, match="--seed 3 is not among the draws 0..1"):
        main(["--config", config, "--draws", "2", "--seed", "3", *REDUCED])
