"""scripts/replay_screens.py: the stop at a target replayed at any band on a run evaluated at every stage."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

PRESET = ["eval.every=2", "eval.screen_per_prompt=2", "early_stop.target_rise_sd=0.01"]


@pytest.fixture(scope="module")
def evaluated_run(tiny_pipeline_dir, tmp_path_factory):
    from test_align_e2e import align

    out = tmp_path_factory.mktemp("replay") / "run"
    # cut down: what is replayed is the evaluations, not what the stages learn
    cheap = ["train.steps_per_stage=5", "sampling.num_per_prompt=4", "ranking.top_k=1", "eval.clip_model=null"]
    assert align(out, tiny_pipeline_dir, "eval.every=1", "eval.num_per_prompt=4", *cheap) == 0
    return out


def test_replay_reads_each_stages_screen_from_its_full_evaluation_and_sums_the_cpu(evaluated_run, tiny_pipeline_dir):
    from replay_screens import first_at_target, load_stages, replay

    from raft_diffusion.core.common import paired_screen
    from raft_diffusion.core.rundir import read_jsonl
    from raft_diffusion.diffusion.config import load_config

    cfg = load_config(evaluated_run / "config.yaml", PRESET)
    stopper = cfg.stopper()
    rows, stages = load_stages(evaluated_run, 2)
    base = read_jsonl(evaluated_run / "stages" / "000" / "eval.jsonl")
    assert [st["row"]["stage"] for st in stages] == [1, 2]
    for st in stages:  # the screen: the first 2 of each prompt's 4 held-out seeds, half the full evaluation
        assert sorted({r["sample_index"] for r in st["screen"]}) == [0, 1] and 2 * len(st["screen"]) == len(st["full"])
    by_hand = [r["cpu_seconds"] - q["cpu_seconds"] - (r["eval_seconds"] - q["eval_seconds"]) for q, r in zip(rows, rows[1:])]
    assert [st["train_s"] for st in stages] == pytest.approx(by_hand)
    # a band nothing reaches: every stage screened only (half its evaluation), none delivered
    never = replay(rows, stages, stopper, -1e9)
    assert never == {"end": "none", "short": 0, "cpu": pytest.approx(sum(st["train_s"] + st["eval_s"] / 2 for st in stages))}
    # a band everything reaches: each stage evaluated in full until the first at the target above the floors
    always = replay(rows, stages, stopper, 1e9)
    first = first_at_target(rows, stages, stopper)
    goal = stopper.target(rows)[0]
    reached = [st["row"]["stage"] for st in stages if st["row"]["eval_reward_mean"] >= goal]
    assert first == (reached[0] if reached else None)  # the tiny config has no floors
    upto = [st for st in stages if first is None or st["row"]["stage"] <= first]
    assert always["end"] == (str(first) if first else "none") and always["short"] == len(upto) - (first is not None)
    assert always["cpu"] == pytest.approx(sum(st["train_s"] + st["eval_s"] for st in upto))
    # at the preset's own band, a stage is evaluated exactly when its paired estimate + band x se reaches the target
    est = paired_screen(stages[0]["screen"], base)
    called = est["screen_reward_estimate"] + stopper.screen_band_se * est["screen_reward_se"] >= goal
    one = replay(rows, stages[:1], stopper, stopper.screen_band_se)
    assert one["cpu"] == pytest.approx(stages[0]["train_s"] + stages[0]["eval_s"] * (1 if called else 0.5))


def test_replay_prints_the_table_and_ends_with_the_ratio(evaluated_run, capsys):
    from replay_screens import main

    assert main([str(evaluated_run), *[f"--set={o}" for o in PRESET], "--bands", "0,1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    bands = [line.split()[0] for line in lines if re.match(r"[\d.]+ ", line)]
    assert bands == ["0", "1", "2"]  # the bands asked for and the default's, which the ratio needs
    assert re.fullmatch(r"cpu_ratio_vs_default_band: \d+\.\d{3}", lines[-1])


def test_replay_refuses_a_run_not_evaluated_at_every_stage(evaluated_run, tmp_path, capsys):
    import shutil

    from replay_screens import main

    run = tmp_path / "sparse"  # the run as if stage 1 had been left out of the evaluations
    shutil.copytree(evaluated_run, run)
    (run / "stages" / "001" / "eval.jsonl").unlink()
    assert main([str(run), *[f"--set={o}" for o in PRESET]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"replay_screens: {run}: stage 1 was not evaluated in full; replay needs eval.every=1 (every stage evaluated)"]
