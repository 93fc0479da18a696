"""Export a run's LoRA for other tools: a kohya / A1111 file, a diffusers or peft folder, or a merged checkpoint.

Every model family (SD 1.x/2.x, SDXL, SD3, FLUX.1, FLUX.2 [klein]). The run's LoRA
(``final/pytorch_lora_weights.safetensors``: peft-style keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
``transformer.`` for the transformer families, with the peft ``LoraConfig`` in the metadata key
``lora_adapter_metadata``) is read once into a :class:`Lora` (per module: A, B and the effective scale), and every
format is written from that.

Formats:

- ``kohya``: one ``.safetensors`` with ``lora_unet_<module name>.lora_down.weight`` (= A), ``.lora_up.weight``
  (= B) and ``.alpha``, the module names kohya's scripts use for the family (``kohya.py``: SD 1.x the diffusers
  path, SDXL the original SGM path, FLUX.1 and FLUX.2 the original names with fused qkv; SD3 refused);
  kohya-style tools compute the scale as ``alpha / rank``, so
  ``alpha`` is written as ``scale * rank`` -- the run's ``lora_alpha`` when the plain LoRA rule applies
  (``use_rslora`` and ``alpha_pattern`` come out right too). Metadata: ``ss_*`` keys that kohya's scripts write
  and UIs show, ``modelspec.*`` (Stability's model spec), and ``raft_*`` keys.
- ``diffusers``: a copy of the LoRA folder (``pipe.load_lora_weights(folder)``).
- ``peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained(unet, folder)``).
- ``merge``: the LoRA fused into the base model's weights, saved as a diffusers pipeline folder plus, for SD 1.x
  and SDXL, one original-layout ``.safetensors`` checkpoint that ``from_single_file`` and the usual UIs read.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import UserError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name (what save_lora writes)
METADATA_KEY = "lora_adapter_metadata"  # where diffusers keeps the LoRA config in the safetensors header
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
FORMATS = ("kohya", "diffusers", "peft")
GRID = "gallery/grid_before_after.png"  # the before/after grid, relative to the run directory (the card links it)
KOHYA_UNET_PREFIX = "lora_unet_"


def tool_version() -> str:
    """``raft-diffusion <installed version>`` (the package's metadata; imports point down, not to the top)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"raft-diffusion {version('raft-diffusion')}"
    except PackageNotFoundError:
        return "raft-diffusion"


# --- where the LoRA is ---------------------------------------------------------------------------------------


@dataclass
class LoraSource:
    """A LoRA file and what is known about the run that made it."""

    weights: Path  # the diffusers-format .safetensors
    run_dir: Path | None = None  # the run directory, when the LoRA came from one
    stage: int | None = None  # the stage whose weights these are (None: unknown)
    config: dict = field(default_factory=dict)  # the run's config.yaml (empty when there is no run)

    @property
    def base_model(self) -> str | None:
        return (self.config.get("model") or {}).get("pretrained")

    @property
    def reward(self) -> str | None:
        reward = self.config.get("reward")
        return reward.get("name") if isinstance(reward, dict) else reward

    @property
    def family(self) -> str | None:
        return (self.config.get("model") or {}).get("family")


def read_run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise UserError(f"cannot read {path}: {str(err).splitlines()[0]}") from None
    return data if isinstance(data, dict) else {}


def final_stage(run_dir: Path) -> int | None:
    """The stage whose weights ``final/`` holds: the early stop's choice, else the last stage in metrics.jsonl."""
    stop = run_dir / "early_stop.json"
    if stop.is_file():
        try:
            return int(json.loads(stop.read_text(encoding="utf-8"))["final_stage"])
        except (ValueError, KeyError, TypeError):
            pass
    rows = metrics_rows(run_dir)
    stages = [int(r["stage"]) for r in rows if isinstance(r.get("stage"), int)]
    return max(stages) if stages else None


def metrics_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line of a killed run
    return rows


def _is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "stages").is_dir() or (path / "metrics.jsonl").is_file())


