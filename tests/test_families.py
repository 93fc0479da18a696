"""Model families (raft_diffusion.diffusion.families): detection, per-seed sampling, losses, LoRA round trips.

Every family runs on a tiny pipeline built from configs (diffusion.families.tiny; SD: diffusion.tiny), on CPU
in fp32, 32 px images and 16 x 16 latents, 2 sampling steps, T5 sequences of 32 tokens.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families import LossSettings, detect_family, get_family
from raft_diffusion.diffusion.families.flow import (
    draw_flow_timesteps,
    flow_matching_loss,
    training_scheduler,
)
from raft_diffusion.diffusion.families.lora import matching_modules
from raft_diffusion.diffusion.families.sdxl import sdxl_time_ids

FAMILIES = ["sd", "sdxl", "sd3", "flux"]
PROMPTS = ["a photo of a red cat", "a painting of a blue boat by the sea"]
SIZE = 32
SEQ = 32  # T5 tokens for SD3/FLUX (the pipelines' defaults are 256/512)
GUIDANCE = {"sd": 4.0, "sdxl": 4.0, "sd3": 4.0, "flux": 3.5}  # FLUX: the distilled guidance embedding
# Same-seed latents alone vs in a batch vs the diffusers pipeline: CPU fp32 matmuls of other batch sizes
# round differently, so equality is up to this absolute tolerance. Measured maxima (latents up to |6.5|):
# SD 1.8e-5, SDXL 9e-6, SD3 2.1e-6, FLUX 3e-7; images from decode vs the pipeline's: 1.2e-6.
LATENT_ATOL = 1e-4


def _encode_kwargs(name: str) -> dict:
    return {"max_sequence_length": SEQ} if name in ("sd3", "flux") else {}


@pytest.fixture(scope="session")
def family_dirs(tiny_pipeline_dir):
    """A saved tiny pipeline folder per family (built once per session into the test cache)."""
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    return {"sd": tiny_pipeline_dir, **{name: tiny_pipeline(name) for name in ("sdxl", "sd3", "flux")}}


@pytest.fixture(scope="session")
def pipes(family_dirs):
    """One loaded pipeline per family, shared: tests must not modify them. The tiny pipelines save the same CLIP
    tokenizer as ``tokenizer`` and ``tokenizer_2``: it is read once for both (tokenizer loading dominates)."""
    from transformers import CLIPTokenizer

    loaded = {}
    for name in FAMILIES:
        extra = {}
        if name in ("sdxl", "sd3"):
            tokenizer = CLIPTokenizer.from_pretrained(str(family_dirs[name] / "tokenizer"))
            extra = {"tokenizer": tokenizer, "tokenizer_2": tokenizer}
        loaded[name] = get_family(name).load(family_dirs[name], device="cpu", **extra)
    return loaded


def _reload(name, family_dirs, pipes, **kwargs):
    """A fresh pipeline of the family from its folder (denoiser, VAE, scheduler read from disk); the frozen text
    encoders and tokenizers are the shared pipeline's, to save loading time."""
    shared = {k: v for k, v in pipes[name].components.items() if k.startswith(("text_encoder", "tokenizer"))}
    return get_family(name).load(family_dirs[name], device="cpu", **{**shared, **kwargs})


@pytest.fixture(scope="session")
def embeds(pipes):
    """PROMPTS encoded once per family (with the empty negative prompt where the family has CFG)."""
    return {n: get_family(n).encode_prompts(pipes[n], PROMPTS, do_cfg=n != "flux", **_encode_kwargs(n)) for n in FAMILIES}


# --- detection ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "class_name, family",
    [("StableDiffusionPipeline", "sd"), ("StableDiffusionXLPipeline", "sdxl"),
     ("StableDiffusion3Pipeline", "sd3"), ("FluxPipeline", "flux")],
)  # fmt: skip
def test_detect_family_reads_model_index(tmp_path, class_name, family):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.42"}))
    assert detect_family(tmp_path).name == family
    assert detect_family(str(tmp_path)).name == family
    assert detect_family(tmp_path, override=family).name == family  # model.family agreeing with the folder
    other = "sd3" if family != "sd3" else "flux"  # a model.family the folder contradicts is refused in one line
    with pytest.raises(UserError, match=rf"model.family is {other}, but .* holds a {class_name} \({family}\): leave model.family unset"):
        detect_family(tmp_path, override=other)
    assert detect_family(class_name).name == family and detect_family(family).name == family


