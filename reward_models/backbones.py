"""CLIP backbones shared by the image rewards (open_clip or transformers), loaded once and cached.

``load_open_clip`` accepts, as ``clip_model``:

1. an already-built open_clip model object (the explicit hook for tests and toy models; pass ``tokenizer``
   too unless the model uses open_clip's default BPE tokenizer);
2. a local directory in the layout that ``save_open_clip`` writes (and open_clip's ``local-dir:`` schema
   reads): ``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) plus
   ``open_clip_model.safetensors``; ``local-dir:/path`` works too;
3. ``hf-hub:org/repo`` (a Hub repo in that same layout);
4. an open_clip model name (``open_clip.list_models()``) with ``pretrained`` = a tag
   (``open_clip.list_pretrained_tags_by_model(name)``) or a checkpoint file path.

Weights must be found in every case: ``pretrained=None`` for a model name is an error, never random weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import RewardConfigError, RewardWeightsNotFoundError
from .preprocess import ImageTransform, open_clip_preprocess_cfg, transform_from_hf_processor, transform_from_open_clip
from .weights import MODEL_CACHE_ONLY, from_cache_or_hub

OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

_CACHE: dict[tuple, ClipBackbone] = {}


def clear_backbone_cache() -> None:
    """Forget cached backbones (they are shared between rewards loaded with the same arguments)."""
    _CACHE.clear()


class ClipBackbone:
    """A frozen CLIP: ``encode_images`` takes float ``[B, 3, H, W]`` in ``[0, 1]``; features are unnormalised."""

    def __init__(self, model: torch.nn.Module, transform: ImageTransform, device, dtype, source: str):
        self.model = model
        self.transform = transform
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source

    @property
    def embed_dim(self) -> int:
        size = self.transform.size
        h, w = (size, size) if isinstance(size, int) else size
        with torch.inference_mode():
            return int(self.encode_images(torch.zeros(1, 3, h, w)).shape[-1])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transform(images.to(device=self.device, dtype=torch.float32))
        return x.to(self.dtype)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def logit_scale(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class OpenClipBackbone(ClipBackbone):
    def __init__(self, model, tokenizer, transform, device, dtype, source):
        super().__init__(model, transform, device, dtype, source)
        self.tokenizer = tokenizer

    @property
    def embed_dim(self) -> int:
        out = getattr(getattr(self.model, "visual", None), "output_dim", None)
        return int(out) if out else super().embed_dim

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(self.pixels(images)).float()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float()

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


class HFClipBackbone(ClipBackbone):
    def __init__(self, model, tokenizer, transform, device, dtype, source):
        super().__init__(model, transform, device, dtype, source)
        self.tokenizer = tokenizer
        max_pos = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77)
        self.max_length = min(int(getattr(tokenizer, "model_max_length", max_pos) or max_pos), int(max_pos))

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        # vision tower -> pooled output -> projection: stable across transformers 4.x and 5.x return types
        out = self.model.vision_model(pixel_values=self.pixels(images))
        return self.model.visual_projection(out.pooler_output).float()

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model.text_model(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))
        return self.model.text_projection(out.pooler_output).float()

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())


# ----------------------------------------------------------------------------------------------- open_clip


def save_open_clip(model: torch.nn.Module, model_cfg: dict, directory: str | os.PathLike, preprocess_cfg: dict | None = None) -> Path:
    """Write an open_clip model as ``directory/open_clip_config.json`` + ``open_clip_model.safetensors``.

    ``model_cfg`` is the architecture dict open_clip builds the model from (``open_clip.get_model_config``
    for built-ins). ``preprocess_cfg`` defaults to ``model.preprocess_cfg`` (set by ``open_clip.create_model``).
    The directory loads with ``load_reward("clip_score", clip_model=directory)`` and with
    ``open_clip.create_model("local-dir:" + directory)``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pcfg = dict(preprocess_cfg if preprocess_cfg is not None else open_clip_preprocess_cfg(model))
    config = {"model_cfg": model_cfg, "preprocess_cfg": _jsonable(pcfg)}
    tmp = directory / (OPEN_CLIP_CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(_jsonable(config), indent=2))
    os.replace(tmp, directory / OPEN_CLIP_CONFIG_NAME)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    tmp = directory / (OPEN_CLIP_WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, directory / OPEN_CLIP_WEIGHTS_NAME)
    return directory


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or os.sep in s or s.endswith(".json")


