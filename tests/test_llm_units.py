"""LLM module units on a tiny random GPT-2 built from a config: masks, log-probs, sampling, filters, loading."""

import math
from pathlib import Path

import pytest
import torch

from raft_diffusion.core.config import config_from_dict
from raft_diffusion.core.errors import ConfigError, UserError
from raft_diffusion.llm.config import FilterConfig, LLMConfig
from raft_diffusion.llm.filters import Filters, most_repeated_ngram
from raft_diffusion.llm.generate import encode_prompts, left_pad, sample_completions, uses_chat_template
from raft_diffusion.llm.metrics import distinct_n, perplexity
from raft_diffusion.llm.model import add_lora, load_causal_lm, load_tokenizer
from raft_diffusion.llm.sft import IGNORE, collate, sequence_logprobs, token_logprobs, train_response_only

WORDS = "the food was good bad great awful and but i loved hated it service staff very not . , a".split()
CPU = torch.device("cpu")


def save_word_tokenizer(folder, *, pad=True, eos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {"unk_token": "<unk>"}
    if pad:
        kw["pad_token"] = "<pad>"
    if eos:
        kw["eos_token"] = "<eos>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GPT-2 (fixed init) and its word-level tokenizer, saved in transformers format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny_lm")
    v = save_word_tokenizer(folder)
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=v,
        n_positions=48,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        initializer_range=0.3,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def load(folder):
    return load_causal_lm(str(folder), device=CPU, dtype=torch.float32), load_tokenizer(str(folder))


# -- response-only loss --------------------------------------------------------------------------
def test_collate_masks_prompt_and_padding():
    b = collate([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 10], [8, 11, 12, 13, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 9, 10], [IGNORE, 11, 12, 13, IGNORE]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 3]]
    # too long: prompt loses tokens from the left, the completion is kept
    t = collate([[5, 6, 7, 8]], [[9, 10]], pad_id=1, max_length=4)
    assert t["input_ids"].tolist() == [[7, 8, 9, 10]] and t["labels"].tolist() == [[IGNORE, IGNORE, 9, 10]]


def test_loss_covers_response_tokens_only(tiny):
    model, _ = load(tiny)
    b = collate([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], pad_id=1)
    lp, mask = token_logprobs(model, b)
    assert mask.sum().item() == 5 and mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    # by hand: log-softmax of the logits before each response token
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.log_softmax(-1)
    hand = [logits[0, 2, 9] + logits[0, 3, 10], logits[1, 0, 11] + logits[1, 1, 12] + logits[1, 2, 13]]
    assert torch.allclose(lp.sum(-1), torch.stack(hand), atol=1e-5)


def test_training_loss_is_the_response_token_nll(tiny):
    model, _ = load(tiny)
    lora = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", init_seed=0)
    prompt, completion = [3, 4, 5], [6, 7, 0]
    kw = dict(
        pad_id=1,
        epochs=1,
        batch_size=4,
        gradient_accumulation_steps=2,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_length=None,
        seed=0,
    )
    resp_lp, n_resp = sequence_logprobs(lora, [prompt], [completion], 1)[0]
    full_lp, n_full = sequence_logprobs(lora, [prompt[:1]], [prompt[1:] + completion], 1)[0]
    # the first step's loss (before its update) is the mean NLL of the 3 response tokens, not of all 5 predicted tokens
    one = train_response_only(lora, [(prompt, completion)] * 4, max_steps=1, learning_rate=1e-9, **kw)
    assert n_resp == 3 and n_full == 5
    assert one["loss_mean"] == pytest.approx(-resp_lp / 3, rel=1e-4)
    assert abs(one["loss_mean"] - (-full_lp / 5)) > 0.05
    out = train_response_only(lora, [(prompt, completion)] * 4, max_steps=30, learning_rate=3e-2, **kw)
    after = sequence_logprobs(lora, [prompt], [completion], 1)[0][0]
    assert out["train_steps"] == 30 and out["train_tokens"] == 30 * 8 * 3
    assert after > resp_lp + 3.0  # the response became far more likely
    assert out["loss_last"] < out["loss_mean"] < one["loss_mean"]


