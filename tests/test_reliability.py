"""Issue #17: failed first attempts, damaged run directories, environment errors, infinite rewards,
permissions, byte-reproducible LoRA files, resume messages, missing LLM folders."""

import errno
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from raft_diffusion.core.errors import ScoreError, UserError, run_command
from raft_diffusion.core.loop import as_rewards, run_raft
from raft_diffusion.core.rundir import RunDir, atomic_write_text, copy_dir_atomic, plain_mode, read_jsonl, write_json, write_jsonl
from raft_diffusion.diffusion.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class CountTask:
    """No model: a sample is its seed's uniform draw plus the 'model' offset mu; fine-tuning moves mu."""

    reward_name = "draw"
    skips_discarded = False

    def __init__(self, reward=None):
        self.mu = 0.0
        self.train_prompts = ["a", "b"]
        self.reward = reward or (lambda xs: torch.tensor(xs, dtype=torch.float64))
        self.restored_from = None

    console_metrics = ()

    def plan(self, stage):
        return None

    def discard(self, batch):
        pass

    def sample(self, stage, requests):
        for s in requests:
            s.payload = self.mu + torch.rand((), generator=torch.Generator().manual_seed(s.seed)).item()
        yield list(requests)

    def score(self, batch):
        return self.reward([s.payload for s in batch])

    def save_kept(self, stage_dir, kept):
        write_json(stage_dir / "kept.json", [s.payload for s in kept])

    def load_kept(self, stage_dir, kept):
        raise NotImplementedError

    def finetune(self, stage, kept):
        self.mu += sum(s.payload for s in kept) / len(kept)
        return {"loss_mean": -self.mu}

    def save(self, stage_dir):
        write_json(stage_dir / "weights" / "mu.json", {"mu": self.mu})

    def restore(self, stage_dir):
        self.restored_from = Path(stage_dir).name
        self.mu = json.loads((stage_dir / "weights" / "mu.json").read_text())["mu"]

    def weights_dir(self, stage_dir):
        return stage_dir / "weights"

    def evaluate(self, stage, stage_dir):
        write_jsonl(stage_dir / "eval.jsonl", [{"mu": self.mu}])
        return {"eval_reward_mean": self.mu}


def cfg_of(**over):
    base = {"num_stages": 3, "progress": False, "sampling": {"num_per_prompt": 4}, "ranking": {"top_k": 1}}
    return config_from_dict(base, [f"{k}={v}" for k, v in over.items()])


def full_run(root, cfg=None, task=None):
    cfg = cfg or cfg_of()
    run = RunDir(root)
    run.start(cfg.to_dict())
    return run_raft(cfg, task or CountTask(), run), run


def strip_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k not in ("seconds", "cpu_seconds", "eval_seconds")} for r in rows]


# -- defect 2: a failed first attempt does not block its folder -------------------------------------------


