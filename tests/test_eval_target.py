"""early_stop.target_rise_sd and eval.screen_per_prompt: stop once the held-out reward has risen enough, and screen
the stages between evaluations on a few held-out seeds to evaluate one in full as soon as it may have."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from test_eval_early_stop import ScriptedTask, final_weights

from raft_diffusion.core.early_stop import EarlyStopper, read_stop
from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.loop import run_raft
from raft_diffusion.core.rundir import RunDir
from raft_diffusion.diffusion.config import config_from_dict, load_config
from raft_diffusion.diffusion.task import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]


def rows_of(means, div=None):
    """Stage 0 is the base: mean 5, std 2; the target at 1 base sd is 7."""
    rows = [{"stage": 0, "eval_reward_mean": 5.0, "eval_reward_std": 2.0, **({"eval_diversity": div[0]} if div else {})}]
    for s, m in enumerate(means, start=1):
        row = {"stage": s}
        if m is not None:
            row.update(eval_reward_mean=m, eval_reward_std=1.0, **({"eval_diversity": div[s]} if div else {}))
        rows.append(row)
    return rows


def test_target_stops_at_the_first_evaluated_stage_that_reaches_it():
    stopper = EarlyStopper(target_rise_sd=1.0)
    rows = rows_of([6.0, None, 6.99, 7.0, 7.5])
    assert [stopper(rows[: n + 1]) is not None for n in range(len(rows))] == [False, False, False, False, True, True]
    assert stopper(rows[:5]) == "target reached: eval_reward_mean 7 at stage 4 rose 1 base sd (early_stop.target_rise_sd 1)"
    assert stopper.best_stage(rows[:5]) == 4
    assert EarlyStopper(target_rise_sd=1.25)(rows[:5]) is None  # 7.5 needed
    assert EarlyStopper(target_rise_sd=1.25)(rows) is not None
    # the base alone never reaches a target, and without the base's std there is no target
    assert EarlyStopper(target_rise_sd=0.1)(rows[:1]) is None
    no_std = [dict(r) for r in rows]
    del no_std[0]["eval_reward_std"]
    assert EarlyStopper(target_rise_sd=1.0)(no_std) is None and EarlyStopper(target_rise_sd=1.0).target(no_std) is None
    assert EarlyStopper(target_rise_sd=1.0).target(rows) == (7.0, 5.0, 2.0)


def test_a_stage_under_a_floor_does_not_count_as_reaching_the_target():
    rows = rows_of([7.5], div=[1.0, 0.5])
    stopper = EarlyStopper(target_rise_sd=1.0, floors=[("eval_diversity", "diversity", 0.7)])
    reason = stopper(rows)
    assert reason.startswith("diversity eval_diversity 0.5 at stage 1 fell below 0.7")


@pytest.mark.parametrize(
    "mean, std, n, expected",
    [
        (6.5, 1.0, 16, True),  # 6.5 + 2 x 1/4 = 7.0: within two standard errors of the target 7
        (6.49, 1.0, 16, False),
        (6.0, 2.0, 16, True),  # a noisier screen: 6 + 2 x 2/4 = 7
        (6.0, 1.0, 64, False),  # a larger screen: 6 + 2 x 1/8 = 6.25
        (7.2, 0.0, 4, True),  # above the target
    ],
)
def test_screen_calls_for_a_full_evaluation_within_two_standard_errors(mean, std, n, expected):
    rows = rows_of([])
    screen = {"stage": 1, "screen_reward_mean": mean, "screen_reward_std": std, "screen_n": n}
    assert EarlyStopper(target_rise_sd=1.0).screen_calls_for_eval(rows, screen) is expected
    by_hand = mean + 2 * std / math.sqrt(n) >= 5.0 + 1.0 * 2.0
    assert by_hand is expected
    assert EarlyStopper(patience=2).screen_calls_for_eval(rows, screen) is False  # no target: screens only report


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["early_stop.target_rise_sd=0"], "early_stop.target_rise_sd must be > 0 or null (got 0.0)"),
        (["early_stop.target_rise_sd=1", "early_stop.metric=eval_clip_score"], "early_stop.metric must be a mean such as eval_reward_mean"),
        (["early_stop.target_rise_sd=1", "eval.every=0"], "early_stop needs held-out evaluation"),
        (["eval.screen_per_prompt=1"], "eval.screen_per_prompt must be 0 (off) or 2 .. eval.num_per_prompt=4 (got 1)"),
        (["eval.screen_per_prompt=5"], "eval.screen_per_prompt must be 0 (off) or 2 .. eval.num_per_prompt=4 (got 5)"),
        (["eval.screen_per_prompt=2", "eval.every=0"], "eval.screen_per_prompt screens stages between held-out evaluations"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({}, overrides)


# --- the loop -----------------------------------------------------------------------------------


class Screened(ScriptedTask):
    """Scripted full-evaluation means (std 1 after the base's 2) and screen means; records what was evaluated."""

    def __init__(self, script, screens):
        super().__init__(script)
        self.screens = screens
        self.evaluated, self.screened = [], []

    def evaluate(self, stage, stage_dir):
        self.evaluated.append(stage)
        return {"eval_reward_mean": self.script[stage], "eval_reward_std": 2.0 if stage == 0 else 1.0, "eval_reward_queries": 8}

    def screen(self, stage, stage_dir, per_prompt):
        self.screened.append(stage)
        return {"screen_reward_mean": self.screens[stage], "screen_reward_std": 1.0, "screen_n": 4, "eval_reward_queries": 4}


def _screened_run(root, script, screens, *overrides):
    cfg = config_from_dict(
        {"num_stages": 6, "progress": False, "sampling": {"num_per_prompt": 2}},
        ["eval.every=6", "eval.screen_per_prompt=2", *overrides],
    )
    run = RunDir(root)
    run.start(cfg.to_dict())
    task = Screened(script, screens)
    rows = run_raft(cfg, task, run, should_stop=cfg.stopper())
    return run, task, rows


def test_screens_evaluate_a_stage_near_the_target_and_the_run_stops_there(tmp_path):
    # target 5 + 1 x 2 = 7; a screen of 4 with std 1 calls for evaluation from 6.0 (6 + 2 x 1/2 = 7)
    script = [5.0, 5.5, 6.5, 6.9, 7.3, 7.6, 7.8]
    screens = [None, 5.4, 6.2, 6.8, 7.1, 7.5, 7.9]
    run, task, rows = _screened_run(tmp_path, script, screens, "early_stop.target_rise_sd=1.0")
    # stage 1 screened only (5.4 + 1 < 7); stage 2's screen (6.2) calls for evaluation: 6.5, short of 7; stage 3
    # evaluated too (6.9); stage 4 reaches 7.3 >= 7: stop, final/ = stage 4
    assert task.stages_run == [1, 2, 3, 4] and task.screened == [1, 2, 3, 4] and task.evaluated == [0, 2, 3, 4]
    assert final_weights(run) == 4
    stop = read_stop(run.root)
    assert stop["final_stage"] == 4 and stop["stopped_after_stage"] == 4
    assert stop["reason"] == "target reached: eval_reward_mean 7.3 at stage 4 rose 1.15 base sd (early_stop.target_rise_sd 1)"
    saved = {r["stage"]: r for r in run.metrics()}
    assert "eval_reward_mean" not in saved[1] and saved[1]["screen_reward_mean"] == 5.4 and "time_screen" in saved[1]
    assert saved[2]["eval_reward_mean"] == 6.5 and saved[2]["screen_reward_mean"] == 6.2
    # evaluation compute counts screens: base 8, screens 4 x 4, full evaluations 3 x 8
    assert saved[4]["eval_reward_queries"] == 8 + 16 + 24


def test_screens_without_a_target_only_report(tmp_path):
    script = [5.0, 5.5, 6.5, 6.9, 7.3, 7.6, 7.8]
    screens = [None, 5.4, 6.2, 6.8, 7.1, 7.5, 7.9]
    run, task, rows = _screened_run(tmp_path, script, screens)
    assert task.stages_run == [1, 2, 3, 4, 5, 6] and task.screened == [1, 2, 3, 4, 5] and task.evaluated == [0, 6]
    assert final_weights(run) == 6 and read_stop(run.root) is None
    assert json.loads((run.root / "metrics.jsonl").read_text().splitlines()[-1])["eval_reward_queries"] == 16 + 20


def test_the_diffusion_screen_scores_the_full_evaluations_seeds(tiny_pipeline_dir, tmp_path):
    """The tiny pipeline: a screen of 2 per prompt scores the images a full evaluation of 4 per prompt makes at
    those seeds (the same rewards to 1e-4) (mean and std by hand from eval.jsonl's rows), and writes screen.jsonl."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tiny_pipeline_dir}", "progress=false", "eval.clip_model=null"])
    task = DiffusionTask(cfg)
    (tmp_path / "full").mkdir()
    (tmp_path / "screen").mkdir()
    full = task.evaluate(0, tmp_path / "full")
    screen = task.screen(0, tmp_path / "screen", 2)
    rows = [json.loads(line) for line in (tmp_path / "full" / "eval.jsonl").read_text().splitlines()]
    srows = [json.loads(line) for line in (tmp_path / "screen" / "screen.jsonl").read_text().splitlines()]
    P = len(task.eval_prompts)
    assert full["eval_reward_queries"] == P * cfg.eval.num_per_prompt == P * 4 and screen["eval_reward_queries"] == screen["screen_n"] == P * 2
    first = [r for r in rows if r["sample_index"] < 2]
    assert [(r["prompt_index"], r["sample_index"], r["seed"]) for r in srows] == [(r["prompt_index"], r["sample_index"], r["seed"]) for r in first]
    for a, b in zip(srows, first):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-4)
    values = [r["reward"] for r in first]
    mean = sum(values) / len(values)
    assert screen["screen_reward_mean"] == pytest.approx(mean, abs=1e-4)
    assert screen["screen_reward_std"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)), abs=1e-4)
    assert not (tmp_path / "screen" / "eval").exists()  # no images saved

    # a full evaluation of the screened stage next reuses the screen's images: it generates only the other 2 per
    # prompt, and its rows, images and metrics are those of the evaluation made without a screen
    made = []
    generate = task._generate

    def counting(embeds, prompt_idx, seeds, *args, **kw):
        made.extend(zip(prompt_idx, seeds))
        return generate(embeds, prompt_idx, seeds, *args, **kw)

    task._generate = counting
    (tmp_path / "again").mkdir()
    again = task.evaluate(0, tmp_path / "again")
    task._generate = generate
    assert sorted(made) == sorted((r["prompt_index"], r["seed"]) for r in rows if r["sample_index"] >= 2)
    rows2 = [json.loads(line) for line in (tmp_path / "again" / "eval.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"], r["seed"], r["image"]) for r in rows2] == [
        (r["prompt_index"], r["sample_index"], r["seed"], r["image"]) for r in rows
    ]
    for a, b in zip(rows2, rows):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-4)
        assert (tmp_path / "again" / a["image"]).is_file()
    assert again["eval_reward_mean"] == pytest.approx(full["eval_reward_mean"], abs=1e-4)
    # the reuse is once, for that stage: evaluating again (or after training) generates everything
    made.clear()
    task._generate = counting
    task.evaluate(0, tmp_path / "again")
    task._generate = generate
    assert len(made) == len(rows)


# --- screens paired with the base's evaluation ----------------------------------------------------


def test_paired_screen_reads_the_regression_line_at_the_bases_full_mean():
    import numpy as np

    from raft_diffusion.core.common import paired_screen

    rng = np.random.default_rng(0)
    base_rewards = rng.normal(5.0, 2.0, size=(4, 8))  # 4 prompts x 8 seeds
    base = [{"prompt_index": p, "sample_index": k, "reward": float(base_rewards[p, k])} for p in range(4) for k in range(8)]
    # the screen: the first 3 seeds of each prompt, the stage's rewards half the base's plus 4 plus noise
    slots = [(p, k) for p in range(4) for k in range(3)]
    y = np.array([0.5 * base_rewards[p, k] + 4.0 + rng.normal(0, 0.3) for p, k in slots])
    screen = [{"prompt_index": p, "sample_index": k, "reward": float(v)} for (p, k), v in zip(slots, y)]
    out = paired_screen(screen, base)
    x = np.array([base_rewards[p, k] for p, k in slots])
    slope, icept = np.polyfit(x, y, 1)
    full = base_rewards.mean()
    assert out["screen_base_slope"] == pytest.approx(slope, abs=1e-9)
    assert out["screen_reward_estimate"] == pytest.approx(icept + slope * full, abs=1e-9)
    resid = y - (icept + slope * x)
    n, big_n = len(y), base_rewards.size  # the screen's 12 of the full evaluation's 32 slots
    se = math.sqrt((resid**2).sum() / (n - 2) * ((1 - n / big_n) / n + (full - x.mean()) ** 2 / ((x - x.mean()) ** 2).sum()))
    assert out["screen_reward_se"] == pytest.approx(se, abs=1e-9)
    # a screen unpaired with the base (other slots), too few pairs, or a constant base: no estimate
    assert paired_screen([{**r, "sample_index": r["sample_index"] + 8} for r in screen], base) == {}
    assert paired_screen(screen[:2], base) == {}
    assert paired_screen(screen, [{**r, "reward": 1.0} for r in base]) == {}


def test_paired_screen_standard_error_is_that_of_the_full_evaluations_mean():
    """Over many draws of a stage whose rewards follow the base's linearly, the estimate's error against the mean of
    the full evaluation (which contains the screen) is one standard error on average: the finite-population
    correction matters when the screen is half the full set (without it the errors come to 0.78 of the se)."""
    import numpy as np

    from raft_diffusion.core.common import paired_screen

    rng = np.random.default_rng(1)
    z = []
    for _ in range(1500):
        x = rng.normal(5.0, 2.0, size=(4, 8))  # the base's rewards, 4 prompts x 8 seeds
        y = 0.4 * x + 4.0 + rng.normal(0, 0.8, size=x.shape)  # the stage's at the same slots
        base = [{"prompt_index": p, "sample_index": k, "reward": float(x[p, k])} for p in range(4) for k in range(8)]
        screen = [{"prompt_index": p, "sample_index": k, "reward": float(y[p, k])} for p in range(4) for k in range(4)]
        out = paired_screen(screen, base)
        z.append((out["screen_reward_estimate"] - y.mean()) / out["screen_reward_se"])
    z = np.array(z)
    assert abs(z.mean()) < 0.08
    assert 0.92 < np.sqrt((z**2).mean()) < 1.08


def test_a_paired_screen_decides_by_its_estimate():
    rows = rows_of([])  # target 7
    # its mean (6.0, std 1, n 16) is 2 standard errors short (6 + 0.5 < 7); the paired estimate (6.8 +- 0.1) is not
    screen = {"stage": 1, "screen_reward_mean": 6.0, "screen_reward_std": 1.0, "screen_n": 16}
    stopper = EarlyStopper(target_rise_sd=1.0)
    assert not stopper.screen_calls_for_eval(rows, screen)
    assert stopper.screen_calls_for_eval(rows, {**screen, "screen_reward_estimate": 6.8, "screen_reward_se": 0.1})
    assert not stopper.screen_calls_for_eval(rows, {**screen, "screen_reward_estimate": 6.7, "screen_reward_se": 0.1})
    assert stopper.screen_estimate({**screen, "screen_reward_estimate": 6.8, "screen_reward_se": 0.1}) == (6.8, 0.1)
    assert stopper.screen_estimate(screen) == (6.0, 0.25)


def test_the_loop_pairs_a_diffusion_screen_with_the_base(tiny_pipeline_dir, tmp_path):
    """A tiny align run with screens: each screen's row holds the paired estimate computed by hand from its
    screen.jsonl and the base's eval.jsonl."""
    from test_align_e2e import align

    from raft_diffusion.core.common import paired_screen
    from raft_diffusion.core.rundir import read_jsonl

    out = tmp_path / "run"
    assert align(out, tiny_pipeline_dir, "eval.every=2", "eval.screen_per_prompt=2", "num_stages=2") == 0
    row = read_jsonl(out / "metrics.jsonl")[1]
    by_hand = paired_screen(read_jsonl(out / "stages" / "001" / "screen.jsonl"), read_jsonl(out / "stages" / "000" / "eval.jsonl"))
    assert set(by_hand) == {"screen_reward_estimate", "screen_reward_se", "screen_base_slope"}
    assert {k: row[k] for k in by_hand} == pytest.approx(by_hand)


def test_the_screen_band_sets_how_far_short_a_screen_may_be():
    rows = rows_of([])  # target 7
    screen = {"stage": 1, "screen_reward_mean": 6.0, "screen_reward_std": 1.0, "screen_n": 16, "screen_reward_estimate": 6.7, "screen_reward_se": 0.2}
    # 6.7 + 2 x 0.2 = 7.1 reaches 7; 6.7 + 1.4 x 0.2 = 6.98 does not; 1.5 x 0.2 = 0.3 reaches it exactly
    assert EarlyStopper(target_rise_sd=1.0).screen_calls_for_eval(rows, screen)
    assert not EarlyStopper(target_rise_sd=1.0, screen_band_se=1.4).screen_calls_for_eval(rows, screen)
    assert EarlyStopper(target_rise_sd=1.0, screen_band_se=1.5).screen_calls_for_eval(rows, screen)
    assert config_from_dict({}, ["early_stop.target_rise_sd=1", "early_stop.screen_band_se=1.5"]).stopper().screen_band_se == 1.5
    with pytest.raises(ConfigError, match=re.escape("early_stop.screen_band_se must be a number >= 0, e.g. 2 (got -1.0)")):
        config_from_dict({}, ["early_stop.screen_band_se=-1"])
