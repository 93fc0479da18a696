"""Loading a causal LM and its tokenizer, and the LoRA adapter that RAFT trains.

Weights are never silently random: a missing folder, an unreachable hub id, or a checkpoint that
leaves weights uninitialised is a ``UserError`` naming what was looked for and how to provide it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from reward_models.weights import MODEL_CACHE_ONLY, from_cache_or_hub

from ..core.errors import UserError
from .assets import toy_path

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def quiet_transformers() -> None:
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # raised inside transformers
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def resolve_model_path(name: str) -> str:
    """'toy' -> the committed toy LM folder; anything else (hub id or folder) is passed through."""
    return str(toy_path("lm")) if name == "toy" else name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise UserError(f"model.dtype {name!r} is not one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[name]


def looks_like_path(name: str) -> bool:
    """A name that can only be a folder: absolute, ./ ../ ~, or more than the one '/' of a hub id."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def check_model_source(kind: str, name: str) -> None:
    """A folder-like name that does not exist is a missing folder, not a malformed hub id."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise UserError(
            f"{kind} folder not found: {name}; give an existing folder holding config.json and weights, or a hub id such as gpt2 or org/name"
        )


def _load_error(kind: str, name: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    where = "local folder" if Path(name).expanduser().exists() else "hub id or local folder"
    return UserError(
        f"cannot load the {kind} '{name}' ({where}): {first}. Give a folder holding config.json and weights "
        f"(safetensors), or a hub id reachable from this machine (HF_HOME / HF_HUB_OFFLINE select the cache)"
    )


def _offline_error(kind: str, name: str):
    """The one-line error for a hub id that is neither cached nor reachable (``from_cache_or_hub``)."""
    return lambda reason: UserError(
        f"the {kind} '{name}' is not in the local Hugging Face cache and the Hub cannot be reached ({reason}): "
        f"download it once where there is a network (hf download {name}) and point HF_HOME at that cache, "
        f"or give a local folder holding config.json and weights"
    )


def load_tokenizer(name: str, *, revision: str | None = None, pad_token: str | None = None):
    """The tokenizer with a pad token and left padding (generation pads on the left).

    No pad token: ``pad_token`` (a token already in the vocabulary) when given, else the eos token.
    Neither available is an error: adding a new token would need new (random) embeddings.
    """
    from transformers import AutoTokenizer

    check_model_source("tokenizer", name)
    try:
        tok = from_cache_or_hub(AutoTokenizer.from_pretrained, name, _offline_error("tokenizer", name), revision=revision)
    except (OSError, ValueError) as err:
        raise _load_error("tokenizer", name, err) from None
    if pad_token is not None:
        if tok.convert_tokens_to_ids(pad_token) in (None, tok.unk_token_id) and pad_token != tok.unk_token:
            raise UserError(f"model.pad_token {pad_token!r} is not in the vocabulary of tokenizer '{name}'; choose an existing token")
        tok.pad_token = pad_token
    elif tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(
                f"tokenizer '{name}' has no pad token and no eos token, so batches cannot be padded; set model.pad_token to a token of its vocabulary"
            )
        log.info("tokenizer '%s' has no pad token; padding with its eos token %r", name, tok.eos_token)
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def check_complete(kind: str, name: str, info: dict) -> None:
    """Refuse a model whose checkpoint did not provide every weight (transformers would init them randomly)."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = missing[:3] if missing else [str(m[0]) if isinstance(m, tuple) else str(m) for m in mismatched[:3]]
        raise UserError(
            f"the {kind} '{name}' does not hold every weight it needs ({len(missing) + len(mismatched)} missing or "
            f"mismatched, e.g. {', '.join(what)}); they would be random. Point to a checkpoint of this architecture"
        )


