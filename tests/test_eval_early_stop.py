"""Early-stop rules on synthetic metric sequences, and the loop keeping the best stage as final/."""

import json

import pytest

from raft_diffusion.core.early_stop import STOP_FILE, EarlyStopper, read_stop
from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.loop import run_raft, skipped_stages
from raft_diffusion.core.rundir import RunDir, write_json
from raft_diffusion.diffusion.config import config_from_dict


def rows_of(rewards, clip=None, div=None):
    rows = []
    for s, r in enumerate(rewards):
        row = {"stage": s}
        if r is not None:
            row["eval_reward_mean"] = r
        if clip is not None:
            row["eval_clip_score"] = clip[s]
        if div is not None:
            row["eval_diversity"] = div[s]
        rows.append(row)
    return rows


def first_stop(stopper, rows):
    """The stage after which the stopper first fires (checking after every stage), and its reason."""
    for n in range(1, len(rows) + 1):
        reason = stopper(rows[:n])
        if reason:
            return rows[n - 1]["stage"], reason
    return None, None


def test_patience_counts_stages_since_the_best_value():
    rows = rows_of([0.1, 0.5, 0.9, 0.7, 0.6, 0.95])
    stage, reason = first_stop(EarlyStopper(patience=2), rows)
    assert stage == 4
    assert reason == ("eval_reward_mean has not improved for 2 stages (patience 2; best 0.9 at stage 2, 0.6 at stage 4)")
    assert first_stop(EarlyStopper(patience=3), rows) == (None, None)  # stage 5 improves in time
    assert first_stop(EarlyStopper(patience=1), rows)[0] == 3


def test_patience_counts_the_base_model_and_skips_unevaluated_stages():
    # nothing ever beats the base model: stop after `patience` stages
    assert first_stop(EarlyStopper(patience=2), rows_of([1.0, 0.2, 0.3, 0.4]))[0] == 2
    # eval.every=2: stages 1 and 3 have no eval row values; patience is in stages, not evaluations
    rows = rows_of([0.1, None, 0.5, None, 0.4, None, 0.45])
    assert first_stop(EarlyStopper(patience=4), rows)[0] == 6
    assert first_stop(EarlyStopper(patience=5), rows) == (None, None)


def test_min_delta_ignores_tiny_improvements():
    rows = rows_of([0.0, 1.0, 1.005, 1.009, 1.02])
    assert first_stop(EarlyStopper(patience=2), rows) == (None, None)
    stage, reason = first_stop(EarlyStopper(patience=2, min_delta=0.01), rows)
    assert stage == 3 and "by more than 0.01" in reason and "best 1 at stage 1" in reason


def test_other_metric_can_be_watched():
    rows = [{"stage": s, "eval_reward_mean": 1.0 + s, "eval_best_of_k": v} for s, v in enumerate([3.0, 2.0, 2.5, 2.9])]
    assert first_stop(EarlyStopper(patience=3, metric="eval_best_of_k"), rows)[0] == 3
    assert first_stop(EarlyStopper(patience=3), rows) == (None, None)


def test_fidelity_floor_is_a_fraction_of_the_base_models():
    rows = rows_of([0.1, 0.2, 0.3, 0.4], clip=[30.0, 27.0, 24.5, 23.9])
    stage, reason = first_stop(EarlyStopper(floors=[("eval_clip_score", "prompt fidelity", 0.8)]), rows)
    assert stage == 3
    assert reason == "prompt fidelity eval_clip_score 23.9 at stage 3 fell below 0.8 x the base model's 30 (= 24)"
    assert first_stop(EarlyStopper(floors=[("eval_clip_score", "prompt fidelity", 0.75)]), rows) == (None, None)


def test_diversity_floor_and_best_stage_above_the_floors():
    rows = rows_of([0.1, 0.4, 0.6, 0.9], div=[0.20, 0.18, 0.12, 0.05])
    stopper = EarlyStopper(floors=[("eval_diversity", "diversity", 0.5)], patience=5)
    stage, reason = first_stop(stopper, rows)
    assert stage == 3 and reason.startswith("diversity eval_diversity 0.05 at stage 3 fell below 0.5 x")
    # stage 3 has the highest reward but collapsed diversity: the best stage above the floor is 2
    assert stopper.best_stage(rows) == 2
    assert EarlyStopper(patience=5).best_stage(rows) == 3  # without floors: the highest reward
    # no trained stage above the floor: the highest reward anyway (final/ must hold weights)
    assert stopper.best_stage(rows_of([0.1, 0.4, 0.3], div=[0.2, 0.01, 0.02])) == 1


