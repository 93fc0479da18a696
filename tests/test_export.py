"""`raft-diffusion export / card / push` on the tiny SD 1.x pipeline: kohya round trip with alpha kept, peft and
diffusers folders, merged model (diffusers folder and single file), the model card, push offline, bad input.

Tolerances: images are float [0, 1] from 3 DDIM steps at 32 px. A kohya or peft export loaded by diffusers/peft
must give the run's own LoRA images to 1e-5 (the weights are the same numbers; measured 0.0 for kohya). The merged
model (weights W + scale * B @ A summed once) against base + LoRA (the two paths computed separately) to 1e-4
(measured ~1e-6, float32 rounding of a different summation order); the single file's weights are bitwise the merged
folder's.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl
from raft_diffusion.diffusion.card import LICENCE_DEFAULT, card_text, fmt

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
IMAGE_TOL = 1e-5  # exported LoRA vs the run's own LoRA
MERGE_TOL = 1e-4  # merged weights vs base + LoRA at run time


@pytest.fixture(scope="module")
def run_dir(tiny_pipeline_dir, tmp_path_factory):
    """One 1-stage tiny run (LoRA rank 8, alpha 16 on attention, convolutions and feed-forward layers)."""
    out = tmp_path_factory.mktemp("export-runs") / "run"
    code = main(["align", "--config", TINY, "--output-dir", str(out), f"model.pretrained={tiny_pipeline_dir}",
                 "num_stages=1", "progress=false", "sampling.num_per_prompt=4", "ranking.top_k=1",
                 "train.steps_per_stage=4", "eval.num_per_prompt=2", "eval.clip_model=null"])  # fmt: skip
    assert code == 0
    return out


def fresh_pipe(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return pipe(["a red square", "a blue circle"], num_inference_steps=3, guidance_scale=2.0, height=32, width=32,
                generator=gen, output_type="pt").images  # fmt: skip


@pytest.fixture(scope="module")
def lora_images(run_dir, tiny_pipeline_dir):
    """Base images and the images with the run's own (diffusers-format) LoRA."""
    pipe = fresh_pipe(tiny_pipeline_dir)
    base = images(pipe)
    pipe.load_lora_weights(str(run_dir / "final"))
    return base, images(pipe)


def metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


# --- kohya ----------------------------------------------------------------------------------------------------


