"""ranking.kl_beta for diffusion: each sample's log p_theta/p_base estimated from the denoising loss of the LoRA
and of the base at shared draws, and the pick made by reward - beta * log-ratio."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from raft_diffusion.core.config import ConfigError
from raft_diffusion.core.lora_scale import lora_b_parameters
from raft_diffusion.core.seeds import stage_seed
from raft_diffusion.core.types import Sample
from raft_diffusion.diffusion.config import config_from_dict, load_config
from raft_diffusion.diffusion.task import DiffusionTask

ROOT = Path(__file__).resolve().parents[1]
KL = ["ranking.kl_beta=0.5", "ranking.kl_draws=3", "progress=false", "eval.clip_model=null", "eval.every=0"]


@pytest.fixture(scope="module")
def task(tiny_pipeline_dir):
    return DiffusionTask(load_config(ROOT / "configs" / "tiny.yaml", [f"model.pretrained={tiny_pipeline_dir}", *KL]))


def _give_lora_a_change(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_b_parameters(unet):
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _samples(task, n: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    shape = (task.denoiser.config.in_channels, task.height // task.pipe.vae_scale_factor, task.width // task.pipe.vae_scale_factor)
    out = []
    for i in range(n):
        s = Sample(prompt_index=i % len(task.train_prompts), sample_index=i, seed=1000 + i)
        s.payload = {"latents": torch.randn(shape, generator=g)}
        out.append(s)
    return out


def _by_hand(task, s: Sample, draws: int) -> float:
    """The estimate written out: each draw's t ~ U[0, T) and noise from the sample's own generator, x_t =
    sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, the epsilon error of the UNet with its LoRA and with peft's adapters
    switched off, summed over the latent's elements; -(T/2) x their mean difference."""
    unet, T = task.denoiser, task.pipe.scheduler.config.num_train_timesteps
    abar = task.pipe.scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(stage_seed(s.seed, 0, "log_ratio"))
    cond = task.train_embeds[0][s.prompt_index : s.prompt_index + 1]
    x0 = s.payload["latents"][None].float()
    total = 0.0
    for _ in range(draws):
        t = torch.randint(0, T, (1,), generator=g)
        noise = torch.randn(x0.shape[1:], generator=g)[None]
        xt = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise
        with torch.no_grad():
            mine = unet(xt, t, encoder_hidden_states=cond).sample
            unet.disable_adapters()
            try:
                base = unet(xt, t, encoder_hidden_states=cond).sample
            finally:
                unet.enable_adapters()
        total += float(((mine - noise) ** 2).sum() - ((base - noise) ** 2).sum())
    return -T / 2 * total / draws


def test_log_ratio_is_the_denoising_loss_difference_by_hand_and_does_not_depend_on_the_batch(task):
    assert task.pipe.scheduler.config.prediction_type == "epsilon"
    _give_lora_a_change(task.denoiser)
    batch = _samples(task, 5)
    task._log_ratios(batch)
    for s in batch:
        assert s.log_ratio == pytest.approx(_by_hand(task, s, 3), rel=1e-4, abs=1e-3)
    assert len({round(s.log_ratio, 3) for s in batch}) == 5 and any(abs(s.log_ratio) > 1 for s in batch)
    again = _samples(task, 5)  # the same samples in batches of 2 and 3, in another order
    task._log_ratios(again[3:])
    task._log_ratios(again[:3][::-1])
    # float32 batches round differently, times T/2 x the element count: equal to 1e-4
    assert [s.log_ratio for s in again] == pytest.approx([s.log_ratio for s in batch], rel=1e-4, abs=1e-2)
    # a discarded sample gets none; the LoRA's bytes are untouched by the base's pass
    before = [p.detach().clone() for p in lora_b_parameters(task.denoiser)]
    odd = _samples(task, 2)
    odd[0].extras["discarded"] = "off-prompt"
    task._log_ratios(odd)
    assert odd[0].log_ratio is None and odd[1].log_ratio is not None
    assert all(torch.equal(a, b) for a, b in zip(before, lora_b_parameters(task.denoiser)))


def test_an_untrained_lora_has_log_ratio_zero_without_a_denoiser_pass(task):
    with torch.no_grad():
        for p in lora_b_parameters(task.denoiser):
            p.zero_()
    calls = []
    hook = task.denoiser.register_forward_hook(lambda *a: calls.append(1))
    try:
        batch = _samples(task, 4)
        task._log_ratios(batch)
    finally:
        hook.remove()
    assert [s.log_ratio for s in batch] == [0.0] * 4 and not calls


