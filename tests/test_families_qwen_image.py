"""The sixth family, Qwen-Image (``qwen-image``, QwenImagePipeline), through the family interface alone.

A tiny pipeline built from configs (diffusion.families.tiny: a two-layer Qwen2.5-VL of width 16 with a Qwen2-style BPE
tokenizer trained on the fly, the causal video VAE with per-channel latent statistics, a two-block MMDiT on 2x2
patches), on CPU in fp32: 32 px images, 8 x 8 x 4 latents (VAE factor 4), 16 image tokens, 2 sampling steps.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from family_checks import (
    align_keeps_the_top_k_and_the_lora_reloads,
    family_is_detected_everywhere,
    fresh_pipeline,
    lora_trains_saves_and_reloads,
    merged_export_gives_the_loras_prediction,
    preset_peaks_on_published_configs,
    tiny_align_config,
    tiny_family_fixtures,
)

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families import LossSettings, get_family
from raft_diffusion.diffusion.families.lora import matching_modules

NAME = "qwen-image"
# of different lengths: the first is padded to the second's length in the embeddings, and carries a mask
PROMPTS = ["a photo of a red cat", "a painting of a blue boat by the sea at night"]
SIZE, GUIDANCE = 32, 3.0  # not the pipeline's default true_cfg_scale (4)
# Same seed alone vs in a batch vs the diffusers pipeline: CPU fp32 matmuls of other batch sizes round differently;
# measured maxima (latents up to |4.2|): 1.2e-6 batch vs alone and vs the pipeline's latents, 3e-7 vs its images.
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


def _pipeline_call(pipe, prompt, seed, guidance=GUIDANCE, output_type="latent"):
    """The pipeline's own call for one prompt and a generator seeded ``seed`` (CFG against its example's " ")."""
    cfg = {"negative_prompt": " ", "true_cfg_scale": guidance} if guidance > 1 else {"true_cfg_scale": 1.0}
    return pipe(prompt=prompt, num_inference_steps=2, height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(seed),
                output_type=output_type, return_dict=False, **cfg)[0]  # fmt: skip


# --- detection ---------------------------------------------------------------------------------------------


def test_detection_from_model_index_config_and_shortcut(tmp_path, folder, pipe):
    family_is_detected_everywhere(NAME, folder, pipe, tmp_path)


def test_a_guidance_distilled_transformer_is_refused_in_one_line(tmp_path, folder):
    model_index = json.loads((folder / "model_index.json").read_text())
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    distilled = tmp_path / "distilled"
    distilled.mkdir()
    (distilled / "model_index.json").write_text(json.dumps(model_index))
    for part in ("scheduler", "vae", "text_encoder", "tokenizer"):
        (distilled / part).symlink_to(folder / part)
    (distilled / "transformer").mkdir()  # its config only: refused before any weight is looked for
    (distilled / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": True}))
    with pytest.raises(UserError, match=r"guidance-distilled Qwen-Image transformer .*use an undistilled") as err:
        get_family(NAME).load(distilled, device="cpu")
    assert "\n" not in str(err.value)


# --- encoding and sampling ---------------------------------------------------------------------------------


def test_encode_prompts_pads_rows_with_a_mask_and_rows_are_per_prompt(pipe, embeds):
    family = get_family(NAME)
    emb, mask = embeds.per_prompt["prompt_embeds"], embeds.per_prompt["prompt_embeds_mask"]
    assert emb.shape[0] == 2 and emb.shape[2] == 16 and tuple(mask.shape) == tuple(emb.shape[:2])
    # the pipeline's own encoding of each prompt alone: no padding, so its length is the prompt's
    lengths = [pipe.encode_prompt(prompt=[p], device="cpu")[0].shape[1] for p in PROMPTS]
    assert lengths[0] < lengths[1] == emb.shape[1]
    assert mask.sum(1).tolist() == lengths and (emb[0, lengths[0] :] == 0).all()
    alone = pipe.encode_prompt(prompt=[PROMPTS[0]], device="cpu")[0][0]
    torch.testing.assert_close(emb[0, : lengths[0]], alone, atol=1e-6, rtol=0)
    # other batches and orders give the same rows (padded to their own longest)
    one = family.encode_prompts(pipe, PROMPTS[::-1], do_cfg=False, batch_size=1)
    torch.testing.assert_close(one.per_prompt["prompt_embeds"], embeds[[1, 0]].per_prompt["prompt_embeds"], atol=1e-6, rtol=0)
    assert set(embeds.shared) == {"negative_prompt_embeds", "negative_prompt_embeds_mask"} and not one.shared
    assert (emb[0, : lengths[0]] - emb[1, : lengths[0]]).abs().max() > 1e-2
    # max_sequence_length cuts the tokens after the template
    short = family.encode_prompts(pipe, PROMPTS, do_cfg=False, max_sequence_length=7)
    assert short.per_prompt["prompt_embeds"].shape[1] == 7
    torch.testing.assert_close(short.per_prompt["prompt_embeds"], emb[:, :7], atol=1e-6, rtol=0)


def test_per_seed_sampling_alone_in_a_batch_and_the_pipeline_agree(pipe, embeds):
    family = get_family(NAME)
    assert family.latent_shape(pipe, SIZE, SIZE) == (4, 8, 8)
    with pytest.raises(UserError, match="multiples of 8"):
        family.latent_shape(pipe, 36, 32)
    batch = _sample(pipe, embeds, [0, 1, 0], [11, 22, 33])
    assert tuple(batch.shape) == (3, 4, 8, 8) and batch.dtype == torch.float32
    torch.testing.assert_close(_sample(pipe, embeds, [1], [22])[0], batch[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(_sample(pipe, embeds, [0], [33])[0], batch[2], atol=ATOL, rtol=0)
    assert (batch[0] - batch[2]).abs().mean() > 0.1  # same prompt, other seed
    # the pipeline's own packed latents [1, 16 tokens, 4 x 2 x 2], for the longer prompt and the padded one
    for row, index, seed in ((1, 1, 22), (2, 0, 33)):
        reference = _pipeline_call(pipe, PROMPTS[index], seed)
        assert tuple(reference.shape) == (1, 16, 16)
        unpacked = reference.view(1, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 8, 8)
        torch.testing.assert_close(batch[row : row + 1], unpacked, atol=ATOL, rtol=0)
    # without guidance (no negative prompt passed) as well
    torch.testing.assert_close(
        _sample(pipe, embeds, [0], [7], guidance=1.0),
        _pipeline_call(pipe, PROMPTS[0], 7, guidance=1.0).view(1, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 4, 8, 8),
        atol=ATOL,
        rtol=0,
    )
    images = family.decode(pipe, batch[1:2])
    assert tuple(images.shape) == (1, 3, SIZE, SIZE)
    torch.testing.assert_close(images, _pipeline_call(pipe, PROMPTS[1], 22, output_type="pt"), atol=ATOL, rtol=0)


def test_latents_are_normalised_per_channel_and_encode_images_returns_there(pipe):
    family = get_family(NAME)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1, 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    z = family.to_vae_latents(pipe, x)
    assert tuple(z.shape) == (2, 4, 1, 8, 8)
    torch.testing.assert_close(z, x.unsqueeze(2) * std + mean)
    torch.testing.assert_close(family.from_vae_latents(pipe, z), x)
    images = family.decode(pipe, x)
    latents = family.encode_images(pipe, images, [5, 6])
    with torch.no_grad():
        dist = pipe.vae.encode(images.unsqueeze(2) * 2 - 1).latent_dist
    eps = torch.stack([torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    torch.testing.assert_close(latents, ((dist.mean + dist.std * eps - mean) / std)[:, :, 0], atol=1e-5, rtol=0)
    # a mirrored image's latents are (up to the VAE's error) the width-reversed latents
    assert family.mirror(pipe, x).equal(x.flip(-1))


# --- the training loss -------------------------------------------------------------------------------------


def test_training_loss_equals_a_by_hand_computation(pipe, embeds):
    family = get_family(NAME)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([750.0, 200.0])
    loss = family.training_loss(pipe, pipe.transformer, x0, embeds, [1, 0], noise=noise, timesteps=t)
    # by hand: x_t, 2x2 patches as tokens in row-major (h, w) order (channels, then the patch's rows and columns),
    # the prompts' padded embeddings with their masks, MSE to noise - x0 (logit_normal weighting is 1)
    s = (t / 1000).view(-1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    tokens = xt.view(2, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 16, 16)
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=tokens,
            timestep=t / 1000,
            encoder_hidden_states=embeds.per_prompt["prompt_embeds"][[1, 0]],
            encoder_hidden_states_mask=embeds.per_prompt["prompt_embeds_mask"][[1, 0]],
            img_shapes=[[(1, 4, 4)]] * 2,
            return_dict=False,
        )[0]
    pred = out.view(2, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(2, 4, 8, 8)
    by_hand = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, by_hand, atol=1e-6, rtol=1e-5)
    assert loss.min() > 0.5 and (loss[0] - loss[1]).abs() > 1e-3
    # the padding changes nothing: the shorter prompt's row cut to its own tokens gives the same loss
    n0 = int(embeds.per_prompt["prompt_embeds_mask"][0].sum())
    with torch.no_grad():
        cut = pipe.transformer(hidden_states=tokens[1:], timestep=t[1:] / 1000,
                               encoder_hidden_states=embeds.per_prompt["prompt_embeds"][:1, :n0],
                               img_shapes=[[(1, 4, 4)]], return_dict=False)[0]  # fmt: skip
    torch.testing.assert_close(cut, out[1:], atol=1e-5, rtol=0)
    # the negative-aware loss's prediction (1 - w) v_ref + w v, with a fixed "reference" velocity R
    from raft_diffusion.diffusion.families.base import ReferenceMix

    ref = torch.randn(2, 4, 8, 8, generator=g)
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
    assert targets == ["to_k", "to_q", "to_v", "to_out.0"]
    names = matching_modules(denoiser, targets)
    assert len(names) == 2 * 4 and all(".attn." in n for n in names) and not any("add_" in n for n in names)
    assert family.add_lora(denoiser, rank=4, targets=targets) == 2 * 4 * 4 * (32 + 32)  # blocks x modules x r x (in + out)
    lora_trains_saves_and_reloads(family, trained, lambda: _fresh(folder, pipe), embeds, _sample, (4, 8, 8), tmp_path, ATOL)


# --- align end to end --------------------------------------------------------------------------------------

CONFIG = tiny_align_config("tiny-qwen-image")


def test_align_two_stages_keep_the_top_k_and_the_lora_reloads(tmp_path, folder):
    align_keeps_the_top_k_and_the_lora_reloads(NAME, folder, CONFIG, tmp_path)


# --- export ------------------------------------------------------------------------------------------------


def test_export_merges_into_a_pipeline_folder(tmp_path, folder, pipe, embeds):
    from diffusers import QwenImageTransformer2DModel

    merged_export_gives_the_loras_prediction(NAME, QwenImageTransformer2DModel, folder, pipe, embeds, (4, 8, 8), tmp_path)


# --- the memory planner ------------------------------------------------------------------------------------


def test_planner_runs_and_counts_one_call_of_the_batch_for_guidance(tmp_path, capsys):
    """The pipeline runs guidance's conditional and unconditional passes one after the other: sampling at guidance 2
    holds one batch's activations, where SD3's pipeline (one doubled call) holds two."""
    import copy

    from raft_diffusion.cli import main
    from raft_diffusion.diffusion.config import config_from_dict
    from raft_diffusion.diffusion.plan import MemoryPlanner

    def sample_bytes(pretrained, guidance):
        cfg = copy.deepcopy(CONFIG)
        cfg["model"]["pretrained"] = pretrained
        cfg["sampling"]["guidance_scale"] = guidance
        return MemoryPlanner(config_from_dict(cfg), device="cpu").sample_activations(8)

    guided, plain = sample_bytes("tiny-qwen-image", 2.0), sample_bytes("tiny-qwen-image", 1.0)
    assert plain > 0 and abs(guided - plain) <= 0.02 * plain, (guided, plain)  # measured: within 0.5%
    sd3_guided, sd3_plain = sample_bytes("tiny-sd3", 2.0), sample_bytes("tiny-sd3", 1.0)
    assert sd3_guided > 1.5 * sd3_plain
    # the command prints its table (it used to stop on the transformer's rotary tables, kept as plain meta tensors)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    capsys.readouterr()
    assert main(["plan", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "(qwen-image)" in out and "(guidance: two calls)" in out and "peak:" in out, out


@pytest.mark.slow  # ~15 s: meta-device forwards of the 20B transformer and the 8B text encoder
def test_planner_on_the_published_configs_gives_the_presets_figures(tmp_path):
    """configs/qwen_image_aesthetic_1024.yaml planned on Qwen-Image's published configs: the weights are the
    parameter counts at 2 bytes (Qwen2.5-VL-7B's is the published 8.29B), and the peaks are the preset's header
    figures."""
    peaks = preset_peaks_on_published_configs(NAME, "qwen_image_aesthetic_1024", tmp_path, 20_430_401_088, 8_292_166_656, 23_592_960)
    assert 62.0 < peaks["none"] < 63.0 and 57.3 < peaks["phases"] < 58.3, peaks


def test_kohya_file_has_musubi_names_and_reloads_in_diffusers_with_its_alpha(tmp_path, folder, pipe, embeds):
    """The default targets plus the text stream's projections, both streams' MLPs and modulations and the
    embedders / output layer, rank 4 alpha 8: each module under lora_unet_ + its path with underscores, alpha = 8, and
    diffusers' reader of such files (what ComfyUI also loads) gives the LoRA's own velocity."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from test_export_families import randomise_lora_b

    from raft_diffusion.cli import main

    family = get_family(NAME)
    trained = _fresh(folder, pipe)
    extra = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
             "img_mlp.net.2", "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]  # fmt: skip
    targets = [*family.lora_targets, *(f"transformer_blocks.1.{m}" for m in extra), "img_in", "txt_in", "proj_out"]
    family.add_lora(trained.transformer, rank=4, alpha=8, targets=targets, init_seed=1)
    randomise_lora_b(trained.transformer, size=0.3)
    lora = family.save_lora(trained, trained.transformer, tmp_path / "lora")
    out = tmp_path / "qwen.safetensors"
    assert main(["export", str(lora), "--format", "kohya", "-o", str(out), "--base", str(folder)]) == 0
    state, own = load_file(str(out)), load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert len(state) == 3 * (len(own) // 2) == 3 * (2 * 4 + 9 + 3)
    down = "lora_unet_transformer_blocks_1_img_mlp_net_0_proj.lora_down.weight"
    assert torch.equal(state[down], own["transformer.transformer_blocks.1.img_mlp.net.0.proj.lora_A.weight"])
    assert float(state["lora_unet_transformer_blocks_0_attn_to_out_0.alpha"]) == 8.0 and "lora_unet_img_in.alpha" in state
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora_qwen_image" and meta["raft_family"] == NAME

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def predict(p):
        with torch.no_grad():
            return family._predict(p, p.transformer, x, torch.tensor([500.0]), embeds[[1]], LossSettings())

    fresh = _fresh(folder, pipe)
    base = predict(fresh)
    fresh.load_lora_weights(str(out))  # diffusers converts the kohya names and scales B by alpha / rank
    assert (predict(trained) - base).abs().max() > 1e-2
    torch.testing.assert_close(predict(fresh), predict(trained), atol=1e-5, rtol=0)


def test_caption_dropout_row_is_padded_like_the_prompts(pipe):
    """The task encodes the empty prompt (" ") with the training prompts, so that its row has their length: the
    prompts' rows are those they have without it, and the empty row's mask covers the tokens of " " alone."""
    family = get_family(NAME)
    assert family.empty_prompt == " "
    alone = family.encode_prompts(pipe, PROMPTS, do_cfg=False)
    both = family.encode_prompts(pipe, [*PROMPTS, family.empty_prompt], do_cfg=False)
    for key in ("prompt_embeds", "prompt_embeds_mask"):
        torch.testing.assert_close(both[: len(PROMPTS)].per_prompt[key], alone.per_prompt[key], atol=1e-6, rtol=0)
    empty = family.encode_prompts(pipe, [family.empty_prompt], do_cfg=False)
    n = int(empty.per_prompt["prompt_embeds_mask"].sum())
    assert 0 < n == int(both.per_prompt["prompt_embeds_mask"][-1].sum()) < both.per_prompt["prompt_embeds_mask"].shape[1]
    torch.testing.assert_close(both.per_prompt["prompt_embeds"][-1, :n], empty.per_prompt["prompt_embeds"][0, :n], atol=1e-5, rtol=0)
