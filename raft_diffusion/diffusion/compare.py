"""``raft-diffusion compare BASE LORA_DIR ...``: the gallery's side-by-side for any saved weights against their base.

Every (prompt, seed) is sampled from the base model and from the base model with each set of weights, from
the same initial noise (the given seeds, the same for every prompt), optionally scored with a reward, and
written to the output folder. The base may be a pipeline of any supported family (SD 1.x/2.x, SDXL, SD3, FLUX.1,
FLUX.2 [klein]); it samples exactly as ``align`` does for that family (SD 1.x/2.x through ``generate``, the others
through their :class:`~.families.Family`), so a run's LoRA reproduces the run's held-out images:

    images/<NN>_<name>/pNNNN_sSSS.png   the images, one folder per column (00 = the base model)
    compare.jsonl                       column, weights, prompt_index, sample_index, seed, prompt, reward, image
    grid.png                            rows = prompts, a group of images per column, rewards under each
    index.html                          the gallery page (relative paths, no external assets)

Sampler settings, prompts and reward default to a config: ``--config`` (a preset or a run's config.yaml), else
the config.yaml of the first LORA_DIR when it is a run directory; command-line options override them.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import UserError
from ..core.rundir import write_jsonl
from .finetune import LORA_WEIGHT_NAME
from .gallery import Cell, Column, render_grid, render_page

DEFAULT_SEEDS = (0, 1, 2, 3)


@dataclass
class CompareSettings:
    """What to sample: prompts x seeds, the sampler and the (optional) reward that labels each image."""

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: list(DEFAULT_SEEDS))
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    reward: dict | None = None  # a reward config ({name, kwargs} or {mix: ...}); None = no reward
    batch_size: int = 8
    family: str | None = None  # model.family: the base's family when its model_index.json cannot be read
    max_sequence_length: int | None = None  # model.max_sequence_length: T5/Qwen tokens (sd3, flux, flux2, flux2-klein, qwen-image, z-image)


DENOISER_FOLDERS = ("unet", "transformer")  # what a full fine-tune saves in a stage folder, by family


def resolve_weights(path: str | Path) -> tuple[str, Path]:
    """``("lora" | "full", path)`` for a LoRA folder or file, a full denoiser folder (a UNet's or a transformer's),
    a stage folder or a run directory."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / LORA_WEIGHT_NAME).is_file():
        if (p / "final").is_dir():  # a run directory: its final weights
            p = p / "final"
        elif (p / "lora").is_dir():  # a stage folder
            p = p / "lora"
        else:
            p = next((p / d for d in DENOISER_FOLDERS if (p / d).is_dir()), p)
    if p.is_file() and p.suffix == ".safetensors":
        return "lora", p
    if (p / LORA_WEIGHT_NAME).is_file():
        return "lora", p
    if (p / "config.json").is_file() and any(p.glob("diffusion_pytorch_model*")):
        return "full", p
    raise UserError(
        f"no weights found in {str(path)!r}: give a LoRA folder (with {LORA_WEIGHT_NAME}), a .safetensors LoRA file, "
        "a full UNet or transformer folder (config.json + diffusion_pytorch_model.safetensors), a stage folder or a run directory"
    )


def settings_from_config(config_path: str | Path, **overrides) -> CompareSettings:
    """Defaults from a preset or a run's config.yaml (held-out prompts, sampler, reward), then ``overrides``.

    The guidance scale is the held-out evaluation's (``eval.guidance_scale``, else the pool's).
    """
    from .config import load_config
    from .prompts import load_prompts

    cfg = load_config(config_path)
    s = cfg.sampling
    held_out = cfg.prompts.eval if cfg.prompts.eval is not None else cfg.prompts.train
    base = CompareSettings(
        prompts=overrides.get("prompts") or load_prompts(held_out),  # --prompt / --prompts replace the config's file
        num_inference_steps=cfg.eval_num_inference_steps,
        height=s.height,
        width=s.width,
        guidance_scale=cfg.eval_guidance_scale,
        scheduler=s.scheduler,
        negative_prompt=cfg.prompts.negative,
        reward=cfg.reward,
        batch_size=s.batch_size,
    )
    base.family = cfg.model.family
    base.max_sequence_length = cfg.model.max_sequence_length
    for key, value in overrides.items():
        if value is not None:
            setattr(base, key, value)
    return base


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:40] or "weights"


