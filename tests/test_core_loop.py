"""The stage loop on a toy task with no model: resume, offline mode, metrics, bad rewards."""

import math

import pytest
import torch

from raft_diffusion.core.errors import ScoreError
from raft_diffusion.core.loop import run_raft
from raft_diffusion.core.rundir import RunDir, read_jsonl, write_json
from raft_diffusion.core.seeds import eval_seed
from raft_diffusion.diffusion.config import config_from_dict


class ScalarTask:
    """The 'model' is one number mu; a sample is mu + N(0,1) drawn from its seed; reward = sample."""

    reward_name = "identity"
    skips_discarded = False
    console_metrics = ()

    def __init__(self, cfg, n_prompts=3, reward_fn=None):
        self.cfg = cfg
        self.mu = 0.0
        self.train_prompts = [f"p{i}" for i in range(n_prompts)]
        self.reward_fn = reward_fn or (lambda xs: torch.tensor(xs))
        self.finetuned_on = []

    def _draw(self, seed):
        return self.mu + torch.randn((), generator=torch.Generator().manual_seed(seed)).item()

    def plan(self, stage):
        return None  # the loop's K-per-prompt plan

    def discard(self, batch):
        pass

    def sample(self, stage, requests):
        for i in range(0, len(requests), 4):
            batch = list(requests[i : i + 4])
            for s in batch:
                s.payload = self._draw(s.seed)
            yield batch

    def score(self, batch):
        return self.reward_fn([s.payload for s in batch])

    def save_kept(self, stage_dir, kept):
        write_json(stage_dir / "kept.json", {f"{s.prompt_index}/{s.sample_index}": s.payload for s in kept})

    def load_kept(self, stage_dir, kept):
        import json

        values = json.loads((stage_dir / "kept.json").read_text())
        for s in kept:
            s.payload = values[f"{s.prompt_index}/{s.sample_index}"]
        return kept

    def finetune(self, stage, kept):
        self.finetuned_on.append(sorted((s.prompt_index, s.sample_index) for s in kept))
        self.mu = 0.5 * self.mu + 0.5 * sum(s.payload for s in kept) / len(kept)
        return {"loss_mean": -self.mu}

    def save(self, stage_dir):
        write_json(stage_dir / "weights" / "mu.json", {"mu": self.mu})

    def restore(self, stage_dir):
        import json

        self.mu = json.loads((stage_dir / "weights" / "mu.json").read_text())["mu"]

    def weights_dir(self, stage_dir):
        return stage_dir / "weights"

    def evaluate(self, stage, stage_dir):
        xs = [self.mu + torch.randn((), generator=torch.Generator().manual_seed(eval_seed(self.cfg.seed, 0, k))).item() for k in range(8)]
        return {"eval_reward_mean": sum(xs) / len(xs), "eval_reward_queries": len(xs)}


def _cfg(**over):
    base = {"num_stages": 3, "progress": False, "sampling": {"num_per_prompt": 6}, "ranking": {"top_k": 2}}
    return config_from_dict(base, [f"{k}={v}" for k, v in over.items()])


def strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "cpu_seconds", "eval_seconds")} for r in rows]


def test_loop_metrics_and_layout(tmp_path):
    cfg = _cfg()
    run = RunDir(tmp_path)
    run.start(cfg.to_dict())
    rows = run_raft(cfg, ScalarTask(cfg), run)
    assert [r["stage"] for r in rows] == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_max", "kept_reward_mean", "num_generated", "num_kept", "reward_queries", "seconds"):
        assert key in rows[1], key
    assert rows[1]["num_generated"] == 18 and rows[1]["num_kept"] == 6
    assert [r["reward_queries"] for r in rows] == [0, 18, 36, 54]
    assert rows[3]["eval_reward_mean"] > rows[0]["eval_reward_mean"] + 0.5  # the loop climbs
    samples = read_jsonl(tmp_path / "stages" / "001" / "samples.jsonl")
    assert len(samples) == 18 and sum(s["kept"] for s in samples) == 6
    assert set(samples[0]) >= {"prompt_index", "sample_index", "seed", "reward", "kept", "prompt"}
    # kept = the top 2 of each prompt by reward
    for p in range(3):
        mine = sorted((s for s in samples if s["prompt_index"] == p), key=lambda s: -s["reward"])
        assert [s["kept"] for s in mine] == [True, True, False, False, False, False]
    assert (tmp_path / "final" / "mu.json").read_text() == (tmp_path / "stages" / "003" / "weights" / "mu.json").read_text()


