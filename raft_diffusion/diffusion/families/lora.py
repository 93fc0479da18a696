"""LoRA on a family's denoiser through peft, saved with the family pipeline's own LoRA saver."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from raft_diffusion.core.errors import UserError
from raft_diffusion.core.rundir import plain_mode


def sorted_targets(metadata: dict) -> dict:
    """The LoRA config with ``target_modules`` as a sorted list: peft keeps a set, whose order varies between
    processes, and the saved file should be the same bytes for the same weights."""
    targets = metadata.get("target_modules")
    if isinstance(targets, (set, frozenset, list, tuple)):
        metadata = {**metadata, "target_modules": sorted(targets)}
    return metadata


def _matches(module_name: str, target: str) -> bool:
    """peft's rule for a plain-string target: the full name, or its dotted suffix."""
    return module_name == target or module_name.endswith("." + target)


def matching_modules(denoiser: torch.nn.Module, targets) -> list[str]:
    """Names of the Linear layers of ``denoiser`` that the peft target list ``targets`` selects (a layer that
    already carries LoRA counts by its wrapped ``base_layer``)."""
    return [
        name for name, module in denoiser.named_modules()
        if isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
        and any(_matches(name, t) for t in targets)
    ]  # fmt: skip


def present_targets(denoiser: torch.nn.Module, targets) -> list[str]:
    """The targets that match at least one Linear layer (a family's defaults minus those this model lacks)."""
    found = [t for t in targets if matching_modules(denoiser, [t])]
    if not found:
        raise UserError(f"none of the LoRA targets {list(targets)} names a Linear layer of {type(denoiser).__name__}")
    return found


def add_lora(denoiser, *, rank: int, alpha: float, dropout: float, targets, init_seed: int = 0,
             adapter_name: str = "default") -> int:  # fmt: skip
    """Freeze ``denoiser`` and ``add_adapter`` a peft LoRA (A Gaussian under ``init_seed``, B zero: the output is
    unchanged at first); return the trainable parameter count. The global RNG state is restored."""
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1, got {rank}: set lora rank to a positive integer")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                        target_modules=list(targets))  # fmt: skip
    denoiser.requires_grad_(False)
    cuda = sorted({p.device.index or 0 for p in denoiser.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(init_seed)
        denoiser.add_adapter(config, adapter_name=adapter_name)
    return sum(p.numel() for p in denoiser.parameters() if p.requires_grad)


def sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a .safetensors header with its ``__metadata__`` keys sorted: the writer puts them in a different order
    on every save, and the same weights should give the same bytes (tensor offsets are relative to the header's
    end, so the header may be re-encoded; it is padded to 8 bytes as the format asks)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n :])


def save_lora(pipeline_class, denoiser_attr: str, denoiser, out_dir, *, adapter_name: str = "default") -> Path:
    """``pipeline_class.save_lora_weights(out_dir, <denoiser_attr>_lora_layers=peft state dict)`` plus the
    adapter config as metadata (so alpha != rank reloads at the right scale); the folder is replaced atomically."""
    from peft.utils import get_peft_model_state_dict

    if adapter_name not in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"the denoiser has no LoRA adapter {adapter_name!r} to save (add one first)")
    out_dir = Path(out_dir)
    state = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    kwargs = {f"{denoiser_attr}_lora_layers": {k: v.detach().cpu().contiguous() for k, v in state.items()},
              "safe_serialization": True}  # fmt: skip
    meta_key = f"{denoiser_attr}_lora_adapter_metadata"
    if meta_key in inspect.signature(pipeline_class.save_lora_weights).parameters:
        kwargs[meta_key] = sorted_targets(denoiser.peft_config[adapter_name].to_dict())
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, plain_mode(True))  # mkdtemp makes 0700; the folder should read like one made with mkdir
    old = None
    try:
        pipeline_class.save_lora_weights(str(tmp), **kwargs)
        for f in tmp.glob("*.safetensors"):
            sort_safetensors_metadata(f)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name for saved LoRA weights


def load_lora(denoiser_attr: str, denoiser, lora_dir, *, adapter_name: str = "default") -> None:
    """Load the ``<denoiser_attr>.`` tensors of a :func:`save_lora` folder into the denoiser's existing adapter.

    Keys and shapes must match the adapter exactly (same targets and rank), else a UserError says what differs.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(lora_dir) / LORA_WEIGHT_NAME
    if not path.is_file():
        raise UserError(f"no LoRA weights at {str(path)!r}: point to a folder written by save_lora")
    if adapter_name not in getattr(denoiser, "peft_config", {}):
        raise ValueError(f"the denoiser has no LoRA adapter {adapter_name!r} (add one with the saved settings first)")
    prefix = denoiser_attr + "."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    expected = get_peft_model_state_dict(denoiser, adapter_name=adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and expected[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise UserError(
            f"LoRA in {str(lora_dir)!r} does not fit the adapter ({len(missing)} missing keys, {len(unexpected)} "
            f"unexpected, {len(wrong)} of another shape, e.g. {(missing + unexpected + wrong)[:1]}): "
            "resume with the same lora settings"
        )
    set_peft_model_state_dict(denoiser, state, adapter_name=adapter_name)
