"""The eighth family, FLUX.2 [dev] (``flux2``, Flux2Pipeline), through the family interface alone.

A tiny pipeline built from configs (diffusion.families.tiny: a 30-layer Mistral-3 of width 16 with the Qwen2-style BPE
tokenizer trained on the fly and a chat template for typed message parts, the FLUX.2 VAE with batch-norm statistics,
double + single stream blocks with the guidance embedding), on CPU in fp32: 32 px images, 8 x 8 x 16 denoiser-space
patches, 2 sampling steps, 32 text tokens.
"""

from __future__ import annotations

import pytest
import torch
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

NAME = "flux2"
PROMPTS = ["a photo of a red cat", "a painting of a blue boat by the sea"]
SIZE, SEQ, GUIDANCE = 32, 32, 3.5
# Same seed alone vs in a batch vs the diffusers pipeline: measured maxima 2.4e-7 (latents), 3.6e-7 (images).
ATOL = 1e-5

folder, pipe = tiny_family_fixtures(NAME)


def _fresh(folder, pipe):
    return fresh_pipeline(NAME, folder, pipe)


@pytest.fixture(scope="module")
def embeds(pipe):
    return get_family(NAME).encode_prompts(pipe, PROMPTS, max_sequence_length=SEQ)


def _sample(pipe, embeds, prompt_indices, seeds, guidance=GUIDANCE):
    return get_family(NAME).sample(pipe, embeds, prompt_indices, seeds, steps=2, guidance=guidance, height=SIZE, width=SIZE,
                                   max_sequence_length=SEQ)  # fmt: skip


def _pipeline_call(pipe, prompt, seed, guidance=GUIDANCE, output_type="latent"):
    out = pipe(prompt=prompt, num_inference_steps=2, guidance_scale=guidance, height=SIZE, width=SIZE, max_sequence_length=SEQ,
               generator=torch.Generator().manual_seed(seed), output_type=output_type, return_dict=False)[0]  # fmt: skip
    # the latent output is the packed, normalised tokens [1, 64, 16], row-major
    return out.view(1, 8, 8, 16).permute(0, 3, 1, 2) if output_type == "latent" else out


def test_detection_from_model_index_config_and_shortcut(tmp_path, folder, pipe):
    family_is_detected_everywhere(NAME, folder, pipe, tmp_path, other="flux2-klein")


def test_encode_prompts_rows_are_per_prompt_and_a_negative_prompt_is_refused(pipe, embeds):
    family = get_family(NAME)
    assert tuple(embeds.per_prompt["prompt_embeds"].shape) == (2, SEQ, 3 * 16) and not embeds.shared
    own, _ = pipe.encode_prompt(prompt=list(PROMPTS), device="cpu", max_sequence_length=SEQ)
    torch.testing.assert_close(embeds.per_prompt["prompt_embeds"], own, atol=1e-6, rtol=0)
    alone = family.encode_prompts(pipe, PROMPTS[::-1], batch_size=1, max_sequence_length=SEQ)
    torch.testing.assert_close(alone.per_prompt["prompt_embeds"], embeds[[1, 0]].per_prompt["prompt_embeds"], atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="guidance-distilled and takes no negative prompt"):
        family.encode_prompts(pipe, PROMPTS, negative_prompt="blurry", max_sequence_length=SEQ)


def test_per_seed_sampling_alone_in_a_batch_and_the_pipeline_agree(pipe, embeds):
    family = get_family(NAME)
    assert family.latent_shape(pipe, SIZE, SIZE) == (16, 8, 8)
    batch = _sample(pipe, embeds, [0, 1, 0], [11, 22, 33])
    assert tuple(batch.shape) == (3, 16, 8, 8) and batch.dtype == torch.float32
    torch.testing.assert_close(_sample(pipe, embeds, [1], [22])[0], batch[1], atol=ATOL, rtol=0)
    assert (batch[0] - batch[2]).abs().mean() > 0.1  # same prompt, other seed
    torch.testing.assert_close(batch[1:2], _pipeline_call(pipe, PROMPTS[1], 22), atol=ATOL, rtol=0)
    torch.testing.assert_close(batch[2:3], _pipeline_call(pipe, PROMPTS[0], 33), atol=ATOL, rtol=0)
    # the guidance is the transformer's embedding: another value gives another sample
    assert (_sample(pipe, embeds, [1], [22], guidance=1.5) - batch[1:2]).abs().max() > 1e-3
    images = family.decode(pipe, batch[1:2])
    torch.testing.assert_close(images, _pipeline_call(pipe, PROMPTS[1], 22, output_type="pt"), atol=ATOL, rtol=0)