def load_causal_lm(name: str, *, revision: str | None = None, device: torch.device, dtype: torch.dtype):
    """AutoModelForCausalLM in eval mode on ``device``; every weight must come from the checkpoint."""
    from transformers import AutoModelForCausalLM

    check_model_source("model", name)
    try:
        model, info = from_cache_or_hub(
            AutoModelForCausalLM.from_pretrained,
            name,
            _offline_error("causal LM", name),
            MODEL_CACHE_ONLY,
            revision=revision,
            dtype=dtype,
            output_loading_info=True,
        )
    except (OSError, ValueError) as err:
        raise _load_error("causal LM", name, err) from None
    check_complete("causal LM", name, info)
    return model.to(device).eval()


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _has_conv1d(model) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return False
    return any(isinstance(m, Conv1D) for m in model.modules())


def add_lora(model, *, rank: int, alpha: float, dropout: float, target_modules, init_seed: int, modules_to_save=None):
    """Freeze ``model`` and wrap it in a peft LoRA adapter ('default'); lora_B starts at zero (output unchanged).

    ``modules_to_save`` (names) are trained in full beside the adapter: peft gives each a trainable copy (a tied output
    layer's copy is untied: the input embedding stays the base's) and saves it with the adapter.
    The adapter's random init runs under ``torch.manual_seed(init_seed)`` with the global RNG restored after.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
        task_type="CAUSAL_LM",
        fan_in_fan_out=_has_conv1d(model),  # GPT-2 style Conv1D layers store weights transposed
    )
    names = [n for n, _ in model.named_modules()]
    for m in modules_to_save or ():
        if not any(n == m or n.endswith("." + m) for n in names):
            raise UserError(f"train.modules_to_save names {m!r}, which is no module of the model (GPT-2's output layer is lm_head)")
    model.requires_grad_(False)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(init_seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as err:
            if "target" in str(err).lower():
                raise UserError(
                    f"train.target_modules={target_modules!r} matches no layer of the model: use 'all-linear' or names of "
                    f"its Linear layers (e.g. q_proj, v_proj for Llama-style models, c_attn for GPT-2)"
                ) from None
            raise
    return peft_model


def portable_model_name(name: str, cwd: str | Path | None = None) -> str:
    """The base model's name for a saved adapter, as the user gave it: a hub id or a folder path unchanged,
    and 'toy' as the committed toy LM's folder relative to ``cwd`` (default: where the run was started).

    The loaded model only knows its resolved folder, which for 'toy' is an absolute install path that
    names this machine and breaks when the run directory moves.
    """
    if name != "toy":
        return name
    import os

    return Path(os.path.relpath(toy_path("lm"), Path.cwd() if cwd is None else cwd)).as_posix()


def save_adapter(model, folder: Path, base_name: str | None = None) -> None:
    """``model.save_pretrained(folder)`` with ``target_modules`` sorted in adapter_config.json.

    peft keeps the targets as a set and writes them in set order, which changes with the process's string
    hash seed: the same run would give different bytes each time. ``base_name`` (see :func:`portable_model_name`)
    replaces the loaded model's own path as ``base_model_name_or_path`` in adapter_config.json and README.md.
    """
    configs = getattr(model, "peft_config", {})
    saved = {name: (c.target_modules, c.base_model_name_or_path) for name, c in configs.items()}
    loaded_from = getattr(getattr(model, "config", None), "name_or_path", None)
    try:
        for c in configs.values():
            if isinstance(c.target_modules, (set, frozenset)):
                c.target_modules = sorted(c.target_modules)
            if base_name is not None:
                c.base_model_name_or_path = base_name
        model.save_pretrained(folder)
    finally:
        for name, (targets, base) in saved.items():
            configs[name].target_modules, configs[name].base_model_name_or_path = targets, base
    card = Path(folder) / "README.md"
    if base_name is not None and loaded_from and loaded_from != base_name and card.is_file():
        card.write_text(card.read_text(encoding="utf-8").replace(loaded_from, base_name), encoding="utf-8")


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_weights(model, folder: Path) -> None:
    """Load a saved adapter's weights into the live peft model (resume); every key must match."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = Path(folder) / "adapter_model.safetensors"
    if not f.is_file():
        raise UserError(f"LoRA adapter weights not found at {f}; the run directory is incomplete (delete the stage folder to redo it)")
    result = set_peft_model_state_dict(model, load_file(str(f)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise UserError(f"adapter {folder} does not fit this model (unexpected keys such as {unexpected[0]}); was it saved by another config?")