def test_empty_kept_completions_are_a_clear_error(tiny):
    model, _ = load(tiny)
    lora = add_lora(model, rank=2, alpha=2, dropout=0.0, target_modules="all-linear", init_seed=0)
    with pytest.raises(UserError, match="none of the kept completions has a response token"):
        train_response_only(
            lora,
            [([3, 4], [])],
            pad_id=1,
            epochs=1,
            max_steps=None,
            batch_size=2,
            gradient_accumulation_steps=1,
            learning_rate=1e-3,
            lr_scheduler="constant",
            lr_warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            max_length=None,
            seed=0,
        )


# -- KL key: base log-probs come from the same model with the adapter disabled ------------------
def test_adapter_disabled_logprobs_equal_base_model(tiny):
    base, _ = load(tiny)
    model, _ = load(tiny)
    lora = add_lora(model, rank=4, alpha=8, dropout=0.0, target_modules="all-linear", init_seed=0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    prompts, comps = [[3, 4, 5], [6]], [[7, 8, 0], [9, 10, 11, 12]]
    ref = sequence_logprobs(base, prompts, comps, 1)
    with lora.disable_adapter():
        off = sequence_logprobs(lora, prompts, comps, 1)
    on = sequence_logprobs(lora, prompts, comps, 1)
    for (a, n1), (b, n2) in zip(ref, off):
        assert n1 == n2 and abs(a - b) < 1e-4
    assert all(abs(a - b) > 0.1 for (a, _), (b, _) in zip(on, ref))  # the adapter does change them
    assert [n for _, n in ref] == [3, 4]


# -- sampling --------------------------------------------------------------------------------------
def test_each_completion_depends_only_on_its_seed(tiny):
    model, tok = load(tiny)
    ids = encode_prompts(tok, ["the food was", "i loved it and the service was very", "but"], chat=False)
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9)
    full = sample_completions(model, tok, [ids[0], ids[1], ids[2], ids[0]], [11, 22, 33, 44], **kw)
    solo = [sample_completions(model, tok, [p], [s], **kw)[0] for p, s in zip([ids[0], ids[1], ids[2], ids[0]], [11, 22, 33, 44])]
    shuffled = sample_completions(model, tok, [ids[0], ids[2], ids[0], ids[1]], [44, 33, 11, 22], **kw)
    assert [c.ids for c in full] == [c.ids for c in solo]
    assert [c.ids for c in full] == [shuffled[2].ids, shuffled[3].ids, shuffled[1].ids, shuffled[0].ids]
    assert full[0].ids != full[3].ids  # another seed, another completion
    assert all(c.n_tokens == len(c.ids) - (c.finish == "eos") for c in full)


def test_ended_rows_leave_the_batch_and_logprob_is_the_teacher_forced_one(tiny, monkeypatch):
    """Rows that end drop out of the batch (and the KV cache) mid-generation; each completion is still the one it
    gets alone, and its logprob is the teacher-forced log p(ids | prompt) of the unfiltered model."""
    from transformers.cache_utils import DynamicCache

    calls = []
    select = DynamicCache.batch_select_indices
    monkeypatch.setattr(DynamicCache, "batch_select_indices", lambda self, idx: (calls.append(len(idx)), select(self, idx))[1])
    model, tok = load(tiny)
    ids = encode_prompts(tok, ["the food was", "i loved it and the service was very", "but"], chat=False)
    prompts, seeds = [ids[i % 3] for i in range(16)], list(range(100, 116))
    ends = {tok.eos_token_id, tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("and")}  # rows end at different steps
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=12, eos=ends)
    batch = sample_completions(model, tok, prompts, seeds, **kw)
    assert calls and calls[0] < 16  # some rows ended early and left the batch
    assert len({len(c.ids) for c in batch}) >= 4
    calls.clear()
    solo = [sample_completions(model, tok, [p], [s], **kw)[0] for p, s in zip(prompts, seeds)]
    assert [c.ids for c in batch] == [c.ids for c in solo]
    assert not calls  # one row never shrinks
    forced = sequence_logprobs(model, prompts, [c.ids for c in batch], tok.pad_token_id)
    assert [c.logprob for c in batch] == pytest.approx([lp for lp, _ in forced], abs=1e-4)
    assert [c.logprob for c in batch] == pytest.approx([c.logprob for c in solo], abs=1e-5)


