"""Honest diversity metrics, the portable base-model name of a saved adapter, and RAFT++'s clipped
importance-weighted loss, each against a by-hand reference (tiny GPT-2 from tests/test_llm_units.py)."""

import copy
import os
from pathlib import Path

import pytest
import torch

from raft_diffusion.core.config import config_from_dict
from raft_diffusion.core.errors import ConfigError
from raft_diffusion.llm.config import LLMConfig
from raft_diffusion.llm.metrics import distinct_n, distinct_n_per_prompt, repeated_ngram_rate
from raft_diffusion.llm.model import add_lora, portable_model_name
from raft_diffusion.llm.sft import clipped_objective, collate, old_token_logprobs, token_logprobs, train_response_only
from tests.test_llm_units import load, tiny  # noqa: F401  (the tiny GPT-2 fixture)


def test_per_prompt_distinct_and_repeated_bigrams_by_hand():
    groups = [["a b c", "a b d"], ["x x x x"]]
    # prompt 0: bigrams ab bc ab bd -> 3 distinct of 4; prompt 1: xx xx xx -> 1 of 3
    assert distinct_n_per_prompt(groups, 2) == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert distinct_n_per_prompt(groups, 1) == pytest.approx((4 / 6 + 1 / 4) / 2)
    assert distinct_n([t for g in groups for t in g], 2) == pytest.approx(4 / 7)  # pooled: ab bc bd xx of 7
    # more prompts writing the same things: the pooled figure falls, the per-prompt one does not
    many = [["a b c", "a b d"]] * 5
    assert distinct_n([t for g in many for t in g], 2) == pytest.approx(3 / 20)
    assert distinct_n_per_prompt(many, 2) == pytest.approx(3 / 4)
    assert distinct_n_per_prompt([["one"], ["two words"]], 2) == pytest.approx(0.5)  # no bigram at all counts 0
    assert distinct_n_per_prompt([], 2) != distinct_n_per_prompt([], 2)  # NaN
    # "a gem was a gem": a-gem gem-was was-a a-gem, 1 repeat of 4; "x x x x": 2 repeats of 3
    assert repeated_ngram_rate(["a gem was a gem", "x x x x"], 2) == pytest.approx(3 / 7)
    assert repeated_ngram_rate(["a gem was a gem"], 3) == 0.0 and repeated_ngram_rate(["a", ""], 2) == 0.0


def test_diversity_floor_reads_the_per_prompt_metric_unless_told():
    base = {"num_stages": 2, "early_stop": {"min_diversity_ratio": 0.8}}
    rows = [
        {"stage": 0, "eval_reward_mean": 3.0, "eval_distinct_2": 0.44, "eval_distinct_2_per_prompt": 0.76},
        {"stage": 1, "eval_reward_mean": 4.0, "eval_distinct_2": 0.30, "eval_distinct_2_per_prompt": 0.70},
    ]
    per_prompt = config_from_dict(base, cls=LLMConfig).stopper()
    assert per_prompt(rows) is None  # 0.70 >= 0.8 x 0.76
    pooled = config_from_dict(base, ["early_stop.diversity_metric=eval_distinct_2"], cls=LLMConfig).stopper()
    assert "eval_distinct_2 0.3 at stage 1 fell below 0.8 x the base model's 0.44" in pooled(rows)
    with pytest.raises(ConfigError, match="early_stop.diversity_metric must be one of eval_distinct_2_per_prompt"):
        config_from_dict(base, ["early_stop.diversity_metric=eval_reward_mean"], cls=LLMConfig)
    with pytest.raises(ConfigError, match=r"train.clip_epsilon must be in \(0, 1\)"):
        config_from_dict({}, ["train.clip_epsilon=0"], cls=LLMConfig)


def test_portable_model_name(tmp_path):
    from raft_diffusion.llm.assets import toy_path

    assert portable_model_name("gpt2") == "gpt2" and portable_model_name("org/name") == "org/name"
    assert portable_model_name("./models/lm") == "./models/lm" and portable_model_name("/abs/lm") == "/abs/lm"  # as the user gave it
    rel = portable_model_name("toy", cwd=tmp_path)
    assert not os.path.isabs(rel) and (tmp_path / rel).resolve() == toy_path("lm").resolve()
    assert portable_model_name("toy", cwd=toy_path("lm").parents[3]) == "llm/assets/toy/lm"


def test_clipped_objective_values_and_gradient():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([0.5, 1.0, 1.1, 1.5])).requires_grad_(True)  # ratios to old (p_old = 1)
    obj = clipped_objective(logp, old, 0.2)
    assert obj.tolist() == pytest.approx([0.5, 1.0, 1.1, 1.2])  # min(r, clip(r, 0.8, 1.2)) with advantage 1
    obj.sum().backward()
    # d/dlogp of r is r where it is not clipped; the clipped token gives no gradient
    assert logp.grad.tolist() == pytest.approx([0.5, 1.0, 1.1, 0.0])