def test_training_loss_equals_a_by_hand_computation(pipe, embeds):
    """Tokens in row-major order with ids (0, h, w, 0), text ids (0, 0, 0, l), the guidance embedding fed
    train.flux_guidance, MSE to noise - x0."""
    family = get_family(NAME)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([750.0, 200.0])
    settings = LossSettings(flux_guidance=4.0)
    loss = family.training_loss(pipe, pipe.transformer, x0, embeds, [1, 0], noise=noise, timesteps=t, settings=settings)
    s = (t / 1000).view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    tokens = xt.flatten(2).transpose(1, 2)
    hw = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(64, 2)
    img_ids = torch.cat([torch.zeros(64, 1), hw, torch.zeros(64, 1)], 1).long().expand(2, -1, -1)
    txt_ids = torch.stack([torch.zeros(SEQ), torch.zeros(SEQ), torch.zeros(SEQ), torch.arange(SEQ)], 1).long()

    def by_hand(guidance):
        with torch.no_grad():
            pred = pipe.transformer(hidden_states=tokens, timestep=t / 1000, guidance=torch.full((2,), guidance),
                                    encoder_hidden_states=embeds.per_prompt["prompt_embeds"][[1, 0]],
                                    txt_ids=txt_ids.expand(2, -1, -1), img_ids=img_ids, return_dict=False)[0]  # fmt: skip
        return ((pred.transpose(1, 2).reshape(2, 16, 8, 8) - (noise - x0)) ** 2).mean(dim=(1, 2, 3))

    torch.testing.assert_close(loss, by_hand(4.0), atol=1e-6, rtol=1e-5)
    assert (by_hand(1.0) - loss).abs().max() > 1e-4  # the guidance value reaches the loss


def test_lora_trains_saves_and_a_fresh_pipeline_reproduces_it(tmp_path, folder, pipe, embeds):
    family = get_family(NAME)
    trained = _fresh(folder, pipe)
    targets = family.default_lora_targets(trained.transformer)
    assert targets == ["to_k", "to_q", "to_v", "to_out.0"]
    names = matching_modules(trained.transformer, targets)
    assert len(names) == 4 and all(n.startswith("transformer_blocks.0.attn.") for n in names)  # the double block only
    assert family.add_lora(trained.transformer, rank=4, targets=targets) == 4 * 4 * (32 + 32)  # modules x r x (in + out)
    # four layers of the one double block: the loss falls by 15% in ten steps (2.33 -> 1.99)
    lora_trains_saves_and_reloads(family, trained, lambda: _fresh(folder, pipe), embeds, _sample, (16, 8, 8), tmp_path, ATOL, drop=0.9)


CONFIG = tiny_align_config("tiny-flux2", guidance=GUIDANCE, max_sequence_length=SEQ)


def test_align_two_stages_keep_the_top_k_and_the_lora_reloads(tmp_path, folder):
    align_keeps_the_top_k_and_the_lora_reloads(NAME, folder, CONFIG, tmp_path)


def test_export_merges_and_kohya_is_refused_in_one_line(tmp_path, folder, pipe, embeds, capsys):
    from diffusers import Flux2Transformer2DModel

    from raft_diffusion.cli import main

    lora = merged_export_gives_the_loras_prediction(NAME, Flux2Transformer2DModel, folder, pipe, embeds, (16, 8, 8), tmp_path)
    capsys.readouterr()
    assert main(["export", str(lora), "--format", "kohya", "--base", str(folder), "-o", str(tmp_path / "k.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == "error: no kohya naming for model family 'flux2': use --format diffusers"


def test_planner_runs_on_the_tiny_pipeline_without_guidance_passes(tmp_path, capsys):
    import yaml

    from raft_diffusion.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    capsys.readouterr()
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(flux2)" in out and "sampling batch 16," in out and "guidance" not in out and "peak:" in out, out


@pytest.mark.slow  # about two minutes: Mistral-3-Small and the 32B transformer traced on the meta device
def test_planner_on_the_published_configs_gives_the_presets_figures(tmp_path):
    """configs/flux2_dev_aesthetic_1024.yaml planned on FLUX.2 [dev]'s published configs: the weights are the parameter
    counts at 2 bytes (Mistral-3-Small's 23.3B with its vision tower), and the peaks are the preset's header figures:
    110.6 GiB with everything resident, 65.5 with one model at a time (model.offload=sequential, the preset's)."""
    from family_checks import preset_peaks_on_published_configs

    peaks = preset_peaks_on_published_configs(NAME, "flux2_dev_aesthetic_1024", tmp_path, 32_223_281_152, 23_340_272_832, 6_291_456,
                                              offloads=("none", "sequential"))  # fmt: skip
    assert 110.3 < peaks["none"] < 110.9 and 65.2 < peaks["sequential"] < 65.8, peaks
