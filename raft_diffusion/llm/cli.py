"""``raft-diffusion llm ...``: RAFT for causal language models.

    raft-diffusion llm align --config configs/llm_toy_sentiment.yaml --output-dir runs/llm [key=value ...]
    raft-diffusion llm report runs/llm                     (or --run-dir runs/llm)
    raft-diffusion llm sample runs/llm --prompt "i bought this phone and" [-n 4]
    raft-diffusion llm toyworld build [--out DIR] [--threads N]
    raft-diffusion llm config-help

``add_llm_parser(subparsers)`` adds the ``llm`` command to the main parser; ``python -m
raft_diffusion.llm.cli ...`` runs it standalone. Bad input raises ``UserError`` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..core.config import add_align_arguments
from ..core.errors import UserError, run_command
from .toyworld.cli import add_toyworld_parser


def _align(args) -> int:
    from ..core.config import load_config
    from .config import LLMConfig

    cfg = load_config(args.config, args.overrides, cls=LLMConfig)
    cfg.preflight()  # prompt files and sizes, in a second, before torch, transformers and the model load
    from ..core.rundir import check_output_dir

    check_output_dir(args.output_dir)

    from ..core.dist import launched_world_size

    if launched_world_size() > 1:  # N copies of one run would write the same run directory
        raise UserError(
            f"llm align runs on one process (the launcher started {launched_world_size()}): start it with "
            "'raft-diffusion llm align ...' or 'python -m raft_diffusion llm align ...', not torchrun or accelerate launch"
        )
    from reward_models.loading import check_reward_config

    from ..core.early_stop import read_stop
    from ..core.loop import run_raft
    from ..core.rundir import RunDir
    from .model import check_model_source, quiet_transformers
    from .report import write_report
    from .rewards import TOY_REWARDS
    from .task import LLMTask

    # a missing model folder or an unknown reward name, before the run directory and any weight
    check_model_source("model", cfg.model.pretrained)
    check_reward_config(cfg.reward, kind="text", extra=TOY_REWARDS)
    quiet_transformers()
    run = RunDir(args.output_dir)
    run.start(cfg.to_dict(), defaults=LLMConfig().to_dict())
    print(f"raft-diffusion llm: run directory {run.root} (model {cfg.model.pretrained}, reward {cfg.reward})", flush=True)
    task = LLMTask(cfg)
    rows = run_raft(cfg, task, run, should_stop=cfg.stopper())
    report = write_report(run.root) if (cfg.eval.report and cfg.eval.every) else None
    stop = read_stop(run.root)  # the loop has printed the stop ("early stop after stage N: ...")
    final_stage = stop["final_stage"] if stop else (rows[-1]["stage"] if rows else 0)
    first, last = rows[0] if rows else {}, next((r for r in rows if r["stage"] == final_stage), {})
    if "eval_reward_mean" in first and "eval_reward_mean" in last:
        print(
            f"held-out reward {first['eval_reward_mean']:.4g} -> {last['eval_reward_mean']:.4g} (stage {final_stage})"
            f" (base std {first.get('eval_reward_std', float('nan')):.3g}), distinct-2 per prompt "
            f"{first.get('eval_distinct_2_per_prompt', float('nan')):.3g} -> {last.get('eval_distinct_2_per_prompt', float('nan')):.3g}"
            f" (pooled {first.get('eval_distinct_2', float('nan')):.3g} -> {last.get('eval_distinct_2', float('nan')):.3g}), length "
            f"{first.get('eval_length', float('nan')):.3g} -> {last.get('eval_length', float('nan')):.3g} tokens",
            flush=True,
        )
    weights = "adapter" if cfg.train.method == "lora" else "model"
    print(f"done: {weights} in {run.final_dir}, metrics in {run.metrics_path}" + (f", report {report}" if report else ""), flush=True)
    return 0


def _report(args) -> int:
    from ..core.rundir import check_run_kind
    from .config import LLMConfig
    from .report import write_report

    run_dir = _run_dir(args)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist: give a folder written by raft-diffusion llm align")
    check_run_kind(run_dir, LLMConfig, "raft-diffusion llm report")
    print(write_report(run_dir))
    return 0


def _sample(args) -> int:
    """Completions from a run's final (or a given stage's) weights, for a quick look."""
    import yaml

    from ..core.config import config_from_dict
    from ..core.rundir import RunDir, check_run_kind
    from .config import LLMConfig
    from .generate import encode_prompts, sample_completions

    if args.n < 1:
        raise UserError(f"-n must be >= 1 (got {args.n}): the number of completions to print")
    if args.stage is not None and args.stage < 0:
        raise UserError(f"--stage must be >= 0 (got {args.stage}): a completed stage, or 0 for the base model")
    run = RunDir(_run_dir(args))
    if not run.config_path.is_file():
        raise UserError(f"{run.root} is not a run directory (no config.yaml)")
    check_run_kind(run.root, LLMConfig, "raft-diffusion llm sample")
    cfg = config_from_dict(yaml.safe_load(run.config_path.read_text()), cls=LLMConfig)
    from .model import quiet_transformers

    quiet_transformers()
    model, tok = load_run_model(run, cfg, stage=args.stage)
    ids = encode_prompts(tok, [args.prompt], chat=_chat(tok, cfg))
    s = cfg.sampling
    for k, c in enumerate(
        sample_completions(
            model,
            tok,
            ids * args.n,
            [args.seed + k for k in range(args.n)],
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            stop_strings=list(s.stop_strings),
        )
    ):
        print(f"[{k}] {args.prompt} | {c.text}")
    return 0


def _chat(tok, cfg) -> bool:
    from .generate import uses_chat_template

    return uses_chat_template(tok, cfg.sampling.chat_template)


def load_run_model(run, cfg, stage: int | None = None):
    """(model, tokenizer) of a run: the base model with the adapter of ``stage`` (default final/) loaded."""
    from ..core.common import resolve_device
    from .model import load_causal_lm, load_tokenizer, resolve_dtype, resolve_model_path

    sub = "lora" if cfg.train.method == "lora" else "model"
    folder = run.final_dir if stage is None else run.stage_dir(stage) / sub
    if stage == 0:
        folder = None
    elif not folder.is_dir():
        raise UserError(f"no weights at {folder}; finish a stage first (or pick --stage with a completed stage)")
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.dtype, device)
    path = resolve_model_path(cfg.model.pretrained)
    tok = load_tokenizer(cfg.model.tokenizer or path, pad_token=cfg.model.pad_token)
    if folder is not None and cfg.train.method == "full":
        return load_causal_lm(str(folder), device=device, dtype=dtype), tok
    model = load_causal_lm(path, revision=cfg.model.revision, device=device, dtype=dtype)
    if folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder)).eval()
    return model, tok


def _config_help(args) -> int:
    from ..core.config import config_help
    from .config import LLMConfig

    print("\n".join(config_help(LLMConfig)))
    return 0


def _run_dir_arguments(p: argparse.ArgumentParser) -> None:
    """The run directory, as ``RUN_DIR`` (like ``gallery``, ``card`` and ``export``) or ``--run-dir``."""
    p.add_argument("run_dir_arg", nargs="?", type=Path, metavar="RUN_DIR", help="a run directory written by llm align")
    p.add_argument("--run-dir", "-r", type=Path, help="the same, as an option")


def _run_dir(args) -> Path:
    if args.run_dir is not None and args.run_dir_arg is not None and args.run_dir != args.run_dir_arg:
        raise UserError(f"two run directories given ({args.run_dir_arg} and --run-dir {args.run_dir}): give one")
    run_dir = args.run_dir if args.run_dir is not None else args.run_dir_arg
    if run_dir is None:
        raise UserError(f"give the run directory: raft-diffusion llm {args.llm_command} RUN_DIR")
    return run_dir


def add_llm_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``llm`` (with align, report, sample, toyworld build, config-help) to an argparse subparsers object."""
    llm = subparsers.add_parser("llm", help="RAFT for causal language models (transformers + peft)")
    _add_commands(llm)
    return llm