def _looks_like_local_dir(s: str) -> bool:
    """True for strings that cannot be a Hub id ("org/name"): absolute/relative paths, nested folders."""
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s


def load_open_clip(
    clip_model: Any = "ViT-L-14-quickgelu",
    pretrained: str | None = "openai",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    tokenizer: Callable | None = None,
    preprocess_cfg: dict | None = None,
    cache: bool = True,
    reward: str = "clip",
) -> OpenClipBackbone:
    """Load (or reuse) an open_clip backbone; see the module docstring for the accepted ``clip_model`` forms."""
    if isinstance(clip_model, torch.nn.Module):
        return _wrap_open_clip(clip_model, tokenizer, device, dtype, preprocess_cfg, f"<{type(clip_model).__name__} object>")
    if not isinstance(clip_model, (str, os.PathLike)):
        raise RewardConfigError(
            f"reward '{reward}': clip_model must be an open_clip model name, a directory, 'hf-hub:org/repo' "
            f"or a model object, got {type(clip_model).__name__}"
        )
    spec = str(clip_model)
    local_dir = spec[len("local-dir:") :] if spec.startswith("local-dir:") else None
    if local_dir is None and Path(spec).expanduser().is_dir():
        local_dir = spec
    weights_key = None
    if local_dir is not None:
        d = Path(local_dir).expanduser()
        cfg_path = d / OPEN_CLIP_CONFIG_NAME
        if not cfg_path.is_file():
            raise RewardWeightsNotFoundError(
                f"reward '{reward}': no {OPEN_CLIP_CONFIG_NAME} in clip_model directory {str(d)!r}; write one with "
                f"reward_models.save_open_clip(model, model_cfg, dir) or pass an open_clip model name + pretrained"
            )
        weights = sorted(p for p in d.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not weights:
            raise RewardWeightsNotFoundError(
                f"reward '{reward}': clip_model directory {str(d)!r} has {OPEN_CLIP_CONFIG_NAME} but no weights file "
                f"(looked for {OPEN_CLIP_WEIGHTS_NAME} or *.safetensors/*.bin/*.pth/*.pt); refusing random weights"
            )
        spec = "local-dir:" + str(d.resolve())
        weights_key = tuple((p.name, p.stat().st_mtime_ns) for p in weights)
        pretrained = None
    elif spec.startswith("hf-hub:"):
        pretrained = None
    else:
        not_a_dir = RewardWeightsNotFoundError(
            f"reward '{reward}': clip_model {spec!r} looks like a path but is not a directory; expected a folder "
            f"with {OPEN_CLIP_CONFIG_NAME} + {OPEN_CLIP_WEIGHTS_NAME} (see reward_models.save_open_clip)"
        )
        if spec.startswith((".", "/", "~")):
            raise not_a_dir
        import open_clip

        if open_clip.get_model_config(spec.replace("/", "-")) is None:
            if _looks_like_path(spec):
                raise not_a_dir
            import difflib

            near = difflib.get_close_matches(spec, open_clip.list_models(), n=3)
            raise RewardConfigError(
                f"reward '{reward}': unknown open_clip model {spec!r}"
                + (f" (did you mean {', '.join(near)}?)" if near else "")
                + "; see open_clip.list_models(), or pass a directory / 'hf-hub:org/repo'"
            )
        spec = spec.replace("/", "-")
        if not pretrained:
            tags = open_clip.list_pretrained_tags_by_model(spec)
            raise RewardWeightsNotFoundError(
                f"reward '{reward}': clip_pretrained is required for open_clip model {spec!r} (a tag: {tags} or a "
                f"checkpoint file path); refusing to use random weights"
            )
        if _looks_like_path(str(pretrained)) or Path(str(pretrained)).suffix in _WEIGHT_SUFFIXES:
            p = Path(str(pretrained)).expanduser()
            if not p.is_file():
                raise RewardWeightsNotFoundError(
                    f"reward '{reward}': open_clip checkpoint file {str(p)!r} (clip_pretrained) not found; pass an "
                    f"existing file or a pretrained tag from {open_clip.list_pretrained_tags_by_model(spec)}"
                )
            pretrained = str(p.resolve())
            weights_key = (p.stat().st_mtime_ns,)
        elif not open_clip.get_pretrained_cfg(spec, str(pretrained)):
            raise RewardWeightsNotFoundError(
                f"reward '{reward}': {pretrained!r} is neither a file nor a pretrained tag of open_clip model {spec!r} "
                f"(tags: {open_clip.list_pretrained_tags_by_model(spec)})"
            )

    key = ("open_clip", spec, pretrained, weights_key, str(torch.device(device)), dtype, json.dumps(preprocess_cfg, sort_keys=True, default=str))
    if cache and tokenizer is None and key in _CACHE:
        return _CACHE[key]  # type: ignore[return-value]

    import open_clip

    if pretrained and weights_key is None:
        _refuse_uncached_open_clip(open_clip.get_pretrained_cfg(spec, str(pretrained)), spec, str(pretrained), reward)
    try:
        model = open_clip.create_model(spec, pretrained=pretrained, device="cpu", precision="fp32", require_pretrained=True)
    except Exception as e:
        where = f"open_clip model {spec!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': could not load weights for {where} (network, Hub cache or file): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; download the weights on "
            f"a connected machine (they are cached under ~/.cache/huggingface) or save them locally and pass "
            f"clip_model='/path/to/dir' (see reward_models.save_open_clip) or clip_pretrained='/path/to/file'"
        ) from e
    if tokenizer is None:
        tokenizer = open_clip.get_tokenizer(spec)
    backbone = _wrap_open_clip(model, tokenizer, device, dtype, preprocess_cfg, spec)
    if cache:
        _CACHE[key] = backbone
    return backbone


