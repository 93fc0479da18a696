"""End-to-end LLM RAFT on the committed toy text world: the reward climbs, adapters reload, runs resume,
bad input fails with one clear line."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from raft_diffusion.core.config import config_from_dict
from raft_diffusion.core.errors import UserError
from raft_diffusion.core.loop import run_raft
from raft_diffusion.core.rundir import RunDir, read_jsonl
from raft_diffusion.core.seeds import eval_seed
from raft_diffusion.core.types import Sample
from raft_diffusion.llm.config import LLMConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

CPU = torch.device("cpu")


def small_cfg(*overrides, **sections):
    base = {
        "num_stages": 2,
        "progress": False,
        "seed": 0,
        "model": {"pretrained": "toy", "num_threads": 1},
        "prompts": {"per_stage": None},
        "sampling": {"num_per_prompt": 8, "batch_size": 480, "max_new_tokens": 24},
        "reward": {"name": "toy_sentiment"},
        "ranking": {"mode": "local", "top_k": 1},
        "train": {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3},
        "eval": {"num_per_prompt": 8, "best_of_k": 8, "gold_reward": {"name": "toy_gold"}},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(base, list(overrides), cls=LLMConfig)


def run(cfg, root, **task_kw):
    from raft_diffusion.llm.task import LLMTask

    rd = RunDir(root)
    rd.start(cfg.to_dict())
    task = LLMTask(cfg, **task_kw)
    return run_raft(cfg, task, rd), task


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy_run")
    cfg = small_cfg()
    rows, task = run(cfg, root)
    return cfg, root, rows, task


def test_two_stages_raise_the_reward_and_the_gold(toy_run):
    cfg, root, rows, _ = toy_run
    base, last = rows[0], rows[-1]
    assert [r["stage"] for r in rows] == [0, 1, 2]
    # measured: +0.56 base std at seed 0 (+0.35 / +0.72 at seeds 1 / 2); gold +0.63 (+0.38 / +0.87)
    assert last["eval_reward_mean"] > base["eval_reward_mean"] + 0.25 * base["eval_reward_std"], (base, last)
    assert last["eval_gold_mean"] > base["eval_gold_mean"] + 0.25
    assert rows[2]["reward_mean"] > rows[1]["reward_mean"] + 0.05  # the training pool climbs too
    for key in ("eval_reward_std", "eval_distinct_1", "eval_distinct_2", "eval_length", "eval_base_perplexity"):
        assert key in last and last[key] == last[key], key
    assert 1.0 < base["eval_base_perplexity"] < 10 and 5 < base["eval_length"] < 24
    assert base["eval_base_best_of_k"] > base["eval_reward_mean"] + 0.5 * base["eval_reward_std"]
    assert rows[1]["num_kept"] == 60 and rows[1]["num_generated"] == 480 and rows[1]["train_steps"] == 12


def test_reward_queries_count_what_the_reward_scored(toy_run):
    _, _, rows, task = toy_run
    held_out = len(task.eval_prompts) * 8  # eval.num_per_prompt = best_of_k = 8: the reference reuses them
    assert [r["eval_reward_queries"] for r in rows] == [held_out, 2 * held_out, 3 * held_out]
    scored = [r["num_generated"] - r["num_discarded"] for r in rows[1:]]  # a discarded completion is never scored
    assert [r["reward_queries"] for r in rows] == [0, scored[0], scored[0] + scored[1]]
    assert all(0 < rows[0][k] <= rows[1][k] <= rows[2][k] for k in ("seconds", "cpu_seconds", "eval_seconds"))


def test_run_directory_layout(toy_run):
    cfg, root, rows, _ = toy_run
    samples = read_jsonl(root / "stages" / "001" / "samples.jsonl")
    assert len(samples) == 480 and sum(s["kept"] for s in samples) == 60
    assert {"completion", "n_tokens", "finish", "prompt", "reward"} <= set(samples[0])
    kept = read_jsonl(root / "stages" / "001" / "kept.jsonl")
    assert len(kept) == 60 and kept[0]["completion_ids"][-1] == 0  # ends with <|endoftext|>
    evals = read_jsonl(root / "stages" / "002" / "eval.jsonl")
    assert len(evals) == 10 * 8 and {"completion", "reward", "gold", "base_logprob", "seed"} <= set(evals[0])
    assert evals[0]["seed"] == eval_seed(0, 0, 0)
    for d in (root / "stages" / "001" / "lora", root / "stages" / "002" / "lora", root / "final"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    from raft_diffusion.llm.report import write_report

    html = write_report(root).read_text()
    assert html.count("<h3>") == 10 and "stage 2" in html and "distinct-2" in html
    assert evals[0]["completion"].replace("'", "&#x27;") in html


def test_saved_adapter_reloads_and_reproduces_the_eval(toy_run):
    from peft import PeftModel

    from raft_diffusion.llm.generate import encode_prompts, sample_completions
    from raft_diffusion.llm.model import load_causal_lm, load_tokenizer, resolve_model_path

    cfg, root, rows, task = toy_run
    path = resolve_model_path("toy")
    tok = load_tokenizer(path)
    for stage_dir, folder in ((root / "stages" / "002", root / "final"), (root / "stages" / "001", root / "stages" / "001" / "lora")):
        model = PeftModel.from_pretrained(load_causal_lm(path, device=CPU, dtype=torch.float32), str(folder)).eval()
        want = read_jsonl(stage_dir / "eval.jsonl")
        ids = encode_prompts(tok, [r["prompt"] for r in want], chat=False)
        got = sample_completions(model, tok, ids, [r["seed"] for r in want], max_new_tokens=cfg.sampling.max_new_tokens)
        assert [c.text for c in got] == [r["completion"] for r in want]


def test_killed_run_resumes_to_the_same_stage(toy_run, tmp_path):
    cfg, root, rows, _ = toy_run
    part = tmp_path / "part"
    shutil.copytree(root, part)
    (part / "stages" / "002" / "stage.json").unlink()  # killed before stage 2 was marked done
    shutil.rmtree(part / "final")
    again, _ = run(cfg, part)
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "cpu_seconds", "eval_seconds")}  # noqa: E731
    assert [strip(r) for r in again] == [strip(r) for r in rows]
    assert (part / "final" / "adapter_model.safetensors").read_bytes() == (root / "final" / "adapter_model.safetensors").read_bytes()


def test_kl_key_uses_the_adapter_disabled_base(toy_run):
    """log_ratio of a sample = log p(adapter) - log p(base), the base being a separately loaded copy."""
    from peft import PeftModel

    from raft_diffusion.llm.model import load_causal_lm, resolve_model_path
    from raft_diffusion.llm.sft import sequence_logprobs

    cfg, root, _, task = toy_run
    task.cfg.ranking.kl_beta = 0.1  # the live task holds the stage-2 adapter
    try:
        reqs = [Sample(prompt_index=p, sample_index=k, seed=100 * p + k) for p in range(3) for k in range(2)]
        batch = next(iter(task.sample(3, reqs)))
        task.discard(batch)
        task.score(batch)  # the log-ratio is computed with the reward, for the completions the filters kept
    finally:
        task.cfg.ranking.kl_beta = 0.0
    live = [s for s in batch if "discarded" not in s.extras]
    assert len(live) >= 4
    path = resolve_model_path("toy")
    base = load_causal_lm(path, device=CPU, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(load_causal_lm(path, device=CPU, dtype=torch.float32), str(root / "final")).eval()
    P, C = [s.payload["prompt_ids"] for s in live], [s.payload["completion_ids"] for s in live]
    want = [a - b for (a, _), (b, _) in zip(sequence_logprobs(tuned, P, C, 1), sequence_logprobs(base, P, C, 1))]
    assert [s.log_ratio for s in live] == pytest.approx(want, abs=1e-3)
    assert max(abs(x) for x in want) > 0.5  # the adapter moved the model


def test_reward_with_no_scores_fails_clearly(tmp_path):
    cfg = small_cfg("num_stages=1")
    with pytest.raises(ValueError, match="returned no score \\(None/NaN\\) for all"):
        run(cfg, tmp_path, reward=lambda prompts, completions, **kw: [None] * len(completions))


def test_rewards_probed_before_anything_is_generated():
    """The reward and the gold reward score two short completions when the task loads: an infinite score or the wrong
    number of scores fails there, before the base's evaluation; no score (None) passes the probe."""
    from raft_diffusion.llm.task import LLMTask
    from reward_models.errors import RewardOutputError

    cfg = small_cfg("num_stages=1")
    seen = []

    def reward(value, n=None):
        def score(prompts, completions, **kw):
            seen.append((list(prompts), list(completions)))
            return [value] * (n or len(completions))

        return score

    with pytest.raises(RewardOutputError, match="returned inf for 2 of 2 completions"):
        LLMTask(cfg, reward=reward(float("inf")))
    assert seen == [([cfg_prompts(cfg.prompts.train)[0], cfg_prompts(cfg.prompts.eval)[0]], ["", "Yes."])]
    with pytest.raises(RewardOutputError, match="returned 3 scores for 2 completions"):
        LLMTask(cfg, gold_reward=reward(1.0, n=3))
    LLMTask(cfg, reward=reward(None))


