"""The model card of a run (``final/README.md``, Hugging Face model-card format) and ``push`` to the Hub.

It says what the LoRA is (base model, reward, RAFT and its settings), what it did (the held-out metrics of the
base model and of the final stage, read back from ``metrics.jsonl``), shows the before/after grid when the
gallery has one, states the licence (``--license``, else "see the base model's card") and how to load it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from reward_models.weights import hub_offline_reason

from ..core.errors import UserError
from .export import GRID, LORA_WEIGHT_NAME, final_stage, metrics_rows, read_run_config, resolve_source, tool_version
from .gallery import config_value as _config_value

CARD_NAME = "README.md"
LICENCE_DEFAULT = "see the base model's card"

# metrics.jsonl keys shown in the card, in this order, with their wording
_METRICS = (
    ("eval_reward_mean", "held-out reward, mean"),
    ("eval_reward_std", "held-out reward, std"),
    ("eval_best_of_k", "held-out reward, best of k per prompt"),
    ("eval_clip_score", "CLIP prompt fidelity"),
    ("eval_diversity", "diversity (mean pairwise CLIP distance)"),
)


def fmt(x: float) -> str:
    """How the card writes a metric (4 decimals; the tests read metrics.jsonl back through this)."""
    return f"{float(x):.4f}"


def _settings(cfg: dict, stages_run: int | None, final: int | None) -> list[tuple[str, str]]:
    """(setting, value) rows of the method table, from the run's config.yaml."""
    mode = _config_value(cfg, "ranking.mode", "local")
    keep = {"local": f"best {_config_value(cfg, 'ranking.top_k')} per prompt",
            "global": f"best {_config_value(cfg, 'ranking.top_ratio')} of the stage",
            "threshold": f"reward >= {_config_value(cfg, 'ranking.threshold')}"}.get(mode, mode)  # fmt: skip
    targets = _config_value(cfg, "train.target_modules") or []
    rows = [
        ("stages", (f"{stages_run} run of {_config_value(cfg, 'num_stages')} planned" if stages_run is not None
                    else str(_config_value(cfg, "num_stages"))) + (f"; final/ holds stage {final}" if final != stages_run else "")),
        ("samples per prompt (K)", str(_config_value(cfg, "sampling.num_per_prompt"))),
        ("kept", f"{keep} ({mode} ranking)"),
        ("sampler", f"{_config_value(cfg, 'sampling.num_inference_steps')} steps, guidance {_config_value(cfg, 'sampling.guidance_scale')}"),
        ("fine-tuning", f"{_config_value(cfg, 'train.method', 'lora')}, {_config_value(cfg, 'train.steps_per_stage')} steps per stage, "
                        f"batch {_config_value(cfg, 'train.batch_size')}, learning rate {_config_value(cfg, 'train.learning_rate')}"
                        + (f" x {decay} a stage" if (decay := _config_value(cfg, "train.stage_lr_decay")) else "")),
        ("LoRA", f"rank {_config_value(cfg, 'train.lora_rank')}, alpha {_config_value(cfg, 'train.lora_alpha')}, "
                 f"targets {', '.join(map(str, targets)) or 'default'}"),
        ("training prompts", _prompts(_config_value(cfg, "prompts.train"))),
        ("held-out prompts", _prompts(_config_value(cfg, "prompts.eval"))),
        ("seed", str(_config_value(cfg, "seed"))),
    ]  # fmt: skip
    return rows


def _prompts(value) -> str:
    if isinstance(value, list):
        shown = "; ".join(str(p) for p in value[:4])
        return f"{len(value)} ({shown}{'; ...' if len(value) > 4 else ''})"
    return str(value)


def metrics_table(rows: list[dict], stage: int | None) -> tuple[list[str], dict | None, dict | None]:
    """Markdown lines comparing stage 0 (the base model) with ``stage``; also the two rows (None if absent)."""
    base = next((r for r in rows if r.get("stage") == 0), None)
    final = next((r for r in rows if r.get("stage") == stage), None) if stage else None
    if base is None or final is None:
        return ["No held-out evaluation of both the base model and the final stage was recorded "
                "(`eval.every: 0`?)."], base, final  # fmt: skip
    lines = [f"| metric | base (stage 0) | final (stage {stage}) | change |", "|---|---:|---:|---:|"]
    for key, label in _METRICS:
        a, b = base.get(key), final.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {float(b) - float(a):+.4f} |")
    return lines, base, final


