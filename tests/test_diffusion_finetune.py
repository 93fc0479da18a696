"""UNet fine-tuning: LoRA changes only the adapter, saves/reloads in diffusers format, trains reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.finetune import (
    LORA_WEIGHT_NAME,
    add_lora,
    load_lora_into_unet,
    save_lora,
    set_full_finetune,
    train_unet,
)
from raft_diffusion.diffusion.generate import encode_prompts, generate_batch

TRAIN = dict(steps=6, batch_size=4, learning_rate=1e-2, progress=False)


@pytest.fixture(scope="module")
def data(tiny_pipe):
    """Six (latent, text embedding) training pairs and a fixed UNet probe input."""
    embeds, _ = encode_prompts(tiny_pipe, ["a cat", "a dog", "a frog"], None, do_cfg=False)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 16, 16, generator=gen)
    probe = (torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([50, 700]), embeds[:2])
    return latents, embeds[[0, 1, 2, 0, 1, 2]], probe


def unet_output(unet, probe) -> torch.Tensor:
    x, t, cond = probe
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond).sample


def base_weights(unet) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}


def lora_weights(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad}


def hand_draws(seed: int, t_range: tuple[int, int] = (0, 1000)):
    """train_unet's draws for one micro-batch of 6, by hand: batch order, noise, timesteps from one generator.

    Returns the generator too, for the draws that follow (caption dropout)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(6, generator=gen)
    noise = torch.randn((6, 4, 16, 16), generator=gen)
    t = torch.randint(*t_range, (6,), generator=gen)
    return gen, idx, noise, t


def test_lora_stage_changes_output_keeps_base_and_reloads(load_tiny_pipe, data, tmp_path):
    latents, embeds, probe = data
    pipe = load_tiny_pipe()
    before = unet_output(pipe.unet, probe)
    base = base_weights(pipe.unet)
    count = add_lora(pipe.unet, rank=4, alpha=8)  # alpha != rank: the saved scale must survive a reload
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert count > 0 and trainable and all("lora_" in n for n in trainable)
    assert torch.equal(unet_output(pipe.unet, probe), before)  # lora_B starts at zero

    stats = train_unet(pipe, latents, embeds, **TRAIN)
    assert stats["steps"] == 6 and stats["loss_mean"] > 0 and stats["loss_last"] > 0
    assert not pipe.unet.training
    after = unet_output(pipe.unet, probe)
    assert (after - before).abs().max() > 1e-3
    now = base_weights(pipe.unet)
    assert now.keys() == base.keys() and all(torch.equal(now[k], base[k]) for k in base)

    out = save_lora(pipe.unet, tmp_path / "lora")
    assert (out / LORA_WEIGHT_NAME).is_file()
    fresh = load_tiny_pipe()
    fresh.load_lora_weights(str(out))
    torch.testing.assert_close(unet_output(fresh.unet, probe), after, rtol=0, atol=1e-5)
    sampling = dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    _, trained_images = generate_batch(pipe, embeds[:2], None, [1, 2], **sampling)
    _, reloaded_images = generate_batch(fresh, embeds[:2], None, [1, 2], **sampling)
    torch.testing.assert_close(reloaded_images, trained_images, rtol=0, atol=1e-5)


