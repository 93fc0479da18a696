"""Load a Stable Diffusion pipeline (hub id or local folder) ready for RAFT sampling and fine-tuning."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from ..core.common import resolve_device
from ..core.errors import UserError

logger = logging.getLogger(__name__)

_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}  # fmt: skip
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
ATTENTION_MODES = ("auto", "xformers", "sdpa")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``"auto"`` is fp16 on CUDA and fp32 elsewhere; fp16 on CPU is refused (slow and unsupported ops)."""
    device = torch.device(device)
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = torch.float16 if device.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise UserError(f"unknown dtype {dtype!r}: use auto, fp32, fp16 or bf16")
    if resolved == torch.float16 and device.type == "cpu":
        raise UserError("dtype fp16 is not supported on CPU: use dtype=fp32 (or auto) on CPU, or run on a GPU")
    return resolved


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("name" or "owner/name")."""
    return (
        Path(name).expanduser().exists()
        or name.startswith((".", "~", "/", os.sep))
        or (os.altsep is not None and os.altsep in name)
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _hub_reason(err: BaseException) -> str:
    """A short reason for a failed hub load."""
    text = str(err)
    if "not fully cached" in text or "connect" in text.lower() or "offline" in text.lower():
        return "not in the local cache and the Hub is unreachable"
    if type(err).__name__ in ("RepositoryNotFoundError", "GatedRepoError"):
        return "no such public repository, or it needs a token"
    if type(err).__name__ == "RevisionNotFoundError":
        return "no such revision"
    return _first_line(err, 160)


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:
        from huggingface_hub import errors as hub_errors

        errors += [hub_errors.HfHubHTTPError, hub_errors.HFValidationError]
    except (ImportError, AttributeError):
        pass
    return tuple(errors)


def _dtype_kwarg() -> str:
    """diffusers renamed ``torch_dtype`` to ``dtype`` (the old name warns); use whichever this version takes."""
    try:
        from diffusers.utils import deprecation_utils
    except ImportError:
        return "torch_dtype"
    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


@contextlib.contextmanager
def _quiet_loading():
    """No per-component "Loading ..." bars (download bars of the hub client stay)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    d_on, t_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if d_on:
            dlog.enable_progress_bar()
        if t_on:
            tlog.enable_progress_bar()


def absent_components(folder) -> dict:
    """``{name: None}`` for the parts a local pipeline folder's model_index.json lists as ``[null, null]`` (saved
    without them, e.g. an SD3 folder without T5): ``from_pretrained`` must be told, or it refuses the folder."""
    import json

    index = Path(folder).expanduser() / "model_index.json"
    if not index.is_file():
        return {}
    return {k: None for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def load_pipeline(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    safety_checker: bool = False,
    attention: str = "auto",
    scheduler: str | None = None,
    family=None,
):
    """Load a pipeline of ``family`` (default: a StableDiffusionPipeline, SD 1.x/2.x) from a hub id or a local folder.

    1. Resolve device and dtype; tell a local folder from a hub id and check it.
    2. ``from_pretrained`` (safety checker dropped unless asked for).
    3. Optionally swap the scheduler; epsilon/v-prediction follow the scheduler config.
    4. Move to the device, freeze every module (fine-tuning makes chosen params trainable),
       eval mode, attention backend, no progress bars.
    """
    from diffusers import StableDiffusionPipeline

    sd = family is None or family.name == "sd"
    pipeline_class = StableDiffusionPipeline if sd else family.pipeline_class()
    if not sd and dtype == "auto" and resolve_device(device).type == "cuda":
        dtype = family.cuda_dtype  # bf16 for the T5-based families, whose activations overflow fp16
    # 1. where from
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = str(pretrained)
    local = _looks_like_path(name)
    if local:
        folder = Path(name).expanduser()
        if not (folder / "model_index.json").is_file():
            what = "does not exist" if not folder.exists() else "has no model_index.json"
            raise UserError(
                f"model folder {name!r} {what}: pass a diffusers pipeline folder "
                "(one saved with save_pretrained, containing model_index.json) or a hub id like owner/name"
            )
        source = str(folder)
    elif not _HUB_ID.match(name):
        raise UserError(f"{name!r} is neither a local folder nor a hub id: use owner/name or a folder path")
    else:
        source = name

    # 2. load
    kwargs = {**(absent_components(source) if local else {}), "revision": revision, "variant": variant, _dtype_kwarg(): torch_dtype}
    if safety_checker and not sd:
        raise UserError(f"model.safety_checker is for SD 1.x/2.x pipelines; {pipeline_class.__name__} has none: set it to false")
    if not safety_checker and sd:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        with _quiet_loading():
            pipe = pipeline_class.from_pretrained(source, **kwargs)
    except _hub_errors() as err:
        if local:
            raise UserError(f"could not load the pipeline in {name!r}: {_first_line(err)}") from None
        raise UserError(
            f"could not load {name!r} from the Hugging Face Hub ({_hub_reason(err)}): check the id and your "
            "network, pre-download it into the HF_HOME cache, or pass a local pipeline folder"
        ) from None
    except ValueError as err:
        if variant and "variant" in str(err):
            raise UserError(f"{name!r} has no {variant!r} weights variant: set variant to null or pick one it ships") from None
        raise
    if safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise UserError(f"{name!r} ships no safety checker: set safety_checker to false or use a model that has one")

    # 3. scheduler
    if scheduler:
        pipe.scheduler = make_scheduler(pipe, scheduler)

    # 4. device, freezing, attention
    pipe.to(dev)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
            module.eval()
    if hasattr(pipe, "unet"):
        enable_attention(pipe, attention)
    elif attention == "xformers":  # the transformers' joint-attention processors use torch SDPA
        raise UserError(f"attention=xformers is for UNet pipelines; {pipeline_class.__name__} uses torch SDPA: set attention=auto")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_scheduler(pipe, name: str):
    """A scheduler of class ``name`` (e.g. ``DPMSolverMultistepScheduler``) from the pipeline's scheduler config."""
    compatible = {cls.__name__: cls for cls in pipe.scheduler.compatibles}
    compatible[type(pipe.scheduler).__name__] = type(pipe.scheduler)
    if name not in compatible:
        raise UserError(f"unknown scheduler {name!r}: choose one of {', '.join(sorted(compatible))}")
    return compatible[name].from_config(pipe.scheduler.config)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def enable_attention(pipe, mode: str = "auto") -> str:
    """Choose the attention kernels: ``xformers`` (CUDA + xformers installed) or ``sdpa`` (torch's fused attention).

    ``auto`` takes xformers when it can and falls back to SDPA. Returns the mode used.
    """
    if mode not in ATTENTION_MODES:
        raise UserError(f"unknown attention mode {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
    on_cuda = pipe.device.type == "cuda"
    if mode == "xformers" and not on_cuda:
        raise UserError("attention=xformers needs a CUDA device: use attention=auto or attention=sdpa")
    if mode == "xformers" and not xformers_available():
        raise UserError("attention=xformers but xformers is not installed: pip install xformers, or use attention=auto")
    if mode in ("xformers", "auto") and on_cuda and xformers_available():
        try:
            pipe.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as err:  # a broken xformers build for this torch/GPU
            if mode == "xformers":
                raise UserError(f"attention=xformers failed ({_first_line(err, 160)}): use attention=sdpa") from None
            logger.warning("xformers unusable (%s); using torch SDPA attention", _first_line(err, 160))
    pipe.disable_xformers_memory_efficient_attention()  # diffusers' default: AttnProcessor2_0 (torch SDPA)
    return "sdpa"