def _pick(rows, key, k):
    out = set()
    for p in {r["prompt_index"] for r in rows}:
        mine = sorted((r for r in rows if r["prompt_index"] == p), key=lambda r: (key(r), -r["sample_index"]), reverse=True)
        out |= {(p, r["sample_index"]) for r in mine[:k]}
    return out


def test_a_run_keeps_the_top_k_by_reward_minus_beta_log_ratio(tiny_pipeline_dir, tmp_path):
    from raft_diffusion.cli import main

    beta = 0.02
    run = tmp_path / "run"
    over = [f"model.pretrained={tiny_pipeline_dir}", *KL, f"ranking.kl_beta={beta}", "num_stages=2"]
    assert main(["align", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output-dir", str(run), *over]) == 0
    first = [json.loads(line) for line in (run / "stages" / "001" / "samples.jsonl").read_text().splitlines()]
    assert [r["log_ratio"] for r in first] == [0.0] * 32  # stage 1 samples from the base
    rows = [json.loads(line) for line in (run / "stages" / "002" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 32 and all(r["log_ratio"] != 0.0 for r in rows)
    kept = {(r["prompt_index"], r["sample_index"]) for r in rows if r.get("kept")}
    assert kept == _pick(rows, lambda r: r["reward"] - beta * r["log_ratio"], 2)
    assert kept != _pick(rows, lambda r: r["reward"], 2)  # the term changed the pick: the test can tell


@pytest.mark.parametrize(
    "over, message",
    [
        (["ranking.kl_beta=0.1", "train.method=full"], "ranking.kl_beta measures each sample against the base model, which is the LoRA switched off"),
        (["ranking.kl_draws=0"], "ranking.kl_draws must be an integer >= 1 (got 0)"),
        (["ranking.kl_beta=0.1", "mode=offline"], "an offline run (mode=offline or sampling.external_pool) picks once, at stage 1"),
    ],
)
def test_bad_kl_settings_are_one_line(over, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict({}, over)


@pytest.mark.parametrize("family", ["sd3", "sdxl"])
def test_a_family_gets_its_log_ratio_from_its_own_loss(family, tmp_path_factory):
    from raft_diffusion.diffusion.families.settings import LossSettings
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    folder = tiny_pipeline(family, tmp_path_factory.mktemp(f"tiny-{family}"))
    data = {
        "model": {"pretrained": str(folder), "device": "cpu", "max_sequence_length": 8 if family == "sd3" else None},
        "prompts": {"train": ["a red circle", "a blue square", "a green star"]},
        "sampling": {"num_per_prompt": 2, "batch_size": 8, "num_inference_steps": 2, "guidance_scale": 1.0, "height": 32, "width": 32},
        "reward": {"name": "brightness"},
        "ranking": {"mode": "local", "top_k": 1, "kl_beta": 0.1, "kl_draws": 2},
        "eval": {"every": 0, "clip_model": None},
        "progress": False,
    }
    task = DiffusionTask(config_from_dict(data))
    _give_lora_a_change(task.denoiser, seed=3)
    batch = _samples(task, 3)
    task._log_ratios(batch)
    fam, T = task.family, task.pipe.scheduler.config.num_train_timesteps
    for s in batch:  # the family's own loss (SD3: the flow velocity's error; SDXL: epsilon's) at the sample's draws, LoRA on and off
        g = torch.Generator().manual_seed(stage_seed(s.seed, 0, "log_ratio"))
        x0, total = s.payload["latents"][None], 0.0
        for _ in range(2):
            t = fam.draw_timesteps(task.pipe, 1, LossSettings(), g)[0]
            noise = torch.randn(x0.shape[1:], generator=g)[None]
            with torch.no_grad():
                mine = fam.training_loss(task.pipe, task.denoiser, x0, task.train_embeds, [s.prompt_index], noise=noise, timesteps=t)
                task.denoiser.disable_adapters()
                try:
                    base = fam.training_loss(task.pipe, task.denoiser, x0, task.train_embeds, [s.prompt_index], noise=noise, timesteps=t)
                finally:
                    task.denoiser.enable_adapters()
            total += float(mine - base) * x0[0].numel()
        assert s.log_ratio == pytest.approx(-T / 2 * total / 2, rel=1e-3)  # one row at a time against a batch of 3
    assert any(abs(s.log_ratio) > 1e-2 for s in batch)
