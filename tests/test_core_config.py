"""Config loading, overrides, validation messages; seeds; run directory."""

from pathlib import Path

import pytest
import yaml

from raft_diffusion.core.config import config_help, dump_config, valid_keys
from raft_diffusion.core.errors import ConfigError, UserError
from raft_diffusion.core.rundir import RunDir
from raft_diffusion.core.seeds import eval_seed, sample_seed
from raft_diffusion.diffusion.config import RaftConfig, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_plus_dotted_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"num_stages": 3, "sampling": {"num_per_prompt": 4}, "reward": {"name": "aesthetic"}}))
    cfg = load_config(p, ["sampling.num_per_prompt=6", "ranking.top_k=2", "prompts.train=[a cat, a dog]", "reward.kwargs.w=0.5"])
    assert cfg.num_stages == 3
    assert cfg.sampling.num_per_prompt == 6
    assert cfg.ranking.top_k == 2
    assert cfg.prompts.train == ["a cat", "a dog"]
    assert cfg.reward == {"name": "aesthetic", "kwargs": {"w": 0.5}}
    # the dump reloads to the same config
    assert load_config(_write(tmp_path / "d.yaml", dump_config(cfg))).to_dict() == cfg.to_dict()


def _write(p, text):
    p.write_text(text)
    return p


def test_override_of_free_form_mapping_starts_from_default():
    cfg = config_from_dict({}, ["reward.kwargs.scale=2"])
    assert cfg.reward == {"name": "brightness", "kwargs": {"scale": 2}}


@pytest.mark.parametrize(
    "data, overrides, message",
    [
        ({}, ["sampling.num_per_promt=3"], "unknown config key 'sampling.num_per_promt'; did you mean 'sampling.num_per_prompt'?"),
        ({"rankng": {"top_k": 1}}, [], "did you mean 'ranking'?"),
        ({}, ["topk=2"], "did you mean 'ranking.top_k'?"),
        ({}, ["ranking.top_k=9"], "ranking.top_k=9 keeps more than the sampling.num_per_prompt=8"),
        ({}, ["ranking.mode=best"], "ranking.mode must be one of local, global, threshold"),
        ({}, ["num_stages"], "is not key=value"),
        ({"sampling": 3}, [], "config section 'sampling' must be a mapping"),
        ({}, ["train.snr_gamma=0"], "train.snr_gamma must be > 0 or null (got 0"),
        ({}, ["train.empty_prompt_ratio=1"], "train.empty_prompt_ratio must be in [0, 1) (got 1"),
        ({}, ["train.timestep_range=[600,500]"], "train.timestep_range must be [lo, hi] with integers 0 <= lo < hi, or null (got [600, 500])"),
        ({}, ["train.timestep_range=500"], "train.timestep_range must be [lo, hi]"),
        ({}, ["train.timestep_ranges=[[800,1000],[900,10]]"], "train.timestep_ranges must be a non-empty list of [lo, hi] with integers"),
        ({}, ["train.timestep_ranges=[[0,1000]]", "train.timestep_range=[0,500]"], "with train.timestep_range null (got [[0, 1000]])"),
        ({}, ["train.chunk_size=0"], "train.chunk_size must be an integer >= 1 or null (got 0)"),
        ({}, ["ranking.diversity_weight=-1"], "ranking.diversity_weight must be >= 0 (got -1"),
        ({}, ["ranking.diversity_weight=2", "ranking.mode=global", "eval.clip_model=tiny"], "needs ranking.mode=local (got 'global')"),
        ({}, ["ranking.diversity_weight=2"], "ranking.diversity_weight needs eval.clip_model"),
        ({}, ["ranking.novelty_weight=-0.5"], "ranking.novelty_weight must be >= 0 (got -0.5"),
        ({}, ["ranking.novelty_weight=2", "ranking.mode=threshold", "eval.clip_model=tiny"], "needs ranking.mode=local (got 'threshold')"),
        ({}, ["ranking.novelty_weight=2"], "ranking.novelty_weight needs eval.clip_model"),
        ({}, ["ranking.prompt_match=0", "eval.clip_model=tiny"], "ranking.prompt_match must be an integer >= 1 or null (got 0)"),
        ({}, ["ranking.prompt_match=0.5", "eval.clip_model=tiny"], "ranking.prompt_match must be an integer, got 0.5"),
        ({}, ["ranking.prompt_match=1"], "ranking.prompt_match needs eval.clip_model"),
        ({}, ["ranking.skip_top=true"], "ranking.skip_top must be an integer, got true"),
        ({}, ["num_stages=false"], "num_stages must be an integer, got false"),
        ({}, ["train.learning_rate=true"], "train.learning_rate must be a number, got true"),
        ({"ranking": {"prompt_match": True}}, ["eval.clip_model=tiny"], "ranking.prompt_match must be an integer, got true"),
        ({}, ["num_stages=.inf"], "num_stages must be an integer, got inf"),
        ({}, ["ranking.kl_beta=.inf"], "ranking.kl_beta must be a finite number, got inf"),
        ({}, ["train.learning_rate=.inf"], "train.learning_rate must be a finite number, got inf"),
        ({"sampling": {"guidance_scale": float("nan")}}, [], "sampling.guidance_scale must be a finite number, got nan"),
    ],
)
def test_bad_config_is_one_clear_line(data, overrides, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config .* is a folder, not a YAML file: give a preset such as configs/tiny.yaml"):
        load_config(tmp_path)


def test_gallery_of_a_file_says_it_is_not_a_run_directory(tmp_path, capsys):
    from raft_diffusion.cli import main

    (tmp_path / "run.yaml").write_text("seed: 0\n")
    assert main(["gallery", str(tmp_path / "run.yaml")]) == 2
    assert "is a file, not a run directory: give the folder that raft-diffusion align wrote" in capsys.readouterr().err


def test_every_field_has_help():
    lines = config_help(RaftConfig)
    assert len(lines) == len(valid_keys(RaftConfig))
    assert all(line.split(": ", 1)[1].strip() for line in lines)


def test_seeds_are_pure_and_distinct():
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3)
    seeds = {sample_seed(s, st, p, k) for s in range(2) for st in range(3) for p in range(4) for k in range(5)}
    assert len(seeds) == 2 * 3 * 4 * 5
    assert eval_seed(0, 1, 2) != sample_seed(0, 0, 1, 2)
    assert 0 <= sample_seed(7, 1, 1, 1) < 2**63
    assert sample_seed(0, 1, 2, 3) == 7976667905742851037  # pinned: seeds must never change across versions


