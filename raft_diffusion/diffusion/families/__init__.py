"""Model families behind one interface (:class:`Family`): SD 1.x/2.x, SDXL, SD3/3.5, FLUX.1."""

from raft_diffusion.diffusion.families.base import Family, seed_generators
from raft_diffusion.diffusion.families.embeds import PromptEmbeds
from raft_diffusion.diffusion.families.registry import (
    FAMILIES,
    detect_family,
    get_family,
)
from raft_diffusion.diffusion.families.settings import LossSettings

__all__ = ["FAMILIES", "Family", "LossSettings", "PromptEmbeds", "detect_family", "get_family", "seed_generators"]
