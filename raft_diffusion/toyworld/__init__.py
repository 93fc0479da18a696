"""A toy text-to-image world: procedural scenes with captions, a hidden gold aesthetic, a pixel oracle,
and (built by ``raft-diffusion toyworld build``) miniature CLIP, aesthetic head and text-to-image models."""
from .oracle import Analysis, analyse, analyse_batch, oracle_metrics
from .world import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, all_captions, caption, caption_variant,
                    gold_aesthetic,
                    make_scene, parse_caption, render, render_batch, sample_scenes, to_tensor)

__all__ = [
    "Analysis", "analyse", "analyse_batch", "oracle_metrics", "BACKGROUNDS", "COLOURS", "POSITIONS", "SHAPES",
    "SIZES", "Scene", "all_captions", "caption", "caption_variant", "gold_aesthetic", "make_scene", "parse_caption", "render",
    "render_batch", "sample_scenes", "to_tensor",
]
