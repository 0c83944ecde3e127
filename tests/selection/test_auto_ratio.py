"""selector.ratio=auto's estimate (issue 39 item 4): the share of the training text whose excess losses are
distributed as clean held-out text's, estimated as a mixture proportion."""

import pytest
import torch

from slm.selection import estimate_ratio
from slm.selection.auto_ratio import QUANTILES


def _normal(n, mean, std, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * std + mean


def _train(share: float, n: int = 40000, seed: int = 0):
    """A training text: ``share`` of its tokens distributed as the clean text (N(3, 1)), the rest irreducible
    noise around zero (N(0, 0.7))."""
    k = int(share * n)
    return torch.cat([_normal(k, 3.0, 1.0, seed), _normal(n - k, 0.0, 0.7, seed + 1)])


@pytest.mark.parametrize("share", [0.3, 0.45, 0.6, 0.8])
def test_the_share_distributed_as_clean_text_is_the_ratio(share):
    clean = _normal(20000, 3.0, 1.0, 7)
    est = estimate_ratio(_train(share), clean)
    assert est.kappa == pytest.approx(share, abs=0.02)
    assert est.ratio == pytest.approx(round(share / 0.05) * 0.05)
    # by hand: the least quotient over the thresholds at the clean sample's quantiles
    by_hand = min(
        float((_train(share) > torch.quantile(clean.double(), q)).double().mean()) / (1 - q) for q in QUANTILES
    )
    assert est.kappa == pytest.approx(by_hand, rel=1e-3)
    ev = est.evidence()
    assert ev["ratio"] == est.ratio and ev["train_tokens"] == 40000 and len(ev["quotients"]) == len(QUANTILES)


def test_noise_reaching_into_the_clean_tail_only_raises_the_quotients_and_bounds_hold():
    clean = _normal(20000, 3.0, 1.0, 7)
    wide = torch.cat([_normal(12000, 3.0, 1.0, 0), _normal(28000, 1.0, 1.5, 1)])  # 30% clean-like, a wide rest
    est = estimate_ratio(wide, clean)
    assert all(v >= est.kappa for v in est.quotients.values()) and 0.3 <= est.kappa < 0.45
    assert estimate_ratio(clean, clean).ratio == 0.9  # kept within [low, high]
    assert estimate_ratio(_train(0.02), clean).ratio == 0.1
    with_nan = torch.cat([_train(0.5), torch.tensor([float("nan"), float("inf")])])
    assert estimate_ratio(with_nan, clean).ratio == estimate_ratio(_train(0.5), clean).ratio
    with pytest.raises(ValueError, match="low"):
        estimate_ratio(_train(0.5), clean, low=0.0)
    with pytest.raises(ValueError, match="clean held-out tokens"):
        estimate_ratio(_train(0.5), clean[:50])