def test_start_writes_nothing_until_the_loop_begins(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start(cfg_of().to_dict())
    assert not run.root.exists()  # the model, reward and prompts may still fail to load
    run.begin()
    assert run.config_path.is_file()


def test_cli_typo_in_the_model_leaves_no_run_directory(tmp_path, capsys):
    from raft_diffusion.cli import main

    out = tmp_path / "run"
    code = main(
        [
            "align",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--output-dir",
            str(out),
            "model.pretrained=/nonexistent/typo",
            "progress=false",
            "eval.clip_model=null",
        ]
    )
    assert code == 2 and "/nonexistent/typo" in capsys.readouterr().err
    assert not out.exists()


def test_run_with_no_completed_stage_takes_a_new_config(tmp_path, capsys):
    old = cfg_of(seed=1)
    run = RunDir(tmp_path)
    run.start(old.to_dict())
    run.begin()
    run.put_metrics({"stage": 0, "eval_reward_mean": 9.0})  # the earlier attempt's base evaluation
    write_jsonl(run.stage_dir(0) / "eval.jsonl", [{"mu": 9.0}])
    (run.stage_dir(1) / "weights").mkdir(parents=True)  # and a stage it never finished

    new = cfg_of()
    rows, _ = full_run(tmp_path, new)
    out = capsys.readouterr().out
    assert "completed no stage with its earlier config (seed: 1 there, 0 now); starting it afresh" in out
    assert rows[0]["eval_reward_mean"] == 0.0  # stage 0 was evaluated again, under the new config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 0
    ref, _ = full_run(tmp_path / "ref", new)
    assert strip_time(rows) == strip_time(ref)


def test_completed_stage_still_refuses_a_new_config(tmp_path):
    full_run(tmp_path, cfg_of(num_stages=1))
    with pytest.raises(UserError, match=r"different config \(seed: 0 there, 3 now\)"):
        RunDir(tmp_path).start(cfg_of(seed=3).to_dict())


# -- defect 3: damaged run directories are detected, named and redone --------------------------------------


@pytest.fixture
def reference(tmp_path):
    rows, run = full_run(tmp_path / "ref")
    return rows, run


def test_truncated_metrics_line_redoes_that_stage(tmp_path, reference, caplog):
    ref_rows, _ = reference
    rows, run = full_run(tmp_path / "run")
    text = run.metrics_path.read_text()
    run.metrics_path.write_text(text[: len(text) - 25])  # the last row (stage 3) cut short
    task = CountTask()
    rows = run_raft(cfg_of(), task, RunDir(run.root))
    assert f"stage 3 of {run.root} is damaged ({run.metrics_path} line 4 is damaged); redoing it" in caplog.text
    assert task.restored_from == "002"
    assert strip_time(rows) == strip_time(ref_rows) == strip_time(read_jsonl(run.metrics_path))


def test_damaged_weights_are_named_and_redone(tmp_path, reference, caplog):
    ref_rows, ref = reference
    _, run = full_run(tmp_path / "run")
    weights = run.stage_dir(2) / "weights" / "mu.json"
    weights.write_text(weights.read_text()[:5])  # a truncated file
    task = CountTask()
    rows = run_raft(cfg_of(), task, RunDir(run.root))
    assert f"stage 2 of {run.root} is damaged ({weights} has 5 bytes" in caplog.text
    assert "redoing it and the stages after it" in caplog.text
    assert task.restored_from == "001"
    assert strip_time(rows) == strip_time(ref_rows)
    assert (run.final_dir / "mu.json").read_bytes() == (ref.final_dir / "mu.json").read_bytes()


def test_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    _, run = full_run(tmp_path, cfg_of(num_stages=2))
    samples = run.stage_dir(2) / "samples.jsonl"
    data = bytearray(samples.read_bytes())
    data[10] ^= 1
    samples.write_bytes(bytes(data))
    assert run.check_stage(1) is None
    assert run.check_stage(2) == f"{samples} does not match the checksum in stage.json"
    assert RunDir(run.root).recover() == 1
    assert not run.stage_dir(2).exists() and [r["stage"] for r in run.metrics()] == [0, 1]


def test_unfinished_stage_folder_is_cleared_on_resume(tmp_path):
    _, run = full_run(tmp_path, cfg_of(num_stages=1))
    junk = run.stage_dir(2) / ".lora.tmp-123" / "half.safetensors"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"\0" * 7)
    assert run.recover() == 1 and not run.stage_dir(2).exists()


# -- defect 5: environment errors are one line with what to do -----------------------------------------------


def _raise(e):
    def func(args):
        raise e

    return func


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"), ["disk is full", "rerun the same command to resume"]),
        (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), ["Permission denied (/runs/x)", "--output-dir"]),
        (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), ["read-only", "writable disk"]),
        (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/runs/file/x"), ["is a file, not a folder"]),
        (FileExistsError(errno.EEXIST, "File exists", "/runs/x"), ["a file is in the way"]),
        (MemoryError(), ["out of memory", "batch_size"]),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
            ),
            ["out of memory", "batch_size"],
        ),
    ],
)
def test_environment_errors_are_one_line(capsys, error, words):
    assert run_command(SimpleNamespace(func=_raise(error), verbose=False)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err


def test_wrapped_disk_full_is_found_in_the_cause_chain(capsys):
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Error while serializing: IoError") from inner
    except RuntimeError as e:
        wrapped = e
    assert run_command(SimpleNamespace(func=_raise(wrapped), verbose=False)) == 2
    assert "disk is full" in capsys.readouterr().err


def test_bugs_keep_their_traceback():
    with pytest.raises(KeyError):
        run_command(SimpleNamespace(func=_raise(KeyError("x")), verbose=False))
    with pytest.raises(OSError):  # --verbose shows everything
        run_command(SimpleNamespace(func=_raise(OSError(errno.ENOSPC, "full")), verbose=True))


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match=r"--output-dir .*file is a file, not a folder"):
        RunDir(f).start({})
    with pytest.raises(UserError, match=r"cannot be made: .*file is a file"):
        RunDir(f / "run").start({})
    assert f.read_text() == "x"


@pytest.mark.skipif(IS_ROOT, reason="root may write to read-only folders")
def test_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UserError, match="read-only for this user"):
            RunDir(ro / "run").start({})
    finally:
        ro.chmod(0o755)


