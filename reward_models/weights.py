"""Finding weights files and optional packages, with errors that say how to provide them.

A weights *source* is one of:

- a local file path (``~`` expanded);
- ``hf://<org>/<repo>/<path/in/repo>``: a file on the Hugging Face Hub (``huggingface_hub.hf_hub_download``,
  which uses the local cache and honours ``HF_HUB_OFFLINE=1``);
- ``http(s)://...``: downloaded once into ``$REWARD_MODELS_CACHE`` (default ``~/.cache/reward_models``) and
  read from there afterwards; with ``REWARD_MODELS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` only the cache is used.

Nothing here ever returns "no weights": it returns a readable path or raises ``RewardWeightsNotFoundError``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from .errors import MissingDependencyError, RewardWeightsNotFoundError


def cache_dir() -> Path:
    """Directory where URL downloads are cached (``$REWARD_MODELS_CACHE`` or ``~/.cache/reward_models``)."""
    return Path(os.environ.get("REWARD_MODELS_CACHE", "~/.cache/reward_models")).expanduser()


def _env_on(name: str) -> bool:
    """Whether environment variable ``name`` is set to 1, true, yes or on."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """True when downloads are disabled (``REWARD_MODELS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``)."""
    return _env_on("REWARD_MODELS_OFFLINE") or _env_on("HF_HUB_OFFLINE")


def hub_offline_reason(endpoint: str | None = None, timeout: float = 3.0) -> str | None:
    """Why the Hugging Face Hub cannot be reached (``HF_HUB_OFFLINE`` set, or no connection to its host), else None.
    One socket, so the answer comes in seconds, not after the Hub client's retries."""
    if _env_on("HF_HUB_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return f"no network connection to {host} ({type(err).__name__})"
    return None


# what a transformers model class needs besides local_files_only to stay off the network: its look-up of a peft
# adapter_config.json does not follow local_files_only (transformers 5.x) and waits out the Hub client's retries
MODEL_CACHE_ONLY = {"adapter_kwargs": {"local_files_only": True}}


def from_cache_or_hub(
    loader: Callable[..., Any], name: str, offline_error: Callable[[str], Exception], cache_only: dict | None = None, **kwargs
) -> Any:
    """``loader(name, **kwargs)``, a transformers ``from_pretrained``, that asks whether the Hub answers before it
    loads a Hub id. When it does not, the id is read from the local cache only (``local_files_only`` and the
    ``cache_only`` arguments, e.g. :data:`MODEL_CACHE_ONLY` for a model class), and a cache miss raises
    ``offline_error(reason)`` at once: the Hub client would spend most of a minute in retries before failing. A
    local folder, or any id while the Hub answers, loads as it always did."""
    if Path(name).expanduser().exists():
        return loader(str(Path(name).expanduser()), **kwargs)
    reason = hub_offline_reason()
    if reason is None:
        return loader(name, **kwargs)
    try:
        return loader(name, local_files_only=True, **(cache_only or {}), **kwargs)
    except (OSError, ValueError):  # not in the cache (transformers raises one or the other)
        raise offline_error(reason) from None


def _how_to(what: str, env_var: str | None, kwarg: str) -> str:
    ways = [f"pass {kwarg}='/path/to/file'"]
    if env_var:
        ways.append(f"set {env_var}=/path/to/file")
    ways.append("or a source 'hf://org/repo/file' / 'https://...' reachable from this machine")
    return f"to provide the {what}: " + ", ".join(ways)


def resolve_weights(
    source: str | None,
    *,
    what: str,
    env_var: str | None = None,
    default: str | None = None,
    kwarg: str = "weights",
) -> Path:
    """Return a local path for a weights file.

    Order: explicit ``source`` (a kwarg), else the environment variable ``env_var``, else ``default``.
    ``what`` names the file in error messages (e.g. "LAION aesthetic MLP weights").
    """
    origin = f"{kwarg}="
    if not source and env_var and os.environ.get(env_var):
        source, origin = os.environ[env_var], f"${env_var}="
    if not source:
        source, origin = default, "default "
    if not source:
        raise RewardWeightsNotFoundError(f"no {what} given; {_how_to(what, env_var, kwarg)}")
    source = str(source)
    looked_for = f"{origin}{source!r}"

    if source.startswith("hf://"):
        parts = source[len("hf://") :].split("/")
        if len(parts) < 3:
            raise RewardWeightsNotFoundError(f"{what}: hub source {source!r} must look like 'hf://org/repo/filename'")
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
        try:
            from huggingface_hub import hf_hub_download

            return Path(hf_hub_download(repo_id=repo_id, filename=filename))
        except Exception as e:  # network, missing file, offline cache miss, auth
            raise RewardWeightsNotFoundError(
                f"could not get {what} from the Hugging Face Hub (looked for {looked_for}: file {filename!r} in "
                f"repo {repo_id!r}, network and local HF cache): {type(e).__name__}: {_first_line(e)}; "
                f"{_how_to(what, env_var, kwarg)}"
            ) from e

    if source.startswith(("http://", "https://")):
        url_name = unquote(Path(urlparse(source).path).name) or "weights"
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        target = cache_dir() / f"{digest}-{url_name}"
        if target.is_file():
            return target
        if offline():
            raise RewardWeightsNotFoundError(
                f"{what} not in the cache ({target}) and downloads are off (offline mode); looked for {looked_for}; {_how_to(what, env_var, kwarg)}"
            )
        try:
            import torch.hub

            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            torch.hub.download_url_to_file(source, str(tmp), progress=False)
            os.replace(tmp, target)
            return target
        except Exception as e:
            raise RewardWeightsNotFoundError(
                f"could not download {what} (looked for {looked_for}, cache {target}): "
                f"{type(e).__name__}: {_first_line(e)}; {_how_to(what, env_var, kwarg)}"
            ) from e

    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise RewardWeightsNotFoundError(f"{what}: {looked_for} is a directory, expected a file; {_how_to(what, env_var, kwarg)}")
    raise RewardWeightsNotFoundError(f"{what} not found: no file at {looked_for}; {_how_to(what, env_var, kwarg)}")


def require_package(module: str, *, extra: str, reward: str, pip_name: str | None = None) -> Any:
    """Import an optional package or raise ``MissingDependencyError`` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name not in (None, module, module.split(".")[0]):
            # The package is installed but one of *its* imports failed: say so instead of "not installed".
            raise MissingDependencyError(
                f"reward '{reward}' needs the package '{pip_name or module}', which is installed but failed "
                f"to import ({type(e).__name__}: {_first_line(e)}); reinstall it with "
                f"pip install 'raft-diffusion[{extra}]'"
            ) from e
        raise MissingDependencyError(
            f"reward '{reward}' needs the optional package '{pip_name or module}' (import {module!r} failed); "
            f"install it with: pip install 'raft-diffusion[{extra}]'"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else ""