def resolve_source(path: str | Path) -> LoraSource:
    """Find the LoRA of a run directory (its ``final/``), a stage folder (its ``lora/``), a LoRA folder or file.

    Anything else is a one-line UserError: a missing path, a run without ``final/``, a folder or file without
    LoRA weights.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{path} does not exist: pass a run directory, a stage folder, a LoRA folder or a .safetensors file")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise UserError(f"{path} is not a .safetensors file: pass a run directory, a LoRA folder or a LoRA .safetensors file")
        if path.name == LORA_WEIGHT_NAME:  # inside final/ or stages/NNN/lora/: the folder knows its run
            found = resolve_source(path.parent)
            return LoraSource(path, found.run_dir, found.stage, found.config)
        return LoraSource(path)
    if _is_run_dir(path):
        weights = path / "final" / LORA_WEIGHT_NAME
        if not weights.is_file():
            raise UserError(
                f"run directory {path} has no final/{LORA_WEIGHT_NAME} (has a stage finished? a full "
                "fine-tuning run has no LoRA to export): pass a stage folder or let the run finish"
            )
        return LoraSource(weights, path, final_stage(path), read_run_config(path))
    if (path / "lora" / LORA_WEIGHT_NAME).is_file():  # a stage folder: stages/NNN
        run_dir = path.parent.parent if _is_run_dir(path.parent.parent) else None
        stage = int(path.name) if path.name.isdigit() else None
        return LoraSource(path / "lora" / LORA_WEIGHT_NAME, run_dir, stage, read_run_config(run_dir) if run_dir else {})
    if (path / LORA_WEIGHT_NAME).is_file():  # a LoRA folder (final/ or stages/NNN/lora/ or a copy)
        parent = path.parent.parent.parent if path.name == "lora" else path.parent  # <run>/stages/NNN/lora, <run>/final
        run_dir = parent if _is_run_dir(parent) else None
        stage = (int(path.parent.name) if path.name == "lora" and path.parent.name.isdigit()
                 else final_stage(run_dir) if run_dir else None)  # fmt: skip
        return LoraSource(path / LORA_WEIGHT_NAME, run_dir, stage, read_run_config(run_dir) if run_dir else {})
    raise UserError(
        f"{path} holds no LoRA: expected a run directory (config.yaml, final/), a stage folder "
        f"(lora/{LORA_WEIGHT_NAME}) or a LoRA folder ({LORA_WEIGHT_NAME})"
    )


# --- the LoRA itself -----------------------------------------------------------------------------------------


@dataclass
class Lora:
    """A denoiser LoRA: per module (its path in the UNet or transformer) the down (A) and up (B) matrices and the
    scale ``B @ A`` is multiplied by; plus the peft config it was saved with (``{}`` when the file had none)."""

    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    scale: dict[str, float]
    config: dict
    prefix: str = "unet"  # the denoiser the LoRA is on: "unet" (SD, SDXL) or "transformer" (SD3, FLUX)

    @property
    def modules(self) -> list[str]:
        return sorted(self.down)

    @property
    def rank(self) -> int:
        """The config's rank (else the largest module rank)."""
        return int(self.config.get("r") or max(t.shape[0] for t in self.down.values()))

    @property
    def alpha(self) -> float:
        """The config's ``lora_alpha`` (a file without config: diffusers loads it with alpha = rank)."""
        return float(self.config.get("lora_alpha") or self.rank)

    def delta(self, module: str) -> torch.Tensor:
        """``scale * B @ A`` in the shape of the module's weight (convolutions: A is ``[r, in, kh, kw]``,
        B is ``[out, r, 1, 1]``)."""
        a, b = self.down[module].float(), self.up[module].float()
        d = b.flatten(1) @ a.flatten(1)
        return self.scale[module] * d.reshape(b.shape[0], *a.shape[1:])