def test_floor_patience_stops_only_after_stages_in_a_row_under_a_floor():
    div = [1.0, 0.9, 0.69, 0.75, 0.6, 0.5]
    rows = rows_of([0.1, 0.4, 0.6, 0.7, 0.8, 0.9], div=div)
    floor = [("eval_diversity", "diversity", 0.7)]
    assert first_stop(EarlyStopper(floors=floor), rows)[0] == 2  # patience 1: the first dip
    stopper = EarlyStopper(floors=floor, floor_patience=2)
    stage, reason = first_stop(stopper, rows)
    assert stage == 5  # stage 2's dip is followed by a pass; stages 4 and 5 are both under
    assert reason == (
        "diversity eval_diversity 0.5 at stage 5 fell below 0.7 x the base model's 1 (= 0.7); "
        "under a floor at stages 4, 5 in a row (early_stop.floor_patience 2)"
    )
    assert stopper.best_stage(rows) == 3  # the best stage above the floor, as with patience 1
    assert first_stop(EarlyStopper(floors=floor, floor_patience=3), rows) == (None, None)
    # after each stage: must the next one be evaluated in full? only right after a stage under the floor
    assert [stopper.floor_recheck(rows[: n + 1]) for n in range(6)] == [False, False, True, False, True, True]
    assert not any(EarlyStopper(floors=floor).floor_recheck(rows[: n + 1]) for n in range(6))
    # unevaluated stages in between do not break a stretch: stages 2 and 4 were evaluated, both under
    gaps = rows_of([0.1, 0.4, 0.6, 0.7, 0.8], div=[1.0, 0.9, 0.6, None, 0.65])
    assert first_stop(stopper, [r for r in gaps if r.get("eval_diversity") is not None or r["stage"] != 3])[0] == 4
    # a run that ends on a dip it could not ride out
    assert stopper.ended_under_floor(rows[:5]).endswith("the run ended before 2 evaluated stages in a row were (early_stop.floor_patience 2)")
    assert stopper.ended_under_floor(rows[:4]) is None and EarlyStopper(floors=floor).ended_under_floor(rows[:3]) is None


def test_best_stage_ties_go_to_the_earlier_stage_and_skip_the_base():
    rows = rows_of([5.0, 0.3, 0.7, 0.7])
    assert EarlyStopper(patience=1).best_stage(rows) == 2
    assert EarlyStopper(patience=1).best_stage(rows_of([5.0])) is None


def test_inactive_stopper_never_stops():
    stopper = EarlyStopper()
    assert not stopper.active
    assert stopper(rows_of([1.0, 0.0, 0.0, 0.0], clip=[30, 1, 1, 1], div=[1, 0, 0, 0])) is None


def test_floors_are_skipped_without_a_positive_base_value():
    rows = rows_of([0.1, 0.2], clip=[0.0, 0.0])  # a CLIP score clipped to 0 at the base: no ratio to compare
    assert EarlyStopper(floors=[("eval_clip_score", "prompt fidelity", 0.9)])(rows) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["early_stop.patience=0"], "early_stop.patience must be >= 1 or null"),
        (["early_stop.min_diversity_ratio=0.5"], "early_stop.min_diversity_ratio needs eval.clip_model"),
        (["eval.clip_model=tiny", "early_stop.min_fidelity_ratio=1.5"], "early_stop.min_fidelity_ratio must be in (0, 1]"),
        (["early_stop.metric=reward_mean"], "early_stop.metric must be a held-out metric"),
        (["early_stop.patience=2", "eval.every=0"], "early_stop needs held-out evaluation"),
        (["early_stop.min_delta=-1"], "early_stop.min_delta must be >= 0"),
        (["early_stop.floor_patience=0"], "early_stop.floor_patience must be an integer >= 1 (got 0)"),
        (
            ["early_stop.floor_patience=2", "early_stop.patience=3"],
            "early_stop.floor_patience=2 counts evaluated stages under a floor, but no floor is set: set "
            "early_stop.min_fidelity_ratio or early_stop.min_diversity_ratio, or leave early_stop.floor_patience at 1",
        ),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_from_dict({}, overrides)


