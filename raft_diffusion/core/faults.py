"""Fault injection for the resume tests: ``RAFT_FAULT=<point>:<stage>`` kills the process at that point.

The stage loop calls :func:`fault_point` at its step boundaries (``score``: after the first scored batch,
``sample``: after the pool is written, ``train``: after fine-tuning, before the weights are saved,
``save``: after the weights are saved, ``stage_json``: with the stage marker written to its temporary file
but not yet moved into place). The process ends with ``os._exit`` as a SIGKILL would: no ``finally``
blocks, no flushing. Unset (always, outside tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import sys

ENV = "RAFT_FAULT"
POINTS = ("score", "sample", "train", "save", "stage_json")
KILLED_EXIT_CODE = 137  # what a shell reports for SIGKILL


def fault_point(point: str, stage: int) -> None:
    spec = os.environ.get(ENV)
    if spec and spec == f"{point}:{stage}":
        print(f"{ENV}: killed at {point} of stage {stage}", file=sys.stderr, flush=True)
        os._exit(KILLED_EXIT_CODE)
