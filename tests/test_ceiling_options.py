"""Issue 24's options: train.negative_advantage_scale (negatives weighted by how far below their prompt's pool mean
they are) and train.advantage_weights (kept samples and negatives weighted by their rewards' standard scores within
their prompts' pools), checked against references worked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from raft_diffusion.core.errors import ConfigError
from raft_diffusion.core.pool import StreamingPool
from raft_diffusion.core.ranking import advantage_weights, negative_weights
from raft_diffusion.core.types import Sample
from raft_diffusion.diffusion.finetune import add_lora, train_unet
from raft_diffusion.diffusion.generate import encode_prompts


def test_negative_weights_by_hand():
    """max(0, m - r) / scale: 4 - 1 = 3 -> 1.5; 4 - 3 = 1 -> 0.5; 4.5 - 5 < 0 -> 0; at the mean -> 0."""
    assert negative_weights([1.0, 3.0, 5.0, 2.0], [4.0, 4.0, 4.5, 2.0], 2.0) == [1.5, 0.5, 0.0, 0.0]
    assert negative_weights([1.0, 3.0], [4.0, 4.0], None) == [1.0, 1.0]
    with pytest.raises(ConfigError, match="must be > 0"):
        negative_weights([1.0], [2.0], 0.0)
    with pytest.raises(ValueError, match="NaN"):
        negative_weights([math.nan], [2.0], 1.0)


def test_pool_gives_each_negative_its_prompts_pool_mean():
    """Prompt 0 has rewards 5, 1, 3, 7 and a discarded 0.5 (left out of the mean): mean 4; prompt 1 has 2, 6 and an
    unscored one (left out): mean 4. With the top 1 kept and 2 negatives: prompt 0 keeps 7, its negatives are 1 and
    3; prompt 1 keeps 6, its only negative is 2."""
    rewards = {(0, 0): 5.0, (0, 1): 1.0, (0, 2): 3.0, (0, 3): 7.0, (0, 4): 0.5, (1, 0): 2.0, (1, 1): 6.0, (1, 2): math.nan}
    samples = [Sample(prompt_index=p, sample_index=j, seed=j, reward=r, payload=(p, j)) for (p, j), r in rewards.items()]
    samples[4].extras["discarded"] = "test"
    ranking = SimpleNamespace(mode="local", top_k=1, top_ratio=0.1, threshold=0.0, max_kept=None, kl_beta=0.0, negative_k=2)
    pool = StreamingPool(ranking, expected_total=len(samples))
    pool.add(samples)
    kept = pool.kept()
    negatives = pool.negatives()
    assert [(s.prompt_index, s.sample_index) for s in kept] == [(0, 3), (1, 1)]
    assert [(s.prompt_index, s.sample_index, s.extras["pool_mean"]) for s in negatives] == [(0, 1, 4.0), (0, 2, 4.0), (1, 0, 4.0)]
    assert negative_weights([s.reward for s in negatives], [s.extras["pool_mean"] for s in negatives], 2.0) == [1.5, 0.5, 1.0]
    # population sd: prompt 0 (5, 1, 3, 7) -> sqrt((1 + 9 + 1 + 9) / 4) = sqrt(5); prompt 1 (2, 6) -> 2
    stamped = [(s.prompt_index, s.sample_index, s.extras["pool_mean"], s.extras["pool_sd"]) for s in kept + negatives]
    assert stamped == [(0, 3, 4.0, math.sqrt(5)), (1, 1, 4.0, 2.0), (0, 1, 4.0, math.sqrt(5)), (0, 2, 4.0, math.sqrt(5)), (1, 0, 4.0, 2.0)]
    assert "pool_mean" not in samples[0].extras  # neither kept nor a negative


def test_advantage_weights_by_hand():
    """max(0, sign (r - m) / s): kept 7 in a pool of mean 4, sd 2 -> 1.5; kept 3 below the mean -> 0; a negative 1
    -> 1.5; a negative above its mean -> 0; a pool of one reward (sd 0) -> 0."""
    assert advantage_weights([7.0, 3.0, 5.0], [4.0, 4.0, 5.0], [2.0, 2.0, 0.0], 1) == [1.5, 0.0, 0.0]
    assert advantage_weights([1.0, 6.0], [4.0, 4.0], [2.0, 2.0], -1) == [1.5, 0.0]
    with pytest.raises(ValueError, match="NaN"):
        advantage_weights([1.0], [math.nan], [1.0], 1)
    with pytest.raises(ValueError, match="sign"):
        advantage_weights([1.0], [1.0], [1.0], 0)


@pytest.fixture(scope="module")
def data(tiny_pipe):
    """Three kept latents and four negatives with their prompts' text embeddings."""
    embeds, _ = encode_prompts(tiny_pipe, ["a cat", "a dog", "a frog"], None, do_cfg=False)
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, 16, 16, generator=gen), embeds, torch.randn(4, 4, 16, 16, generator=gen), embeds[[1, 2, 0, 1]]


