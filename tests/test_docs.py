"""The docs that are generated stay current, and the README stays a front door."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_reference_is_current(load_script):
    gen = load_script("gen_config_reference")
    assert (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8") == gen.render(), (
        "docs/configuration.md is out of date: run python scripts/gen_config_reference.py"
    )


def test_configuration_reference_lists_every_key(load_script):
    from raft_diffusion.core.config import valid_keys
    from raft_diffusion.diffusion.config import RaftConfig
    from raft_diffusion.llm.config import LLMConfig

    text = load_script("gen_config_reference").render()
    diffusion, llm = text.split("## Language-model runs")
    for keys, part in ((valid_keys(RaftConfig), diffusion), (valid_keys(LLMConfig), llm)):
        missing = [k for k in keys if f"`{k}`" not in part]
        assert not missing, missing
    assert "| `train.snr_gamma` | `null` |" in diffusion and "| `sampling.max_new_tokens` | `32` |" in llm
