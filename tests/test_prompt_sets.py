"""Built-in evaluation prompt sets (PartiPrompts, GenEval, T2I-CompBench): they load with their published counts,
filter by category, take seeded subsets deterministically, ship their licences, and bad names are one-line errors."""

from __future__ import annotations

import pytest

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.prompts import PROMPT_SETS_DIR, builtin_names, load_prompts

SETS = {"parti": 1632, "geneval": 553, "t2i-compbench": 2400}  # prompts per set as published (T2I-CompBench: val split)


@pytest.mark.parametrize("name, count", SETS.items())
def test_each_set_loads_whole(name, count):
    prompts = load_prompts(f"builtin:{name}")
    assert len(prompts) == count and all(p and p == p.strip() for p in prompts)
    assert name in builtin_names()


def test_known_rows_and_category_filters():
    parti = load_prompts("builtin:parti")
    assert parti[:2] == ["bond", "element"]  # the file's first rows
    food = load_prompts("builtin:parti?category=Food%20%26%20Beverage")
    assert len(food) == 74 and food == load_prompts("builtin:parti?category=food-beverage")  # slug or url-encoded
    assert "A bowl of Pho" in food
    two = load_prompts("builtin:parti?category=animals,vehicles")
    assert len(two) == 314 + 104 and set(two) <= set(parti)
    both = load_prompts("builtin:parti?category=animals&challenge=imagination")
    assert 0 < len(both) < 150 and set(both) <= set(two)
    counting = load_prompts("builtin:geneval?category=counting")
    assert len(counting) == 80 and counting[0] == "a photo of two clocks"
    color = load_prompts("builtin:t2i-compbench?category=color")
    assert len(color) == 300 and color[0] == "a green bench and a blue bowl"  # CRLF file read cleanly
    assert len(load_prompts("builtin:t2i-compbench?category=3d_spatial")) == 300


def test_seeded_subset_is_deterministic_and_in_set_order():
    spec = "builtin:parti?category=animals&n=16&seed=3"
    a, b = load_prompts(spec), load_prompts(spec)
    animals = load_prompts("builtin:parti?category=animals")
    assert a == b and len(a) == 16 == len(set(a))
    assert [animals.index(p) for p in a] == sorted(animals.index(p) for p in a)  # the set's order kept
    assert load_prompts("builtin:parti?category=animals&n=16&seed=4") != a  # another seed, another subset
    assert load_prompts("builtin:parti?category=animals&n=16") == load_prompts("builtin:parti?category=animals&n=16&seed=0")
    assert load_prompts("builtin:cifar10?n=3&seed=1") == load_prompts("builtin:cifar10?n=3&seed=1")


def test_licence_and_attribution_files_are_shipped():
    assert "Apache License" in (PROMPT_SETS_DIR / "parti" / "LICENSE").read_text(encoding="utf-8")
    for folder, holder in (("geneval", "Dhruba Ghosh"), ("t2i_compbench", "HKU")):
        text = (PROMPT_SETS_DIR / folder / "LICENSE").read_text(encoding="utf-8")
        assert text.startswith("MIT License") and holder in text
    readme = (PROMPT_SETS_DIR / "README.md").read_text(encoding="utf-8")
    for source in ("google-research/parti", "djghosh13/geneval", "Karine-Huang/T2I-CompBench", "HPDv2"):
        assert source in readme


def test_python_entry_point():
    from raft_diffusion import load_prompts as top

    assert top("builtin:geneval?category=single_object&n=2&seed=0") == load_prompts("builtin:geneval?category=single-object&n=2")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("builtin:partii", r"unknown built-in prompt set 'partii': choose one of cifar10, geneval, parti, simple_animals, t2i-compbench"),
        ("builtin:hpdv2", r"the HPDv2 benchmark prompts are not shipped .* zhwang/HPDv2\): save them one per line and pass the file.s path$"),
        ("builtin:parti?category=dogs", r"builtin:parti has no category 'dogs': choose from abstract, animals"),
        ("builtin:geneval?challenge=basic", r"builtin:geneval has no option 'challenge': use category, n, seed"),
        ("builtin:parti?n=5000", r"asks for n=5000 prompts but the selection has 1632"),
        ("builtin:parti?n=ten", r"has n='ten': give a whole number"),
        ("builtin:parti?seed=1", r"gives seed without n"),
        ("builtin:parti?category=animals&category=people", r"gives category twice: list several values as category=a,b"),
    ],
)
def test_bad_specs_are_one_line(spec, match):
    with pytest.raises(UserError, match=match) as info:
        load_prompts(spec, "prompts.eval")
    assert "\n" not in str(info.value) and str(info.value).startswith("prompts.eval: ")


def test_config_accepts_and_checks_prompt_sets():
    from pathlib import Path

    from raft_diffusion.diffusion.config import load_config

    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    cfg = load_config(tiny, ["prompts.eval=builtin:parti?category=animals&n=4&seed=0"])
    _, held_out = cfg.preflight()
    assert held_out == load_prompts("builtin:parti?category=animals&n=4&seed=0")
    with pytest.raises(UserError, match=r"prompts.eval: builtin:t2i-compbench has no category 'colour'") as info:
        load_config(tiny, ["prompts.eval=builtin:t2i-compbench?category=colour"]).preflight()
    assert "\n" not in str(info.value)
