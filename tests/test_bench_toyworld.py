"""scripts/bench_toyworld.py's interval on the proxy rise, against a by-hand loop over the same resamples."""

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_proxy_rise_interval_equals_a_by_hand_bootstrap_with_the_base_std_resampled():
    from bench_toyworld import _bootstrap_rise_sd

    rng = np.random.default_rng(3)
    base = rng.normal(5.6, 1.7, size=40)
    stage = base * 0.3 + rng.normal(6.0, 0.8, size=40)
    lo, hi = _bootstrap_rise_sd(stage, base, n=300, seed=7)

    draws = np.random.default_rng(7).integers(0, 40, size=(300, 40))
    rises = []
    for idx in draws:  # one resample of the (prompt, seed) slots at a time: the same slots for both sides
        b, s = base[idx], stage[idx]
        rises.append((s.mean() - b.mean()) / b.std())
    assert (lo, hi) == (float(np.percentile(rises, 2.5)), float(np.percentile(rises, 97.5)))

    point = (stage.mean() - base.mean()) / base.std()
    assert lo < point < hi
    assert 0.2 < hi - lo < 1.5  # the rise is about 1.5 sd; 40 slots leave an interval of several tenths


def test_proxy_rise_interval_of_the_base_itself_is_zero_and_a_constant_shift_keeps_only_the_std_noise():
    from bench_toyworld import _bootstrap_rise_sd

    base = np.random.default_rng(0).normal(5.6, 1.7, size=128)
    assert _bootstrap_rise_sd(base, base) == (0.0, 0.0)
    lo, hi = _bootstrap_rise_sd(base + base.std(), base)  # exactly +1 base sd; only the resampled std moves it
    assert lo < 1.0 < hi
    assert hi - lo < 0.3
