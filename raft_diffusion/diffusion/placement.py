"""Phase-wise placement (``model.offload``): each RAFT phase keeps on the accelerator only what it needs.

- ``none``: everything stays on the device (the plain path).
- ``phases``: the text encoders leave the device once the prompts are encoded (RAFT encodes every prompt once per
  run); the reward model and the eval CLIP live on the CPU and come to the device only while scoring.
- ``sequential``: as ``phases``, and the denoiser also leaves the device while the reward scores, so the
  reward never shares the device with the denoiser.

Moving a module changes where its weights live, not their values: results are bitwise those of ``none`` on the
same device (``tests/test_memory_plan.py`` checks this on CPU, where the moves are no-ops but the code paths run).
VAE slicing (``model.vae_slicing``, one image at a time through the decoder) is a separate switch because it is not
bitwise neutral: batched and single-image convolutions round differently (measured on the tiny pipeline: rewards
differ in the 8th digit, the LoRA not at all, since it trains on the sampler's latents).
"""

from __future__ import annotations

import contextlib

import torch

OFFLOAD_DEVICE = torch.device("cpu")


def movable_parts(obj, depth: int = 4, _seen: set | None = None) -> list:
    """The ``torch.nn.Module`` s a reward (or eval CLIP) holds, and the objects that record a ``device`` for them
    (a CLIP backbone moves its inputs there), found through attributes, lists and closures."""
    seen = set() if _seen is None else _seen
    if obj is None or id(obj) in seen or depth < 0 or isinstance(obj, (str, bytes, int, float, torch.Tensor)):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.nn.Module):
        return [obj]
    found = []
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, dict):
        children = list(obj.values())
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        children += [c.cell_contents for c in (getattr(obj, "__closure__", None) or ()) if _filled(c)]
        if isinstance(getattr(obj, "device", None), torch.device) and not callable(obj.device):
            found.append(obj)
    for child in children:
        found += movable_parts(child, depth - 1, seen)
    return found


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
        return True
    except ValueError:
        return False


def _move(parts, device: torch.device) -> None:
    for p in parts:
        if isinstance(p, torch.nn.Module):
            p.to(device)
        else:
            p.device = device


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Placement:
    """Moves the pipeline's parts between the device and the CPU at the phase boundaries of ``mode``."""

    def __init__(self, mode: str, device, pipe, family, scorers=(), vae_slicing: bool = False):
        self.mode = mode if mode in ("phases", "sequential") else "none"
        self.device = torch.device(device)
        self.pipe, self.family = pipe, family
        self.scorer_parts = [p for s in scorers for p in movable_parts(s)]
        vae = getattr(pipe, "vae", None)
        if vae_slicing and vae is not None and hasattr(vae, "enable_slicing"):
            vae.enable_slicing()  # one image at a time through the decoder
        if self.mode == "none":
            return
        _move(self.scorer_parts, OFFLOAD_DEVICE)
        _free(self.device)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for n, m in self.pipe.components.items() if n.startswith("text_encoder") and isinstance(m, torch.nn.Module)]

    def after_encoding(self) -> None:
        """The prompts are encoded (once per run): the text encoders leave the device."""
        if self.mode == "none":
            return
        for m in self.text_encoders:
            m.to(OFFLOAD_DEVICE)
        _free(self.device)

    @contextlib.contextmanager
    def scoring(self):
        """The reward and eval CLIP on the device while the block runs (``sequential``: the denoiser off it)."""
        if self.mode == "none":
            yield
            return
        denoiser = self.family.denoiser(self.pipe)
        if self.mode == "sequential":
            denoiser.to(OFFLOAD_DEVICE)
            _free(self.device)
        _move(self.scorer_parts, self.device)
        try:
            yield
        finally:
            _move(self.scorer_parts, OFFLOAD_DEVICE)
            if self.mode == "sequential":
                denoiser.to(self.device)
            _free(self.device)
