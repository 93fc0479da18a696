"""The chunked gradient sum: its bits are one process's whatever the number of processes sharing the chunks."""

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from raft_diffusion.core import gradsum
from raft_diffusion.core.dist import Dist
from raft_diffusion.core.gradsum import chunk_slices, put_grads, summed_grads, take_grads

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
ROWS, CHUNK = 10, 3  # chunks of 3, 3, 3 and 1 rows


def model_and_rows():
    """A small MLP (one parameter never gets a gradient) and ROWS input rows with targets."""
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    unused = torch.nn.Parameter(torch.ones(3))
    return net, [*net.parameters(), unused], torch.randn(ROWS, 16, generator=gen), torch.randn(ROWS, 8, generator=gen)


def backward_of(net, x, y, done: list):
    chunks = chunk_slices(ROWS, CHUNK)

    def backward(i: int) -> float:
        done.append(i)
        loss = ((net(x[chunks[i]]) - y[chunks[i]]) ** 2).sum() / ROWS
        loss.backward()
        return loss.item()

    return backward, len(chunks)


class ThreadGroup:
    """Collectives between threads that stand in for processes (all_gather of tensors and objects)."""

    def __init__(self, world_size: int):
        self.slots, self.barrier = [None] * world_size, threading.Barrier(world_size)

    def dist(self, rank: int) -> Dist:
        d = Dist(rank, len(self.slots))
        d.all_gather_tensor = lambda t: [x.clone() for x in self._exchange(rank, t)]
        d.gather = lambda obj: list(self._exchange(rank, obj))
        return d

    def _exchange(self, rank, obj):
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out


def run_as(world_size: int) -> list[tuple[torch.Tensor, float, list[int]]]:
    """(summed gradient, summed loss, chunks computed) of each of ``world_size`` simulated processes."""
    group, results = ThreadGroup(world_size), [None] * world_size

    def worker(rank):
        net, params, x, y = model_and_rows()
        done = []
        backward, n = backward_of(net, x, y, done)
        loss = summed_grads(params, n, backward, group.dist(rank))
        results[rank] = (take_grads(params), loss, done)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_chunk_slices_cover_the_rows_in_fixed_chunks():
    assert chunk_slices(10, 3) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert chunk_slices(4, 4) == [slice(0, 4)] and chunk_slices(4, 8) == [slice(0, 4)]
    with pytest.raises(ValueError):
        chunk_slices(4, 0)


def test_take_and_put_grads_round_trip():
    _, params, _, _ = model_and_rows()
    params[0].grad = torch.full_like(params[0], 2.0)
    flat = take_grads(params)
    assert flat.numel() == sum(p.numel() for p in params) and all(p.grad is None for p in params)
    assert flat[: params[0].numel()].eq(2).all() and flat[params[0].numel() :].eq(0).all()
    put_grads(params, flat)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 2.0)) and params[-1].grad.shape == (3,)


@pytest.mark.parametrize("bucket", [gradsum.BUCKET, 100])  # 100: the 811 gradients go over in 9 pieces
def test_sum_is_the_chunks_added_in_order_for_any_world_size(bucket, monkeypatch):
    monkeypatch.setattr(gradsum, "BUCKET", bucket)
    # by hand: each chunk's gradient alone, added 0 + 1 + 2 + 3
    net, params, x, y = model_and_rows()
    backward, n = backward_of(net, x, y, [])
    grads, losses = [], []
    for i in range(n):
        losses.append(backward(i))
        grads.append(take_grads(params))
    in_order = grads[0].clone()
    for g in grads[1:]:
        in_order += g
    # the same four chunk gradients added as two processes' partial sums (what an all-reduce does) differ in bits
    assert not torch.equal((grads[0] + grads[2]) + (grads[1] + grads[3]), in_order)

    for world_size in (1, 2, 3, 5):  # 5 processes for 4 chunks: one has nothing to compute
        results = run_as(world_size)
        for rank, (grad, loss, done) in enumerate(results):
            assert done == list(range(rank, n, world_size))
            assert torch.equal(grad, in_order), (world_size, rank)
            assert loss == sum(losses)
        assert grad[-3:].eq(0).all()  # the parameter without a gradient sums to zero


GLOO_SCRIPT = """
import os, sys, torch
sys.path.insert(0, os.environ["TEST_DIR"])
from raft_diffusion.core import gradsum
from raft_diffusion.core.dist import Dist
from raft_diffusion.core.gradsum import summed_grads, take_grads
from test_gradsum import backward_of, model_and_rows

torch.distributed.init_process_group("gloo")
dist = Dist(torch.distributed.get_rank(), torch.distributed.get_world_size())
net, params, x, y = model_and_rows()
backward, n = backward_of(net, x, y, [])
loss = summed_grads(params, n, backward, dist)
if dist.is_main:
    torch.save({"grad": take_grads(params), "loss": loss}, sys.argv[1])
torch.distributed.destroy_process_group()
"""


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not found next to the Python interpreter")
def test_two_real_processes_sum_like_one(tmp_path):
    script = tmp_path / "gloo_sum.py"
    script.write_text(GLOO_SCRIPT)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TEST_DIR": str(ROOT / "tests"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path / "two.pt")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    ((one, loss, _),) = run_as(1)
    assert torch.equal(two["grad"], one) and two["loss"] == loss