def test_load_lora_into_unet_round_trip_and_mismatches(load_tiny_pipe, data, tmp_path):
    latents, embeds, probe = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet, rank=4, alpha=8)
    train_unet(pipe, latents, embeds, **TRAIN)
    save_lora(pipe.unet, tmp_path / "lora")
    save_lora(pipe.unet, tmp_path / "lora")  # replacing an existing folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]

    resumed = load_tiny_pipe()
    add_lora(resumed.unet, rank=4, alpha=8, init_seed=99)
    load_lora_into_unet(resumed.unet, tmp_path / "lora")
    torch.testing.assert_close(unet_output(resumed.unet, probe), unet_output(pipe.unet, probe), rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(lora_weights(resumed.unet).values(), lora_weights(pipe.unet).values()))

    other_rank = load_tiny_pipe()
    add_lora(other_rank.unet, rank=2, alpha=8)
    with pytest.raises(UserError, match="same lora rank"):
        load_lora_into_unet(other_rank.unet, tmp_path / "lora")
    other_alpha = load_tiny_pipe()
    add_lora(other_alpha.unet, rank=4, alpha=4)
    with pytest.raises(UserError, match="lora_alpha=8"):
        load_lora_into_unet(other_alpha.unet, tmp_path / "lora")
    other_targets = load_tiny_pipe()
    add_lora(other_targets.unet, rank=4, alpha=8, target_modules=("to_q", "to_k"))
    with pytest.raises(UserError, match="unexpected"):
        load_lora_into_unet(other_targets.unet, tmp_path / "lora")
    with pytest.raises(UserError, match="no LoRA weights"):
        load_lora_into_unet(resumed.unet, tmp_path / "missing")


def test_training_is_reproducible_for_a_seed(load_tiny_pipe, data):
    latents, embeds, _ = data
    settings = dict(TRAIN, gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2, seed=3)
    runs = []
    for seed in (3, 3, 4):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet, rank=4, alpha=4, dropout=0.1)
        stats = train_unet(pipe, latents, embeds, **{**settings, "seed": seed})
        runs.append((stats, lora_weights(pipe.unet)))
    (s1, w1), (s2, w2), (s3, w3) = runs
    assert s1["loss_mean"] == s2["loss_mean"] and s1["loss_last"] == s2["loss_last"]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(not torch.equal(w1[k], w3[k]) for k in w1)
    assert s1["lr_last"] == pytest.approx(0.0, abs=1e-12)  # cosine schedule ends at zero


def test_lora_init_is_seeded(load_tiny_pipe):
    a, b, c = load_tiny_pipe(), load_tiny_pipe(), load_tiny_pipe()
    add_lora(a.unet, init_seed=1)
    add_lora(b.unet, init_seed=1)
    add_lora(c.unet, init_seed=2)
    wa, wb, wc = lora_weights(a.unet), lora_weights(b.unet), lora_weights(c.unet)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


