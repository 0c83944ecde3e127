"""Selection by a threshold over the run rather than within a batch (``scope="dataset"``).

Token Cleaning (Pang et al., ICML 2025) ranks tokens over the whole dataset: a junk-heavy batch then
trains fewer tokens and a clean one more. With the current model's excess loss the scores move as
it learns, so the threshold is a running quantile: the ``1 - ratio`` quantile of the valid scores
of the last ``window`` steps (this step's included), nudged by how far the tokens kept so far are
from what the ratio asked for so far (``sum of ratio(step) x valid tokens(step)``, so a ratio schedule
is followed step by step; what is owed is paid back over about :data:`PAYBACK_STEPS` steps).

The bound: scores fall as the model learns, so a quantile over earlier steps keeps too few of this
step's; and a junk-heavy stretch can keep too few for a while. So the tokens kept so far never leave
:data:`TOLERANCE` (relative) of what was asked so far: a step whose threshold would take them out
keeps its best tokens up to the edge instead (at ratio 0.4, kept/seen stays in [0.38, 0.42] from the
first step on). Early steps, whose allowance is small, are close to per-batch top-k; the threshold
gains its freedom as the run goes on. The scores come from every
process (gathered in rank order), so all of them use one threshold and W processes x batch b select
as one process x W*b.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slm.selection.topk import _check_finite, _distributed, _gather_global, check_ratio

PAYBACK_STEPS = 4
TOLERANCE = 0.05  # the tokens kept so far stay within this share of what the ratio asked for so far


class RunningThreshold:
    """Keep the valid tokens whose score reaches the running threshold (see the module docstring).

    ``window``: how many recent steps' valid scores define the quantile (short enough that the
    model's progress does not date them). The count kept by a step depends on its scores: a trainer
    normalises such a step after its forward (one micro-batch per step).
    """

    def __init__(self, window: int = 8):
        if window < 1:
            raise ValueError(f"window must be >= 1 steps, got {window}")
        self.window = int(window)
        self.recent: list[Tensor] = []  # the valid scores of the last `window` steps, oldest first
        self.kept = 0  # valid tokens kept so far (every process)
        self.seen = 0  # valid tokens seen so far (every process)
        self.due = 0.0  # what the ratio asked for so far: the sum of ratio x valid tokens over the steps

    def level(self, ratio: float, n: int) -> float:
        """The share of the recent scores to keep at a step of ``n`` valid tokens: the ratio, plus
        what is owed (or minus what is ahead) over the run, paid back over PAYBACK_STEPS such steps."""
        owed = self.due - self.kept
        return min(1.0, max(0.0, ratio + owed / max(1, PAYBACK_STEPS * n)))

    def _bounded(self, every: Tensor, threshold: Tensor, ratio: float) -> Tensor:
        """``threshold``, or the score of the best token at the edge of the allowance when the tokens kept
        so far would leave TOLERANCE of what was asked (see the module docstring). Decided on the device:
        the bounds come from host counts, the edge from the sorted scores at the clamped count."""
        n = every.numel()
        due = self.due + ratio * n
        low = max(0, math.ceil(due * (1 - TOLERANCE) - self.kept - 1e-9))
        high = min(n, math.floor(due * (1 + TOLERANCE) - self.kept + 1e-9))
        if low > high or n == 0:
            return threshold
        count = (every >= threshold).sum()
        k = count.clamp(low, high)
        ranked = torch.sort(every, descending=True).values
        edge = torch.where(k > 0, ranked.gather(0, (k - 1).clamp(min=0).reshape(1))[0], float("inf"))
        return torch.where((count >= low) & (count <= high), threshold, edge)  # ties at the edge are kept too

    def select(
        self, scores: Tensor, valid: Tensor, ratio: float, check_finite: bool = True, n_valid: int | None = None
    ) -> Tensor:
        """Bool mask of the shape of ``scores``: the valid tokens at or above this step's threshold."""
        return self.select_counted(scores, valid, ratio, check_finite, n_valid)[0]

    def select_counted(
        self, scores: Tensor, valid: Tensor, ratio: float, check_finite: bool = True, n_valid: int | None = None
    ) -> tuple[Tensor, int]:
        """(the mask of :meth:`select`, how many of this process's tokens it keeps). ``n_valid``: this
        process's valid count when the host knows it already; then the step's one wait for the device
        is reading how many tokens it keeps (on one process; more processes also exchange scores)."""
        ratio = check_ratio(ratio)
        valid = valid.bool()
        n = int(valid.sum()) if n_valid is None else int(n_valid)
        mine = scores.float().flatten().index_select(0, torch.nonzero_static(valid.flatten(), size=n).squeeze(1))
        every = _gather_global(mine)[0] if _distributed() else mine  # every process's, in rank order
        if check_finite:
            _check_finite(every, torch.ones_like(every, dtype=torch.bool))
        self.recent = [*self.recent, every][-self.window :]
        pool = torch.cat([t.to(every.device) for t in self.recent])
        keep_share = self.level(ratio, every.numel())
        if keep_share >= 1.0 or not pool.numel():
            threshold = torch.tensor(float("-inf"), device=every.device)
        elif keep_share <= 0.0:
            threshold = torch.tensor(float("inf"), device=every.device)
        else:
            threshold = _quantile(pool, 1.0 - keep_share)
        threshold = self._bounded(every, threshold, ratio)
        mask = valid & (scores.float() >= threshold.to(scores.device))
        counts = torch.stack([(every >= threshold).sum(), (mine >= threshold).sum()])
        kept, mine_kept = counts.to("cpu", copy=True).tolist()  # the one read: every process's count, this one's
        self.due += ratio * every.numel()
        self.seen += int(every.numel())
        self.kept += kept
        return mask, mine_kept

    def state_dict(self) -> dict:
        recent = [t.cpu() for t in self.recent]
        return {"window": self.window, "recent": recent, "kept": self.kept, "seen": self.seen, "due": self.due}

    def load_state_dict(self, state: dict) -> None:
        self.window, self.recent = int(state["window"]), list(state["recent"])
        self.kept, self.seen = int(state["kept"]), int(state["seen"])
        self.due = float(state.get("due", self.kept))  # a checkpoint from before: owed nothing


def _quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)``, to the last bit (its rank and weight in the values' dtype, then lerp),
    without its host-side checks, which wait for the device."""
    ranked = torch.sort(values).values
    rank = torch.full((), q, dtype=values.dtype, device=values.device) * (values.numel() - 1)
    lo, hi = rank.floor(), rank.ceil()
    below, above = (ranked.index_select(0, i.long().reshape(1))[0] for i in (lo, hi))
    return torch.lerp(below, above, rank - lo)
