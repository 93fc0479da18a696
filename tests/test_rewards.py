"""reward_models without model weights: registry, plug-ins, validation, composites, programmatic rewards."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import reward_models as rm
from reward_models import (
    MissingDependencyError,
    RewardConfigError,
    RewardError,
    RewardInputError,
    RewardOutputError,
    RewardWeightsNotFoundError,
    UnknownRewardError,
    check_reward_output,
    check_text_reward_output,
    list_rewards,
    load_reward,
    load_reward_from_config,
)

REPO = Path(__file__).resolve().parents[1]


def solid(rgb, size=16):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


# ----------------------------------------------------------------------------------------------- package


def test_import_is_light_and_standalone():
    code = (
        "import sys, reward_models; "
        "bad = [m for m in ('open_clip', 'transformers', 'diffusers', 'raft_diffusion') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_list_rewards_has_all_builtins():
    names = list_rewards()
    for n in [
        "aesthetic",
        "clip_score",
        "pickscore",
        "hpsv2",
        "imagereward",
        "brightness",
        "saturation",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "sequence_classifier",
    ]:
        assert n in names
    assert list_rewards(kind="text") == ["sequence_classifier"]
    assert "sequence_classifier" not in list_rewards(kind="image")


def test_errors_are_value_errors_with_one_line_messages():
    e = RewardError("line one\n   line two")
    assert isinstance(e, ValueError) and str(e) == "line one line two"
    assert isinstance(MissingDependencyError("x"), ImportError)


# ----------------------------------------------------------------------------------------------- names


def test_unknown_name_lists_valid_names_and_nearest_match():
    with pytest.raises(UnknownRewardError) as ei:
        load_reward("aesthetik")
    msg = str(ei.value)
    assert "did you mean 'aesthetic'" in msg
    for n in ("clip_score", "pickscore", "brightness", "jpeg_compressibility"):
        assert n in msg


def test_unknown_module_and_attribute():
    with pytest.raises(UnknownRewardError, match="cannot import module 'no_such_pkg_xyz.rewards'"):
        load_reward("no_such_pkg_xyz.rewards:score")
    with pytest.raises(UnknownRewardError, match="did you mean 'sharpness'"):
        load_reward("examples.custom_reward:sharpnes")


def test_builtin_kwargs_are_validated():
    with pytest.raises(RewardConfigError, match="accepted: quality"):
        load_reward("jpeg_compressibility", device="cpu", qualty=90)
    with pytest.raises(RewardConfigError, match="quality must be an integer"):
        load_reward("jpeg_compressibility", device="cpu", quality=0)


# ----------------------------------------------------------------------------------------------- programmatic


def test_brightness_exact_and_prefers_brighter():
    r = load_reward("brightness", device="cpu")
    images = torch.cat([solid([0.2, 0.4, 0.6]), solid([0.9, 0.9, 0.9]), solid([0.0, 0.0, 0.0])])
    out = r(images, ["x"] * 3)
    expected = torch.tensor([0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6, 0.9, 0.0])
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out[1] > out[0] > out[2]


def test_saturation_exact():
    r = load_reward("saturation", device="cpu")
    images = torch.cat([solid([1.0, 0.5, 0.0]), solid([0.5, 0.5, 0.5]), solid([0.0, 0.0, 0.0]), solid([0.8, 0.2, 0.4])])
    out = r(images, None)
    assert torch.allclose(out, torch.tensor([1.0, 0.0, 0.0, 0.75]), atol=1e-6)


def test_jpeg_rewards_rank_flat_vs_noise():
    torch.manual_seed(0)
    flat = solid([0.5, 0.5, 0.5], 64)
    noise = torch.rand(1, 3, 64, 64)
    images = torch.cat([flat, noise])
    comp = load_reward("jpeg_compressibility", device="cpu")(images, ["x", "x"])
    incomp = load_reward("jpeg_incompressibility", device="cpu", quality=80)(images, ["x", "x"])
    assert comp[0] > comp[1] and (comp < 0).all()
    assert incomp[1] > incomp[0] > 0
    # sizes are kilobytes of a real JPEG: a 64x64 noise image at q95 is several kB, a flat one well under 1.5 kB
    assert -comp[1] > 5.0 and -comp[0] < 1.5


def test_image_input_is_checked():
    r = load_reward("brightness", device="cpu")
    with pytest.raises(RewardInputError, match="float images"):
        r(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(RewardInputError, match=r"\[B, 3, H, W\]"):
        r(torch.zeros(3, 8, 8), ["a"])
    with pytest.raises(RewardInputError, match="got list"):
        r([[0.0]], ["a"])


# ----------------------------------------------------------------------------------------------- output checks


def test_check_reward_output_accepts_and_converts():
    out = check_reward_output("r", [1, 2.5, None], 3)
    assert out.dtype == torch.float32
    assert out[:2].tolist() == [1.0, 2.5] and math.isnan(out[2])
    assert check_reward_output("r", torch.tensor([[1.0], [2.0]], dtype=torch.float64), 2).tolist() == [1.0, 2.0]
    assert check_reward_output("r", torch.tensor([1.0, float("nan")]), 2)[0] == 1.0


@pytest.mark.parametrize(
    "out, pattern",
    [
        ("bad", "returned str, not a tensor"),
        ({"a": 1}, "returned dict, not a tensor"),
        (torch.zeros(3), r"shape \[3\] for a batch of 2"),
        (torch.zeros(2, 2), r"shape \[2, 2\]"),
        (torch.tensor([float("nan"), float("nan")]), "NaN for all 2 samples"),
        (["a", 1.0], "item 0 is str"),
    ],
)
def test_check_reward_output_errors_name_the_reward(out, pattern):
    with pytest.raises(RewardOutputError, match=pattern) as ei:
        check_reward_output("my_reward", out, 2)
    assert "'my_reward'" in str(ei.value)


def test_loaded_plugin_output_is_checked():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(RewardOutputError, match="reward 'wrong_shape' returned shape"):
        load_reward(_named("wrong_shape", lambda im, p, **k: torch.zeros(3)))(images, ["a", "b"])
    with pytest.raises(RewardOutputError, match="reward 'all_nan' returned NaN for all 2"):
        load_reward(_named("all_nan", lambda im, p, **k: torch.full((2,), float("nan"))))(images, ["a", "b"])
    with pytest.raises(RewardOutputError, match="reward 'not_tensor' returned str"):
        load_reward(_named("not_tensor", lambda im, p, **k: "high"))(images, ["a", "b"])
    lst = load_reward(_named("as_list", lambda im, p, **k: [0.5, 1.5]))(images, ["a", "b"])
    assert isinstance(lst, torch.Tensor) and lst.tolist() == [0.5, 1.5]


def test_check_text_reward_output():
    assert check_text_reward_output("t", [1, None, float("nan"), torch.tensor(2.0)], 4) == [1.0, None, None, 2.0]
    with pytest.raises(RewardOutputError, match="returned 1 scores for 2 completions"):
        check_text_reward_output("t", [1.0], 2)
    with pytest.raises(RewardOutputError, match="no score"):
        check_text_reward_output("t", [None, None], 2)
    with pytest.raises(RewardOutputError, match="expected a list"):
        check_text_reward_output("t", "x", 1)


def test_text_plugin_follows_trl_convention():
    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) if c else None for c in completions]

    r = load_reward(length_reward)
    assert r(["p1", "p2", "p3"], ["abc", "", "hello"]) == [3.0, None, 5.0]
    # trl calls reward functions with keyword arguments
    assert r(prompts=["p"], completions=["ab"], extra_column=[1]) == [2.0]
    assert r.__name__ == "length_reward"


# ----------------------------------------------------------------------------------------------- plug-ins


def _named(name, fn):
    fn.__name__ = name
    return fn


PLUGIN_SOURCE = textwrap.dedent(
    """
    import torch
    from reward_models import reward_factory

    CALLS = []

    def mean_red(images, prompts, scale=1.0, **kwargs):
        return scale * images[:, 0].mean(dim=(1, 2))

    @reward_factory
    def offset_factory(device, dtype, offset=0.0):
        CALLS.append((str(device), dtype, offset))
        def reward(images, prompts, **kwargs):
            return images.mean(dim=(1, 2, 3)) + offset
        return reward

    class ChannelReward:
        def __init__(self, channel=2, device="cpu"):
            self.channel = channel
            self.device = device
        def __call__(self, images, prompts, **kwargs):
            return images[:, self.channel].mean(dim=(1, 2))
    """
)


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    name = "rm_test_plugin_" + tmp_path.name.replace("-", "_")
    (tmp_path / f"{name}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, tmp_path / f"{name}.py"
    sys.modules.pop(name, None)


def test_module_function_plain_callable_and_bound_kwargs(plugin_module):
    name, _ = plugin_module
    images = torch.cat([solid([0.8, 0.1, 0.1]), solid([0.2, 0.5, 0.5])])
    r = load_reward(f"{name}:mean_red")
    assert torch.allclose(r(images, ["a", "b"]), torch.tensor([0.8, 0.2]))
    r2 = load_reward(f"{name}:mean_red", scale=10.0)  # plain callable: kwargs are bound per call
    assert torch.allclose(r2(images, ["a", "b"]), torch.tensor([8.0, 2.0]))
    assert r2.name == f"{name}:mean_red"


def test_module_function_factory_gets_device_dtype_kwargs(plugin_module):
    name, _ = plugin_module
    r = load_reward(f"{name}:offset_factory", device="cpu", dtype="bf16", offset=1.0)
    mod = sys.modules[name]
    assert mod.CALLS == [("cpu", torch.bfloat16, 1.0)]
    out = r(solid([0.5, 0.5, 0.5]), ["a"])
    assert torch.allclose(out, torch.tensor([1.5]))
    with pytest.raises(RewardConfigError, match="accepted: offset"):
        load_reward(f"{name}:offset_factory", device="cpu", offst=1.0)


def test_class_is_a_factory(plugin_module):
    name, _ = plugin_module
    r = load_reward(f"{name}:ChannelReward", device="cpu", channel=1)
    assert r.fn.channel == 1 and r.fn.device == torch.device("cpu")
    assert torch.allclose(r(solid([0.1, 0.7, 0.3]), ["a"]), torch.tensor([0.7]))


def test_file_path_plugin(plugin_module):
    _, path = plugin_module
    r = load_reward(f"{path}:mean_red")
    assert torch.allclose(r(solid([0.25, 0.0, 0.0]), ["a"]), torch.tensor([0.25]))
    with pytest.raises(UnknownRewardError, match="not found"):
        load_reward(f"{path.parent / 'missing.py'}:mean_red")


def test_entry_point_plugin(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "rm_ep_plugin.py").write_text(PLUGIN_SOURCE)
    dist = site / "rm_ep_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: rm-ep-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[reward_models]\nred_ep = rm_ep_plugin:mean_red\noffset_ep = rm_ep_plugin:offset_factory\n")
    monkeypatch.syspath_prepend(str(site))
    try:
        assert "red_ep" in list_rewards() and "offset_ep" in list_rewards()
        r = load_reward("red_ep")
        assert torch.allclose(r(solid([0.6, 0.0, 0.0]), ["a"]), torch.tensor([0.6]))
        r = load_reward("offset_ep", device="cpu", offset=2.0)
        assert torch.allclose(r(solid([0.5, 0.5, 0.5]), ["a"]), torch.tensor([2.5]))
        with pytest.raises(UnknownRewardError, match="entry points: offset_ep, red_ep"):
            load_reward("nothing_like_this")
    finally:
        sys.modules.pop("rm_ep_plugin", None)


def test_example_custom_reward_by_module_and_file(monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    sharp = (torch.rand(1, 3, 32, 32) > 0.5).float()
    blurred = F.avg_pool2d(sharp, 5, stride=1, padding=2)
    images = torch.cat([blurred, sharp])
    for name in ("examples.custom_reward:sharpness", "examples/custom_reward.py:sharpness"):
        out = load_reward(name)(images, ["texture", "texture"])
        assert out[1] > 10 * out[0] > 0
    edge = load_reward("examples.custom_reward:edge_density", device="cpu", threshold=0.5)
    out = edge(images, ["texture"] * 2)
    assert 0.0 <= out[0] < out[1] <= 1.0
    monkeypatch.syspath_prepend(str(REPO / "examples"))
    assert load_reward("custom_reward:sharpness")(images, ["t", "t"]).argmax().item() == 1


# ----------------------------------------------------------------------------------------------- composites


def _fixed(name, values_per_call):
    calls = iter(values_per_call)

    def reward(images, prompts, **kwargs):
        return torch.tensor(next(calls), dtype=torch.float32)

    reward.__name__ = name
    return reward


IMAGES4 = torch.zeros(4, 3, 4, 4)


def test_zscore_mix_exact_numbers():
    a = _fixed("a", [[1.0, 2.0, 3.0, 4.0]])
    b = _fixed("b", [[10.0, 10.0, 10.0, 50.0]])
    mix = load_reward_from_config({"mix": [{"name": a, "weight": 1.0}, {"name": b, "weight": 0.5}], "normalize": "zscore"}, device="cpu")
    out = mix(IMAGES4, ["p"] * 4)
    za = torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25)
    zb = torch.tensor([-10.0, -10.0, -10.0, 30.0]) / math.sqrt(300.0)
    assert torch.allclose(out, za + 0.5 * zb, atol=1e-6)
    assert torch.allclose(out, torch.tensor([-1.6303, -0.7359, 0.1585, 2.2076]), atol=1e-4)
    assert mix.last_components["a"].tolist() == [1.0, 2.0, 3.0, 4.0]
    assert mix.last_components["b"].tolist() == [10.0, 10.0, 10.0, 50.0]
    assert torch.allclose(mix.last_normalized["b"], zb, atol=1e-6)


def test_none_mix_is_weighted_sum_and_nan_propagates():
    a = _fixed("a", [[1.0, float("nan"), 3.0, 4.0]])
    b = _fixed("b", [[2.0, 2.0, 2.0, 2.0]])
    mix = load_reward_from_config({"mix": [{"name": a, "weight": 2.0}, {"name": b, "weight": -1.0}]}, device="cpu")
    out = mix(IMAGES4, ["p"] * 4)
    assert out[[0, 2, 3]].tolist() == [0.0, 4.0, 6.0] and math.isnan(out[1])


def test_zscore_ignores_nan_and_constant_batch_gives_zero():
    z = rm.zscore(torch.tensor([1.0, float("nan"), 3.0]))
    assert z[0].item() == pytest.approx(-1.0) and z[2].item() == pytest.approx(1.0) and math.isnan(z[1])
    assert rm.zscore(torch.tensor([5.0, 5.0, 5.0])).tolist() == [0.0, 0.0, 0.0]


def test_running_normalisation_exact_and_resumable():
    batches = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    mix = load_reward_from_config({"mix": [{"name": _fixed("a", batches)}], "normalize": "running"}, device="cpu")
    first = mix(IMAGES4, ["p"] * 4)
    assert torch.allclose(first, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25), atol=1e-6)
    state = mix.state_dict()
    assert state == {"a": {"count": 4, "mean": 2.5, "m2": 5.0}}
    second = mix(IMAGES4, ["p"] * 4)
    # statistics of 1..8: mean 4.5, population variance 5.25
    assert torch.allclose(second, (torch.tensor([5.0, 6.0, 7.0, 8.0]) - 4.5) / math.sqrt(5.25), atol=1e-6)
    assert mix.state_dict()["a"]["count"] == 8 and mix.state_dict()["a"]["m2"] == pytest.approx(42.0)
    resumed = load_reward_from_config({"mix": [{"name": _fixed("a", batches[1:])}], "normalize": "running"}, device="cpu")
    resumed.load_state_dict(state)
    assert torch.allclose(resumed(IMAGES4, ["p"] * 4), second, atol=1e-6)


def test_per_component_normalize_and_labels():
    mix = load_reward_from_config(
        {
            "mix": [
                {"name": _fixed("a", [[0.0, 2.0, 0.0, 2.0]]), "normalize": "zscore"},
                {"name": _fixed("a", [[1.0, 1.0, 1.0, 1.0]]), "weight": 3.0},
            ],
            "normalize": "none",
        },
        device="cpu",
    )
    out = mix(IMAGES4, ["p"] * 4)
    assert out.tolist() == [2.0, 4.0, 2.0, 4.0]
    assert list(mix.last_components) == ["a", "a#2"]


def test_builtin_mix_from_config_and_single_name_forms():
    images = torch.cat([solid([1.0, 0.0, 0.0]), solid([0.5, 0.5, 0.5])])
    mix = load_reward_from_config({"mix": [{"name": "brightness", "weight": 1.0}, {"name": "saturation", "weight": 2.0, "kwargs": {}}]}, device="cpu")
    out = mix(images, ["a", "b"])
    assert torch.allclose(out, torch.tensor([0.299 + 2.0, 0.5]), atol=1e-6)
    single = load_reward_from_config({"name": "jpeg_compressibility", "kwargs": {"quality": 50}}, device="cpu")
    assert single.name == "jpeg_compressibility" and single(images, ["a", "b"]).shape == (2,)
    assert load_reward_from_config("brightness", device="cpu")(images, ["a", "b"])[0] == pytest.approx(0.299)
    assert load_reward({"name": "brightness"}, device="cpu").name == "brightness"


def test_text_mix_returns_list_with_none():
    def has_bang(prompts, completions, **kw):
        return [1.0 if "!" in c else 0.0 for c in completions]

    def length(prompts, completions, **kw):
        return [float(len(c)) if c else None for c in completions]

    mix = load_reward_from_config({"mix": [{"name": has_bang, "weight": 10.0}, {"name": length}]}, device="cpu")
    assert mix(["p"] * 3, ["hi!", "", "hello"]) == [13.0, None, 5.0]
    assert mix.last_components["length"][0].item() == 3.0


@pytest.mark.parametrize(
    "cfg, pattern",
    [
        ({"mix": []}, "non-empty list"),
        ({"mix": [{"name": "brightness", "weight": "big"}]}, "weight must be a finite number"),
        ({"mix": [{"name": "brightness"}], "normalize": "minmax"}, "normalize must be one of none, zscore, running"),
        ({"mix": [{"name": "brightness", "wieght": 1}]}, "unknown keys \\['wieght'\\]"),
        ({"mix": [{"weight": 1}]}, "must be a dict with a 'name'"),
        ({"name": "brightness", "weight": 2}, "belong to a 'mix'"),
        ({"kwargs": {}}, "needs 'name'"),
        ({"name": "brightness", "kwargs": [1]}, "'kwargs' must be a dict"),
        (["brightness"], "must be a name or a dict"),
    ],
)
def test_config_errors(cfg, pattern):
    with pytest.raises(RewardConfigError, match=pattern):
        load_reward_from_config(cfg, device="cpu")


def test_mix_rejects_image_and_text_components():
    def text_reward(prompts, completions, **kw):
        return [0.0] * len(completions)

    text_reward.reward_kind = "text"
    with pytest.raises(RewardConfigError, match="cannot combine image and text"):
        load_reward_from_config({"mix": [{"name": "brightness"}, {"name": text_reward}]}, device="cpu")


def test_all_nan_component_is_named_in_mix():
    mix = load_reward_from_config({"mix": [{"name": "brightness"}, {"name": _fixed("broken", [[float("nan")] * 4])}]}, device="cpu")
    with pytest.raises(RewardOutputError, match="reward 'broken' returned NaN for all 4"):
        mix(IMAGES4, ["p"] * 4)


# ----------------------------------------------------------------------------------------------- weights + extras


def test_resolve_weights_sources(tmp_path, monkeypatch):
    from reward_models.weights import resolve_weights

    f = tmp_path / "w.pth"
    f.write_bytes(b"x")
    assert resolve_weights(str(f), what="W", env_var="RM_TEST_W") == f
    monkeypatch.setenv("RM_TEST_W", str(f))
    assert resolve_weights(None, what="W", env_var="RM_TEST_W", default="/nope") == f
    monkeypatch.delenv("RM_TEST_W")
    with pytest.raises(RewardWeightsNotFoundError) as ei:
        resolve_weights(None, what="W weights", env_var="RM_TEST_W", default=str(tmp_path / "missing.pth"))
    msg = str(ei.value)
    assert "missing.pth" in msg and "RM_TEST_W" in msg and "weights='/path/to/file'" in msg
    with pytest.raises(RewardWeightsNotFoundError, match="no W given"):
        resolve_weights(None, what="W", env_var=None)
    with pytest.raises(RewardWeightsNotFoundError, match="must look like 'hf://org/repo/filename'"):
        resolve_weights("hf://only-repo", what="W")


def test_url_weights_use_cache_and_fail_offline(tmp_path, monkeypatch):
    from reward_models.weights import resolve_weights

    monkeypatch.setenv("REWARD_MODELS_CACHE", str(tmp_path))
    monkeypatch.setenv("REWARD_MODELS_OFFLINE", "1")
    url = "https://example.invalid/some/weights.pth"
    with pytest.raises(RewardWeightsNotFoundError, match="offline") as ei:
        resolve_weights(url, what="W", env_var="RM_TEST_W")
    assert "RM_TEST_W" in str(ei.value) and str(tmp_path) in str(ei.value)
    # a file already in the cache is used without any network access
    import hashlib

    cached = tmp_path / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-weights.pth"
    cached.write_bytes(b"ok")
    assert resolve_weights(url, what="W") == cached


def test_aesthetic_missing_weights_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARD_MODELS_CACHE", str(tmp_path))
    monkeypatch.setenv("REWARD_MODELS_OFFLINE", "1")
    monkeypatch.delenv("REWARD_MODELS_AESTHETIC_WEIGHTS", raising=False)
    with pytest.raises(RewardWeightsNotFoundError) as ei:
        load_reward("aesthetic", device="cpu", weights=str(tmp_path / "nope.pth"))
    assert "nope.pth" in str(ei.value) and "REWARD_MODELS_AESTHETIC_WEIGHTS" in str(ei.value)
    with pytest.raises(RewardWeightsNotFoundError, match="improved-aesthetic-predictor"):
        load_reward("aesthetic", device="cpu")  # default URL, offline, empty cache


@pytest.mark.parametrize("name, module, extra", [("hpsv2", "hpsv2", "hpsv2"), ("imagereward", "ImageReward", "imagereward")])
def test_missing_optional_package(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependencyError) as ei:
        load_reward(name, device="cpu")
    assert f"pip install 'raft-diffusion[{extra}]'" in str(ei.value)
    assert isinstance(ei.value, ValueError)


def test_plugin_rewards_run_without_autograd():
    seen = []

    def grad_probe(images, prompts, **kwargs):
        seen.append(torch.is_grad_enabled())
        return images.mean(dim=(1, 2, 3))

    images = torch.rand(2, 3, 4, 4, requires_grad=True)
    out = load_reward(grad_probe)(images, ["a", "b"])
    assert seen == [False] and not out.requires_grad


def test_brightness_region_scores_only_its_box():
    import torch

    from reward_models import load_reward
    from reward_models.errors import RewardConfigError

    img = torch.zeros(2, 3, 8, 8)
    img[0, :, 2:6, 2:6] = 1.0  # bright centre
    img[1, :, :, :2] = 1.0  # bright left edge, dark centre
    centre = load_reward("brightness", device="cpu", region=[0.25, 0.25, 0.75, 0.75])(img, ["x", "x"])
    whole = load_reward("brightness", device="cpu")(img, ["x", "x"])
    assert centre.tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert whole.tolist() == pytest.approx([0.25, 0.25], abs=1e-6)
    with pytest.raises(RewardConfigError, match="region"):
        load_reward("brightness", device="cpu", region=[0.5, 0.5, 0.2, 0.9])


def test_loaded_reward_probe_accepts_no_score_and_keeps_every_other_check():
    """LoadedReward.probe runs the reward as a call does, except that no score for the whole batch is an answer (the
    start-up probes score placeholder inputs); an infinite score, a wrong count or a bad image still fails."""
    from reward_models.errors import RewardError, RewardOutputError
    from reward_models.registry import LoadedReward

    images = torch.full((2, 3, 8, 8), 0.5)
    nan = LoadedReward("nan", lambda im, pr: torch.full((len(im),), float("nan")), "image")
    with pytest.raises(RewardOutputError, match="returned NaN for all 2 samples"):
        nan(images, ["a", "b"])
    assert torch.isnan(nan.probe(images, ["a", "b"])).all()
    with pytest.raises(RewardOutputError, match="returned inf"):
        LoadedReward("inf", lambda im, pr: torch.full((len(im),), float("inf")), "image").probe(images, ["a", "b"])
    with pytest.raises(RewardOutputError, match="for a batch of 2"):
        LoadedReward("three", lambda im, pr: torch.zeros(3), "image").probe(images, ["a", "b"])
    with pytest.raises(RewardError):
        nan.probe(torch.full((2, 8, 8), 0.5), ["a", "b"])  # not [B, 3, H, W]: check_images still runs
    text = LoadedReward("none", lambda pr, co: [None] * len(co), "text")
    with pytest.raises(RewardOutputError):
        text(["p", "q"], ["", "Yes."])
    assert text.probe(["p", "q"], ["", "Yes."]) == [None, None]
