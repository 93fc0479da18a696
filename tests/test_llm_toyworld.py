"""The toy text world: gold lexicon numbers, deterministic corpus, committed artifacts that load and agree with gold."""

import json
import random
from pathlib import Path

import pytest
import torch

from raft_diffusion.llm.assets import TOY_DIR, toy_path
from raft_diffusion.llm.toyworld import corpus as C

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_gold_score_numbers():
    assert C.gold_score("the food was great .") == 2.0
    assert C.gold_score("the food was not great") == -1.0  # negation: -0.5 x polarity
    assert C.gold_score("the soup was delicious but the waiter was rude") == pytest.approx((3 - 2) / 2)
    assert C.gold_score("we went there on friday") == 0.0
    assert C.gold_score("") == 0.0
    assert C.gold_sentiment(["p", "q"], ["i loved the plot", "what a waste of money"]) == [3.0, -3.0]


def test_corpus_is_deterministic_mixed_and_in_vocabulary():
    a, b = C.corpus(300, seed=3), C.corpus(300, seed=3)
    assert a == b and a != C.corpus(300, seed=4)
    golds = [C.gold_score(t) for t in a]
    pos, neg = sum(g > 0 for g in golds), sum(g < 0 for g in golds)
    assert 0.35 < pos / len(a) < 0.65 and 0.35 < neg / len(a) < 0.65  # mixed sentiment
    vocab = set(C.vocabulary())
    assert all(w in vocab for t in a for w in t.split())
    train, held = C.prompt_sets()
    assert len(train) == 60 and len(held) == 10 and not set(train) & set(held)


def test_committed_artifacts_load_and_reward_tracks_gold():
    from raft_diffusion.llm.rewards import load_text_reward

    info = json.loads(toy_path("build_info.json").read_text())
    assert info["reward_val_rmse"] < 0.5 and info["reward_gold_correlation"] > 0.9 and info["lm_val_perplexity"] < 5
    for name in ("prompts_train.txt", "prompts_eval.txt"):
        assert (TOY_DIR / name).read_text().splitlines() == list(C.prompt_sets()[name == "prompts_eval.txt"])
    reward = load_text_reward({"name": "toy_sentiment"}, torch.device("cpu"))
    rng = random.Random(123)
    texts = [C.review(rng).split(" and ", 1) for _ in range(200)]
    texts = [t for t in texts if len(t) == 2]
    scores = reward([p + " and" for p, _ in texts], [c for _, c in texts])
    golds = [C.gold_score(c) for _, c in texts]
    r = torch.corrcoef(torch.tensor([scores, golds]))[0, 1].item()
    assert r > 0.8, r
    gold = load_text_reward({"name": "toy_gold"}, torch.device("cpu"))
    assert gold(["x"], ["the plot was gripping"]) == [3.0]


@pytest.mark.slow
def test_build_command_writes_loadable_artifacts(tmp_path):
    from raft_diffusion.llm.model import load_causal_lm, load_tokenizer
    from raft_diffusion.llm.toyworld.build import build

    info = build(tmp_path, lm_steps=3, reward_steps=3, log=lambda *_: None)
    assert set(info) >= {"lm_val_loss", "reward_val_accuracy", "build_seconds"}
    tok = load_tokenizer(str(tmp_path / "lm"))
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|endoftext|>"
    load_causal_lm(str(tmp_path / "lm"), device=torch.device("cpu"), dtype=torch.float32)


def test_presets_validate_and_builtin_prompts_load():
    from raft_diffusion.core.config import load_config
    from raft_diffusion.llm.config import LLMConfig
    from raft_diffusion.llm.prompts import load_prompts

    toy = load_config(str(CONFIGS / "llm_toy_sentiment.yaml"), cls=LLMConfig)
    assert toy.ranking.mode == "threshold" and toy.eval.gold_reward == {"name": "toy_gold"} and toy.stopper() is not None
    hub = load_config(str(CONFIGS / "llm_gpt2_imdb.yaml"), ["num_stages=2"], cls=LLMConfig)
    assert hub.model.pretrained == "gpt2" and hub.sampling.stop_strings == ["\n"] and hub.num_stages == 2
    assert len(load_prompts("builtin:movie_openers")) == 24 and len(load_prompts("builtin:toy_eval")) == 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "-1"], "error: --threads must be >= 1 (got -1)"),
        (["--lm-steps", "-1"], "error: --lm-steps must be >= 1 (got -1): the build trains the model for that many steps"),
        (["--reward-steps", "0"], "error: --reward-steps must be >= 1 (got 0): the build trains the model for that many steps"),
        (["--out", "FILE"], "error: --out FILE is a file, not a folder; choose another --out"),
    ],
)
def test_bad_build_options_are_one_line_before_any_training(tmp_path, capsys, argv, message):
    """Refused before the LM and reward model train (an --out that is a file used to fail after minutes of it)."""
    from raft_diffusion.cli import main

    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / a) if a == "FILE" else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "w")]
    assert main(["llm", "toyworld", "build", "--lm-steps", "1", "--reward-steps", "1", *out, *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == message.replace("FILE", str(tmp_path / "FILE"))
    assert captured.out == "" and not (tmp_path / "w").exists()
