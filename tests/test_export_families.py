"""`raft-diffusion export` beyond SD 1.x: SDXL (kohya file in the original SGM layout, merged folder, single file),
FLUX.1 and FLUX.2 (kohya files with fused qkv), SD3 (kohya refused in one line; peft and merged folders work).

Each LoRA here is built directly (rank 4, alpha 8 != rank, random non-zero lora_B) and saved with the family's own
``save_lora``, so the tests cost no training run. Tolerances as in tests/test_export.py: an exported LoRA loaded by
diffusers gives the LoRA's own images to 1e-5 (measured 0.0: the same numbers reach the same layers); a merged model
against base + LoRA to 1e-4 (measured ~1e-6, float32 summation order); a single file's weights are bitwise the
merged folder's.
"""

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_diffusion.cli import main
from raft_diffusion.diffusion.families.registry import get_family

IMAGE_TOL = 1e-5
MERGE_TOL = 1e-4


def randomise_lora_b(denoiser, seed=7, size=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(size * torch.randn(p.shape, generator=gen))


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- SDXL -----------------------------------------------------------------------------------------------------


def sdxl_images(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=2.0, height=32, width=32,
                generator=gen, output_type="pt").images  # fmt: skip


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """The tiny SDXL pipeline with a wider second text encoder (48 vs 32, as SDXL's bigG is wider than its ViT-L):
    diffusers' single-file reader tells the two encoders apart by width, which the shared tiny SDXL (both 32) hides."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from raft_diffusion.diffusion.families.tiny import tiny_sdxl_components

    parts = tiny_sdxl_components(0)
    first = parts["text_encoder"].config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        config = CLIPTextConfig(vocab_size=first.vocab_size, hidden_size=48, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=first.max_position_embeddings,
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=48)  # fmt: skip
        parts["text_encoder_2"] = CLIPTextModelWithProjection(config).eval()
        unet = dict(parts["unet"].config)
        unet.update(cross_attention_dim=32 + 48, projection_class_embeddings_input_dim=6 * 8 + 48)
        parts["unet"] = UNet2DConditionModel.from_config(unet).eval()
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-wide"
    StableDiffusionXLPipeline(**parts).save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_sdxl(folder):
    """The SDXL pipeline in ``folder`` with the tiny CLIP tokenizer passed in (built once; reading it from the folder
    twice per load is most of a tiny pipeline's load time)."""
    from raft_diffusion.diffusion.families.tiny import _clip_tokenizer

    return get_family("sdxl").load(folder, device="cpu", tokenizer=_clip_tokenizer(), tokenizer_2=_clip_tokenizer())


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_dir, tmp_path_factory):
    """(LoRA folder, base images, images with the LoRA): rank 4, alpha 8 on attention, resnet convolutions and
    time projections, conv_in, the added (text_time) embedding and the time embedding."""
    family = get_family("sdxl")
    pipe = load_sdxl(sdxl_dir)
    base = sdxl_images(pipe)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "time_emb_proj",
               "conv_shortcut", "conv_in", "add_embedding.linear_1", "time_embedding.linear_2", "upsamplers.0.conv"]  # fmt: skip
    family.add_lora(pipe.unet, rank=4, alpha=8, targets=targets, init_seed=1)
    randomise_lora_b(pipe.unet)
    folder = family.save_lora(pipe, pipe.unet, tmp_path_factory.mktemp("sdxl-lora") / "lora")
    return folder, base, sdxl_images(pipe)


def test_sdxl_kohya_file_uses_sgm_names_keeps_alpha_and_reloads(sdxl_dir, sdxl_lora, tmp_path):
    folder, base, tuned = sdxl_lora
    out = tmp_path / "sdxl.safetensors"
    assert main(["export", str(folder), "--format", "kohya", "-o", str(out), "--base", str(sdxl_dir), "--license", "openrail++"]) == 0
    state, meta = load_file(str(out)), metadata(out)
    own = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert len(state) == 3 * len(own) // 2 and all(re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in state)  # the original layout only
    # down block 1 (one layer) is input block 3 (2 is block 0's downsampler); up block 0, layer 1 is output block 1;
    # a resnet's conv1 is in_layers.2
    pairs = {
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
        "lora_unet_output_blocks_1_1_proj_in": "up_blocks.0.attentions.1.proj_in",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "lora_unet_output_blocks_0_0_skip_connection": "up_blocks.0.resnets.0.conv_shortcut",
        "lora_unet_output_blocks_1_2_conv": "up_blocks.0.upsamplers.0.conv",
        "lora_unet_label_emb_0_0": "add_embedding.linear_1",
        "lora_unet_time_embed_2": "time_embedding.linear_2",
        "lora_unet_input_blocks_0_0": "conv_in",
    }
    for kohya, module in pairs.items():
        assert torch.equal(state[f"{kohya}.lora_down.weight"], own[f"unet.{module}.lora_A.weight"]), kohya
        assert torch.equal(state[f"{kohya}.lora_up.weight"], own[f"unet.{module}.lora_B.weight"]), kohya
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {8.0}  # lora_alpha 8, rank 4
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and meta["raft_family"] == "sdxl"
    assert meta["raft_base_model"] == str(sdxl_dir) and meta["modelspec.license"] == "openrail++"
    assert meta["modelspec.resolution"] == "32x32" and json.loads(meta["ss_network_args"])["conv_alpha"] == "8"

    pipe = load_sdxl(sdxl_dir)
    pipe.load_lora_weights(str(out))  # diffusers' kohya reader (SGM blocks mapped back by the UNet config)
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8 and pipe.unet.peft_config["default_0"].r == 4
    got = sdxl_images(pipe)
    assert (tuned - base).abs().max() > 1e-2 and (got - tuned).abs().max() <= IMAGE_TOL

    wrong = tmp_path / "alpha_is_rank.safetensors"  # what alpha = rank converters write: another strength
    save_file({k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in state.items()}, str(wrong))
    pipe = load_sdxl(sdxl_dir)
    pipe.load_lora_weights(str(wrong))
    assert (sdxl_images(pipe) - tuned).abs().max() > 1e-3