def test_detect_family_of_saved_pipelines_and_objects(family_dirs, pipes):
    for name in FAMILIES:
        assert detect_family(family_dirs[name]).name == name
        assert detect_family(pipes[name]).name == name


def test_unsupported_pipeline_is_one_line_listing_the_supported(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(UserError) as err:
        detect_family(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "KandinskyV22Pipeline" in message
    for cls in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert cls in message
    with pytest.raises(UserError, match="unsupported model family 'sd4'.*FluxPipeline"):
        detect_family(tmp_path, override="sd4")
    with pytest.raises(UserError, match="no model_index.json"):
        detect_family(tmp_path / "..")


def test_load_refuses_a_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(UserError, match="has no model_index.json.*FluxPipeline"):
        get_family("flux").load(tmp_path, device="cpu")


def test_loss_settings_are_checked():
    with pytest.raises(UserError, match="unknown weighting_scheme 'lognorm'"):
        LossSettings(weighting_scheme="lognorm")
    with pytest.raises(UserError, match="timestep_range"):
        LossSettings(timestep_range=(500, 500))
    assert LossSettings(timestep_range=[0.0, 1000.0]).timestep_range == (0, 1000)


# --- prompt encoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, seq_len, dim, pooled",
    [("sd", 77, 32, None), ("sdxl", 77, 64, 32), ("sd3", 77 + SEQ, 64, 64), ("flux", SEQ, 64, 32)],
)
def test_encode_prompts_per_prompt_rows(pipes, embeds, name, seq_len, dim, pooled):
    family, pipe, emb = get_family(name), pipes[name], embeds[name]
    assert len(emb) == 2 and tuple(emb.per_prompt["prompt_embeds"].shape) == (2, seq_len, dim)
    if pooled is not None:
        assert tuple(emb.per_prompt["pooled_prompt_embeds"].shape) == (2, pooled)
    # one prompt at a time gives the same rows (a row depends only on its prompt), and indexing picks rows
    alone = family.encode_prompts(pipe, PROMPTS[::-1], do_cfg=False, batch_size=1, **_encode_kwargs(name))
    swapped = emb[[1, 0]]
    for key, value in alone.per_prompt.items():
        torch.testing.assert_close(value, swapped.per_prompt[key], atol=1e-6, rtol=0)
    assert not torch.allclose(emb.per_prompt["prompt_embeds"][0], emb.per_prompt["prompt_embeds"][1])
    if name == "flux":
        assert tuple(emb.shared["text_ids"].shape) == (SEQ, 3) and not any(k.startswith("negative") for k in emb.shared)
    else:
        assert emb.shared["negative_prompt_embeds"].shape == (1, seq_len, dim)


def test_sd3_without_t5_uses_zeros_for_its_part(family_dirs, pipes):
    family = get_family("sd3")
    pipe = _reload("sd3", family_dirs, pipes, drop_t5=True)
    assert pipe.text_encoder_3 is None
    emb = family.encode_prompts(pipe, PROMPTS, do_cfg=False, max_sequence_length=SEQ)
    clip_part, t5_part = emb.per_prompt["prompt_embeds"][:, :77], emb.per_prompt["prompt_embeds"][:, 77:]
    assert t5_part.shape == (2, SEQ, 64) and torch.count_nonzero(t5_part) == 0
    assert clip_part.abs().mean() > 0.1


def test_flux_refuses_a_negative_prompt(pipes):
    with pytest.raises(UserError, match="negative prompt"):
        get_family("flux").encode_prompts(pipes["flux"], PROMPTS, negative_prompt="blurry")


# --- sampling ----------------------------------------------------------------------------------------------


def _pipeline_latents(name, pipe, prompt, seed, output_type="latent", **kwargs):
    """What the diffusers pipeline itself returns for one prompt and a CPU generator seeded by ``seed``."""
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=2,
               guidance_scale=GUIDANCE[name], height=SIZE, width=SIZE, output_type=output_type, return_dict=False,
               **_encode_kwargs(name), **kwargs)[0]  # fmt: skip
    if name == "flux" and output_type == "latent":
        out = pipe._unpack_latents(out, SIZE, SIZE, pipe.vae_scale_factor)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_per_seed_sampling_batch_alone_and_pipeline_agree(pipes, embeds, name):
    family, pipe, emb = get_family(name), pipes[name], embeds[name]
    kwargs = {"steps": 2, "guidance": GUIDANCE[name], "height": SIZE, "width": SIZE}
    batch = family.sample(pipe, emb, [0, 1, 0], [11, 22, 33], **kwargs)
    assert tuple(batch.shape) == (3, 4, SIZE // 2, SIZE // 2) and batch.dtype == torch.float32
    alone = family.sample(pipe, emb, [1], [22], **kwargs)
    torch.testing.assert_close(alone[0], batch[1], atol=LATENT_ATOL, rtol=0)
    alone = family.sample(pipe, emb, [0], [33], **kwargs)
    torch.testing.assert_close(alone[0], batch[2], atol=LATENT_ATOL, rtol=0)
    reference = _pipeline_latents(name, pipe, PROMPTS[1], 22)
    torch.testing.assert_close(batch[1], reference[0], atol=LATENT_ATOL, rtol=0)
    assert (batch[0] - batch[2]).abs().mean() > 0.1  # same prompt, other seed: another sample
    # decoding: the pipeline's own images for that seed (output_type="pt": [B, 3, H, W] in [0, 1])
    images = family.decode(pipe, batch[1:2])
    assert tuple(images.shape) == (1, 3, SIZE, SIZE) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, _pipeline_latents(name, pipe, PROMPTS[1], 22, "pt"), atol=1e-4, rtol=0)


