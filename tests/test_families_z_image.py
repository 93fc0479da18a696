"""The seventh family, Z-Image (``z-image``, ZImagePipeline), through the family interface alone.

A tiny pipeline built from configs (diffusion.families.tiny: a two-layer Qwen3 of width 16 with the Qwen2-style BPE
tokenizer trained on the fly, a two-level VAE with a shift and a scale, a single-stream DiT with one noise and one
context refiner), on CPU in fp32: 32 px images, 16 x 16 x 4 latents in 2x2 patches, 2 sampling steps.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from family_checks import (
    align_keeps_the_top_k_and_the_lora_reloads,
    family_is_detected_everywhere,
    fresh_pipeline,
    lora_trains_saves_and_reloads,
    merged_export_gives_the_loras_prediction,
    tiny_align_config,
    tiny_family_fixtures,
)

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families import LossSettings, get_family
from raft_diffusion.diffusion.families.lora import matching_modules

NAME = "z-image"
# of different lengths: the first is padded to the second's length in the embeddings, and carries a mask
PROMPTS = ["a photo of a red cat", "a painting of a blue boat by the sea at night"]
SIZE, GUIDANCE = 32, 3.0  # the pipeline is called with guidance_scale 2 (its CFG is pos + g' (pos - neg))
# Same seed alone vs in a batch vs the diffusers pipeline: CPU fp32 matmuls of other batch sizes round differently;
# measured maxima: 1.7e-6 batch vs alone and vs the pipeline's latents.
ATOL = 1e-5


folder, pipe = tiny_family_fixtures(NAME)


def _fresh(folder, pipe):
    return fresh_pipeline(NAME, folder, pipe)


@pytest.fixture(scope="module")
def embeds(pipe):
    return get_family(NAME).encode_prompts(pipe, PROMPTS, do_cfg=True)


def _sample(pipe, embeds, prompt_indices, seeds, guidance=GUIDANCE):
    return get_family(NAME).sample(pipe, embeds, prompt_indices, seeds, steps=2, guidance=guidance, height=SIZE,
                                   width=SIZE)  # fmt: skip


def _pipeline_call(pipe, prompt, seed, guidance_scale, output_type="latent"):
    """The pipeline's own call for one prompt and a generator seeded ``seed`` (its own guidance_scale convention)."""
    return pipe(prompt=prompt, num_inference_steps=2, height=SIZE, width=SIZE, guidance_scale=guidance_scale,
                generator=torch.Generator().manual_seed(seed), output_type=output_type, return_dict=False)[0]  # fmt: skip


def test_detection_from_model_index_config_and_shortcut(tmp_path, folder, pipe):
    family_is_detected_everywhere(NAME, folder, pipe, tmp_path)