def cfg_prompts(spec):
    from raft_diffusion.llm.prompts import load_prompts

    return load_prompts(spec)


def test_filters_that_discard_everything_fail_clearly(tmp_path):
    cfg = small_cfg("num_stages=1", "filters.min_tokens=100", "eval.every=0", "prompts.per_stage=2")
    with pytest.raises(UserError, match="the discard rules discarded all 16 completions of stage 1 .*shorter than 100 tokens"):
        run(cfg, tmp_path)


def write_pool(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_empty_external_completion_is_named(tmp_path):
    pool = write_pool(tmp_path / "pool.jsonl", [{"prompt": "the food was", "completion": "great ."}, {"prompt": "the food was", "completion": "  "}])
    with pytest.raises(UserError, match="pool.jsonl:2 has an empty completion"):
        run(small_cfg(f"sampling.external_pool={pool}", "mode=offline"), tmp_path / "run")


def test_missing_model_and_assets_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="(tokenizer|model) folder not found: .*missing_lm; give an existing folder"):
        run(small_cfg(f"model.pretrained={tmp_path / 'missing_lm'}"), tmp_path / "a")
    import raft_diffusion.llm.assets as M

    monkeypatch.setattr(M, "TOY_DIR", tmp_path / "no_toy")
    with pytest.raises(UserError, match="toy text world artifact not found: .*no_toy/lm; build it with 'raft-diffusion llm toyworld build'"):
        run(small_cfg(), tmp_path / "b")