def test_config_fields_and_help():
    from raft_diffusion.core.config import config_help
    from raft_diffusion.diffusion.config import RaftConfig

    cfg = config_from_dict({}, ["early_stop.patience=3", "early_stop.min_fidelity_ratio=0.9", "eval.clip_model=tiny"])
    stopper = cfg.stopper()
    assert stopper.active and stopper.patience == 3 and stopper.floors == [("eval_clip_score", "prompt fidelity", 0.9)]
    assert config_from_dict({}).stopper() is None  # opt-in
    lines = [line for line in config_help(RaftConfig) if line.startswith(("early_stop", "eval.clip"))]
    assert len(lines) == 12 and all(line.split(": ", 1)[1] for line in lines)


# --- the loop -----------------------------------------------------------------------------------


class ScriptedTask:
    """A task whose held-out reward per stage is scripted; its 'weights' are the stage number."""

    reward_name = "scripted"
    skips_discarded = False
    console_metrics = ()

    def __init__(self, script):
        self.script = script
        self.train_prompts = ["p0", "p1"]
        self.weights = 0
        self.stages_run = []

    def plan(self, stage):
        return None  # the loop's K-per-prompt plan

    def discard(self, batch):
        pass

    def sample(self, stage, requests):
        for s in requests:
            s.payload = float(s.sample_index)
        yield list(requests)

    def score(self, batch):
        return [s.payload for s in batch]

    def save_kept(self, stage_dir, kept):
        pass

    def load_kept(self, stage_dir, kept):
        return kept

    def finetune(self, stage, kept):
        self.stages_run.append(stage)
        self.weights = stage
        return {}

    def save(self, stage_dir):
        write_json(stage_dir / "w" / "weights.json", {"stage": self.weights})

    def restore(self, stage_dir):
        self.weights = json.loads((stage_dir / "w" / "weights.json").read_text())["stage"]

    def weights_dir(self, stage_dir):
        return stage_dir / "w"

    def evaluate(self, stage, stage_dir):
        return {"eval_reward_mean": self.script[stage]}


SCRIPT = [0.1, 0.5, 0.9, 0.7, 0.6, 0.95, 0.99]


def _run(tmp_path, *overrides):
    cfg = config_from_dict({"num_stages": 6, "progress": False, "sampling": {"num_per_prompt": 2}}, list(overrides))
    run = RunDir(tmp_path)
    run.start(cfg.to_dict())
    task = ScriptedTask(SCRIPT)
    stopper = cfg.stopper()
    rows = run_raft(cfg, task, run, should_stop=stopper)
    return run, task, rows


def final_weights(run):
    return json.loads((run.final_dir / "weights.json").read_text())["stage"]


def test_loop_stops_keeps_the_best_stage_and_records_why(tmp_path, capsys):
    run, task, rows = _run(tmp_path, "early_stop.patience=2")
    assert task.stages_run == [1, 2, 3, 4]  # stage 4 is 2 stages past the best (stage 2): stop
    assert [r["stage"] for r in rows] == [0, 1, 2, 3, 4]
    assert final_weights(run) == 2
    stop = read_stop(run.root)
    assert stop == {
        "reason": "eval_reward_mean has not improved for 2 stages (patience 2; best 0.9 at stage 2, 0.6 at stage 4)",
        "stopped_after_stage": 4,
        "final_stage": 2,
    }
    out = capsys.readouterr().out
    assert "early stop after stage 4: eval_reward_mean has not improved for 2 stages" in out and "final/ = stage 2" in out

    # resuming with the same settings stays stopped; a larger patience is a resumable change and goes on
    task2 = ScriptedTask(SCRIPT)
    cfg = config_from_dict({"num_stages": 6, "progress": False, "sampling": {"num_per_prompt": 2}}, ["early_stop.patience=2"])
    run_raft(cfg, task2, run, should_stop=cfg.stopper())
    assert task2.stages_run == [] and final_weights(run) == 2
    run3, task3, rows3 = _run(tmp_path, "early_stop.patience=3")
    assert task3.stages_run == [5, 6] and [r["stage"] for r in rows3] == list(range(7))
    assert final_weights(run3) == 6 and not (run3.root / STOP_FILE).exists()


def test_loop_without_early_stop_keeps_the_last_stage(tmp_path):
    run, task, rows = _run(tmp_path)
    assert task.stages_run == [1, 2, 3, 4, 5, 6]
    assert final_weights(run) == 6 and read_stop(run.root) is None


def test_a_stop_at_the_last_stage_still_keeps_the_best(tmp_path):
    cfg_over = ["num_stages=4", "early_stop.patience=2"]
    run, task, _ = _run(tmp_path, *cfg_over)
    assert task.stages_run == [1, 2, 3, 4]
    assert final_weights(run) == 2 and read_stop(run.root)["stopped_after_stage"] == 4