def lora_weights(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_weighted_negative_loss_by_hand(load_tiny_pipe, data):
    """One step with negative weights w: the reported loss is mean ||(1-b) v_ref + b v - eps||^2 over the kept rows
    + lam * mean(w_i ||(1+b) v_ref - b v - eps||^2) over the negative rows, v_ref = v at the call's start; the
    draws are those of the unweighted loss (kept rows from the seed's generator, negatives from their own)."""
    from diffusers import DDPMScheduler

    latents, embeds, neg_latents, neg_embeds = data
    w = torch.tensor([2.0, 0.0, 1.0, 0.5])
    beta, lam, seed = 0.5, 0.7, 5
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    kw = dict(steps=1, batch_size=4, learning_rate=1e-2, seed=seed, max_grad_norm=None, progress=False, nft_beta=beta, negative_weight=lam)
    stats = train_unet(pipe, latents, embeds, **kw, negative_latents=neg_latents, negative_embeds=neg_embeds, negative_sample_weights=w)
    g = torch.Generator().manual_seed(seed)
    pos = (torch.randperm(3, generator=g), torch.randn((3, 4, 16, 16), generator=g), torch.randint(0, 1000, (3,), generator=g))
    g = torch.Generator().manual_seed((seed * 1_000_003 + 7_919) % 2**63)
    neg = (torch.randperm(4, generator=g), torch.randn((4, 4, 16, 16), generator=g), torch.randint(0, 1000, (4,), generator=g))
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    hand = load_tiny_pipe()
    add_lora(hand.unet)
    hand.unet.train()

    def mse(x0, cond, draw, sign):
        idx, eps, t = draw
        with torch.no_grad():
            v = hand.unet(ddpm.add_noise(x0[idx], eps, t), t, encoder_hidden_states=cond[idx]).sample
        pred = (1 - sign * beta) * v + sign * beta * v  # v_ref = v at the start: v_plus = v_minus = v
        return ((pred - eps) ** 2).flatten(1).mean(1), idx

    kept_mse, _ = mse(latents, embeds, pos, 1)
    neg_mse, idx = mse(neg_latents, neg_embeds, neg, -1)
    want = kept_mse.mean() + lam * (w[idx] * neg_mse).mean()
    assert stats["loss_last"] == pytest.approx(want.item(), rel=1e-5)
    # the unweighted loss differs (w is not all 1), so the weights reached the loss
    assert stats["loss_last"] != pytest.approx((kept_mse.mean() + lam * neg_mse.mean()).item(), rel=1e-3)


def test_zero_negative_weights_train_as_no_push(load_tiny_pipe, data):
    """All weights 0 train bit for bit as negative_weight 0 (the negatives' rows computed, weighted 0); weights that
    are not all 0 train otherwise; a wrong count or a negative weight is refused."""
    latents, embeds, neg_latents, neg_embeds = data
    kw = dict(
        steps=3, batch_size=4, learning_rate=1e-2, seed=1, progress=False, nft_beta=0.5, negative_latents=neg_latents, negative_embeds=neg_embeds
    )
    trained = []
    for extra in (
        {"negative_weight": 0.0},
        {"negative_sample_weights": torch.zeros(4)},
        {"negative_sample_weights": torch.tensor([0.0, 1.0, 0.0, 0.0])},
    ):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet)
        train_unet(pipe, latents, embeds, **kw, **extra)
        trained.append(lora_weights(pipe.unet))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert any(not torch.equal(trained[0][k], trained[2][k]) for k in trained[0])
    for bad in (torch.ones(3), torch.tensor([1.0, -1.0, 1.0, 1.0])):
        with pytest.raises(ValueError, match="negative_sample_weights must be 4 finite weights"):
            train_unet(pipe, latents, embeds, **kw, negative_sample_weights=bad)


