"""LoRA extrapolation (``early_stop.lora_scales``): a stage's LoRA tried at a scale above 1.

A LoRA adds ``delta W = (alpha / r) B A`` to each adapted weight. At scale ``s`` the model is ``W + s delta W``: the
base, moved ``s`` times as far along the direction the stages trained so far. Multiplying every ``lora_B`` tensor by
``s`` gives exactly that model, in the task and in a saved file alike, so a LoRA delivered at a scale reloads at
weight 1 in any loader. Model-agnostic: peft names the second LoRA factor ``lora_B`` in modules and in the
safetensors files it (and diffusers) save.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .rundir import public_modes, replace_dir

if TYPE_CHECKING:  # torch is imported where a LoRA is scaled: a config check needs none of it
    import torch

LORA_B = "lora_B"

LORA_SCALES_HELP = (
    "LoRA extrapolation for the target stop: scales above 1 (ascending, e.g. [1.3, 1.6]) at which each screened stage's LoRA "
    "is also tried, the model being the base plus scale x the change the stages trained. The stage is screened at the largest "
    "scale first; if that reaches early_stop.target_rise_sd, the smallest scale (1 included) whose screen reaches it is "
    "evaluated in full (eval_lora_scale in metrics.jsonl), and one that meets the target above the floors is delivered as "
    "final/, the scale multiplied into its weights. Training and the pools are unchanged. Needs early_stop.target_rise_sd, "
    "eval.screen_per_prompt and train.method lora; null = off"
)


def check_lora_scales(cfg, need) -> None:
    """The config rules of ``early_stop.lora_scales`` (each kind's config declares the key and calls this)."""
    es = cfg.early_stop
    scales = es.lora_scales
    need(
        scales is None
        or (
            isinstance(scales, list)
            and scales
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and 1 < x < math.inf for x in scales)
            and all(a < b for a, b in zip(scales, scales[1:]))
        ),
        f"early_stop.lora_scales must be a list of finite scales above 1 in ascending order, e.g. [1.3, 1.6], or null (got {scales!r})",
    )
    need(
        not scales or (es.target_rise_sd is not None and getattr(cfg.eval, "screen_per_prompt", 0)),
        "early_stop.lora_scales tries each screened stage at those scales against the target: set early_stop.target_rise_sd "
        "(e.g. 1.0) and eval.screen_per_prompt (e.g. 4), or early_stop.lora_scales=null",
    )
    need(
        not scales or cfg.train.method == "lora",
        f"early_stop.lora_scales scales a LoRA, and train.method is {cfg.train.method!r}: set train.method=lora or early_stop.lora_scales=null",
    )


def lora_b_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The ``lora_B`` factors of every LoRA in ``module``."""
    return [p for name, p in module.named_parameters() if LORA_B in name.split(".")]


@contextlib.contextmanager
def scaled_lora(module: torch.nn.Module, scale: float) -> Iterator[None]:
    """Within the block, ``module``'s LoRAs act at ``scale`` (every ``lora_B`` multiplied by it); afterwards each
    gets its saved bytes back. Scale 1 changes nothing."""
    if scale == 1.0:
        yield
        return
    params = lora_b_parameters(module)
    if not params:
        raise ValueError("early_stop.lora_scales scales a LoRA, and the model has none")
    import torch

    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p in params:
                p.mul_(scale)
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, saved):
                p.copy_(b)


def scale_lora_dir(src: Path, dst: Path, scale: float) -> None:
    """Copy a saved LoRA folder to ``dst`` (replaced atomically) with every ``lora_B`` tensor of its safetensors
    files multiplied by ``scale`` (their metadata kept): the LoRA at weight 1 is then the source at ``scale``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    dst = Path(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
    shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    for path in sorted(tmp.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k: v * scale if LORA_B in k.split(".") else v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=metadata)
    public_modes(tmp)
    replace_dir(tmp, dst)