def test_encode_images_to_denoiser_space(pipes):
    family, pipe = get_family("sd3"), pipes["sd3"]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    latents = family.encode_images(pipe, images, [4, 5])
    with torch.no_grad():
        dist = pipe.vae.encode(images * 2 - 1).latent_dist
    eps = torch.stack([torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (4, 5)])
    by_hand = (dist.mean + dist.std * eps - 0.0609) * 1.5035  # the tiny SD3 VAE's shift and scaling factors
    torch.testing.assert_close(latents, by_hand)
    torch.testing.assert_close(family.encode_images(pipe, images[1:], [5])[0], latents[1], atol=1e-5, rtol=0)
    assert (latents[0] - latents[1]).abs().mean() > 0.1


# --- losses ------------------------------------------------------------------------------------------------


def test_stochastic_sampler_noise_follows_each_seed(pipes, embeds):
    """DDIM with eta = 1 draws fresh noise every step: from the sample's own generator, after its starting noise,
    as the pipeline does (a fresh generator would repeat the starting noise)."""
    family, pipe = get_family("sd"), pipes["sd"]
    kwargs = {"steps": 2, "guidance": GUIDANCE["sd"], "height": SIZE, "width": SIZE, "eta": 1.0}
    batch = family.sample(pipe, embeds["sd"], [0, 1], [7, 8], **kwargs)
    torch.testing.assert_close(batch[1], _pipeline_latents("sd", pipe, PROMPTS[1], 8, eta=1.0)[0],
                               atol=LATENT_ATOL, rtol=0)  # fmt: skip
    alone = family.sample(pipe, embeds["sd"], [1], [8], **kwargs)
    torch.testing.assert_close(alone[0], batch[1], atol=LATENT_ATOL, rtol=0)
    deterministic = family.sample(pipe, embeds["sd"], [1], [8], **{**kwargs, "eta": 0.0})
    assert (deterministic[0] - batch[1]).abs().mean() > 0.01  # the sampler noise matters (measured 0.04)
    # (reusing fresh generators for the sampler noise instead puts the result 0.17 away from the pipeline's)


