"""The fifth family, FLUX.2 [klein] (``flux2-klein``, Flux2KleinPipeline), through the family interface alone.

A tiny pipeline built from configs (diffusion.families.tiny: a 27-layer Qwen3 of width 16 with a Qwen2-style BPE
tokenizer trained on the fly, the FLUX.2 VAE with batch-norm statistics, double + single stream blocks), on CPU
in fp32: 32 px images, 16 x 16 VAE latents, 8 x 8 x 16 denoiser-space patches, 2 sampling steps, 32 text tokens.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from family_checks import (
    family_is_detected_everywhere,
    final_lora_reproduces_held_out_images,
    fresh_pipeline,
    lora_trains_saves_and_reloads,
    preset_peaks_on_published_configs,
    tiny_align_config,
    tiny_family_fixtures,
)

from raft_diffusion.diffusion.families import LossSettings, get_family
from raft_diffusion.diffusion.families.lora import matching_modules

NAME = "flux2-klein"
PROMPTS = ["a photo of a red cat", "a painting of a blue boat by the sea"]
SIZE, SEQ, GUIDANCE = 32, 32, 4.0
# Same seed alone vs in a batch vs the diffusers pipeline: CPU fp32 matmuls of other batch sizes round differently,
# and the pipeline's output passes through un-normalise/normalise; measured maxima (latents up to |4.0|): 1.5e-6
# batch vs alone, 3.0e-6 vs the pipeline's (VAE-space) latents, 4e-7 vs its images.
ATOL = 1e-5


folder, pipe = tiny_family_fixtures(NAME)


def _fresh(folder, pipe):
    return fresh_pipeline(NAME, folder, pipe)


@pytest.fixture(scope="module")
def embeds(pipe):
    return get_family(NAME).encode_prompts(pipe, PROMPTS, do_cfg=True, max_sequence_length=SEQ)


def _sample(pipe, embeds, prompt_indices, seeds):
    return get_family(NAME).sample(pipe, embeds, prompt_indices, seeds, steps=2, guidance=GUIDANCE, height=SIZE,
                                   width=SIZE)  # fmt: skip


# --- detection ---------------------------------------------------------------------------------------------


def test_detection_from_model_index_config_and_shortcut(tmp_path, folder, pipe):
    family_is_detected_everywhere(NAME, folder, pipe, tmp_path)


# --- encoding and sampling ---------------------------------------------------------------------------------


def test_encode_prompts_rows_are_per_prompt(pipe, embeds):
    family = get_family(NAME)
    assert tuple(embeds.per_prompt["prompt_embeds"].shape) == (2, SEQ, 3 * 16)  # 3 stacked Qwen3 layers of width 16
    assert tuple(embeds.shared["negative_prompt_embeds"].shape) == (1, SEQ, 48)
    alone = family.encode_prompts(pipe, PROMPTS[::-1], do_cfg=False, batch_size=1, max_sequence_length=SEQ)
    torch.testing.assert_close(alone.per_prompt["prompt_embeds"], embeds[[1, 0]].per_prompt["prompt_embeds"],
                               atol=1e-6, rtol=0)  # fmt: skip
    # intermediate Qwen3 layers of a random model are small (|x| <= 0.08); the two prompts differ by up to 0.096
    assert (embeds.per_prompt["prompt_embeds"][0] - embeds.per_prompt["prompt_embeds"][1]).abs().max() > 0.05
    # the run's prompts go to Qwen3 8 at a time (its every hidden state is kept); ten prompts give the rows of one call
    assert family.encode_batch_size == 8
    ten = [f"{p} number {i}" for i in range(5) for p in PROMPTS]
    torch.testing.assert_close(family.encode_prompts(pipe, ten, do_cfg=False, max_sequence_length=SEQ).per_prompt["prompt_embeds"],
                               family.encode_prompts(pipe, ten, do_cfg=False, batch_size=10, max_sequence_length=SEQ)
                               .per_prompt["prompt_embeds"], atol=1e-6, rtol=0)  # fmt: skip


def test_per_seed_sampling_alone_in_a_batch_and_the_pipeline_agree(pipe, embeds):
    family = get_family(NAME)
    assert family.latent_shape(pipe, SIZE, SIZE) == (16, 8, 8)
    batch = _sample(pipe, embeds, [0, 1, 0], [11, 22, 33])
    assert tuple(batch.shape) == (3, 16, 8, 8) and batch.dtype == torch.float32
    torch.testing.assert_close(_sample(pipe, embeds, [1], [22])[0], batch[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(_sample(pipe, embeds, [0], [33])[0], batch[2], atol=ATOL, rtol=0)
    assert (batch[0] - batch[2]).abs().mean() > 0.1  # same prompt, other seed
    # the pipeline's own output for a generator seeded 22: the VAE's latents [1, 4, 16, 16]
    call = {"prompt": PROMPTS[1], "num_inference_steps": 2, "guidance_scale": GUIDANCE, "height": SIZE,
            "width": SIZE, "max_sequence_length": SEQ, "return_dict": False}  # fmt: skip
    reference = pipe(generator=torch.Generator().manual_seed(22), output_type="latent", **call)[0]
    assert tuple(reference.shape) == (1, 4, 16, 16)
    torch.testing.assert_close(family.to_vae_latents(pipe, batch[1:2]), reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(family.from_vae_latents(pipe, reference)[0], batch[1], atol=ATOL, rtol=0)
    images = family.decode(pipe, batch[1:2])
    assert tuple(images.shape) == (1, 3, SIZE, SIZE)
    pipeline_images = pipe(generator=torch.Generator().manual_seed(22), output_type="pt", **call)[0]
    torch.testing.assert_close(images, pipeline_images, atol=ATOL, rtol=0)
    # encode_images goes back to denoiser space through the same normalisation
    latents = family.encode_images(pipe, images, [5])
    with torch.no_grad():
        dist = pipe.vae.encode(images * 2 - 1).latent_dist
    z = dist.mean + dist.std * torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(family.to_vae_latents(pipe, latents), z, atol=1e-5, rtol=0)


# --- the training loss -------------------------------------------------------------------------------------


def test_training_loss_equals_a_by_hand_computation(pipe, embeds):
    family = get_family(NAME)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    t = torch.tensor([750.0, 200.0])
    loss = family.training_loss(pipe, pipe.transformer, x0, embeds, [1, 0], noise=noise, timesteps=t)
    # by hand: x_t, tokens in row-major (h, w) order with ids (0, h, w, 0), text ids (0, 0, 0, l), MSE to noise - x0
    s = (t / 1000).view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    tokens = xt.flatten(2).transpose(1, 2)  # [2, 64, 16]
    hw = torch.stack(torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij"), -1).reshape(64, 2)
    img_ids = torch.cat([torch.zeros(64, 1), hw, torch.zeros(64, 1)], 1).long().expand(2, -1, -1)
    txt_ids = torch.stack([torch.zeros(SEQ), torch.zeros(SEQ), torch.zeros(SEQ), torch.arange(SEQ)], 1).long()
    text = embeds.per_prompt["prompt_embeds"][[1, 0]]
    with torch.no_grad():
        pred = pipe.transformer(
            hidden_states=tokens,
            timestep=t / 1000,
            guidance=None,
            encoder_hidden_states=text,
            txt_ids=txt_ids.expand(2, -1, -1),
            img_ids=img_ids,
            return_dict=False,
        )[0]
    pred = pred.transpose(1, 2).reshape(2, 16, 8, 8)
    by_hand = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))  # logit_normal weighting is 1
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-5)
    assert loss.min() > 0.5 and (loss[0] - loss[1]).abs() > 1e-3
    # the negative-aware loss's prediction (1 - w) v_ref + w v, w = beta for a kept row and -beta for a negative;
    # here the "reference" is a fixed velocity R, to check the mixing on this family's output layout
    from raft_diffusion.diffusion.families.base import ReferenceMix

    ref = torch.randn(2, 16, 8, 8, generator=g)
    w = torch.tensor([0.5, -0.5])
    mixed = family.training_loss(pipe, pipe.transformer, x0, embeds, [1, 0], noise=noise, timesteps=t, mix=ReferenceMix(w, lambda predict: ref))
    v = (1 - w.view(-1, 1, 1, 1)) * ref + w.view(-1, 1, 1, 1) * pred
    torch.testing.assert_close(mixed, ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3)), atol=1e-6, rtol=1e-5)
    # drawn timesteps: the training scheduler's (unshifted: dynamic shifting) sigmas, t = 1000 sigma
    timesteps, sigmas = family.draw_timesteps(pipe, 4, LossSettings(), torch.Generator().manual_seed(1))
    torch.testing.assert_close(timesteps, sigmas * 1000)
    assert ((sigmas > 0) & (sigmas <= 1)).all()


# --- LoRA --------------------------------------------------------------------------------------------------


def test_lora_trains_saves_and_a_fresh_pipeline_reproduces_it(tmp_path, folder, pipe, embeds):
    family = get_family(NAME)
    trained = _fresh(folder, pipe)
    denoiser = trained.transformer
    targets = family.default_lora_targets(denoiser)
    assert targets == [
        "to_k",
        "to_q",
        "to_v",
        "to_out.0",
        "to_qkv_mlp_proj",
        "single_transformer_blocks.0.attn.to_out",
        "single_transformer_blocks.1.attn.to_out",
    ]
    names = matching_modules(denoiser, targets)
    assert len(names) == 4 + 2 * 2 and not any("add_" in n for n in names)  # image stream + single blocks
    assert family.add_lora(denoiser, rank=4, targets=targets) > 0
    lora_trains_saves_and_reloads(family, trained, lambda: _fresh(folder, pipe), embeds, _sample, (16, 8, 8), tmp_path, ATOL)


# --- align end to end --------------------------------------------------------------------------------------

CONFIG = tiny_align_config("tiny-flux2-klein", learning_rate=0.3)
# The other families' e2e config with learning_rate 0.3 (0.1 leaves the held-out mean flat: 0.5145, 0.5143, 0.5142).
# Measured: held-out 0.5145 -> 0.5154 -> 0.5158 (12 images, std 0.005), pool 0.5140 -> 0.5146, kept 0.521. The rise
# is about one standard error and not robust: seed 1 gives 0.5160 -> 0.5156 -> 0.5154, seed 2 0.5145 -> 0.5119 ->
# 0.5119, 60 steps 0.5145 -> 0.5132 (tiny FLUX.1 with its own config is the same: seed 1 rises, seed 2 falls). The tiny
# random VAE barely moves brightness (pool reward std 0.005): this checks the code path end to end, not the algorithm.


@pytest.mark.slow  # 25 s; the default run aligns SDXL, SD3 and FLUX.1 end to end (test_families_align.py)
def test_align_two_stages_raise_the_held_out_reward_and_the_lora_reloads(tmp_path, folder):

    from raft_diffusion.cli import main
    from raft_diffusion.core.rundir import read_jsonl

    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out = tmp_path / "run"
    assert main(["align", "--config", str(cfg), "--output-dir", str(out)]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval_reward_mean"] > rows[0]["eval_reward_mean"], [r["eval_reward_mean"] for r in rows]
    assert all(r["kept_reward_mean"] > r["reward_mean"] for r in rows[1:])
    snapshot = yaml.safe_load((out / "config.yaml").read_text())
    assert snapshot["train"]["target_modules"] == list(get_family(NAME).lora_targets)
    # the final LoRA in a fresh pipeline reproduces the run's held-out images
    final_lora_reproduces_held_out_images(get_family(NAME), folder, out, CONFIG, stage=2)


@pytest.mark.slow  # about a minute: Qwen3-4B and the 3.9B MMDiT traced on the meta device
def test_planner_on_the_published_configs_gives_the_presets_figures(tmp_path):
    """configs/flux2_klein_base4b_aesthetic_1024.yaml planned on FLUX.2 [klein] base 4B's published configs: the
    weights are the parameter counts at 2 bytes (the transformer's is the published file's, tests/test_families_full.py;
    Qwen3-4B's 4.02B), and the peaks are the preset's header figures. With 64 prompts to an encoder call instead of 8,
    encoding alone would need 27.8 GiB."""
    peaks = preset_peaks_on_published_configs(NAME, "flux2_klein_base4b_aesthetic_1024", tmp_path, 3_875_544_576, 4_022_468_096, 16_711_680)
    assert 19.5 < peaks["none"] < 20.0 and 16.7 < peaks["phases"] < 17.2, peaks