def _pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern rule: a key that matches the module path or a dotted suffix of it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora(weights: str | Path) -> Lora:
    """Read a diffusers-format LoRA file (peft keys, or the older ``lora.down`` / ``lora.up`` keys) of a UNet or a
    transformer (``unet.`` / ``transformer.`` keys, as every family's ``save_lora_weights`` writes them).

    A file that is not a LoRA, a kohya file, or a LoRA on text encoders is a one-line UserError.
    """
    from safetensors import SafetensorError, safe_open

    weights = Path(weights)
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{weights} is not a readable .safetensors file ({str(err).splitlines()[0][:120]})") from None
    lora_keys = [k for k in state if re.search(r"\.(lora_[AB]|lora\.(down|up)|lora_(down|up))\.weight$", k)]
    if not lora_keys:
        raise UserError(f"{weights} holds no LoRA tensors (no lora_A / lora_B keys): is it a full checkpoint? pass a LoRA written by raft-diffusion")
    if any(k.startswith(KOHYA_UNET_PREFIX) for k in lora_keys):
        raise UserError(f"{weights} is already a kohya-format LoRA: pass the run directory or its diffusers LoRA")
    prefixes = sorted({k.split(".")[0] for k in lora_keys})
    other = [p for p in prefixes if p not in ("unet", "transformer")]
    if other or len(prefixes) != 1:
        raise UserError(f"{weights} has LoRA weights for {', '.join(other or prefixes)}: export covers one denoiser's LoRA (unet or transformer)")
    prefix = prefixes[0]
    config = {}
    if METADATA_KEY in metadata:
        raw = json.loads(metadata[METADATA_KEY])
        config = {k.removeprefix(prefix + "."): v for k, v in raw.items() if k.startswith(prefix + ".")}
    if config.get("use_dora"):
        raise UserError(f"{weights} is a DoRA adapter: kohya and merged exports of DoRA are not supported")
    tensors = {k.removeprefix(prefix + "."): state[k] for k in lora_keys}
    if not all(re.search(r"\.lora_[AB]\.weight$", k) for k in tensors):  # older diffusers key styles
        from diffusers.utils import convert_unet_state_dict_to_peft

        tensors = convert_unet_state_dict_to_peft(tensors)
    down, up = {}, {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])\.weight", key)
        if match is None:
            raise UserError(f"{weights} has a LoRA key this export cannot place: {prefix}.{key}")
        (down if match.group(2) == "A" else up)[match.group(1)] = value
    if set(down) != set(up):
        raise UserError(f"{weights} has unpaired LoRA tensors (e.g. {sorted(set(down) ^ set(up))[:1]}): the file is damaged")
    scale = {}
    for module, a in down.items():
        r = a.shape[0]
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha") or r))
        scale[module] = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return Lora(down, up, scale, config, prefix)


# --- which family -------------------------------------------------------------------------------------------


def resolve_base(name: str) -> str:
    """``tiny`` / ``tiny-<family>`` (the tiny test pipelines) to their cached folder; anything else unchanged."""
    from .task import resolve_pretrained

    return resolve_pretrained(str(name))


def export_family(src: LoraSource, lora: Lora, base: str | None = None) -> str:
    """The LoRA's model family (short name): the run's ``model.family``, else the base model's pipeline class
    (``base`` or the run's ``model.pretrained``), else what the LoRA's module names say."""
    from .families.registry import FAMILIES, detect_family, get_family

    if src.family:
        return get_family(src.family).name
    name = base or src.base_model
    if name:
        try:
            return detect_family(resolve_base(name)).name
        except UserError:
            if base:  # the user named it: say what is wrong with it
                raise
    modules = lora.modules
    if lora.prefix == "unet":
        widths = {lora.down[m].shape[1] for m in modules if m.endswith("attn2.to_k")}
        return "sdxl" if 2048 in widths or any(m.startswith("add_embedding") for m in modules) else "sd"
    if any("to_qkv_mlp_proj" in m for m in modules):
        return "flux2-klein"
    if any(m.startswith(("layers.", "noise_refiner.", "context_refiner.")) for m in modules):  # Z-Image's DiT
        return "z-image"
    if any(m.startswith("single_transformer_blocks.") for m in modules):
        return "flux"
    raise UserError(
        f"cannot tell which transformer family {src.weights} is for (SD3 or FLUX: {len(modules)} modules, none in single "
        f"blocks): pass --base with the base model ({', '.join(f.name for f in FAMILIES.values())})"
    )