def test_flow_matching_loss_numbers():
    x0, noise, pred = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    sigmas = torch.tensor([0.5, 0.25])
    # target = noise - x0 = -1, so (pred - target)^2 = 1 everywhere; the weighting multiplies it
    torch.testing.assert_close(flow_matching_loss(pred, x0, noise, sigmas, "logit_normal"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(flow_matching_loss(pred, x0, noise, sigmas, "sigma_sqrt"), torch.tensor([4.0, 16.0]))
    cosmap = 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    torch.testing.assert_close(flow_matching_loss(pred, x0, noise, sigmas, "cosmap"), cosmap)


def _by_hand_flow_loss(name, pipe, x0, noise, t, emb, weighting):
    """(1 - s) x0 + s noise into the transformer, MSE against noise - x0, weighted: written out for one family."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    s = t / 1000
    xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
    n = x0.shape[0]
    with torch.no_grad():
        if name == "sd3":
            pred = pipe.transformer(
                hidden_states=xt,
                timestep=t,
                encoder_hidden_states=emb.per_prompt["prompt_embeds"],
                pooled_projections=emb.per_prompt["pooled_prompt_embeds"],
                return_dict=False,
            )[0]
        else:
            packed = FluxPipeline._pack_latents(xt, n, 4, 16, 16)
            ids = FluxPipeline._prepare_latent_image_ids(n, 8, 8, "cpu", torch.float32)
            pred = pipe.transformer(
                hidden_states=packed,
                timestep=t / 1000,
                guidance=torch.full((n,), 3.5),
                pooled_projections=emb.per_prompt["pooled_prompt_embeds"],
                encoder_hidden_states=emb.per_prompt["prompt_embeds"],
                txt_ids=emb.shared["text_ids"],
                img_ids=ids,
                return_dict=False,
            )[0]
            pred = FluxPipeline._unpack_latents(pred, 32, 32, 2)
    w = compute_loss_weighting_for_sd3(weighting, s).view(-1, 1, 1, 1)
    return (w * (pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("weighting", ["logit_normal", "cosmap"])
def test_flow_training_loss_equals_by_hand(pipes, embeds, name, weighting):
    family, pipe, emb = get_family(name), pipes[name], embeds[name]
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([250.0, 800.0])
    settings = LossSettings(weighting_scheme=weighting)
    with torch.no_grad():
        loss = family.training_loss(pipe, pipe.transformer, x0, emb, [0, 1], noise=noise, timesteps=t,
                                    settings=settings)  # fmt: skip
    expected = _by_hand_flow_loss(name, pipe, x0, noise, t, emb[[0, 1]], weighting)
    assert loss.shape == (2,) and loss.min() > 0.1
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)
    if name == "flux":  # the guidance embedding is part of the conditioning
        with torch.no_grad():
            other = family.training_loss(
                pipe,
                pipe.transformer,
                x0,
                emb,
                [0, 1],
                noise=noise,
                timesteps=t,
                settings=LossSettings(weighting_scheme=weighting, flux_guidance=1.0),
            )
        assert (other - loss).abs().max() > 1e-4


def test_logit_normal_timestep_density_has_the_configured_logit_moments(pipes):
    from diffusers import FlowMatchEulerDiscreteScheduler

    n, settings = 20000, LossSettings(logit_mean=0.5, logit_std=0.8)
    # unshifted schedule: sigma = 1 - index / 1000 and u in [index, index + 1) / 1000
    unshifted = FlowMatchEulerDiscreteScheduler()
    timesteps, sigmas = draw_flow_timesteps(unshifted, n, settings, torch.Generator().manual_seed(0))
    u = (1 - sigmas.double()) + 0.0005
    logit = torch.log(u / (1 - u))
    assert abs(logit.mean().item() - 0.5) < 0.03 and abs(logit.std().item() - 0.8) < 0.03
    torch.testing.assert_close(timesteps, sigmas * 1000)
    # SD3's shift 3: sigma = 3 s / (1 + 2 s) of the unshifted s, so the same draws come out shifted
    scheduler = training_scheduler(pipes["sd3"])
    _, shifted = draw_flow_timesteps(scheduler, n, settings, torch.Generator().manual_seed(0))
    s = shifted.double() / (3 - 2 * shifted.double())
    torch.testing.assert_close(s, sigmas.double(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux"])
def test_timestep_range_bounds_the_draws(pipes, name):
    family = get_family(name)
    t, sigmas = family.draw_timesteps(pipes[name], 4000, LossSettings(timestep_range=(200, 400)),
                                      torch.Generator().manual_seed(1))  # fmt: skip
    scaled = t.double() if sigmas is None else sigmas.double() * 1000  # SD: t itself; flow: sigma * 1000
    assert scaled.min() >= 200 and scaled.max() < 400
    assert scaled.min() < 215 and scaled.max() > 385  # and it covers the range


@pytest.mark.parametrize("height, width", [(32, 32), (1024, 768)])
def test_sdxl_time_ids_match_the_pipeline(pipes, height, width):
    pipe = pipes["sdxl"]
    ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)  # fmt: skip
    torch.testing.assert_close(sdxl_time_ids(height, width)[None], ids, rtol=0, atol=0)
    assert sdxl_time_ids(height, width).tolist() == [height, width, 0, 0, height, width]


@pytest.mark.parametrize("name, prediction_type", [("sd", "epsilon"), ("sd", "v_prediction"), ("sdxl", "epsilon")])
def test_unet_training_loss_equals_by_hand(pipes, embeds, name, prediction_type):
    family, shared, emb = get_family(name), pipes[name], embeds[name]
    # the same modules with a scheduler of the given prediction type (the shared pipeline stays as it is)
    scheduler = type(shared.scheduler).from_config(shared.scheduler.config, prediction_type=prediction_type)
    pipe = type(shared)(**{**shared.components, "scheduler": scheduler})
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([100, 700])
    with torch.no_grad():
        loss = family.training_loss(pipe, pipe.unet, x0, emb, [1, 0], noise=noise, timesteps=t)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2  # scaled_linear
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * x0
    kwargs = {}
    if name == "sdxl":
        ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
        kwargs["added_cond_kwargs"] = {"text_embeds": emb.per_prompt["pooled_prompt_embeds"][[1, 0]], "time_ids": ids}
    with torch.no_grad():
        pred = pipe.unet(noisy, t, encoder_hidden_states=emb.per_prompt["prompt_embeds"][[1, 0]], **kwargs).sample
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-5)
    assert loss.min() > 0.05


def test_training_loss_draws_follow_the_generator(pipes, embeds):
    family, pipe = get_family("sd3"), pipes["sd3"]
    x0 = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = (family.training_loss(pipe, pipe.transformer, x0, embeds["sd3"], [0, 1, 0],
                                        generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8))  # fmt: skip
    assert torch.equal(a, b) and not torch.allclose(a, c)


# --- LoRA --------------------------------------------------------------------------------------------------


def test_default_lora_targets_follow_diffusers_scripts(pipes):
    sd3 = matching_modules(pipes["sd3"].transformer, get_family("sd3").default_lora_targets(pipes["sd3"].transformer))
    assert "transformer_blocks.0.attn.add_q_proj" in sd3 and "transformer_blocks.1.attn.to_out.0" in sd3
    assert not any(".attn2." in m for m in sd3)  # SD3.5's second (image-only) attention is not a default target
    assert len(sd3) == 2 * 8 - 1  # 8 per joint block; the last block has no to_add_out (context_pre_only)
    flux_targets = get_family("flux").default_lora_targets(pipes["flux"].transformer)
    flux = matching_modules(pipes["flux"].transformer, flux_targets)
    assert "single_transformer_blocks.0.attn.to_q" in flux and "transformer_blocks.0.ff_context.net.2" in flux
    assert len(flux) == 12 + 3  # 12 in the double block, to_q/k/v in the single one
    sdxl = matching_modules(pipes["sdxl"].unet, get_family("sdxl").default_lora_targets(pipes["sdxl"].unet))
    # attn1 + attn2 of 8 transformer blocks: 2 layers in the one down attention, 2 in the mid block, 2 x 2 up
    assert len(sdxl) == 4 * 2 * 8 and sum(".attn2." in m for m in sdxl) == 4 * 8


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_trains_saves_and_reloads_in_a_fresh_pipeline(family_dirs, pipes, embeds, tmp_path, name):
    family = get_family(name)
    pipe = _reload(name, family_dirs, pipes)
    denoiser = family.denoiser(pipe)
    emb = embeds[name]
    count = family.add_lora(denoiser, rank=4, init_seed=0)
    layers = dict(denoiser.named_modules())
    targets = matching_modules(denoiser, family.default_lora_targets(denoiser))
    expected = sum(4 * (layers[m].base_layer.in_features + layers[m].base_layer.out_features) for m in targets)
    assert count == expected > 0
    sample = {"steps": 2, "guidance": GUIDANCE[name], "height": SIZE, "width": SIZE}
    before = family.sample(pipe, emb, [0, 1], [5, 6], **sample)
    # a few optimizer steps on fixed latents
    x0 = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    params = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    denoiser.train()
    for _ in range(3):
        loss = family.training_loss(pipe, denoiser, x0, emb, [0, 1, 0, 1], generator=gen).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    denoiser.eval()
    assert math.isfinite(loss.item())
    after = family.sample(pipe, emb, [0, 1], [5, 6], **sample)
    assert (after - before).abs().max() > 1e-3  # the LoRA changed the model
    out = family.save_lora(pipe, denoiser, tmp_path / "lora")
    from safetensors.torch import load_file

    keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert len(keys) == 2 * len(targets) and all(k.startswith(family.denoiser_attr + ".") for k in keys)
    fresh = _reload(name, family_dirs, pipes)
    unchanged = family.sample(fresh, emb, [0, 1], [5, 6], **sample)
    torch.testing.assert_close(unchanged, before, atol=LATENT_ATOL, rtol=0)
    fresh.load_lora_weights(str(out))
    reloaded = family.sample(fresh, emb, [0, 1], [5, 6], **sample)
    assert torch.equal(reloaded, after)  # bit-equal on CPU: the same peft layers and weights
    # resume: the same adapter (another init) on a fresh denoiser, then the saved tensors
    resumed = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(resumed), rank=4, init_seed=1)
    family.load_lora(family.denoiser(resumed), out)
    assert torch.equal(family.sample(resumed, emb, [0, 1], [5, 6], **sample), after)
    family.denoiser(resumed).add_adapter(_lora_config(8, family.default_lora_targets(family.denoiser(resumed))), "r8")
    with pytest.raises(UserError, match="does not fit the adapter.*same lora settings"):
        family.load_lora(family.denoiser(resumed), out, adapter_name="r8")


def _lora_config(rank, targets):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)


# --- memory arithmetic -----------------------------------------------------------------------------------------


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = self.up(x)  # saves x
        q = h.view(2, 4, 4, 4)  # [batch, heads, tokens, head dim]
        a = torch.nn.functional.scaled_dot_product_attention(q, q, q)  # fused: q (= h), output, log-sum-exp
        return self.down(torch.nn.functional.gelu(a.reshape(2, 4, 16)))  # gelu saves a view of a; down its output


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])
        self.out = torch.nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_saved_activation_accounting_on_meta():
    from raft_diffusion.diffusion.families.memory import saved_activation_bytes

    with torch.device("meta"):
        model = _Toy()
    x = torch.empty(2, 4, 8, device="meta")
    report = saved_activation_bytes(model, lambda: model(x), ["blocks.0", "blocks.1"])
    f = 4  # fp32 bytes
    # per block: its input [2,4,8]; the up output [2,4,16] once (SDPA's q, k and v are views of it);
    # SDPA output [2,4,4,4] (gelu's input is a view of it) and log-sum-exp [2,4,4]; gelu output [2,4,16]
    block = (64 + 128 + 128 + 32 + 128) * f
    assert report.per_block == {"blocks.0": block, "blocks.1": block}
    assert report.outside_blocks == 64 * f  # the last Linear's input
    assert report.block_inputs == 2 * 64 * f
    assert report.with_checkpointing == 64 * f + 2 * 64 * f + block
    with pytest.raises(ValueError, match="meta device"):
        saved_activation_bytes(torch.nn.Linear(2, 2), lambda: None, [])


# --- the negative-aware loss (ranking.negative_k, train.nft_beta) ---------------------------------------------


def _family_prediction(name, family, pipe, denoiser, noisy, t, emb):
    """The denoiser's output for a batch: the flow velocity (SD3/FLUX, through the family's call) or SDXL's epsilon."""
    if name == "sdxl":
        n = noisy.shape[0]
        ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * n)
        added = {"text_embeds": emb.per_prompt["pooled_prompt_embeds"], "time_ids": ids}
        return denoiser(noisy, t, encoder_hidden_states=emb.per_prompt["prompt_embeds"], added_cond_kwargs=added).sample
    return family._predict(pipe, denoiser, noisy, t, emb, LossSettings())


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_negative_aware_loss_by_hand_for_the_family(family_dirs, pipes, embeds, name):
    """Two steps of train_unet with negatives on each family, by hand: step 2's loss is mean ||(1-b) v_ref + b v -
    y||^2 over the kept rows + lam * mean ||(1+b) v_ref - b v - y||^2 over the negatives, v the family's prediction
    (SDXL: epsilon, y the noise; SD3/FLUX: the velocity, y = noise - x0, on (1 - s) x0 + s noise with s = t / 1000)
    after one AdamW step, v_ref the weights at the start; the draws: kept rows from the seed's generator, negatives
    from their own, timesteps from the family's density."""
    from diffusers import DDPMScheduler

    from raft_diffusion.diffusion.finetune import train_unet

    family, emb = get_family(name), embeds[name]
    g = torch.Generator().manual_seed(4)
    latents, neg_latents = torch.randn(4, 4, 16, 16, generator=g), torch.randn(4, 4, 16, 16, generator=g)
    kept_emb, neg_emb = emb[[0, 1, 0, 1]], emb[[1, 1, 0, 0]]
    beta, lam, lr, seed = 0.5, 0.7, 1e-2, 3
    trained = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(trained), rank=4, init_seed=0)
    start = {k: v.detach().clone() for k, v in family.denoiser(trained).named_parameters() if v.requires_grad}
    kw = dict(steps=2, batch_size=4, learning_rate=lr, seed=seed, max_grad_norm=None, progress=False, family=family, loss_settings=LossSettings())
    stats = train_unet(trained, latents, kept_emb, **kw, negative_latents=neg_latents, negative_embeds=neg_emb, negative_weight=lam, nft_beta=beta)
    assert stats["num_negative_rows"] == 4

    def draws(generator):
        return [
            (
                torch.randperm(4, generator=generator),
                torch.randn((4, 4, 16, 16), generator=generator),
                family.draw_timesteps(trained, 4, LossSettings(), generator)[0],
            )
            for _ in range(2)
        ]

    pos = draws(torch.Generator().manual_seed(seed))
    neg = draws(torch.Generator().manual_seed((seed * 1_000_003 + 7_919) % 2**63))
    hand = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(hand), rank=4, init_seed=0)
    unet = family.denoiser(hand)
    ddpm = DDPMScheduler.from_config(hand.scheduler.config) if name == "sdxl" else None

    def predict(x0, e, draw, grad):
        idx, noise, t = draw
        x0 = x0[idx]
        if ddpm is not None:
            noisy, target = ddpm.add_noise(x0, noise, t), noise
        else:
            s = (t / 1000).view(-1, 1, 1, 1)
            noisy, target = (1 - s) * x0 + s * noise, noise - x0
        with torch.set_grad_enabled(grad):
            return _family_prediction(name, family, hand, unet, noisy, t, e[idx]), target

    def loss(refs, step):
        v, y = predict(latents, kept_emb, pos[step], True)
        lp = (((1 - beta) * refs[0] + beta * v - y) ** 2).flatten(1).mean(1).mean()
        v, y = predict(neg_latents, neg_emb, neg[step], True)
        ln = (((1 + beta) * refs[1] - beta * v - y) ** 2).flatten(1).mean(1).mean()
        return lp + lam * ln

    unet.eval()
    refs = [(predict(latents, kept_emb, pos[s], False)[0], predict(neg_latents, neg_emb, neg[s], False)[0]) for s in range(2)]
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    unet.train()
    first = loss(refs[0], 0)
    first.backward()
    opt.step()
    opt.zero_grad()
    second = loss(refs[1], 1)
    assert stats["loss_last"] == pytest.approx(second.item(), rel=1e-5)
    assert stats["loss_mean"] == pytest.approx((first.item() + second.item()) / 2, rel=1e-5)
    with torch.no_grad():  # v_ref is the start's, not the current weights': with v_ref = v the loss differs
        now = (predict(latents, kept_emb, pos[1], False)[0], predict(neg_latents, neg_emb, neg[1], False)[0])
    assert second.item() != pytest.approx(loss(now, 1).item(), rel=1e-4)
    second.backward()  # and the weights after the second step are those of train_unet
    opt.step()
    after = {k: v for k, v in family.denoiser(trained).named_parameters() if v.requires_grad}
    assert all(torch.allclose(after[k], p, rtol=0, atol=1e-5) for k, p in zip(start, params))
    assert any(not torch.allclose(after[k], start[k], rtol=0, atol=1e-3) for k in start)


