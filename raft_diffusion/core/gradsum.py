"""A gradient sum whose bits do not depend on how many processes share the work.

An optimizer step's rows are cut into chunks that the caller fixes (never from the process count). Chunk
``i`` is computed by process ``i % world_size``, alone, at its own shape, so on the same hardware and thread
count its gradient has the same bits wherever it runs. Every chunk's gradient is flattened into one vector,
the vectors are exchanged, and every process adds them in chunk order -- the very additions one process
makes when it computes every chunk itself. The summed gradient, hence the optimizer step, is then bitwise
the same for 1, 2 or 3 processes. (An all-reduce adds per-process partial sums in an order that depends on
the process count; Adam turns the last-bit differences of near-zero gradients into full-size steps.)

Cost: the gradients are copied once per chunk, and processes exchange every chunk's vector, i.e. about
``chunks / 2`` times the traffic of an all-reduce. The exchange goes in buckets of ``BUCKET`` elements, so
memory is about three times the trainable weights plus ``world_size`` buckets: small for LoRA, and it still
fits for a full fine-tune.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .dist import Dist

BUCKET = 1 << 24  # elements exchanged per collective (64 MiB of fp32)


def take_grads(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradients of ``params`` as one flat vector (zeros where a parameter has none); the gradients are cleared."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for p in params:
        p.grad = None
    return flat


def put_grads(params: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Set the gradients of ``params`` to consecutive slices of ``flat`` (the layout of :func:`take_grads`)."""
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def chunk_slices(num_rows: int, chunk_rows: int) -> list[slice]:
    """Consecutive slices of ``chunk_rows`` rows (the last one may be shorter) covering ``num_rows`` rows."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [slice(start, min(start + chunk_rows, num_rows)) for start in range(0, num_rows, chunk_rows)]


def summed_grads(params: list[torch.Tensor], num_chunks: int, compute: Callable[[int], float], dist: Dist | None = None) -> float:
    """Set the gradients of ``params`` to the sum of every chunk's, added in chunk order; return the summed loss.

    ``compute(i)`` runs forward and backward of chunk ``i`` (its loss already divided by the step's row count)
    from cleared gradients and returns its loss; this process runs it for chunks ``rank``, ``rank + world_size``, ...
    Every process ends with the same gradient bits, and they are one process's. The loss is summed in chunk
    order too.
    """
    dist = dist or Dist()
    size = sum(p.numel() for p in params)
    total, losses = None, {}
    for first in range(0, num_chunks, dist.world_size):  # one chunk per process per round
        mine = first + dist.rank
        if mine < num_chunks:
            losses[mine] = float(compute(mine))
            flat = take_grads(params)
        else:  # this process has no chunk left in the last round
            flat = params[0].new_zeros(size)
        total = _add_round(total, flat, min(dist.world_size, num_chunks - first), dist)
    put_grads(params, total)
    merged = {i: v for part in dist.gather(losses) for i, v in part.items()}
    return sum(merged[i] for i in range(num_chunks))


def _add_round(total: torch.Tensor | None, flat: torch.Tensor, count: int, dist: Dist) -> torch.Tensor:
    """``total`` plus the round's ``count`` chunk vectors (process 0's, then 1's, ...), each added in turn.

    The first chunk of all is copied, not added to zeros, so even the sign of a zero gradient is one process's.
    """
    if not dist.enabled:
        return flat if total is None else total.add_(flat)
    fresh = total is None
    if fresh:
        total = torch.empty_like(flat)
    for start in range(0, flat.numel(), BUCKET):
        part = slice(start, start + BUCKET)
        gathered = dist.all_gather_tensor(flat[part])
        for r in range(count):
            if fresh and r == 0:
                total[part].copy_(gathered[0])
            else:
                total[part].add_(gathered[r])
    return total
