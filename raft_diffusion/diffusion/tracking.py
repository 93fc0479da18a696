"""Optional experiment trackers: TensorBoard and Weights & Biases, fed once per stage.

Off by default (``eval.tensorboard``, ``eval.wandb``). Each stage logs every numeric metric of its
``metrics.jsonl`` row and a grid of its held-out images (rows = prompts, columns = seeds).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import UserError
from ..core.rundir import read_jsonl


def eval_grid(stage_dir: Path, max_samples: int = 4) -> np.ndarray | None:
    """The stage's eval images as one uint8 HxWx3 array (rows = prompts), or None when there are none."""
    rows = [r for r in read_jsonl(Path(stage_dir) / "eval.jsonl") if r.get("image")]
    if not rows:
        return None
    by_prompt: dict[int, list] = {}
    for r in rows:
        if r["sample_index"] < max_samples:
            by_prompt.setdefault(r["prompt_index"], []).append(r)
    tiles = [
        [np.asarray(Image.open(Path(stage_dir) / r["image"]).convert("RGB")) for r in sorted(v, key=lambda r: r["sample_index"])]
        for _, v in sorted(by_prompt.items())
    ]
    h, w = tiles[0][0].shape[:2]
    cols = max(len(t) for t in tiles)
    grid = np.zeros((len(tiles) * h, cols * w, 3), dtype=np.uint8)
    for i, line in enumerate(tiles):
        for j, tile in enumerate(line):
            grid[i * h : (i + 1) * h, j * w : (j + 1) * w] = tile
    scale = max(1, 256 // max(h, w))  # small images enlarged (nearest neighbour) so a person can see them
    return grid.repeat(scale, 0).repeat(scale, 1)


def _scalars(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "stage" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """Callable ``(row, stage_dir)`` that forwards one stage to the enabled trackers."""

    def __init__(self, run_root: Path, cfg):
        self.writers = []
        if cfg.eval.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("eval.tensorboard=true needs the tensorboard package: pip install 'raft-diffusion[tensorboard]'") from None
            self.tb = SummaryWriter(log_dir=str(Path(run_root) / "tensorboard"))
            self.writers.append(self._tensorboard)
        if cfg.eval.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("eval.wandb=true needs wandb: pip install 'raft-diffusion[wandb]' (then wandb login)") from None
            self.wandb = wandb
            self.wandb_run = wandb.init(
                project=cfg.eval.wandb_project,
                name=Path(run_root).name,
                config=cfg.to_dict(),
                dir=str(run_root),
                resume="allow",
                id=Path(run_root).resolve().name,
            )
            self.writers.append(self._wandb)

    @property
    def active(self) -> bool:
        return bool(self.writers)

    def __call__(self, row: dict, stage_dir: Path) -> None:
        grid = eval_grid(stage_dir)
        for write in self.writers:
            write(row, grid)

    def _tensorboard(self, row, grid):
        for k, v in _scalars(row).items():
            self.tb.add_scalar(k, v, global_step=row["stage"])
        if grid is not None:
            self.tb.add_image("eval/images", grid, global_step=row["stage"], dataformats="HWC")
        self.tb.flush()

    def _wandb(self, row, grid):
        data = dict(_scalars(row))
        if grid is not None:
            data["eval/images"] = self.wandb.Image(grid)
        self.wandb.log(data, step=row["stage"])

    def close(self) -> None:
        if hasattr(self, "tb"):
            self.tb.close()
        if hasattr(self, "wandb_run"):
            self.wandb_run.finish()
