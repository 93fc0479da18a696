"""core.malloc: freed memory is kept and reused by the next batch instead of being faulted in again."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import resource, sys
from raft_diffusion.core.malloc import keep_freed_memory
tuned = keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = (1, 3, 6, 12, 24)  # MiB, a batch's activations: zero-filled, so every page is touched
start = faults()
for _ in range(30):
    bufs = [bytearray(n << 20) for n in sizes]
    del bufs
print(tuned, (faults() - start) / (sum(sizes) << 20 >> 12))  # faults in units of one batch's pages
"""


def probe(tune: str) -> tuple[bool, float]:
    env = {**os.environ, "RAFT_MALLOC_TUNE": tune, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout.split()
    return out[0] == "True", float(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_thirty_batches_fault_their_pages_in_once():
    tuned, batches = probe("1")
    assert tuned
    assert batches < 1.2, batches  # the first batch's pages only: the next 29 reuse them
    untuned, batches_default = probe("0")
    assert not untuned and batches_default > batches  # glibc's own thresholds give (part of) the memory back