def sd_version(lora: Lora) -> str:
    """``sd_v1`` or ``sd_v2`` of an SD-family LoRA, from the cross-attention width its ``attn2.to_k`` reads (1024 is
    SD 2.x; the tiny test model's 32 counts as SD 1.x)."""
    widths = {t.shape[1] for m, t in lora.down.items() if m.endswith("attn2.to_k")}
    return "sd_v2" if 1024 in widths else "sd_v1"


# --- kohya / A1111 -------------------------------------------------------------------------------------------


def kohya_name(module: str) -> str:
    """kohya's name of an SD 1.x/2.x UNet or Qwen-Image transformer module: ``lora_unet_`` + its diffusers path with dots
    as underscores (kohya's scripts and musubi-tuner train them with diffusers' module names; SDXL and FLUX: see
    ``kohya.py``)."""
    return KOHYA_UNET_PREFIX + module.replace(".", "_")


def denoiser_config(family: str, base: str | None) -> dict | None:
    """The base model's denoiser config (``unet/config.json`` or ``transformer/config.json``; a cached hub id works
    too), or None when there is no base model to read it from."""
    if not base:
        return None
    from .families.registry import get_family

    attr = get_family(family).denoiser_attr
    folder = Path(resolve_base(base)).expanduser()
    path = folder / attr / "config.json"
    try:
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        from diffusers import ConfigMixin

        class _Reader(ConfigMixin):
            config_name = "config.json"

        return dict(_Reader.load_config(str(base), subfolder=attr))
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot read the {attr} config of the base model {base!r} ({str(err).splitlines()[0][:120]}): pass --base with a local pipeline folder"
        ) from None


def _linear_shapes(family: str, config: dict):
    """``module -> (out, in)`` of the denoiser's Linear layers, from a weightless (meta-device) copy built from
    ``config``."""
    import diffusers

    cls = getattr(diffusers, config.get("_class_name") or ("FluxTransformer2DModel" if family == "flux" else "UNet2DConditionModel"))
    with torch.device("meta"):
        model = cls.from_config(config)
    shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def shape(module: str) -> tuple[int, int]:
        if module not in shapes:
            raise UserError(f"the base {family} transformer has no layer {module!r}: pass the --base model the LoRA was trained on")
        return shapes[module]

    return shape


def kohya_state_dict(lora: Lora, family: str = "sd", base: str | None = None) -> dict[str, torch.Tensor]:
    """The kohya tensors: ``lora_down`` = A, ``lora_up`` = B, ``alpha`` = scale * rank (kohya-style loaders multiply
    by alpha / rank), under the family's names (``kohya.py``; SDXL and FLUX read the base model's config)."""
    from . import kohya

    kohya.kohya_names(family)
    if family in ("sd", "qwen-image"):  # modules named as in diffusers, dots as underscores
        out = {}
        for module in lora.modules:
            name, a = kohya_name(module), lora.down[module]
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = lora.up[module].contiguous()
            out[f"{name}.alpha"] = torch.tensor(lora.scale[module] * a.shape[0], dtype=torch.float32)
        return out
    config = denoiser_config(family, base)
    if config is None:
        raise UserError(f"a kohya {family} file needs the base model's layout and no base model is known for this LoRA: pass --base MODEL")
    if family == "sdxl":
        return kohya.kohya_state_dict(lora, family, unet_config=config)
    return kohya.kohya_state_dict(lora, family, module_shape=_linear_shapes(family, config))


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _resolution(config: dict, default: int = 512, base: str | None = None) -> str:
    """``WxH`` the run sampled at: ``sampling.width``/``height``, else the base model's default (UNet sample size
    times the VAE's downscale, when the base is a local folder), else ``default`` (the family's native size)."""
    sampling = config.get("sampling") or {}
    h, w = sampling.get("height"), sampling.get("width")
    if h or w:
        return f"{w or h}x{h or w}"
    name = base or (config.get("model") or {}).get("pretrained")
    base = Path(resolve_base(name) if name else "")
    try:
        unet = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((base / "vae" / "config.json").read_text(encoding="utf-8"))
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
        return f"{side}x{side}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{default}x{default}"