def test_left_padding_gives_the_unpadded_logits(tiny):
    model, tok = load(tiny)
    short, long_ = [3, 4], [5, 6, 7, 8, 9]
    ids, mask = left_pad([short, long_], tok.pad_token_id, CPU)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]
        alone = model(input_ids=torch.tensor([short])).logits[:, -1]
    assert torch.allclose(batched[0], alone[0], atol=1e-5)


def test_top_k_one_is_greedy_and_temperature_zero_is_argmax(tiny):
    model, tok = load(tiny)
    ids = encode_prompts(tok, ["the food was"], chat=False)
    g1 = sample_completions(model, tok, ids, [1], max_new_tokens=8, top_k=1)[0]
    g2 = sample_completions(model, tok, ids, [2], max_new_tokens=8, temperature=0.0)[0]
    assert g1.ids == g2.ids
    seq = list(ids[0])
    with torch.no_grad():
        for t in g1.ids:
            assert t == int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(t)


def test_stop_strings_cut_the_completion(tiny):
    model, tok = load(tiny)
    ids = encode_prompts(tok, ["the food was"], chat=False)
    free = sample_completions(model, tok, ids, [5], max_new_tokens=16, temperature=0.0)[0]
    words = free.text.split()
    assert len(words) >= 4, free.text
    stop = " " + words[3]  # occurs after at least three words
    n = next(n for n in range(1, len(free.ids) + 1) if stop in tok.decode(free.ids[:n], skip_special_tokens=True))
    cut = sample_completions(model, tok, ids, [5], max_new_tokens=16, temperature=0.0, stop_strings=["zzz", stop])[0]
    assert cut.finish == "stop" and cut.text == free.text[: free.text.index(stop)]
    assert cut.ids == free.ids[:n]  # the tokens through the stop string are kept (training teaches the stop)
    assert len(cut.text.split()) >= 3


def test_chat_template_wraps_prompts(tiny):
    _, tok = load(tiny)
    assert not uses_chat_template(tok, "auto")
    with pytest.raises(UserError, match="no chat template"):
        uses_chat_template(tok, "always")
    tok.chat_template = "{% for m in messages %}i {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} but{% endif %}"
    assert uses_chat_template(tok, "auto") and not uses_chat_template(tok, "never")
    chat = encode_prompts(tok, ["the food"], chat=True)[0]
    assert tok.convert_ids_to_tokens(chat) == ["i", "the", "food", "but"]


def test_no_pad_token_uses_eos_or_fails_clearly(tmp_path):
    save_word_tokenizer(tmp_path / "nopad", pad=False)
    tok = load_tokenizer(str(tmp_path / "nopad"))
    assert tok.pad_token == "<eos>" and tok.padding_side == "left"
    assert load_tokenizer(str(tmp_path / "nopad"), pad_token="<unk>").pad_token == "<unk>"
    with pytest.raises(UserError, match="not in the vocabulary"):
        load_tokenizer(str(tmp_path / "nopad"), pad_token="<nothing>")
    save_word_tokenizer(tmp_path / "bare", pad=False, eos=False)
    with pytest.raises(UserError, match="has no pad token and no eos token.*model.pad_token"):
        load_tokenizer(str(tmp_path / "bare"))


