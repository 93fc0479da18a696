"""scripts/bench_ddpo.py without trl: the interpolation along DDPO's path by hand, and the bench end to end on the max
preset cut down to seconds with a DDPO side made of saved LoRAs (a zero LoRA must evaluate exactly as the base, a
changed one must not). The DDPO training itself needs trl 0.23 (trl removed DDPO in 0.24) and is not run here."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

REDUCED = [
    "sampling.num_per_prompt=2",
    "sampling.num_inference_steps=2",
    "eval.num_per_prompt=2",
    "eval.num_inference_steps=2",
    "ranking.top_k=1",
    "ranking.negative_k=0",
    "train.advantage_weights=false",
    "ranking.prompt_match=null",
    "train.steps_per_stage=2",
]


def test_along_interpolates_at_the_first_crossing():
    from bench_ddpo import along

    def at_diversity(path, target, key):
        return along(path, "diversity_ratio", target, key)

    path = [
        {"diversity_ratio": 1.0, "gold_rise": 0.0, "cpu": 0.0},
        {"diversity_ratio": 0.8, "gold_rise": 1.0, "cpu": 100.0},
        {"diversity_ratio": 0.6, "gold_rise": 2.0, "cpu": 200.0},
        {"diversity_ratio": 0.7, "gold_rise": 2.5, "cpu": 300.0},  # back up: the first crossing of 0.7 counts
        {"diversity_ratio": 0.5, "gold_rise": 3.0, "cpu": 400.0},
    ]
    assert at_diversity(path, 0.7, "gold_rise") == pytest.approx(1.5)
    assert at_diversity(path, 0.7, "cpu") == pytest.approx(150.0)
    assert at_diversity(path, 0.55, "gold_rise") == pytest.approx(2.875)  # 3/4 of the way from 0.7 to 0.5
    assert at_diversity(path, 0.8, "gold_rise") == pytest.approx(1.0)
    assert at_diversity(path, 0.4, "gold_rise") is None  # never that low
    assert along(path, "gold_rise", 2.25, "diversity_ratio") == pytest.approx(0.65)  # a rising key: 2.0 -> 2.5
    assert along(path, "gold_rise", 3.5, "cpu") is None


def test_bench_evaluates_saved_ddpo_loras_on_the_raft_runs_held_out_images(tmp_path, capsys):
    import torch
    from bench_ddpo import main, save_unet_lora

    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.task import DiffusionTask

    config = str(ROOT / "configs" / "toy_aesthetic_max.yaml")
    cfg = load_config(config, [*REDUCED, "progress=false"])
    task = DiffusionTask(cfg)
    ddpo = tmp_path / "ddpo"
    save_unet_lora(task.denoiser, ddpo / "ckpt_00032")  # B = 0: the base model
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in task.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    save_unet_lora(task.denoiser, ddpo / "ckpt_00064")
    rows = [{"images": 32, "cpu_seconds": 10.0, "dir": "ckpt_00032"}, {"images": 64, "cpu_seconds": 20.0, "dir": "ckpt_00064"}]
    (ddpo / "checkpoints.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    raft = tmp_path / "raft"
    args = ["--config", config, "--raft-run-dir", str(raft), "--raft-stages", "1", "--ddpo-dir", str(ddpo),
            "--ddpo-images", "64", "--ddpo-every", "32", "--plot", str(tmp_path / "frontier.png"),
            "--json", str(tmp_path / "bench.json"), *REDUCED]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert (raft / "final").is_dir()
    table = {line.split()[0] + (line.split()[1] if line.startswith("DDPO") else ""): line.split()
             for line in out if re.match(r"(base|RAFT stage \d+|DDPO) +\d", line)}  # fmt: skip
    assert set(table) == {"base", "RAFT", "DDPO32", "DDPO64"}

    base = [json.loads(x) for x in (raft / "stages" / "000" / "eval.jsonl").read_text().splitlines()]
    zero = [json.loads(x) for x in (ddpo / "run" / "stages" / "001" / "eval.jsonl").read_text().splitlines()]
    moved = [json.loads(x) for x in (ddpo / "run" / "stages" / "002" / "eval.jsonl").read_text().splitlines()]
    assert len(base) == len(zero) == 16  # 8 held-out prompts x 2 seeds, the RAFT run's
    assert [r["reward"] for r in zero] == [r["reward"] for r in base]  # the zero LoRA is the base, image for image
    assert [r["reward"] for r in moved] != [r["reward"] for r in base]
    # images, cpu s, d/sd, gold rise [ci], fidelity, diversity: the zero LoRA's row is the base's
    assert table["DDPO32"][1:4] == ["32", "10", "0.00"] and table["DDPO32"][-1] == "1.00"
    assert table["DDPO64"][1:3] == ["64", "20"]
    assert out[-4] == f"plot: {tmp_path / 'frontier.png'}" and (tmp_path / "frontier.png").stat().st_size > 10_000
    assert out[-3] == f"json: {tmp_path / 'bench.json'}"

    report = json.loads((tmp_path / "bench.json").read_text())
    assert [o["sampled"] for o in [report["base"], *report["ddpo"]]] == [0, 32, 64]
    assert [o["stage"] for o in report["raft"]] == [1] and report["shown_stage"] == 1
    for line in out[-2:]:  # the JSON's gaps are the printed ones
        name, value = line.split(": ")
        assert value == ("nan" if report[name] is None else f"{report[name]:+.3f}")
    assert [line.split(": ")[0] for line in out[-2:]] == ["gold_vs_ddpo_at_equal_proxy", "gold_vs_ddpo_at_equal_diversity"]


def test_compare_reads_ddpo_at_each_stages_diversity_and_proxy():
    from bench_ddpo import compare

    base = {"diversity_ratio": 1.0, "proxy_rise_sd": 0.0, "gold_rise": 0.0, "cpu": 0.0}
    ddpo = [
        {"diversity_ratio": 0.9, "proxy_rise_sd": 0.5, "gold_rise": 0.8, "cpu": 100.0},
        {"diversity_ratio": 0.7, "proxy_rise_sd": 1.0, "gold_rise": 1.6, "cpu": 200.0},
    ]
    raft = [
        {"stage": 1, "diversity_ratio": 0.8, "proxy_rise_sd": 0.75, "gold_rise": 1.0},
        {"stage": 2, "diversity_ratio": 0.75, "proxy_rise_sd": 1.2, "gold_rise": 1.5},  # past DDPO's proxy
    ]
    gaps = compare([base, *ddpo], raft, shown=1)
    one, two = raft
    # stage 1: diversity 0.8 is half way from DDPO's 0.9 to 0.7 (gold 1.2, proxy 0.75, 150 CPU s), and proxy 0.75 is
    # half way from 0.5 to 1.0 (the same point)
    assert one["ddpo_at_diversity"] == pytest.approx({"gold_rise": 1.2, "proxy_rise_sd": 0.75, "cpu": 150.0})
    assert one["ddpo_at_proxy"] == pytest.approx({"gold_rise": 1.2, "diversity_ratio": 0.8, "cpu": 150.0})
    assert gaps == pytest.approx({"gold_vs_ddpo_at_equal_diversity": -0.2, "gold_vs_ddpo_at_equal_proxy": -0.2})
    # stage 2: diversity 0.75 is 3/4 of the way from 0.9 to 0.7 (gold 1.4); DDPO never rose 1.2 sd
    assert two["ddpo_at_diversity"]["gold_rise"] == pytest.approx(1.4)
    assert two["ddpo_at_proxy"] == {"gold_rise": None, "diversity_ratio": None, "cpu": None}
    gaps = compare([base, *ddpo], raft, shown=2)
    assert gaps["gold_vs_ddpo_at_equal_diversity"] == pytest.approx(0.1) and gaps["gold_vs_ddpo_at_equal_proxy"] is None
    assert compare([base, *ddpo], raft, shown=3) == {"gold_vs_ddpo_at_equal_diversity": None,
                                                      "gold_vs_ddpo_at_equal_proxy": None}  # fmt: skip