def test_sparse_evaluation_stops_and_keeps_the_best_evaluated_stage(tmp_path):
    # eval.every=2 (SCRIPT at stages 0, 2, 4): stage 4 is 2 stages past the best (stage 2): stop there, keep 2
    run, task, rows = _run(tmp_path / "every2", "eval.every=2", "early_stop.patience=2")
    assert task.stages_run == [1, 2, 3, 4]
    assert [r["stage"] for r in rows if "eval_reward_mean" in r] == [0, 2, 4]
    assert final_weights(run) == 2 and read_stop(run.root)["stopped_after_stage"] == 4
    # eval.every=4 (stages 0, 4 and the last, 6): stage 3's 0.7 is never seen; 0.99 at 6 is the best
    run, task, rows = _run(tmp_path / "every4", "eval.every=4", "early_stop.patience=2")
    assert task.stages_run == [1, 2, 3, 4, 5, 6] and [r["stage"] for r in rows if "eval_reward_mean" in r] == [0, 4, 6]
    assert final_weights(run) == 6 and read_stop(run.root) is None


class Floored(ScriptedTask):
    """Scripted held-out reward and diversity; records which weights each evaluation saw."""

    def __init__(self, script, diversity):
        super().__init__(script)
        self.diversity = diversity
        self.evaluated = []

    def evaluate(self, stage, stage_dir):
        assert self.weights == stage  # the stage's own weights (restored for a fallback evaluation)
        self.evaluated.append(stage)
        return {"eval_reward_mean": self.script[stage], "eval_diversity": self.diversity[stage]}


def _floored_cfg(num_stages, *overrides):
    return config_from_dict(
        {"num_stages": num_stages, "progress": False, "sampling": {"num_per_prompt": 2}},
        ["eval.every=3", "eval.clip_model=tiny", "early_stop.min_diversity_ratio=0.7", *overrides],
    )


def _floored_run(root, diversity, *overrides):
    cfg = _floored_cfg(6, *overrides)
    run = RunDir(root)
    run.start(cfg.to_dict())
    task = Floored(SCRIPT, diversity)
    rows = run_raft(cfg, task, run, should_stop=cfg.stopper())
    return run, task, rows, cfg


def test_sparse_evaluation_floor_keeps_an_evaluated_stage(tmp_path):
    """A floor that fires at an evaluated stage keeps the best evaluated stage above it, never an unevaluated one."""
    run, task, _, _ = _floored_run(tmp_path, [1.0, 0.9, 0.8, 0.75, 0.72, 0.4, 0.3], "eval.fallback=false")
    # stages 0, 3, 6 evaluated; stage 6 (0.3 < 0.7 x 1.0) falls under the floor: final/ = stage 3
    assert task.stages_run == [1, 2, 3, 4, 5, 6] and task.evaluated == [0, 3, 6] and final_weights(run) == 3
    assert read_stop(run.root)["reason"].startswith("diversity eval_diversity 0.3 at stage 6 fell below 0.7 x")


def test_fallback_evaluates_the_stages_since_the_last_evaluation(tmp_path):
    # stage 6 fails the diversity floor; stage 5 (trained since stage 3, the evaluation before) is evaluated and
    # passes: final/ = stage 5 (0.95), which evaluation at 0, 3, 6 alone never sees; stage 4 is not needed
    diversity = [1.0, 0.9, 0.8, 0.75, 0.5, 0.71, 0.3]
    run, task, rows, cfg = _floored_run(tmp_path / "pass", diversity)
    assert task.evaluated == [0, 3, 6, 5] and final_weights(run) == 5
    stop = read_stop(run.root)
    assert stop["final_stage"] == 5 and stop["evaluated_after_stop"] == [5]
    saved = {r["stage"]: r for r in run.metrics()}
    assert [s for s, r in saved.items() if "eval_reward_mean" in r] == [0, 3, 5, 6]
    assert saved[5]["eval_reward_mean"] == 0.95 and saved[5]["eval_fallback"] is True and "eval_fallback" not in saved[6]
    assert run.check_stage(5) is None  # resealed with its new eval files
    # resuming the stopped run evaluates nothing again and keeps stage 5
    task2 = Floored(SCRIPT, diversity)
    run_raft(cfg, task2, run, should_stop=cfg.stopper())
    assert task2.evaluated == [] and task2.stages_run == [] and final_weights(run) == 5

    # stage 5 fails the floor too: stage 4 is evaluated and passes; the best above the floors is stage 3 (0.7 > 0.6)
    run, task, _, _ = _floored_run(tmp_path / "fail", [1.0, 0.9, 0.8, 0.75, 0.72, 0.5, 0.3])
    assert task.evaluated == [0, 3, 6, 5, 4] and final_weights(run) == 3
    assert read_stop(run.root)["evaluated_after_stop"] == [4, 5]


