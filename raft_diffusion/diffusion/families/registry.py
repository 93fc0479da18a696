"""Which family a model belongs to: by its pipeline class (model_index.json's ``_class_name``) or by name."""

from __future__ import annotations

import json
from pathlib import Path

from raft_diffusion.core.errors import UserError
from raft_diffusion.diffusion.families.base import Family
from raft_diffusion.diffusion.families.flux import FluxFamily
from raft_diffusion.diffusion.families.flux2 import Flux2Family
from raft_diffusion.diffusion.families.flux2_klein import Flux2KleinFamily
from raft_diffusion.diffusion.families.qwen_image import QwenImageFamily
from raft_diffusion.diffusion.families.sd import StableDiffusionFamily
from raft_diffusion.diffusion.families.sd3 import StableDiffusion3Family
from raft_diffusion.diffusion.families.sdxl import StableDiffusionXLFamily
from raft_diffusion.diffusion.families.z_image import ZImageFamily

FAMILIES: dict[str, Family] = {
    f.pipeline_class_name: f
    for f in (
        StableDiffusionFamily(),
        StableDiffusionXLFamily(),
        StableDiffusion3Family(),
        FluxFamily(),
        Flux2Family(),
        Flux2KleinFamily(),
        QwenImageFamily(),
        ZImageFamily(),
    )
}  # pipeline class name -> family


def _supported() -> str:
    return ", ".join(f"{cls} ({f.name})" for cls, f in FAMILIES.items())


def get_family(name: str) -> Family:
    """A family by short name (``sd``, ``sdxl``, ``sd3``, ``flux``, ``flux2``, ``flux2-klein``, ``qwen-image``,
    ``z-image``) or pipeline class name."""
    for cls, family in FAMILIES.items():
        if name in (cls, family.name):
            return family
    raise UserError(f"unsupported model family {name!r}: supported pipelines are {_supported()}")


def _class_name_of(source) -> str:
    """The pipeline class name of a pipeline object, a local pipeline folder or a hub id."""
    if not isinstance(source, (str, Path)):
        return type(source).__name__
    folder = Path(source).expanduser()
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "?")
    if folder.exists():
        raise UserError(f"{str(source)!r} has no model_index.json: pass a diffusers pipeline folder or set model.family")
    try:  # a hub id: its model_index.json, from the local cache or the hub
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(str(source)).get("_class_name", "?")
    except Exception as err:  # noqa: BLE001 - any lookup failure is the same advice
        raise UserError(
            f"cannot read model_index.json of {str(source)!r} ({type(err).__name__}): pass a local pipeline folder "
            f"or set model.family to one of {', '.join(f.name for f in FAMILIES.values())}"
        ) from None


def detect_family(source, override: str | None = None) -> Family:
    """The family of ``source`` (a pipeline, a pipeline folder, a hub id, or a family/pipeline name).

    ``override`` (``model.family``) wins when given. Pipelines of other classes are a one-line UserError
    listing the supported ones.
    """
    if override:
        family = get_family(override)
        local = isinstance(source, (str, Path)) and (Path(source).expanduser() / "model_index.json").is_file()
        if local:  # a local folder says what it is: a contradiction is refused
            name = _class_name_of(source)
            if name in FAMILIES and FAMILIES[name].name != family.name:
                raise UserError(
                    f"model.family is {family.name}, but {str(source)!r} holds a {name} ({FAMILIES[name].name}): "
                    f"leave model.family unset (it is read from model_index.json) or point model.pretrained at a {family.name} pipeline"
                )
        return family
    if isinstance(source, str) and any(source in (cls, f.name) for cls, f in FAMILIES.items()):
        return get_family(source)
    name = _class_name_of(source)
    if name in FAMILIES:
        return FAMILIES[name]
    if not isinstance(source, (str, Path)):  # a subclass of a supported pipeline
        for cls in type(source).__mro__:
            if cls.__name__ in FAMILIES:
                return FAMILIES[cls.__name__]
    raise UserError(f"unsupported pipeline {name} in {str(source)!r}: supported pipelines are {_supported()}")
