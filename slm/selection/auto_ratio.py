"""``selector.ratio=auto``: the share of tokens worth training, read off the data before training.

The excess loss of a token (the starting model's loss minus the reference's) is about zero where neither model can
predict it (noise: the *irreducible* mode) and positive where the reference, trained on clean text, has learnt
what the model has not (the *learnable* mode). On a noisy corpus the excess losses of a sample are two modes; a
two-component Gaussian mixture fitted to them (EM, float64) gives the learnable mode's weight: the ratio. It is
rounded to ``step`` and kept within ``[low, high]``; where the modes do not separate (Ashman's D below ``min_d``:
the sample is one mode, nothing to tell apart), the estimate says so and the caller falls back to its default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

SEPARATED = 2.0  # Ashman's D above which two Gaussian modes are told apart cleanly


@dataclass(frozen=True)
class Mode:
    mean: float
    std: float
    weight: float


@dataclass(frozen=True)
class RatioEstimate:
    """What ``ratio=auto`` chose and why: the two modes of the sample's excess loss, their separation, and the
    ratio (None where the modes do not separate)."""

    ratio: float | None
    learnable: Mode
    irreducible: Mode
    separation: float  # Ashman's D = |m1 - m2| * sqrt(2 / (s1^2 + s2^2))
    tokens: int

    def evidence(self) -> dict:
        return {
            "ratio": self.ratio,
            "tokens": self.tokens,
            "separation": round(self.separation, 3),
            "learnable": {k: round(v, 4) for k, v in asdict(self.learnable).items()},
            "irreducible": {k: round(v, 4) for k, v in asdict(self.irreducible).items()},
        }

    def describe(self) -> str:
        lo, hi = self.irreducible, self.learnable
        modes = (
            f"excess loss over {self.tokens:,} tokens: learnable mode {hi.mean:.2f} +- {hi.std:.2f} nats "
            f"({hi.weight:.1%} of tokens), irreducible mode {lo.mean:.2f} +- {lo.std:.2f} ({lo.weight:.1%}); "
            f"separation (Ashman's D) {self.separation:.2f}"
        )
        if self.ratio is None:
            return f"{modes}: the modes do not separate"
        return f"{modes}: ratio {self.ratio}"


def two_modes(x: Tensor, iters: int = 300, tol: float = 1e-9) -> tuple[Mode, Mode]:
    """A two-component 1-D Gaussian mixture fitted to ``x`` by EM (float64; started at the quartiles), as
    (lower-mean mode, higher-mean mode)."""
    x = x.detach().reshape(-1).double()
    if x.numel() < 2:
        raise ValueError(f"two modes need at least 2 values, got {x.numel()}")
    mean = torch.quantile(x, torch.tensor([0.25, 0.75], dtype=x.dtype))
    spread = x.std().clamp_min(1e-6)
    std = torch.stack([spread, spread]) / 2
    weight = torch.tensor([0.5, 0.5], dtype=x.dtype)
    floor = spread * 1e-3  # a mode never collapses onto a single repeated value
    last = -math.inf
    for _ in range(iters):
        log_p = -0.5 * ((x[:, None] - mean) / std) ** 2 - std.log() + weight.log()
        total = torch.logsumexp(log_p, dim=1, keepdim=True)
        resp = (log_p - total).exp()
        n = resp.sum(0).clamp_min(1e-12)
        weight = n / x.numel()
        mean = (resp * x[:, None]).sum(0) / n
        std = ((resp * (x[:, None] - mean) ** 2).sum(0) / n).sqrt().clamp_min(floor)
        ll = total.mean().item()
        if abs(ll - last) < tol:
            break
        last = ll
    lo, hi = sorted(range(2), key=lambda i: mean[i].item())
    return tuple(Mode(mean[i].item(), std[i].item(), weight[i].item()) for i in (lo, hi))


def estimate_ratio(
    excess: Tensor, low: float = 0.1, high: float = 0.9, step: float = 0.05, min_d: float = SEPARATED
) -> RatioEstimate:
    """The learnable mode's share of ``excess`` (per-token excess losses of valid tokens), rounded to ``step``
    within ``[low, high]``; ``ratio`` is None where the modes' separation is below ``min_d``."""
    if not 0 < low <= high <= 1:
        raise ValueError(f"need 0 < low <= high <= 1, got low={low}, high={high}")
    x = excess.detach().reshape(-1)
    x = x[torch.isfinite(x)]
    irreducible, learnable = two_modes(x)
    d = abs(learnable.mean - irreducible.mean) * math.sqrt(2 / (learnable.std**2 + irreducible.std**2))
    ratio = None
    if d >= min_d:
        ratio = round(min(max(round(learnable.weight / step) * step, low), high), 4)
    return RatioEstimate(ratio, learnable, irreducible, d, int(x.numel()))
