"""Held-out evaluation metrics, early-stop inputs, before/after galleries and reward curves.

- ``metrics``: reward statistics, best-of-K, CLIP prompt fidelity and per-prompt diversity;
- ``gallery``: ``gallery/index.html``, ``grid_before_after.png`` and ``reward_curve.png`` of a run
  directory, and the same page for ``raft-diffusion compare``.
"""