def _add_commands(llm: argparse.ArgumentParser) -> None:
    sub = llm.add_subparsers(dest="llm_command", required=True)

    p = sub.add_parser("align", help="run RAFT on a causal LM with a text reward")
    add_align_arguments(p, example="configs/llm_toy_sentiment.yaml")
    p.set_defaults(func=_align)

    p = sub.add_parser("report", help="(re)write report.html of a run directory")
    _run_dir_arguments(p)
    p.set_defaults(func=_report)

    p = sub.add_parser("sample", help="print completions of a run's final adapter (or --stage N; 0 = base)")
    _run_dir_arguments(p)
    p.add_argument("--prompt", "-p", required=True)
    p.add_argument("-n", type=int, default=4, help="number of completions")
    p.add_argument("--seed", type=int, default=0, help="seed of the first completion (then +1 each)")
    p.add_argument("--stage", type=int, default=None, help="stage whose weights to use (default: final/)")
    p.set_defaults(func=_sample)

    add_toyworld_parser(sub)

    p = sub.add_parser("config-help", help="list every LLM config key with its default and meaning")
    p.set_defaults(func=_config_help)


def _reward_errors() -> tuple[type[BaseException], ...]:
    """The reward package's errors, which are the user's to fix (imported only when an error is being reported)."""
    from reward_models.errors import RewardError

    return (RewardError,)


def main(argv: list[str] | None = None) -> int:
    """Standalone ``python -m raft_diffusion.llm.cli align ...`` (same as ``raft-diffusion llm align ...``)."""
    parser = argparse.ArgumentParser(prog="python -m raft_diffusion.llm.cli", description="RAFT for causal language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    _add_commands(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(args, user_errors=_reward_errors)


if __name__ == "__main__":
    sys.exit(main())