@pytest.mark.parametrize("snr_gamma", [None, 5.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_the_denoising_loss_for_the_prediction_type(load_tiny_pipe, data, prediction_type, snr_gamma):
    from diffusers import DDIMScheduler, DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    add_lora(pipe.unet)
    stats = train_unet(pipe, latents, embeds, steps=1, batch_size=6, learning_rate=0.0, seed=5, progress=False, snr_gamma=snr_gamma)

    _, idx, noise, t = hand_draws(5)  # the same draws, by hand
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    x0 = latents[idx]
    target = noise if prediction_type == "epsilon" else ddpm.get_velocity(x0, noise, t)
    with torch.no_grad():
        pred = pipe.unet(ddpm.add_noise(x0, noise, t), t, encoder_hidden_states=embeds[idx]).sample
    per_sample = ((pred - target) ** 2).flatten(1).mean(1)
    weights = torch.ones(6)
    if snr_gamma is not None:  # Min-SNR: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for velocity
        snr = ddpm.alphas_cumprod[t] / (1 - ddpm.alphas_cumprod[t])
        weights = snr.clamp(max=snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        assert weights.min() < 0.9  # the draw includes a nearly-clean step that the weighting discounts
    assert stats["loss_last"] == pytest.approx((weights * per_sample).mean().item(), rel=1e-5)
    other = ddpm.get_velocity(x0, noise, t) if prediction_type == "epsilon" else noise
    assert stats["loss_last"] != pytest.approx((weights * ((pred - other) ** 2).flatten(1).mean(1)).mean().item(), rel=1e-3)
    if snr_gamma is not None:
        assert stats["loss_last"] != pytest.approx(per_sample.mean().item(), rel=1e-3)


def test_caption_dropout_trains_those_samples_on_the_empty_prompt(load_tiny_pipe, data):
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    # a stand-in far from every prompt's embedding, so that the swap shows in the tiny UNet's loss
    empty = torch.randn(1, *embeds.shape[1:], generator=torch.Generator().manual_seed(1)) * 3.0
    kw = dict(steps=1, batch_size=6, learning_rate=0.0, seed=5, progress=False)
    stats = train_unet(pipe, latents, embeds, **kw, empty_prompt_ratio=0.5, empty_embeds=empty)
    # by hand: the usual draws, then one uniform per sample; below the ratio -> the empty prompt's embedding
    gen, idx, noise, t = hand_draws(5)
    drop = torch.rand(6, generator=gen) < 0.5
    assert 0 < int(drop.sum()) < 6  # this seed drops some captions and keeps others
    cond = torch.where(drop.view(-1, 1, 1), empty, embeds[idx])
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pred = pipe.unet(ddpm.add_noise(latents[idx], noise, t), t, encoder_hidden_states=cond).sample
    assert stats["loss_last"] == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-5)
    assert stats["loss_last"] != pytest.approx(train_unet(pipe, latents, embeds, **kw)["loss_last"], rel=1e-3)
    with pytest.raises(ValueError, match="needs empty_embeds"):
        train_unet(pipe, latents, embeds, **kw, empty_prompt_ratio=0.1)
    with pytest.raises(UserError, match=r"empty_prompt_ratio must be in \[0, 1\)"):
        train_unet(pipe, latents, embeds, **kw, empty_prompt_ratio=1.0, empty_embeds=empty)


def test_timestep_range_trains_only_those_timesteps(load_tiny_pipe, data):
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    kw = dict(steps=1, batch_size=6, learning_rate=0.0, seed=5, progress=False)
    stats = train_unet(pipe, latents, embeds, **kw, timestep_range=(900, 1000))
    _, idx, noise, t = hand_draws(5, (900, 1000))  # by hand: the usual draws, with t ~ U[900, 1000)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pred = pipe.unet(ddpm.add_noise(latents[idx], noise, t), t, encoder_hidden_states=embeds[idx]).sample
    assert stats["loss_last"] == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-5)
    # the full range is the default draw, bit for bit
    full = train_unet(pipe, latents, embeds, **kw, timestep_range=(0, 1000))["loss_last"]
    assert full == train_unet(pipe, latents, embeds, **kw)["loss_last"] != stats["loss_last"]
    with pytest.raises(UserError, match=r"timestep_range must be \[lo, hi\] with 0 <= lo < hi <= 1000 \(got \[500, 1200\]\)"):
        train_unet(pipe, latents, embeds, **kw, timestep_range=(500, 1200))


def test_timestep_ranges_cycle_over_the_steps(load_tiny_pipe, data):
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    kw = dict(steps=3, batch_size=6, learning_rate=0.0, seed=5, progress=False)
    stats = train_unet(pipe, latents, embeds, **kw, timestep_ranges=[(900, 1000), (0, 100)])
    # by hand: step s draws batch order, noise and t ~ U[ranges[s % 2]] from the one generator (lr 0: same UNet)
    gen = torch.Generator().manual_seed(5)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    losses = []
    for lo, hi in [(900, 1000), (0, 100), (900, 1000)]:
        idx = torch.randperm(6, generator=gen)
        noise = torch.randn((6, 4, 16, 16), generator=gen)
        t = torch.randint(lo, hi, (6,), generator=gen)
        with torch.no_grad():
            pred = pipe.unet(ddpm.add_noise(latents[idx], noise, t), t, encoder_hidden_states=embeds[idx]).sample
        losses.append(F.mse_loss(pred, noise).item())
    assert stats["loss_last"] == pytest.approx(losses[2], rel=1e-5)
    assert stats["loss_mean"] == pytest.approx(sum(losses) / 3, rel=1e-5)
    # one range is timestep_range, bit for bit
    one = train_unet(pipe, latents, embeds, **kw, timestep_ranges=[(900, 1000)])
    assert one["loss_mean"] == train_unet(pipe, latents, embeds, **kw, timestep_range=(900, 1000))["loss_mean"]
    with pytest.raises(UserError, match="replaces timestep_range"):
        train_unet(pipe, latents, embeds, **kw, timestep_range=(0, 1000), timestep_ranges=[(0, 100)])
    with pytest.raises(UserError, match=r"timestep_ranges must be a non-empty list"):
        train_unet(pipe, latents, embeds, **kw, timestep_ranges=[(500, 1200)])


def test_full_finetune_and_gradient_checkpointing(load_tiny_pipe, data):
    latents, embeds, probe = data
    results = []
    for checkpointing in (False, True):
        pipe = load_tiny_pipe()
        count = set_full_finetune(pipe.unet)
        assert count == sum(p.numel() for p in pipe.unet.parameters())
        before = base_weights(pipe.unet)
        stats = train_unet(pipe, latents, embeds, steps=2, batch_size=3, learning_rate=1e-3,
                           gradient_checkpointing=checkpointing, progress=False)  # fmt: skip
        assert not pipe.unet.is_gradient_checkpointing
        assert any(not torch.equal(before[k], v) for k, v in base_weights(pipe.unet).items())
        results.append((stats["loss_mean"], unet_output(pipe.unet, probe)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-4)


def test_bad_training_setups(load_tiny_pipe, data):
    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_unet(pipe, latents, embeds, **TRAIN)
    with pytest.raises(UserError, match="match no UNet layer"):
        add_lora(pipe.unet, target_modules=("not_a_layer",))
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    with pytest.raises(UserError, match="snr_gamma must be > 0"):
        train_unet(pipe, latents, embeds, **TRAIN, snr_gamma=0.0)
    with pytest.raises(UserError, match="unknown mixed_precision"):
        train_unet(pipe, latents, embeds, **TRAIN, mixed_precision="fp8")
    with pytest.raises(ValueError, match="matching"):
        train_unet(pipe, latents, embeds[:3], **TRAIN)
    assert train_unet(pipe, latents, embeds, **{**TRAIN, "steps": 0})["steps"] == 0
    # bf16 autocast also runs on CPU (tests/test_memory_plan.py checks that it changes the LoRA)
    if not torch.cuda.is_available():
        assert train_unet(pipe, latents, embeds, **{**TRAIN, "steps": 1}, mixed_precision="bf16")["steps"] == 1


def test_lora_merged_samples_the_same_model_and_restores_the_weights(load_tiny_pipe):
    """sampling.merge_lora: inside ``lora_merged`` the adapted layers run once, with the LoRA added into their
    weights; the images equal the unmerged ones up to float rounding, and afterwards every weight has its
    bytes back (merge then unmerge alone would not restore them)."""
    from peft.tuners.lora import LoraLayer

    from raft_diffusion.diffusion.finetune import add_lora, lora_merged
    from raft_diffusion.diffusion.generate import encode_prompts, generate_batch

    pipe = load_tiny_pipe()
    targets = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv2", "time_emb_proj")  # convolutions too
    add_lora(pipe.unet, rank=4, alpha=8, init_seed=0, target_modules=targets)
    g = torch.Generator().manual_seed(1)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.3  # a trained-looking adapter (B starts at zero)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    emb, neg = encode_prompts(pipe, ["a red circle", "a blue square"], None, True)

    def sample():
        return generate_batch(pipe, emb, neg, [3, 4], num_inference_steps=3, guidance_scale=2.0, height=32, width=32)[0]

    plain = sample()
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    m = next(m for m in layers if isinstance(m.get_base_layer(), torch.nn.Linear))
    w0 = m.get_base_layer().weight.detach().clone()
    with lora_merged(pipe.unet):
        assert all(m.merged for m in layers) and any(isinstance(m.get_base_layer(), torch.nn.Conv2d) for m in layers)
        merged = sample()
        # the merged base weight is W + scale * B @ A
        delta = m.lora_B["default"].weight @ m.lora_A["default"].weight * m.scaling["default"]
        assert torch.allclose(m.get_base_layer().weight, w0 + delta, atol=1e-6) and delta.abs().max() > 0.01
    assert not any(m.merged for m in layers)
    after = pipe.unet.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    # float rounding only (the adapter is large: its output moves the latents by far more than this)
    assert (plain - merged).abs().max() < 1e-3 * plain.abs().max()
    assert torch.equal(sample(), plain)  # unmerged again
    with lora_merged(pipe.unet, enabled=False):
        assert not any(m.merged for m in layers)


def test_sample_weights_weight_each_rows_loss(load_tiny_pipe, data):
    """train.reward_weight_temperature's loss: each row's denoising MSE times its sample's weight, by hand; and the
    weights steer the gradient (all-equal weights of 1 give the unweighted step bit for bit)."""
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    w = torch.tensor([2.0, 0.5, 1.0, 0.0, 1.5, 1.0])
    kw = dict(steps=1, batch_size=6, learning_rate=0.0, seed=5, progress=False)
    stats = train_unet(pipe, latents, embeds, **kw, sample_weights=w)
    _, idx, noise, t = hand_draws(5)
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        pred = pipe.unet(ddpm.add_noise(latents[idx], noise, t), t, encoder_hidden_states=embeds[idx]).sample
    per_sample = ((pred - noise) ** 2).flatten(1).mean(1)
    assert stats["loss_last"] == pytest.approx((w[idx] * per_sample).mean().item(), rel=1e-5)
    assert stats["loss_last"] != pytest.approx(per_sample.mean().item(), rel=1e-3)
    # with a learning rate: weights of 1 train exactly as no weights; other weights train otherwise
    trained = []
    for weights in (None, torch.ones(6), w):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet)
        train_unet(pipe, latents, embeds, **TRAIN, sample_weights=weights)
        trained.append(lora_weights(pipe.unet))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert any(not torch.equal(trained[0][k], trained[2][k]) for k in trained[0])
    with pytest.raises(ValueError, match="sample_weights must be 6 finite weights"):
        train_unet(pipe, latents, embeds, **TRAIN, sample_weights=torch.ones(5))
    with pytest.raises(ValueError, match="sample_weights must be 6 finite weights"):
        train_unet(pipe, latents, embeds, **TRAIN, sample_weights=-torch.ones(6))


def test_negative_aware_loss_by_hand(load_tiny_pipe, data):
    """ranking.negative_k / train.negative_weight / train.nft_beta: two steps by hand. Step 1's gradient is that of
    mean ||(1-b) v_ref + b v - eps||^2 over the kept rows + lam * mean ||(1+b) v_ref - b v - eps||^2 over the
    negative rows with v_ref = v (the reference is the weights at the call's start); step 2's loss, reported as
    loss_last, has v from the weights after step 1 and v_ref still from the start."""
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    gen = torch.Generator().manual_seed(11)
    neg_latents, neg_embeds = torch.randn(4, 4, 16, 16, generator=gen), embeds[[1, 2, 0, 1]]
    beta, lam, lr, seed = 0.5, 0.7, 1e-2, 5
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    start = lora_weights(pipe.unet)
    kw = dict(steps=2, batch_size=6, learning_rate=lr, seed=seed, max_grad_norm=None, progress=False)
    stats = train_unet(pipe, latents, embeds, **kw, negative_latents=neg_latents, negative_embeds=neg_embeds, negative_weight=lam, nft_beta=beta)
    assert stats["num_negative_rows"] == 4
    # the draws: kept rows from the seed's generator, negatives from their own
    g = torch.Generator().manual_seed(seed)
    pos = [(torch.randperm(6, generator=g), torch.randn((6, 4, 16, 16), generator=g), torch.randint(0, 1000, (6,), generator=g)) for _ in range(2)]
    g = torch.Generator().manual_seed((seed * 1_000_003 + 7_919) % 2**63)
    neg = [(torch.randperm(4, generator=g), torch.randn((4, 4, 16, 16), generator=g), torch.randint(0, 1000, (4,), generator=g)) for _ in range(2)]
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)
    hand = load_tiny_pipe()
    add_lora(hand.unet)
    unet = hand.unet
    params = [p for p in unet.parameters() if p.requires_grad]

    def predict(x0, cond, draw, grad):
        idx, noise, t = draw
        with torch.set_grad_enabled(grad):
            return unet(ddpm.add_noise(x0[idx], noise, t), t, encoder_hidden_states=cond[idx]).sample, noise

    def loss(v_ref_pos, v_ref_neg, step):
        v, eps = predict(latents, embeds, pos[step], True)
        lp = (((1 - beta) * v_ref_pos + beta * v - eps) ** 2).flatten(1).mean(1).mean()
        v, eps = predict(neg_latents, neg_embeds, neg[step], True)
        ln = (((1 + beta) * v_ref_neg - beta * v - eps) ** 2).flatten(1).mean(1).mean()
        return lp + lam * ln

    refs = [(predict(latents, embeds, pos[s], False)[0], predict(neg_latents, neg_embeds, neg[s], False)[0]) for s in range(2)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    unet.train()
    first = loss(*refs[0], 0)
    first.backward()
    opt.step()
    opt.zero_grad()
    second = loss(*refs[1], 1)
    assert stats["loss_last"] == pytest.approx(second.item(), rel=1e-5)
    assert stats["loss_mean"] == pytest.approx((first.item() + second.item()) / 2, rel=1e-5)
    # v_ref is not the current weights at step 2: the same loss with v_ref = v differs
    with torch.no_grad():
        now = (predict(latents, embeds, pos[1], False)[0], predict(neg_latents, neg_embeds, neg[1], False)[0])
    assert second.item() != pytest.approx(loss(*now, 1).item(), rel=1e-4)
    assert any(not torch.equal(start[k], lora_weights(pipe.unet)[k]) for k in start)


def test_negative_aware_loss_at_beta_1_weight_0_is_the_plain_loss(load_tiny_pipe, data):
    """nft_beta 1 with negative_weight 0 trains as the plain loss (the negatives' rows computed, weighted 0): bit for
    bit when the negatives get their own passes (chunk_rows), up to float rounding when they share the kept rows' pass
    (a batch twice as wide); a negative weight or another beta trains otherwise; nft_beta < 1 alone (no negatives) is
    an extrapolated positive loss that also differs."""
    latents, embeds, _ = data
    neg = dict(negative_latents=torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2)), negative_embeds=embeds[[0, 1, 2]])
    trained = []
    for extra in (
        {},
        {**neg, "negative_weight": 0.0, "chunk_rows": 4},
        {**neg, "negative_weight": 0.0},
        {**neg, "negative_weight": 0.5},
        {"nft_beta": 0.5},
    ):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet)
        train_unet(pipe, latents, embeds, **{**TRAIN, "steps": 3}, **extra)
        trained.append(lora_weights(pipe.unet))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert all(torch.allclose(trained[0][k], trained[2][k], rtol=0, atol=1e-4) for k in trained[0])
    assert any(not torch.allclose(trained[0][k], trained[3][k], rtol=0, atol=1e-3) for k in trained[0])
    assert any(not torch.allclose(trained[0][k], trained[4][k], rtol=0, atol=1e-3) for k in trained[0])
    with pytest.raises(UserError, match="nft_beta must be > 0"):
        train_unet(pipe, latents, embeds, **TRAIN, nft_beta=0.0)


