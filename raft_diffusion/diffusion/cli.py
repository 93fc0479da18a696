"""The diffusion commands of ``raft-diffusion``: align, gallery, compare, export, card, push, toyworld, config-help.

``add_commands(subparsers)`` adds them to the main parser (``raft_diffusion.cli``); bad input raises
``UserError`` (one line, exit 2).
"""

from __future__ import annotations

from pathlib import Path

from ..core.config import add_align_arguments
from ..core.errors import UserError
from .toyworld.cli import add_toyworld_parser


def _align(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    cfg.preflight()  # prompt files and sizes, in a second, before torch, diffusers and the model load
    zscored = _batch_zscored(cfg.reward)
    if cfg.eval.every and zscored:
        print(
            f"warning: reward normalize zscore scores each batch against itself ({', '.join(zscored)}), so eval_reward_mean stays "
            "near 0 at every stage whatever the model does (and with it the reward curve, the card and early_stop on it); "
            "watch eval_reward_mean/<component> in metrics.jsonl, or use normalize: running",
            flush=True,
        )
    from ..core.rundir import check_output_dir

    check_output_dir(args.output_dir)

    from reward_models.loading import check_reward_config

    from ..core.dist import init_dist
    from ..core.loop import run_raft
    from ..core.rundir import RunDir
    from .families import detect_family
    from .gallery import write_gallery
    from .task import DiffusionTask, resolve_pretrained
    from .tracking import Trackers

    check_reward_config(cfg.reward, kind="image")  # an unknown reward name, before the run directory and any weight
    dist = init_dist(cfg.model.device)  # several processes under accelerate launch / torchrun
    if dist.is_main:  # one process builds the tiny model's cache, the others wait and reuse it
        cfg.model.pretrained = resolve_pretrained(cfg.model.pretrained)  # the snapshot names a real folder or hub id
    cfg.model.pretrained = dist.broadcast(cfg.model.pretrained)
    family = detect_family(cfg.model.pretrained, cfg.model.family)  # model_index.json's pipeline class, or model.family
    if cfg.train.target_modules is None:  # the family's LoRA targets, written into the snapshot
        cfg.train.target_modules = list(family.lora_targets)
    from .plan import choose_offload, run_device

    offload = choose_offload(cfg, run_device(cfg, dist))  # refuses, before any weight loads, what cannot fit
    run = RunDir(args.output_dir)
    if dist.is_main:
        run.start(cfg.to_dict(), defaults=type(cfg)().to_dict())
        print(f"raft-diffusion: run directory {run.root} (model {cfg.model.pretrained}, reward {cfg.reward})", flush=True)
    else:
        cfg.progress = False  # one set of progress bars
    dist.barrier()  # a refused resume ends every process here, not in a later collective
    task = DiffusionTask(cfg, dist=dist, offload=offload)
    trackers = Trackers(run.root, cfg) if dist.is_main else None
    try:
        run_raft(cfg, task, run, should_stop=cfg.stopper(), dist=dist, on_stage=trackers if trackers is not None and trackers.active else None)
    finally:
        if trackers is not None:
            trackers.close()
    if dist.is_main:
        print(f"done: LoRA in {run.final_dir}, metrics in {run.metrics_path}", flush=True)
        if cfg.eval.every:
            print(f"gallery: {write_gallery(run.root)}", flush=True)
        if run.final_dir.is_dir():  # the weights are saved: a card that cannot be written is a warning, not a failure
            from .card import write_card

            try:
                print(f"model card: {write_card(run.root)}", flush=True)
            except (UserError, OSError) as err:
                print(f"warning: model card not written ({err}); `raft-diffusion card {run.root}` retries", flush=True)
    return 0


def _batch_zscored(reward) -> list[str]:
    """The components of a reward mix that ``normalize: zscore`` scores against their own batch (none for one reward)."""
    if not isinstance(reward, dict) or not isinstance(reward.get("mix"), list):
        return []
    from reward_models.loading import component_normalization

    return [
        str(c.get("label") or c.get("name")) if isinstance(c, dict) else str(c)
        for c in reward["mix"]
        if component_normalization(reward, c) == "zscore"
    ]


def _plan(args) -> int:
    from .config import load_config, parse_size

    cfg = load_config(args.config, args.overrides)
    budget = parse_size(args.gpu_memory) if args.gpu_memory else (parse_size(cfg.model.max_memory) if cfg.model.max_memory else None)
    from .plan import plan_report

    print(plan_report(cfg, budget), flush=True)
    return 0


def _gallery(args) -> int:
    from .gallery import write_gallery

    if args.run_dir.is_file():
        raise UserError(f"{args.run_dir} is a file, not a run directory: give the folder that raft-diffusion align wrote")
    if not args.run_dir.is_dir():
        raise UserError(f"run directory {args.run_dir} does not exist")
    _image_run(args.run_dir, "raft-diffusion gallery")
    print(write_gallery(args.run_dir, max_grid_samples=args.max_grid_samples))
    return 0


def _compare(args) -> int:
    import yaml

    from .compare import CompareSettings, resolve_weights, run_compare, settings_from_config
    from .prompts import load_prompts

    config = args.config
    if config is None:  # a run directory given as weights brings its own settings
        run_cfg = Path(args.weights[0]) / "config.yaml"
        config = run_cfg if run_cfg.is_file() else None
    prompts = list(args.prompt or []) + (load_prompts(args.prompts) if args.prompts else [])
    reward = None
    kwargs = yaml.safe_load(args.reward_kwargs) if args.reward_kwargs else None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UserError(f"--reward-kwargs must be a mapping, e.g. '{{region: [0.25, 0.25, 0.75, 0.75]}}' (got {args.reward_kwargs!r})")
    if args.reward == "none" and kwargs is not None:
        raise UserError("--reward-kwargs with --reward none: there is no reward to give them to")
    if args.reward is not None and args.reward != "none":
        reward = {"name": args.reward, "kwargs": kwargs or {}}
    overrides = dict(
        prompts=prompts or None,
        seeds=args.seeds,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        scheduler=args.scheduler,
        negative_prompt=args.negative_prompt,
        reward=reward,
        batch_size=args.batch_size,
        family=args.family,
    )
    if config is not None:
        print(f"compare: settings from {config}", flush=True)
        settings = settings_from_config(config, **overrides)
    else:
        settings = CompareSettings(prompts=[], **{k: v for k, v in overrides.items() if v is not None and k != "prompts"})
        settings.prompts = prompts
    if args.reward == "none":
        settings.reward = None
    elif args.reward is None and kwargs is not None:  # --reward-kwargs alone: the config's reward with these kwargs
        if not settings.reward or "name" not in settings.reward:
            raise UserError("--reward-kwargs needs a reward to apply to: give --reward NAME (the config has no single named reward)")
        settings.reward = {**settings.reward, "kwargs": kwargs}
    for w in args.weights:
        resolve_weights(w)  # a clear error before any model is loaded
    page = run_compare(args.base, args.weights, args.output_dir, settings, labels=args.label, device=args.device, dtype=args.dtype)
    print(page)
    return 0


def _export(args) -> int:
    from .export import export

    if not args.merge and args.format is None:
        raise UserError("export needs --format kohya|diffusers|peft, or --merge for a merged model")
    if args.merge and args.format is not None:
        raise UserError(f"--merge writes a merged model, not --format {args.format}: give one of the two")
    if Path(args.source).is_dir():
        _image_run(Path(args.source), "raft-diffusion export")
    paths = export(args.source, args.format, args.output, merge=args.merge, base=args.base, license=args.license,
                   single_file=not args.no_single_file, overwrite=args.overwrite)  # fmt: skip
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    if args.merge and not args.no_single_file and "single_file" not in paths:
        print("single_file: none (a single-file checkpoint is written for SD 1.x and SDXL): the diffusers folder is the merged model")
    return 0


def _image_run(run_dir: Path, command: str) -> None:
    """Refuse an LLM run directory given to an image command (one line naming the LLM command)."""
    from ..core.rundir import check_run_kind
    from .config import RaftConfig

    check_run_kind(run_dir, RaftConfig, command)


def _card(args) -> int:
    from .card import write_card

    _image_run(args.run_dir, "raft-diffusion card")
    print(write_card(args.run_dir, license=args.license))
    return 0


def _push(args) -> int:
    from .card import push

    _image_run(args.run_dir, "raft-diffusion push")
    print(push(args.run_dir, args.repo_id, license=args.license, private=args.private))
    return 0


def _config_help(args) -> int:
    from ..core.config import config_help
    from .config import RaftConfig

    print("\n".join(config_help(RaftConfig)))
    return 0


def add_commands(sub) -> None:
    """Add the diffusion commands to an argparse subparsers object."""
    p = sub.add_parser("align", help="run RAFT on a text-to-image pipeline (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 [klein])")
    add_align_arguments(p, example="configs/tiny.yaml")
    p.set_defaults(func=_align)

    p = sub.add_parser("plan", help="estimate the GPU memory of each phase of a config (no weights loaded) and how to fit a budget")
    p.add_argument("--config", "-c", type=Path, help="YAML preset, e.g. configs/sdxl_aesthetic_1024.yaml")
    p.add_argument("--gpu-memory", help="the budget to fit, e.g. 24GB (10^9 bytes) or 22GiB; default model.max_memory")
    p.add_argument("overrides", nargs="*", help="key=value overrides with dotted keys, e.g. sampling.batch_size=2")
    p.set_defaults(func=_plan)

    p = sub.add_parser("gallery", help="write RUN_DIR/gallery/: index.html, grid_before_after.png, reward_curve.png")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by align")
    p.add_argument("--max-grid-samples", type=int, default=4, help="samples per prompt in grid_before_after.png")
    p.set_defaults(func=_gallery)

    p = sub.add_parser("compare", help="side-by-side images of saved weights against their base model, same prompts and seeds")
    p.add_argument(
        "base", metavar="BASE", help="base pipeline of any supported family (SD, SDXL, SD3, FLUX.1, FLUX.2 klein): hub id, local folder, or tiny"
    )
    p.add_argument(
        "weights",
        nargs="+",
        metavar="LORA_DIR",
        help="LoRA folder or .safetensors file, full-UNet folder, stage folder, or run directory (its final/)",
    )
    p.add_argument("--output-dir", "-o", type=Path, required=True, help="where images, compare.jsonl, grid.png and index.html go")
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        help="preset or run config.yaml giving held-out prompts, sampler and reward "
        "(default: the first LORA_DIR's config.yaml when it is a run directory)",
    )
    p.add_argument("--prompt", "-p", action="append", help="a prompt (repeat for more; replaces the config's)")
    p.add_argument("--prompts", help="prompt file (one per line) or builtin:NAME, e.g. builtin:parti?category=animals&n=16&seed=0")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds, the same for every prompt (default 0 1 2 3)")
    p.add_argument("--steps", type=int, help="denoising steps (default: config, else 50)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: config, else 7.5)")
    p.add_argument("--height", type=int, help="image height (default: config, else the model's)")
    p.add_argument("--width", type=int, help="image width (default: config, else the model's)")
    p.add_argument("--scheduler", help="scheduler class name, e.g. DPMSolverMultistepScheduler")
    p.add_argument("--negative-prompt", help="negative prompt for classifier-free guidance")
    p.add_argument("--reward", help="reward that labels each image (default: the config's; 'none' for no reward)")
    p.add_argument("--reward-kwargs", help="YAML mapping of reward kwargs, e.g. '{region: [0.25, 0.25, 0.75, 0.75]}'")
    p.add_argument("--label", action="append", help="column title for each LORA_DIR, in order")
    p.add_argument("--batch-size", type=int, help="images per generation batch")
    p.add_argument(
        "--family",
        help="model family of BASE when its model_index.json cannot be read (sd, sdxl, sd3, flux, flux2, flux2-klein, qwen-image, z-image)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.set_defaults(func=_compare)

    p = sub.add_parser("export", help="write a run's LoRA as a kohya/A1111 file, a diffusers or peft folder, or merged")
    p.add_argument(
        "source", type=Path, metavar="RUN_DIR_OR_LORA", help="run directory (its final/), stage folder, LoRA folder or LoRA .safetensors file"
    )
    p.add_argument(
        "--format",
        "-f",
        choices=("kohya", "diffusers", "peft"),
        help="kohya: one .safetensors with lora_unet_* keys (SD 1.x, SDXL, FLUX.1, FLUX.2, Qwen-Image); "
        "diffusers: the LoRA folder; peft: a PeftModel folder",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="fuse the LoRA into the base model: a diffusers pipeline folder (every family) plus, for SD 1.x and SDXL, a single-file checkpoint",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="output file (kohya) or folder")
    p.add_argument("--base", help="base pipeline for --merge, and the model family and layout for kohya files (default: the run's model.pretrained)")
    p.add_argument("--license", help="licence recorded in the kohya metadata (e.g. creativeml-openrail-m)")
    p.add_argument("--no-single-file", action="store_true", help="with --merge: only the diffusers folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_export)

    p = sub.add_parser("card", help="(re)write RUN_DIR/final/README.md, the run's model card")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by align")
    p.add_argument("--license", help="the base model's licence, as you give it (default: 'see the base model's card')")
    p.set_defaults(func=_card)

    p = sub.add_parser("push", help="upload a run's final/ LoRA, model card and before/after grid to the Hugging Face Hub")
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by align")
    p.add_argument("repo_id", metavar="REPO_ID", help="model repo, e.g. you/sd15-raft-aesthetic (created if missing)")
    p.add_argument("--license", help="the base model's licence, as you give it (written into the card)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.set_defaults(func=_push)

    add_toyworld_parser(sub)

    p = sub.add_parser("config-help", help="list every config key with its default and meaning")
    p.set_defaults(func=_config_help)
