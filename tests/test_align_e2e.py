"""`raft-diffusion align` end to end on the tiny pipeline: reward climbs, layout, LoRA reload, resume, errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.cli import main
from raft_diffusion.core.rundir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def align(out, model_dir, *overrides):
    return main(["align", "--config", TINY, "--output-dir", str(out), f"model.pretrained={model_dir}", "num_stages=2", "progress=false", *overrides])


def strip_time(rows):
    return [
        {k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "cpu_seconds", "eval_seconds", "lr_last")} for r in rows
    ]


@pytest.fixture(scope="module")
def full_run(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "full"
    assert align(out, tiny_pipeline_dir) == 0
    return out


def test_two_stage_run_raises_held_out_reward(full_run):
    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1, 2]
    base, last = rows[0]["eval_reward_mean"], rows[-1]["eval_reward_mean"]
    assert last > base + 0.004, (base, last)  # centre brightness on 12 fixed held-out seeds
    for r in rows[1:]:
        assert r["kept_reward_mean"] > r["reward_mean"]  # selection keeps the better samples
        assert r["num_generated"] == 32 and r["num_kept"] == 8
    assert [r["reward_queries"] for r in rows] == [0, 32, 64]
    assert [r["eval_reward_queries"] for r in rows] == [12, 24, 36]  # 3 held-out prompts x 4 images, each evaluation
    for key in ("seconds", "cpu_seconds", "eval_seconds"):
        assert 0 < rows[0][key] < rows[1][key] < rows[2][key], key
    assert rows[2]["eval_seconds"] == pytest.approx(sum(r["time_eval"] for r in rows))


def test_run_directory_layout(full_run):
    cfg = (full_run / "config.yaml").read_text()
    assert "pretrained:" in cfg and "tiny-sd" in cfg  # names the model folder, not the alias
    for stage in (1, 2):
        sdir = full_run / "stages" / f"{stage:03d}"
        samples = read_jsonl(sdir / "samples.jsonl")
        assert len(samples) == 32
        kept = [s for s in samples if s["kept"]]
        assert len(kept) == 8
        for p in range(4):  # kept = the top 2 of each prompt by reward
            mine = sorted((s for s in samples if s["prompt_index"] == p), key=lambda s: -s["reward"])
            assert [s["kept"] for s in mine[:2]] == [True, True] and not any(s["kept"] for s in mine[2:])
        for s in kept:
            assert (sdir / s["image"]).is_file()
        assert set(load_file(str(sdir / "kept_latents.safetensors"))) == {f"p{s['prompt_index']:04d}_s{s['sample_index']:03d}" for s in kept}
        assert (sdir / "lora" / "pytorch_lora_weights.safetensors").is_file()
        assert len(read_jsonl(sdir / "eval.jsonl")) == 12
    assert (full_run / "final" / "pytorch_lora_weights.safetensors").read_bytes() == (
        full_run / "stages" / "002" / "lora" / "pytorch_lora_weights.safetensors"
    ).read_bytes()


def test_final_lora_loads_in_diffusers_and_changes_images(full_run, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline

    from raft_diffusion.diffusion.generate import encode_prompts, generate_batch

    def images(pipe):
        emb, neg = encode_prompts(pipe, ["a red square"] * 2, None, True)
        return generate_batch(pipe, emb, neg, [1, 2], num_inference_steps=4, guidance_scale=2.0, height=32, width=32)[1]

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_pipeline_dir))
    base = images(pipe)
    pipe.load_lora_weights(str(full_run / "final"))
    tuned = images(pipe)
    assert (tuned - base).abs().max() > 1e-2
    # the eval images the run saved at stage 2 came from the same model: regenerate one exactly
    rows = read_jsonl(full_run / "stages" / "002" / "eval.jsonl")
    row = next(r for r in rows if r["prompt_index"] == 0)
    emb, neg = encode_prompts(pipe, [row["prompt"]], None, True)
    img = generate_batch(pipe, emb, neg, [row["seed"]], num_inference_steps=4, guidance_scale=2.0, height=32, width=32)[1]
    from reward_models import load_reward

    r = load_reward("brightness", device="cpu", region=[0.25, 0.25, 0.75, 0.75])(img, [row["prompt"]])
    assert float(r[0]) == pytest.approx(row["reward"], abs=1e-4)


@pytest.mark.slow  # 15 s, to keep the default run under 10 minutes
def test_eval_guidance_is_separate_from_the_pool(full_run, tiny_pipeline_dir, tmp_path):
    """eval.guidance_scale and eval.num_inference_steps change the held-out samples only: the pool is the
    default run's, bit for bit."""
    from raft_diffusion.diffusion.generate import encode_prompts, generate_batch
    from raft_diffusion.diffusion.pipeline import load_pipeline
    from reward_models import load_reward

    out = tmp_path / "evalg"
    assert align(out, tiny_pipeline_dir, "num_stages=1", "eval.guidance_scale=1.0", "eval.num_inference_steps=2") == 0
    pool = [r["reward"] for r in read_jsonl(out / "stages" / "001" / "samples.jsonl")]
    assert pool == [r["reward"] for r in read_jsonl(full_run / "stages" / "001" / "samples.jsonl")]
    rows = read_jsonl(out / "stages" / "000" / "eval.jsonl")
    default = read_jsonl(full_run / "stages" / "000" / "eval.jsonl")
    gaps = [abs(a["reward"] - b["reward"]) for a, b in zip(rows, default)]
    assert max(gaps) > 1e-4  # (the tiny random model barely responds to guidance)
    # the base's held-out image that moved most, regenerated without guidance and with the pool's
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    reward = load_reward("brightness", device="cpu", region=[0.25, 0.25, 0.75, 0.75])
    row = rows[gaps.index(max(gaps))]
    got = {}
    for g, steps in ((1.0, 2), (2.0, 4), (1.0, 4)):
        emb, neg = encode_prompts(pipe, [row["prompt"]], None, g > 1)
        img = generate_batch(pipe, emb, neg, [row["seed"]], num_inference_steps=steps, guidance_scale=g, height=32, width=32)[1]
        got[g, steps] = float(reward(img, [row["prompt"]])[0])
    assert got[1.0, 2] == pytest.approx(row["reward"], abs=1e-6)
    assert abs(got[2.0, 4] - row["reward"]) > 1e-4 and abs(got[1.0, 4] - row["reward"]) > 1e-6


