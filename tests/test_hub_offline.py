"""A Hub id that is neither cached nor reachable fails in one line at once, not after the Hub client's retries."""

from __future__ import annotations

import pytest

import reward_models.weights as weights
from raft_diffusion.core.errors import UserError
from reward_models.errors import RewardWeightsNotFoundError


class _Loader:
    """A stand-in ``from_pretrained``: records its calls; a cache miss while ``local_files_only``."""

    def __init__(self, cached: bool):
        self.cached, self.calls = cached, []

    def __call__(self, name, **kwargs):
        self.calls.append((name, kwargs))
        if kwargs.get("local_files_only") and not self.cached:
            raise OSError(f"{name} is not in the cache")
        return f"loaded {name}"


def _offline(monkeypatch, reason):
    asked = []

    def fake(*a, **k):
        asked.append(1)
        return reason

    monkeypatch.setattr(weights, "hub_offline_reason", fake)
    return asked


def test_online_loads_as_before_offline_reads_the_cache(monkeypatch, tmp_path):
    asked = _offline(monkeypatch, None)
    online = _Loader(cached=False)  # the Hub answers: one plain call, as before
    assert weights.from_cache_or_hub(online, "org/model", RuntimeError, revision="r1") == "loaded org/model"
    assert online.calls == [("org/model", {"revision": "r1"})] and asked == [1]

    _offline(monkeypatch, "HF_HUB_OFFLINE is set")
    cached = _Loader(cached=True)  # offline, but cached: read from the cache with the cache-only arguments
    assert weights.from_cache_or_hub(cached, "org/model", RuntimeError, {"extra": 1}, revision="r1") == "loaded org/model"
    assert cached.calls == [("org/model", {"local_files_only": True, "extra": 1, "revision": "r1"})]

    folder = tmp_path / "m"
    folder.mkdir()
    asked = _offline(monkeypatch, "never asked")
    local = _Loader(cached=False)  # a folder loads as it is, without asking the network
    assert weights.from_cache_or_hub(local, str(folder), RuntimeError) == f"loaded {folder}"
    assert local.calls == [(str(folder), {})] and asked == []


def test_unreachable_and_not_cached_raises_the_callers_error(monkeypatch):
    _offline(monkeypatch, "no network connection to huggingface.co (gaierror)")
    miss = _Loader(cached=False)
    with pytest.raises(KeyError, match="gaierror"):
        weights.from_cache_or_hub(miss, "org/model", KeyError)
    assert len(miss.calls) == 1  # the download was never tried


def test_hub_offline_reason_reads_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.hub_offline_reason() == "HF_HUB_OFFLINE is set"


def test_llm_model_and_reward_ids_fail_at_once(monkeypatch):
    """The real loaders: the cache miss is seen with local_files_only, so nothing is downloaded or retried."""
    from raft_diffusion.llm.model import load_causal_lm, load_tokenizer
    from reward_models.text import sequence_classifier

    _offline(monkeypatch, "no network connection to huggingface.co (gaierror)")
    with pytest.raises(UserError, match=r"tokenizer 'org/not-cached' is not in the local Hugging Face cache .*hf download org/not-cached"):
        load_tokenizer("org/not-cached")
    with pytest.raises(UserError, match=r"causal LM 'org/not-cached' is not in the local Hugging Face cache"):
        load_causal_lm("org/not-cached", device="cpu", dtype=None)
    with pytest.raises(RewardWeightsNotFoundError, match=r"sequence-classification model 'org/not-cached' is not in the local .*gaierror"):
        sequence_classifier(model="org/not-cached")


def test_an_open_clip_tag_not_cached_fails_at_once(monkeypatch):
    from reward_models.backbones import load_open_clip

    _offline(monkeypatch, "no network connection to huggingface.co (gaierror)")
    with pytest.raises(RewardWeightsNotFoundError, match=r"'ViT-B-32' with pretrained='openai' .*not in the local Hugging Face cache .*gaierror"):
        load_open_clip("ViT-B-32", "openai", cache=False)
