"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    """Models the tests build ('tiny' pipeline and CLIP) go to a throwaway cache, not the user's."""
    if "RAFT_DIFFUSION_CACHE" not in os.environ:
        import tempfile

        os.environ["RAFT_DIFFUSION_CACHE"] = tempfile.mkdtemp(prefix="raft-diffusion-test-cache-")
    _one_thread()


def _one_thread():
    """One intra-op thread unless OMP_NUM_THREADS says otherwise: the test models are tiny, and on a
    shared 2-core machine OpenMP threads that spin-wait for a busy core made some tests 40x slower."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_script():
    """Factory: import one of ``scripts/*.py`` by file name (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


# --- tiny Stable Diffusion pipeline (raft_diffusion.diffusion.tiny) ------------------------------


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    """A saved tiny SD pipeline folder (built once per test session, outside the user's cache)."""
    from raft_diffusion.diffusion.tiny import ensure_tiny_pipeline

    return ensure_tiny_pipeline(tmp_path_factory.mktemp("raft-diffusion-cache"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_pipeline_dir):
    """One loaded tiny pipeline (CPU, fp32) shared by the session: do not modify it (use load_tiny_pipe)."""
    from raft_diffusion.diffusion.pipeline import load_pipeline

    return load_pipeline(str(tiny_pipeline_dir), device="cpu")


@pytest.fixture
def load_tiny_pipe(tiny_pipeline_dir):
    """Factory: a freshly loaded tiny pipeline that a test may modify (add LoRA, train, swap schedulers)."""
    from raft_diffusion.diffusion.pipeline import load_pipeline

    def load(**kwargs):
        kwargs.setdefault("device", "cpu")
        return load_pipeline(str(tiny_pipeline_dir), **kwargs)

    return load