def test_floor_patience_evaluates_after_a_dip_and_rides_it_out(tmp_path):
    # eval.every=3: stage 3 dips under the floor; patience 1 stops there and falls back to stage 2
    diversity = [1.0, 0.9, 0.8, 0.69, 0.75, 0.72, 0.71]
    run, task, _, _ = _floored_run(tmp_path / "one", diversity)
    assert task.evaluated == [0, 3, 2] and final_weights(run) == 2
    # patience 2: stage 4 is evaluated at once (not on the every-3 schedule), passes, and the run goes on to stage 6
    run, task, rows, _ = _floored_run(tmp_path / "two", diversity, "early_stop.floor_patience=2")
    assert task.stages_run == [1, 2, 3, 4, 5, 6] and task.evaluated == [0, 3, 4, 6]
    assert final_weights(run) == 6 and read_stop(run.root) is None
    # stage 4 under it too: stop after 4; the fallback starts below the stretch (stage 2), as with patience 1
    run, task, _, _ = _floored_run(tmp_path / "both", [1.0, 0.9, 0.8, 0.69, 0.6, 0.72, 0.71], "early_stop.floor_patience=2")
    assert task.stages_run == [1, 2, 3, 4] and task.evaluated == [0, 3, 4, 2] and final_weights(run) == 2
    assert read_stop(run.root)["reason"].endswith("under a floor at stages 3, 4 in a row (early_stop.floor_patience 2)")
    # the last stage dips and no stage follows: final/ falls back all the same (stage 5, evaluated now: 0.95)
    run, task, _, _ = _floored_run(tmp_path / "last", [1.0, 0.9, 0.8, 0.75, 0.72, 0.71, 0.6], "early_stop.floor_patience=2")
    assert task.stages_run == [1, 2, 3, 4, 5, 6] and task.evaluated == [0, 3, 6, 5] and final_weights(run) == 5
    stop = read_stop(run.root)
    assert stop["final_stage"] == 5 and "the run ended before 2 evaluated stages in a row" in stop["reason"]
    # resumed with more stages, the dip is read again at once: stage 7 is evaluated in full
    task2 = Floored(SCRIPT + [0.97], [1.0, 0.9, 0.8, 0.75, 0.72, 0.71, 0.6, 0.8])
    cfg2 = _floored_cfg(7, "early_stop.floor_patience=2")
    run_raft(cfg2, task2, run, should_stop=cfg2.stopper())
    assert task2.stages_run == [7] and task2.evaluated == [7] and final_weights(run) == 7 and read_stop(run.root) is None


@pytest.mark.parametrize(
    "diversity, evaluated, expected",
    [
        ({0: 1.0, 3: 0.8, 6: 0.5}, [0, 3, 6], [5, 4]),  # before the first failing evaluation, newest first
        ({0: 1.0, 3: 0.5, 6: 0.4}, [0, 3, 6], [2, 1]),  # the first failure is stage 3: back to the base
        ({0: 1.0, 3: 0.8, 6: 0.9}, [0, 3, 6], []),  # nothing fails (a patience stop): nothing to do
        ({0: 1.0, 2: 0.8, 3: 0.9, 6: 0.1}, [0, 2, 3, 6], [5, 4]),  # unevaluated stages before the last pass stay
        ({0: 1.0, 3: 0.5, 4: 0.8, 6: 0.4}, [0, 3, 4, 6], [5]),  # a dip ridden out (floor_patience): after its pass
    ],
)
def test_skipped_stages_against_brute_force(diversity, evaluated, expected):
    rows = [{"stage": s, **({"time_eval": 1.0, "eval_diversity": diversity[s]} if s in evaluated else {})} for s in range(7)]

    def passes(r):
        return r["eval_diversity"] >= 0.7

    # brute force: walk back from the first evaluated failure since the last pass to the evaluation before it
    last_ok = max(s for s in evaluated if passes(rows[s]))
    first_fail = min((s for s in evaluated if s > last_ok and not passes(rows[s])), default=None)
    brute = []
    if first_fail is not None:
        last_ok = max(s for s in evaluated if s < first_fail)
        brute = [s for s in range(first_fail - 1, last_ok, -1) if s not in evaluated]
    assert skipped_stages(rows, passes) == brute == expected
