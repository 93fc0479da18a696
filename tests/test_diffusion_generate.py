"""Pool generation: seeds fully determine samples; embeddings per prompt; VAE round trips."""

from __future__ import annotations

import pytest
import torch

from raft_diffusion.diffusion.generate import (
    decode_latents,
    denoise,
    encode_images,
    encode_prompts,
    generate_batch,
    initial_latents,
    start_latents,
)

PROMPTS = ["a cat", "a dog", "a red truck"]
SAMPLING = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32)


@pytest.fixture(scope="module")
def embeds(tiny_pipe):
    return encode_prompts(tiny_pipe, PROMPTS, negative_prompt="blurry", do_cfg=True)


def test_encode_prompts_once_per_prompt(tiny_pipe, embeds):
    positive, negative = embeds
    assert positive.shape == (3, 77, 32) and negative.shape == (3, 77, 32)
    torch.testing.assert_close(negative[0], negative[2], rtol=0, atol=1e-6)  # one negative prompt for all
    alone, none = encode_prompts(tiny_pipe, ["a dog"], None, do_cfg=False)
    assert none is None
    torch.testing.assert_close(alone[0], positive[1], rtol=0, atol=1e-6)
    chunked, _ = encode_prompts(tiny_pipe, PROMPTS, "blurry", do_cfg=True, batch_size=2)
    torch.testing.assert_close(chunked, positive, rtol=0, atol=1e-6)


def test_initial_latents_depend_only_on_seed(tiny_pipe):
    batch = initial_latents(tiny_pipe, [7, 8, 9], 32, 32)
    assert batch.shape == (3, 4, 16, 16)
    assert torch.equal(initial_latents(tiny_pipe, [8], 32, 32)[0], batch[1])
    expected = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(9))
    assert torch.equal(batch[2], expected)


def test_same_seeds_give_bit_identical_images(tiny_pipe, embeds):
    positive, negative = embeds
    lat1, img1 = generate_batch(tiny_pipe, positive, negative, [11, 12, 13], **SAMPLING)
    lat2, img2 = generate_batch(tiny_pipe, positive, negative, [11, 12, 13], **SAMPLING)
    assert torch.equal(lat1, lat2) and torch.equal(img1, img2)
    assert lat1.shape == (3, 4, 16, 16) and img1.shape == (3, 3, 32, 32)
    assert img1.dtype == torch.float32 and 0 <= img1.min() and img1.max() <= 1
    assert not torch.equal(img1[0], img1[1])
    lat3, _ = generate_batch(tiny_pipe, positive, negative, [11, 12, 14], **SAMPLING)
    assert torch.equal(lat3[:2], lat1[:2]) and not torch.equal(lat3[2], lat1[2])


def test_sample_does_not_depend_on_batch_neighbours(tiny_pipe, embeds):
    positive, negative = embeds
    _, batch = generate_batch(tiny_pipe, positive, negative, [21, 22, 23], **SAMPLING)
    _, alone = generate_batch(tiny_pipe, positive[1:2], negative[1:2], [22], **SAMPLING)
    torch.testing.assert_close(alone[0], batch[1], rtol=0, atol=1e-4)  # CPU kernels may round by batch size
    _, mixed = generate_batch(tiny_pipe, positive[[2, 1, 0]], negative[[2, 1, 0]], [5, 22, 6], **SAMPLING)
    torch.testing.assert_close(mixed[1], batch[1], rtol=0, atol=1e-4)


def test_latents_decode_to_the_images(tiny_pipe, embeds):
    positive, negative = embeds
    latents, images = generate_batch(tiny_pipe, positive, negative, [1, 2, 3], **SAMPLING)
    none_latents, none_images = generate_batch(tiny_pipe, positive, negative, [1, 2, 3], decode=False, **SAMPLING)
    assert none_images is None and torch.equal(none_latents, latents)
    assert torch.equal(decode_latents(tiny_pipe, latents), images)
    torch.testing.assert_close(decode_latents(tiny_pipe, latents, batch_size=1), images, rtol=0, atol=1e-5)
    # the pipeline's own decode path gives the same picture
    reference = tiny_pipe(
        prompt_embeds=positive, negative_prompt_embeds=negative, latents=initial_latents(tiny_pipe, [1, 2, 3], 32, 32),
        output_type="pt", **SAMPLING,
    ).images  # fmt: skip
    torch.testing.assert_close(reference, images, rtol=0, atol=1e-5)