@pytest.mark.parametrize("beta", (0.5, 1.0))
def test_negative_aware_loss_shares_a_pass_with_the_kept_rows(load_tiny_pipe, data, beta):
    """Without chunk_rows a micro-batch's kept rows and its negatives go through the UNet (and the reference) in one
    pass: the losses and weights are those of separate passes (chunk_rows = the micro-batch, the former layout) up
    to float rounding, and there are half the UNet calls; with gradient accumulation each micro-batch pairs with its
    own negatives."""
    latents, embeds, _ = data
    neg = dict(
        negative_latents=torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(3)),
        negative_embeds=embeds[[2, 0, 1, 1, 0]],
        negative_weight=0.7,
        nft_beta=beta,
    )
    for accumulate in (1, 2):
        results = []
        for chunk_rows in (None, 3):
            pipe = load_tiny_pipe()
            add_lora(pipe.unet)
            calls = []
            pipe.unet.register_forward_hook(lambda m, args, out, calls=calls: calls.append(args[0].shape[0]))
            kw = dict(steps=3, batch_size=3, learning_rate=1e-2, seed=4, progress=False, gradient_accumulation_steps=accumulate)
            stats = train_unet(pipe, latents, embeds, **kw, **neg, chunk_rows=chunk_rows)
            results.append((stats, lora_weights(pipe.unet), calls))
        (fused, w_fused, c_fused), (apart, w_apart, c_apart) = results
        assert fused["loss_mean"] == pytest.approx(apart["loss_mean"], rel=1e-5)
        # Adam turns rounding-level gradient differences into up to ~1e-5 of weight after 3 steps of lr 1e-2
        assert all(torch.allclose(w_fused[k], w_apart[k], rtol=0, atol=1e-4) for k in w_fused)
        # per micro-batch: the reference (kept rows too when beta != 1), then the trained pass
        micro_batches = 3 * accumulate
        if beta != 1.0:
            assert (c_fused, c_apart) == ([6, 6] * micro_batches, [3, 3, 3, 3] * micro_batches)
        else:
            assert (c_fused, c_apart) == ([3, 6] * micro_batches, [3, 3, 3] * micro_batches)