def default_label(path: str | Path) -> str:
    p = Path(path).expanduser().resolve()
    if (p / "final").is_dir():
        return f"{p.name} (final)"
    if p.parent.name == "stages" and p.name.isdigit():
        return f"{p.parent.parent.name} stage {int(p.name)}"
    if p.name in ("lora", "unet", "final") and p.parent.name:
        return f"{p.parent.name}/{p.name}"
    return p.name


class _Weights:
    """Apply one column's weights to the pipeline (a LoRA through the pipeline's ``load_lora_weights``, full weights
    into its denoiser) and take them off again."""

    def __init__(self, pipe, kind: str, path: Path, denoiser):
        self.pipe, self.kind, self.path, self.denoiser, self._saved = pipe, kind, path, denoiser, None

    def __enter__(self):
        try:
            self._apply()
        except (RuntimeError, ValueError) as err:  # weights of another base model: shapes or names do not match
            # put the pipeline back if it can be; if that fails too, compare stops here anyway, with the line below
            with contextlib.suppress(Exception):
                self._restore()
            m = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[[^\]]*\])\) from checkpoint, "
                          r"the shape in current model is torch.Size\((\[[^\]]*\])\)", str(err))  # fmt: skip
            what = f"{m.group(1)} is {m.group(2)} in the file, {m.group(3)} in the model" if m else (str(err).splitlines() or [""])[0][:160]
            raise UserError(f"the weights in {self.path} do not fit this base model ({what}): give compare the base they were trained on") from None
        return self

    def _apply(self) -> None:
        if self.kind == "lora":
            from diffusers.utils import logging as dlog

            verbosity = dlog.get_verbosity()
            # not "no LoRA keys for the text encoder" (RAFT trains the UNet only), nor the failure's wall of shapes
            # (__enter__ says it in one line)
            dlog.set_verbosity(dlog.CRITICAL)
            try:
                if self.path.is_file():
                    self.pipe.load_lora_weights(str(self.path.parent), weight_name=self.path.name, adapter_name="compare")
                else:
                    self.pipe.load_lora_weights(str(self.path), adapter_name="compare")
            finally:
                dlog.set_verbosity(verbosity)
        else:
            self._saved = {k: v.detach().clone() for k, v in self.denoiser.state_dict().items()}
            self.denoiser.load_state_dict(type(self.denoiser).from_pretrained(str(self.path)).state_dict())

    def _restore(self) -> None:
        """Take this column's weights off: the LoRA unloaded, or the denoiser's own weights put back."""
        if self.kind == "lora":
            self.pipe.unload_lora_weights()
        elif self._saved is not None:
            self.denoiser.load_state_dict(self._saved)

    def __exit__(self, *exc):
        self._restore()
        return False