def test_cost_columns_are_cumulative_from_process_start(tmp_path):
    from raft_diffusion.core.clock import process_cpu_seconds, process_seconds

    cfg = _cfg()
    run = RunDir(tmp_path)
    run.start(cfg.to_dict())
    wall0, cpu0 = process_seconds(), process_cpu_seconds()
    rows = run_raft(cfg, ScalarTask(cfg), run)
    wall1, cpu1 = process_seconds(), process_cpu_seconds()
    assert rows == run.metrics()
    assert [r["eval_reward_queries"] for r in rows] == [8, 16, 24, 32]  # 8 held-out samples per evaluation
    assert [r["reward_queries"] for r in rows] == [0, 18, 36, 54]  # training samples only
    # counted from this process's start (pytest's start-up included), not from the loop's
    assert wall0 <= rows[0]["seconds"] <= wall1 and cpu0 <= rows[0]["cpu_seconds"] <= cpu1
    for key in ("seconds", "cpu_seconds", "eval_seconds"):
        values = [r[key] for r in rows]
        assert values == sorted(values), key
    assert rows[-1]["eval_seconds"] == pytest.approx(sum(r["time_eval"] for r in rows))
    assert rows[-1]["eval_seconds"] < rows[-1]["seconds"] - wall0


def test_reward_queries_leave_out_samples_the_reward_never_saw(tmp_path):
    class Filtering(ScalarTask):
        skips_discarded = True
        asked = 0

        def discard(self, batch):
            for s in batch:
                if s.sample_index % 3 == 0:
                    s.extras["discarded"] = "filtered"

        def score(self, batch):
            live = [s for s in batch if "discarded" not in s.extras]
            self.asked += len(live)
            scores = iter(self.reward_fn([s.payload for s in live]).tolist())
            return [None if "discarded" in s.extras else next(scores) for s in batch]

    cfg = _cfg()
    run = RunDir(tmp_path / "skips")
    run.start(cfg.to_dict())
    task = Filtering(cfg)
    rows = run_raft(cfg, task, run)
    assert task.asked == 3 * 12 and [r["reward_queries"] for r in rows] == [0, 12, 24, 36]  # 2 of 6 per prompt filtered
    assert [r["num_discarded"] for r in rows[1:]] == [6, 6, 6]

    class ScoresAll(Filtering):  # discarded, but still scored (the diffusion task's prompt_match)
        skips_discarded = False

    run = RunDir(tmp_path / "scores")
    run.start(cfg.to_dict())
    assert [r["reward_queries"] for r in run_raft(cfg, ScoresAll(cfg), run)] == [0, 18, 36, 54]


def test_killed_run_resumes_to_the_same_result(tmp_path):
    cfg = _cfg()
    full = RunDir(tmp_path / "full")
    full.start(cfg.to_dict())
    ref = run_raft(cfg, ScalarTask(cfg), full)

    part = RunDir(tmp_path / "part")
    part.start(cfg.to_dict())

    class Killed(Exception):
        pass

    task = ScalarTask(cfg)
    orig = task.finetune

    def dying(stage, kept):
        if stage == 2:
            raise Killed
        return orig(stage, kept)

    task.finetune = dying
    with pytest.raises(Killed):
        run_raft(cfg, task, part)
    assert part.last_completed() == 1
    resumed_task = ScalarTask(cfg)
    rows = run_raft(cfg, resumed_task, part)
    assert strip_time(rows) == strip_time(ref)  # eval_reward_queries and reward_queries carry on
    for key in ("seconds", "cpu_seconds", "eval_seconds"):  # on top of the killed process's, from the last row
        assert rows[2][key] >= rows[1][key], key
    assert rows[2]["eval_seconds"] - rows[1]["eval_seconds"] == pytest.approx(rows[2]["time_eval"])
    assert resumed_task.finetuned_on == [  # only stages 2 and 3 ran again
        sorted((s["prompt_index"], s["sample_index"]) for s in read_jsonl(part.stage_dir(st) / "samples.jsonl") if s["kept"]) for st in (2, 3)
    ]
    assert (part.root / "final" / "mu.json").read_text() == (full.root / "final" / "mu.json").read_text()