def _kohya_kind(family: str, lora: Lora, base: str | None) -> tuple[str, str, str, int]:
    """(``ss_base_model_version``, ``modelspec.architecture``, ``ss_network_module``, native size) as kohya's
    scripts write them for the family."""
    if family == "sdxl":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "networks.lora", 1024
    if family == "flux":
        schnell = "schnell" in str(base or "").lower()
        return "flux1", "flux-1-schnell" if schnell else "flux-1-dev", "networks.lora_flux", 1024
    if family == "flux2-klein":  # musubi-tuner's names (kohya's FLUX.2 trainer): networks.lora_flux_2, Flux.2-klein-4b / -9b
        size = "9b" if "9b" in str(base or "").lower() else "4b"
        return "flux2_klein", f"Flux.2-klein-{size}", "networks.lora_flux_2", 1024
    if family == "qwen-image":  # musubi-tuner's network module for Qwen-Image (kohya's trainer for it)
        return "qwen_image", "Qwen-Image", "networks.lora_qwen_image", 1328
    version = sd_version(lora)
    return version, "stable-diffusion-v2-512" if version == "sd_v2" else "stable-diffusion-v1", "networks.lora", 512


def kohya_metadata(src: LoraSource, lora: Lora, *, license: str | None = None, title: str | None = None,
                   family: str = "sd", base: str | None = None) -> dict[str, str]:  # fmt: skip
    """Header metadata for the kohya file: what kohya's scripts write (``ss_*``), Stability's model spec
    (``modelspec.*``) and ours (``raft_*``); every value a string."""
    import datetime

    version, arch, network, native = _kohya_kind(family, lora, base or src.base_model)
    conv = [m for m in lora.modules if lora.down[m].dim() == 4]
    meta = {
        "ss_network_module": network,
        "ss_network_dim": str(lora.rank),
        "ss_network_alpha": _fmt(lora.alpha),
        "ss_base_model_version": version,
        "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": base or src.base_model or "unknown",
        "ss_output_name": title or "raft-lora",
        "ss_training_comment": f"RAFT (reward-ranked fine-tuning) by {tool_version()}" + (f", reward {src.reward}" if src.reward else ""),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch + "/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": title or "raft-lora",
        "modelspec.resolution": _resolution(src.config, native, base),
        "raft_family": family,
        "modelspec.date": datetime.date.today().isoformat(),
        "raft_tool": tool_version(),
        "raft_method": "RAFT",
        "raft_lora_rank": str(lora.rank),
        "raft_lora_alpha": _fmt(lora.alpha),
        "raft_lora_targets": json.dumps(sorted(lora.config.get("target_modules") or [])),
    }
    if conv:  # kohya's LoCon convention for LoRA on convolutions
        conv_rank = max(lora.down[m].shape[0] for m in conv)
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": _fmt(lora.alpha)})
    if base or src.base_model:
        meta["raft_base_model"] = base or src.base_model
    if src.reward:
        meta["raft_reward"] = src.reward
    if src.stage is not None:
        meta["raft_stage"] = str(src.stage)
    if license:
        meta["modelspec.license"] = meta["raft_license"] = license
    rows = metrics_rows(src.run_dir) if src.run_dir else []
    base = next((r for r in rows if r.get("stage") == 0), None)
    final = next((r for r in rows if r.get("stage") == src.stage), None) if src.stage else None
    for key, row in (("raft_eval_reward_base", base), ("raft_eval_reward_final", final)):
        if row and isinstance(row.get("eval_reward_mean"), (int, float)):
            meta[key] = repr(float(row["eval_reward_mean"]))
    return meta


def _prepare_out(out: Path, overwrite: bool, *, is_dir: bool, src: LoraSource | None = None) -> None:
    """Make room for ``out``: an existing one is an error unless ``overwrite`` (never the source or its run)."""
    if src is not None:
        keep = [src.weights.resolve()] + ([src.run_dir.resolve()] if src.run_dir else [])
        target = out.resolve()
        if any(target == k or target in k.parents for k in keep):
            raise UserError(f"-o {out} would overwrite the LoRA being exported or its run: choose another -o")
    if out.exists():
        if not overwrite:
            raise UserError(f"{out} already exists: choose another -o or pass --overwrite")
        if out.is_dir() and not is_dir:
            raise UserError(f"{out} is a folder: -o for this format names a .safetensors file")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)


