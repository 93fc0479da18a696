"""Memory arithmetic for a LoRA training step of a family's denoiser, measured shape-only on the meta device.

- parameters: count x bytes per element of the weight dtype;
- LoRA training state: each trainable LoRA weight in fp32 plus its fp32 gradient plus AdamW's two fp32 moments
  (16 bytes per LoRA parameter);
- activations: the bytes of every tensor autograd saves for the backward pass during one forward of the
  denoiser (``torch.autograd.graph.saved_tensors_hooks``), counted once per underlying tensor (views of one
  tensor count once) and without parameters (or views of them). Run on ``meta`` tensors, the forward costs no
  memory or compute. Attention is counted as a fused kernel (flash / memory-efficient SDPA, which CUDA uses)
  keeps it: query, key, value, output and the fp32 log-sum-exp, not the ``L x L`` probabilities that the
  math kernel the meta device would run materialises. With gradient checkpointing only the inputs
  of each checkpointed block stay saved, and one block's activations are rebuilt at a time during backward:
  ``outside-block activations + block inputs + the largest block's activations``.

This leaves out allocator overhead/fragmentation, temporary buffers that autograd does not keep (attention
workspaces), CUDA context (~0.5 GB) and the sampling/VAE-decode peak.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

LORA_STATE_BYTES = 4 + 4 + 8  # fp32 weight + fp32 grad + AdamW exp_avg and exp_avg_sq


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_parameter_count(denoiser: torch.nn.Module, targets, rank: int) -> int:
    """``rank * (in_features + out_features)`` summed over the Linear layers the targets select."""
    from raft_diffusion.diffusion.families.lora import matching_modules

    layers = dict(denoiser.named_modules())
    total = 0
    for name in matching_modules(denoiser, targets):
        layer = getattr(layers[name], "base_layer", layers[name])
        total += rank * (layer.in_features + layer.out_features)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class ActivationReport:
    """Bytes saved for backward during one forward, split by checkpointable block."""

    total: int = 0  # all saved tensors (no gradient checkpointing)
    per_block: dict[str, int] = field(default_factory=dict)  # saved inside each block
    block_inputs: int = 0  # tensor inputs of the blocks (what checkpointing keeps)

    @property
    def outside_blocks(self) -> int:
        """Saved tensors of the layers outside every block (embeddings, final layers)."""
        return self.total - sum(self.per_block.values())

    @property
    def with_checkpointing(self) -> int:
        """The gradient-checkpointing estimate: outside + block inputs + the largest block (rebuilt in backward)."""
        return self.outside_blocks + self.block_inputs + max(self.per_block.values(), default=0)


def _root(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


class _FusedAttention(torch.autograd.Function):
    """Shape-only stand-in for a fused SDPA kernel: saves q, k, v, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - measurement only runs forward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(query, key, value, *args, **kwargs):
    return _FusedAttention.apply(query, key, value)


@contextmanager
def _record_saved(report: ActivationReport, blocks: dict[str, torch.nn.Module], params: set[int]):
    seen: dict[int, torch.Tensor] = {}  # keeps the tensors alive so that ids stay unique
    inputs: dict[int, torch.Tensor] = {}
    stack: list[str] = []

    def pack(t):
        root = _root(t)
        if id(root) not in params and id(root) not in seen:
            seen[id(root)] = root
            size = _tensor_bytes(root)
            report.total += size
            if stack:
                report.per_block[stack[-1]] = report.per_block.get(stack[-1], 0) + size
        return t

    def enter(name):
        def hook(module, args, kwargs):
            if not stack:  # inputs of an outermost block (a tensor shared by several blocks counts once)
                for a in (*args, *kwargs.values()):
                    if isinstance(a, torch.Tensor) and a.is_floating_point() and id(a) not in inputs:
                        inputs[id(a)] = a
                        report.block_inputs += _tensor_bytes(a)
            stack.append(name)

        return hook

    def leave(module, args, output):
        stack.pop()

    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(enter(name), with_kwargs=True))
        handles.append(block.register_forward_hook(leave))
    try:
        with fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def fused_attention():
    """``torch.nn.functional.scaled_dot_product_attention`` replaced by the shape-only fused kernel while active
    (what a meta-device forward should count for attention)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa


def saved_activation_bytes(denoiser: torch.nn.Module, forward, block_names) -> ActivationReport:
    """Run ``forward()`` (one training forward of ``denoiser``) and measure what autograd saves, attributing it to
    the modules named by ``block_names`` (the units gradient checkpointing wraps)."""
    if any(p.device.type != "meta" for p in denoiser.parameters()):
        raise ValueError("saved_activation_bytes measures shapes only: build the denoiser on the meta device")
    blocks = {n: m for n, m in denoiser.named_modules() if n in set(block_names)}
    report = ActivationReport(per_block={n: 0 for n in blocks})
    params = {id(p) for p in denoiser.parameters()}
    with _record_saved(report, blocks, params):
        out = forward()
    del out
    return report


def checkpoint_units(denoiser: torch.nn.Module) -> list[str]:
    """The blocks diffusers checkpoints: transformer blocks of an MMDiT (FLUX: double and single stream), and the
    ResNet and transformer blocks inside a UNet's down/mid/up blocks."""
    names = []
    for name, module in denoiser.named_modules():
        kind = type(module).__name__
        if kind in ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock",
                    "BasicTransformerBlock", "ResnetBlock2D"):  # fmt: skip
            names.append(name)
    return names


def gib(n_bytes: float) -> float:
    """Bytes in GiB."""
    return n_bytes / 2**30