# --- caption dropout (train.empty_prompt_ratio) ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_caption_dropout_loss_by_hand_for_the_family(family_dirs, pipes, embeds, name):
    """One step of train_unet with empty_prompt_ratio 0.5, by hand: the step's loss is the mean of ||v - y||^2 over
    its rows, each row conditioned on its own prompt unless its coin (drawn after the batch's timesteps) dropped it,
    then on the family's empty prompt; the other draws are those of a run without dropout."""
    from diffusers import DDPMScheduler

    from raft_diffusion.diffusion.finetune import train_unet

    family, emb = get_family(name), embeds[name]
    empty = family.encode_prompts(pipes[name], [family.empty_prompt], do_cfg=False, **_encode_kwargs(name))
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(4, 4, 16, 16, generator=g)
    kept_emb, seed, ratio = emb[[0, 1, 0, 1]], 5, 0.5
    trained = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(trained), rank=4, init_seed=0)
    kw = dict(steps=1, batch_size=4, learning_rate=1e-2, seed=seed, progress=False, family=family, loss_settings=LossSettings())
    dropped = train_unet(trained, latents, kept_emb, **kw, empty_prompt_ratio=ratio, empty_embeds=empty)["loss_mean"]

    gen = torch.Generator().manual_seed(seed)
    idx, noise = torch.randperm(4, generator=gen), torch.randn((4, 4, 16, 16), generator=gen)
    t = family.draw_timesteps(pipes[name], 4, LossSettings(), gen)[0]
    drop = torch.rand(4, generator=gen) < ratio
    assert 0 < int(drop.sum()) < 4  # some rows dropped, some not
    hand = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(hand), rank=4, init_seed=0)
    unet = family.denoiser(hand).eval()
    x0 = latents[idx]
    if name == "sdxl":
        noisy, target = DDPMScheduler.from_config(hand.scheduler.config).add_noise(x0, noise, t), noise
    else:
        s = (t / 1000).view(-1, 1, 1, 1)
        noisy, target = (1 - s) * x0 + s * noise, noise - x0
    rows = kept_emb.concat(empty)[torch.where(drop, 4, idx)]
    with torch.no_grad():
        by_hand = ((_family_prediction(name, family, hand, unet, noisy, t, rows) - target) ** 2).flatten(1).mean(1).mean()
        undropped = ((_family_prediction(name, family, hand, unet, noisy, t, kept_emb[idx]) - target) ** 2).flatten(1).mean(1).mean()
    assert dropped == pytest.approx(by_hand.item(), rel=1e-5, abs=1e-7)
    assert abs(by_hand.item() - undropped.item()) > 1e-4  # the empty prompt's rows change the loss


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_timestep_ranges_cycle_over_the_steps_for_the_family(family_dirs, pipes, embeds, name, monkeypatch):
    """train.timestep_ranges on a family: step s draws its timesteps from range s mod n (the flow family's density
    laid over it), and one range is loss_settings.timestep_range bit for bit."""
    import dataclasses

    from raft_diffusion.diffusion.finetune import train_unet

    family, emb = get_family(name), embeds[name]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(batch_size=2, learning_rate=1e-3, seed=2, progress=False, family=family)
    drawn = []
    original = type(family).draw_timesteps

    def spy(self, pipe, batch_size, settings, generator=None):
        t, s = original(self, pipe, batch_size, settings, generator)
        drawn.append((settings.timestep_range, t.clone()))
        return t, s

    monkeypatch.setattr(type(family), "draw_timesteps", spy)
    trained = _reload(name, family_dirs, pipes)
    family.add_lora(family.denoiser(trained), rank=4, init_seed=0)
    train_unet(trained, latents, emb[[0, 1]], steps=4, loss_settings=LossSettings(), timestep_ranges=[(900, 1000), (0, 100)], **kw)
    assert [r for r, _ in drawn] == [(900, 1000), (0, 100)] * 2
    assert all(((lo <= t) & (t < hi)).all() for (lo, hi), t in drawn)
    one = []
    for settings, ranges in ((LossSettings(), [(600, 800)]), (dataclasses.replace(LossSettings(), timestep_range=(600, 800)), None)):
        pipe = _reload(name, family_dirs, pipes)
        family.add_lora(family.denoiser(pipe), rank=4, init_seed=0)
        one.append(train_unet(pipe, latents, emb[[0, 1]], steps=2, loss_settings=settings, timestep_ranges=ranges, **kw)["loss_mean"])
    assert one[0] == one[1]
