"""Settings of a family's training loss (the flow-matching ones follow diffusers' SD3/FLUX LoRA scripts)."""

from __future__ import annotations

from dataclasses import dataclass

from raft_diffusion.core.errors import UserError

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass(frozen=True)
class LossSettings:
    """How a training step draws timesteps and weights the per-sample loss."""

    weighting_scheme: str = "logit_normal"  # flow families: timestep density and loss weighting (diffusers' names)
    logit_mean: float = 0.0  # logit_normal: mean of logit(u)
    logit_std: float = 1.0  # logit_normal: std of logit(u)
    mode_scale: float = 1.29  # mode: how strongly the density favours mid timesteps
    timestep_range: tuple[int, int] | None = None  # [lo, hi): t for SD/SDXL, sigma*1000 for SD3/FLUX; None = all
    flux_guidance: float = 3.5  # FLUX: the distilled guidance fed to the guidance embedding while training

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"unknown weighting_scheme {self.weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}")
        if not self.logit_std > 0:
            raise UserError(f"logit_std must be > 0 (got {self.logit_std}); 1.0 is the usual choice")
        if self.timestep_range is not None:
            lo, hi = self.timestep_range
            if not 0 <= lo < hi <= 1000:
                raise UserError(f"timestep_range must be [lo, hi] with 0 <= lo < hi <= 1000 (got {list(self.timestep_range)})")
            object.__setattr__(self, "timestep_range", (int(lo), int(hi)))