def test_task_hands_weights_and_negatives_to_training(monkeypatch):
    """DiffusionTask.finetune's wiring: train.reward_weight_key=selection weighs by the novelty-raised key (a sample
    without one by its reward), reward by the reward; ranking.negative_k's negatives arrive as latents and their
    prompts' embeddings with train.negative_weight and train.nft_beta; without them no such argument is passed."""
    from types import SimpleNamespace

    from raft_diffusion.core.ranking import kept_weights
    from raft_diffusion.core.types import Sample
    from raft_diffusion.diffusion import task as task_mod
    from raft_diffusion.diffusion.config import config_from_dict

    got = {}
    monkeypatch.setattr(task_mod.ft, "train_unet", lambda pipe, latents, embeds, **kw: got.update(kw, latents=latents, embeds=embeds) or {})

    def sample(p, j, r, key=None):
        s = Sample(prompt_index=p, sample_index=j, seed=j, reward=r, payload={"latents": torch.full((4, 2, 2), float(j))})
        s.selection_key = key
        return s

    kept = [sample(0, 0, 1.0, 2.0), sample(0, 1, 0.8, 2.5), sample(1, 2, 0.3, None)]
    negatives = [sample(1, 3, -1.0), sample(0, 4, -2.0)]
    embeds = torch.arange(2 * 3 * 5, dtype=torch.float32).view(2, 3, 5)
    for over, want in (
        (["train.reward_weight_temperature=0.5", "train.reward_weight_key=selection"], kept_weights([2.0, 2.5, 0.3], [0, 0, 1], 0.5)),
        (["train.reward_weight_temperature=0.5"], kept_weights([1.0, 0.8, 0.3], [0, 0, 1], 0.5)),
    ):
        cfg = config_from_dict({}, over + ["ranking.negative_k=2", "train.negative_weight=0.3", "train.nft_beta=0.7"])
        fake = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), legacy=True, train_embeds=(embeds, None), pipe=None, empty_embeds=None, dist=None)
        got.clear()
        task_mod.DiffusionTask.finetune(fake, 1, kept, negatives=negatives)
        assert got["sample_weights"].tolist() == pytest.approx(want, rel=1e-6)
        assert got["negative_latents"][:, 0, 0, 0].tolist() == [3.0, 4.0]
        assert torch.equal(got["negative_embeds"], embeds[[1, 0]])
        assert (got["negative_weight"], got["nft_beta"]) == (0.3, 0.7)
    fake.cfg = config_from_dict({}, [])
    got.clear()
    task_mod.DiffusionTask.finetune(fake, 1, kept)
    assert not {"sample_weights", "negative_latents", "negative_weight", "nft_beta"} & set(got)
    # train.advantage_weights: standard scores in each prompt's pool, of the reward, or with reward_weight_key=selection
    # of the raised key among the pool's keys (a kept sample without one by its reward); negatives by their reward
    stats = {0: (0.5, 0.25, 1.5, 0.5), 1: (0.1, 0.5, None, None)}
    for s in kept + negatives:
        m, sd, km, ksd = stats[s.prompt_index]
        s.extras.update(pool_mean=m, pool_sd=sd)
        if km is not None:
            s.extras.update(pool_selection_mean=km, pool_selection_sd=ksd)
    neg_want = [max(0.0, -(-1.0 - 0.1) / 0.5), max(0.0, -(-2.0 - 0.5) / 0.25)]
    for over, want in (
        ([], [(1.0 - 0.5) / 0.25, (0.8 - 0.5) / 0.25, (0.3 - 0.1) / 0.5]),
        (["train.reward_weight_key=selection"], [(2.0 - 1.5) / 0.5, (2.5 - 1.5) / 0.5, (0.3 - 0.1) / 0.5]),
    ):
        fake.cfg = config_from_dict({}, over + ["ranking.negative_k=2", "train.advantage_weights=true"])
        got.clear()
        task_mod.DiffusionTask.finetune(fake, 1, kept, negatives=negatives)
        assert got["sample_weights"].tolist() == pytest.approx(want, rel=1e-6)
        assert got["negative_sample_weights"].tolist() == pytest.approx(neg_want, rel=1e-6)
    # another family: one row of the family's conditioning per negative, and the family's loss
    from raft_diffusion.diffusion.families import PromptEmbeds, get_family

    pooled = torch.arange(2 * 4, dtype=torch.float32).view(2, 4)
    family_embeds = PromptEmbeds({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled})
    fake = SimpleNamespace(
        cfg=config_from_dict({}, ["ranking.negative_k=2", "train.nft_beta=0.7"]),
        device=torch.device("cpu"),
        legacy=False,
        family=get_family("sd3"),
        train_embeds=family_embeds,
        pipe=None,
        empty_embeds=None,
        dist=None,
    )
    got.clear()
    task_mod.DiffusionTask.finetune(fake, 1, kept, negatives=negatives)
    assert got["family"].name == "sd3" and got["nft_beta"] == 0.7
    assert torch.equal(got["negative_embeds"].per_prompt["prompt_embeds"], embeds[[1, 0]])
    assert torch.equal(got["negative_embeds"].per_prompt["pooled_prompt_embeds"], pooled[[1, 0]])
    assert torch.equal(got["embeds"].per_prompt["pooled_prompt_embeds"], pooled[[0, 0, 1]])


