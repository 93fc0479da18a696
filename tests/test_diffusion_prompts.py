"""Prompt sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.prompts import BUILTIN_PROMPTS, load_prompts


def test_builtin_sets():
    cifar = load_prompts("builtin:cifar10")
    assert cifar == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    animals = load_prompts("builtin:simple_animals")
    assert 40 <= len(animals) <= 50 and len(set(animals)) == len(animals)
    cifar.append("mutated")
    assert len(BUILTIN_PROMPTS["cifar10"]) == 10  # callers get a copy


def test_inline_list():
    assert load_prompts(["a cat", "  a dog  ", ""]) == ["a cat", "a dog"]
    assert load_prompts(("one",)) == ["one"]


def test_text_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na red car\n\n  a blue bird  \n#skip\n", encoding="utf-8")
    assert load_prompts(str(path)) == ["a red car", "a blue bird"]
    assert load_prompts(Path(path)) == ["a red car", "a blue bird"]


@pytest.mark.parametrize(
    "spec, match",
    [
        ([], "no prompts"),
        (["  ", ""], "no prompts"),
        ("builtin:nope", "unknown built-in prompt set 'nope': choose one of cifar10, geneval, parti, simple_animals, t2i-compbench"),
        ("missing_prompts.txt", "prompt file 'missing_prompts.txt' not found"),
        ([1, 2], "prompts must be strings"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(UserError, match=match) as info:
        load_prompts(spec)
    assert "\n" not in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("# only comments\n\n", encoding="utf-8")
    with pytest.raises(UserError, match="has no prompts"):
        load_prompts(str(path))