def _run_family(run_dir: Path, cfg: dict, base_model: str):
    """The run's model family, or None, found without the network: ``model.family``, else the base model's
    ``model_index.json`` in its folder or in the Hugging Face cache."""
    import json

    from .export import resolve_base
    from .families.registry import FAMILIES, get_family

    name = _config_value(cfg, "model.family")
    if name:
        return get_family(name)
    index = Path(resolve_base(base_model)).expanduser() / "model_index.json"
    if not index.is_file() and "/" in base_model and not Path(base_model).exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "model_index.json")
            index = Path(cached) if isinstance(cached, str) else index
        except Exception:  # noqa: BLE001 - no cache or an odd id: the card says less
            pass
    if not index.is_file():
        return None
    return FAMILIES.get(json.loads(index.read_text(encoding="utf-8")).get("_class_name"))


def _denoiser_word(run_dir: Path, family) -> str:
    """ "UNet" or "transformer": the family's denoiser, else what the final LoRA's keys start with."""
    if family is not None:
        return "UNet" if family.denoiser_attr == "unet" else "transformer"
    weights = run_dir / "final" / LORA_WEIGHT_NAME
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as f:
            if any(k.startswith("transformer.") for k in f.keys()):
                return "transformer"
    return "UNet"


def card_text(run_dir: str | Path, *, license: str | None = None, grid_link: str | None = None,
              lora_file: str = LORA_WEIGHT_NAME) -> str:  # fmt: skip
    """The model card of ``run_dir`` as Markdown. ``grid_link`` is the before/after grid's link as seen from
    where the card will live (default: from ``final/``, ``../gallery/grid_before_after.png``); the grid is
    shown only when the file exists."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    base_model = _config_value(cfg, "model.pretrained") or "unknown"
    reward = _config_value(cfg, "reward.name") or "unknown"
    reward_kwargs = _config_value(cfg, "reward.kwargs") or {}
    rows = metrics_rows(run_dir)
    stage = final_stage(run_dir)
    table, _, _ = metrics_table(rows, stage)
    licence = license or LICENCE_DEFAULT
    lora = _config_value(cfg, "train.method", "lora") == "lora"
    grid_link = grid_link or f"../{GRID}"
    family = _run_family(run_dir, cfg, base_model)
    denoiser = _denoiser_word(run_dir, family)

    header = ["---", f"base_model: {base_model}" if "/" in base_model and not Path(base_model).exists() else None,
              "library_name: diffusers", f"license: {license}" if license else None,
              "tags:", "- text-to-image", *(f"- {t}" for t in (family.hub_tags if family else ())), "- lora", "- diffusers",
              "- raft", "---"]  # fmt: skip
    out = [line for line in header if line is not None]
    out += [
        "", f"# RAFT {'LoRA' if lora else denoiser} for {base_model}", "",
        (f"A LoRA on the {denoiser} of `{base_model}`" if lora else f"The fully fine-tuned {denoiser} of `{base_model}`")
        + f", aligned with the reward **{reward}**"
        + (f" (`{reward_kwargs}`)" if reward_kwargs else "")
        + " by RAFT (Reward rAnked FineTuning, Dong et al., TMLR 2023): each stage samples K images per prompt, "
        "scores them with the reward, keeps the best and fine-tunes on them with the ordinary denoising loss. "
        f"Made with {tool_version()}.", "",
        "## Method and settings", "", "| setting | value |", "|---|---|",
    ]  # fmt: skip
    stages_run = max((int(r["stage"]) for r in rows if isinstance(r.get("stage"), int)), default=None)
    out += [f"| {k} | {v} |" for k, v in _settings(cfg, stages_run, stage)]
    out += ["", "## Held-out evaluation: base model vs final weights", "",
            "Fixed held-out prompts and seeds, the same for every stage (from `metrics.jsonl`).", "", *table, ""]  # fmt: skip
    if (run_dir / GRID).is_file():
        out += ["## Before / after", "",
                "Held-out prompts (rows), the base model's samples next to the final stage's, same seeds:", "",
                f"![before and after]({grid_link})", ""]  # fmt: skip
    out += ["## Licence", "", f"licence: {licence}. These weights derive from `{base_model}`; its licence "
            "terms apply to them and to what they generate.", ""]  # fmt: skip
    if not lora and denoiser == "UNet":
        out += ["## How to use", "", "diffusers:", "", "```python",
                "from diffusers import StableDiffusionPipeline, UNet2DConditionModel", "",
                'unet = UNet2DConditionModel.from_pretrained("path/to/this/folder")',
                f'pipe = StableDiffusionPipeline.from_pretrained("{base_model}", unet=unet)', "```", ""]  # fmt: skip
        return "\n".join(out)
    if not lora:
        out += ["## How to use", "", "diffusers:", "", "```python", "from diffusers import AutoModel, DiffusionPipeline", "",
                'transformer = AutoModel.from_pretrained("path/to/this/folder")',
                f'pipe = DiffusionPipeline.from_pretrained("{base_model}", transformer=transformer)', "```", ""]  # fmt: skip
        return "\n".join(out)
    out += [
        "## How to use", "",
        "diffusers:", "", "```python", "from diffusers import DiffusionPipeline", "",
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
        'pipe.load_lora_weights("path/to/this/folder")  # or the hub repo id',
        'image = pipe("a prompt", num_inference_steps=30).images[0]', "```", "",
        "A1111 / ComfyUI / kohya (one `.safetensors` with kohya key names, alpha kept; SD 1.x, SDXL, FLUX.1, FLUX.2 [klein] "
        "and Qwen-Image -- ComfyUI reads this folder's diffusers-format file for the others):", "",
        "```bash", "raft-diffusion export RUN_DIR --format kohya -o my_raft_lora.safetensors", "```", "",
        "A merged model (diffusers folder, plus one single-file checkpoint for SD 1.x and SDXL): "
        "`raft-diffusion export RUN_DIR --merge -o merged/`.", "",
        f"Weights: `{lora_file}` (diffusers format, peft keys, the LoRA config in its header).", "",
    ]  # fmt: skip
    return "\n".join(out)


def write_card(run_dir: str | Path, *, license: str | None = None) -> Path:
    """(Re)write ``<run>/final/README.md``; a run without ``final/`` is a one-line UserError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    final = run_dir / "final"
    if not final.is_dir():
        raise UserError(f"{run_dir} has no final/ (has a stage finished?): the card goes into final/README.md")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} has no config.yaml: is it a raft-diffusion run directory?")
    path = final / CARD_NAME
    tmp = path.with_name(f".{CARD_NAME}.tmp")
    tmp.write_text(card_text(run_dir, license=license), encoding="utf-8")
    tmp.replace(path)
    return path


