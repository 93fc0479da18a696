"""scripts/bench_llm_vs_grpo.py: both sides train the same weights, and a LoRA on the output layer reaches trl.

trl refuses a LoRA on ``lm_head`` because its fused log-prob head multiplies by ``lm_head.weight`` directly; the
bench hands it a view whose ``weight`` is the adapted weight. These tests check that view against the adapter's own
forward and a by-hand W + scale * B A, the trainable parameter count against a by-hand count, and which RAFT
overrides GRPO follows. The trl test runs where trl is installed (skipped otherwise).
"""

from pathlib import Path

import pytest
import torch

from raft_diffusion.llm.model import add_lora, load_causal_lm, load_tokenizer, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["c_attn", "c_proj", "c_fc", "lm_head"]


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("bench_llm_vs_grpo")


def toy_lm():
    return load_causal_lm(resolve_model_path("toy"), device=torch.device("cpu"), dtype=torch.float32)


def perturb_lora_b(model, scale=0.1):
    """lora_B starts at zero (the adapter is a no-op); give every B seeded values so the adapter matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_trainable_count_of_lora_on_the_linear_layers_and_the_output_layer(bench):
    base = toy_lm()
    c = base.config
    d, inner, vocab, r = c.n_embd, c.n_inner, c.vocab_size, 8
    # by hand, per block: c_attn d -> 3d, attn.c_proj d -> d, c_fc d -> inner, mlp.c_proj inner -> d; A is r x in, B out x r
    block = r * ((d + 3 * d) + (d + d) + (d + inner) + (inner + d))
    linear_only = bench.trainable_count(add_lora(toy_lm(), rank=r, alpha=16, dropout=0.0, target_modules="all-linear", init_seed=0))
    with_head = bench.trainable_count(add_lora(base, rank=r, alpha=16, dropout=0.0, target_modules=TARGETS, init_seed=0))
    assert linear_only == c.n_layer * block == 36864
    assert with_head == linear_only + r * (d + vocab) == 40472


def test_adapted_head_view_is_the_output_layers_lora(bench):
    base = toy_lm()
    w0 = base.lm_head.weight.detach().clone()
    model = add_lora(base, rank=8, alpha=16, dropout=0.0, target_modules=TARGETS, init_seed=0)
    perturb_lora_b(model)
    assert bench.adapt_output_layer_for_trl(base, TARGETS) == "lm_head"
    view = base.get_output_embeddings()
    head = base.lm_head
    a, b = head.lora_A["default"].weight, head.lora_B["default"].weight
    h = torch.randn(5, base.config.n_embd, generator=torch.Generator().manual_seed(1))
    # by hand: W + (alpha / r) B A, and it is what the adapted layer computes
    assert torch.allclose(view.weight, w0 + 2.0 * b @ a, atol=1e-6)
    assert torch.allclose(h @ view.weight.T, head(h), atol=1e-5)
    assert (h @ view.weight.T - h @ w0.T).abs().max() > 0.05  # the adapter is not a no-op here
    assert view.bias is None  # GPT-2's output layer has none
    with model.disable_adapter():
        assert torch.equal(view.weight, head.base_layer.weight)
    # gradients reach the output layer's A and B through the view
    (h @ view.weight.T).pow(2).sum().backward()
    assert a.grad is not None and b.grad is not None and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    # the transformers model is untouched otherwise: its class method is still there
    assert type(base).get_output_embeddings(base) is head


def test_no_view_without_the_output_layer_among_the_targets(bench):
    base = toy_lm()
    add_lora(base, rank=8, alpha=16, dropout=0.0, target_modules="all-linear", init_seed=0)
    assert bench.adapt_output_layer_for_trl(base, "all-linear") is None
    assert bench.adapt_output_layer_for_trl(base, ["c_attn", "c_proj"]) is None
    assert base.get_output_embeddings() is base.lm_head


def test_grpo_follows_the_seed_and_the_lora_shape_only(bench):
    overrides = ["seed=1", "prompts.per_stage=20", "train.target_modules=[c_attn,c_proj,c_fc,lm_head]", "train.learning_rate=3e-3"]
    assert bench.shared_overrides(overrides) == ["seed=1", "train.target_modules=[c_attn,c_proj,c_fc,lm_head]"]
    preset = str(ROOT / "configs" / "llm_toy_sentiment.yaml")
    # the default LoRA at seed 0 keeps the cache names measured before
    assert bench.grpo_tag("1e-3:0.04", bench.load_cfg(preset, []), full=False) == "1e-3_0.04"
    assert bench.grpo_tag("5e-4:0", bench.load_cfg(preset, []), full=True) == "5e-4_0_full"
    cfg = bench.load_cfg(preset, bench.shared_overrides(overrides))
    assert bench.grpo_tag("1e-3:0.04", cfg, full=False) == "1e-3_0.04_seed1_r8_a16_d0_c_attn-c_fc-c_proj-lm_head"
    assert bench.grpo_tag("1e-3:0.04", cfg, full=True) == "1e-3_0.04_full_seed1"


def test_the_distill_lora_preset_adapts_the_output_layer(bench):
    from raft_diffusion.core.config import load_config
    from raft_diffusion.llm.config import LLMConfig

    cfg = load_config(ROOT / "configs" / "llm_toy_distill_lora.yaml", cls=LLMConfig)
    full = load_config(ROOT / "configs" / "llm_toy_distill.yaml", cls=LLMConfig)
    assert cfg.train.method == "lora" and cfg.train.target_modules == TARGETS and cfg.train.lora_rank == 8
    assert cfg.mode == "offline" and cfg.sampling.num_per_prompt == 24 and cfg.num_stages == 24
    # the same distillation as the full-weight preset but for what is trained, its step size, K and the stages
    assert (cfg.ranking.threshold, cfg.ranking.kl_beta, cfg.train.epochs, cfg.train.batch_size) == (
        full.ranking.threshold,
        full.ranking.kl_beta,
        full.train.epochs,
        full.train.batch_size,
    )
    # the bench's default RAFT config, so that its default comparison trains the same weights on both sides
    assert Path(bench.PRESET).name == "llm_toy_distill_lora.yaml"


def test_trl_computes_log_probs_through_the_output_layers_lora(bench, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    tok = load_tokenizer(resolve_model_path("toy"))
    base = toy_lm()
    assert bench.adapt_output_layer_for_trl(base, TARGETS) == "lm_head"
    conf = GRPOConfig(
        output_dir=str(tmp_path),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=4,
        max_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        disable_tqdm=True,
        gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(  # without the view trl refuses this adapter (ValueError naming lm_head)
        model=base,
        reward_funcs=lambda prompts, completions, **kw: [float(len(c)) for c in completions],
        args=conf,
        train_dataset=Dataset.from_dict({"prompt": ["the food was", "i bought this"]}),
        processing_class=tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM"),
    )
    assert bench.trainable_count(trainer.model) == 40472
    perturb_lora_b(trainer.model)
    texts = ["the food was great and the staff", "i bought this phone last month"]
    assert bench.check_trl_logprobs(trainer, tok, texts) < 1e-4
    with trainer.model.disable_adapter():  # the base, too (trl's reference when beta > 0)
        assert bench.check_trl_logprobs(trainer, tok, texts) < 1e-4
    # and the adapter changes those log-probs (so the first check could fail)
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        on = trainer.model(**enc).logits.log_softmax(-1)
        with trainer.model.disable_adapter():
            off = trainer.model(**enc).logits.log_softmax(-1)
    assert (on - off).abs().max() > 0.05
