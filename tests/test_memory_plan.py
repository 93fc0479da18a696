"""Memory planner (``raft-diffusion plan``, align's check), phase-wise placement (``model.offload``) and the precision
paths (bf16 autocast on CPU, fp16 loss-scaling decisions, 8-bit AdamW)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.cli import main
from raft_diffusion.core.errors import ConfigError, UserError
from raft_diffusion.core.rundir import read_jsonl
from raft_diffusion.diffusion.config import config_from_dict, load_config, parse_size
from raft_diffusion.diffusion.finetune import add_lora, make_optimizer, optimizer_step, train_unet
from raft_diffusion.diffusion.plan import PHASES, LiveBytes, MemoryPlanner

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_parse_size():
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("22.5GiB") == int(22.5 * 2**30)
    assert parse_size("512 MB") == 512 * 10**6
    assert parse_size("3g") == 3 * 10**9
    with pytest.raises(ConfigError, match="not understood"):
        parse_size("lots")
    # a bare small number is a missing unit, not a budget of bytes; a large one is bytes
    for bare in ("24", 24, 80.0):
        with pytest.raises(ConfigError, match=r"has no unit: write (24|80.0)GB or (24|80.0)GiB"):
            parse_size(bare)
    assert parse_size(24 * 10**9) == parse_size("24000000000") == 24 * 10**9
    with pytest.raises(ConfigError, match="not understood"):
        load_config(TINY, ["model.max_memory=24 gigs"])
    with pytest.raises(ConfigError, match="model.offload must be one of"):
        load_config(TINY, ["model.offload=disk"])


def test_live_bytes_follows_allocations_and_frees():
    with LiveBytes() as m:
        a = torch.empty(1000, 250, device="meta")  # 1 MB
        b = a * 2  # +1 MB
        view = b.view(-1)  # a view: no new storage
        del b
        assert m.live == 2_000_000
        del view, a
        assert m.live == 0
    assert m.peak == 2_000_000


def test_live_bytes_does_not_count_views_of_weights():
    # linear runs as t(weight) + addmm: the transposed weight shares the weight's storage and is no new memory (counting
    # it made the SD 1.5 text encoder's 2-prompt encode 164 MiB, its linear weights, instead of 3.6 MiB)
    layer = torch.nn.Linear(1000, 500, device="meta", dtype=torch.bfloat16)
    x = torch.empty(3, 1000, device="meta", dtype=torch.bfloat16)
    with LiveBytes() as m:
        y = layer(x)
        assert m.live == 3 * 500 * 2  # the output only
        y.add_(1)  # in place: the same storage
        assert m.live == 3 * 500 * 2
        del y
    assert (m.peak, m.live) == (3 * 500 * 2, 0)


@pytest.fixture(scope="module")
def planner(tiny_pipeline_dir):
    cfg = load_config(TINY, [f"model.pretrained={tiny_pipeline_dir}"])
    return MemoryPlanner(cfg, torch.device("cpu"))  # the preset runs on CPU: fp32 weights


def test_planner_parameter_bytes_by_hand(planner, tiny_pipeline_dir):
    # the tiny CLIP text encoder (configs of diffusion/tiny.py): vocab 49408, width 32, MLP 37, 2 layers, 77 positions
    v, h, i, layers, pos = 49408, 32, 37, 2, 77
    per_layer = 4 * (h * h + h) + (h * i + i + i * h + h) + 2 * (2 * h)  # q, k, v, out; MLP; two LayerNorms
    params = v * h + pos * h + layers * per_layer + 2 * h  # + final LayerNorm
    assert params == 1_597_162
    assert planner.components["text_encoder"] == 4 * params + 8 * pos  # fp32 + the int64 position_ids buffer
    # every component against the real weights of the saved pipeline
    from raft_diffusion.diffusion.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu")
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        real = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        assert planner.components[name] == real, name
    # LoRA rank 8 on the preset's targets: r * (in + out) per matched Linear, as peft trains it
    targets = planner.cfg.train.target_modules
    assert planner.trainable == add_lora(pipe.unet, rank=8, alpha=16, target_modules=targets)
    # the trainable LoRA weights count in fp32 on top of the frozen UNet
    assert planner.denoiser_bytes == planner.components["unet"] + 4 * planner.trainable


def test_planner_phases_and_advice(planner):
    base = planner.base_settings()
    phases = planner.phases(base)
    assert [p.name for p in phases] == list(PHASES)
    lora = 4 * planner.trainable  # fp32 LoRA weights on the UNet
    weights = sum(planner.components.values()) + lora + sum(m.nbytes for m in planner.rewards) + planner.eval_clip.nbytes
    assert all(p.weights == weights for p in phases)  # offload none: everything resident
    train = phases[3]
    assert train.optimizer == 8 * planner.trainable  # AdamW's two fp32 moments
    assert train.activations > 4 * planner.trainable  # at least the fp32 LoRA gradients
    phased = planner.phases(planner.base_settings("phases"))
    assert phased[1].weights == weights - planner.components["text_encoder"] - planner.eval_clip.nbytes
    # gradient checkpointing keeps fewer activations; a smaller batch samples with less
    ck = type(base)(**{**vars(base), "gradient_checkpointing": True})
    assert planner.train_activations(base.train_rows, True) < planner.train_activations(base.train_rows, False)
    assert planner.peak(ck) <= planner.peak(base)
    assert planner.sample_activations(2) < planner.sample_activations(16)
    fix, tried = planner.advice(int(planner.peak(base) * 0.7), base)
    assert fix is not None and planner.peak(fix) <= planner.peak(base) * 0.7
    assert fix.overrides(base)[0] == "model.offload=phases" and tried[0].startswith("offload")


def test_plan_command_and_align_refusal(tiny_pipeline_dir, tmp_path, capsys):
    model = f"model.pretrained={tiny_pipeline_dir}"
    assert main(["plan", "--config", TINY, model, "progress=false", "--gpu-memory", "30MB"]) == 0
    out = capsys.readouterr().out
    for phase in PHASES:
        assert phase in out
    assert "does not fit" in out and "set model.offload=phases" in out
    # align refuses before any weight loads, in one line with the same advice, and writes nothing
    run = tmp_path / "refused"
    assert main(["align", "--config", TINY, "-o", str(run), model, "model.offload=none", "model.max_memory=30MB", "progress=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit" in err and "set model.offload=phases" in err
    assert not (run / "config.yaml").exists()
    # a budget that nothing fits says so
    assert main(["align", "--config", TINY, "-o", str(run), model, "model.max_memory=1MB", "progress=false"]) == 2
    assert "no switch brings it under" in capsys.readouterr().err


def _align(out, model_dir, *overrides):
    args = ["align", "--config", TINY, "-o", str(out), f"model.pretrained={model_dir}", "num_stages=1", "progress=false"]
    args += ["sampling.num_per_prompt=4", "sampling.num_inference_steps=2", "train.steps_per_stage=2", "eval.num_per_prompt=1", *overrides]
    assert main(args) == 0
    stage = out / "stages/001"
    rewards = [[r["reward"] for r in read_jsonl(stage / name)] for name in ("samples.jsonl", "eval.jsonl")]
    return (stage / "lora/pytorch_lora_weights.safetensors").read_bytes(), rewards


@pytest.mark.slow  # two tiny align runs: ~15 CPU s, over the default run's budget
def test_phase_placement_is_bit_identical(tiny_pipeline_dir, tmp_path):
    lora, rewards = _align(tmp_path / "plain", tiny_pipeline_dir, "model.offload=none")
    assert load_file(str(tmp_path / "plain/stages/001/lora/pytorch_lora_weights.safetensors"))  # a real LoRA
    # sequential makes every move phases makes, and moves the denoiser off while scoring (on CPU: same device)
    assert _align(tmp_path / "seq", tiny_pipeline_dir, "model.offload=sequential") == (lora, rewards)


@pytest.mark.slow
def test_vae_slicing_changes_images_in_the_last_bits_only(tiny_pipeline_dir, tmp_path):
    # VAE slicing decodes one image at a time: the LoRA (trained on the sampler's latents) is bitwise the same, the
    # images round differently in the last bits
    lora, rewards = _align(tmp_path / "plain", tiny_pipeline_dir)
    sliced_lora, sliced = _align(tmp_path / "sliced", tiny_pipeline_dir, "model.vae_slicing=true")
    assert sliced_lora == lora
    assert all(a == pytest.approx(b, abs=1e-6) for x, y in zip(rewards, sliced) for a, b in zip(x, y))


def test_bf16_autocast_training_runs_on_cpu_and_changes_the_lora(load_tiny_pipe):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 4, 16, 16, generator=gen)
    results = {}
    for mp in ("no", "bf16"):
        pipe = load_tiny_pipe()
        add_lora(pipe.unet, rank=4, init_seed=0)
        embeds = torch.randn(4, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
        before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
        out = train_unet(pipe, latents, embeds, steps=3, batch_size=4, learning_rate=1e-2, mixed_precision=mp, progress=False)
        after = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if p.requires_grad}
        assert all(p.dtype == torch.float32 for p in after.values())  # fp32 master weights
        assert any(not torch.equal(before[n], after[n]) for n in before)
        results[mp] = (out["loss_mean"], after)
    fp32, bf16 = results["no"], results["bf16"]
    diff = max((fp32[1][n] - bf16[1][n]).abs().max().item() for n in fp32[1])
    assert diff > 0 and all(torch.isfinite(w).all() for w in bf16[1].values())  # the bf16 forward changes the LoRA
    assert fp32[0] != bf16[0] and abs(fp32[0] - bf16[0]) < 0.05 * abs(fp32[0])  # the same loss to bf16 precision


def test_grad_scaler_skips_inf_steps_and_lowers_the_scale():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)

    def backward(x):  # d/dw sum(w * x) = x, scaled by the scaler
        opt.zero_grad(set_to_none=True)
        scaler.scale((w * x).sum()).backward()

    # an inf gradient: no step, the scale halved
    backward(torch.tensor([1.0, float("inf"), 1.0]))
    assert optimizer_step(opt, [w], scaler, max_grad_norm=1.0) is False
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() == 512.0
    # finite gradients: a step of lr * the unscaled gradient, the scale kept, then doubled after growth_interval=2 steps
    backward(torch.ones(3))
    assert optimizer_step(opt, [w], scaler) is True
    assert torch.allclose(w.detach(), torch.full((3,), 0.9)) and scaler.get_scale() == 512.0
    backward(torch.ones(3))
    assert optimizer_step(opt, [w], scaler) is True and scaler.get_scale() == 1024.0
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))
    # a NaN gradient: skipped as well
    backward(torch.tensor([float("nan"), 0.0, 0.0]))
    assert optimizer_step(opt, [w], scaler) is False and scaler.get_scale() == 512.0
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))
    # without a scaler every step happens
    opt.zero_grad()
    (w * torch.ones(3)).sum().backward()
    assert optimizer_step(opt, [w]) is True and torch.allclose(w.detach(), torch.full((3,), 0.7))


def test_adamw8bit_is_optional_and_says_how_to_install():
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ConfigError, match=r"pip install 'raft-diffusion\[bnb\]'"):
        config_from_dict({}, ["train.optimizer=adamw8bit"])
    with pytest.raises(UserError, match="bitsandbytes"):
        make_optimizer("adamw8bit", [torch.nn.Parameter(torch.ones(1))], lr=1e-3)
    assert isinstance(make_optimizer("adamw", [torch.nn.Parameter(torch.ones(1))], lr=1e-3), torch.optim.AdamW)


@pytest.mark.slow  # four fresh processes, each building the tiny pipeline and profiling one phase: ~60 CPU s
def test_bench_memory_plan_tiny_within_15_percent(tmp_path):
    """The bench's planned figures against the peak of the tensors each phase allocates on CPU (torch's allocator, seen
    through the profiler), for the tiny pipeline; the measurements land in a JSON file that a rerun reuses."""
    import json
    import os
    import subprocess
    import sys

    saved = tmp_path / "measured.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_memory_plan.py"), "--models", "tiny", "--no-presets", "--measurements", str(saved)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout.strip().splitlines()
    assert out[-1].startswith("plan_error_max: ") and float(out[-1].split()[-1]) <= 0.15, "\n".join(out)
    measured = json.loads(saved.read_text())
    assert set(measured) == {f"tiny/128/{p}" for p in PHASES[:4]}
    for phase in ("sample", "decode + score", "train"):
        m = measured[f"tiny/128/{phase}"]
        assert 2**20 < m["measured"] <= m["with_scratch"], (phase, m)  # MiBs of tensors; kernels' scratch on top
        row = next(line for line in out if line.startswith("tiny") and phase in line)
        planned, shown = (float(x) for x in row.split(phase)[1].split()[:2])
        assert shown == round(m["measured"] / 2**20, 1) and abs(planned / shown - 1) <= 0.15, row