def test_missing_or_incomplete_model_is_a_clear_error(tmp_path, tiny):
    with pytest.raises(UserError, match="model folder not found: .*nowhere; give an existing folder"):
        load_causal_lm(str(tmp_path / "nowhere"), device=CPU, dtype=torch.float32)
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(vocab_size=8, n_positions=8, n_embd=8, n_layer=1, n_head=1)).save_pretrained(tmp_path / "body")
    import json

    cfg = json.loads((tmp_path / "body" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["tie_word_embeddings"] = False
    (tmp_path / "body" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not hold every weight.*random"):
        load_causal_lm(str(tmp_path / "body"), device=CPU, dtype=torch.float32)


# -- filters and metrics -----------------------------------------------------------------------
def test_filters():
    f = Filters(FilterConfig(min_tokens=2, max_tokens=10, discard_regex=["#{3,}", r"\bawful\b"], repeated_ngram_size=2, max_ngram_repeats=2))
    assert f.reason("", 0) == "empty"
    assert f.reason("good", 1) == "shorter than 2 tokens"
    assert f.reason("a " * 11, 11) == "longer than 10 tokens"
    assert f.reason("great ### food", 3) == "matches '#{3,}'"
    assert f.reason("the food was awful", 4) == "matches '\\\\bawful\\\\b'"
    assert f.reason("the food the food the food", 6) == "repeats 'the food' 3 times"
    assert f.reason("the food the food was good", 6) is None  # twice is allowed
    assert f.reason("the food was good", 4, "length") is None
    assert Filters(FilterConfig(require_stop=True)).reason("the food was good", 4, "length") == "cut off at max_new_tokens"
    assert most_repeated_ngram("a b a b a".split(), 2) == (("a", "b"), 2)
    with pytest.raises(ConfigError, match="not a valid regex"):
        config_from_dict({"filters": {"discard_regex": ["(unclosed"]}}, cls=LLMConfig)


def test_metrics_numbers():
    assert distinct_n(["a b c", "a b d"], 1) == pytest.approx(4 / 6)
    assert distinct_n(["a b c", "a b d"], 2) == pytest.approx(3 / 4)
    assert distinct_n(["a", ""], 2) == 0.0
    assert perplexity([-2.0, -4.0], [2, 4]) == pytest.approx(math.exp(1.0))


def test_config_rules():
    cfg = config_from_dict({"sampling": {"num_per_prompt": 4}, "ranking": {"top_k": 2}}, ["train.epochs=1"], cls=LLMConfig)
    assert cfg.best_of_k == 4 and cfg.ranking.mode == "local"
    with pytest.raises(ConfigError, match="ranking.top_k=5 keeps more than"):
        config_from_dict({"sampling": {"num_per_prompt": 4}, "ranking": {"top_k": 5}}, cls=LLMConfig)
    with pytest.raises(ConfigError, match="did you mean 'sampling.max_new_tokens'"):
        config_from_dict({}, ["sampling.max_new_token=3"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="sampling.top_p"):
        config_from_dict({}, ["sampling.top_p=0"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="each needs ranking.mode=local"):
        config_from_dict({}, ["ranking.mode=threshold", "ranking.diversity_weight=1"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="must be >= 0"):
        config_from_dict({}, ["ranking.novelty_weight=-1"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="ranking.threshold_quantile raises the threshold of ranking.mode=threshold"):
        config_from_dict({}, ["ranking.threshold_quantile=0.5"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="ranking.threshold_max=1.0 is below ranking.threshold=2.0"):
        config_from_dict({}, ["ranking.mode=threshold", "ranking.threshold=2", "ranking.threshold_max=1"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="use the filters.. discard rules and set ranking.prompt_match=null"):
        config_from_dict({}, ["ranking.prompt_match=1"], cls=LLMConfig)
    with pytest.raises(ConfigError, match="an offline run .mode=offline or sampling.external_pool. picks once, at stage 1"):
        config_from_dict({}, ["mode=offline", "ranking.kl_beta=0.05"], cls=LLMConfig)
    assert config_from_dict({}, ["mode=offline", "ranking.kl_beta=0"], cls=LLMConfig).ranking.kl_beta == 0


def test_ngram_embedding_distance_by_hand():
    """Cosine distance of hashed uni+bigram counts: shared n-grams / (norm * norm), by hand."""
    import torch

    from raft_diffusion.llm.metrics import ngram_embedding

    a, b, c = (torch.tensor(ngram_embedding(t, dim=4096)) for t in ("a delight .", "a delight . a gem", "what a pleasure"))
    # "a delight ." : a, delight, . + (a delight), (delight .)                        -> 5 grams, |a|^2 = 5
    # "a delight . a gem": a x2, delight, ., gem + (a delight), (delight .), (. a), (a gem) -> |b|^2 = 4 + 3 + 4 = 11
    # shared with a: a (1*2) + delight + . + (a delight) + (delight .) -> a.b = 6
    assert float(a @ a) == 5 and float(b @ b) == 11 and float(a @ b) == 6
    assert float(a @ c) == 1  # "a" only
    assert ngram_embedding("", dim=8) == [0.0] * 8


def test_diverse_pick_over_ngrams_skips_the_repeat():
    """With the n-gram vectors, a prompt's second pick is the different completion, not the copy of the first."""
    from raft_diffusion.core.ranking import diverse_pick
    from raft_diffusion.llm.metrics import ngram_embedding

    texts = ["a triumph .", "a triumph .", "the prose was lovely"]  # best first: 4.9, 4.9, 4.5
    emb = [ngram_embedding(t) for t in texts]
    assert diverse_pick([4.9, 4.9, 4.5], emb, 2, weight=0.0) == [0, 1]
    assert diverse_pick([4.9, 4.9, 4.5], emb, 2, weight=0.5) == [0, 2]  # 4.5 + 0.5 * 1 > 4.9 + 0.5 * 0


def test_add_llm_parser_hooks_into_a_main_parser(capsys):
    import argparse

    from raft_diffusion.llm.cli import add_llm_parser, main

    parser = argparse.ArgumentParser(prog="raft-diffusion")
    add_llm_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["llm", "align", "--config", "c.yaml", "--output-dir", "out", "seed=3", "sampling.top_p=0.9"])
    assert a.func.__name__ == "_align" and a.overrides == ["seed=3", "sampling.top_p=0.9"] and str(a.output_dir) == "out"
    b = parser.parse_args(["llm", "toyworld", "build", "--threads", "1"])
    assert b.func.__module__ == "raft_diffusion.llm.toyworld.cli" and b.threads == 1 and b.lm_steps == 1200
    assert main(["config-help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("sampling.stop_strings ([]): ") for line in lines)
    assert any(line.startswith("ranking.kl_beta (0.0): ") for line in lines)


def test_gradient_accumulation_equals_one_big_batch(tiny):
    """2 micro-batches of 2 accumulate to the same update as 1 batch of 4 (the loss is per response token)."""
    examples = [([3, 4], [5, 0]), ([6], [7, 8, 9, 0]), ([10, 11, 12], [0]), ([4], [13, 14, 0])]  # unequal lengths
    kw = dict(
        pad_id=1,
        epochs=1,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler="constant",
        lr_warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        max_length=None,
        seed=3,
    )
    weights = []
    for bs, acc in ((4, 1), (2, 2), (1, 4)):
        model, _ = load(tiny)
        lora = add_lora(model, rank=2, alpha=2, dropout=0.0, target_modules="all-linear", init_seed=0)
        out = train_response_only(lora, examples, batch_size=bs, gradient_accumulation_steps=acc, **kw)
        assert out["train_tokens"] == 30
        weights.append(torch.cat([p.detach().flatten() for n, p in lora.named_parameters() if "lora_B" in n]))
    assert weights[0].abs().max() > 1e-3  # the step did something
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and torch.allclose(weights[0], weights[2], atol=1e-6)


def test_llm_scheduler_names_are_transformers_own():
    from transformers import SchedulerType

    from raft_diffusion.llm.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_every_llm_preset_loads_and_passes_preflight():
    """configs/llm_*.yaml load with the LLM config class; the toy ones also pass the preflight (prompt sets)."""
    from raft_diffusion.core.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    names = sorted(p.name for p in root.glob("llm_*.yaml"))
    assert {"llm_toy_sentiment.yaml", "llm_toy_distill.yaml", "llm_gpt2_imdb.yaml"} <= set(names)
    for name in names:
        cfg = load_config(root / name, cls=LLMConfig)
        if cfg.model.pretrained == "toy":
            cfg.preflight()
    distill = load_config(root / "llm_toy_distill.yaml", cls=LLMConfig)
    assert (distill.mode, distill.train.method, distill.ranking.mode, distill.ranking.threshold) == ("offline", "full", "threshold", 4.8)