def test_full_disk_mid_run_stays_resumable(tmp_path, capsys):
    """A stage that hits ENOSPC ends the command with one line; the rerun finishes the same run."""
    ref_rows, _ = full_run(tmp_path / "ref")

    class FullDisk(CountTask):
        def save(self, stage_dir):
            if stage_dir.name == "002":
                raise OSError(errno.ENOSPC, "No space left on device", str(stage_dir / "weights"))
            super().save(stage_dir)

    def align(task):
        cfg = cfg_of()
        run = RunDir(tmp_path / "run")
        run.start(cfg.to_dict())
        run_raft(cfg, task, run)
        return 0

    assert run_command(SimpleNamespace(func=lambda a: align(FullDisk()), verbose=False)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "rerun the same command to resume" in err
    assert RunDir(tmp_path / "run").last_completed() == 1
    assert run_command(SimpleNamespace(func=lambda a: align(CountTask()), verbose=False)) == 0
    assert "resuming" in capsys.readouterr().out
    assert strip_time(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == strip_time(ref_rows)


# -- defect 6: infinite rewards are refused, naming the reward -----------------------------------------------


def test_infinite_reward_is_refused_by_the_loop(tmp_path):
    task = CountTask(reward=lambda xs: torch.tensor([float("inf")] + xs[1:]))
    with pytest.raises(ScoreError, match=r"reward 'draw' returned inf for 1 of 8 samples; scores must be finite"):
        full_run(tmp_path, task=task)
    with pytest.raises(ScoreError, match=r"returned -inf for 2 of 3"):
        as_rewards("x", [1.0, float("-inf"), float("-inf")], 3)
    assert as_rewards("x", [1.0, None, float("nan")], 3)[0] == 1.0  # NaN / None stay "no score"


def test_loaded_rewards_refuse_infinite_scores():
    from reward_models.checks import check_reward_output, check_text_reward_output
    from reward_models.errors import RewardOutputError

    with pytest.raises(RewardOutputError, match=r"reward 'bright' returned inf for 1 of 2 images; scores must be finite"):
        check_reward_output("bright", torch.tensor([0.5, float("inf")]), 2)
    with pytest.raises(RewardOutputError, match=r"reward 'stars' returned -inf for 1 of 2 completions"):
        check_text_reward_output("stars", [1.0, float("-inf")], 2)
    assert check_text_reward_output("stars", [1.0, float("nan")], 2) == [1.0, None]


# -- defect 8: run outputs follow the umask -----------------------------------------------------------------


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(p):
    return stat.S_IMODE(Path(p).stat().st_mode)


def test_atomic_writes_end_with_plain_write_permissions(tmp_path, umask_027):
    atomic_write_text(tmp_path / "a.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o640
    os.chmod(tmp_path / "a.txt", 0o600)  # like a plain write, rewriting keeps an existing file's mode
    atomic_write_text(tmp_path / "a.txt", "y")
    assert mode(tmp_path / "a.txt") == 0o600


def test_run_outputs_are_readable_by_the_group(tmp_path, umask_027):
    import tempfile

    class PrivateSave(CountTask):  # saves like diffusers/peft through a mkdtemp folder (mode 0700)
        def save(self, stage_dir):
            stage_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=stage_dir))
            write_json(tmp / "mu.json", {"mu": self.mu})
            os.replace(tmp, stage_dir / "weights")

    _, run = full_run(tmp_path / "run", cfg_of(num_stages=2), PrivateSave())
    for p in [run.root, *run.root.rglob("*")]:
        assert mode(p) == (0o750 if p.is_dir() else 0o640), p


def test_copy_dir_atomic_gives_plain_permissions(tmp_path, umask_027):
    import tempfile

    src = Path(tempfile.mkdtemp(dir=tmp_path))
    (src / "w.bin").write_bytes(b"1")
    os.chmod(src / "w.bin", 0o600)
    copy_dir_atomic(src, tmp_path / "final")
    assert mode(tmp_path / "final") == 0o750 and mode(tmp_path / "final" / "w.bin") == 0o640


# -- defect 9: LoRA files are the same bytes in every process -------------------------------------------------
# peft holds target_modules as a set, whose order follows the process's string hash seed; written in that order,
# the same run gives different bytes in each process. Written sorted, they cannot differ.

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "ff.net.2", "time_emb_proj"]


def test_llm_adapter_config_lists_targets_sorted(tmp_path):
    from raft_diffusion.llm.model import add_lora, load_causal_lm, resolve_model_path, save_adapter

    model = load_causal_lm(resolve_model_path("toy"), device=torch.device("cpu"), dtype=torch.float32)
    model = add_lora(model, rank=2, alpha=4, dropout=0.0, target_modules="all-linear", init_seed=0)
    before = model.peft_config["default"].target_modules
    save_adapter(model, tmp_path / "lora")
    written = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["target_modules"]
    assert len(written) == len(before) > 3 and written == sorted(before)
    assert model.peft_config["default"].target_modules is before  # the live config is left as it was