@pytest.mark.slow  # 38 s; the default run kills and resumes runs in tests/test_fault_injection.py (bit for bit)
def test_killed_run_resumes_to_the_same_result(full_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    from raft_diffusion.diffusion.task import DiffusionTask

    out = tmp_path / "part"
    real = DiffusionTask.finetune

    def killed_in_stage_2(self, stage, kept):
        if stage == 2:
            raise KeyboardInterrupt
        return real(self, stage, kept)

    monkeypatch.setattr(DiffusionTask, "finetune", killed_in_stage_2)
    assert align(out, tiny_pipeline_dir) == 130
    assert (out / "stages" / "001" / "stage.json").exists() and not (out / "stages" / "002" / "stage.json").exists()
    monkeypatch.setattr(DiffusionTask, "finetune", real)
    assert align(out, tiny_pipeline_dir) == 0
    assert strip_time(read_jsonl(out / "metrics.jsonl")) == strip_time(read_jsonl(full_run / "metrics.jsonl"))
    assert read_jsonl(out / "stages" / "002" / "samples.jsonl") == read_jsonl(full_run / "stages" / "002" / "samples.jsonl")
    a = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(full_run / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_changed_config_is_refused(full_run, tiny_pipeline_dir, capsys):
    assert align(full_run, tiny_pipeline_dir, "ranking.top_k=1") == 2
    assert "was started with a different config (ranking.top_k: 2 there, 1 now)" in capsys.readouterr().err


BAD_REWARD = """
import torch
def two_scores_each(images, prompts, **kwargs):
    return torch.zeros(len(images), 2)
"""


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling.num_per_promt=4"], "unknown config key 'sampling.num_per_promt'; did you mean 'sampling.num_per_prompt'?"),
        (["model.pretrained=/nonexistent/model"], "/nonexistent/model"),
        (["prompts.train=[]"], "prompt"),
        (["ranking.top_k=9"], "ranking.top_k=9 keeps more than the sampling.num_per_prompt=8"),
        (["reward.name=BADFILE:two_scores_each"], "two_scores_each"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_pipeline_dir, tmp_path, capsys, overrides, message):
    bad = tmp_path / "bad_reward.py"
    bad.write_text(BAD_REWARD)
    overrides = [o.replace("BADFILE", str(bad)) for o in overrides]
    code = align(tmp_path / "run", tiny_pipeline_dir, *overrides)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raft_diffusion", "align", "--config", TINY, "--output-dir", str(tmp_path / "r"), "topk=3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'topk'; did you mean 'ranking.top_k'?"


def write_pool(folder, draw) -> Path:
    """An external-pool manifest of 3 images for each of 2 prompts; ``draw(img, p, k)`` paints image k of prompt p."""
    import numpy as np
    from PIL import Image

    rows = []
    for p, prompt in enumerate(["a red circle", "a blue square"]):
        for k in range(3):
            img = np.full((32, 32, 3), 30, dtype=np.uint8)
            draw(img, p, k)
            Image.fromarray(img).save(folder / f"{p}_{k}.png")
            rows.append({"prompt": prompt, "image": f"{p}_{k}.png"})
    manifest = folder / "pool.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def test_external_pool_replaces_sampling(tiny_pipeline_dir, tmp_path):
    """Images from any generator, listed in a JSONL manifest, are scored, ranked and trained on."""

    def draw(img, p, k):  # centre brightness ranks sample 1 first
        img[8:24, 8:24] = [60, 200, 120][k] + 10 * p

    manifest = write_pool(tmp_path, draw)
    out = tmp_path / "run"
    assert (
        align(
            out,
            tiny_pipeline_dir,
            f"sampling.external_pool={manifest}",
            "num_stages=1",
            "ranking.top_k=1",
            "train.steps_per_stage=4",
            "train.empty_prompt_ratio=0.5",
            "train.snr_gamma=5",
            "train.timestep_range=[500,1000]",
        )
        == 0
    )
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    assert [(s["prompt"], s["sample_index"], s["kept"]) for s in samples] == [
        ("a red circle", 0, False),
        ("a red circle", 1, True),
        ("a red circle", 2, False),
        ("a blue square", 0, False),
        ("a blue square", 1, True),
        ("a blue square", 2, False),
    ]
    luma = [s["reward"] for s in samples]
    assert luma[1] == pytest.approx(200 / 255, abs=0.02) and luma[0] < luma[2] < luma[1]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert read_jsonl(out / "metrics.jsonl")[-1]["reward_queries"] == 6


@pytest.mark.parametrize(
    "top_k, weight, kept",
    [
        # plain top 2 would keep an image and its copy; the spread-out pick keeps the distinct one second
        (2, "ranking.diversity_weight=100", [0, 1, 0, 1]),
        # the novelty term: the lone image's mean CLIP distance to the others is twice the copies', so it beats them
        (1, "ranking.novelty_weight=100", [0, 0]),
    ],
)
def test_diversity_terms_keep_the_distinct_image(tiny_pipeline_dir, tmp_path, top_k, weight, kept):
    """Each prompt's pool: a dim striped image and two copies of a bright square, which score higher."""

    def draw(img, p, k):
        if k == 0:  # dimmer, and a different picture: stripes
            img[8:24, 8:24:4] = 120
        else:  # samples 1 and 2 are the same bright square
            img[8:24, 8:24] = 200 + 10 * p

    manifest = write_pool(tmp_path, draw)
    out = tmp_path / "run"
    assert (
        align(
            out,
            tiny_pipeline_dir,
            f"sampling.external_pool={manifest}",
            "num_stages=1",
            f"ranking.top_k={top_k}",
            weight,
            "train.steps_per_stage=2",
            "eval.every=0",
        )
        == 0
    )
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    r = [s["reward"] for s in samples]
    assert r[1] == r[2] > r[0] and r[4] == r[5] > r[3]  # by reward alone, samples 1 (and 2) are kept
    assert [s["sample_index"] for s in samples if s["kept"]] == kept


def test_prompt_match_never_keeps_an_off_prompt_image(tiny_pipeline_dir, tmp_path):
    """ranking.prompt_match=2: a sample the eval CLIP does not match to its prompt (rank 3 or 4 of the 4
    training prompts) is scored and logged but never kept; the kept set is the top 2 of the rest."""
    from raft_diffusion.diffusion.generate import encode_prompts, generate_batch
    from raft_diffusion.diffusion.metrics import load_eval_clip, prompt_ranks
    from raft_diffusion.diffusion.pipeline import load_pipeline

    out = tmp_path / "run"
    assert align(out, tiny_pipeline_dir, "num_stages=1", "ranking.prompt_match=2", "train.steps_per_stage=2", "eval.every=0") == 0
    samples = read_jsonl(out / "stages" / "001" / "samples.jsonl")
    assert all(s["reward"] is not None for s in samples)
    off = [s for s in samples if s.get("discarded")]
    assert off and all(s["prompt_rank"] > 2 and not s["kept"] for s in off)
    assert all(s["prompt_rank"] <= 2 for s in samples if not s.get("discarded"))
    assert read_jsonl(out / "metrics.jsonl")[-1]["num_discarded"] == len(off)
    beaten = 0
    for p in range(4):
        mine = [s for s in samples if s["prompt_index"] == p]
        live = sorted((s for s in mine if not s.get("discarded")), key=lambda s: -s["reward"])
        assert {s["sample_index"] for s in mine if s["kept"]} == {s["sample_index"] for s in live[:2]}
        beaten += sum(len(live) < 2 or s["reward"] > live[1]["reward"] for s in mine if s.get("discarded"))
    assert beaten  # the gate changed the selection: plain top 2 would have kept an off-prompt image
    # the logged ranks are the eval CLIP's on the pool images, among the training prompts
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    prompts = ["a red circle", "a blue square", "a green triangle", "a yellow star"]
    mine = [s for s in samples if s["prompt_index"] == 1]
    emb, neg = encode_prompts(pipe, [s["prompt"] for s in mine], None, True)
    images = generate_batch(pipe, emb, neg, [s["seed"] for s in mine], num_inference_steps=4, guidance_scale=2.0, height=32, width=32)[1]
    clip = load_eval_clip("tiny", None)
    ranks = prompt_ranks(clip.image_embeddings(images), clip.text_embeddings(prompts), [1] * len(mine))
    assert ranks == [s["prompt_rank"] for s in mine]


@pytest.mark.slow  # ~35 CPU s; the default run checks sparse evaluation in the loop (tests/test_eval_early_stop.py)
def test_sparse_evaluation_leaves_training_bit_for_bit(full_run, tiny_pipeline_dir, tmp_path):
    """eval.every=2 skips stage 1's held-out evaluation only: every stage's pool, LoRA bytes and the evaluated
    stages' held-out images are those of the run that evaluates each stage."""
    out = tmp_path / "sparse"
    assert align(out, tiny_pipeline_dir, "eval.every=2") == 0
    rows, every = read_jsonl(out / "metrics.jsonl"), read_jsonl(full_run / "metrics.jsonl")
    assert [r["stage"] for r in rows] == [0, 1, 2] and "eval_reward_mean" not in rows[1]
    assert not (out / "stages" / "001" / "eval.jsonl").exists()
    assert [r["eval_reward_queries"] for r in rows] == [12, 12, 24]  # two evaluations of 12, not three
    for stage in (1, 2):
        sdir, fdir = out / "stages" / f"{stage:03d}", full_run / "stages" / f"{stage:03d}"
        assert read_jsonl(sdir / "samples.jsonl") == read_jsonl(fdir / "samples.jsonl")
        lora = "lora/pytorch_lora_weights.safetensors"
        assert (sdir / lora).read_bytes() == (fdir / lora).read_bytes()
    assert read_jsonl(out / "stages" / "002" / "eval.jsonl") == read_jsonl(full_run / "stages" / "002" / "eval.jsonl")
    assert rows[2]["eval_reward_mean"] == every[2]["eval_reward_mean"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").read_bytes() == (full_run / "final" / "pytorch_lora_weights.safetensors").read_bytes()


def test_fallback_evaluation_restores_the_stage_it_evaluates(full_run, tiny_pipeline_dir, tmp_path, monkeypatch):
    """eval.every=2 and a floor no stage can meet: stage 2 fails it, so stage 1 (never evaluated during the run)
    is evaluated from its saved LoRA after the stop, and its held-out images are those of the run that
    evaluated stage 1 with the live model."""
    from raft_diffusion.core.early_stop import EarlyStopper
    from raft_diffusion.diffusion.config import RaftConfig

    # twice the base model's CLIP score (a ratio the config refuses, so set on the stopper itself)
    monkeypatch.setattr(RaftConfig, "stopper", lambda self: EarlyStopper(floors=[("eval_clip_score", "prompt fidelity", 2.0)]))
    out = tmp_path / "fallback"
    assert align(out, tiny_pipeline_dir, "eval.every=2", "eval.clip_model=tiny") == 0
    rows, every = read_jsonl(out / "metrics.jsonl"), read_jsonl(full_run / "metrics.jsonl")
    assert rows[1]["eval_fallback"] is True and rows[1]["eval_reward_mean"] == every[1]["eval_reward_mean"]
    assert read_jsonl(out / "stages" / "001" / "eval.jsonl") == read_jsonl(full_run / "stages" / "001" / "eval.jsonl")
    assert [r["eval_reward_queries"] for r in rows] == [12, 12, 36]  # the last row counts the fallback evaluation
    stop = json.loads((out / "early_stop.json").read_text())
    assert stop["evaluated_after_stop"] == [1] and stop["stopped_after_stage"] == 2
