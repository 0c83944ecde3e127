"""The threshold over the run (scope=dataset) against a plain quantile of the recent scores."""

import math

import pytest
import torch

from slm.selection import RunningThreshold
from slm.selection.running import TOLERANCE


def test_a_running_threshold_keeps_more_of_a_clean_batch_and_meets_the_ratio_over_the_run():
    g = torch.Generator().manual_seed(0)
    sel, ratio = RunningThreshold(window=8), 0.4
    kept = valid_total = 0
    clean_kept, junk_kept = [], []
    for step in range(60):
        junky = step % 3 == 0  # every third batch is mostly low-score junk
        scores = torch.randn(8, 64, generator=g) - step * 0.02  # scores drift down as the model learns
        if junky:
            scores[:6] -= 3.0
        valid = torch.rand(8, 64, generator=g) > 0.1
        mask = sel.select(scores, valid, ratio)
        assert not (mask & ~valid).any()
        kept, valid_total = kept + int(mask.sum()), valid_total + int(valid.sum())
        if step:  # the first batch has nothing to be ranked against: it keeps the ratio
            (junk_kept if junky else clean_kept).append(float(mask.sum() / valid.sum()))
    assert kept / valid_total == pytest.approx(ratio, abs=0.01)  # the share over the run meets the ratio
    assert min(clean_kept) > ratio > max(junk_kept)  # a junk-heavy batch trains fewer tokens, a clean one more
    assert (sel.kept, sel.seen) == (kept, valid_total)


def test_the_running_threshold_is_a_plain_quantile_of_the_recent_scores():
    """Against a plain re-implementation: the (1 - level) quantile of the last `window` steps' scores, moved
    to the best tokens at the edge when the tokens kept so far would leave TOLERANCE of what was asked."""
    g = torch.Generator().manual_seed(1)
    sel, kept, due, recent, bounded = RunningThreshold(window=3), 0, 0.0, [], 0
    for step in range(10):
        scores, valid = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) > 0.2
        if step in (4, 5):
            scores = scores - 2.0  # two junk-heavy steps: the threshold would keep too few
        n = int(valid.sum())
        level = min(1.0, max(0.0, 0.3 + (due - kept) / (4 * n)))
        recent = (recent + [scores[valid].tolist()])[-3:]
        threshold = float(torch.quantile(torch.tensor([x for step in recent for x in step]), 1 - level))
        mine = sorted(scores[valid].tolist(), reverse=True)
        k = sum(x >= threshold for x in mine)
        low = max(0, math.ceil((due + 0.3 * n) * (1 - TOLERANCE) - kept))
        high = min(n, math.floor((due + 0.3 * n) * (1 + TOLERANCE) - kept))
        if not low <= k <= high:
            threshold, bounded = mine[min(max(k, low), high) - 1], bounded + 1
        expected = valid & (scores >= threshold)
        assert torch.equal(sel.select(scores, valid, 0.3), expected)
        due, kept = due + 0.3 * n, kept + int(expected.sum())
    assert bounded >= 2  # the bound acted, and as written
    state = sel.state_dict()
    again = RunningThreshold()
    again.load_state_dict(state)  # resumes with the same recent scores and counts
    scores, valid = torch.randn(4, 16, generator=g), torch.ones(4, 16, dtype=torch.bool)
    assert torch.equal(again.select(scores, valid, 0.3), sel.select(scores, valid, 0.3))


def _drifting_scores(step: int, n: int = 2000, seed: int = 0, drift: float = 3.0):
    """Excess losses as a learning model gives them: falling fast early; half the tokens junk (lower)."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    junk = torch.rand(n, generator=g) < 0.5
    return torch.randn(n, generator=g) + drift * math.exp(-step / 10) - 2.0 * junk


@pytest.mark.parametrize("ratio", [0.3, 0.4, 0.6])
def test_the_share_kept_so_far_stays_within_the_stated_bound_of_the_ratio_at_every_step(ratio):
    """Scores that fall as the model learns made the threshold lag (kept/seen 0.254 at step 10 of a 0.4 run):
    now the tokens kept so far stay within TOLERANCE (relative) of what the ratio asks at every step."""
    thr = RunningThreshold()
    kept = seen = 0
    for step in range(40):
        scores = _drifting_scores(step)
        kept += int(thr.select(scores, torch.ones_like(scores, dtype=torch.bool), ratio).sum())
        seen += scores.numel()
        assert abs(kept / seen - ratio) <= TOLERANCE * ratio + 1 / seen, (step, kept / seen)


def test_a_ratio_schedule_is_followed_step_by_step_not_only_over_the_run():
    """A falling schedule (0.9 -> 0.3 over 40 steps) trained 0.024 of the tokens over its last 10 steps where it
    asks for 0.369: what is owed is the schedule's own sum, so each stretch of the run keeps what it asks."""
    thr, asked, kept = RunningThreshold(), [], []
    for step in range(40):
        ratio = 0.9 + (0.3 - 0.9) * step / 39
        scores = _drifting_scores(step, drift=0.0)
        kept.append(float(thr.select(scores, torch.ones_like(scores, dtype=torch.bool), ratio).float().mean()))
        asked.append(ratio)
    assert sum(kept[-10:]) / 10 == pytest.approx(sum(asked[-10:]) / 10, abs=0.02)
    assert sum(kept) / 40 == pytest.approx(sum(asked) / 40, rel=TOLERANCE)


def test_its_quantile_is_torch_quantile_to_the_last_bit():
    """The threshold's own quantile (no host-side checks) equals torch.quantile exactly: a threshold one ulp off
    flips the tokens that sit on it, and the run drifts from what torch.quantile would have trained."""
    from slm.selection.running import _quantile

    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        x = torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g)
        q = float(torch.rand(1, generator=g))
        assert torch.equal(_quantile(x, q), torch.quantile(x, q)), (x.numel(), q)