class _Sampler:
    """Prompts encoded once and batches sampled the way ``align`` samples the base's family."""

    def __init__(self, pipe, family, settings: CompareSettings, height: int, width: int):
        from .generate import encode_prompts

        self.pipe, self.family, self.s, self.height, self.width = pipe, family, settings, height, width
        do_cfg = settings.guidance_scale > 1.0
        if family.name == "sd":
            self.embeds = encode_prompts(pipe, settings.prompts, settings.negative_prompt, do_cfg)
        else:
            self.embeds = family.encode_prompts(pipe, settings.prompts, settings.negative_prompt, do_cfg,
                                                max_sequence_length=settings.max_sequence_length)  # fmt: skip

    def images(self, prompt_indices: list[int], seeds: list[int]) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in ``[0, 1]``: sample i from prompt ``prompt_indices[i]`` and seed ``seeds[i]``."""
        from .generate import generate_batch

        s = self.s
        kwargs = {"height": self.height, "width": self.width}
        if self.family.name != "sd":
            latents = self.family.sample(self.pipe, self.embeds, prompt_indices, seeds, steps=s.num_inference_steps,
                                         guidance=s.guidance_scale, **kwargs)  # fmt: skip
            return self.family.decode(self.pipe, latents)
        cond, uncond = self.embeds
        idx = torch.tensor(prompt_indices, device=cond.device)
        return generate_batch(self.pipe, cond[idx], None if uncond is None else uncond[idx], seeds,
                              num_inference_steps=s.num_inference_steps, guidance_scale=s.guidance_scale, **kwargs)[1]  # fmt: skip


def run_compare(
    base: str,
    weights: list[str | Path],
    out_dir: str | Path,
    settings: CompareSettings,
    *,
    labels: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> Path:
    """Sample, score and render the comparison; returns the path of index.html."""
    from ..core.common import resolve_device
    from .families import detect_family
    from .pipeline import load_pipeline
    from .task import load_reward, resolve_pretrained, sample_name, save_png

    # 1. Check the inputs before loading anything heavy.
    if not settings.prompts:
        raise UserError("compare needs at least one prompt: --prompt TEXT, --prompts FILE, or --config")
    if not settings.seeds:
        raise UserError("compare needs at least one seed: --seeds 0 1 2 3")
    if settings.num_inference_steps < 1:
        raise UserError(f"compare needs --steps >= 1 denoising steps (got {settings.num_inference_steps}); 20-50 is usual")
    if settings.batch_size < 1:
        raise UserError(f"compare needs --batch-size >= 1 (got {settings.batch_size})")
    for side in ("height", "width"):
        value = getattr(settings, side)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{side} must be a multiple of 8 (the VAE works on 8x8 pixel blocks), got {value}; leave it out for the model's size")
    resolved = [resolve_weights(w) for w in weights]
    labels = list(labels or [])
    if len(labels) > len(weights):
        raise UserError(f"{len(labels)} --label values for {len(weights)} weights folders")
    labels += [default_label(w) for w in weights[len(labels) :]]
    out = Path(out_dir)
    dev = resolve_device(device)
    base_model = resolve_pretrained(base)
    family = detect_family(base_model, settings.family)
    reward = load_reward(settings.reward, dev, torch.float32) if settings.reward else None

    # 2. The base pipeline (of its family) and the prompt embeddings.
    pipe = load_pipeline(base_model, device=dev, dtype=dtype, scheduler=settings.scheduler, family=family)
    denoiser = family.denoiser(pipe)
    height, width = family.image_size(pipe, settings.height, settings.width)
    sampler = _Sampler(pipe, family, settings, height, width)

    # 3. Every column: the same prompts x seeds, with its weights applied.
    todo = [(p, k, seed) for p in range(len(settings.prompts)) for k, seed in enumerate(settings.seeds)]
    specs = [("base", None, None)] + [(label, kind, path) for label, (kind, path) in zip(labels, resolved)]
    columns, records = [], []
    for i, (label, kind, path) in enumerate(specs):
        col = Column(key=f"c{i:02d}", title=label)
        folder = out / "images" / f"{i:02d}_{_slug(label)}"
        ctx = _Weights(pipe, kind, path, denoiser) if path is not None else _NoWeights()
        with ctx:
            for start in range(0, len(todo), settings.batch_size):
                chunk = todo[start : start + settings.batch_size]
                images = sampler.images([p for p, _, _ in chunk], [s for _, _, s in chunk])
                texts = [settings.prompts[p] for p, _, _ in chunk]
                scores = reward(images, texts).float().cpu().tolist() if reward is not None else [None] * len(chunk)
                for j, (p, k, seed) in enumerate(chunk):
                    image = folder / f"{sample_name(p, k)}.png"
                    save_png(images[j], image)
                    col.cells[(p, k)] = Cell(image=image, reward=scores[j], seed=seed)
                    records.append(
                        {
                            "column": i,
                            "label": label,
                            "weights": None if path is None else str(path),
                            "prompt_index": p,
                            "sample_index": k,
                            "seed": seed,
                            "prompt": texts[j],
                            "reward": scores[j],
                            "image": image.relative_to(out).as_posix(),
                        }
                    )
        columns.append(col)

    # 4. Records, grid and page.
    write_jsonl(out / "compare.jsonl", records)
    prompts = dict(enumerate(settings.prompts))
    render_grid(out / "grid.png", prompts, columns, max_samples=len(settings.seeds))
    reward_name = "no reward" if settings.reward is None else f"reward {json.dumps(settings.reward)}"
    weights_list = "".join(
        f"<li><b>{html.escape(label)}</b>: {html.escape(str(base) if path is None else f'{base} + {path}')}</li>" for label, _, path in specs
    )
    intro = (
        f"<p>{len(settings.seeds)} seeds ({html.escape(', '.join(map(str, settings.seeds)))}) per prompt, the same "
        f"initial noise in every column; {html.escape(family.pipeline_class_name)}, {settings.num_inference_steps} steps, "
        f"guidance {settings.guidance_scale}, "
        f"{width}x{height} px; {html.escape(reward_name)}.</p><ul>{weights_list}</ul>"
        "<p><a href='grid.png'>grid.png</a>: every column, one row per prompt.</p>"
    )
    return render_page(out, title="RAFT compare", prompts=prompts, columns=columns, intro_html=intro, images_heading="Images", prompt_label="prompt")


class _NoWeights:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
