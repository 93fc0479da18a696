"""train.modules_to_save: a LoRA plus modules trained in full (the output layer), saved and reloaded with the adapter."""

import pytest
import torch

from raft_diffusion.core.config import config_from_dict
from raft_diffusion.core.errors import ConfigError, UserError
from raft_diffusion.llm.config import LLMConfig
from raft_diffusion.llm.model import add_lora, load_adapter_weights, load_causal_lm, resolve_model_path, save_adapter
from raft_diffusion.llm.sft import train_response_only

CPU = torch.device("cpu")


def toy_lm():
    return load_causal_lm(resolve_model_path("toy"), device=CPU, dtype=torch.float32)


def with_head(model):
    return add_lora(model, rank=8, alpha=16, dropout=0.0, target_modules="all-linear", init_seed=0, modules_to_save=["lm_head"])


def test_trainable_set_is_the_adapter_and_an_untied_copy_of_the_output_layer():
    base = toy_lm()
    c = base.config
    model = with_head(base)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    lora = {n: k for n, k in trainable.items() if "lora_" in n}
    rest = {n: k for n, k in trainable.items() if "lora_" not in n}
    # by hand: the all-linear LoRA r 8 of the 3 blocks (36,864) and the output layer's vocab x d weight (41,344)
    assert sum(lora.values()) == 36864
    assert (
        rest
        == {"base_model.model.lm_head.modules_to_save.default.weight": c.vocab_size * c.n_embd}
        == {"base_model.model.lm_head.modules_to_save.default.weight": 41344}
    )
    copy = base.lm_head.modules_to_save["default"].weight
    assert copy.data_ptr() != base.transformer.wte.weight.data_ptr()  # GPT-2 ties lm_head to wte: the copy is untied
    assert torch.equal(copy, base.transformer.wte.weight) and not base.transformer.wte.weight.requires_grad


def test_a_step_trains_the_output_layer_copy_and_leaves_the_input_embedding():
    base = toy_lm()
    model = with_head(base)
    wte0 = base.transformer.wte.weight.detach().clone()
    kw = dict(pad_id=1, epochs=1, batch_size=4, gradient_accumulation_steps=1, lr_scheduler="constant", lr_warmup_steps=0)
    kw.update(weight_decay=0.0, max_grad_norm=1.0, max_length=None, seed=0)
    train_response_only(model, [([3, 4, 5], [6, 7, 0])] * 4, max_steps=2, learning_rate=1e-2, **kw)
    head = base.lm_head.modules_to_save["default"].weight
    assert torch.equal(base.transformer.wte.weight, wte0)
    assert (head - wte0).abs().max() > 1e-3  # Adam's first steps move each touched weight by about the lr
    with model.disable_adapter():  # the base model: the original (tied) output layer
        assert torch.equal(base.get_output_embeddings().weight, wte0)


def test_saved_adapter_with_the_output_layer_reloads_to_identical_outputs(tmp_path):
    from peft import PeftModel

    base = toy_lm()
    model = with_head(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tmp_path / "lora")
    ids = torch.tensor([[5, 9, 17, 30, 41, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(toy_lm(), tmp_path / "lora").eval()(input_ids=ids).logits
        resumed = with_head(toy_lm())
        load_adapter_weights(resumed, tmp_path / "lora")
        resumed_logits = resumed(input_ids=ids).logits
    assert (want - base_logits).abs().max() > 0.05  # the saved weights matter
    assert torch.allclose(reloaded, want, atol=1e-5)
    assert torch.allclose(resumed_logits, want, atol=1e-5)


def test_modules_to_save_errors():
    with pytest.raises(UserError, match="train.modules_to_save names 'head'"):
        add_lora(toy_lm(), rank=2, alpha=2, dropout=0.0, target_modules="all-linear", init_seed=0, modules_to_save=["head"])
    with pytest.raises(ConfigError, match="train.modules_to_save goes with train.method=lora"):
        config_from_dict({"train": {"method": "full", "modules_to_save": ["lm_head"]}}, cls=LLMConfig)
    with pytest.raises(ConfigError, match="non-empty list of module names"):
        config_from_dict({"train": {"modules_to_save": []}}, cls=LLMConfig)
    ok = config_from_dict({}, ["train.modules_to_save=[lm_head]"], cls=LLMConfig)
    assert ok.train.modules_to_save == ["lm_head"]