# --- the Hub -------------------------------------------------------------------------------------------------


def push_plan(run_dir: str | Path, *, license: str | None = None) -> tuple[dict[str, Path], str]:
    """What ``push`` uploads: ``{path in the repo: local file}`` (``final/``'s files at the root, the grid under
    ``gallery/``) and the card text (README.md, its grid link relative to the repo root)."""
    src = resolve_source(run_dir)
    if src.run_dir is None or Path(run_dir).expanduser().resolve() != src.run_dir.resolve():
        raise UserError(f"{run_dir} is not a run directory (config.yaml, metrics.jsonl, final/): push takes a run directory")
    files = {p.name: p for p in sorted((src.run_dir / "final").iterdir()) if p.is_file() and p.name != CARD_NAME}
    if (src.run_dir / GRID).is_file():
        files[GRID] = src.run_dir / GRID
    return files, card_text(src.run_dir, license=license, grid_link=GRID)


def push(run_dir: str | Path, repo_id: str, *, license: str | None = None, private: bool = False,
         token: str | None = None) -> str:  # fmt: skip
    """Upload a run's ``final/`` (LoRA), its card (as README.md) and the before/after grid to the Hub model repo
    ``repo_id`` (created if needed); return the repo's URL. Offline, or on any Hub error, a one-line UserError
    names what would have been uploaded."""
    import tempfile

    files, card = push_plan(run_dir, license=license)
    what = f"{', '.join(sorted(files))} and README.md from {run_dir} to {repo_id}"
    reason = hub_offline_reason()
    if reason is not None:
        raise UserError(f"cannot push ({reason}): would upload {what}")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError(f"push needs huggingface_hub (pip install huggingface_hub): would upload {what}") from None
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="raft-push-") as tmp:
        stage = Path(tmp)
        for name, path in files.items():
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, stage / name)
        (stage / "README.md").write_text(card, encoding="utf-8")
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(stage),
                              commit_message="Upload RAFT LoRA (raft-diffusion)")  # fmt: skip
        except Exception as err:  # noqa: BLE001 - auth, network and repo errors all end the same way
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise UserError(
                f"push to {repo_id} failed ({type(err).__name__}: {first}; log in with `hf auth login` or set HF_TOKEN): would upload {what}"
            ) from None
    return f"https://huggingface.co/{repo_id}"