def test_task_hands_the_advantage_weights_to_training(monkeypatch):
    """DiffusionTask.finetune: with train.negative_advantage_scale 2 the negatives (rewards -1 and 3, pool means 1
    and 4) arrive with weights (1 - -1) / 2 = 1 and (4 - 3) / 2 = 0.5; without it no weights are passed."""
    from raft_diffusion.diffusion import task as task_mod
    from raft_diffusion.diffusion.config import config_from_dict

    got = {}
    monkeypatch.setattr(task_mod.ft, "train_unet", lambda pipe, latents, embeds, **kw: got.update(kw) or {})

    def sample(p, j, r, mean=None):
        s = Sample(prompt_index=p, sample_index=j, seed=j, reward=r, payload={"latents": torch.full((4, 2, 2), float(j))})
        if mean is not None:
            s.extras["pool_mean"] = mean
        return s

    kept, negatives = [sample(0, 0, 5.0), sample(1, 1, 6.0)], [sample(1, 3, -1.0, 1.0), sample(0, 4, 3.0, 4.0)]
    embeds = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    for over, want in ((["train.negative_advantage_scale=2.0"], [1.0, 0.5]), ([], None)):
        cfg = config_from_dict({}, ["ranking.negative_k=2", *over])
        fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), legacy=True, train_embeds=(embeds, None), pipe=None, empty_embeds=None, dist=None)
        got.clear()
        task_mod.DiffusionTask.finetune(fake, 1, kept, negatives=negatives)
        assert (got["negative_sample_weights"].tolist() if want else got.get("negative_sample_weights")) == want


def test_task_hands_standard_scores_to_training(monkeypatch):
    """train.advantage_weights: kept rewards 5 and 6 in pools of mean 4 and 3, sd 2 and 1.5 -> weights 0.5 and 2;
    negatives -1 and 3 (means 1 and 4, sd 4 and 0.5) -> 0.5 and 2."""
    from raft_diffusion.diffusion import task as task_mod
    from raft_diffusion.diffusion.config import config_from_dict

    got = {}
    monkeypatch.setattr(task_mod.ft, "train_unet", lambda pipe, latents, embeds, **kw: got.update(kw) or {})

    def sample(p, j, r, mean, sd):
        s = Sample(prompt_index=p, sample_index=j, seed=j, reward=r, payload={"latents": torch.full((4, 2, 2), float(j))})
        s.extras.update(pool_mean=mean, pool_sd=sd)
        return s

    kept, negatives = [sample(0, 0, 5.0, 4.0, 2.0), sample(1, 1, 6.0, 3.0, 1.5)], [sample(1, 3, -1.0, 1.0, 4.0), sample(0, 4, 3.0, 4.0, 0.5)]
    embeds = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    cfg = config_from_dict({}, ["ranking.negative_k=2", "train.advantage_weights=true"])
    fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), legacy=True, train_embeds=(embeds, None), pipe=None, empty_embeds=None, dist=None)
    task_mod.DiffusionTask.finetune(fake, 1, kept, negatives=negatives)
    assert got["sample_weights"].tolist() == [0.5, 2.0]
    assert got["negative_sample_weights"].tolist() == [0.5, 2.0]