def test_cli_offline_pool_run_and_errors(tmp_path, capsys):
    from raft_diffusion.llm.cli import main

    pool = write_pool(
        tmp_path / "pool.jsonl",
        [
            {"prompt": "we tried the new bistro downtown and", "completion": c}
            for c in ["the food was delicious .", "the food was awful .", "the staff was friendly . highly recommended .", "i hated the soup ."]
        ]
        + [{"prompt": "i read this book on vacation and", "completion": "the story was gripping ."}],
    )
    out = tmp_path / "run"
    args = [
        "align",
        "--config",
        str(CONFIGS / "llm_toy_sentiment.yaml"),
        "--output-dir",
        str(out),
        "num_stages=2",
        "mode=offline",
        f"sampling.external_pool={pool}",
        "ranking.mode=local",
        "ranking.kl_beta=0",
        "train.max_steps=2",
        "eval.num_per_prompt=1",
    ]
    assert main(args) == 0
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    assert len(samples) == 5 and [s["sample_index"] for s in samples] == [0, 1, 2, 3, 0]
    best = {p: max((s for s in samples if s["prompt_index"] == p), key=lambda s: s["reward"])["completion"] for p in (0, 1)}
    assert [s["completion"] for s in samples if s["kept"]] == [best[0], "the story was gripping ."]
    assert best[0] in ("the food was delicious .", "the staff was friendly . highly recommended .")
    assert not (out / "stages" / "002" / "samples.jsonl").exists()  # offline: one pool, reused
    assert (out / "report.html").is_file() and (out / "final" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["align", "--config", str(CONFIGS / "llm_toy_sentiment.yaml"), "--output-dir", str(tmp_path / "x"), "sampling.max_new_token=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'sampling.max_new_token'; did you mean 'sampling.max_new_tokens'?"
    assert main(["report", "--run-dir", str(tmp_path / "nothing")]) == 2
    assert "run directory" in (err := capsys.readouterr().err) and "does not exist" in err


def test_cli_refuses_several_processes(tmp_path, capsys, monkeypatch):
    from raft_diffusion.llm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets
    assert main(["align", "--config", str(CONFIGS / "llm_toy_sentiment.yaml"), "--output-dir", str(tmp_path / "run")]) == 2
    assert "llm align runs on one process (the launcher started 2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_dedupe_filter_keeps_one_copy_per_stage(tmp_path):
    cfg = small_cfg(
        "num_stages=1",
        "eval.every=0",
        "prompts.per_stage=6",
        "filters.dedupe=true",
        "sampling.max_new_tokens=3",
        "filters.min_tokens=1",
        "train.max_steps=1",
    )
    run(cfg, tmp_path)
    samples = read_jsonl(tmp_path / "stages" / "001" / "samples.jsonl")
    live = [" ".join(s["completion"].split()) for s in samples if "discarded" not in s]
    dups = [s for s in samples if s.get("discarded") == "duplicate"]
    assert len(live) == len(set(live)) and dups  # 3-token completions repeat; only the first copy is ranked
    assert all(s["reward"] is None and not s["kept"] for s in dups)
    assert all(" ".join(d["completion"].split()) in live for d in dups)
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["num_discarded"] == len(dups)


def test_full_finetuning_keeps_a_frozen_base_copy(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = small_cfg(
        "num_stages=1",
        "train.method=full",
        "ranking.kl_beta=0.1",
        "prompts.per_stage=4",
        "sampling.num_per_prompt=4",
        "train.max_steps=2",
        "train.learning_rate=1e-4",
        "eval.num_per_prompt=1",
        "eval.best_of_k=0",
    )
    rows, task = run(cfg, tmp_path)
    samples = read_jsonl(tmp_path / "stages" / "001" / "samples.jsonl")
    ratios = [s["log_ratio"] for s in samples if "log_ratio" in s]
    assert len(ratios) >= 12 and max(abs(x) for x in ratios) < 1e-4  # before any training, model == base copy
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert (tmp_path / "final" / "tokenizer.json").is_file()
    w = dict(saved.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    live = dict(task.model.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    frozen = dict(task.base.named_parameters())["transformer.h.0.attn.c_attn.weight"]
    assert torch.equal(w, live.detach()) and not torch.equal(w, frozen)  # trained weights saved, base kept apart
    assert "eval_base_best_of_k" not in rows[0] and rows[1]["eval_base_perplexity"] > 1


def test_early_stop_guard_on_distinct_2():
    cfg = small_cfg("early_stop.min_diversity_ratio=0.8", "early_stop.diversity_metric=eval_distinct_2")  # the pooled figure
    stop = cfg.stopper()
    rows = [
        {"stage": 0, "eval_reward_mean": 3.0, "eval_distinct_2": 0.5},
        {"stage": 1, "eval_reward_mean": 3.5, "eval_distinct_2": 0.45},
        {"stage": 2, "eval_reward_mean": 4.0, "eval_distinct_2": 0.41},
    ]
    assert stop(rows) is None
    rows.append({"stage": 3, "eval_reward_mean": 4.5, "eval_distinct_2": 0.39})
    assert "eval_distinct_2 0.39 at stage 3 fell below 0.8 x the base model's 0.5" in stop(rows)
    assert stop.best_stage(rows) == 2  # the best stage that stays above the floor
    assert small_cfg().stopper() is None
    with pytest.raises(Exception, match="early_stop.min_diversity_ratio must be in"):
        small_cfg("early_stop.min_diversity_ratio=1.5")


def test_screen_scores_the_first_held_out_seeds(toy_run, tmp_path):
    """eval.screen_per_prompt on the LLM task: the first 2 fixed seeds of each held-out prompt, the completions and
    rewards the final stage's full evaluation got there, their mean and std by hand; rows in screen.jsonl."""
    _, root, rows, task = toy_run
    out = task.screen(2, tmp_path, 2)
    full = [r for r in read_jsonl(Path(root) / "stages" / "002" / "eval.jsonl") if r["sample_index"] < 2]
    screened = read_jsonl(tmp_path / "screen.jsonl")
    assert [(r["prompt_index"], r["sample_index"], r["seed"], r["completion"]) for r in screened] == [
        (r["prompt_index"], r["sample_index"], r["seed"], r["completion"]) for r in full
    ]
    rewards = [r["reward"] for r in full]
    mean = sum(rewards) / len(rewards)
    assert out["screen_n"] == out["eval_reward_queries"] == len(task.eval_prompts) * 2
    assert out["screen_reward_mean"] == pytest.approx(mean, abs=1e-6)
    assert out["screen_reward_std"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5, abs=1e-6)


def test_lora_scaled_screens_the_adapter_at_a_scale_and_gives_it_back(toy_run, tmp_path):
    """early_stop.lora_scales on the LLM task: a screen with the adapter at scale 3 differs from scale 1's, and
    afterwards the adapter is byte for byte what it was (the scale-1 screen repeats exactly)."""
    _, _, _, task = toy_run
    from raft_diffusion.core.lora_scale import lora_b_parameters

    before = [p.detach().clone() for p in lora_b_parameters(task.model)]
    plain = task.screen(2, tmp_path, 2)
    with task.lora_scaled(3.0):
        scaled = task.screen(2, tmp_path, 2)
    assert task.screen(2, tmp_path, 2) == plain
    assert scaled["screen_reward_mean"] != pytest.approx(plain["screen_reward_mean"], abs=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, lora_b_parameters(task.model)))