def _kw(**over):
    kw = dict(
        pad_id=1,
        epochs=1,
        batch_size=4,
        gradient_accumulation_steps=1,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_length=None,
        seed=0,
    )
    return {**kw, **over}


def test_clipped_loss_first_step_is_the_nll_step_then_clips(tiny):  # noqa: F811
    """Step 1 (ratio 1): the same update as the NLL. Step 2: the loss equals -mean(min(r, clip(r))) by hand."""
    examples = [([3, 4], [5, 6, 0]), ([7], [8, 9, 10, 0]), ([11, 12, 13], [14, 0]), ([4], [15, 16, 0])]
    model, _ = load(tiny)
    lora = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", init_seed=0)
    start = copy.deepcopy(lora)

    def lora_b(m):
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if "lora_B" in n])

    nll = copy.deepcopy(start)
    train_response_only(nll, examples, max_steps=1, learning_rate=4e-3, **_kw())
    clip1 = copy.deepcopy(start)
    out1 = train_response_only(clip1, examples, max_steps=1, learning_rate=4e-3, clip_epsilon=0.2, **_kw())
    assert out1["loss_mean"] == pytest.approx(-1.0)  # every ratio is 1 before the first update
    assert lora_b(nll).abs().max() > 1e-3 and torch.allclose(lora_b(nll), lora_b(clip1), atol=1e-7)

    clip2 = copy.deepcopy(start)
    out2 = train_response_only(clip2, examples, max_steps=2, learning_rate=4e-3, clip_epsilon=0.2, **_kw())
    # by hand: ratios of the model after step 1 to the start model, on all 4 examples (batch_size = 4 = one pass)
    b = collate([p for p, _ in examples], [c for _, c in examples], 1)
    with torch.no_grad():
        old, mask = token_logprobs(start.eval(), b)
        new, _ = token_logprobs(nll.eval(), b)
    ratio = torch.exp(new - old)[mask]
    assert (ratio > 1.2).any() and (ratio < 1.2).any()  # some tokens are clipped, some are not
    hand = -torch.minimum(ratio, ratio.clamp(0.8, 1.2)).sum() / mask.sum()
    assert out2["loss_last"] == pytest.approx(float(hand), rel=1e-5)
    # the per-example old log-probs are the collated response tokens in order
    per = old_token_logprobs(start, examples, 1, batch_size=3, max_length=None)
    assert [len(x) for x in per] == [3, 4, 2, 3] and torch.allclose(torch.cat(per), old[mask], atol=1e-6)


def test_clip_epsilon_reaches_the_task_and_the_saved_adapter_names_the_base(tmp_path):
    """A one-stage toy run with train.clip_epsilon: its loss is the clipped objective (near -1), and the adapter's
    base_model_name_or_path is the toy LM relative to where the run started, not an install path."""
    from raft_diffusion.core.loop import run_raft
    from raft_diffusion.core.rundir import RunDir, read_jsonl
    from raft_diffusion.llm.task import LLMTask

    data = {
        "num_stages": 1,
        "progress": False,
        "model": {"pretrained": "toy", "num_threads": 1},
        "prompts": {"train": "builtin:toy_train", "eval": ["i bought this phone last month and", "the hotel was"]},
        "sampling": {"num_per_prompt": 2, "batch_size": 120, "max_new_tokens": 12},
        "ranking": {"mode": "local", "top_k": 1},
        "train": {"epochs": 2, "batch_size": 30, "learning_rate": 1e-3, "clip_epsilon": 0.2},
        "eval": {"num_per_prompt": 3, "best_of_k": 0},
    }
    cfg = config_from_dict(data, cls=LLMConfig)
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict())
    rows = run_raft(cfg, LLMTask(cfg), run)
    assert rows[1]["train_steps"] == 4 and -1.2 <= rows[1]["loss_mean"] <= -0.8
    import json

    name = json.loads((run.final_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not os.path.isabs(name) and (Path.cwd() / name).resolve() == (Path(__file__).parents[1] / "raft_diffusion/llm/assets/toy/lm").resolve()
    assert str(Path.cwd()) not in (run.final_dir / "README.md").read_text()
    # the per-prompt metrics equal the by-hand figures over eval.jsonl
    ev = read_jsonl(run.stage_dir(1) / "eval.jsonl")
    groups = [[r["completion"] for r in ev if r["prompt_index"] == p] for p in (0, 1)]
    assert rows[1]["eval_distinct_2_per_prompt"] == pytest.approx(distinct_n_per_prompt(groups, 2))
    assert rows[1]["eval_distinct_1_per_prompt"] == pytest.approx(distinct_n_per_prompt(groups, 1))
    assert rows[1]["eval_repeated_2gram_rate"] == pytest.approx(repeated_ngram_rate([r["completion"] for r in ev], 2))
    assert rows[1]["eval_length"] == pytest.approx(sum(r["n_tokens"] for r in ev) / 6)
