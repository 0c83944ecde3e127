"""The threshold over the run (scope=dataset) against a plain quantile of the recent scores."""


import pytest
import torch

from slm.selection import RunningThreshold


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
    """Against a plain re-implementation: the (1 - level) quantile of the last `window` steps' scores."""
    g = torch.Generator().manual_seed(1)
    sel, seen, kept, recent = RunningThreshold(window=3), 0, 0, []
    for _ in range(10):
        scores, valid = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) > 0.2
        n = int(valid.sum())
        level = min(1.0, max(0.0, 0.3 + (0.3 * seen - kept) / (4 * n)))
        recent = (recent + [scores[valid].tolist()])[-3:]
        threshold = torch.quantile(torch.tensor([x for step in recent for x in step]), 1 - level)
        expected = valid & (scores >= threshold)
        assert torch.equal(sel.select(scores, valid, 0.3), expected)
        seen, kept = seen + int(valid.sum()), kept + int(expected.sum())
    state = sel.state_dict()
    again = RunningThreshold()
    again.load_state_dict(state)  # resumes with the same recent scores and counts
    scores, valid = torch.randn(4, 16, generator=g), torch.ones(4, 16, dtype=torch.bool)
    assert torch.equal(again.select(scores, valid, 0.3), sel.select(scores, valid, 0.3))
