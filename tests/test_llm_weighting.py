"""Loss weights of kept completions (train.base_importance, train.crowding_power): the weights against a
brute-force reference, the importance weights recovering the base's proportions, the weighted loss by hand,
and the task writing the weights' effective sample size."""

import copy
import math

import pytest
import torch

from raft_diffusion.core.config import config_from_dict
from raft_diffusion.core.errors import ConfigError
from raft_diffusion.llm.config import LLMConfig
from raft_diffusion.llm.model import add_lora
from raft_diffusion.llm.sft import collate, token_logprobs, train_response_only
from raft_diffusion.llm.weighting import crowding, effective_size, kept_weights
from tests.test_llm_raftpp import _kw
from tests.test_llm_units import load, tiny  # noqa: F401  (the tiny GPT-2 fixture)


def test_crowding_by_hand():
    texts = ["a gem .", "a gem .", "a triumph .", "wow"]
    # bigrams: "a gem" and "gem ." are in 2 of the 4 texts, "a triumph" and "triumph ." in 1; "wow" has none
    assert crowding(texts) == pytest.approx([2 / 4, 2 / 4, 1 / 4, 1.0])
    # a bigram repeated inside one text counts once for that text: "a gem was a gem" holds {a gem, gem was, was a}
    assert crowding(["a gem was a gem", "a gem ."]) == pytest.approx([(2 + 1 + 1) / (3 * 2), (2 + 1) / (2 * 2)])
    assert crowding([]) == []


def brute_weights(texts, log_ratios, a, g, cap):
    """The definition, term by term, with no shifting: prod of (p_base/p_theta)^a and crowding^-g, mean 1, capped."""
    n = len(texts)
    raw = []
    for i, t in enumerate(texts):
        grams = {tuple(t.split()[j : j + 2]) for j in range(len(t.split()) - 1)}
        share = [sum(1 for u in texts if g_ in {tuple(u.split()[j : j + 2]) for j in range(len(u.split()) - 1)}) / n for g_ in grams]
        c = sum(share) / len(share) if share else 1.0
        raw.append(math.exp(-a * log_ratios[i]) * c**-g)
    mean = sum(raw) / n
    return [min(r / mean, cap) if cap is not None else r / mean for r in raw]


@pytest.mark.parametrize("a,g,cap", [(1.0, 0.0, None), (0.3, 0.0, 10.0), (0.0, 1.0, None), (0.5, 2.0, 3.0), (1.0, 1.0, 1.5)])
def test_kept_weights_match_the_definition(a, g, cap):
    texts = ["a gem .", "a gem .", "the staff was a gem .", "a triumph .", "what a joy", "wow"]
    lrs = [3.0, 3.0, 2.0, 0.5, -1.0, 0.0]
    got = kept_weights(texts, lrs, base_importance=a, crowding_power=g, weight_max=cap)
    assert got == pytest.approx(brute_weights(texts, lrs, a, g, cap))
    if cap is None:
        assert sum(got) / len(got) == pytest.approx(1.0)
    else:
        assert max(got) <= cap + 1e-12 and sum(got) / len(got) <= 1.0 + 1e-12


