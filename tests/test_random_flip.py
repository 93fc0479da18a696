"""train.random_flip: each training row's latents mirrored left to right on a coin, against by-hand references."""

from __future__ import annotations

import pytest
import torch
from test_diffusion_finetune import data, hand_draws, lora_weights  # noqa: F401  (data is a fixture)

from raft_diffusion.diffusion.config import config_from_dict
from raft_diffusion.diffusion.finetune import add_lora, train_unet
from raft_diffusion.diffusion.task import train_settings


def test_random_flip_loss_by_hand(load_tiny_pipe, data):  # noqa: F811
    """One step over all six rows at lr 0: after the usual draws each row tosses a coin (rand < 1/2) and the rows that
    come up true are trained on their latents mirrored (the last axis reversed)."""
    from diffusers import DDPMScheduler

    latents, embeds, _ = data
    pipe = load_tiny_pipe()
    add_lora(pipe.unet)
    stats = train_unet(pipe, latents, embeds, steps=1, batch_size=6, learning_rate=0.0, seed=5, progress=False, random_flip=True)
    gen, idx, noise, t = hand_draws(5)
    coin = torch.rand(6, generator=gen) < 0.5
    assert 0 < int(coin.sum()) < 6  # this draw mirrors some rows and not others
    x0 = torch.where(coin.view(-1, 1, 1, 1), latents[idx].flip(-1), latents[idx])
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(x):
        with torch.no_grad():
            pred = pipe.unet(ddpm.add_noise(x, noise, t), t, encoder_hidden_states=embeds[idx]).sample
        return ((pred - noise) ** 2).flatten(1).mean(1).mean().item()

    # the tiny random UNet barely tells a latent from its mirror image (the losses differ by about 5e-5), so the
    # tolerance is absolute and well under that difference
    assert stats["loss_last"] == pytest.approx(loss(x0), abs=2e-6)
    assert abs(loss(x0) - loss(latents[idx])) > 2e-5


def _premirrored(latents, idx, coin, mirror=lambda x: x.flip(-1)):
    """The latents with each row the coin mirrors already mirrored (each row drawn once in the step)."""
    out = latents.clone()
    out[idx[coin]] = mirror(latents[idx[coin]])
    return out


def test_random_flip_is_training_on_the_mirrored_rows(load_tiny_pipe, data):  # noqa: F811
    """One step of lr 1e-2 with negatives: random_flip trains the weights bit for bit as the plain loss does on data
    in which the rows whose coins come up (the kept rows' from the seed's generator, the negatives' from theirs) are
    mirrored beforehand; and not as on the data unmirrored."""
    latents, embeds, _ = data
    g = torch.Generator().manual_seed(3)
    neg_latents, neg_embeds = torch.randn(4, 4, 16, 16, generator=g), embeds[[1, 2, 0, 1]]
    seed = 3
    kw = dict(steps=1, batch_size=6, learning_rate=1e-2, seed=seed, progress=False, chunk_rows=6, negative_weight=0.7, nft_beta=0.5)
    gen, idx, _, _ = hand_draws(seed)
    coin = torch.rand(6, generator=gen) < 0.5
    gn = torch.Generator().manual_seed((seed * 1_000_003 + 7_919) % 2**63)
    nidx, _, _ = torch.randperm(4, generator=gn), torch.randn((4, 4, 16, 16), generator=gn), torch.randint(0, 1000, (4,), generator=gn)
    ncoin = torch.rand(4, generator=gn) < 0.5
    assert 0 < int(coin.sum()) < 6 and 0 < int(ncoin.sum()) < 4
    trained = []
    for lat, neg, flip in (
        (latents, neg_latents, True),
        (_premirrored(latents, idx, coin), _premirrored(neg_latents, nidx, ncoin), False),
        (latents, neg_latents, False),
    ):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet)
        train_unet(pipe, lat, embeds, **kw, negative_latents=neg, negative_embeds=neg_embeds, random_flip=flip)
        trained.append(lora_weights(pipe.unet))
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0])
    assert any(not torch.allclose(trained[0][k], trained[2][k], rtol=0, atol=1e-6) for k in trained[0])


def test_flux2_klein_mirrors_in_the_vaes_latent_space():
    """FLUX.2 [klein]'s denoiser-space latents are 2x2 patches normalised per channel: its mirror is the VAE latents'
    width reversed (so each patch's two columns swap too), which reversing the patch grid alone is not; and its
    training rows go through it (one step equals the plain loss on pre-mirrored rows)."""
    from raft_diffusion.diffusion.families import LossSettings, get_family
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    family = get_family("flux2-klein")
    folder = tiny_pipeline("flux2-klein")
    pipe = family.load(folder, device="cpu")
    z = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mirrored = family.mirror(pipe, z)
    torch.testing.assert_close(family.to_vae_latents(pipe, mirrored), family.to_vae_latents(pipe, z).flip(-1), atol=1e-5, rtol=1e-5)
    assert (family.to_vae_latents(pipe, z.flip(-1)) - family.to_vae_latents(pipe, z).flip(-1)).abs().max() > 0.1

    embeds = family.encode_prompts(pipe, ["a red cat", "a blue boat"], do_cfg=False, max_sequence_length=32)
    rows = embeds[[0, 1, 0]]
    seed = 2
    # the family path's draws for one micro-batch of 3: order, noise, the family's timesteps, then the coins
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(3, generator=gen)
    torch.randn((3, 16, 8, 8), generator=gen)
    family.draw_timesteps(pipe, 3, LossSettings(), gen)
    coin = torch.rand(3, generator=gen) < 0.5
    assert 0 < int(coin.sum()) < 3
    trained = []
    for lat, flip in ((z, True), (_premirrored(z, idx, coin, lambda x: family.mirror(pipe, x)), False)):
        p = family.load(folder, device="cpu", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        denoiser = family.denoiser(p)
        family.add_lora(denoiser, rank=4)
        kw = dict(steps=1, batch_size=3, learning_rate=1e-2, seed=seed, progress=False, family=family, loss_settings=LossSettings())
        train_unet(p, lat, rows, **kw, random_flip=flip)
        trained.append({n: q.detach().clone() for n, q in denoiser.named_parameters() if q.requires_grad})
    assert all(torch.allclose(trained[0][k], trained[1][k], rtol=0, atol=1e-6) for k in trained[0])


def test_random_flip_reaches_training_from_the_config():
    assert train_settings(config_from_dict({}, ["train.random_flip=true"]).train)["random_flip"] is True
    assert train_settings(config_from_dict({}, []).train)["random_flip"] is False
