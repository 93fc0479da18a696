"""Mistakes a new user makes, each refused in one line that names the fix: a config or run of the other kind, compare's
and export's bad options, a memory size without a unit, a YAML list for a config, a preset read from another folder;
and exported files readable like any other file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raft_diffusion.core import config as core_config
from raft_diffusion.core.errors import ConfigError, UserError
from raft_diffusion.core.rundir import RunDir, check_run_kind, plain_mode
from raft_diffusion.diffusion.config import RaftConfig, load_config
from raft_diffusion.llm.config import LLMConfig

ROOT = Path(__file__).resolve().parents[1]


def test_a_config_of_the_other_kind_names_its_command():
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "llm_toy_sentiment.yaml")
    assert str(err.value) == ("unknown config key 'model.num_threads' here: it belongs to an LLM config, which runs with `raft-diffusion llm align`")
    with pytest.raises(
        ConfigError, match=r"'sampling.num_inference_steps' here: it belongs to an image \(diffusion\) config, which runs with `raft-diffusion align`"
    ):
        core_config.load_config(ROOT / "configs" / "tiny.yaml", cls=LLMConfig)
    # a plain misspelling still gets the nearest key
    with pytest.raises(ConfigError, match=r"unknown config key 'sampling.num_per_promt'; did you mean 'sampling.num_per_prompt'\?"):
        load_config(ROOT / "configs" / "tiny.yaml", ["sampling.num_per_promt=4"])


def _write_run(root: Path, cfg, stages: int = 1) -> RunDir:
    run = RunDir(root)
    run.start(cfg.to_dict(), defaults=type(cfg)().to_dict())
    run.begin()
    for s in range(1, stages + 1):
        run.mark_done(s, {})
    return run


def test_a_run_of_the_other_kind_is_named_not_diffed(tmp_path, capsys):
    llm_run = _write_run(tmp_path / "llm", LLMConfig())
    image_run = _write_run(tmp_path / "image", RaftConfig())
    with pytest.raises(UserError) as err:
        check_run_kind(llm_run.root, RaftConfig, "raft-diffusion card")
    assert str(err.value) == (
        f"{llm_run.root} holds an LLM run, which `raft-diffusion card` does not read; `raft-diffusion llm report --run-dir {llm_run.root}` reports it"
    )
    with pytest.raises(
        UserError, match=r"holds an image \(diffusion\) run, which `raft-diffusion llm report` does not read; `raft-diffusion gallery "
    ):
        check_run_kind(image_run.root, LLMConfig, "raft-diffusion llm report")
    check_run_kind(image_run.root, RaftConfig, "raft-diffusion card")  # its own kind, and no config at all: no objection
    from raft_diffusion.cli import main

    capsys.readouterr()
    assert main(["export", str(llm_run.root), "--format", "kohya", "-o", str(tmp_path / "k.safetensors")]) == 2
    assert "holds an LLM run, which `raft-diffusion export` does not read" in capsys.readouterr().err  # not "no LoRA weights"
    check_run_kind(tmp_path / "nothing", RaftConfig, "raft-diffusion card")
    # align into the other kind's run: the run is named, not a first differing key
    with pytest.raises(UserError, match=r"holds an LLM run \(`raft-diffusion llm align` resumes it\); choose a new --output-dir"):
        RunDir(llm_run.root).start(RaftConfig().to_dict(), defaults=RaftConfig().to_dict())
    # a folder of the other kind that completed no stage is started afresh, as any failed first attempt
    fresh = _write_run(tmp_path / "llm0", LLMConfig(), stages=0)
    RunDir(fresh.root).start(RaftConfig().to_dict(), defaults=RaftConfig().to_dict())


def test_memory_size_list_config_and_a_preset_from_another_folder(tmp_path, monkeypatch):
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"must be a mapping of sections \(seed:, model:, sampling:, ...\), not a list"):
        load_config(listed)
    # the toy presets name their assets relative to the repository: from another folder they are read from the package
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "toy_aesthetic_fast.yaml")
    assert Path(cfg.model.pretrained) == ROOT / "raft_diffusion/diffusion/toyworld/assets/sd"
    assert Path(cfg.reward["kwargs"]["weights"]).is_file() and Path(cfg.prompts.train).is_file()
    elsewhere = cfg
    monkeypatch.chdir(ROOT)  # from the root they stay as given (and so does a resumed run's config.yaml)
    cfg = load_config(ROOT / "configs" / "toy_aesthetic_fast.yaml")
    assert cfg.model.pretrained == "raft_diffusion/diffusion/toyworld/assets/sd"
    # a run started in one folder resumes from the other: the two spellings of a packaged path are the same config
    for first, then in ((cfg, elsewhere), (elsewhere, cfg)):
        run = _write_run(tmp_path / f"run-{first is cfg}", first)
        RunDir(run.root).start(then.to_dict(), defaults=RaftConfig().to_dict())
        changed = load_config(ROOT / "configs" / "toy_aesthetic_fast.yaml", ["ranking.top_k=2"])
        with pytest.raises(UserError, match=r"different config \(ranking.top_k: 3 there, 2 now\)"):
            RunDir(run.root).start(changed.to_dict(), defaults=RaftConfig().to_dict())


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "raft_diffusion.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_pipeline_dir):
    """A finished one-stage run of configs/tiny.yaml (about 20 s on one thread)."""
    out = tmp_path_factory.mktemp("edges") / "run"
    proc = _cli(
        "align", "--config", ROOT / "configs" / "tiny.yaml", "-o", out, f"model.pretrained={tiny_pipeline_dir}", "num_stages=1",
        "sampling.num_per_prompt=4", "train.steps_per_stage=4", "eval.num_per_prompt=2", "progress=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def test_compare_and_export_options_refused_in_one_line(tiny_run, tmp_path):
    cases = [
        (["compare", "tiny", tiny_run, "-o", tmp_path / "c", "--prompt", "a cat", "--steps", "0"],
         "error: compare needs --steps >= 1 denoising steps (got 0); 20-50 is usual"),
        (["compare", "tiny", tiny_run, "-o", tmp_path / "c", "--prompt", "a cat", "--height", "33"],
         "error: --height must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got 33; leave it out for the model's size"),
        (["compare", "tiny", tiny_run, "-o", tmp_path / "c", "--prompt", "a", "--reward", "none", "--reward-kwargs", "{a: 1}"],
         "error: --reward-kwargs with --reward none: there is no reward to give them to"),
        (["export", tiny_run, "--format", "kohya", "--merge", "-o", tmp_path / "m"],
         "error: --merge writes a merged model, not --format kohya: give one of the two"),
        (["plan", "--config", ROOT / "configs" / "tiny.yaml", "--gpu-memory", "24"],
         "error: memory size '24' (model.max_memory, --gpu-memory) has no unit: write 24GB or 24GiB"),
    ]  # fmt: skip
    for args, want in cases:
        proc = _cli(*args)
        assert (proc.returncode, proc.stderr.strip().splitlines()[-1:]) == (2, [want]), (args, proc.stderr[-1500:])


def test_config_help_into_a_closed_pipe_is_quiet():
    """`raft-diffusion config-help | head`: stdout is a pipe whose reader has gone (here closed before the first
    write, so the write always fails): exit 1 and nothing on stderr, not a BrokenPipeError traceback."""
    code = "import os, sys; r, w = os.pipe(); os.close(r); os.dup2(w, 1); from raft_diffusion.cli import main; sys.exit(main(['config-help']))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=120
    )
    assert (proc.returncode, proc.stderr) == (1, ""), proc.stderr[-1000:]


def test_export_files_read_like_plain_files(tiny_run, tmp_path):
    want = plain_mode(False)
    assert _cli("export", tiny_run, "--format", "kohya", "-o", tmp_path / "k.safetensors").returncode == 0
    assert stat.S_IMODE((tmp_path / "k.safetensors").stat().st_mode) == want
    assert _cli("export", tiny_run, "--format", "peft", "-o", tmp_path / "p").returncode == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "p").iterdir()}
    assert modes == {"adapter_config.json": want, "adapter_model.safetensors": want}


def test_compare_takes_reward_kwargs_alone_and_names_a_wrong_base(tiny_run, tmp_path):
    """--reward-kwargs without --reward re-parameterises the config's reward (a typo in them is caught); a LoRA given
    to a base of another shape is refused in one line naming the first layer that differs."""
    base = yaml.safe_load((tiny_run / "config.yaml").read_text())["model"]["pretrained"]
    common = [base, tiny_run, "--prompt", "a red circle", "--seeds", "0", "--steps", "2"]
    proc = _cli("compare", *common, "-o", tmp_path / "typo", "--reward-kwargs", "{regoin: [0, 0, 1, 1]}")
    assert proc.returncode == 2 and "bad arguments ['regoin']" in proc.stderr.strip().splitlines()[-1], proc.stderr[-1500:]
    rewards = {}
    for name, region in (("small", "[0, 0, 0.25, 0.25]"), ("whole", "[0, 0, 1, 1]")):
        proc = _cli("compare", *common, "-o", tmp_path / name, "--reward-kwargs", f"{{region: {region}}}")
        assert proc.returncode == 0, proc.stderr[-1500:]
        rows = [yaml.safe_load(line) for line in (tmp_path / name / "compare.jsonl").read_text().splitlines()]
        rewards[name] = [r["reward"] for r in rows]
    assert rewards["small"] != rewards["whole"]  # the kwargs reached the reward
    toy = ROOT / "raft_diffusion/diffusion/toyworld/assets/sd"
    proc = _cli("compare", toy, tiny_run, "-o", tmp_path / "wrong", "--prompt", "a", "--seeds", "0", "--steps", "1", "--reward", "none")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-1500:]
    assert last.startswith(f"error: the weights in {tiny_run / 'final'} do not fit this base model (") and " in the file, " in last


def test_a_batch_zscored_mix_is_named_for_the_warning():
    from raft_diffusion.diffusion.cli import _batch_zscored

    mix = {"mix": [{"name": "aesthetic"}, {"name": "clip_score", "normalize": "none"}, {"name": "pickscore", "label": "ps"}], "normalize": "zscore"}
    assert _batch_zscored(mix) == ["aesthetic", "ps"]
    assert _batch_zscored({"mix": [{"name": "aesthetic", "normalize": "zscore"}, {"name": "clip_score"}]}) == ["aesthetic"]
    assert _batch_zscored({"mix": [{"name": "aesthetic"}], "normalize": "running"}) == []
    assert _batch_zscored({"name": "aesthetic"}) == [] and _batch_zscored("aesthetic") == []
    assert _batch_zscored({"mix": ["aesthetic", {"name": "clip_score", "normalize": "none"}], "normalize": "zscore"}) == ["aesthetic"]


def test_verbose_after_the_command():
    from raft_diffusion.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["align", "--config", "c.yaml", "-o", "out", "-v"]).verbose is True
    assert parser.parse_args(["-v", "align", "--config", "c.yaml", "-o", "out"]).verbose is True
    assert parser.parse_args(["align", "--config", "c.yaml", "-o", "out"]).verbose is False
    assert parser.parse_args(["llm", "report", "--run-dir", "r", "--verbose"]).verbose is True


def test_llm_report_and_sample_take_the_run_directory_either_way(tmp_path):
    from raft_diffusion.cli import build_parser
    from raft_diffusion.llm.cli import _run_dir

    parser = build_parser()
    for argv in (["llm", "report", "runs/x"], ["llm", "report", "--run-dir", "runs/x"], ["llm", "sample", "-r", "runs/x", "-p", "hi"]):
        assert _run_dir(parser.parse_args(argv)) == Path("runs/x")
    with pytest.raises(UserError, match=r"^give the run directory: raft-diffusion llm report RUN_DIR$"):
        _run_dir(parser.parse_args(["llm", "report"]))
    with pytest.raises(UserError, match=r"two run directories given \(a and --run-dir b\): give one"):
        _run_dir(parser.parse_args(["llm", "report", "a", "--run-dir", "b"]))


def test_a_reward_changed_on_a_preset_names_the_kwargs_it_kept():
    import torch

    from raft_diffusion.diffusion.task import load_reward
    from reward_models.errors import RewardConfigError

    with pytest.raises(RewardConfigError) as err:
        load_reward({"name": "saturation", "kwargs": {"region": [0.25, 0.25, 0.75, 0.75]}}, torch.device("cpu"), torch.float32)
    kept = "the config's reward.kwargs are {'region': [0.25, 0.25, 0.75, 0.75]}"
    assert str(err.value).endswith(f"accepted: none; {kept}: with another reward.name, set reward.kwargs={{}} or its own")
    assert load_reward({"name": "brightness", "kwargs": {"region": [0, 0, 1, 1]}}, torch.device("cpu"), torch.float32) is not None


def test_an_llm_reward_changed_on_a_preset_names_the_kwargs_too():
    from raft_diffusion.llm.rewards import load_text_reward
    from reward_models.errors import RewardArgumentsError

    with pytest.raises(RewardArgumentsError) as err:
        load_text_reward({"name": "toy_sentiment", "kwargs": {"model": "lvwerra/distilbert-imdb"}}, "cpu")
    assert "bad arguments ['model']" in str(err.value)
    assert str(err.value).endswith(
        "the config's reward.kwargs are {'model': 'lvwerra/distilbert-imdb'}: with another reward.name, set reward.kwargs={} or its own"
    )


def test_compare_keeps_its_one_line_when_taking_a_failed_lora_off_fails_too(tmp_path):
    from raft_diffusion.diffusion.compare import _Weights

    class Pipe:
        def load_lora_weights(self, *a, **k):
            raise RuntimeError(
                "Error(s) in loading state_dict: size mismatch for up.lora_A.weight: copying a param with shape "
                "torch.Size([8, 64]) from checkpoint, the shape in current model is torch.Size([8, 32])."
            )

        def unload_lora_weights(self):
            raise RuntimeError("no adapter named compare")

    with pytest.raises(UserError, match=r"do not fit this base model \(up.lora_A.weight is \[8, 64\] in the file, \[8, 32\] in the model\)"):
        with _Weights(Pipe(), "lora", tmp_path, None):
            pass


@pytest.mark.parametrize(
    "argv, message",
    [
        (["llm", "sample", "RUN", "-p", "hi", "-n", "0"], "error: -n must be >= 1 (got 0): the number of completions to print"),
        (["llm", "sample", "RUN", "-p", "hi", "--stage", "-1"], "error: --stage must be >= 0 (got -1): a completed stage, or 0 for the base model"),
        (["llm", "report", "MISSING"], "error: run directory MISSING does not exist: give a folder written by raft-diffusion llm align"),
    ],
)
def test_llm_sample_and_report_refuse_bad_options_in_one_line(tmp_path, capsys, argv, message):
    """-n 0 used to load the model and print nothing (exit 0); --stage -1 looked for stages/-01; a missing run
    directory was said to have 'no evaluation yet'."""
    from raft_diffusion.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained": "toy"}}))
    paths = {"RUN": str(tmp_path / "run"), "MISSING": str(tmp_path / "missing")}
    assert main([paths.get(a, a) for a in argv]) == 2
    assert capsys.readouterr().err.strip() == message.replace("MISSING", paths["MISSING"])


def test_an_unknown_reward_is_refused_before_the_run_directory(tmp_path, capsys):
    """A misspelt reward name used to be found when the reward loaded, after the "run directory" line; now it is
    refused with the nearest name before anything is written, and a mix names the item."""
    from raft_diffusion.cli import main

    run = tmp_path / "run"
    assert main(["align", "--config", str(ROOT / "configs" / "tiny.yaml"), "-o", str(run), "reward.name=aestetic"]) == 2
    out = capsys.readouterr()
    assert "run directory" not in out.out and not run.exists()
    assert out.err.startswith("error: unknown reward 'aestetic'; did you mean 'aesthetic'?") and len(out.err.strip().splitlines()) == 1


def test_check_reward_config_names_without_loading_anything(tmp_path):
    from reward_models.errors import RewardConfigError, UnknownRewardError
    from reward_models.loading import check_reward_config

    check_reward_config("brightness")
    check_reward_config({"name": "aesthetic", "kwargs": {"weights": "nowhere.safetensors"}})  # weights are read at load
    check_reward_config({"name": "no_such_package.rewards:score"})  # a module:function form is imported at load
    check_reward_config({"mix": ["brightness", {"name": len, "weight": 2}]})
    with pytest.raises(UnknownRewardError, match=r"unknown reward 'saturaton'; did you mean 'saturation'\?"):
        check_reward_config({"mix": ["brightness", {"name": "saturaton"}]})
    with pytest.raises(RewardConfigError, match=r"reward name must be a string or a callable, got int 5"):
        check_reward_config({"name": 5})
    with pytest.raises(RewardConfigError, match=r"reward mix item 1: unknown keys \['wieght'\]"):
        check_reward_config({"mix": ["brightness", {"name": "saturation", "wieght": 2}]})


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "reward.name=sentimnt",
            "error: unknown reward 'sentimnt'; did you mean 'toy_sentiment'? valid names: sequence_classifier, toy_gold, toy_sentiment;",
        ),
        ("model.pretrained=./no/such/model", "error: model folder not found: ./no/such/model; give an existing folder"),
    ],
)
def test_llm_align_refuses_a_bad_reward_or_model_folder_before_the_run_directory(tmp_path, capsys, override, message):
    """The LLM's unknown reward used to be named after the "run directory" line, with the image rewards as the valid
    names; a missing model folder, when the tokenizer loaded."""
    from raft_diffusion.cli import main

    run = tmp_path / "run"
    assert main(["llm", "align", "--config", str(ROOT / "configs" / "llm_toy_sentiment.yaml"), "-o", str(run), override]) == 2
    out = capsys.readouterr()
    assert "run directory" not in out.out and not run.exists()
    assert out.err.startswith(message) and len(out.err.strip().splitlines()) == 1, out.err