def test_sdxl_merged_folder_and_single_file_match_base_plus_lora(sdxl_dir, sdxl_lora, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder, base, tuned = sdxl_lora
    out = tmp_path / "merged"
    assert main(["export", str(folder), "--merge", "-o", str(out), "--base", str(sdxl_dir)]) == 0
    merged = load_sdxl(out)
    assert not any("lora" in k for k in merged.unet.state_dict())
    got = sdxl_images(merged)
    assert (got - tuned).abs().max() <= MERGE_TOL and (got - base).abs().max() > 1e-2

    single = out / "merged.safetensors"
    keys = load_file(str(single))
    assert "model.diffusion_model.label_emb.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert keys["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (3 * 48, 48)
    one = StableDiffusionXLPipeline.from_single_file(str(single), config=str(out), local_files_only=True,
                                                     tokenizer=merged.tokenizer, tokenizer_2=merged.tokenizer_2)  # fmt: skip
    one.set_progress_bar_config(disable=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(merged, part).state_dict(), getattr(one, part).state_dict()
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        assert all(k in b and torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(sdxl_images(one), got)


def test_sdxl_single_file_names_match_diffusers_reader_at_sdxl_size():
    """SDXL 1.0's UNet and its OpenCLIP bigG text encoder (real configs, weights on the meta device) go to the original
    names, and diffusers' own single-file converters bring every tensor back to the same name and shape."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from raft_diffusion.diffusion.export import open_clip_text, unet_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                           num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))  # fmt: skip
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    assert len(ldm) == 1680  # SDXL base's model.diffusion_model.* tensors
    assert ldm["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert ldm["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    again = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(again) == set(state) and all(again[k].shape == state[k].shape for k in state)

    text = {k: v for k, v in big_g.state_dict().items() if not k.endswith("position_ids")}
    ckpt = open_clip_text(text, "conditioner.embedders.1.model.")
    assert ckpt["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    back = convert_open_clip_checkpoint(big_g, ckpt, prefix="conditioner.embedders.1.model.")
    assert set(back) == set(text) and all(back[k].shape == text[k].shape for k in text)


# --- FLUX.1 ---------------------------------------------------------------------------------------------------


def flux_images(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=3.5, height=32, width=32,
                generator=gen, output_type="pt", max_sequence_length=32).images  # fmt: skip


def kohya_round_trip(name, targets, images, tmp_path):
    """A rank-4, alpha-8 LoRA with random non-zero B on ``targets`` of the tiny ``name`` pipeline, saved with the
    family's ``save_lora``, exported with ``export --format kohya --base`` and loaded by diffusers' ``load_lora_weights``
    into a fresh pipeline. Returns everything a test checks: base / tuned / reloaded images, the LoRA's own tensors,
    the kohya tensors and metadata."""
    from types import SimpleNamespace

    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder, family = tiny_pipeline(name), get_family(name)
    pipe = family.load(folder, device="cpu")
    base = images(pipe)
    family.add_lora(pipe.transformer, rank=4, alpha=8, targets=targets, init_seed=1)
    randomise_lora_b(pipe.transformer, size=0.3)
    tuned = images(pipe)
    lora = family.save_lora(pipe, pipe.transformer, tmp_path / "lora")
    out = tmp_path / f"{name}.safetensors"
    assert main(["export", str(lora), "--format", "kohya", "-o", str(out), "--base", str(folder)]) == 0
    fresh = family.load(folder, device="cpu")
    fresh.load_lora_weights(str(out))  # diffusers' kohya reader of the family
    return SimpleNamespace(folder=folder, family=family, lora=lora, base=base, tuned=tuned, got=images(fresh),
                           own=load_file(str(lora / "pytorch_lora_weights.safetensors")), state=load_file(str(out)),
                           meta=metadata(out))  # fmt: skip


def test_flux_kohya_fused_qkv_reloads_in_diffusers_and_merge_matches(tmp_path):
    """Double block 0: image and text q/k/v (two fused qkv layers), their outputs, MLPs and the modulation. The tiny
    model has one single block, which stays without LoRA: diffusers' kohya FLUX reader splits a single block's
    linear1 by FLUX.1-dev's widths (3072/12288), which the tiny model does not have (see the next test)."""
    members = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "norm1.linear")  # fmt: skip
    r = kohya_round_trip("flux", [f"transformer_blocks.0.{m}" for m in members], flux_images, tmp_path)
    folder, family, lora, own, state, meta = r.folder, r.family, r.lora, r.own, r.state, r.meta
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape == (12, 32) and state[f"{qkv}.lora_up.weight"].shape == (96, 12)
    assert float(state[f"{qkv}.alpha"]) == 24.0  # rank 12 = 3 x 4, so alpha 3 x 8: the same scale 2
    assert torch.equal(state[f"{qkv}.lora_down.weight"][4:8], own["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"])
    assert torch.equal(state[f"{qkv}.lora_up.weight"][32:64, 4:8], own["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"])
    assert state[f"{qkv}.lora_up.weight"][32:64, :4].abs().max() == 0  # block-diagonal
    assert "lora_unet_double_blocks_0_txt_mlp_0.lora_down.weight" not in state  # not in the LoRA: not written
    assert float(state["lora_unet_double_blocks_0_img_mod_lin.alpha"]) == 8.0
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["raft_family"] == "flux"

    assert (r.tuned - r.base).abs().max() > 1e-2 and (r.got - r.tuned).abs().max() <= IMAGE_TOL  # via _convert_kohya_flux_lora_to_diffusers

    merged_dir = tmp_path / "merged"
    assert main(["export", str(lora), "--merge", "-o", str(merged_dir), "--base", str(folder)]) == 0
    assert not list(merged_dir.glob("*.safetensors"))  # no single file for FLUX: the folder only
    assert (flux_images(family.load(merged_dir, device="cpu")) - r.tuned).abs().max() <= MERGE_TOL


def test_flux_single_block_linear1_splits_back_at_flux1_size():
    """A single block's q/k/v LoRA at FLUX.1-dev's width, fused into kohya's linear1 (q, k, v, MLP input) with a
    zero MLP part, goes through diffusers' kohya FLUX reader back to the same q/k/v updates."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    from raft_diffusion.diffusion.export import Lora
    from raft_diffusion.diffusion.kohya import kohya_state_dict

    gen = torch.Generator().manual_seed(0)
    names = [f"single_transformer_blocks.5.attn.to_{x}" for x in "qkv"]
    down = {m: torch.randn(2, 3072, generator=gen) for m in names}
    up = {m: torch.randn(3072, 2, generator=gen) for m in names}
    lora = Lora(down, up, {m: 1.5 for m in names}, {"r": 2, "lora_alpha": 3}, "transformer")
    state = kohya_state_dict(lora, "flux", module_shape=lambda m: (12288, 3072) if m.endswith("proj_mlp") else (3072, 3072))
    assert state["lora_unet_single_blocks_5_linear1.lora_up.weight"].shape == (3 * 3072 + 12288, 8)
    back = _convert_kohya_flux_lora_to_diffusers(dict(state))
    for m in names:
        a, b = back[f"transformer.{m}.lora_A.weight"], back[f"transformer.{m}.lora_B.weight"]
        assert torch.allclose(b @ a, 1.5 * up[m] @ down[m], atol=1e-4)  # the reader folds alpha / rank into A, B
    assert back["transformer.single_transformer_blocks.5.proj_mlp.lora_B.weight"].abs().max() == 0


# --- FLUX.2 [klein] --------------------------------------------------------------------------------------------


def flux2_images(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return pipe(prompt=["a red square", "a blue circle"], num_inference_steps=2, guidance_scale=4.0, height=32, width=32,
                generator=gen, output_type="pt", max_sequence_length=32).images  # fmt: skip


@pytest.mark.slow  # ~12 s of CPU: the FLUX.1 test above covers the fused-qkv path in the default run
def test_flux2_kohya_file_reloads_in_diffusers_with_its_alpha(tmp_path, capsys):
    """The family's default LoRA layers (double-block image q/k/v fused into img_attn_qkv, to_out.0, every single
    block's fused to_qkv_mlp_proj = linear1 and to_out = linear2) plus the text stream, the MLPs and the embedders/final
    layer, rank 4 alpha 8: diffusers' kohya FLUX.2 reader gives the LoRA's own images. A modulation layer has no kohya
    name that reader maps: refused in one line."""
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder, family = tiny_pipeline("flux2-klein"), get_family("flux2-klein")
    names = [n for n, m in family.load(folder, device="cpu").transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    extra = ["transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.attn.add_v_proj",
             "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.ff.linear_in", "transformer_blocks.0.ff_context.linear_out",
             "x_embedder", "context_embedder", "proj_out"]  # fmt: skip
    targets = [n for n in names if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_qkv_mlp_proj") or n.endswith(("to_out.0", "attn.to_out"))]
    r = kohya_round_trip("flux2-klein", targets + extra, flux2_images, tmp_path)
    own, state, meta = r.own, r.state, r.meta
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    assert state[f"{qkv}.lora_down.weight"].shape == (12, 32) and float(state[f"{qkv}.alpha"]) == 24.0  # 3 x rank 4, same scale 2
    assert torch.equal(state[f"{qkv}.lora_up.weight"][32:64, 4:8], own["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"])
    assert torch.equal(state["lora_unet_single_blocks_1_linear1.lora_down.weight"],
                       own["transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_A.weight"])  # fmt: skip
    for name in ("txt_attn_qkv", "txt_attn_proj", "img_mlp_0", "txt_mlp_2"):
        assert float(state[f"lora_unet_double_blocks_0_{name}.alpha"]) == (24.0 if name.endswith("qkv") else 8.0)
    assert {
        "lora_unet_img_in.alpha",
        "lora_unet_txt_in.alpha",
        "lora_unet_final_layer_linear.alpha",
        "lora_unet_single_blocks_0_linear2.alpha",
    } <= set(state)
    assert meta["ss_network_module"] == "networks.lora_flux_2" and meta["modelspec.architecture"] == "Flux.2-klein-4b/lora"
    assert meta["raft_family"] == "flux2-klein" and meta["ss_network_alpha"] == "8"

    assert (r.tuned - r.base).abs().max() > 1e-2 and (r.got - r.tuned).abs().max() <= IMAGE_TOL  # via _convert_kohya_flux2_lora_to_diffusers

    other = family.load(folder, device="cpu")
    family.add_lora(other.transformer, rank=4, alpha=8, targets=["double_stream_modulation_img.linear"], init_seed=2)
    mod = family.save_lora(other, other.transformer, tmp_path / "mod")
    capsys.readouterr()
    assert main(["export", str(mod), "--format", "kohya", "-o", str(tmp_path / "m.safetensors"), "--base", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "double_stream_modulation_img.linear" in err and "use --format diffusers" in err


# --- SD3: no kohya file, the other formats ------------------------------------------------------------


@pytest.mark.slow  # 4 s of CPU: kept out of the default run's budget (the FLUX test covers a flow family there)
def test_sd3_kohya_is_refused_in_one_line_peft_and_merge_work(tmp_path, capsys):
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder, family = tiny_pipeline("sd3"), get_family("sd3")
    pipe = family.load(folder, device="cpu")
    family.add_lora(pipe.transformer, rank=4, alpha=8, init_seed=1)
    randomise_lora_b(pipe.transformer)
    lora = family.save_lora(pipe, pipe.transformer, tmp_path / "lora")
    gen = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(1, 4, 16, 16, generator=gen), torch.randn(1, 8, 64, generator=gen), torch.randn(1, 64, generator=gen)

    def predict(transformer):
        with torch.no_grad():
            return transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=ctx, pooled_projections=pooled).sample

    want = predict(pipe.transformer)

    capsys.readouterr()
    assert main(["export", str(lora), "--format", "kohya", "-o", str(tmp_path / "k"), "--base", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no kohya export for SD3" in err and "use --format diffusers" in err
    assert main(["export", str(lora), "--format", "kohya", "-o", str(tmp_path / "k")]) == 2  # no base: family unknown
    assert "cannot tell which transformer family" in capsys.readouterr().err

    assert main(["export", str(lora), "--format", "peft", "-o", str(tmp_path / "peft")]) == 0
    from diffusers import SD3Transformer2DModel
    from peft import PeftModel

    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8 and config["r"] == 4
    fresh = SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    assert (predict(PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).base_model.model) - want).abs().max() <= IMAGE_TOL

    assert main(["export", str(lora), "--merge", "-o", str(tmp_path / "merged"), "--base", str(folder)]) == 0
    merged = SD3Transformer2DModel.from_pretrained(str(tmp_path / "merged"), subfolder="transformer")
    base = predict(SD3Transformer2DModel.from_pretrained(str(folder), subfolder="transformer"))
    assert (want - base).abs().max() > 1e-2 and (predict(merged) - want).abs().max() <= MERGE_TOL