def test_offline_mode_samples_once(tmp_path):
    cfg = _cfg(mode="offline")
    run = RunDir(tmp_path)
    run.start(cfg.to_dict())
    task = ScalarTask(cfg)
    run_raft(cfg, task, run)
    assert not (tmp_path / "stages" / "002" / "samples.jsonl").exists()
    assert task.finetuned_on[0] == task.finetuned_on[1] == task.finetuned_on[2]
    assert run.metrics()[-1]["reward_queries"] == 18


def test_wrong_shape_reward_is_named(tmp_path):
    cfg = _cfg()
    run = RunDir(tmp_path)
    task = ScalarTask(cfg, reward_fn=lambda xs: torch.zeros(len(xs), 2))
    with pytest.raises(ScoreError, match=r"reward 'identity' returned a tensor of shape \(4, 2\) for a batch of 4"):
        run_raft(cfg, task, run)
    assert run.metrics()[0]["stage"] == 0  # the base evaluation already computed is kept


def test_all_nan_reward_is_an_error(tmp_path):
    cfg = _cfg()
    task = ScalarTask(cfg, reward_fn=lambda xs: torch.full((len(xs),), math.nan))
    with pytest.raises(ScoreError, match="returned NaN .* for all 18 samples"):
        run_raft(cfg, task, RunDir(tmp_path))


def test_rising_threshold_cut_and_row(tmp_path):
    """ranking.threshold_quantile (an LLM ranking key): each stage keeps what reaches the quantile of its own
    rewards, never less than ranking.threshold; the cut is the row's ranking_threshold."""
    from raft_diffusion.core.config import config_from_dict as core_config_from_dict
    from raft_diffusion.llm.config import LLMConfig

    base = {"num_stages": 2, "progress": False, "sampling": {"num_per_prompt": 6}, "eval": {"every": 1, "report": False}}
    over = ["ranking.mode=threshold", "ranking.threshold=-0.5", "ranking.threshold_quantile=0.75", "ranking.threshold_max=0.9"]
    cfg = core_config_from_dict(base, over, cls=LLMConfig)
    run = RunDir(tmp_path)
    run.start(cfg.to_dict())
    rows = run_raft(cfg, ScalarTask(cfg), run)
    for stage in (1, 2):
        samples = read_jsonl(tmp_path / "stages" / f"{stage:03d}" / "samples.jsonl")
        r = sorted(s["reward"] for s in samples)  # 18 rewards: the 0.75-quantile sits at position 12.75
        cut = min(0.9, max(-0.5, r[12] + 0.75 * (r[13] - r[12])))
        assert rows[stage]["ranking_threshold"] == pytest.approx(cut)
        assert {(s["prompt_index"], s["sample_index"]) for s in samples if s["kept"]} == {
            (s["prompt_index"], s["sample_index"]) for s in samples if s["reward"] >= cut
        }
    assert rows[1]["num_kept"] == 5 and rows[2]["ranking_threshold"] == 0.9  # the model climbed: the cap binds at stage 2


