"""scripts/guidance_amplification.py on a hand-made run directory of the tiny SD pipeline: a stage's LoRA (random
non-zero B) and kept latents for two prompts."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from raft_diffusion.diffusion.families import get_family


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_pipeline_dir):
    from test_export_families import randomise_lora_b

    root = tmp_path_factory.mktemp("amp")
    prompts = ["a red circle", "a blue square"]
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": str(tiny_pipeline_dir)}, "prompts": {"train": prompts}}))
    stage = root / "stages" / "001"
    stage.mkdir(parents=True)
    family = get_family("sd")
    pipe = family.load(tiny_pipeline_dir, device="cpu")
    family.add_lora(pipe.unet, rank=4, targets=["to_q", "to_k", "to_v", "to_out.0"], init_seed=1)
    randomise_lora_b(pipe.unet, size=0.3)
    family.save_lora(pipe, pipe.unet, stage / "lora")
    latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    save_file({"p0000_s000": latents[0], "p0000_s003": latents[1], "p0001_s001": latents[2]}, str(stage / "kept_latents.safetensors"))
    return root, prompts, latents


def _rows(out: str) -> dict[int, tuple[float, float, float]]:
    return {int(m[0]): tuple(map(float, m[1:])) for m in re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([+-][\d.]+)\s+([\d.]+)$", out, re.M)}


def test_guided_change_is_the_conditional_one_at_guidance_1_and_by_hand_at_3(run_dir, load_script, capsys, tiny_pipeline_dir):
    root, prompts, latents = run_dir
    script = load_script("guidance_amplification")
    assert script.main([str(root), "--stage", "1", "--guidance", "1"]) == 0
    assert torch.is_grad_enabled()  # the script leaves autograd as it found it (later tests train)
    plain = _rows(capsys.readouterr().out)
    assert sorted(plain) == [100, 300, 500, 700, 850, 950] and all(r[2] == 1.0 for r in plain.values())
    assert script.main([str(root), "--stage", "1", "--guidance", "3"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    last = out.strip().splitlines()[-1]
    assert last.startswith("guided_change_ratio_max: ") and float(last.split()[-1]) == pytest.approx(max(r[2] for r in rows.values()), abs=0.006)
    # by hand at t = 950 (the first draw of the seed): one kept latent per prompt, the first in key order
    family = get_family("sd")
    pipe = family.load(tiny_pipeline_dir, device="cpu")
    pipe.load_lora_weights(str(root / "stages" / "001" / "lora"))
    x0 = latents[[0, 2]]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    a = pipe.scheduler.alphas_cumprod[950]
    xt, t = a.sqrt() * x0 + (1 - a).sqrt() * noise, torch.full((2,), 950)
    text = family.encode_prompts(pipe, [*prompts, ""], do_cfg=False).per_prompt["prompt_embeds"]
    with torch.no_grad():
        pred = {}
        for on in (True, False):
            pipe.enable_lora() if on else pipe.disable_lora()
            pred[on] = [pipe.unet(xt, t, encoder_hidden_states=e).sample.flatten(1) for e in (text[:2], text[2:].expand(2, -1, -1))]
    dc, du = pred[True][0] - pred[False][0], pred[True][1] - pred[False][1]
    ratio = ((du + 3 * (dc - du)).norm(dim=1) / dc.norm(dim=1)).mean().item()
    assert rows[950][2] == pytest.approx(ratio, abs=0.006) and abs(ratio - 1) > 0.05
    assert rows[950][0] == pytest.approx((du.norm(dim=1) / dc.norm(dim=1)).mean().item(), abs=0.006)