def test_kept_weights_off_huge_ratios_and_missing_ratios():
    assert kept_weights(["a b"], [None]) is None  # both weightings off: plain RAFT
    assert kept_weights([], [], crowding_power=1.0) == []
    # log-ratios far beyond exp's range: no overflow, the smallest ratio takes all the weight
    assert kept_weights(["x y", "y z", "z w"], [2000.0, -2000.0, 1000.0], base_importance=1.0) == pytest.approx([0.0, 3.0, 0.0])
    with pytest.raises(ValueError, match="base_importance needs each kept completion's log p/p_base"):
        kept_weights(["x y"], [None], base_importance=1.0)
    assert effective_size([1.0, 1.0, 1.0, 1.0]) == pytest.approx(4.0) and effective_size([4.0, 0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_size([2.0, 1.0, 1.0]) == pytest.approx(16 / 6)


def test_full_importance_weights_turn_the_models_proportions_into_the_bases():
    """Kept set drawn in the current model's proportions q (6:3:1); with a = 1 the weighted shares are the base's p."""
    q = {"A x": 0.6, "B x": 0.3, "C x": 0.1}
    p = {"A x": 0.2, "B x": 0.3, "C x": 0.5}
    texts = [t for t, share in q.items() for _ in range(round(10 * share))]
    w = kept_weights(texts, [math.log(q[t]) - math.log(p[t]) for t in texts], base_importance=1.0)
    for t in q:
        assert sum(wi for ti, wi in zip(texts, w) if ti == t) / len(texts) == pytest.approx(p[t])
    # crowding alone flattens the same set towards one weight per distinct text: each text's total share 1/3
    w = kept_weights(texts, [None] * len(texts), crowding_power=1.0)
    for t in q:
        assert sum(wi for ti, wi in zip(texts, w) if ti == t) / len(texts) == pytest.approx(1 / 3)


def test_weighted_loss_by_hand_and_zero_weight_examples_do_not_train(tiny):  # noqa: F811
    examples = [([3, 4], [5, 6, 0]), ([7], [8, 9, 10, 0]), ([11, 12, 13], [14, 0]), ([4], [15, 16, 0])]
    weights = [0.5, 2.0, 0.0, 1.5]
    model, _ = load(tiny)
    start = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", init_seed=0)

    def lora_b(m):
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if "lora_B" in n])

    b = collate([p for p, _ in examples], [c for _, c in examples], 1)
    with torch.no_grad():
        lp, mask = token_logprobs(copy.deepcopy(start).eval(), b)
    hand = -sum(w * float(row.sum()) for w, row in zip(weights, lp)) / int(mask.sum())  # divisor: all 12 response tokens
    out = train_response_only(copy.deepcopy(start), examples, max_steps=1, learning_rate=4e-3, weights=weights, **_kw())
    assert out["loss_mean"] == pytest.approx(hand, rel=1e-5)
    # all weights 1 is the plain loss, step for step
    plain, ones = copy.deepcopy(start), copy.deepcopy(start)
    train_response_only(plain, examples, max_steps=2, learning_rate=4e-3, **_kw())
    train_response_only(ones, examples, max_steps=2, learning_rate=4e-3, weights=[1.0] * 4, **_kw())
    assert torch.allclose(lora_b(plain), lora_b(ones), atol=1e-7)
    # weight only on example 4, 4 = 12 tokens / its 3: the same loss, so the same step, as example 4 alone
    only, alone = copy.deepcopy(start), copy.deepcopy(start)
    train_response_only(only, examples, max_steps=1, learning_rate=4e-3, weights=[0.0, 0.0, 0.0, 4.0], **_kw())
    train_response_only(alone, examples[3:], max_steps=1, learning_rate=4e-3, **_kw(batch_size=1))
    assert lora_b(only).abs().max() > 1e-3 and torch.allclose(lora_b(only), lora_b(alone), atol=1e-6)
    with pytest.raises(ValueError, match="3 weights for 4 examples"):
        train_response_only(copy.deepcopy(start), examples, max_steps=1, learning_rate=4e-3, weights=[1.0] * 3, **_kw())


def test_config_checks():
    for over, msg in [
        ("train.base_importance=-0.1", "train.base_importance must be >= 0"),
        ("train.crowding_power=-1", "train.crowding_power must be >= 0"),
        ("train.weight_max=0.5", r"train.weight_max must be >= 1 \(the mean weight\)"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict({}, [over], cls=LLMConfig)
    cfg = config_from_dict({}, ["train.crowding_power=1", "train.base_importance=0.5", "train.weight_max=null"], cls=LLMConfig)
    assert (cfg.train.crowding_power, cfg.train.base_importance, cfg.train.weight_max) == (1.0, 0.5, None)


def test_a_stage_with_weights_writes_their_effective_size(tmp_path):
    """One toy stage with both weightings: the kept completions' weights (recomputed from samples.jsonl) give the
    effective sample size the stage reports."""
    from raft_diffusion.core.loop import run_raft
    from raft_diffusion.core.rundir import RunDir, read_jsonl
    from raft_diffusion.llm.task import LLMTask

    data = {
        "num_stages": 1,
        "progress": False,
        "model": {"pretrained": "toy", "num_threads": 1},
        "prompts": {"train": "builtin:toy_train", "eval": ["the hotel was"], "per_stage": 10},
        "sampling": {"num_per_prompt": 4, "batch_size": 40, "max_new_tokens": 12},
        "ranking": {"mode": "threshold", "threshold": 3.0},
        "train": {"epochs": 1, "batch_size": 16, "learning_rate": 1e-3, "base_importance": 0.5, "crowding_power": 1.0},
        "eval": {"num_per_prompt": 2, "best_of_k": 0, "report": False},
    }
    cfg = config_from_dict(data, cls=LLMConfig)
    run = RunDir(tmp_path / "run")
    run.start(cfg.to_dict())
    rows = run_raft(cfg, LLMTask(cfg), run)
    kept = [r for r in read_jsonl(run.stage_dir(1) / "samples.jsonl") if r["kept"]]  # weights do not depend on order
    assert len(kept) >= 3 and all("log_ratio" in r for r in kept)  # log-ratios computed although kl_beta is 0
    w = brute_weights([r["completion"] for r in kept], [r["log_ratio"] for r in kept], 0.5, 1.0, 10.0)
    assert rows[1]["train_weight_ess"] == pytest.approx(effective_size(w), rel=1e-6)
    assert rows[1]["train_weight_ess"] < len(kept) - 1e-6  # the weights are not all equal