def test_rundir_resume_rules(tmp_path):
    run = RunDir(tmp_path / "run")
    cfg = config_from_dict({}).to_dict()
    run.start(cfg)
    assert not run.root.exists()  # nothing is written until the loop begins the run
    run.begin()
    run.start({**cfg, "num_stages": 20})  # extending a run is allowed
    assert run.last_completed() == 0
    for s in (0, 1, 2):
        run.put_metrics({"stage": s, "x": s})
    run.mark_done(1, {})
    with pytest.raises(UserError, match=r"different config \(seed: 0 there, 1 now\)"):
        run.start({**cfg, "seed": 1})  # refused once a stage has completed
    # how often, and which stages, are evaluated may change (scripts/bench_ddpo.py turns eval.fallback off)
    run.start({**cfg, "eval": {**cfg["eval"], "every": 1, "fallback": not cfg["eval"]["fallback"]}})
    with pytest.raises(UserError, match=r"different config \(eval.num_per_prompt: 4 there, 8 now\)"):
        run.start({**cfg, "eval": {**cfg["eval"], "num_per_prompt": 8}})  # what an evaluation computes may not
    run.mark_done(3, {})  # a gap: stage 2 never finished, so 3 cannot count
    assert run.last_completed() == 1
    run.truncate_metrics(1)
    assert [r["stage"] for r in run.metrics()] == [0, 1]
    run.put_metrics({"stage": 1, "x": 10})
    assert run.metrics() == [{"stage": 0, "x": 0}, {"stage": 1, "x": 10}]
    assert not list(run.root.rglob("*.tmp"))


# --- values refused at load time, before any heavy import (issue: bad values that failed late) -------------


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr_scheduler=bogus", "train.lr_scheduler must be one of constant, constant_with_warmup"),
        ("sampling.height=30", "sampling.height must be a multiple of 8 .*e.g. sampling.height=32"),
        ("sampling.width=4", "sampling.width must be a multiple of 8"),
        ("train.lora_dropout=2", r"train.lora_dropout must be in \[0, 1\) \(got 2.0\)"),
        ("train.lr_warmup_steps=-1", "train.lr_warmup_steps must be >= 0"),
        ("train.target_modules=[]", "train.target_modules must be a module name, a list of them"),
        ("model.dtype=int8", r"model.dtype must be one of auto, fp32, fp16 or bf16 \(got 'int8'\)"),
        (["model.device=cpu", "model.dtype=fp16"], "model.dtype fp16 is not supported on CPU: use model.dtype=fp32"),
        ("model.attention=flash", r"model.attention must be one of auto, xformers, sdpa \(got 'flash'\)"),
        ("train.lora_alpha=0", r"train.lora_alpha must be > 0 \(got 0.0\)"),
        ("train.weight_decay=-1", r"train.weight_decay must be >= 0 \(got -1.0\)"),
        ("train.max_grad_norm=-1", r"train.max_grad_norm must be >= 0 \(got -1.0\)"),
        ("sampling.eta=-5", r"sampling.eta must be in \[0, 1\] \(got -5.0\)"),
        ("model.max_memory=0GB", r"memory size '0GB' .* must be more than 0"),
    ],
)
def test_bad_values_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, [override] if isinstance(override, str) else override)


def test_a_single_target_module_is_a_list_of_one():
    assert config_from_dict({}, ["train.target_modules=to_q"]).train.target_modules == ["to_q"]
    assert config_from_dict({"train": {"target_modules": "to_k"}}).train.target_modules == ["to_k"]