def test_replay_trains_on_the_best_of_earlier_stages_too(tmp_path):
    """ranking.replay_top_k=2: stage s trains on its own kept samples plus, per prompt, the 2 best (by reward) of
    what stages 1..s-1 kept, their payloads read back from those stages' folders; brute force from samples.jsonl.
    A run resumed after stage 2 replays the same."""
    cfg = _cfg(**{"ranking.replay_top_k": 2, "num_stages": 4})
    run = RunDir(tmp_path / "full")
    run.start(cfg.to_dict())
    task = ScalarTask(cfg)
    seen = []
    orig = task.finetune
    task.finetune = lambda stage, kept: seen.append(sorted(s.payload for s in kept)) or orig(stage, kept)
    rows = run_raft(cfg, task, run)
    kept = {st: [s for s in read_jsonl(run.stage_dir(st) / "samples.jsonl") if s["kept"]] for st in range(1, 5)}
    for st in range(1, 5):
        mine = [s["reward"] for s in kept[st]]  # the payload is the sample, and the reward equals it
        replay = []
        for p in range(3):
            earlier = sorted((s["reward"] for e in range(1, st) for s in kept[e] if s["prompt_index"] == p), reverse=True)
            replay += earlier[:2]
        assert seen[st - 1] == pytest.approx(sorted(mine + replay), rel=1e-6)  # rewards went through float32
        assert rows[st].get("num_replayed", 0) == len(replay) == (0 if st == 1 else 6)
        if st > 1:
            assert rows[st]["replayed_reward_mean"] == pytest.approx(sum(replay) / 6)
            assert rows[st]["num_kept"] == 6  # the stage's own kept count is unchanged
    assert "num_replayed" not in run_raft(_cfg(), ScalarTask(_cfg()), RunDir(tmp_path / "plain"))[2]  # off by default

    part = RunDir(tmp_path / "part")  # killed in stage 3's training, resumed: the same rows
    part.start(cfg.to_dict())
    dying = ScalarTask(cfg)
    dying.finetune = lambda stage, kept: (_ for _ in ()).throw(KeyboardInterrupt) if stage == 3 else ScalarTask.finetune(dying, stage, kept)
    with pytest.raises(KeyboardInterrupt):
        run_raft(cfg, dying, part)
    assert strip_time(run_raft(cfg, ScalarTask(cfg), part)) == strip_time(rows)


def test_replay_is_refused_offline():
    from raft_diffusion.core.errors import ConfigError

    with pytest.raises(ConfigError, match="replay_top_k replays earlier stages"):
        _cfg(**{"ranking.replay_top_k": 1, "mode": "offline"})
    with pytest.raises(ConfigError, match="replay_top_k must be an integer >= 0"):
        _cfg(**{"ranking.replay_top_k": -1})


def test_negatives_reach_finetuning_marked_and_counted(tmp_path):
    """ranking.negative_k=2: each stage's fine-tuning also gets, per prompt, the 2 lowest rewards of its pool that
    were not kept (brute force from samples.jsonl, where they are marked), with their payloads; the metrics count
    them. Off by default: finetune is called as before, with no negatives."""
    cfg = _cfg(**{"ranking.negative_k": 2})
    run = RunDir(tmp_path / "neg")
    run.start(cfg.to_dict())
    task = ScalarTask(cfg)
    seen = []
    orig = task.finetune
    task.finetune = lambda stage, kept, negatives=None: seen.append([(s.prompt_index, s.payload) for s in negatives]) or orig(stage, kept)
    rows = run_raft(cfg, task, run)
    for st in range(1, 4):
        records = read_jsonl(run.stage_dir(st) / "samples.jsonl")
        want = []
        for p in range(3):
            rest = sorted((r["reward"], r["sample_index"]) for r in records if r["prompt_index"] == p and not r["kept"])
            want += [(p, reward) for reward, _ in rest[:2]]
        assert [(p, pytest.approx(x, rel=1e-6)) for p, x in seen[st - 1]] == want
        assert sorted((r["prompt_index"], r["reward"]) for r in records if r.get("negative")) == sorted(want)
        assert rows[st]["num_negatives"] == 6
        assert rows[st]["negative_reward_mean"] == pytest.approx(sum(x for _, x in want) / 6)
    plain = ScalarTask(_cfg())
    plain.finetune = lambda stage, kept: ScalarTask.finetune(plain, stage, kept)  # no negatives keyword
    assert "num_negatives" not in run_raft(_cfg(), plain, RunDir(tmp_path / "plain"))[2]


def test_negatives_need_local_online_ranking():
    from raft_diffusion.core.errors import ConfigError

    with pytest.raises(ConfigError, match="negative_k picks the worst samples"):
        _cfg(**{"ranking.negative_k": 1, "ranking.mode": "global"})
    with pytest.raises(ConfigError, match="negative_k picks the worst samples"):
        _cfg(**{"ranking.negative_k": 1, "mode": "offline"})
    with pytest.raises(ConfigError, match="negative_k must be an integer"):
        _cfg(**{"ranking.negative_k": -1})
    with pytest.raises(ConfigError, match="nft_beta must be > 0"):
        _cfg(**{"train.nft_beta": 0})
    with pytest.raises(ConfigError, match="reward_weight_key must be reward or selection"):
        _cfg(**{"train.reward_weight_key": "novelty"})