@pytest.mark.parametrize(
    ("over", "match"),
    (
        (["train.advantage_weights=true"], "needs ranking.negative_k > 0"),
        (["ranking.negative_k=2", "ranking.replay_top_k=1", "train.advantage_weights=true"], "replay_top_k 0"),
        (["ranking.negative_k=2", "train.advantage_weights=true", "train.reward_weight_temperature=0.5"], "replaces"),
        (["ranking.negative_k=2", "train.advantage_weights=true", "train.negative_advantage_scale=1"], "replaces"),
    ),
)
def test_bad_advantage_weights(over, match):
    from raft_diffusion.diffusion.config import config_from_dict

    with pytest.raises(ConfigError, match=match):
        config_from_dict({}, over)


@pytest.mark.parametrize("over", (["train.negative_advantage_scale=1.0"], ["ranking.negative_k=3", "train.negative_advantage_scale=0"]))
def test_bad_advantage_scale(over):
    from raft_diffusion.diffusion.config import config_from_dict

    with pytest.raises(ConfigError, match="negative_advantage_scale must be > 0 and needs ranking.negative_k > 0"):
        config_from_dict({}, over)


def test_stage_lr_decay_reaches_training(monkeypatch):
    """train.stage_lr_decay 0.8 at learning rate 1e-3: stage 1 trains at 1e-3, stage 3 at 1e-3 x 0.8^2 = 6.4e-4;
    without it every stage trains at 1e-3."""
    from raft_diffusion.diffusion import task as task_mod
    from raft_diffusion.diffusion.config import config_from_dict

    got = {}
    monkeypatch.setattr(task_mod.ft, "train_unet", lambda pipe, latents, embeds, **kw: got.update(kw) or {})
    kept = [Sample(prompt_index=0, sample_index=0, seed=0, reward=1.0, payload={"latents": torch.zeros(4, 2, 2)})]
    embeds = torch.zeros(1, 3, 5)
    for over, want in ((["train.stage_lr_decay=0.8"], {1: 1e-3, 3: 6.4e-4}), ([], {1: 1e-3, 3: 1e-3})):
        cfg = config_from_dict({}, ["train.learning_rate=1e-3", *over])
        fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), legacy=True, train_embeds=(embeds, None), pipe=None, empty_embeds=None, dist=None)
        for stage, lr in want.items():
            task_mod.DiffusionTask.finetune(fake, stage, kept)
            assert got["learning_rate"] == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("value", ("0", "1.5", "-0.5"))
def test_bad_stage_lr_decay(value):
    from raft_diffusion.diffusion.config import config_from_dict

    with pytest.raises(ConfigError, match=r"train.stage_lr_decay must be in \(0, 1\] or null"):
        config_from_dict({}, [f"train.stage_lr_decay={value}"])


def test_stage_lr_decay_is_shown_where_the_learning_rate_is():
    """The gallery's config table and the model card name the decay beside the learning rate, and say nothing of it
    for a run without one (an older config.yaml has no such key)."""
    from raft_diffusion.diffusion.card import _settings
    from raft_diffusion.diffusion.gallery import _config_summary

    cfg = {"train": {"learning_rate": 0.001, "lr_scheduler": "constant", "stage_lr_decay": 0.8, "steps_per_stage": 60, "batch_size": 8}}
    assert "lr 0.001 (constant, x 0.8 a stage), 60 steps x batch 8 per stage" in _config_summary(cfg)
    assert dict(_settings(cfg, 3, 3))["fine-tuning"].endswith("learning rate 0.001 x 0.8 a stage")
    del cfg["train"]["stage_lr_decay"]
    assert "lr 0.001 (constant), 60 steps x batch 8 per stage" in _config_summary(cfg)
    assert dict(_settings(cfg, 3, 3))["fine-tuning"].endswith("learning rate 0.001")
