"""Text conditioning encoded once per run, indexable per prompt so that a batch can mix prompts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PromptEmbeds:
    """Named text-conditioning tensors of P prompts.

    ``per_prompt`` tensors have the prompt on their first axis (``prompt_embeds [P, L, D]``,
    ``pooled_prompt_embeds [P, D]``); ``shared`` tensors are the same for every prompt (the
    negative prompt's embeddings with a leading axis of 1, FLUX's ``text_ids [L, 3]``).
    ``embeds[indices]`` picks rows of the per-prompt tensors and keeps the shared ones.
    """

    per_prompt: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        sizes = {name: t.shape[0] for name, t in self.per_prompt.items()}
        if not sizes:
            raise ValueError("PromptEmbeds needs at least one per-prompt tensor")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"per-prompt tensors disagree on the number of prompts: {sizes}")

    def __len__(self) -> int:
        return next(iter(self.per_prompt.values())).shape[0]

    def __getitem__(self, indices) -> PromptEmbeds:
        """The rows ``indices`` (a list, a LongTensor or a slice) of every per-prompt tensor."""
        if not isinstance(indices, slice):
            indices = torch.as_tensor(indices, dtype=torch.long)
        picked = {}
        for name, t in self.per_prompt.items():
            picked[name] = t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices]
        return PromptEmbeds(picked, dict(self.shared))

    def concat(self, other: PromptEmbeds) -> PromptEmbeds:
        """These rows followed by ``other``'s (the same per-prompt names and row shapes); the shared tensors are these."""
        if set(other.per_prompt) != set(self.per_prompt):
            raise ValueError(f"cannot join rows of {sorted(self.per_prompt)} and {sorted(other.per_prompt)}")
        joined = {name: torch.cat([t, other.per_prompt[name].to(t.device, t.dtype)]) for name, t in self.per_prompt.items()}
        return PromptEmbeds(joined, dict(self.shared))

    def __contains__(self, name: str) -> bool:
        return name in self.per_prompt or name in self.shared

    def get(self, name: str, default=None):
        """A per-prompt tensor, else a shared one, else ``default``."""
        return self.per_prompt.get(name, self.shared.get(name, default))

    def batch(self, name: str, batch_size: int) -> torch.Tensor | None:
        """A tensor with ``batch_size`` rows: a per-prompt tensor as it is, a shared one (leading axis 1) expanded."""
        if name in self.per_prompt:
            t = self.per_prompt[name]
            if t.shape[0] != batch_size:
                raise ValueError(f"{name} has {t.shape[0]} rows for a batch of {batch_size}")
            return t
        if name in self.shared:
            t = self.shared[name]
            return t.expand(batch_size, *t.shape[1:])
        return None

    def to(self, device=None, dtype=None) -> PromptEmbeds:
        """A copy with every floating-point tensor moved/cast (integer ids keep their dtype)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else t.dtype)

        per_prompt = {k: move(v) for k, v in self.per_prompt.items()}
        return PromptEmbeds(per_prompt, {k: move(v) for k, v in self.shared.items()})


def pad_rows(embeds: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunks of ``[n, L_i, D]`` embeddings and ``[n, L_i]`` masks, zero-padded at the end to the longest ``L``."""
    length = max(e.shape[1] for e in embeds)
    pad = [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e in embeds]
    pad_masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(pad), torch.cat(pad_masks)


def encode_padded(family, pipe, prompts, negative_prompt, do_cfg, batch_size, max_sequence_length) -> PromptEmbeds:
    """The conditioning of a family whose prompts keep their own lengths (Qwen-Image, Z-Image): ``family._encode(pipe,
    prompts, length) -> (embeds [n, L, D], mask [n, L])`` in chunks of ``batch_size`` (default the family's), zero-padded
    to the longest as ``prompt_embeds`` and ``prompt_embeds_mask``; with ``do_cfg`` the negative prompt's (the
    family's ``empty_prompt`` by default) once."""
    batch_size = batch_size or family.encode_batch_size
    length = max_sequence_length or family.max_sequence_length
    prompts = list(prompts)
    chunks = [family._encode(pipe, prompts[i : i + batch_size], length) for i in range(0, len(prompts), batch_size)]
    embeds, mask = pad_rows([c[0] for c in chunks], [c[1] for c in chunks])
    shared = {}
    if do_cfg:
        neg, neg_mask = family._encode(pipe, [negative_prompt or family.empty_prompt], length)
        shared = {"negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}
    return PromptEmbeds({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, shared)