def test_timestep_ranges_only_from_a_late_stage():
    """train.timestep_ranges_from_stage=4: stages 1-3 train on train.timestep_range, stages 4 on on the cycled
    timestep_ranges; unset, the ranges apply in every stage as before (and timestep_range must then be null)."""
    from raft_diffusion.core.errors import ConfigError
    from raft_diffusion.diffusion.config import config_from_dict
    from raft_diffusion.diffusion.task import train_settings

    ranges = "[[800,1000],[0,800]]"
    cfg = config_from_dict({}, ["train.timestep_range=[800,1000]", f"train.timestep_ranges={ranges}", "train.timestep_ranges_from_stage=4"])
    picked = [(train_settings(cfg.train, st)["timestep_range"], train_settings(cfg.train, st)["timestep_ranges"]) for st in (1, 3, 4, 6)]
    assert picked == [([800, 1000], None), ([800, 1000], None), (None, [[800, 1000], [0, 800]]), (None, [[800, 1000], [0, 800]])]
    every = config_from_dict({}, [f"train.timestep_ranges={ranges}"])
    assert all(train_settings(every.train, st)["timestep_ranges"] == [[800, 1000], [0, 800]] for st in (1, 5))
    with pytest.raises(ConfigError, match="timestep_range null .* unless train.timestep_ranges_from_stage"):
        config_from_dict({}, ["train.timestep_range=[800,1000]", f"train.timestep_ranges={ranges}"])
    with pytest.raises(ConfigError, match="timestep_ranges_from_stage must be an integer >= 1 with train.timestep_ranges"):
        config_from_dict({}, ["train.timestep_ranges_from_stage=2"])