def test_scheduler_names_are_the_libraries_own():
    from diffusers.optimization import SchedulerType

    from raft_diffusion.diffusion.config import LR_SCHEDULERS

    assert set(LR_SCHEDULERS) == {s.value for s in SchedulerType}


def test_dtype_and_attention_names_are_the_pipelines_own():
    from raft_diffusion.diffusion import pipeline
    from raft_diffusion.diffusion.config import ATTENTION_MODES, DTYPES

    assert set(DTYPES) == {"auto", *pipeline._DTYPES} and set(ATTENTION_MODES) == set(pipeline.ATTENTION_MODES)


def test_yaml_errors_name_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\nsampling:\n  num_per_prompt: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: .* at line \d+, column \d+"):
        load_config(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 0 # caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(latin)


def test_preflight_reads_prompt_files_and_refuses_absurd_sizes(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("a caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"prompt file .*p.txt' is not UTF-8 text"):
        config_from_dict({}, [f"prompts.train={prompts}"]).preflight()
    with pytest.raises(UserError, match=r"one stage would generate 10,000,000 samples \(10 prompts x sampling.num_per_prompt=1000000\)"):
        config_from_dict({}, ["sampling.num_per_prompt=1000000"]).preflight()
    for value, kind in (("5", "int"), ("{a: 1}", "dict")):  # not a list: no TypeError, and no mapping's keys taken as prompts
        with pytest.raises(UserError, match=f"prompts.train must be a list of prompts, a text file or builtin:NAME \\(got {kind}\\)"):
            config_from_dict({}, [f"prompts.train={value}"]).preflight()
    train, held_out = config_from_dict({}, ["prompts.eval=[a dog]"]).preflight()
    assert len(train) == 10 and held_out == ["a dog"]


def test_loading_a_config_imports_no_torch():
    """Config errors come before any heavy import: a fresh interpreter loads and checks a preset without torch."""
    import subprocess
    import sys

    code = (
        "import sys; from raft_diffusion.diffusion.config import load_config; "
        "load_config('configs/toy_aesthetic.yaml').preflight(); "
        "from raft_diffusion.llm.config import LLMConfig; from raft_diffusion.core.config import load_config as lc; "
        "lc('configs/llm_toy_sentiment.yaml', cls=LLMConfig).preflight(); import raft_diffusion.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


def test_model_family_and_flow_settings_are_checked_and_match_the_families():
    from raft_diffusion.diffusion.config import FAMILIES, WEIGHTING_SCHEMES
    from raft_diffusion.diffusion.families import registry, settings

    assert FAMILIES == {f.name: cls for cls, f in registry.FAMILIES.items()}
    assert WEIGHTING_SCHEMES == settings.WEIGHTING_SCHEMES
    assert config_from_dict({}, ["model.family=sdxl"]).model.family == "sdxl"
    with pytest.raises(ConfigError, match="model.family must be one of sd, sdxl, sd3, flux, flux2, flux2-klein, qwen-image, z-image or null"):
        config_from_dict({}, ["model.family=kandinsky"])
    with pytest.raises(ConfigError, match="train.weighting_scheme must be one of logit_normal"):
        config_from_dict({}, ["train.weighting_scheme=uniform"])


def test_a_resume_tolerates_keys_added_since_the_snapshot(tmp_path):
    """A run directory written before a key existed resumes when the key is at its default."""
    cfg = config_from_dict({})
    old = cfg.to_dict()
    del old["train"]["weighting_scheme"], old["model"]["family"]
    RunDir(tmp_path).root.mkdir(exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / "stages" / "001").mkdir(parents=True)
    (tmp_path / "stages" / "001" / "stage.json").write_text("{}")
    RunDir(tmp_path).start(cfg.to_dict(), defaults=RaftConfig().to_dict())  # no error
    with pytest.raises(UserError, match="train.weighting_scheme: 'logit_normal' there, 'cosmap' now"):
        RunDir(tmp_path).start(config_from_dict({}, ["train.weighting_scheme=cosmap"]).to_dict(), defaults=RaftConfig().to_dict())


def test_absurd_image_sizes_fail_at_load():
    with pytest.raises(ConfigError, match="sampling.height=1048576 is beyond any supported model"):
        config_from_dict({}, ["sampling.height=1048576"])


def test_a_config_error_on_the_command_line_imports_no_torch(tmp_path):
    """The CLI reports a bad value without importing torch (measured: 0.5 CPU s instead of 4)."""
    import subprocess
    import sys

    code = (
        "import sys; from raft_diffusion.cli import main; "
        f"rc = main(['align', '--config', 'configs/tiny.yaml', '-o', {str(tmp_path / 'run')!r}, 'train.lr_scheduler=bogus']); "
        "print(rc, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["2", "False"], done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: train.lr_scheduler must be one of constant, constant_with_warmup, "
        "linear, cosine, cosine_with_restarts, polynomial, piecewise_constant (got 'bogus')"
    ]
    assert not (tmp_path / "run").exists()