def test_kohya_export_loads_in_diffusers_with_the_same_images(run_dir, tiny_pipeline_dir, lora_images, tmp_path):
    out = tmp_path / "raft_lora.safetensors"
    assert main(["export", str(run_dir), "--format", "kohya", "-o", str(out), "--license", "creativeml-openrail-m"]) == 0
    state = load_file(str(out))
    own = load_file(str(run_dir / "final" / "pytorch_lora_weights.safetensors"))
    modules = {k.removeprefix("unet.").rsplit(".lora_", 1)[0] for k in own}
    assert len(modules) == 68 and len(state) == 3 * len(modules)
    assert all(re.fullmatch(r"lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in state)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(state[f"{name}.lora_down.weight"], own["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"])
    assert state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (8, 32, 3, 3)  # LoCon-style conv LoRA
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {16.0}  # the run's lora_alpha, rank 8

    meta = metadata(out)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "16"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora" and meta["modelspec.license"] == "creativeml-openrail-m"
    assert meta["raft_base_model"] == str(tiny_pipeline_dir) and meta["raft_reward"] == "brightness"
    assert meta["modelspec.resolution"] == "32x32"  # sampling.height/width null: the tiny model's own size
    assert meta["raft_stage"] == "1" and json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "16"}
    assert float(meta["raft_eval_reward_base"]) == rows[0]["eval_reward_mean"]
    assert float(meta["raft_eval_reward_final"]) == rows[1]["eval_reward_mean"]

    base, tuned = lora_images
    pipe = fresh_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(str(out))  # diffusers' kohya reader
    assert pipe.unet.peft_config["default_0"].lora_alpha == 16 and pipe.unet.peft_config["default_0"].r == 8
    got = images(pipe)
    assert (tuned - base).abs().max() > 1e-2  # the LoRA changes the images...
    assert (got - tuned).abs().max() <= IMAGE_TOL  # ...and the kohya file changes them the same way


@pytest.fixture(scope="module")
def alpha8_rank4(tiny_pipeline_dir, tmp_path_factory):
    """A LoRA with lora_alpha 8 != rank 4 (scale 2) and non-zero random lora_B, saved by save_lora."""
    from raft_diffusion.diffusion.finetune import add_lora, save_lora

    pipe = fresh_pipe(tiny_pipeline_dir)
    add_lora(pipe.unet, rank=4, alpha=8, init_seed=1)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    folder = save_lora(pipe.unet, tmp_path_factory.mktemp("alpha") / "lora")
    return folder, images(pipe)


def test_kohya_keeps_alpha_when_it_differs_from_rank(alpha8_rank4, tiny_pipeline_dir, tmp_path):
    folder, trained = alpha8_rank4
    out = tmp_path / "a8r4.safetensors"
    assert main(["export", str(folder), "--format", "kohya", "-o", str(out)]) == 0
    state, meta = load_file(str(out)), metadata(out)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8" and "raft_base_model" not in meta
    alphas = {k: float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert len(alphas) == 32 and set(alphas.values()) == {8.0}

    pipe = fresh_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(str(out))
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8
    assert (images(pipe) - trained).abs().max() <= IMAGE_TOL

    # what a converter writing alpha = rank produces (diffusers' convert_state_dict_to_kohya): half the strength
    wrong = tmp_path / "alpha_is_rank.safetensors"
    save_file({k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in state.items()}, str(wrong))
    pipe = fresh_pipe(tiny_pipeline_dir)
    pipe.load_lora_weights(str(wrong))
    assert (images(pipe) - trained).abs().max() > 1e-3  # this test would catch it


# --- diffusers, peft ------------------------------------------------------------------------------------------


def test_diffusers_export_is_the_run_lora_and_its_card(run_dir, tmp_path):
    assert main(["export", str(run_dir / "stages" / "001"), "--format", "diffusers", "-o", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").read_bytes() == (run_dir / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["export", str(run_dir), "--format", "diffusers", "-o", str(tmp_path / "f")]) == 0
    # the card, with its before/after grid: the link from final/ would point outside the folder, so the grid comes
    # along and the card links it inside
    card = (run_dir / "final" / "README.md").read_text()
    assert "](../gallery/grid_before_after.png)" in card
    assert (tmp_path / "f" / "README.md").read_text() == card.replace("](../gallery/", "](gallery/")
    grid = run_dir / "gallery" / "grid_before_after.png"
    assert (tmp_path / "f" / "gallery" / "grid_before_after.png").read_bytes() == grid.read_bytes()


def test_peft_export_loads_with_peft_and_diffusers(run_dir, tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    out = tmp_path / "peft"
    assert main(["export", str(run_dir), "--format", "peft", "-o", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"
    assert all(k.startswith("base_model.model.") for k in load_file(str(out / "adapter_model.safetensors")))

    gen = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=gen)

    def predict(unet):
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=ctx).sample

    pipe = fresh_pipe(tiny_pipeline_dir)
    base = predict(pipe.unet)
    pipe.load_lora_weights(str(run_dir / "final"))
    want = predict(pipe.unet)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir), subfolder="unet")
    got_peft = predict(PeftModel.from_pretrained(unet, str(out)).base_model.model)
    unet = UNet2DConditionModel.from_pretrained(str(tiny_pipeline_dir), subfolder="unet")
    unet.load_lora_adapter(str(out), weight_name="adapter_model.safetensors", prefix="base_model.model")
    assert unet.peft_config["default_0"].lora_alpha == 16
    got_diffusers = predict(unet)
    assert (want - base).abs().max() > 1e-2
    assert (got_peft - want).abs().max() <= IMAGE_TOL and (got_diffusers - want).abs().max() <= IMAGE_TOL


# --- merge ----------------------------------------------------------------------------------------------------


def test_merged_model_matches_base_plus_lora(run_dir, tiny_pipeline_dir, lora_images, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merge", "-o", str(out)]) == 0
    single = out / "merged.safetensors"
    assert (out / "model_index.json").is_file() and single.is_file()
    base, tuned = lora_images

    merged = fresh_pipe(out)
    assert not any("lora" in k for k in merged.unet.state_dict())  # plain weights, no adapter
    assert (images(merged) - tuned).abs().max() <= MERGE_TOL
    assert (images(merged) - base).abs().max() > 1e-2

    keys = load_file(str(single))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys and "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    one = StableDiffusionPipeline.from_single_file(str(single), config=str(out), local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)  # fmt: skip
    one.set_progress_bar_config(disable=True)
    for part in ("unet", "vae", "text_encoder"):
        a, b = getattr(merged, part).state_dict(), getattr(one, part).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(images(one), images(merged))


def test_single_file_names_match_diffusers_reader_at_sd15_size():
    """The SD 1.5 UNet and VAE (real configs, weights on the meta device: no memory) go to the original names and
    diffusers' own original-to-diffusers converter brings every tensor back to the same name and shape."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from raft_diffusion.diffusion.export import unet_to_ldm, vae_to_ldm

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8, layers_per_block=2, sample_size=64)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
    for model, to_ldm, back in ((unet, unet_to_ldm, convert_ldm_unet_checkpoint), (vae, vae_to_ldm, convert_ldm_vae_checkpoint)):
        state = model.state_dict()
        ldm = to_ldm(state, model.config)
        again = back(ldm, dict(model.config))
        assert set(again) == set(state), set(again) ^ set(state)
        assert all(again[k].shape == state[k].shape for k in state)
    ldm = unet_to_ldm(unet.state_dict(), unet.config)
    assert len(ldm) == 686  # SD 1.5's model.diffusion_model.* tensors
    assert ldm["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert ldm["model.diffusion_model.output_blocks.11.0.skip_connection.weight"].shape == (320, 640, 1, 1)
    assert ldm["model.diffusion_model.output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)  # upsampler, no attention
    assert ldm["model.diffusion_model.output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)  # after an attention
    assert vae_to_ldm(vae.state_dict(), vae.config)["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)


# --- the model card -------------------------------------------------------------------------------------------


def test_align_writes_a_card_with_the_runs_figures(run_dir, capsys):
    card = (run_dir / "final" / "README.md").read_text()
    base, final = read_jsonl(run_dir / "metrics.jsonl")
    assert "**brightness**" in card and "| samples per prompt (K) | 4 |" in card
    assert "| LoRA | rank 8, alpha 16.0," in card and f"licence: {LICENCE_DEFAULT}" in card
    line = next(ln for ln in card.splitlines() if ln.startswith("| held-out reward, mean |"))
    change = final["eval_reward_mean"] - base["eval_reward_mean"]
    assert line == f"| held-out reward, mean | {fmt(base['eval_reward_mean'])} | {fmt(final['eval_reward_mean'])} | {change:+.4f} |"
    assert f"| {fmt(final['eval_best_of_k'])} |" in card and "CLIP" not in card  # no eval.clip_model: no CLIP rows
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert links == ["../gallery/grid_before_after.png"]
    assert all((run_dir / "final" / link).resolve().is_file() for link in links)

    assert main(["card", str(run_dir)]) == 0  # rewriting gives the same card
    assert (run_dir / "final" / "README.md").read_text() == card
    licensed = card_text(run_dir, license="creativeml-openrail-m", grid_link="gallery/grid_before_after.png")
    assert "license: creativeml-openrail-m" in licensed.split("---")[1] and "licence: creativeml-openrail-m." in licensed
    assert "![before and after](gallery/grid_before_after.png)" in licensed


def test_card_of_a_full_finetuning_run(run_dir, tmp_path):
    import yaml

    full = tmp_path / "full"
    (full / "final").mkdir(parents=True)
    shutil.copy(run_dir / "metrics.jsonl", full / "metrics.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["train"]["method"] = "full"
    (full / "config.yaml").write_text(yaml.safe_dump(cfg))
    card = full / "final" / "README.md"
    assert main(["card", str(full), "--license", "openrail"]) == 0
    text = card.read_text()
    assert "# RAFT UNet for" in text and "UNet2DConditionModel.from_pretrained" in text and "load_lora_weights" not in text
    assert "licence: openrail." in text and "Before / after" not in text  # no gallery in this folder: no image link


def test_card_of_a_transformer_family_names_it_and_its_tags(run_dir, tmp_path):
    """A run of another family (here model.family: z-image with a hub id that is not cached, so the family comes from
    the config alone): the card says transformer, carries the family's Hub tags, and a full fine-tune loads with
    AutoModel into the family's pipeline."""
    import yaml

    run = tmp_path / "zimage"
    (run / "final").mkdir(parents=True)
    shutil.copy(run_dir / "metrics.jsonl", run / "metrics.jsonl")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"].update(pretrained="Tongyi-MAI/Z-Image", family="z-image")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = card_text(run)
    assert "A LoRA on the transformer of `Tongyi-MAI/Z-Image`" in text and "base_model: Tongyi-MAI/Z-Image" in text
    assert "- z-image\n" in text and "stable-diffusion" not in text
    cfg["train"]["method"] = "full"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    text = card_text(run)
    assert "# RAFT transformer for" in text and 'AutoModel.from_pretrained("path/to/this/folder")' in text
    assert 'DiffusionPipeline.from_pretrained("Tongyi-MAI/Z-Image", transformer=transformer)' in text


# --- push -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("offline", ["env", "network"])
def test_push_offline_is_one_line_naming_the_upload(run_dir, monkeypatch, capsys, offline):
    import socket

    if offline == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

        def no_network(*args, **kwargs):
            raise OSError("network is unreachable")

        monkeypatch.setattr(socket, "create_connection", no_network)
    assert main(["push", str(run_dir), "someone/raft-tiny"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    reason = "HF_HUB_OFFLINE is set" if offline == "env" else "no network connection to huggingface.co"
    assert err.startswith(f"error: cannot push ({reason}")
    assert err.rstrip().endswith(
        f"): would upload gallery/grid_before_after.png, pytorch_lora_weights.safetensors and README.md from {run_dir} to someone/raft-tiny"
    )


# --- bad input ------------------------------------------------------------------------------------------------


def test_sources_resolve_to_the_run(run_dir):
    from raft_diffusion.diffusion.export import resolve_source

    for path in (run_dir, run_dir / "final", run_dir / "final" / "pytorch_lora_weights.safetensors"):
        src = resolve_source(path)
        assert (src.run_dir, src.stage, src.reward) == (run_dir, 1, "brightness")
    src = resolve_source(run_dir / "stages" / "001" / "lora")
    assert (src.run_dir, src.stage) == (run_dir, 1)


def test_bad_input_is_one_clear_line(run_dir, tiny_pipeline_dir, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    (unfinished / "stages").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", unfinished / "config.yaml")
    (tmp_path / "taken.safetensors").write_bytes(b"x")
    cases = [
        (["export", str(tmp_path / "nope"), "--format", "kohya", "-o", str(tmp_path / "o")], "does not exist"),
        (["export", str(unfinished), "--format", "kohya", "-o", str(tmp_path / "o")], "has no final/pytorch_lora_weights.safetensors"),
        (
            ["export", str(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors"), "--format", "kohya", "-o", str(tmp_path / "o")],
            "holds no LoRA tensors",
        ),
        (["export", str(run_dir / "config.yaml"), "--format", "peft", "-o", str(tmp_path / "o")], "is not a .safetensors file"),
        (["export", str(tiny_pipeline_dir), "--format", "kohya", "-o", str(tmp_path / "o")], "holds no LoRA"),
        (["export", str(run_dir), "--format", "kohya", "-o", str(tmp_path / "taken")], "already exists"),
        (["export", str(run_dir), "-o", str(tmp_path / "o")], "needs --format"),
        (["export", str(run_dir), "--format", "diffusers", "-o", str(run_dir), "--overwrite"], "would overwrite the LoRA"),
        (["card", str(unfinished)], "has no final/"),
        (["push", str(unfinished), "a/b"], "has no final/"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, (argv, err)
