"""Plugging in your own reward: a complete, runnable example.

An image reward is any callable ``reward(images, prompts, **kwargs) -> torch.Tensor[B]`` where ``images`` is a
float tensor ``[B, 3, H, W]`` with values in ``[0, 1]`` and ``prompts`` is a list of ``B`` strings. Higher is
better; NaN means "no score" (that sample is never selected).

Use it by name, without registering anything:

    from reward_models import load_reward
    r = load_reward("examples.custom_reward:sharpness")          # from the repository root
    r = load_reward("examples/custom_reward.py:sharpness")       # or by file path, from anywhere
    r = load_reward("custom_reward:sharpness")                   # when examples/ is on PYTHONPATH

or in a run config:

    reward: {name: "examples.custom_reward:sharpness"}
    reward:
      mix:
        - {name: aesthetic, weight: 1.0}
        - {name: "examples.custom_reward:edge_density", weight: 0.5, kwargs: {threshold: 0.2}}
      normalize: zscore

Two styles are shown:

- ``sharpness`` is a plain reward function: it is used as is. Keyword arguments given in the config
  (``kwargs: {...}``) are passed on every call.
- ``edge_density`` is a *factory* (marked with ``@reward_factory``): it is called once with ``device``,
  ``dtype`` and the config's kwargs, and returns the reward. Use a factory when there is something to load
  or precompute once (model weights, a kernel, a tokenizer).

To ship a reward in your own package, declare an entry point so users can refer to it by a short name:

    # pyproject.toml of your package
    [project.entry-points.reward_models]
    sharpness = "my_pkg.rewards:sharpness"

Run this file to see both rewards rank a sharp image above a blurred copy:

    python examples/custom_reward.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reward_models import reward_factory

_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_LUMA = (0.299, 0.587, 0.114)


def _luma(images: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images.clamp(0, 1) * w).sum(dim=1, keepdim=True)  # [B, 1, H, W]


def sharpness(images: torch.Tensor, prompts=None, **kwargs) -> torch.Tensor:
    """Variance of the Laplacian of the luma channel (a classic focus measure), per image."""
    kernel = _LAPLACIAN.to(images.device, images.dtype).view(1, 1, 3, 3)
    lap = F.conv2d(_luma(images.float()), kernel.float())
    return lap.flatten(1).var(dim=1)


@reward_factory(kind="image")
def edge_density(device="cpu", dtype=torch.float32, threshold: float = 0.1):
    """Factory: fraction of pixels whose Sobel gradient magnitude exceeds ``threshold``."""
    if not 0.0 < threshold < 4.0:
        raise ValueError(f"edge_density: threshold must be in (0, 4), got {threshold}")
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device)
    kernels = torch.stack([gx, gx.T]).unsqueeze(1)  # built once, reused on every call

    def reward(images: torch.Tensor, prompts=None, **kwargs) -> torch.Tensor:
        with torch.no_grad():
            g = F.conv2d(_luma(images.to(device=device, dtype=torch.float32)), kernels)
            magnitude = g.pow(2).sum(dim=1).sqrt()
            return (magnitude > threshold).float().flatten(1).mean(dim=1)

    return reward


def _demo() -> None:
    from reward_models import load_reward, load_reward_from_config

    torch.manual_seed(0)
    sharp = (torch.rand(1, 3, 64, 64) > 0.5).float()  # high-frequency noise pattern
    blurred = F.avg_pool2d(sharp, 5, stride=1, padding=2)
    images = torch.cat([sharp, blurred])
    prompts = ["a detailed texture"] * 2

    r = load_reward(f"{__file__}:sharpness")
    print("sharpness    [sharp, blurred]:", r(images, prompts).tolist())
    r = load_reward(f"{__file__}:edge_density", device="cpu", threshold=0.2)
    print("edge_density [sharp, blurred]:", r(images, prompts).tolist())
    mix = load_reward_from_config(
        {
            "mix": [{"name": f"{__file__}:sharpness", "weight": 1.0}, {"name": "brightness", "weight": 0.5}],
            "normalize": "zscore",
        },
        device="cpu",
    )
    print("mix          [sharp, blurred]:", mix(images, prompts).tolist())
    print("mix components:", {k: v.tolist() for k, v in mix.last_components.items()})


if __name__ == "__main__":
    _demo()