def test_no_guidance_path(tiny_pipe, embeds):
    positive, _ = embeds
    latents, images = generate_batch(tiny_pipe, positive, None, [1, 2, 3], **{**SAMPLING, "guidance_scale": 1.0})
    assert images.shape == (3, 3, 32, 32) and torch.isfinite(latents).all()


def test_stochastic_sampler_is_seeded_per_sample(load_tiny_pipe):
    pipe = load_tiny_pipe(scheduler="EulerAncestralDiscreteScheduler")
    positive, negative = encode_prompts(pipe, PROMPTS, None, do_cfg=True)
    a, _ = generate_batch(pipe, positive, negative, [1, 2, 3], decode=False, **SAMPLING)
    b, _ = generate_batch(pipe, positive, negative, [1, 2, 3], decode=False, **SAMPLING)
    c, _ = generate_batch(pipe, positive[2:], negative[2:], [3], decode=False, **SAMPLING)
    assert torch.equal(a, b)
    torch.testing.assert_close(c[0], a[2], rtol=0, atol=1e-4)


def test_encode_images_round_trip(tiny_pipe):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    z1 = encode_images(tiny_pipe, images, [5, 6])
    assert z1.shape == (2, 4, 16, 16)
    assert torch.equal(z1, encode_images(tiny_pipe, images, [5, 6]))
    torch.testing.assert_close(encode_images(tiny_pipe, images[1:], [6])[0], z1[1], rtol=0, atol=1e-5)
    assert not torch.equal(z1, encode_images(tiny_pipe, images, [5, 7]))
    posterior = tiny_pipe.vae.encode(images * 2 - 1).latent_dist
    eps = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(5))
    expected = (posterior.mean[0] + posterior.std[0] * eps) * tiny_pipe.vae.config.scaling_factor
    torch.testing.assert_close(z1[0], expected, rtol=0, atol=1e-5)
    assert decode_latents(tiny_pipe, z1).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="seeds"):
        encode_images(tiny_pipe, images, [1])


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_denoise_split_anywhere_is_the_pipeline_sampler(load_tiny_pipe, eta):
    """sampling.prune_step's sampler: the pipeline's samples, also when a batch is split between two steps
    and only some of its samples go on (their generators carry the sampler noise across the split)."""
    pipe = load_tiny_pipe()
    positive, negative = encode_prompts(pipe, PROMPTS, "blurry", do_cfg=True)
    seeds, steps = [31, 32, 33], 4
    ref, _ = generate_batch(pipe, positive, negative, seeds, **{**SAMPLING, "num_inference_steps": steps}, eta=eta, decode=False)
    pipe.scheduler.set_timesteps(steps)
    ts = pipe.scheduler.timesteps
    run = dict(guidance_scale=SAMPLING["guidance_scale"], eta=eta)
    latents, gens = start_latents(pipe, seeds, 32, 32)
    whole, x0 = denoise(pipe, latents, positive, negative, gens, ts, **run)
    torch.testing.assert_close(whole, ref, rtol=0, atol=1e-5)
    latents, gens = start_latents(pipe, seeds, 32, 32)
    head, early = denoise(pipe, latents, positive, negative, gens, ts[:2], **run)
    assert not torch.allclose(early, whole, atol=1e-2)  # a prediction made half-way is not the final sample
    keep = [0, 2]  # sample 1 is dropped half-way
    tail, _ = denoise(pipe, head[keep], positive[keep], negative[keep], [gens[i] for i in keep], ts[2:], **run)
    torch.testing.assert_close(tail, ref[keep], rtol=0, atol=1e-4)


def test_denoise_refuses_what_it_cannot_do(load_tiny_pipe, tiny_pipe, embeds):
    positive, _ = embeds
    latents, gens = start_latents(tiny_pipe, [1, 2, 3], 32, 32)
    tiny_pipe.scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="needs negative_embeds"):
        denoise(tiny_pipe, latents, positive, None, gens, tiny_pipe.scheduler.timesteps, guidance_scale=3.0)
    pipe = load_tiny_pipe(scheduler="EulerAncestralDiscreteScheduler")
    with pytest.raises(ValueError, match="keeps state between steps"):
        denoise(pipe, latents, positive, None, gens, pipe.scheduler.timesteps, guidance_scale=1.0)