def export_kohya(src: LoraSource, out: str | Path, *, license: str | None = None, overwrite: bool = False,
                 base: str | None = None) -> Path:  # fmt: skip
    """Write the LoRA as one kohya / A1111 / ComfyUI ``.safetensors`` file (``out`` gets the suffix if it has none)
    under its family's kohya names (``kohya.py``); SD3 is refused in one line."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.is_dir():  # a folder to put the file in
        out = out / f"{src.run_dir.name if src.run_dir else 'raft_lora'}.safetensors"
    elif out.suffix != ".safetensors":
        out = out.with_name(out.name + ".safetensors")
    lora = read_lora(src.weights)
    family = export_family(src, lora, base)
    state = kohya_state_dict(lora, family, base or src.base_model)
    meta = kohya_metadata(src, lora, license=license, title=out.stem, family=family, base=base)
    _prepare_out(out, overwrite, is_dir=False, src=src)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(out)
    return out


def export_diffusers(src: LoraSource, out: str | Path, *, overwrite: bool = False) -> Path:
    """Copy the diffusers-format LoRA (and the run's model card, when there is one) into the folder ``out``."""
    read_lora(src.weights)  # a LoRA, not any .safetensors
    out = Path(out)
    _prepare_out(out, overwrite, is_dir=True, src=src)
    out.mkdir(parents=True)
    shutil.copy2(src.weights, out / LORA_WEIGHT_NAME)
    card = src.weights.parent / "README.md"
    if card.is_file():
        grid = src.run_dir / GRID if src.run_dir is not None else None
        text = card.read_text(encoding="utf-8")
        if grid is not None and grid.is_file() and f"](../{GRID})" in text:  # the grid travels with the card, as `push` lays it out
            (out / GRID).parent.mkdir(parents=True)
            shutil.copy2(grid, out / GRID)
            text = text.replace(f"](../{GRID})", f"]({GRID})")
        (out / "README.md").write_text(text, encoding="utf-8")
    return out


def export_peft(src: LoraSource, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` the way ``PeftModel.save_pretrained`` does
    (keys ``base_model.model.<module>.lora_A.weight``), for ``PeftModel.from_pretrained(unet, out)``."""
    from safetensors.torch import save_file

    lora = read_lora(src.weights)
    if not lora.config:
        raise UserError(f"{src.weights} records no LoRA config (rank, alpha, targets): a peft folder needs one")
    config = dict(lora.config)
    config["target_modules"] = sorted(config.get("target_modules") or [])
    config["base_model_name_or_path"] = src.base_model
    config["inference_mode"] = True
    state = {}
    for module in lora.modules:
        state[f"base_model.model.{module}.lora_A.weight"] = lora.down[module].contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = lora.up[module].contiguous()
    out = Path(out)
    _prepare_out(out, overwrite, is_dir=True, src=src)
    out.mkdir(parents=True)
    (out / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    # the config in the header as well, under the keys' prefix: diffusers' ``unet.load_lora_adapter(out,
    # weight_name=PEFT_WEIGHT_NAME, prefix="base_model.model")`` reads alpha from there (else it takes alpha = rank)
    header = json.dumps({f"base_model.model.{k}": v for k, v in config.items()}, indent=2, sort_keys=True)
    save_file(state, str(out / PEFT_WEIGHT_NAME), metadata={"format": "pt", METADATA_KEY: header})
    return out


# --- merged checkpoint ---------------------------------------------------------------------------------------


def load_base_pipeline(src: LoraSource, base: str | None = None, *, family: str = "sd", device: str = "cpu"):
    """The base pipeline the LoRA was trained on (``base`` wins over the run's ``model.pretrained``), fp32, loaded
    with the family's own loader."""
    from .families.registry import get_family

    name = base or src.base_model
    if not name:
        raise UserError(f"no base model known for {src.weights} (not inside a run directory): pass --base MODEL")
    return get_family(family).load(resolve_base(name), dtype="fp32", device=device)


def merge_lora_into(pipe, lora: Lora) -> int:
    """Add ``scale * B @ A`` to each targeted weight of the denoiser (``pipe.unet`` or ``pipe.transformer``) in
    place; return how many weights changed."""
    denoiser = getattr(pipe, lora.prefix, None)
    if denoiser is None:
        raise UserError(
            f"the base pipeline {type(pipe).__name__} has no {lora.prefix}, which the LoRA is for: pass the --base model the LoRA was trained on"
        )
    modules = dict(denoiser.named_modules())
    missing = [m for m in lora.modules if m not in modules or not hasattr(modules[m], "weight")]
    if missing:
        raise UserError(
            f"the LoRA targets {missing[0]!r}, which the base {lora.prefix} lacks ({len(missing)} such): pass the --base model it was trained on"
        )
    with torch.no_grad():
        for m in lora.modules:
            w = modules[m].weight
            d = lora.delta(m)
            if d.shape != w.shape:
                raise UserError(
                    f"LoRA of {m!r} has shape {tuple(d.shape)} but the base weight is {tuple(w.shape)}: pass the --base model the LoRA was trained on"
                )
            w.add_(d.to(w.device, w.dtype))
    return len(lora.modules)


SINGLE_FILE_FAMILIES = ("sd", "sdxl")  # families with a one-file original-layout checkpoint here


def export_merged(src: LoraSource, out: str | Path, *, base: str | None = None, single_file: bool = True,
                  overwrite: bool = False, device: str = "cpu") -> dict[str, Path]:  # fmt: skip
    """Fuse the LoRA into the base model and save it: ``out/`` as a diffusers pipeline folder (every family) and,
    for SD 1.x and SDXL, ``out/<out name>.safetensors`` as one original-layout checkpoint
    (``from_single_file(file, config=out)`` reads it offline, the folder giving the component configs).
    Returns ``{"diffusers": ..., "single_file": ...}`` (no single file for SD 2.x, SD3, FLUX, FLUX.2)."""
    from safetensors.torch import save_file

    lora = read_lora(src.weights)
    family = export_family(src, lora, base)
    if family == "sd" and sd_version(lora) != "sd_v1":
        single_file = False  # SD 2.x's OpenCLIP text encoder layout is not written here
    single_file = single_file and family in SINGLE_FILE_FAMILIES
    pipe = load_base_pipeline(src, base, family=family, device=device)
    merge_lora_into(pipe, lora)
    out = Path(out)
    _prepare_out(out, overwrite, is_dir=True, src=src)
    pipe.save_pretrained(str(out), safe_serialization=True)
    paths = {"diffusers": out}
    if single_file:
        meta = {
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-xl-v1-base" if family == "sdxl" else "stable-diffusion-v1",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": out.name,
            "raft_tool": tool_version(),
            "raft_merged_from": f"{base or src.base_model} + {src.weights}",
        }
        path = out / f"{out.name}.safetensors"
        save_file(sdxl_checkpoint(pipe) if family == "sdxl" else sd1_checkpoint(pipe), str(path), metadata=meta)
        paths["single_file"] = path
    return paths


_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_to_ldm(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A diffusers SD 1.x / SDXL UNet state dict under the original (LDM / SGM) names, ``model.diffusion_model.``
    prefixed (the names ``kohya.sgm_unet_pairs`` gives)."""
    from .kohya import sgm_unet_pairs, to_sgm

    pairs = sgm_unet_pairs(cfg)
    out = {}
    for key, value in state.items():
        new = to_sgm(key, pairs)
        if new is None:
            raise UserError(f"single-file export: no original name for the UNet weight {key!r} (not an SD 1.x / SDXL UNet?)")
        out["model.diffusion_model." + new] = value
    return out


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def _vae_prefixes(cfg) -> list[tuple[str, str]]:
    n = len(cfg["block_out_channels"])
    pairs = [("encoder.conv_norm_out.", "encoder.norm_out."), ("decoder.conv_norm_out.", "decoder.norm_out.")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2."),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.")]  # fmt: skip
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample."),
                  (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block."),  # LDM counts up blocks from the bottom
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")]  # fmt: skip
    return pairs


def vae_to_ldm(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict under the LDM names, ``first_stage_model.`` prefixed (the mid-block
    attention's linear q/k/v/proj_out become 1x1 convolutions, as in the original)."""
    pairs = _vae_prefixes(cfg)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs)
        if new is None:
            new = key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
        if ".resnets." not in key and "mid.attn_1." in new:
            rest = new.split("mid.attn_1.", 1)[1]
            for a, b in _VAE_ATTN.items():
                if rest.startswith(a + "."):
                    new = new.split("mid.attn_1.", 1)[0] + "mid.attn_1." + b + rest[len(a) :]
                    if b != "norm" and value.dim() == 2:
                        value = value[:, :, None, None]
                    break
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        out["first_stage_model." + new] = value
    return out


def sd1_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """One SD 1.x single-file state dict (UNet, VAE, CLIP text encoder) in the original layout, contiguous on CPU."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):  # newer transformers drop the "text_model." level the original has
            key = key if key.startswith("text_model.") else "text_model." + key
            state["cond_stage_model.transformer." + key] = value
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def open_clip_text(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers ``CLIPTextModelWithProjection`` state dict in OpenCLIP's layout (SDXL's second text encoder in
    the original checkpoint): q/k/v fused into ``in_proj``, ``text_projection`` transposed."""
    rename = (("text_model.encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."), (".layer_norm1.", ".ln_1."),
              (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj."))  # fmt: skip
    out = {
        prefix + "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        prefix + "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        prefix + "ln_final.weight": state["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state["text_projection.weight"].T.contiguous(),
    }
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        p = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            fused = torch.cat([state[f"{p}{x}_proj.{kind}"] for x in "qkv"])
            out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{kind}"] = fused
    for key, value in state.items():
        if not key.startswith("text_model.encoder.layers.") or re.search(r"\.self_attn\.[qkv]_proj\.", key):
            continue
        for a, b in rename:
            key = key.replace(a, b)
        out[prefix + key] = value
    return out


def sdxl_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """One SDXL single-file state dict in the original (SGM) layout: ``model.diffusion_model.*``,
    ``first_stage_model.*``, ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L, transformers
    layout) and ``conditioner.embedders.1.model.*`` (OpenCLIP bigG layout), contiguous on CPU."""
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    for key, value in pipe.text_encoder.state_dict().items():
        if not key.endswith("position_ids"):
            key = key if key.startswith("text_model.") else "text_model." + key
            state["conditioner.embedders.0.transformer." + key] = value
    text2 = {k: v for k, v in pipe.text_encoder_2.state_dict().items() if not k.endswith("position_ids")}
    state.update(open_clip_text(text2, "conditioner.embedders.1.model."))
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# --- the command ---------------------------------------------------------------------------------------------


def export(source: str | Path, fmt: str, out: str | Path, *, merge: bool = False, base: str | None = None,
           license: str | None = None, single_file: bool = True, overwrite: bool = False) -> dict[str, Path]:  # fmt: skip
    """``raft-diffusion export``: resolve ``source``, then write ``fmt`` (or the merged model) to ``out``."""
    from ..core.rundir import public_modes

    src = resolve_source(source)
    if merge:
        paths = export_merged(src, out, base=base, single_file=single_file, overwrite=overwrite)
    elif fmt == "kohya":
        paths = {"kohya": export_kohya(src, out, license=license, overwrite=overwrite, base=base)}
    elif fmt == "diffusers":
        paths = {"diffusers": export_diffusers(src, out, overwrite=overwrite)}
    elif fmt == "peft":
        paths = {"peft": export_peft(src, out, overwrite=overwrite)}
    else:
        raise UserError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    for path in paths.values():  # safetensors writes its files owner-only: give them what a plain write would
        public_modes(path)
    return paths