def test_diffusion_lora_metadata_lists_targets_sorted(tmp_path, load_tiny_pipe):
    from safetensors import safe_open

    from raft_diffusion.diffusion import finetune as ft

    unet = load_tiny_pipe().unet
    ft.add_lora(unet, rank=2, alpha=4, dropout=0.0, target_modules=tuple(TARGETS), init_seed=0)
    ft.save_lora(unet, tmp_path / "lora")
    with safe_open(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.target_modules"] == sorted(TARGETS)  # a sorted list, not a set's arbitrary order
    # the same weights saved again give the same bytes (the writer orders metadata keys anew on every save),
    # in a folder with the permissions a plain mkdir gives
    for _ in range(3):
        ft.save_lora(unet, tmp_path / "again")
        assert (tmp_path / "again" / "pytorch_lora_weights.safetensors").read_bytes() == (
            tmp_path / "lora" / "pytorch_lora_weights.safetensors"
        ).read_bytes()
    assert (tmp_path / "again").stat().st_mode & 0o777 == plain_mode(True)


# -- defect 10: resume message, YAML positions, missing LLM folder -------------------------------------------


def test_resume_says_where_it_resumes(tmp_path, capsys):
    full_run(tmp_path, cfg_of(num_stages=1))
    capsys.readouterr()
    full_run(tmp_path, cfg_of(num_stages=2))
    assert f"resuming {tmp_path} after stage 1" in capsys.readouterr().out


def test_yaml_error_names_line_and_column(tmp_path):
    from raft_diffusion.diffusion.config import load_config

    p = tmp_path / "bad.yaml"
    p.write_text("seed: 0\nsampling:\n  num_per_prompt: [4\n  batch_size: 2\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    assert str(p) in str(e.value) and ("at line 4, column" in str(e.value) or "at line 3, column" in str(e.value))


def test_llm_missing_model_folder_says_so(tmp_path, capsys):
    from raft_diffusion.cli import main

    out = tmp_path / "run"
    code = main(
        ["llm", "align", "--config", str(ROOT / "configs" / "llm_toy_sentiment.yaml"), "--output-dir", str(out), "model.pretrained=/nonexistent/typo"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: model folder not found: /nonexistent/typo;") or err.startswith(
        "error: tokenizer folder not found: /nonexistent/typo;"
    ), err
    assert "Repo id" not in err and not out.exists()


def test_reward_probed_before_the_model_loads(tmp_path):
    """The reward scores two grey images of the configured size before the pipeline is looked at: an infinite score or
    the wrong number of scores fails there (model.pretrained names no folder, so a later check would say so instead),
    and no score (NaN) passes the probe."""
    from raft_diffusion.diffusion.config import load_config
    from raft_diffusion.diffusion.task import DiffusionTask
    from reward_models.errors import RewardOutputError
    from reward_models.registry import LoadedReward

    cfg = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"model.pretrained={tmp_path / 'no-model'}", "eval.clip_model=null", "sampling.height=32", "sampling.width=40"],
    )
    seen = []

    def reward(value, n=None):
        def score(images, prompts, **kwargs):
            seen.append((tuple(images.shape), float(images.min()), float(images.max()), list(prompts)))
            return torch.full((n or len(images),), value)

        return LoadedReward("probe", score, "image")

    with pytest.raises(RewardOutputError, match="returned inf for 2 of 2 images"):
        DiffusionTask(cfg, reward=reward(float("inf")))
    assert seen == [((2, 3, 32, 40), 0.5, 0.5, [cfg_prompt(cfg.prompts.train), cfg_prompt(cfg.prompts.eval)])]
    with pytest.raises(RewardOutputError, match="for a batch of 2"):
        DiffusionTask(cfg, reward=reward(1.0, n=3))
    with pytest.raises(UserError, match="no-model"):  # NaN is a valid answer: the probe passes, the missing model fails
        DiffusionTask(cfg, reward=reward(float("nan")))


def cfg_prompt(spec):
    from raft_diffusion.diffusion.prompts import load_prompts

    return load_prompts(spec)[0]


def test_output_dir_write_probe(tmp_path, monkeypatch):
    """--output-dir is written to before anything loads (a 4 KiB file, removed): nothing is left behind, a missing run
    folder is not created, and a full disk is one line naming the folder."""
    from raft_diffusion.core.rundir import check_output_dir

    (tmp_path / "keep.txt").write_text("x")
    check_output_dir(tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(UserError) as err:
        check_output_dir(tmp_path / "run")
    # the advice of core.errors for a full disk, without its resume hint: no run has started, nothing is kept yet
    assert str(err.value) == (
        f"--output-dir {tmp_path}/run cannot be written: No space left on device in {tmp_path}; "
        "the disk is full: free some space (or choose another --output-dir)"
    )
    monkeypatch.setattr(os, "write", real_write)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
