"""``selector.ratio=auto``: the share of the training text worth training, read off the data before training.

A token's excess loss (the starting model's loss minus the reference's) is high where the reference, trained on
clean text, has learnt what the model has not, and about zero or below where neither can predict it (noise: the
irreducible part). Clean held-out text shows what learnable tokens look like: its excess losses. The training
text is a mixture, ``kappa`` of it distributed as that clean text and the rest lower; ``kappa`` is estimated as
mixture proportions are (Blanchard, Lee and Scott 2010; Scott 2015): the least, over thresholds ``t`` in the clean
sample's upper half, of the share of training tokens above ``t`` over the share of clean tokens above ``t``. Where
the rest has no mass above a threshold, that quotient is ``kappa`` exactly; where it has some, the quotient is
above it, hence the least. The ratio is ``kappa`` rounded to ``step`` within ``[low, high]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

QUANTILES = (0.5, 0.6, 0.7, 0.8, 0.9)  # thresholds: these quantiles of the clean sample's excess losses
MIN_TAIL = 100  # clean tokens a threshold must leave above it (fewer: too noisy a quotient)


@dataclass(frozen=True)
class RatioEstimate:
    """What ``ratio=auto`` chose and why."""

    ratio: float
    kappa: float  # the estimated share of training tokens distributed as clean text's excess losses
    quotients: dict  # clean-sample quantile -> (share of training tokens above it) / (share of clean tokens above it)
    threshold: float  # the excess loss (nats) where the least quotient was found
    train_tokens: int
    clean_tokens: int
    train_median: float
    clean_median: float

    def evidence(self) -> dict:
        return {
            "ratio": self.ratio,
            "kappa": round(self.kappa, 4),
            "quotients": {str(q): round(v, 4) for q, v in self.quotients.items()},
            "threshold": round(self.threshold, 4),
            "train_tokens": self.train_tokens,
            "clean_tokens": self.clean_tokens,
            "train_median_excess": round(self.train_median, 4),
            "clean_median_excess": round(self.clean_median, 4),
        }

    def describe(self) -> str:
        quotients = ", ".join(f"q{q}: {v:.3f}" for q, v in self.quotients.items())
        return (
            f"median excess loss {self.train_median:.2f} nats on {self.train_tokens:,} training tokens, "
            f"{self.clean_median:.2f} on {self.clean_tokens:,} clean held-out tokens; training tokens above each "
            f"quantile of the clean ones, over the clean share above it: {quotients}; the least, {self.kappa:.3f} "
            f"(above {self.threshold:.2f} nats), is the share distributed as clean text: ratio {self.ratio}"
        )


def estimate_ratio(
    train: Tensor, clean: Tensor, low: float = 0.1, high: float = 0.9, step: float = 0.05
) -> RatioEstimate:
    """The ratio from per-token excess losses of valid tokens: ``train`` (a sample of the training text) and
    ``clean`` (clean held-out text), both against the same starting model and reference."""
    if not 0 < low <= high <= 1:
        raise ValueError(f"need 0 < low <= high <= 1, got low={low}, high={high}")
    train, clean = (x.detach().reshape(-1).double() for x in (train, clean))
    train, clean = train[torch.isfinite(train)], clean[torch.isfinite(clean)]
    if train.numel() < MIN_TAIL or clean.numel() < 2 * MIN_TAIL:
        raise ValueError(
            f"selector.ratio=auto needs at least {MIN_TAIL} training and {2 * MIN_TAIL} clean held-out tokens with a "
            f"loss, got {train.numel()} and {clean.numel()}"
        )
    quotients, at = {}, {}
    for q in QUANTILES:
        t = torch.quantile(clean, q).item()
        above = int((clean > t).sum())
        if above < MIN_TAIL:
            continue
        quotients[q] = float((train > t).double().mean()) / (above / clean.numel())
        at[q] = t
    best = min(quotients, key=quotients.get)
    kappa = quotients[best]
    ratio = round(min(max(round(kappa / step) * step, low), high), 4)
    return RatioEstimate(
        ratio,
        kappa,
        quotients,
        at[best],
        int(train.numel()),
        int(clean.numel()),
        float(train.median()),
        float(clean.median()),
    )
