"""Reward names -> reward callables.

A name is resolved in this order:

1. a built-in in ``REGISTRY`` (``list_rewards()``);
2. an entry point in the group ``reward_models`` of an installed distribution, e.g. in its pyproject::

       [project.entry-points.reward_models]
       sharpness = "my_pkg.rewards:sharpness"

3. ``"package.module:attr"`` (importable; the current directory is tried too) or ``"path/to/file.py:attr"``.

What is loaded is used by one rule (the same for entry points and ``module:attr``):

- a *factory* is a class, or a function marked with ``@reward_factory`` (it has ``is_reward_factory = True``):
  it is called once as ``factory(device=..., dtype=..., **kwargs)`` (``device``/``dtype`` only if its
  signature accepts them) and must return the reward callable;
- anything else callable *is* the reward; ``kwargs`` given to ``load_reward`` are then bound as call-time
  keyword arguments (``functools.partial``).

Every reward is returned wrapped in ``LoadedReward``, which validates each output (``check_reward_output`` for
image rewards, ``check_text_reward_output`` for text rewards; the kind comes from the registry, from a
``reward_kind`` attribute, or from the call: a tensor first argument means image reward).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from ._common import resolve_device, resolve_dtype
from .checks import check_images, check_reward_output, check_text_reward_output
from .errors import RewardArgumentsError, RewardConfigError, RewardError, UnknownRewardError

ENTRY_POINT_GROUP = "reward_models"


@dataclass(frozen=True)
class RewardInfo:
    """A built-in reward: where its factory lives and what it needs."""

    target: str  # "module:factory", imported only when the reward is loaded
    kind: str  # "image" or "text"
    summary: str  # one line for listings and docs
    weights: str  # where the weights come from by default
    licence: str  # licence of the default weights / package
    extra: str | None = None  # pip extra that provides an optional package


REGISTRY: dict[str, RewardInfo] = {
    "aesthetic": RewardInfo(
        "reward_models.aesthetic:aesthetic",
        "image",
        "LAION improved aesthetic predictor (MLP on normalised CLIP ViT-L/14 image embeddings), AVA 1-10 scale",
        "MLP: sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor; "
        "CLIP: open_clip ViT-L-14-quickgelu/openai",
        "Apache-2.0 (predictor repo); MIT (OpenAI CLIP)",
    ),
    "clip_score": RewardInfo(
        "reward_models.clip_score:clip_score",
        "image",
        "100 x cosine(image, prompt) CLIP embeddings, clipped at 0 (torchmetrics convention)",
        "open_clip ViT-L-14-quickgelu/openai (any open_clip model/tag/dir)",
        "MIT (OpenAI CLIP)",
    ),
    "pickscore": RewardInfo(
        "reward_models.clip_score:pickscore",
        "image",
        "PickScore v1: logit_scale x cosine(image, prompt) with a fine-tuned CLIP ViT-H/14",
        "HF yuvalkirstain/PickScore_v1 + processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "MIT (PickScore code; check the model card)",
    ),
    "hpsv2": RewardInfo(
        "reward_models.external:hpsv2",
        "image",
        "Human Preference Score v2/v2.1 (cosine(image, prompt) with the HPS-tuned ViT-H/14)",
        "HF xswu/HPSv2 (HPS_v2.1_compressed.pt), via the hpsv2 package",
        "Apache-2.0",
        extra="hpsv2",
    ),
    "imagereward": RewardInfo(
        "reward_models.external:imagereward",
        "image",
        "ImageReward v1.0 (BLIP-based human preference model)",
        "HF THUDM/ImageReward (ImageReward.pt, med_config.json), via the image-reward package",
        "Apache-2.0",
        extra="imagereward",
    ),
    "brightness": RewardInfo("reward_models.programmatic:brightness", "image", "mean BT.601 luma in [0, 1]", "none", "-"),
    "saturation": RewardInfo("reward_models.programmatic:saturation", "image", "mean HSV saturation in [0, 1]", "none", "-"),
    "jpeg_compressibility": RewardInfo("reward_models.programmatic:jpeg_compressibility", "image", "minus JPEG size in kB (quality 95)", "none", "-"),
    "jpeg_incompressibility": RewardInfo("reward_models.programmatic:jpeg_incompressibility", "image", "JPEG size in kB (quality 95)", "none", "-"),
    "sequence_classifier": RewardInfo(
        "reward_models.text:sequence_classifier",
        "text",
        "text reward: a transformers sequence-classification reward model, score = chosen logit",
        "any Hub id or local directory (model=..., required)",
        "that of the chosen model",
    ),
}


def reward_factory(fn: Callable | None = None, *, kind: str | None = None):
    """Mark ``fn`` as a reward factory (called once with device/dtype/kwargs; returns the reward).

    Usable as ``@reward_factory`` or ``@reward_factory(kind="image")``.
    """

    def mark(f):
        f.is_reward_factory = True
        if kind is not None:
            if kind not in ("image", "text"):
                raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
            f.reward_kind = kind
        return f

    return mark(fn) if fn is not None else mark


class LoadedReward:
    """A reward callable that validates every output and names the reward in errors.

    Attributes of the wrapped callable (e.g. ``last_components``, ``backbone``) are reachable on the wrapper.
    Image rewards return float32 CPU tensors ``[B]``; text rewards return ``list[float | None]``.
    """

    def __init__(self, name: str, fn: Callable, kind: str | None = None):
        self.name = name
        self.__name__ = name  # trl logs reward functions by __name__
        self.fn = fn
        self.kind = kind

    def __call__(self, *args, **kwargs):
        return self._checked(args, kwargs, allow_all_nan=False)

    def probe(self, *args, **kwargs):
        """Called as the reward is, with every check but one: no score for the whole batch (all NaN or None) is a valid
        answer. For a start-up probe on placeholder inputs (grey images, short completions), which a reward may fairly
        decline to score."""
        return self._checked(args, kwargs, allow_all_nan=True)

    def _checked(self, args: tuple, kwargs: dict, *, allow_all_nan: bool):
        first = args[0] if args else kwargs.get("images", kwargs.get("prompts"))
        kind = self.kind or ("image" if isinstance(first, torch.Tensor) or "images" in kwargs else "text")
        if kind == "image":
            images = args[0] if args else kwargs.get("images")
            check_images(self.name, images)
            with torch.no_grad():  # rewards rank samples; nothing is ever differentiated through them
                out = self.fn(*args, **kwargs)
            return check_reward_output(self.name, out, int(images.shape[0]), allow_all_nan=allow_all_nan)
        completions = args[1] if len(args) > 1 else kwargs.get("completions")
        if completions is None:
            raise RewardError(f"text reward '{self.name}' must be called as reward(prompts, completions, **kwargs)")
        with torch.no_grad():
            out = self.fn(*args, **kwargs)
        return check_text_reward_output(self.name, out, len(completions), allow_all_nan=allow_all_nan)

    def __getattr__(self, item):
        if item in ("fn", "name", "kind", "__name__") or item.startswith("__"):
            raise AttributeError(item)
        return getattr(self.fn, item)

    def __repr__(self) -> str:
        return f"LoadedReward({self.name!r}, kind={self.kind!r})"


# ----------------------------------------------------------------------------------------------- lookup


def _entry_points() -> dict[str, Any]:
    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except TypeError:  # pragma: no cover - very old importlib.metadata
        eps = metadata.entry_points().get(ENTRY_POINT_GROUP, [])
    return {ep.name: ep for ep in eps}


def list_rewards(kind: str | None = None, include_entry_points: bool = True) -> list[str]:
    """Sorted names of the built-in rewards (optionally of one ``kind``) plus installed entry points."""
    names = [n for n, info in REGISTRY.items() if kind is None or info.kind == kind]
    if include_entry_points and kind is None:
        names += [n for n in _entry_points() if n not in REGISTRY]
    return sorted(set(names))


def is_known_reward_name(name: str) -> bool:
    """Whether ``name`` is a built-in reward or an installed entry point (nothing is imported)."""
    return name in REGISTRY or name in _entry_points()


def unknown_reward(name: str, kind: str | None = None, extra=()) -> UnknownRewardError:
    """The error for a name that is not a reward: the nearest valid one, and the valid names (the built-ins of
    ``kind`` only, when given, and ``extra`` names the caller adds)."""
    builtins = sorted({*(n for n, info in REGISTRY.items() if kind is None or info.kind == kind), *extra})
    plugins = sorted(n for n in _entry_points() if n not in REGISTRY)
    near = difflib.get_close_matches(name, builtins + plugins, n=1, cutoff=0.5)
    hint = f"did you mean '{near[0]}'? " if near else ""
    listed = ", ".join(builtins) + (f"; entry points: {', '.join(plugins)}" if plugins else "")
    return UnknownRewardError(f"unknown reward {name!r}; {hint}valid names: {listed}; or use 'package.module:function' or 'path/to/file.py:function'")


def _import_target(target: str, label: str) -> Any:
    module_name, _, attr = target.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise UnknownRewardError(f"reward {label!r}: expected 'package.module:function', got {target!r}")
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        module = _import_file(module_name, label)
    else:
        module = _import_module(module_name, label)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            near = difflib.get_close_matches(part, public, n=1)
            raise UnknownRewardError(
                f"reward {label!r}: module {module_name!r} has no attribute {attr!r}"
                + (f" (did you mean '{near[0]}'?)" if near else "")
                + f"; callables there: {', '.join(public[:20]) or 'none'}"
            )
        obj = getattr(obj, part)
    return obj


def _import_module(module_name: str, label: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if not (module_name == missing or module_name.startswith(missing + ".")):
            raise RewardConfigError(
                f"reward {label!r}: importing {module_name!r} failed because it imports the missing package {missing!r}; install it"
            ) from e
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                pass
            finally:
                if cwd in sys.path:
                    sys.path.remove(cwd)
        raise UnknownRewardError(
            f"reward {label!r}: cannot import module {module_name!r} (not a built-in reward, not an entry point, "
            f"and not importable from sys.path or the current directory {cwd!r}); valid built-ins: "
            f"{', '.join(sorted(REGISTRY))}"
        ) from e
    except RewardError:
        raise
    except Exception as e:
        raise RewardConfigError(f"reward {label!r}: importing module {module_name!r} raised {type(e).__name__}: {e}") from e


def _import_file(path_str: str, label: str):
    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise UnknownRewardError(f"reward {label!r}: file {str(path)!r} not found")
    mod_name = f"_reward_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise RewardConfigError(f"reward {label!r}: running {str(path)!r} raised {type(e).__name__}: {e}") from e
    return module


def _call_factory(factory: Callable, label: str, device, dtype, kwargs: dict) -> Callable:
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        sig = None
    call_kwargs = dict(kwargs)
    if sig is not None:
        params = sig.parameters
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        for key, value in (("device", device), ("dtype", dtype)):
            if key in call_kwargs:
                raise RewardConfigError(f"reward {label!r}: pass {key} to load_reward, not inside kwargs")
            if var_kw or key in params:
                call_kwargs[key] = value
        try:
            sig.bind(**call_kwargs)
        except TypeError as e:
            accepted = [
                n
                for n, p in params.items()
                if n not in ("device", "dtype") and p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            ]
            raise RewardArgumentsError(f"reward {label!r}: bad arguments {sorted(kwargs)} ({e}); accepted: {', '.join(accepted) or 'none'}") from e
    reward = factory(**call_kwargs)
    if not callable(reward):
        raise RewardConfigError(f"reward {label!r}: the factory returned {type(reward).__name__}, not a callable reward")
    return reward


def _from_object(obj: Any, label: str, device, dtype, kwargs: dict, kind: str | None) -> LoadedReward:
    if inspect.isclass(obj) or getattr(obj, "is_reward_factory", False):
        reward = _call_factory(obj, label, device, dtype, kwargs)
    elif callable(obj):
        reward = functools.partial(obj, **kwargs) if kwargs else obj
    else:
        raise RewardConfigError(f"reward {label!r} is a {type(obj).__name__}, not a callable or a factory")
    kind = getattr(reward, "reward_kind", None) or getattr(obj, "reward_kind", None) or kind
    if isinstance(reward, LoadedReward):
        return reward
    return LoadedReward(label, reward, kind)


def load_named_reward(
    name: str | Callable,
    device: str | torch.device | None = None,
    dtype: Any = torch.float32,
    **kwargs,
) -> LoadedReward:
    """Load one reward by name (built-in, entry point, ``module:function``, ``file.py:function``) or from a
    callable; ``reward_models.load_reward`` also takes a config dict.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if isinstance(name, LoadedReward) and not kwargs:
        return name
    if not isinstance(name, str):
        if not callable(name):
            raise RewardConfigError(f"load_reward: expected a reward name, callable or config dict, got {type(name).__name__}")
        label = getattr(name, "__name__", type(name).__name__)
        return _from_object(name, label, device, dtype, kwargs, None)
    name = name.strip()
    if name in REGISTRY:
        info = REGISTRY[name]
        factory = _import_target(info.target, name)
        return LoadedReward(name, _call_factory(factory, name, device, dtype, kwargs), info.kind)
    eps = _entry_points()
    if name in eps:
        try:
            obj = eps[name].load()
        except Exception as e:
            raise RewardConfigError(
                f"reward {name!r}: loading entry point {eps[name].value!r} (group {ENTRY_POINT_GROUP!r}) raised {type(e).__name__}: {e}"
            ) from e
        return _from_object(obj, name, device, dtype, kwargs, None)
    if ":" in name:
        return _from_object(_import_target(name, name), name, device, dtype, kwargs, None)
    raise unknown_reward(name)
