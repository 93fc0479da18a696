"""The toy world: determinism, captions that say what was drawn, and a pixel oracle that reads renders back."""

import numpy as np
import pytest
import torch

from raft_diffusion.diffusion.toyworld import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    all_captions,
    analyse,
    caption,
    gold_aesthetic,
    make_scene,
    oracle_metrics,
    parse_caption,
    render,
    render_batch,
    sample_scenes,
    to_tensor,
)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.fixture(scope="module")
def held_out():
    scenes = sample_scenes(600, seed=123)
    return scenes, render_batch(scenes)


def test_deterministic_from_seed():
    a, b, c = sample_scenes(50, seed=7), sample_scenes(50, seed=7), sample_scenes(50, seed=8)
    assert a == b and a != c
    assert np.array_equal(render_batch(a), render_batch(b))
    assert not np.array_equal(render_batch(a), render_batch(c))
    assert render(a[0]).shape == (32, 32, 3) and render(a[0]).dtype == np.uint8


def test_attributes_cover_the_world():
    scenes = sample_scenes(3000, seed=0)
    for attr, names in (("shape", SHAPES), ("colour", COLOURS), ("size", SIZES), ("position", POSITIONS), ("background", BACKGROUNDS)):
        counts = {n: sum(getattr(s, attr) == n for s in scenes) for n in names}
        expected = len(scenes) / len(names)
        assert all(0.8 * expected < c < 1.2 * expected for c in counts.values()), (attr, counts)
    assert 0.28 < np.mean([s.noisy for s in scenes]) < 0.39


def test_captions_round_trip_and_name_the_parameters():
    for s in sample_scenes(300, seed=3):
        text = caption(s)
        got = parse_caption(text)
        assert got == {"shape": s.shape, "colour": s.colour, "size": s.size, "position": s.position, "background": s.background, "noisy": s.noisy}, (
            text
        )
    s = make_scene("triangle", "red", "small", "top left", "white", noisy=True)
    assert caption(s) == "a small red triangle in the top left on a noisy white background"
    assert caption(make_scene("cross", "blue", "large", "left", "black")) == "a large blue cross on the left on a black background"
    assert parse_caption("A red circle") == {"shape": "circle", "colour": "red"}
    with pytest.raises(ValueError):
        parse_caption("a cat on a mat")
    caps = all_captions()
    assert len(caps) == len(set(caps)) == 4 * 5 * 3 * 9 * 3 * 2


def test_render_draws_what_the_caption_says():
    s = make_scene("square", "blue", "large", "centre", "white")
    img = render(s).astype(int)
    assert tuple(img[16, 16]) == COLOURS["blue"] and tuple(img[0, 0]) == BACKGROUNDS["white"]
    s = make_scene("circle", "red", "small", "top left", "black")
    img = render(s).astype(int)
    ys, xs = np.nonzero(np.abs(img - np.array(BACKGROUNDS["black"])).sum(-1) > 30)
    assert ys.mean() < 10 and xs.mean() < 10 and len(ys) < 80  # a small subject in the top left


def test_gold_prefers_large_centred_contrasting_clean():
    best = gold_aesthetic(make_scene("square", "yellow", "large", "centre", "black"))
    assert best > 9.0
    worse = [
        make_scene("square", "yellow", "small", "centre", "black"),  # small
        make_scene("square", "yellow", "large", "top left", "black"),  # off-centre
        make_scene("square", "yellow", "large", "centre", "white"),  # low contrast
        make_scene("square", "yellow", "large", "centre", "black", noisy=True),  # noisy
    ]
    for s in worse:
        assert gold_aesthetic(s) < best - 0.9, caption(s)
    golds = [gold_aesthetic(s) for s in sample_scenes(500, seed=1)]
    assert 1.0 <= min(golds) and max(golds) <= 10.0 and np.std(golds) > 1.2


def test_oracle_recovers_shape_and_colour_of_renders(held_out):
    scenes, images = held_out
    res = [analyse(im) for im in images]
    assert all(r.found for r in res)
    shape_acc = np.mean([r.shape == s.shape for r, s in zip(res, scenes)])
    colour_acc = np.mean([r.colour == s.colour for r, s in zip(res, scenes)])
    assert shape_acc >= 0.95 and colour_acc >= 0.95, (shape_acc, colour_acc)


def test_oracle_aesthetic_agrees_with_gold_on_renders(held_out):
    scenes, images = held_out
    est = np.array([analyse(im).aesthetic for im in images])
    gold = np.array([gold_aesthetic(s) for s in scenes])
    assert _spearman(est, gold) >= 0.97
    assert np.abs(est - gold).mean() < 0.3


def test_oracle_reads_tensors_and_rejects_mismatches(held_out):
    scenes, images = held_out
    prompts = [caption(s) for s in scenes[:40]]
    m = oracle_metrics(to_tensor(images[:40]), prompts)
    assert m["match"].mean() >= 0.95
    wrong = [caption(make_scene(SHAPES[(SHAPES.index(s.shape) + 1) % 4], s.colour, s.size, s.position, s.background)) for s in scenes[:40]]
    assert oracle_metrics(to_tensor(images[:40]), wrong)["match"].mean() <= 0.05


def test_oracle_on_non_world_images():
    blank = analyse(torch.full((3, 32, 32), 0.5))
    assert not blank.found and blank.aesthetic < 3.0 and not blank.matches("a red circle")
    noise = analyse(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert noise.aesthetic < 5.0
    # a 64 px render (larger than the world's images) is read after resizing
    big = np.kron(render(make_scene("triangle", "green", "large", "centre", "white")), np.ones((2, 2, 1), np.uint8))
    r = analyse(big)
    assert (r.shape, r.colour) == ("triangle", "green") and r.aesthetic > 7.0


def test_oracle_rewards_load_by_import_path():
    from reward_models import load_reward

    fid = load_reward("raft_diffusion.diffusion.toyworld.rewards:fidelity")
    gold = load_reward("raft_diffusion.diffusion.toyworld.rewards:gold_aesthetic")
    good = make_scene("circle", "yellow", "large", "centre", "black")
    bad = make_scene("circle", "yellow", "small", "bottom right", "white", noisy=True)
    images = to_tensor(render_batch([good, bad]))
    assert fid(images, ["a yellow circle", "a yellow circle"]).tolist() == [1.0, 1.0]
    assert fid(images, ["a red circle", "a yellow square"]).tolist() == [0.0, 0.0]
    g = gold(images, ["a yellow circle"] * 2)
    assert g[0] > 9.0 and g[1] < 4.0
    assert abs(float(g[0]) - gold_aesthetic(good)) < 0.3
