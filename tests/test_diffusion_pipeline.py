"""Loading pipelines: devices, dtypes, local folders and hub ids, schedulers, attention."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from raft_diffusion.core.common import resolve_device
from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.pipeline import enable_attention, load_pipeline, resolve_dtype


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float32, "cpu") == torch.float32
    if torch.cuda.is_available():
        assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(UserError, match="fp16 is not supported on CPU"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(UserError, match="unknown dtype"):
        resolve_dtype("fp8", "cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_requested_without_cuda():
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")


def test_load_local_folder(tiny_pipe):
    pipe = tiny_pipe
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert pipe.safety_checker is None and pipe.config.requires_safety_checker is False
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
        assert not module.training
    assert pipe._progress_bar_config.get("disable") is True
    processors = {type(p).__name__ for p in pipe.unet.attn_processors.values()}
    assert processors == {"AttnProcessor2_0"}  # torch SDPA


@pytest.mark.parametrize("name", ["./no/such/folder", "~/no-such-raft-model", "/definitely/not/here"])
def test_missing_folder_is_a_user_error(name):
    with pytest.raises(UserError, match="does not exist") as info:
        load_pipeline(name)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="has no model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(UserError, match="has no model_index.json"):
        load_pipeline(str(tmp_path / "weights.bin"))


def test_unreachable_hub_id_is_a_user_error():
    with pytest.raises(UserError) as info:
        load_pipeline("raft-diffusion-tests/no-such-model-xyz")
    message = str(info.value)
    assert "raft-diffusion-tests/no-such-model-xyz" in message and "local" in message and "\n" not in message


def test_bad_name_is_a_user_error():
    with pytest.raises(UserError, match="neither a local folder nor a hub id"):
        load_pipeline("not a model!")


def test_scheduler_by_class_name(load_tiny_pipe):
    pipe = load_tiny_pipe(scheduler="DPMSolverMultistepScheduler")
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(UserError, match="unknown scheduler 'Nope'.*EulerDiscreteScheduler"):
        load_tiny_pipe(scheduler="Nope")


def test_v_prediction_follows_scheduler_config(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "vpred"
    shutil.copytree(tiny_pipeline_dir, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    pipe = load_pipeline(str(folder), device="cpu", scheduler="EulerDiscreteScheduler")
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_attention_modes(load_tiny_pipe):
    pipe = load_tiny_pipe(attention="sdpa")
    assert enable_attention(pipe, "auto") == "sdpa"  # CPU: torch SDPA
    with pytest.raises(UserError, match="needs a CUDA device|not installed"):
        enable_attention(pipe, "xformers")
    with pytest.raises(UserError, match="unknown attention mode"):
        enable_attention(pipe, "flash")


def test_safety_checker_requested_but_absent(tiny_pipeline_dir):
    with pytest.raises(UserError, match="safety checker"):
        load_pipeline(str(tiny_pipeline_dir), device="cpu", safety_checker=True)


def test_broken_folder_and_missing_variant(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(UserError, match="could not load the pipeline in"):
        load_pipeline(str(folder), device="cpu")
    with pytest.raises(UserError, match="no 'fp16' weights variant"):
        load_pipeline(str(tiny_pipeline_dir), device="cpu", variant="fp16")