def _refuse_uncached_open_clip(cfg: dict, spec: str, tag: str, reward: str) -> None:
    """An open_clip pretrained tag whose weights (on the Hub) are not in the local cache while the Hub cannot be
    reached: one line at once, instead of the Hub client's retries (most of a minute) and then the same failure."""
    from .weights import hub_offline_reason

    hub = (cfg or {}).get("hf_hub")
    if not hub:
        return  # weights from a plain URL: open_clip's own cache and errors
    repo_id, filename = hub.rstrip("/"), None
    if repo_id.count("/") > 1:
        repo_id, filename = repo_id.rsplit("/", 1)
    from huggingface_hub import try_to_load_from_cache

    names = {filename} if filename else set()
    names |= {"open_clip_model.safetensors", "open_clip_pytorch_model.bin"}
    if any(isinstance(try_to_load_from_cache(repo_id, n), str) for n in sorted(names)):
        return
    reason = hub_offline_reason()
    if reason is not None:
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': the weights of open_clip model {spec!r} with pretrained={tag!r} (Hub repo {repo_id}) "
            f"are not in the local Hugging Face cache and the Hub cannot be reached ({reason}); download them where "
            f"there is a network (hf download {repo_id}) and point HF_HOME at that cache, or pass "
            f"clip_model='/path/to/dir' (see reward_models.save_open_clip) or clip_pretrained='/path/to/file'"
        )


def _wrap_open_clip(model, tokenizer, device, dtype, preprocess_cfg, source) -> OpenClipBackbone:
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.SimpleTokenizer(context_length=int(getattr(model, "context_length", 77) or 77))
    if preprocess_cfg:
        merged = open_clip_preprocess_cfg(model)
        merged.update(preprocess_cfg)
        transform = transform_from_open_clip(_Cfg(merged))
    else:
        transform = transform_from_open_clip(model)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return OpenClipBackbone(model, tokenizer, transform, device, dtype, source)


class _Cfg:
    def __init__(self, cfg):
        self.preprocess_cfg = cfg


# ----------------------------------------------------------------------------------------------- transformers


