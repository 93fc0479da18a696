"""Processes: one, or many under ``accelerate launch`` / ``torchrun`` (accelerate sets up the process group).

The core shards work by whole generation batches, so every sample's seed, batch neighbours and image are
the same whatever the number of processes; results are gathered so every process selects exactly what a
single process would. Only the main process writes the run directory.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

TIMEOUT_ENV = "RAFT_DIST_TIMEOUT"  # seconds a collective may wait before the run fails (default 1800)


class Dist:
    """Rank, world size and the few collectives the loop needs; a no-op for one process."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None):
        self.rank, self.world_size = rank, world_size
        self.device = device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def gather(self, obj) -> list:
        """Every process's ``obj``, in rank order, on every process (picklable objects, CPU tensors)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """``value`` summed over every process (an all-reduce), on every process."""
        if not self.enabled:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._collective_device())
        torch.distributed.all_reduce(t)
        return float(t.item())

    def all_gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``t`` (same shape and dtype everywhere), in rank order, on ``t``'s device."""
        if not self.enabled:
            return [t]
        src = t.to(self._collective_device()).contiguous()
        out = [torch.empty_like(src) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, src)
        return [o.to(t.device) for o in out]

    def broadcast_params(self, params) -> None:
        """Make every process's ``params`` equal the main process's (after the main process loaded them)."""
        if not self.enabled:
            return
        for p in params:
            torch.distributed.broadcast(p.data, src=0)

    def _collective_device(self):
        return self.device if self.device is not None and torch.distributed.get_backend() == "nccl" else "cpu"

    def shard(self, items: list, batch_size: int) -> list:
        """This process's share of ``items``: whole batches of ``batch_size``, dealt round-robin."""
        if not self.enabled:
            return list(items)
        out = []
        for b, start in enumerate(range(0, len(items), batch_size)):
            if b % self.world_size == self.rank:
                out.extend(items[start : start + batch_size])
        return out


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_dist(device: str = "auto") -> Dist:
    """One process unless a launcher set WORLD_SIZE > 1; then accelerate's PartialState joins the group."""
    if launched_world_size() <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    state = PartialState(cpu=cpu, timeout=timeout)
    return Dist(state.process_index, state.num_processes, state.device)
