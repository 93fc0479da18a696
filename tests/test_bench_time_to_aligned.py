"""scripts/bench_time_to_aligned.py end to end on the demo preset (its default, configs/toy_aesthetic_fast.yaml) cut
down to seconds: its output format."""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

REDUCED = [
    "num_stages=1",
    "sampling.num_per_prompt=2",
    "sampling.num_inference_steps=2",
    "eval.num_per_prompt=2",
    "eval.num_inference_steps=2",
    "ranking.top_k=1",
    "ranking.prompt_match=null",
    "train.steps_per_stage=2",
    "eval.screen_per_prompt=0",  # the demo's screens need more held-out seeds than 2 (test_bench_shows_a_screened_stages_rise)
]


def test_bench_prints_each_stage_and_ends_with_the_metric(tmp_path, capsys):
    from bench_time_to_aligned import main

    run = tmp_path / "run"
    assert main(["--run-dir", str(run), *REDUCED]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if re.match(r"\s*\d+ ", line)]
    assert [r[0] for r in rows] == ["0", "1"]
    # stage, cpu s, images, queries, eval q, d/sd, d gold, fidelity, diversity, bars
    assert rows[0][2:5] == ["16", "0", "16"]  # 8 held-out prompts x 2 images, the base's evaluation
    assert rows[1][2:5] == ["56", "24", "32"]  # + 12 training prompts x 2 pool images + 16 held-out again
    assert 0 < float(rows[0][1]) < float(rows[1][1]) and re.fullmatch(r"[0-4]/4", rows[1][9])
    assert lines[-3].startswith("final/ = stage 1: proxy rises >= 1 base sd: ")
    assert re.fullmatch(r"run: [\d.]+ CPU s \(measured on the align process, start to exit\), [\d.]+ M minor page faults; .*", lines[-2])
    assert re.fullmatch(r"cpu_seconds_to_bars: (inf|\d+\.\d)", lines[-1])
    # a finished run is measured as it is, N from its last metrics row
    assert main(["--run-dir", str(run)]) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert "(from the last metrics row)" in again[-2] and again[-1].split(":")[0] == "cpu_seconds_to_bars"
    # side by side with a baseline preset (here the same finished run twice): both tables, then the ratio
    assert main(["--run-dir", str(run), "--baseline", "configs/toy_aesthetic_v1.yaml", "--baseline-run-dir", str(run)]) == 0
    both = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("time to aligned: ") for line in both) == 2
    n = again[-1].split(": ")[1]
    ratio = "nan" if n == "inf" else "1.000"
    assert both[-2] == f"baseline toy_aesthetic_v1.yaml: cpu_seconds_to_bars {float(n):.1f}; this preset / baseline = {ratio}"
    assert both[-1] == again[-1]


def test_bench_shows_a_screened_stages_rise(tmp_path, capsys):
    """eval.screen_per_prompt: a stage screened, not evaluated, shows its screen's estimated rise in base sd as ~z
    (the estimate paired with the base's evaluation)."""
    import json

    from bench_time_to_aligned import main

    run = tmp_path / "run"
    reduced = [r for r in REDUCED if not r.startswith("num_stages")]
    assert main(["--run-dir", str(run), *reduced, "num_stages=2", "eval.every=2", "eval.screen_per_prompt=2", "eval.num_per_prompt=3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if re.match(r"\s*\d+ ", line)]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base, screened = metrics[0], metrics[1]
    z = (screened["screen_reward_estimate"] - base["eval_reward_mean"]) / base["eval_reward_std"]
    assert "eval_reward_mean" not in screened and screened["screen_n"] == 16
    assert rows[1][5] == f"~{z:.2f}" and rows[1][6:] == ["-"] * 4
    assert [r[4] for r in rows] == ["24", "40", "64"]  # held-out: base 8 x 3, screen 8 x 2, stage 2 8 x 3


def test_bench_runs_a_baseline_together(tmp_path, capsys):
    """--together: the baseline and the preset start at once; each run's CPU seconds are its own child's (both
    tables say they were measured on the align process), then the ratio and the metric line."""
    from bench_time_to_aligned import main

    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--baseline", "configs/toy_aesthetic_v1.yaml", "--together", *REDUCED]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    measured = [line for line in lines if line.startswith("run: ")]
    assert len(measured) == 2 and all("(measured on the align process, start to exit)" in line for line in measured)
    cpu = [float(line.split()[1]) for line in measured]
    assert all(c > 1 for c in cpu)
    assert (run / "final").is_dir() and (tmp_path / "run_baseline" / "final").is_dir()
    n_old = lines[-2].split("cpu_seconds_to_bars ")[1].split(";")[0]
    assert n_old in ("inf", f"{cpu[0]:.1f}")  # N is the run's CPU s when its final/ meets the bars (not at 2 steps)
    assert lines[-2].startswith(f"baseline toy_aesthetic_v1.yaml: cpu_seconds_to_bars {n_old}; this preset / baseline = ")
    assert re.fullmatch(r"cpu_seconds_to_bars: (inf|\d+\.\d)", lines[-1])