def test_encode_prompts_pads_rows_with_a_mask_and_rows_are_per_prompt(pipe, embeds):
    family = get_family(NAME)
    emb, mask = embeds.per_prompt["prompt_embeds"], embeds.per_prompt["prompt_embeds_mask"]
    # the pipeline's own encoding: a list with each prompt's tokens only
    own, _ = pipe.encode_prompt(prompt=list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    lengths = [e.shape[0] for e in own]
    assert lengths[0] < lengths[1] == emb.shape[1] and emb.shape[2] == 16
    assert mask.sum(1).tolist() == lengths and (emb[0, lengths[0] :] == 0).all()
    for i in range(2):
        torch.testing.assert_close(emb[i, : lengths[i]], own[i], atol=1e-6, rtol=0)
    one = family.encode_prompts(pipe, PROMPTS[::-1], do_cfg=False, batch_size=1)
    torch.testing.assert_close(one.per_prompt["prompt_embeds"], embeds[[1, 0]].per_prompt["prompt_embeds"], atol=1e-6, rtol=0)
    assert set(embeds.shared) == {"negative_prompt_embeds", "negative_prompt_embeds_mask"} and not one.shared
    neg = pipe.encode_prompt(prompt=[""], device="cpu", do_classifier_free_guidance=False)[0][0]
    torch.testing.assert_close(embeds.shared["negative_prompt_embeds"][0], neg, atol=1e-6, rtol=0)


def test_per_seed_sampling_alone_in_a_batch_and_the_pipeline_agree(pipe, embeds):
    family = get_family(NAME)
    assert family.latent_shape(pipe, SIZE, SIZE) == (4, 16, 16)
    with pytest.raises(UserError, match="multiples of 4"):
        family.latent_shape(pipe, 34, 32)
    batch = _sample(pipe, embeds, [0, 1, 0], [11, 22, 33])
    assert tuple(batch.shape) == (3, 4, 16, 16) and batch.dtype == torch.float32
    torch.testing.assert_close(_sample(pipe, embeds, [1], [22])[0], batch[1], atol=ATOL, rtol=0)
    assert (batch[0] - batch[2]).abs().mean() > 0.1  # same prompt, other seed
    # guidance 3 is the pipeline's guidance_scale 2; the padded prompt as well as the longest
    for row, index, seed in ((1, 1, 22), (2, 0, 33)):
        torch.testing.assert_close(batch[row : row + 1], _pipeline_call(pipe, PROMPTS[index], seed, GUIDANCE - 1), atol=ATOL, rtol=0)
    assert (batch[1:2] - _pipeline_call(pipe, PROMPTS[1], 22, GUIDANCE)).abs().max() > 1e-3  # the other convention differs
    # without guidance: the pipeline's guidance_scale 0
    torch.testing.assert_close(_sample(pipe, embeds, [0], [7], guidance=1.0), _pipeline_call(pipe, PROMPTS[0], 7, 0.0), atol=ATOL, rtol=0)
    images = family.decode(pipe, batch[1:2])
    assert tuple(images.shape) == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(images, _pipeline_call(pipe, PROMPTS[1], 22, GUIDANCE - 1, output_type="pt"), atol=ATOL, rtol=0)


def test_training_loss_equals_a_by_hand_computation(pipe, embeds):
    """x_t = (1 - s) x_0 + s n; the transformer takes one [C, 1, h, w] latent and one caption (its own tokens) per
    sample and 1 - s as its time, and predicts x_0 - n; the loss is the MSE of its negation to n - x_0."""
    family = get_family(NAME)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([750.0, 200.0])
    loss = family.training_loss(pipe, pipe.transformer, x0, embeds, [1, 0], noise=noise, timesteps=t)
    s = (t / 1000).view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    lengths = embeds.per_prompt["prompt_embeds_mask"].sum(1).tolist()
    captions = [embeds.per_prompt["prompt_embeds"][1, : lengths[1]], embeds.per_prompt["prompt_embeds"][0, : lengths[0]]]
    with torch.no_grad():
        out = pipe.transformer([xt[0, :, None], xt[1, :, None]], 1 - t / 1000, captions, return_dict=False)[0]
    pred = -torch.stack([o[:, 0] for o in out])
    by_hand = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-5)
    assert loss.min() > 0.5 and (loss[0] - loss[1]).abs() > 1e-3
    # the padding is cut off: the shorter prompt's padded row would give another output
    with torch.no_grad():
        padded = pipe.transformer([xt[1, :, None]], 1 - t[1:] / 1000, [embeds.per_prompt["prompt_embeds"][0]], return_dict=False)[0]
    assert (padded[0] - out[1]).abs().max() > 1e-4
    timesteps, sigmas = family.draw_timesteps(pipe, 4, LossSettings(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(timesteps, sigmas * 1000)


def test_lora_trains_saves_and_a_fresh_pipeline_reproduces_it(tmp_path, folder, pipe, embeds):
    family = get_family(NAME)
    trained = _fresh(folder, pipe)
    denoiser = trained.transformer
    targets = family.default_lora_targets(denoiser)
    assert targets == ["to_k", "to_q", "to_v", "to_out.0"]
    names = matching_modules(denoiser, targets)
    # two main layers, one noise and one context refiner: 4 attentions x q, k, v, out
    assert len(names) == 4 * 4 and {n.split(".")[0] for n in names} == {"layers", "noise_refiner", "context_refiner"}
    assert family.add_lora(denoiser, rank=4, targets=targets) == 4 * 4 * 4 * (32 + 32)  # attentions x modules x r x (in + out)
    # the tiny DiT's attention LoRA lowers the loss less than the other families' (by 14%: 2.40 -> 2.07)
    lora_trains_saves_and_reloads(family, trained, lambda: _fresh(folder, pipe), embeds, _sample, (4, 16, 16), tmp_path, ATOL, drop=0.9)


CONFIG = tiny_align_config("tiny-z-image")


def test_align_two_stages_keep_the_top_k_and_the_lora_reloads(tmp_path, folder):
    align_keeps_the_top_k_and_the_lora_reloads(NAME, folder, CONFIG, tmp_path)


def test_export_merges_and_kohya_is_refused_in_one_line(tmp_path, folder, pipe, embeds, capsys):
    from diffusers import ZImageTransformer2DModel

    from raft_diffusion.cli import main

    lora = merged_export_gives_the_loras_prediction(NAME, ZImageTransformer2DModel, folder, pipe, embeds, (4, 16, 16), tmp_path)
    capsys.readouterr()  # without --base the family is told from the LoRA's module names (the refiners')
    assert main(["export", str(lora), "--format", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == "error: no kohya naming for model family 'z-image': use --format diffusers"


def test_planner_runs_on_the_tiny_pipeline(tmp_path, capsys):
    from raft_diffusion.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    capsys.readouterr()
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(z-image)" in out and "peak:" in out, out


@pytest.mark.slow  # about a minute: Qwen3-4B and the 6.15B DiT traced on the meta device
def test_planner_on_the_published_configs_gives_the_presets_figures(tmp_path):
    """configs/z_image_aesthetic_1024.yaml planned on Z-Image's published configs: the weights are the parameter
    counts at 2 bytes (the published safetensors indexes' total sizes: 12,309,817,472 and 8,044,936,192 bytes), and
    the peaks are the preset's header figures."""
    from family_checks import preset_peaks_on_published_configs

    peaks = preset_peaks_on_published_configs(NAME, "z_image_aesthetic_1024", tmp_path, 6_154_908_736, 4_022_468_096, 16_711_680)
    assert 23.7 < peaks["none"] < 24.2 and 21.4 < peaks["phases"] < 21.9, peaks
