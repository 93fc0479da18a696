"""A toy text-to-image world: procedural scenes with captions, a hidden gold aesthetic, a pixel oracle,
and (built by ``raft-diffusion toyworld build``) miniature CLIP, aesthetic head and text-to-image models."""

from importlib import import_module

_FROM = {
    "oracle": ("Analysis", "analyse", "analyse_batch", "oracle_metrics"),
    "world": (
        "BACKGROUNDS",
        "COLOURS",
        "POSITIONS",
        "SHAPES",
        "SIZES",
        "Scene",
        "all_captions",
        "caption",
        "caption_variant",
        "gold_aesthetic",
        "make_scene",
        "parse_caption",
        "render",
        "render_batch",
        "sample_scenes",
        "to_tensor",
    ),
}

__all__ = [name for names in _FROM.values() for name in names]


def __getattr__(name):
    """The names above load on first use (numpy, PIL and torch stay unimported for the CLI's start)."""
    for module, names in _FROM.items():
        if name in names:
            return getattr(import_module(f"{__name__}.{module}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
