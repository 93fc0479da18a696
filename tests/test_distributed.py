"""Several processes (torchrun, gloo on CPU) select and train exactly what one process does, bit for bit."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raft_diffusion.core.rundir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the Python interpreter")

# configs/tiny.yaml's LoRA and training settings with a smaller pool and fewer steps, in chunks of 2 rows so that two
# processes split every step (as shipped, one chunk of 4 a step, the second process only samples: see the demo test)
CHEAP = [
    "progress=false",
    "sampling.num_per_prompt=4",
    "sampling.batch_size=4",
    "sampling.num_inference_steps=3",
    "ranking.top_k=1",
    "train.steps_per_stage=8",
    "train.chunk_size=2",
    "eval.num_per_prompt=2",
    "eval.clip_model=null",
]


def launch(args, procs=1, timeout=300):
    """``python ARGS`` or ``torchrun --nproc_per_node PROCS ARGS`` from the repository root, one thread each."""
    cmd = [sys.executable, *args] if procs == 1 else [TORCHRUN, "--standalone", f"--nproc_per_node={procs}", *args]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "RAFT_DIST_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }  # this checkout's package
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run(out, model_dir, *overrides, procs=1, timeout=300):
    cli = [
        "-m",
        "raft_diffusion",
        "align",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--output-dir",
        str(out),
        f"model.pretrained={model_dir}",
        *CHEAP,
        *overrides,
    ]
    return launch(cli, procs, timeout)


def one_and_two(tmp_path, model_dir, *overrides):
    """The same run on one process (``tmp_path/one``) and on two (``tmp_path/two``); both must succeed."""
    one, two = tmp_path / "one", tmp_path / "two"
    for out, procs in ((one, 1), (two, 2)):
        proc = run(out, model_dir, *overrides, procs=procs)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two


def lora(out, stage=None):
    where = out / "final" if stage is None else out / "stages" / f"{stage:03d}" / "lora"
    return load_file(str(where / "pytorch_lora_weights.safetensors"))


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} trained tensors differ, e.g. {differ[0]}"


@pytest.fixture(scope="module")
def single(tiny_pipeline_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "single"
    proc = run(out, tiny_pipeline_dir, "num_stages=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_two_processes_match_one(single, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "two"
    proc = run(out, tiny_pipeline_dir, "num_stages=2", procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in (1, 2):
        a = read_jsonl(single / "stages" / f"{stage:03d}" / "samples.jsonl")
        b = read_jsonl(out / "stages" / f"{stage:03d}" / "samples.jsonl")
        assert [(r["prompt_index"], r["sample_index"], r["seed"], r["kept"], r["reward"]) for r in a] == [
            (r["prompt_index"], r["sample_index"], r["seed"], r["kept"], r["reward"]) for r in b
        ]
        assert_bitwise_equal(lora(single, stage), lora(out, stage))
    assert_bitwise_equal(lora(single), lora(out))
    ma, mb = read_jsonl(single / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [r["eval_reward_mean"] for r in ma] == [r["eval_reward_mean"] for r in mb]
    assert [r.get("loss_mean") for r in ma] == [r.get("loss_mean") for r in mb]
    assert "effective batch 4 (4 x 1 accumulation) in 2 chunks of 2 rows dealt over 2 processes" in proc.stdout
    assert [r["reward_queries"] for r in mb] == [r["reward_queries"] for r in ma]  # both processes' samples, once
    assert [r["eval_reward_queries"] for r in mb] == [r["eval_reward_queries"] for r in ma] == [6, 12, 18]
    # cpu_seconds sums the processes: each loads the model and does half the work, so the sum is at least one
    # process's whole run (the main process alone would count less than that)
    assert mb[-1]["cpu_seconds"] > 0.95 * ma[-1]["cpu_seconds"], (mb[-1]["cpu_seconds"], ma[-1]["cpu_seconds"])


def test_two_processes_prune_as_one(tiny_pipeline_dir, tmp_path):
    """sampling.prune_step: each process judges its own batches half-way; the provisional scores are gathered, so
    two processes finish, score, keep and train exactly what one does."""
    # batches of 2: each prompt's 4 samples are split between the two processes
    prune = ["num_stages=1", "sampling.prune_step=2", "sampling.prune_keep=2", "sampling.batch_size=2"]
    one, two = one_and_two(tmp_path, tiny_pipeline_dir, *prune)
    fields = ("prompt_index", "sample_index", "kept", "reward", "provisional_reward", "pruned_at_step")

    def rows(out):
        return sorted(tuple(r.get(f) for f in fields) for r in read_jsonl(out / "stages" / "001" / "samples.jsonl"))

    a, b = rows(one), rows(two)
    assert a == b
    assert sum(1 for r in a if r[5] == 2) == 4 * 2  # 4 prompts x (4 drawn - 2 finished) pruned
    assert_bitwise_equal(lora(one), lora(two))
    assert read_jsonl(two / "metrics.jsonl")[-1]["reward_queries"] == 16 + 4 * 2


def test_two_processes_train_negatives_as_one(tiny_pipeline_dir, tmp_path):
    """The negative-aware loss on SD with each micro-batch's kept rows and negatives in one shared pass (no
    train.chunk_size; 2 micro-batches a step, one per process): two processes pick the same negatives from the whole
    pool and train the LoRA bit for bit as one does."""
    nft = [
        "num_stages=1",
        "ranking.negative_k=1",
        "train.negative_weight=1.0",
        "train.nft_beta=0.5",
        "train.chunk_size=null",
        "train.batch_size=2",
        "train.gradient_accumulation_steps=2",
    ]
    one, two = one_and_two(tmp_path, tiny_pipeline_dir, *nft)
    fields = ("prompt_index", "sample_index", "kept", "negative", "reward")
    a, b = ([tuple(r.get(f) for f in fields) for r in read_jsonl(out / "stages" / "001" / "samples.jsonl")] for out in (one, two))
    assert a == b and sum(1 for r in a if r[3]) == 4  # one negative per prompt
    assert_bitwise_equal(lora(one), lora(two))
    ma, mb = read_jsonl(one / "metrics.jsonl")[1], read_jsonl(two / "metrics.jsonl")[1]
    assert (ma["loss_mean"], ma["num_negative_rows"]) == (mb["loss_mean"], mb["num_negative_rows"]) == (ma["loss_mean"], 4)


def test_two_processes_rank_by_the_kl_key_as_one(tiny_pipeline_dir, tmp_path):
    """ranking.kl_beta: each process estimates its own batches' log-ratios from per-sample draws, so two processes
    write the same log-ratios, keep the same samples and train the same LoRA as one."""
    kl = ["num_stages=2", "ranking.kl_beta=0.5", "ranking.kl_draws=2"]
    one, two = one_and_two(tmp_path, tiny_pipeline_dir, *kl)
    fields = ("prompt_index", "sample_index", "kept", "reward", "log_ratio")
    a, b = ([tuple(r.get(f) for f in fields) for r in read_jsonl(out / "stages" / "002" / "samples.jsonl")] for out in (one, two))
    assert a == b and all(r[4] not in (None, 0.0) for r in a)
    assert_bitwise_equal(lora(one), lora(two))


@pytest.mark.parametrize(
    "scales",
    # the scales' variant (38 s) is slow: the default run keeps the single-process scale tests (tests/test_lora_scales.py)
    [[], pytest.param(["early_stop.lora_scales=[2,3]"], marks=pytest.mark.slow)],
    ids=["as-trained", "lora-scales"],
)
def test_two_processes_screen_and_stop_as_one(tiny_pipeline_dir, tmp_path, scales):
    """eval.screen_per_prompt with early_stop.target_rise_sd: each process screens its share of the held-out seeds, the
    screens are gathered, so two processes screen, evaluate and stop where one does; with early_stop.lora_scales
    every process screens the same scales, in the same order, and evaluates and delivers the same one."""
    # a wide band (early_stop.screen_band_se) so that stage 1's screen calls for a full evaluation whatever it reads
    over = [
        "num_stages=3",
        "eval.every=3",
        "eval.num_per_prompt=4",
        "eval.screen_per_prompt=2",
        "early_stop.target_rise_sd=0.01",
        "early_stop.screen_band_se=50",
        *scales,
    ]
    one, two = one_and_two(tmp_path, tiny_pipeline_dir, *over)
    keys = ("stage", "screen_reward_mean", "screen_reward_estimate", "screen_n", "eval_reward_mean", "eval_reward_queries")
    keys += ("lora_screen_estimates", "screen_lora_scale", "eval_lora_scale")
    a = [tuple(r.get(k) for k in keys) for r in read_jsonl(one / "metrics.jsonl")]
    b = [tuple(r.get(k) for k in keys) for r in read_jsonl(two / "metrics.jsonl")]
    assert a == b
    assert a[1][1] is not None and a[1][2] is not None and a[1][3] == 3 * 2  # stage 1 screened (3 prompts x 2 seeds), paired
    assert a[1][4] is not None  # and its screen, near the target, had it evaluated in full (the decision broadcast)
    if scales:  # stage 1 screened at 3 first, then as the walk goes
        assert a[1][6][0][0] == 3 and len(a[1][6]) >= 1
    assert (one / "early_stop.json").exists() == (two / "early_stop.json").exists()
    if (one / "early_stop.json").exists():
        stop_one, stop_two = (json.loads((out / "early_stop.json").read_text()) for out in (one, two))
        assert stop_one.get("final_lora_scale") == stop_two.get("final_lora_scale")
    assert read_jsonl(one / "stages" / "001" / "screen.jsonl") == read_jsonl(two / "stages" / "001" / "screen.jsonl")
    assert_bitwise_equal(lora(one), lora(two))


@pytest.mark.slow  # 54 s; the default run keeps the two-process match for SD and SD3 and the single-process resume tests
def test_two_process_run_resumes_with_one(single, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "resumed"
    first = run(out, tiny_pipeline_dir, "num_stages=1", procs=2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(out, tiny_pipeline_dir, "num_stages=2")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["kept"] for r in read_jsonl(out / "stages" / "002" / "samples.jsonl")] == [
        r["kept"] for r in read_jsonl(single / "stages" / "002" / "samples.jsonl")
    ]
    assert_bitwise_equal(lora(single), lora(out))


@pytest.mark.slow
def test_three_processes_match_one(single, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "three"
    proc = run(out, tiny_pipeline_dir, "num_stages=2", procs=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_bitwise_equal(lora(single), lora(out))
    assert "dealt over 3 processes (only 2 of them busy while training" in proc.stdout


# slow (42 s): the default run keeps the tiny preset's 1-vs-2-process and resume tests
@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 3])
def test_demo_preset_training_is_the_same_on_several_processes(tmp_path, procs):
    # configs/toy_aesthetic.yaml's LoRA (rank 8, attention targets) and training settings (batch 8, timesteps
    # 800-999, lr 3e-4), 6 steps a stage; as shipped (one chunk per step) and in chunks of 2 (4 chunks a step)
    args = [str(ROOT / "tests" / "dist_preset_train.py"), str(ROOT / "configs" / "toy_aesthetic.yaml")]
    settings = ["null,2", "train.steps_per_stage=6"]
    one = launch([*args, str(tmp_path / "one.pt"), *settings])
    assert one.returncode == 0, one.stderr[-3000:]
    several = launch([*args, str(tmp_path / "several.pt"), *settings], procs=procs)
    assert several.returncode == 0, several.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "several.pt")
    assert sorted(a, key=str) == [2, None]
    for chunk in a:
        assert_bitwise_equal(a[chunk], b[chunk])
    assert any(not torch.equal(a[2][k], a[None][k]) for k in a[2])  # another chunk size is another computation


@pytest.mark.slow
def test_full_finetune_is_the_same_on_three_processes(tiny_pipeline_dir, tmp_path):
    # every UNet weight trains (985k gradients a chunk), 4 chunks of 1 row a step dealt 2 / 1 / 1
    args = [str(ROOT / "tests" / "dist_preset_train.py"), str(ROOT / "configs" / "tiny.yaml")]
    settings = ["1", f"model.pretrained={tiny_pipeline_dir}", "train.method=full", "train.learning_rate=1e-4", "train.steps_per_stage=3"]
    for name, procs in (("one", 1), ("three", 3)):
        proc = launch([*args, str(tmp_path / f"{name}.pt"), *settings], procs=procs)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = torch.load(tmp_path / "one.pt")[1], torch.load(tmp_path / "three.pt")[1]
    assert sum(p.numel() for p in a.values()) > 900_000
    assert_bitwise_equal(a, b)


FAILING_REWARD = """
import os
import pathlib
import time

