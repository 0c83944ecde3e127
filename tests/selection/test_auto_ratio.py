"""selector.ratio=auto's estimate (issue 39 item 4): the learnable mode's share of a sample's excess losses."""

import pytest
import torch

from slm.selection import estimate_ratio, two_modes


def _mixture(share: float, n: int = 20000, seed: int = 0, gap: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    k = int(share * n)
    learnable = torch.randn(k, generator=g) * 0.8 + gap
    irreducible = torch.randn(n - k, generator=g) * 0.5
    return torch.cat([irreducible, learnable])[torch.randperm(n, generator=g)]


@pytest.mark.parametrize("share", [0.3, 0.45, 0.6, 0.75])
def test_the_learnable_share_of_two_separate_modes_is_the_ratio(share):
    est = estimate_ratio(_mixture(share))
    assert est.ratio == pytest.approx(round(share / 0.05) * 0.05)
    assert est.learnable.mean == pytest.approx(3.0, abs=0.05) and est.irreducible.mean == pytest.approx(0.0, abs=0.05)
    assert est.learnable.weight == pytest.approx(share, abs=0.01) and est.separation > 4
    ev = est.evidence()
    assert ev["ratio"] == est.ratio and ev["tokens"] == 20000 and set(ev["learnable"]) == {"mean", "std", "weight"}


def test_one_mode_gives_no_ratio_and_bounds_hold():
    g = torch.Generator().manual_seed(1)
    one = torch.randn(5000, generator=g)
    est = estimate_ratio(one)
    assert est.ratio is None and est.separation < 2 and "do not separate" in est.describe()
    assert estimate_ratio(_mixture(0.97)).ratio == 0.9  # kept within [low, high]
    assert estimate_ratio(_mixture(0.02, n=50000)).ratio == 0.1
    with pytest.raises(ValueError, match="low"):
        estimate_ratio(one, low=0.0)


def test_two_modes_agrees_with_the_mixtures_moments_and_ignores_non_finite_values():
    x = _mixture(0.4, gap=5.0)
    lo, hi = two_modes(x)
    assert (lo.std, hi.std) == (pytest.approx(0.5, abs=0.02), pytest.approx(0.8, abs=0.02))
    assert lo.weight + hi.weight == pytest.approx(1.0)
    with_nan = torch.cat([x, torch.tensor([float("nan"), float("inf")])])
    assert estimate_ratio(with_nan).ratio == estimate_ratio(x).ratio