def load_hf_clip(
    clip_model: Any = "openai/clip-vit-large-patch14",
    processor: Any | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    reward: str = "clip",
) -> HFClipBackbone:
    """Load (or reuse) a transformers ``CLIPModel`` and its processor.

    ``clip_model``: a Hub id, a local ``save_pretrained`` directory, or an already-built ``CLIPModel`` (the
    explicit hook for tests; then ``processor`` must be a processor object or a path/id). ``processor``
    defaults to ``clip_model``. Missing weights for any parameter is an error, never random initialisation.
    """
    if isinstance(processor, (str, os.PathLike)) or processor is None:
        proc_src = str(processor) if processor is not None else (None if isinstance(clip_model, torch.nn.Module) else str(clip_model))
        if proc_src is None:
            raise RewardConfigError(f"reward '{reward}': pass processor=... (a path or Hub id) with a CLIPModel object")
        proc_obj = None
    else:
        proc_src, proc_obj = f"<{type(processor).__name__} object>", processor

    if isinstance(clip_model, torch.nn.Module):
        model, src = clip_model, f"<{type(clip_model).__name__} object>"
        key = None
    else:
        src = str(clip_model)
        key = ("hf", src, proc_src, str(torch.device(device)), dtype, _mtime(src), _mtime(proc_src))
        if cache and proc_obj is None and key in _CACHE:
            return _CACHE[key]  # type: ignore[return-value]
        model = _hf_from_pretrained("CLIPModel", src, reward=reward, what="CLIP model")

    if proc_obj is None:
        proc_obj = _hf_processor(proc_src, reward=reward)
    image_processor = getattr(proc_obj, "image_processor", proc_obj)
    tokenizer = getattr(proc_obj, "tokenizer", None)
    if tokenizer is None:
        raise RewardConfigError(f"reward '{reward}': processor {proc_src!r} has no tokenizer")
    transform = transform_from_hf_processor(image_processor)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    backbone = HFClipBackbone(model, tokenizer, transform, device, dtype, src)
    if cache and key is not None:
        _CACHE[key] = backbone
    return backbone


def _mtime(src: str | None):
    if src and Path(src).expanduser().exists():
        return Path(src).expanduser().stat().st_mtime_ns
    return None


def _hf_hint(src: str) -> str:
    if Path(src).expanduser().exists() or _looks_like_local_dir(src):
        return f"check that {src!r} is a directory written by save_pretrained"
    return (
        f"Hub id {src!r} needs the network or a local Hugging Face cache (HF_HOME); on an offline machine "
        f"download it elsewhere (hf download {src}) and pass the local directory instead"
    )


def _hub_offline(reward: str, what: str, src: str) -> Callable[[str], Exception]:
    """The one-line error for a Hub id that is neither cached nor reachable (:func:`~.weights.from_cache_or_hub`)."""
    return lambda reason: RewardWeightsNotFoundError(
        f"reward '{reward}': {what} {src!r} is not in the local Hugging Face cache and the Hub cannot be reached ({reason}); {_hf_hint(src)}"
    )


def _hf_from_pretrained(class_name: str, src: str, *, reward: str, what: str, **kwargs):
    """``transformers.<class_name>.from_pretrained`` that refuses partially random weights."""
    import transformers

    cls = getattr(transformers, class_name)
    if _looks_like_local_dir(src) and not Path(src).expanduser().exists():
        raise RewardWeightsNotFoundError(f"reward '{reward}': {what} directory {src!r} does not exist; pass a save_pretrained directory or a Hub id")
    try:
        model, info = from_cache_or_hub(
            cls.from_pretrained, src, _hub_offline(reward, what, src), MODEL_CACHE_ONLY, output_loading_info=True, **kwargs
        )
    except RewardWeightsNotFoundError:
        raise
    except Exception as e:
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': could not load {what} from {src!r}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}; {_hf_hint(src)}"
        ) from e
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': {what} at {src!r} lacks weights for {len(missing)} parameters (e.g. {missing[:3]}), "
            f"which would be randomly initialised; point to a complete checkpoint"
        )
    return model


def _hf_processor(src: str, *, reward: str):
    from transformers import AutoProcessor

    try:
        return from_cache_or_hub(AutoProcessor.from_pretrained, src, _hub_offline(reward, "the CLIP processor", src))
    except RewardWeightsNotFoundError:
        raise
    except Exception as e:
        raise RewardWeightsNotFoundError(
            f"reward '{reward}': could not load the CLIP processor (image processor + tokenizer) from {src!r}: "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}; {_hf_hint(src)}"
        ) from e


def encode_in_batches(fn: Callable[[Any], torch.Tensor], items, batch_size: int) -> torch.Tensor:
    """Apply ``fn`` to consecutive chunks of ``items`` (a tensor or list) and concatenate the results."""
    outs: list[torch.Tensor] = []
    n = len(items)
    for i in range(0, n, batch_size):
        outs.append(fn(items[i : i + batch_size]))
    return torch.cat(outs, dim=0)