def fails_on_rank_1(images, prompts, **kwargs):
    if os.environ.get("RANK") == "1":
        pathlib.Path(__file__).with_suffix(".failed_at").write_text(repr(time.time()))
        raise RuntimeError("reward service unreachable from rank 1")
    return images.mean(dim=(1, 2, 3))
"""


def test_failure_in_one_process_ends_the_run(tiny_pipeline_dir, tmp_path):
    reward = tmp_path / "flaky.py"
    reward.write_text(FAILING_REWARD)
    proc = run(tmp_path / "fail", tiny_pipeline_dir, f"reward.name={reward}:fails_on_rank_1", "reward.kwargs={}", procs=2, timeout=180)
    ended = time.time()
    assert proc.returncode != 0
    assert "reward service unreachable from rank 1" in proc.stderr
    # rank 0 is left waiting in a collective; the run must end soon after rank 1's error, not at a collective
    # timeout (minutes). Timed from the failure, not from the start, so that a loaded machine's slow start-up
    # does not count.
    waited = ended - float((tmp_path / "flaky.failed_at").read_text())
    assert waited < 30, waited
    assert not (tmp_path / "fail" / "stages" / "001" / "stage.json").exists()


# SD3 (tiny MMDiT, rectified-flow loss) through the family interface: 2 prompts x 4 samples, the best 2 of each kept,
# 4 training steps of 2 rows in chunks of 1 (both processes train every step), 2 held-out images per prompt
SD3 = {
    "seed": 0,
    "num_stages": 1,
    "progress": False,
    "model": {"device": "cpu"},
    "prompts": {"train": ["a red circle", "a blue square"], "eval": ["a green star"]},
    "sampling": {"num_per_prompt": 4, "batch_size": 4, "num_inference_steps": 2, "guidance_scale": 2.0, "height": 32, "width": 32},
    "reward": {"name": "brightness", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}},
    "ranking": {"mode": "local", "top_k": 2},
    "train": {"lora_rank": 4, "steps_per_stage": 4, "batch_size": 2, "chunk_size": 1, "learning_rate": 0.01},
    "eval": {"num_per_prompt": 2, "clip_model": None},
}


@pytest.mark.parametrize("negatives", [False, True])
def test_two_processes_match_one_for_sd3(tmp_path, negatives):
    """With ``negatives`` the negative-aware loss (each prompt's worst sample pushed away from, the kept rows at beta
    0.5): the negatives are picked from the whole pool and the reference passes split over the processes as the rows
    do, so the LoRA is bitwise one process's too."""
    import yaml

    from raft_diffusion.cli import main
    from raft_diffusion.diffusion.families.tiny import tiny_pipeline

    cfg = tmp_path / "sd3.yaml"
    config = {**SD3, "model": {**SD3["model"], "pretrained": str(tiny_pipeline("sd3"))}}
    if negatives:
        config["ranking"] = {**config["ranking"], "negative_k": 1}
        config["train"] = {**config["train"], "negative_weight": 1.0, "nft_beta": 0.5}
    cfg.write_text(yaml.safe_dump(config))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["align", "--config", str(cfg), "--output-dir", str(one)]) == 0  # in this process (one thread)
    proc = launch(["-m", "raft_diffusion", "align", "--config", str(cfg), "--output-dir", str(two)], procs=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "effective batch 2 (2 x 1 accumulation) in 2 chunks of 1 row dealt over 2 processes" in proc.stdout
    a, b = (read_jsonl(out / "stages" / "001" / "samples.jsonl") for out in (one, two))
    keys = ("prompt_index", "sample_index", "seed", "kept", "reward")
    assert len(a) == 8 and sum(r["kept"] for r in a) == 4
    assert [tuple(r[k] for k in keys) for r in a] == [tuple(r[k] for k in keys) for r in b]
    assert_bitwise_equal(lora(one), lora(two))
    assert any(v.abs().max() > 0 for k, v in lora(one).items() if "lora_B" in k)  # it trained (B starts at zero)
    ma, mb = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    assert [(r["eval_reward_mean"], r.get("loss_mean")) for r in ma] == [(r["eval_reward_mean"], r.get("loss_mean")) for r in mb]
    if negatives:
        assert ma[1]["num_negatives"] == mb[1]["num_negatives"] == 2 and ma[1]["num_negative_rows"] == 2
        assert [r.get("negative", False) for r in a] == [r.get("negative", False) for r in b]
